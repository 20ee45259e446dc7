"""The `hf-curvedit` command: fit and edit on a local model folder, exit codes, error messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from testing_utils import random_token_rows, slow, write_choice_task
from transformers import AutoModelForCausalLM

from hf_curvedit import load_factors
from hf_curvedit.cli import main
from hf_curvedit.default import LM_EVAL_TASKS_DIR


@pytest.fixture
def text_file(tmp_path):
    f = tmp_path / "corpus.txt"
    f.write_text("The quick brown fox jumps over the lazy dog. " * 60)
    return f


@slow
def test_fit_then_edit(tmp_path, model_dir, text_file, capsys):
    out = tmp_path / "factors"
    rc = main(["fit", "--model", str(model_dir), "--data", str(text_file), "--output-dir", str(out),
               "--seq-len", "32", "--batch-size", "4", "--max-tokens", "512"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj" in printed
    f = load_factors(out)
    assert max(f.num_tokens.values()) == 16 * 31
    assert (out / "eigen.safetensors").exists()

    rc = main(["edit", "--model", str(model_dir), "--factors", str(out), "--keep-mass", "0.5", "0.9",
               "--target-modules", r".*layers\.1\.mlp\.(gate|up)_proj", "--output-dir", str(tmp_path / "edits")])
    assert rc == 0
    for rho in ("0.5", "0.9"):
        folder = tmp_path / "edits" / f"rho{rho}"
        cfg = json.loads((folder / "adapter_config.json").read_text())
        assert cfg["peft_type"] == "CURVEDIT" and cfg["keep_mass"] == float(rho)
        edited = AutoModelForCausalLM.from_pretrained(folder)
        base = AutoModelForCausalLM.from_pretrained(model_dir)
        x = torch.randint(0, 200, (1, 12))
        assert not torch.allclose(edited(x).logits, base(x).logits)
    edit = json.loads((tmp_path / "edits" / "rho0.5" / "curvedit_edit.json").read_text())
    assert {r["module"] for r in edit["modules"]} == {"model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"}
    assert all(r["r"] > 0 and r["s"] > 0 for r in edit["modules"])

    quotes = tmp_path / "quotes.txt"
    quotes.write_text("To be or not to be, that is the question.\nAll that glitters is not gold, they say.\n")
    tasks = tmp_path / "tasks"
    write_choice_task(tasks, "yesno", [("Is the sky green?", 1), ("Is fire hot?", 0), ("Is ice hot?", 1)])
    evaluate = ["evaluate", "--model", str(model_dir), "--adapter", str(tmp_path / "edits" / "rho0.5"),
                "--recitation", f"quotes={quotes}", "--heldout", str(text_file), "--output", str(tmp_path / "r.json")]
    assert main([*evaluate, "--limit", "2"]) == 2
    assert "add --tasks" in capsys.readouterr().err
    assert main([*evaluate, "--tasks", "yesno", "--include-path", str(tasks), "--limit", "2"]) == 0
    rep = json.loads((tmp_path / "r.json").read_text())
    assert "quotes" in json.dumps(rep) and "heldout" in json.dumps(rep)
    assert rep["capabilities"]["yesno"]["n"] == 2 and rep["metadata"]["extra"]["capabilities"]["limit"] == 2
    printed = capsys.readouterr().out
    assert "perplexity" in printed.lower() and "yesno" in printed

    rc = main(["publish", "--adapter", str(tmp_path / "edits" / "rho0.5"), "--repo-id", "user/tiny-edit",
               "--out-dir", str(tmp_path / "pub"), "--report", str(tmp_path / "r.json"),
               "--eigen", str(out / "eigen.safetensors"), "--dry-run"])
    assert rc == 0
    card = (tmp_path / "pub" / "README.md").read_text()
    assert "library_name: peft" in card and "quotes" in card and "Strict" in card and "| yesno | acc | 2 |" in card
    assert f"dataset = `{text_file}`" in card
    assert "| `model.layers.1.mlp.gate_proj` | 0.50 | –" not in card, "the per-module table has r and s"
    assert (tmp_path / "pub" / "adapter_model.safetensors").exists()


def test_bad_input_exit_code_and_message(tmp_path, model_dir, text_file, capsys):
    rc = main(["fit", "--model", str(model_dir), "--data", str(text_file), "--output-dir", str(tmp_path / "o"),
               "--target-modules", "nonexistent_proj,other"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "No linear layer matches" in err and "mlp.gate_proj" in err
    rc = main(["fit", "--model", str(tmp_path / "missing"), "--output-dir", str(tmp_path / "o")])
    assert rc == 2
    assert "could not load model" in capsys.readouterr().err
    rc = main(["fit", "--model", str(model_dir), "--data", str(tmp_path / "nope.txt"),
               "--output-dir", str(tmp_path / "o")])
    assert rc == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["fit"])
    assert e.value.code == 2


def test_sweep_command(tmp_path, model_dir, text_file, capsys):
    out = tmp_path / "factors"
    assert main(["fit", "--model", str(model_dir), "--data", str(text_file), "--output-dir", str(out),
                 "--seq-len", "32", "--batch-size", "4", "--max-tokens", "256"]) == 0
    quotes = tmp_path / "quotes.txt"
    quotes.write_text("The quick brown fox jumps over the lazy dog.\nA stitch in time saves nine, they say.\n")
    rc = main(["sweep", "--model", str(model_dir), "--factors", str(out), "--recitation", f"q={quotes}",
               "--heldout", str(text_file), "--keep-mass", "0.5", "0.9", "--layers", "1", "0,1", "--modules", "gate,up",
               "--allocation", "uniform", "--svd-ranks", "4", "16", "--ppl-budget", "100", "--baselines", "svd",
               "balanced_subnet", "--subnet-ratios", "0.01", "0.1", "--subnet-epochs", "1", "--clean", str(text_file),
               "--output-dir", str(tmp_path / "sweep")])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "chosen: layers" in printed and "svd (matched PPL)" in printed
    assert "balanced_subnet (matched PPL)" in printed
    result = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert len([p for p in result["points"] if p["method"] == "curvedit"]) == 4
    assert [p["ratio"] for p in result["points"] if p["method"] == "balanced_subnet"] == [0.01, 0.1]
    assert (tmp_path / "sweep" / "sweep.png").stat().st_size > 1000

    # the card of the sweep's pick shows it next to both baselines
    chosen = result["chosen"]
    assert main(["edit", "--model", str(model_dir), "--factors", str(out), "--keep-mass", str(chosen["keep_mass"]),
                 "--target-modules", chosen["target_modules"], "--output-dir", str(tmp_path / "edit")]) == 0
    assert main(["publish", "--adapter", str(tmp_path / "edit" / f"rho{chosen['keep_mass']:g}"), "--repo-id",
                 "user/tiny", "--out-dir", str(tmp_path / "pub"), "--dry-run",
                 "--comparison", str(tmp_path / "sweep" / "sweep.json")]) == 0
    card = (tmp_path / "pub" / "README.md").read_text()
    section = card.split("### Compared with other methods")[1].split("## Limitations")[0]
    assert "BalancedSubnet trains on the memorized set itself" in section
    assert "balanced_subnet (matched PPL)" in section and "svd (matched PPL)" in section and "**(chosen)**" in section
    assert (tmp_path / "pub" / "plots" / "method_comparison.png").stat().st_size > 1000
    # another edit than the sweep's pick is refused before anything is written
    other = 0.9 if chosen["keep_mass"] != 0.9 else 0.5
    assert main(["edit", "--model", str(model_dir), "--factors", str(out), "--keep-mass", str(other),
                 "--target-modules", chosen["target_modules"], "--output-dir", str(tmp_path / "edit")]) == 0
    capsys.readouterr()
    assert main(["publish", "--adapter", str(tmp_path / "edit" / f"rho{other:g}"), "--repo-id", "user/tiny",
                 "--out-dir", str(tmp_path / "pub2"), "--dry-run",
                 "--comparison", str(tmp_path / "sweep" / "sweep.json")]) == 2
    assert f"picked another edit than this one (keep_mass is {other}" in capsys.readouterr().err
    assert not (tmp_path / "pub2").exists()
    rc = main(["sweep", "--model", str(model_dir), "--factors", str(out), "--recitation", f"q={quotes}",
               "--heldout", str(text_file), "--layers", "x", "--output-dir", str(tmp_path / "s2")])
    assert rc == 2 and "--layers takes" in capsys.readouterr().err
    rc = main(["sweep", "--model", str(model_dir), "--factors", str(out), "--baselines", "balanced_subnet",
               "--subnet-ratios", "0.01", "1.5", "--output-dir", str(tmp_path / "s3")])
    assert rc == 2 and "--subnet-ratios 1.5 is not in (0, 1)" in capsys.readouterr().err


def test_run_yaml_does_every_step_and_resumes(tmp_path, model_dir, text_file, capsys):
    import yaml

    quotes = tmp_path / "quotes.txt"
    quotes.write_text("The quick brown fox jumps over the lazy dog.\nA stitch in time saves nine, they say.\n")
    cfg = {
        "model": str(model_dir),
        "output_dir": str(tmp_path / "run"),
        "fit": {"data": str(text_file), "seq_len": 32, "batch_size": 4, "max_tokens": 256},
        "sweep": {"recitation": {"q": str(quotes)}, "heldout": str(text_file), "keep_mass": [0.5, 0.9],
                  "layers": ["1"], "svd_ranks": [4], "ppl_budget": 100},
        "edit": {},
        "evaluate": {"recitation": {"q": str(quotes)}, "heldout": str(text_file)},
        "publish": {"repo_id": "user/tiny", "dry_run": True},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(path)]) == 0
    run = tmp_path / "run"
    chosen = json.loads((run / "steps" / "sweep.done.json").read_text())["chosen"]
    adapter_cfg = json.loads(next((run / "edit").glob("*/adapter_config.json")).read_text())
    assert adapter_cfg["keep_mass"] == chosen["keep_mass"], "the edit step uses the sweep's pick"
    assert (run / "report.json").exists() and (run / "publish" / "README.md").exists()
    capsys.readouterr()
    assert main(["run", str(path)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("already done") == 5

    path.write_text(yaml.safe_dump({**cfg, "fitt": {}}))
    assert main(["run", str(path)]) == 2
    assert "unknown keys ['fitt']" in capsys.readouterr().err


def test_cli_flags_and_yaml_steps_share_one_set_of_defaults():
    from hf_curvedit.cli import _step, build_parser
    from hf_curvedit.pipeline import EditStep, EvaluateStep, FitStep, SweepStep

    parser = build_parser()
    for cls, argv in ((FitStep, ["fit", "--output-dir", "o"]),
                      (SweepStep, ["sweep", "--factors", "f", "--output-dir", "o"]),
                      (EditStep, ["edit", "--factors", "f", "--output-dir", "o"]),
                      (EvaluateStep, ["evaluate", "--adapter", "a"])):
        assert _step(cls, parser.parse_args(argv)) == cls.from_dict({}), cls.name
    args = parser.parse_args(["edit", "--factors", "f", "--output-dir", "o", "--target-modules", "gate_proj,up_proj"])
    assert _step(EditStep, args) == EditStep.from_dict({"target_modules": "gate_proj,up_proj"})
    assert _step(EditStep, args).target_modules == ["gate_proj", "up_proj"]


def test_run_config_errors(tmp_path, capsys):
    import yaml

    from hf_curvedit.pipeline import PipelineConfig, UsageError

    cfg = PipelineConfig.from_yaml(Path(__file__).resolve().parents[1] / "examples" / "default.yaml")
    assert cfg.model is None and cfg.edit.keep_mass is None and cfg.publish.overwrite, "a run owns its publish folder"
    assert cfg.sweep.layers == ("2,3", "1,2,3") and cfg.evaluate.stress_steps == (0, 10, 20)
    assert cfg.sweep.allocation == "per_layer", "the main job searches a ρ per layer (README, 'The sweep')"
    capabilities = cfg.evaluate.capabilities.to_config()
    assert capabilities.tasks == ["curvedit_skills"] and capabilities.include_path == [str(LM_EVAL_TASKS_DIR)]
    for data, message in (({"fit": {}}, "needs an output_dir"),
                          ({"output_dir": "o", "fit": {"seq_lenn": 3}}, "unknown keys ['seq_lenn'] in step 'fit'"),
                          ({"output_dir": "o", "fit": {"seq_len": "many"}}, "seq_len='many' is not a valid int"),
                          ({"output_dir": "o", "edit": {"selection": "best"}}, "use one of"),
                          ({"output_dir": "o", "publish": {"dry_run": True}}, "step 'publish' needs repo_id"),
                          ({"output_dir": "o", "sweep": {"recitation": ["q"]}}, "--recitation takes NAME=PATH"),
                          ({"output_dir": "o", "evaluate": {"capabilities": {"limit": 3}}},
                           "step 'evaluate.capabilities' needs tasks"),
                          ({"output_dir": "o", "evaluate": {"capabilities": {"tasks": ["x"], "fewshot": 1}}},
                           "unknown keys ['fewshot'] in step 'evaluate.capabilities'"),
                          ({"output_dir": "o", "evaluate": {"capabilities": ["x"]}},
                           "step 'evaluate.capabilities' takes a mapping")):
        with pytest.raises(UsageError, match=message.replace("[", r"\[").replace("(", r"\(")):
            PipelineConfig.from_dict(data)
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump(data))
        assert main(["run", str(path)]) == 2
        assert message in capsys.readouterr().err
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_run_stops_with_exit_code_1_when_the_sweep_finds_nothing(tmp_path, monkeypatch, capsys):
    import yaml

    import hf_curvedit.pipeline.run as pipeline  # the runner's own binding of run_sweep
    from hf_curvedit.sweep import SweepPoint, SweepResult

    base = SweepPoint("base", "–", None, None, None, {"q": {"strict": 1.0, "loose": 1.0, "avg_lev": 0.0}}, 2.0, 0.0)
    edit = SweepPoint("curvedit", "all", "x", 0.5, None, {"q": {"strict": 0.0, "loose": 0.0, "avg_lev": 1.0}}, 4.0, 1.0)
    monkeypatch.setattr(pipeline, "run_sweep", lambda *a, **k: SweepResult(base, [edit], 0.15, "q"))
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "run"), "sweep": {"keep_mass": 0.5}}))
    assert main(["run", str(path)]) == 1
    captured = capsys.readouterr()
    assert "| curvedit | all | ρ=0.5 |" in captured.out
    assert "[run] sweep failed: no edit keeps the perplexity increase within +15%: the closest, all ρ=0.5, costs" in \
        captured.err and "Try milder edits" in captured.err
    assert not (tmp_path / "run" / "steps" / "sweep.done.json").exists(), "a failed step is not marked done"


def test_edit_flags_reach_the_adapter_config_and_plan_factors_is_top_level(tmp_path, model_dir, text_file):
    import hf_curvedit
    from hf_curvedit.curvature import plan_factors

    assert hf_curvedit.plan_factors is plan_factors
    out = tmp_path / "factors"
    assert main(["fit", "--model", str(model_dir), "--data", str(text_file), "--output-dir", str(out),
                 "--seq-len", "32", "--batch-size", "4", "--max-tokens", "256"]) == 0
    assert main(["edit", "--model", str(model_dir), "--factors", str(out), "--keep-mass", "0.6", "--compute-dtype",
                 "float32", "--min-expert-tokens", "100", "--output-dir", str(tmp_path / "e")]) == 0
    cfg = json.loads((tmp_path / "e" / "rho0.6" / "adapter_config.json").read_text())
    assert cfg["compute_dtype"] == "float32" and cfg["min_expert_tokens"] == 100
    assert main(["edit", "--model", str(model_dir), "--factors", str(out), "--compute-dtype", "float13",
                 "--output-dir", str(tmp_path / "f")]) == 2


def test_fit_ekfac_then_edit_by_corrected_curvature(tmp_path, model_dir, text_file, capsys):
    """`fit --ekfac` writes the corrected eigenvalues; `edit --selection ekfac_mass` uses them and records the
    selection; without them the edit stops with exit 2 and names the flag, before any adapter is written."""
    plain, corrected = tmp_path / "plain", tmp_path / "corrected"
    common = ["--model", str(model_dir), "--data", str(text_file), "--seq-len", "32", "--batch-size", "4",
              "--max-tokens", "512"]
    assert main(["fit", *common, "--output-dir", str(plain)]) == 0
    assert main(["fit", *common, "--output-dir", str(corrected), "--ekfac"]) == 0
    assert (corrected / "ekfac.safetensors").exists() and not (plain / "ekfac.safetensors").exists()
    capsys.readouterr()

    rc = main(["edit", "--model", str(model_dir), "--factors", str(plain), "--keep-mass", "0.7",
               "--selection", "ekfac_mass", "--output-dir", str(tmp_path / "none")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "--ekfac" in err and "Traceback" not in err
    assert not (tmp_path / "none" / "rho0.7").exists()

    out = tmp_path / "edits"
    assert main(["edit", "--model", str(model_dir), "--factors", str(corrected), "--keep-mass", "0.7",
                 "--selection", "ekfac_mass", "--output-dir", str(out)]) == 0
    cfg = json.loads((out / "rho0.7" / "adapter_config.json").read_text())
    assert cfg["selection"] == "ekfac_mass"
    edit = json.loads((out / "rho0.7" / "curvedit_edit.json").read_text())
    assert all(r["selection"] == "ekfac_mass" for r in edit["modules"])
    edited = AutoModelForCausalLM.from_pretrained(out / "rho0.7")
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    x = torch.randint(0, 200, (1, 12))
    assert not torch.allclose(edited(x).logits, base(x).logits)


@slow
def test_a_per_layer_sweep_in_a_run_reaches_the_edit_and_the_card(tmp_path, model_dir, text_file, capsys):
    """`sweep.allocation: per_layer` in a run: the search's candidates are in sweep.json, the edit step builds the
    pick's ρ per layer, publish compares it with the baselines and the card states each layer's ρ; the same settings
    as flags, and the pick rebuilt with `edit --keep-mass-pattern`, give the same."""
    import yaml
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from hf_curvedit.cli import _step, build_parser
    from hf_curvedit.evaluation import greedy_generate
    from hf_curvedit.pipeline import EditStep, SweepStep
    from hf_curvedit.sweep import SweepConfig, SweepResult, pick_edit

    # a set the model recites: its own greedy continuations, so that a stronger edit recites less
    prefixes = random_token_rows(8, lo=6, hi=10, seed=3)
    suffixes = greedy_generate(AutoModelForCausalLM.from_pretrained(model_dir), prefixes, 6, show_progress=False)
    Dataset.from_dict({"prefix_ids": prefixes, "suffix_ids": suffixes}).save_to_disk(tmp_path / "recited")
    sweep = {"recitation": {"q": str(tmp_path / "recited")}, "heldout": str(text_file), "keep_mass": [0.9],
             "layers": ["0,1"], "svd_ranks": [4], "ppl_budget": 100, "allocation": "per_layer",
             "allocation_steps": [2.0], "allocation_max_candidates": 4}
    cfg = {"model": str(model_dir), "output_dir": str(tmp_path / "run"),
           "fit": {"data": str(text_file), "seq_len": 32, "batch_size": 4, "max_tokens": 256},
           "sweep": sweep, "edit": {}, "publish": {"repo_id": "user/tiny", "dry_run": True}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(path)]) == 0
    assert "allocation search: 4 candidates from" in capsys.readouterr().out
    run = tmp_path / "run"
    result = SweepResult.load(run / "sweep" / "sweep.json")
    searched = [p for p in result.points if p.search_round is not None]
    assert len(searched) == result.extra["allocation_search"]["candidates"] == 4
    assert pick_edit(result.points, "q", SweepConfig.from_dict(result.config)) is result.chosen
    # the search moved on from the grid's pick: a stronger edit of a layer recites less
    assert result.base.recitation["q"]["strict"] == 1.0
    assert result.chosen in searched and set(result.chosen.allocation) <= {"0", "1"}
    rho = result.chosen.keep_mass
    adapter = run / "edit" / f"rho{rho:g}-pattern"
    adapter_cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert adapter_cfg["keep_mass_pattern"] == result.chosen.keep_mass_pattern and adapter_cfg["keep_mass"] == rho
    assert result.pick_mismatch(adapter_cfg) is None
    card = (run / "publish" / "README.md").read_text()
    rhos = "; ".join(f"layer {g}: {r:g}" for g, r in result.chosen.allocation.items())
    assert f"- **ρ per layer:** {rhos} " in card
    assert "### Compared with other methods" in card and "svd (matched PPL)" in card, "the pick's comparison"

    # the flags of `hf-curvedit sweep` are the YAML's settings
    parser = build_parser()
    args = parser.parse_args(["sweep", "--factors", "f", "--output-dir", "o", "--allocation", "per_layer",
                              "--allocation-steps", "2", "--allocation-max-candidates", "4"])
    assert _step(SweepStep, args) == SweepStep.from_dict({k: sweep[k] for k in sweep if k.startswith("allocation")})
    # `edit --keep-mass-pattern` rebuilds the pick from sweep.json by hand: the same adapter
    flags = [a for k, v in result.chosen.keep_mass_pattern.items() for a in ("--keep-mass-pattern", f"{k}={v}")]
    args = parser.parse_args(["edit", "--factors", "f", "--output-dir", "o", "--keep-mass", str(rho), *flags])
    assert _step(EditStep, args).keep_mass_pattern == result.chosen.keep_mass_pattern
    assert main(["edit", "--model", str(model_dir), "--factors", str(run / "factors"), "--keep-mass", str(rho),
                 "--target-modules", result.chosen.target_modules, *flags,
                 "--output-dir", str(tmp_path / "by_hand")]) == 0
    by_hand = json.loads((tmp_path / "by_hand" / f"rho{rho:g}-pattern" / "adapter_config.json").read_text())
    assert result.pick_mismatch(by_hand) is None
    for argv, message in ((["sweep", "--allocation-steps", "0.5"], "--allocation-steps [0.5]: give one or more"),
                          (["sweep", "--allocation-max-candidates", "0"], "--allocation-max-candidates 0: give"),
                          (["edit", "--keep-mass-pattern", "down_proj=1.5"], "--keep-mass-pattern down_proj=1.5: ρ"),
                          (["edit", "--keep-mass-pattern", "down_proj"], "--keep-mass-pattern takes REGEX=RHO")):
        assert main([*argv, "--factors", str(run / "factors"), "--output-dir", str(tmp_path / "x")]) == 2
        assert message in capsys.readouterr().err
