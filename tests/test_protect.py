"""Protected domains: a component is kept when the general selection or a protected domain's selection keeps it, and
the edited weight is the orthogonal projection of W onto the sum of those kept subspaces. Checked against a dense
least-squares projection over explicit basis matrices, through the PEFT adapter, its save/load, and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from testing_utils import brute_force_mask, edit_llama, random_eigen, slow
from transformers import AutoModelForCausalLM

from hf_curvedit import CurvatureEditConfig, build_curvature_edit
from hf_curvedit.cli import main
from hf_curvedit.curvature.eigen import ModuleEigen
from hf_curvedit.edit import compute_edit

TARGETS = r"model\.layers\.1\.mlp\.(gate|up|down)_proj"


def _random_module_eigen(d_out: int, d_in: int, g: torch.Generator) -> ModuleEigen:
    def side(n):
        q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
        return torch.rand(n, generator=g, dtype=torch.float64).sort(descending=True).values ** 3, q

    mu, UA = side(d_in)
    lam, UG = side(d_out)
    return ModuleEigen(eigvals_A=mu, eigvecs_A=UA, eigvals_G=lam, eigvecs_G=UG)


def _brute_union_projection(W: torch.Tensor, sets: list[tuple[ModuleEigen, float]]) -> torch.Tensor:
    """Least-squares projection of vec(W) onto the span of every kept basis matrix u_i v_jᵀ of every set."""
    cols = []
    for e, rho in sets:
        for i, j in brute_force_mask(e.eigvals_G, e.eigvals_A, rho).nonzero().tolist():
            cols.append(torch.outer(e.eigvecs_G[:, i], e.eigvecs_A[:, j]).reshape(-1))
    M = torch.stack(cols, 1)
    coef = torch.linalg.lstsq(M, W.reshape(-1, 1), driver="gelsd").solution
    return (M @ coef).reshape(W.shape)


@pytest.mark.parametrize("d_out, d_in, rho, rho_p", [(5, 4, 0.5, 0.6), (7, 9, 0.3, 0.4), (12, 6, 0.7, 0.2),
                                                      (16, 16, 0.4, 0.4), (10, 14, 0.5, 0.8)])
def test_union_edit_equals_dense_projection(d_out, d_in, rho, rho_p):
    g = torch.Generator().manual_seed(d_out * 100 + d_in)
    general, domain = _random_module_eigen(d_out, d_in, g), _random_module_eigen(d_out, d_in, g)
    W = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    edit = compute_edit(W, general, rho, protect={"domain": (domain, rho_p)}, dtype=torch.float64)
    want = _brute_union_projection(W, [(general, rho), (domain, rho_p)])
    torch.testing.assert_close(edit.dense(), want, atol=1e-10, rtol=0)
    # still an exact factorization B Qᵀ with orthonormal Q
    torch.testing.assert_close(edit.Q.T @ edit.Q, torch.eye(edit.rank, dtype=torch.float64), atol=1e-12, rtol=0)
    assert edit.protected["_union"]["optimality_gap"] < 1e-10
    assert edit.protected["domain"]["kept_components"] == int(brute_force_mask(
        domain.eigvals_G, domain.eigvals_A, rho_p).sum())
    # the union keeps at least what either selection keeps: a projection onto a larger subspace
    alone = compute_edit(W, general, rho, dtype=torch.float64).dense()
    assert torch.linalg.vector_norm(W - edit.dense()) <= torch.linalg.vector_norm(W - alone) + 1e-12


def test_union_edge_cases():
    g = torch.Generator().manual_seed(0)
    general, domain = _random_module_eigen(8, 6, g), _random_module_eigen(8, 6, g)
    W = torch.randn(8, 6, generator=g, dtype=torch.float64)
    # protecting everything of a domain keeps W whole
    full = compute_edit(W, general, 0.3, protect={"d": (domain, 1.0)}, dtype=torch.float64)
    torch.testing.assert_close(full.dense(), W, atol=1e-10, rtol=0)
    # a domain with the general eigenbasis adds nothing beyond the larger of the two ρ
    same = compute_edit(W, general, 0.3, protect={"d": (general, 0.6)}, dtype=torch.float64)
    torch.testing.assert_close(same.dense(), compute_edit(W, general, 0.6, dtype=torch.float64).dense(),
                               atol=1e-10, rtol=0)
    with pytest.raises(ValueError, match="protected domain 'd'.*different model"):
        compute_edit(W, general, 0.3, protect={"d": (_random_module_eigen(6, 8, g), 0.5)})


def test_protected_adapter_matches_dense_and_round_trips(tmp_path):
    base = edit_llama(seed=1)
    names = ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]
    general, domain = random_eigen(base, seed=2, names=names), random_eigen(base, seed=5, names=names)
    weights = {n: base.get_submodule(n).weight.detach().double().clone() for n in names}
    cfg = CurvatureEditConfig(keep_mass=0.4, target_modules=TARGETS, protect={"math": 0.7})
    model = build_curvature_edit(base, {"general": general, "math": domain}, cfg)
    for n in names:
        layer = model.base_model.model.get_submodule(n)
        want = _brute_union_projection(weights[n], [(general[n], 0.4), (domain[n], 0.7)]) if weights[n].numel() < 5000 \
            else None
        got = layer.curvedit_B["default"].double() @ layer.curvedit_Q["default"].double().T \
            if layer._curvedit_q_side["default"] == "input" else \
            layer.curvedit_Q["default"].double() @ layer.curvedit_B["default"].double().T
        ref = compute_edit(weights[n], general[n], 0.4, protect={"math": (domain[n], 0.7)}, dtype=torch.float64)
        torch.testing.assert_close(got, ref.dense(), atol=1e-5, rtol=0)
        if want is not None:
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    x = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        edited_logits = model(x).logits
    saved = json.loads(json.dumps(model.peft_config["default"].to_dict()))
    assert saved["protect"] == {"math": 0.7}
    assert set(saved["protect_factor_sources"]) == {"math"}
    assert saved["edited_modules"][names[0]]["protected"]["math"]["keep_mass"] == 0.7
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(edit_llama(seed=1), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, edited_logits)


def test_protect_input_errors():
    base = edit_llama(seed=1)
    names = ["model.layers.1.mlp.gate_proj"]
    eig = random_eigen(base, seed=2, names=names)
    with pytest.raises(ValueError, match=r"protect\['math'\] must be a number in \(0, 1\]"):
        CurvatureEditConfig(protect={"math": 1.5})
    with pytest.raises(ValueError, match="identifiers"):
        CurvatureEditConfig(protect={"my domain": 0.9})
    with pytest.raises(ValueError, match=r"pass one factor set per domain.*'general': eigen, 'math'"):
        build_curvature_edit(base, eig, CurvatureEditConfig(target_modules=names, protect={"math": 0.9}))
    with pytest.raises(ValueError, match=r"exactly one general set.*missing \['math'\]"):
        build_curvature_edit(base, {"general": eig, "code": eig},
                             CurvatureEditConfig(target_modules=names, protect={"math": 0.9}))
    with pytest.raises(TypeError, match=r"factor sets \['math'\] are not factors"):
        build_curvature_edit(base, {"general": eig, "math": 0.9},
                             CurvatureEditConfig(target_modules=names, protect={"math": 0.9}))
    partial = random_eigen(base, seed=3, names=["model.layers.0.mlp.gate_proj"])
    with pytest.raises(ValueError, match="protected domain 'math' have no module 'model.layers.1.mlp.gate_proj'"):
        build_curvature_edit(base, {"general": eig, "math": partial},
                             CurvatureEditConfig(target_modules=names, protect={"math": 0.9}))


def test_cli_fit_name_then_edit_and_sweep_with_protect(tmp_path, model_dir, capsys):
    prose, sums = tmp_path / "prose.txt", tmp_path / "sums.txt"
    prose.write_text("The quick brown fox jumps over the lazy dog. " * 60)
    sums.write_text("".join(f"{a}+{b}={a + b}\n" for a in range(10, 40) for b in range(10, 20)))
    factors = tmp_path / "factors"
    common = ["--model", str(model_dir), "--output-dir", str(factors), "--seq-len", "32", "--batch-size", "4",
              "--max-tokens", "512"]
    assert main(["fit", "--data", str(prose), *common]) == 0
    assert main(["fit", "--name", "math", "--data", str(sums), *common]) == 0
    assert (factors / "domains" / "math" / "eigen.safetensors").exists()
    assert (factors / "eigen.safetensors").exists()
    capsys.readouterr()

    edit = ["edit", "--model", str(model_dir), "--factors", str(factors), "--keep-mass", "0.5",
            "--target-modules", TARGETS]
    assert main([*edit, "--output-dir", str(tmp_path / "plain")]) == 0
    assert main([*edit, "--protect", "math=0.9", "--output-dir", str(tmp_path / "prot")]) == 0
    cfg = json.loads((tmp_path / "prot" / "rho0.5" / "adapter_config.json").read_text())
    assert cfg["protect"] == {"math": 0.9}
    assert cfg["protect_factor_sources"]["math"]["factor_config"]["dataset"] == str(sums)
    # the protected edit keeps more of W: it is the projection onto a larger subspace
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    plain, prot = (PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir),
                                             tmp_path / name / "rho0.5").merge_and_unload()
                   for name in ("plain", "prot"))
    for n in ("model.layers.1.mlp.gate_proj", "model.layers.1.mlp.down_proj"):
        w = base.get_submodule(n).weight
        kept = [torch.linalg.vector_norm(m.get_submodule(n).weight) for m in (plain, prot)]
        assert torch.linalg.vector_norm(w) >= kept[1] > kept[0]

    capsys.readouterr()
    assert main([*edit, "--protect", "code=0.9", "--output-dir", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "no factors for protected domain 'code'" in err and "fitted domains: ['math']" in err
    assert "hf-curvedit fit --name code" in err
    assert main([*edit, "--protect", "math=1.5", "--output-dir", str(tmp_path / "x")]) == 2
    assert "ρ must be in (0, 1]" in capsys.readouterr().err
    assert main([*edit, "--protect", "math", "--output-dir", str(tmp_path / "x")]) == 2
    assert "--protect takes NAME=RHO" in capsys.readouterr().err
    assert main(["fit", "--name", "math", *common]) == 2
    assert "give its text with --data" in capsys.readouterr().err

    rc = main(["sweep", "--model", str(model_dir), "--factors", str(factors), "--keep-mass", "0.5", "0.9",
               "--layer-choice", f"l1={TARGETS}", "--recitation", f"quotes={prose}", "--heldout", str(prose),
               "--ppl-budget", "10", "--svd-ranks", "--protect", "math=0.9", "--output-dir", str(tmp_path / "sw")])
    assert rc == 0
    assert "protecting math (ρ=0.9)" in capsys.readouterr().out
    assert json.loads((tmp_path / "sw" / "sweep.json").read_text())["extra"]["protect"] == {"math": 0.9}


@slow
def test_run_yaml_fits_domains_sweeps_and_edits_with_protection_and_cards_it(tmp_path, model_dir, capsys):
    import yaml
    from huggingface_hub import ModelCard

    prose, sums = tmp_path / "prose.txt", tmp_path / "sums.txt"
    prose.write_text("The quick brown fox jumps over the lazy dog. " * 60)
    sums.write_text("".join(f"{a}+{b}={a + b}\n" for a in range(10, 40) for b in range(10, 20)))
    cfg = {
        "model": str(model_dir),
        "output_dir": str(tmp_path / "run"),
        "fit": {"data": str(prose), "domains": {"math": str(sums)}, "seq_len": 32, "batch_size": 4,
                "max_tokens": 256},
        "sweep": {"recitation": {"q": str(prose)}, "heldout": str(prose), "keep_mass": [0.5, 0.9],
                  "layer_choice": {"l1": TARGETS}, "svd_ranks": [], "ppl_budget": 100, "protect": {"math": 0.8}},
        "edit": {},
        "publish": {"repo_id": "user/tiny-protected", "dry_run": True},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(path)]) == 0
    run = tmp_path / "run"
    assert (run / "factors" / "domains" / "math" / "eigen.safetensors").exists()
    adapter_cfg = json.loads(next((run / "edit").glob("*/adapter_config.json")).read_text())
    assert adapter_cfg["protect"] == {"math": 0.8}, "the edit inherits the protection the sweep measured"
    card = ModelCard.load(run / "publish" / "README.md")
    line = next(ln for ln in card.text.splitlines() if ln.strip().startswith("- `math`"))
    assert "ρ = 0.80" in line and str(sums) in line and "tokens" in line

    path.write_text(yaml.safe_dump({**cfg, "edit": {"protect": {"math": "lots"}}}))
    assert main(["run", str(path)]) == 2
    assert "'lots' (for 'math') is not a float" in capsys.readouterr().err
