"""Exposure: the share of a task's layer output an edit removes, checked against a brute-force computation (per
sequence, no padding, dense W′ from a brute-force sort of the curvature products), through the adapter and its
reload, with protected domains, and in the CLI, the sweep and the card."""

from __future__ import annotations

import json
import math

import pytest
import torch
from datasets import Dataset
from peft import PeftModel
from testing_utils import dense_edit, edit_llama, random_eigen, record_module_io, slow

from hf_curvedit import CurvatureEditConfig, FactorConfig, build_curvature_edit, fit_factors
from hf_curvedit.evaluation import RecitationSet, TextSet
from hf_curvedit.exposure import ExposureReport, adapter_exposure, combine_shares, predict_exposure, recitation_texts

TARGETS = r"model\.layers\.[01]\.mlp\.(gate|up|down)_proj"


def _rows(n: int, seed: int, lo: int = 1, hi: int = 128) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(lo, hi, (int(k),), generator=g).tolist() for k in torch.randint(4, 20, (n,), generator=g)]


def _brute_shares(model, eigen, names, rho, sequences) -> dict[str, float]:
    """Σ‖(W − W′) a‖² / Σ‖W a‖² per module, one unpadded sequence at a time."""
    removed = {n: 0.0 for n in names}
    total = {n: 0.0 for n in names}
    mods = dict(model.named_modules())
    W = {n: mods[n].weight.detach().double() for n in names}
    D = {n: W[n] - dense_edit(W[n], eigen[n], rho) for n in names}
    for seq in sequences:
        with torch.no_grad(), record_module_io(model, names) as (ins, _):
            model(torch.tensor([seq]))
        for n in names:
            a = ins[n][0].double()
            removed[n] += float((a @ D[n].T).square().sum())
            total[n] += float((a @ W[n].T).square().sum())
    return {n: removed[n] / total[n] for n in names}


@pytest.fixture(scope="module")
def model():
    return edit_llama(seed=4).double()


def test_prediction_equals_brute_force(model):
    eigen = random_eigen(model, seed=3)
    names = [n for n in eigen if "layers.0" in n or "layers.1" in n]
    tasks = {"a": TextSet(_rows(7, 0)), "b": TextSet(_rows(5, 1, lo=1, hi=20))}
    report = predict_exposure(model, eigen, tasks, [0.9, 0.5], CurvatureEditConfig(target_modules=TARGETS),
                              batch_size=3, show_progress=False)
    assert report.candidates == ["ρ=0.9", "ρ=0.5"] and report.tasks == ["a", "b"]
    assert report.tokens == {t: sum(len(s) for s in ts.sequences) for t, ts in tasks.items()}
    for rho in (0.9, 0.5):
        for task, ts in tasks.items():
            want = _brute_shares(model, eigen, names, rho, ts.sequences)
            got = report.shares[f"ρ={rho:g}"][task]
            assert set(got) == set(want)
            for n in names:
                assert got[n] == pytest.approx(want[n], rel=1e-9, abs=1e-12)
            assert report.exposure(f"ρ={rho:g}", task) == pytest.approx(1 - math.prod(1 - s for s in want.values()))
    # keeping less removes more, for every task
    for task in tasks:
        assert report.exposure("ρ=0.5", task) > report.exposure("ρ=0.9", task) > 0
    assert report.ranked() == ["ρ=0.9", "ρ=0.5"]
    assert report.cost("ρ=0.9") == pytest.approx(sum(report.exposures("ρ=0.9").values()) / 2)
    # ρ = 1 keeps every component with positive curvature: nothing is removed
    full = predict_exposure(model, eigen, tasks, [1.0], CurvatureEditConfig(target_modules=TARGETS),
                            show_progress=False)
    assert all(full.exposure("ρ=1", t) < 1e-12 for t in tasks)


def test_adapter_exposure_equals_prediction_and_survives_reload(model, tmp_path):
    base = edit_llama(seed=4)
    eigen = random_eigen(base, seed=3)
    tasks = {"a": TextSet(_rows(6, 2)), "mem": RecitationSet([[5, 6, 7]] * 2, [[8, 9], [10, 11, 12]])}
    predicted = predict_exposure(base, eigen, tasks, [0.7], CurvatureEditConfig(target_modules=TARGETS),
                                 show_progress=False)
    edited = build_curvature_edit(base, eigen, CurvatureEditConfig(keep_mass=0.7, target_modules=TARGETS))
    with torch.no_grad():
        logits = edited(torch.tensor([[1, 2, 3]])).logits
    measured = adapter_exposure(edited, tasks, show_progress=False)
    for t in tasks:
        assert measured.exposure("default", t) == pytest.approx(predicted.exposure("ρ=0.7", t), rel=1e-5)
    assert measured.settings["default"]["keep_mass"] == 0.7
    assert measured.memorized == ["mem"] and measured.cost("default") == measured.exposure("default", "a")
    # the pass ran with the adapter off, and left it on
    with torch.no_grad():
        assert torch.equal(edited(torch.tensor([[1, 2, 3]])).logits, logits)
    edited.save_pretrained(tmp_path / "edit")
    loaded = PeftModel.from_pretrained(edit_llama(seed=4), tmp_path / "edit")
    again = adapter_exposure(loaded, tasks, show_progress=False)
    assert again.shares == measured.shares
    # a memorized set is measured as prefix + suffix
    assert recitation_texts({"mem": tasks["mem"]})["mem"].sequences == [[5, 6, 7, 8, 9], [5, 6, 7, 10, 11, 12]]


def test_protected_domain_exposure_falls_when_protected(tmp_path):
    base = edit_llama(seed=5)
    cfg = FactorConfig(target_modules=TARGETS, seq_len=16, batch_size=8)
    general = fit_factors(base, Dataset.from_dict({"input_ids": _rows(64, 3, lo=40, hi=128)}), cfg,
                          progress=False).eigendecompose()
    domain_rows = _rows(64, 4, lo=1, hi=20)  # another part of the vocabulary
    domain = fit_factors(base, Dataset.from_dict({"input_ids": domain_rows}), cfg, progress=False).eigendecompose()
    tasks = {"domain": TextSet(_rows(12, 9, lo=1, hi=20)), "other": TextSet(_rows(12, 10, lo=40, hi=128))}
    plain = predict_exposure(base, general, tasks, [0.5], CurvatureEditConfig(target_modules=TARGETS),
                             show_progress=False)
    sets = {"general": general, "domain": domain}
    exposures = [plain.exposure("ρ=0.5", "domain")]
    for rho_p in (0.8, 0.95):
        prot = predict_exposure(base, sets, tasks, [0.5],
                                CurvatureEditConfig(target_modules=TARGETS, protect={"domain": rho_p}),
                                show_progress=False)
        exposures.append(prot.exposure("ρ=0.5", "domain"))
        assert prot.settings["ρ=0.5"]["protect"] == {"domain": rho_p}
        # a projection onto a larger subspace removes less from every input, the other task's too
        assert prot.exposure("ρ=0.5", "other") <= plain.exposure("ρ=0.5", "other") + 1e-12
    assert exposures[0] > exposures[1] > exposures[2]
    assert exposures[2] < 0.5 * exposures[0]


def test_report_round_trip_and_combination(tmp_path):
    assert combine_shares({"a": 0.5, "b": 0.5}) == pytest.approx(0.75)
    assert combine_shares({}) == 0.0
    report = ExposureReport({"x": {"t": {"m": 0.2}, "mem": {"m": 0.9}}, "y": {"t": {"m": 0.1, "n": 0.1}, "mem": {}}},
                            {"t": 10, "mem": 4}, {"x": {"keep_mass": 0.8}}, memorized=["mem"])
    assert report.ranked() == ["y", "x"]
    path = report.save(tmp_path / "exposure.json")
    data = json.loads(path.read_text())
    assert data["exposure"]["y"]["t"] == pytest.approx(0.19) and data["cost"]["x"] == pytest.approx(0.2)
    assert ExposureReport.load(path) == report
    assert "| y | 0.190 | 0.000 | 0.190 |" in report.to_markdown() and "mem (memorized)" in report.to_markdown()
    with pytest.raises(KeyError, match="candidates: \\['x', 'y'\\]"):
        report.exposure("z", "t")
    (tmp_path / "bad.json").write_text('{"shares": 1')
    from hf_curvedit import DamagedFileError

    with pytest.raises(DamagedFileError, match="bad.json"):
        ExposureReport.load(tmp_path / "bad.json")


def test_bad_input_is_refused(model):
    eigen = random_eigen(model, seed=3)
    with pytest.raises(ValueError, match="at least one ρ"):
        predict_exposure(model, eigen, {"a": TextSet([[1, 2]])}, [], CurvatureEditConfig(target_modules=TARGETS))
    with pytest.raises(ValueError, match="no tasks"):
        predict_exposure(model, eigen, {}, [0.5], CurvatureEditConfig(target_modules=TARGETS))
    with pytest.raises(ValueError, match="raw text: pass tokenizer"):
        predict_exposure(model, eigen, {"a": ["some text"]}, [0.5], CurvatureEditConfig(target_modules=TARGETS))
    with pytest.raises(ValueError, match="protect"):
        predict_exposure(model, eigen, {"a": TextSet([[1, 2]])}, [0.5],
                         CurvatureEditConfig(target_modules=TARGETS, protect={"x": 0.9}))


def _fit_prose(tmp_path, model_dir):
    """``hf-curvedit fit`` on a short prose file: ``(prose file, factors folder)``."""
    from hf_curvedit.cli import main

    prose = tmp_path / "prose.txt"
    prose.write_text("The quick brown fox jumps over the lazy dog. " * 60)
    factors = tmp_path / "factors"
    assert main(["fit", "--model", str(model_dir), "--data", str(prose), "--output-dir", str(factors), "--seq-len",
                 "32", "--batch-size", "4", "--max-tokens", "512"]) == 0
    return prose, factors


def test_cli_exposure_prints_and_writes_the_report(tmp_path, model_dir, capsys):
    from hf_curvedit.cli import main

    prose, factors = _fit_prose(tmp_path, model_dir)
    sums = tmp_path / "sums.jsonl"
    sums.write_text("".join(json.dumps({"text": f"{a}+{b}={a + b}"}) + "\n" for a in range(10, 30) for b in (3, 7)))
    capsys.readouterr()
    out = tmp_path / "exposure.json"
    args = ["exposure", "--model", str(model_dir), "--factors", str(factors), "--keep-mass", "0.9", "0.5",
            "--texts", f"sums={sums}", "--recitation", f"fox={prose}"]
    assert main([*args, "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| edit | sums | fox (memorized) | predicted cost (mean over tasks) |" in printed and "2 tasks" in printed
    report = ExposureReport.load(out)
    assert report.ranked() == ["ρ=0.9", "ρ=0.5"] and report.memorized == ["fox"]
    # the memorized set is measured, but it is no capability: the cost is the one task's exposure
    assert report.cost("ρ=0.5") == report.exposure("ρ=0.5", "sums") != report.exposure("ρ=0.5", "fox")
    assert 0 < report.exposure("ρ=0.9", "sums") < report.exposure("ρ=0.5", "sums") < 1
    # bad input: exit 2 with the fix named, before any model work
    for bad, message in ((["--keep-mass", "1.5"], "--keep-mass 1.5 is not in (0, 1]"),
                         (["--texts", f"x={tmp_path / 'missing.txt'}"], "does not exist"),
                         (["--texts", f"sums={sums}", "--text-column", "body"], "name the column with --text-column"),
                         (["--limit", "3", "--texts", f"sums={sums}"], "--include-path and --limit set up lm-eval"),
                         (["--protect", "math=0.9", "--texts", f"sums={sums}"], "no factors for protected domain")):
        assert main(["exposure", "--model", str(model_dir), "--factors", str(factors), *bad]) == 2
        assert message in capsys.readouterr().err
    assert main(["exposure", "--model", str(model_dir), "--factors", str(factors)]) == 2
    assert "name what to measure: --tasks" in capsys.readouterr().err


@slow
def test_lm_eval_tasks_as_texts_and_exposure_on_the_card(tmp_path, model_dir, capsys):
    pytest.importorskip("lm_eval")
    from huggingface_hub import ModelCard
    from testing_utils import write_choice_task

    from hf_curvedit.cli import main
    from hf_curvedit.default import byte_tokenizer
    from hf_curvedit.evaluation.capabilities import CapabilityConfig
    from hf_curvedit.exposure import lm_eval_task_texts

    tasks = write_choice_task(tmp_path / "tasks", "tiny_yes", [("Is it? A:", 0), ("Or not? A:", 1)])
    write_choice_task(tasks, "tiny_no", [("Maybe? A:", 1)])
    tok = byte_tokenizer()
    texts = lm_eval_task_texts(CapabilityConfig(tasks=["tiny_yes"], include_path=[tasks]), tok)
    # what lm-eval scores: the context, the target delimiter, the gold choice; no special tokens added
    assert texts["tiny_yes"].sequences == [tok("Is it? A: yes", add_special_tokens=False)["input_ids"],
                                           tok("Or not? A: no", add_special_tokens=False)["input_ids"]]

    prose, factors = _fit_prose(tmp_path, model_dir)
    assert main(["edit", "--model", str(model_dir), "--factors", str(factors), "--keep-mass", "0.5",
                 "--output-dir", str(tmp_path / "edit")]) == 0
    adapter = tmp_path / "edit" / "rho0.5"
    report = tmp_path / "report.json"
    assert main(["evaluate", "--model", str(model_dir), "--adapter", str(adapter), "--recitation", f"fox={prose}",
                 "--heldout", str(prose), "--no-stress", "--tasks", "tiny_yes", "--include-path", str(tasks),
                 "--exposure-tasks", "tiny_no", "--output", str(report)]) == 0
    saved = json.loads(report.read_text())
    assert set(saved["exposure"]) == {"tiny_yes", "tiny_no"} and set(saved["capabilities"]) == {"tiny_yes"}
    assert all(0 < v < 1 for v in saved["exposure"].values())
    assert main(["publish", "--adapter", str(adapter), "--repo-id", "user/edit", "--out-dir", str(tmp_path / "pub"),
                 "--report", str(report), "--dry-run"]) == 0
    card = ModelCard.load(tmp_path / "pub" / "README.md").text
    assert "| task | metric | n | base | edited | change | exposure |" in card
    yes = next(line for line in card.splitlines() if line.startswith("| tiny_yes"))
    no = next(line for line in card.splitlines() if line.startswith("| tiny_no"))
    assert yes.endswith(f"| {saved['exposure']['tiny_yes']:.3f} |")
    assert "not evaluated" in no and no.endswith(f"| {saved['exposure']['tiny_no']:.3f} |")
    # the command predicts the same tasks before the edit exists
    capsys.readouterr()
    assert main(["exposure", "--model", str(model_dir), "--factors", str(factors), "--keep-mass", "0.5", "--tasks",
                 "tiny_yes,tiny_no", "--include-path", str(tasks)]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| ρ=0.5"))
    assert f"| {saved['exposure']['tiny_yes']:.3f} | {saved['exposure']['tiny_no']:.3f} |" in row
    assert main(["exposure", "--model", str(model_dir), "--factors", str(factors), "--tasks", "tiny_maybe",
                 "--include-path", str(tasks)]) == 2
    assert "unknown lm-eval task" in capsys.readouterr().err


def test_evaluate_edit_records_exposure(tmp_path):
    from hf_curvedit import EditReport, evaluate_edit

    base = edit_llama(seed=4)
    eigen = random_eigen(base, seed=3)
    edited = build_curvature_edit(base, eigen, CurvatureEditConfig(keep_mass=0.6, target_modules=TARGETS))
    tasks = {"a": TextSet(_rows(4, 5)), "b": TextSet(_rows(3, 6))}
    report = evaluate_edit(edited, {"heldout": TextSet(_rows(3, 7))}, exposure=tasks, show_progress=False)
    want = adapter_exposure(edited, tasks, show_progress=False).exposures("default")
    assert report.exposure == want and all(0 < v < 1 for v in want.values())
    assert EditReport.load(report.save(tmp_path / "report.json")).exposure == want
    with pytest.raises(ValueError, match="curvature-edit PeftModel"):
        evaluate_edit(edit_llama(seed=4), {"heldout": TextSet(_rows(3, 7))}, base_model=base, exposure=tasks)


# ------------------------------------------------------------------------------------------------------- experts
def _brute_expert_shares(model, edits, names, sequences) -> dict[str, float]:
    """Per token and per expert it was routed to: ‖W_e a‖² and ‖(W_e − W′_e) a‖², from the router's own choice
    (captured at the experts module's call), each projection's input computed by hand; one unpadded sequence at a
    time."""
    from hf_curvedit.targets import weight_targets

    targets = weight_targets(model)
    owners = {n: n.rsplit(".", 1)[0] for n in names}
    calls: dict[str, tuple] = {}
    mods = dict(model.named_modules())
    handles = [mods[o].register_forward_pre_hook(lambda m, args, o=o: calls.__setitem__(o, args))
               for o in set(owners.values())]
    removed = {n: 0.0 for n in names}
    total = {n: 0.0 for n in names}
    try:
        for seq in sequences:
            with torch.no_grad():
                model(torch.tensor([seq]))
            for n in names:
                module = mods[owners[n]]
                hidden, index = calls[owners[n]][0], calls[owners[n]][1]
                w_in = targets[f"{owners[n]}.gate_up_proj"].logical_weight().double()
                W = targets[n].logical_weight().double()
                W_new = edits[n].dense(targets[n].logical_weight()).double()
                for t in range(hidden.shape[0]):
                    for e in index[t].tolist():
                        a = hidden[t].double()
                        if n.endswith("down_proj"):
                            a = module._apply_gate((w_in[e] @ a)[None])[0]
                        total[n] += float((W[e] @ a).square().sum())
                        removed[n] += float(((W[e] - W_new[e]) @ a).square().sum())
    finally:
        for h in handles:
            h.remove()
    return {n: removed[n] / total[n] for n in names}


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_expert_exposure_counts_each_token_with_the_experts_it_was_routed_to(family, tmp_path):
    from family_configs import tiny_causal_lm
    from testing_utils import random_token_rows

    from hf_curvedit.tuner import compute_module_edits

    model = tiny_causal_lm(family, seed=2).double()
    model.config._experts_implementation = "eager"
    rows = [[t % 127 + 1 for t in r] for r in random_token_rows(12, lo=6, hi=16, seed=3)]
    factors = fit_factors(model, Dataset.from_dict({"input_ids": rows}), FactorConfig(seq_len=16, batch_size=4,
                          accumulate_dtype="float64"), progress=False)
    eigen = factors.eigendecompose()
    names = [n for n in factors.module_names if ".experts." in n]
    config = CurvatureEditConfig(target_modules=names, min_expert_tokens=1)
    tasks = {"a": TextSet(_rows(5, 0)), "b": TextSet(_rows(4, 1, lo=1, hi=30))}
    report = predict_exposure(model, eigen, tasks, [0.7], config, batch_size=3, show_progress=False)
    assert set(report.shares["ρ=0.7"]["a"]) == set(names)
    edits = compute_module_edits(model, eigen, CurvatureEditConfig(keep_mass=0.7, target_modules=names,
                                                                   min_expert_tokens=1))
    assert any(bool(e.edited.any()) for e in edits.values())
    for task, ts in tasks.items():
        want = _brute_expert_shares(model, edits, names, ts.sequences)
        got = report.shares["ρ=0.7"][task]
        for n in names:
            assert got[n] == pytest.approx(want[n], rel=1e-9, abs=1e-12), (task, n)
    # the same through the adapter built from the same factors
    edited = build_curvature_edit(model, eigen, CurvatureEditConfig(keep_mass=0.7, target_modules=names,
                                                                    min_expert_tokens=1))
    measured = adapter_exposure(edited, tasks, batch_size=3, show_progress=False)
    for task in tasks:
        assert measured.exposure("default", task) == pytest.approx(report.exposure("ρ=0.7", task), rel=1e-9)


def test_exposure_of_a_shared_expert_that_reads_flattened_tokens():
    """Qwen2-MoE flattens (batch, tokens) before its shared expert: each row is still a token, counted once."""
    from family_configs import tiny_causal_lm
    from testing_utils import random_token_rows

    from hf_curvedit.tuner import compute_module_edits

    model = tiny_causal_lm("qwen2_moe", seed=2).double()
    model.config._experts_implementation = "eager"  # torch's grouped_mm has no float64
    rows = [[t % 127 + 1 for t in r] for r in random_token_rows(12, lo=6, hi=16, seed=3)]
    factors = fit_factors(model, Dataset.from_dict({"input_ids": rows}), FactorConfig(
        seq_len=16, batch_size=4, accumulate_dtype="float64", target_modules=r".*mlp\.shared_expert\..*"),
        progress=False)
    names = factors.module_names
    assert names and all(".shared_expert." in n for n in names)
    config = CurvatureEditConfig(keep_mass=0.7, target_modules=names)
    ts = TextSet(_rows(5, 0))
    report = predict_exposure(model, factors.eigendecompose(), {"a": ts}, [0.7], config, batch_size=3,
                              show_progress=False)
    edits = compute_module_edits(model, factors.eigendecompose(), config)
    total, removed = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0)
    for seq in ts.sequences:  # one unpadded sequence at a time, the inputs each layer reads
        seen = {}
        hooks = [model.get_submodule(n).register_forward_hook(
            lambda m, args, out, n=n: seen.__setitem__(n, args[0].detach().reshape(-1, args[0].shape[-1])))
            for n in names]
        with torch.no_grad():
            model(input_ids=torch.tensor([seq]))
        for h in hooks:
            h.remove()
        for n in names:
            W = model.get_submodule(n).weight.detach()
            total[n] += float((seen[n] @ W.T).square().sum())
            removed[n] += float((seen[n] @ (W - edits[n].dense()).T).square().sum())
    for n in names:
        assert report.shares["ρ=0.7"]["a"][n] == pytest.approx(removed[n] / total[n], rel=1e-9), n
