"""EK-FAC: corrected eigenvalues against brute force (and kronfluence where it is installed), their storage, and the
selection that ranks by them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from peft import PeftModel
from testing_utils import (
    brute_force_lambda,
    brute_force_mask,
    random_token_rows,
    slow,
    slow_param,
    tiny_gpt2,
    tiny_llama,
)

from hf_curvedit import CurvatureEditConfig, FactorConfig, build_curvature_edit, fit_factors, load_factors
from hf_curvedit.curvature import EigenCorrection, EigenFile, ModuleEigen, fit_eigen_correction
from hf_curvedit.curvature.correction import EKFAC_FILENAME
from hf_curvedit.edit import compute_edit
from hf_curvedit.integrity import DamagedFileError
from hf_curvedit.selection import corrected_mass_selection, curvature_mass_cutoffs
from hf_curvedit.targets import resolve_target_modules
from hf_curvedit.tuner.locate import curvature_edit_report

SEQ = 20


def padded_rows(n: int = 6, seed: int = 0) -> list[list[int]]:
    return random_token_rows(n, lo=5, hi=SEQ, seed=seed)


def fit_with_correction(model, rows, folder, **kw):
    cfg = FactorConfig(label_mode="empirical", seq_len=SEQ, batch_size=3, packing=False,
                       accumulate_dtype="float64", **kw)
    factors = fit_factors(model, Dataset.from_dict({"input_ids": rows}), cfg, folder, progress=False)
    corr = fit_eigen_correction(model, Dataset.from_dict({"input_ids": rows}), factors, progress=False)
    return factors, corr


def test_corrected_eigenvalues_match_brute_force_with_padding(tmp_path):
    """Padded batches of three sequences give the per-sequence brute force to float64 round-off."""
    model = tiny_llama().double()
    rows = padded_rows()
    factors, corr = fit_with_correction(model, rows, tmp_path)
    names = resolve_target_modules(model)
    eigen = factors.eigendecompose()
    want = brute_force_lambda(model, rows, names, eigen)
    assert corr.num_samples == len(rows)
    for n in names:
        got = corr[n]
        assert got.dtype == torch.float64 and got.shape == eigen[n].shape
        assert (got - want[n]).abs().max() <= 1e-12 * want[n].abs().max()
        # the correction measures something K-FAC does not: it is not the eigenvalue product
        kfac = torch.outer(eigen[n].eigvals_G, eigen[n].eigvals_A)
        assert not torch.allclose(got / got.sum(), kfac / kfac.sum(), rtol=0.05)
    # written beside the bases and attached to them on every read path; asked again, it is read back, not measured
    assert (tmp_path / EKFAC_FILENAME).exists()
    mtime = (tmp_path / EKFAC_FILENAME).stat().st_mtime_ns
    again_corr = fit_eigen_correction(model, Dataset.from_dict({"input_ids": rows}), tmp_path, progress=False)
    assert (tmp_path / EKFAC_FILENAME).stat().st_mtime_ns == mtime
    assert all(torch.equal(again_corr[n], corr[n]) for n in names)
    again = load_factors(tmp_path).eigendecompose()
    lazy = EigenFile(tmp_path / "eigen.safetensors")
    for n in names:
        assert torch.equal(again[n].eigvals_corrected, corr[n])
        assert torch.equal(lazy[n].eigvals_corrected, corr[n])


def test_gpt2_conv1d_and_float32(tmp_path):
    """Conv1D layers (weights stored transposed) and float32 accumulation agree with brute force to float32."""
    model = tiny_gpt2()
    rows = padded_rows(4, seed=1)
    cfg = FactorConfig(label_mode="empirical", seq_len=SEQ, batch_size=4, packing=False)
    factors = fit_factors(model, Dataset.from_dict({"input_ids": rows}), cfg, tmp_path, progress=False)
    corr = fit_eigen_correction(model, Dataset.from_dict({"input_ids": rows}), factors, progress=False)
    names = resolve_target_modules(model)
    eigen = factors.eigendecompose()
    want = brute_force_lambda(model, rows, names, {n: _transposed(eigen[n]) for n in names})
    for n in names:
        assert corr[n].dtype == torch.float32
        got = corr[n].double()
        assert (got - want[n].T).abs().max() <= 1e-4 * want[n].abs().max()


def _transposed(e: ModuleEigen) -> ModuleEigen:
    # a Conv1D weight is (d_in, d_out): its autograd gradient is Dᵀ, rotated by U_A on the left
    return ModuleEigen(e.eigvals_G, e.eigvecs_G, e.eigvals_A, e.eigvecs_A)


@slow
def test_resume_after_crash_equals_uninterrupted(tmp_path, monkeypatch):
    from hf_curvedit.curvature import ekfac
    from hf_curvedit.curvature import passes as passes_mod

    model = tiny_llama().double()
    rows = padded_rows(9, seed=2)
    data = Dataset.from_dict({"input_ids": rows})
    cfg = FactorConfig(label_mode="sampled", seq_len=SEQ, batch_size=3, packing=False, accumulate_dtype="float64",
                       checkpoint_every=1)
    factors = fit_factors(model, data, cfg, tmp_path / "a", progress=False)
    whole = fit_eigen_correction(model, data, factors, progress=False)

    factors_b = fit_factors(model, data, cfg, tmp_path / "b", progress=False)
    real = passes_mod.collect_factor_sums

    def crashing(model, batches, *a, **kw):
        def two():
            for i, item in enumerate(batches):
                if i == 2:
                    raise KeyboardInterrupt
                yield item
        return real(model, two(), *a, **kw)

    monkeypatch.setattr(passes_mod, "collect_factor_sums", crashing)
    with pytest.raises(KeyboardInterrupt):
        fit_eigen_correction(model, data, factors_b, progress=False)
    assert list((tmp_path / "b" / ekfac.CHECKPOINT_DIR).glob("*.safetensors"))
    assert not (tmp_path / "b" / EKFAC_FILENAME).exists()
    monkeypatch.setattr(passes_mod, "collect_factor_sums", real)
    resumed = fit_eigen_correction(model, data, factors_b, progress=False)
    assert resumed.num_samples == whole.num_samples == 9
    for n in whole:
        torch.testing.assert_close(resumed[n], whole[n], rtol=1e-12, atol=0)
    assert not (tmp_path / "b" / ekfac.CHECKPOINT_DIR).exists()


def test_damaged_or_foreign_file_is_never_used(tmp_path, caplog):
    model = tiny_llama().double()
    rows = padded_rows(3)
    factors, corr = fit_with_correction(model, rows, tmp_path)
    path = tmp_path / EKFAC_FILENAME
    data = bytearray(path.read_bytes())
    data[-200:-100] = bytes(100)
    path.write_bytes(bytes(data))
    with pytest.raises(DamagedFileError, match="ekfac.safetensors"):
        EigenCorrection.load(path).verify()
    eigen = load_factors(tmp_path).eigendecompose()  # read one module at a time: the damaged one has none
    damaged = [n for n, e in eigen.items() if e.eigvals_corrected is None]
    assert len(damaged) == 1 and "measure the corrected eigenvalues again" in caplog.text
    with pytest.raises(ValueError, match=r"needs EK-FAC corrected eigenvalues.*fit_eigen_correction\("):
        build_curvature_edit(tiny_llama().double(), eigen, CurvatureEditConfig(keep_mass=0.8, selection="ekfac_mass"))
    # measured again on the next pass, not trusted
    fresh = fit_eigen_correction(model, Dataset.from_dict({"input_ids": rows}), factors, progress=False)
    for n in corr:
        assert torch.equal(fresh[n], corr[n])
    # a correction of other factors is not attached
    other = EigenCorrection(dict(corr.values), corr.num_samples, "another-fit", corr.config)
    other.save(tmp_path)
    assert all(e.eigvals_corrected is None for e in load_factors(tmp_path).eigendecompose().values())


@pytest.mark.parametrize("family", ["mixtral", slow_param("qwen3_moe")])
def test_expert_lambda_matches_per_token_brute_force(tmp_path, family):
    """Each expert's Λ_e with top-2 routing, padded batches of three sequences: autograd's per-sequence gradient of
    each expert's matrix gives it to float64 round-off; and selection='ekfac_mass' edits experts with it."""
    from family_configs import tiny_causal_lm

    def make():
        m = tiny_causal_lm(family, seed=1).double()
        m.config._experts_implementation = "eager"  # the grouped kernel has no float64 on the CPU
        return m

    model = make()
    assert model.config.num_experts_per_tok == 2
    rows = [[t % 128 for t in r] for r in padded_rows(6)]
    factors, corr = fit_with_correction(model, rows, tmp_path)
    names = [n for n in resolve_target_modules(model) if ".experts." in n]
    assert names and set(names) <= set(corr)
    eigen = factors.eigendecompose()
    want = brute_force_lambda(model, rows, names, eigen)
    for n in names:
        got = corr[n]
        assert got.shape == want[n].shape and got.shape[0] == 4
        assert (got - want[n]).abs().max() <= 1e-12 * want[n].abs().max()
    # read back per expert from the store, attached to each expert's basis, and used by the edit
    from hf_curvedit import EigenCorrection

    stored = EigenCorrection.load(tmp_path)
    assert torch.equal(stored[names[0]], corr[names[0]])
    cfg = dict(keep_mass=0.7, target_modules=names, min_expert_tokens=1)
    ekfac = build_curvature_edit(make(), eigen, CurvatureEditConfig(selection="ekfac_mass", **cfg))
    kfac = build_curvature_edit(make(), eigen, CurvatureEditConfig(**cfg))
    ids = torch.tensor([rows[0]])
    assert not torch.allclose(ekfac(ids).logits, kfac(ids).logits)
    report = {r.module: r for r in curvature_edit_report(ekfac)}
    assert all(r.selection == "ekfac_mass" for r in report.values())


# ------------------------------------------------------------------------------------------------ the selection
def brute_force_corrected_mask(L: torch.Tensor, rho: float) -> torch.Tensor:
    flat = [(-float(v), i) for i, v in enumerate(L.reshape(-1).tolist())]
    flat.sort()
    total = float(L.sum())
    mask = torch.zeros(L.numel(), dtype=torch.bool)
    acc = 0.0
    for v, i in flat:
        if acc >= rho * total or v == 0:
            break
        mask[i] = True
        acc += -v
    return mask.reshape(L.shape)


@pytest.mark.parametrize("rho", [0.05, 0.5, 0.8, 0.99, 1.0])
def test_corrected_selection_matches_brute_force_sort(rho):
    g = torch.Generator().manual_seed(0)
    L = torch.rand(13, 9, generator=g, dtype=torch.float64) ** 4
    L[3, 4] = L[5, 1]  # a tie, broken row-major
    L[7] = 0.0  # zero components are never kept
    sel = corrected_mass_selection(L, rho)
    want = brute_force_corrected_mask(L, rho)
    assert torch.equal(sel.mask, want)
    assert sel.kept_components == int(want.sum())
    assert sel.kept_mass_fraction >= rho - 1e-12 or rho == 1.0
    assert torch.equal(sel.cutoffs, want.sum(1))
    assert sel.r == int(want.any(1).sum()) and sel.s == int(want.any(0).sum())


def test_kronecker_corrected_values_select_the_kfac_staircase():
    """When Λ is exactly λ_G ⊗ λ_A, the EK-FAC selection is the K-FAC staircase: the two rules agree."""
    g = torch.Generator().manual_seed(1)
    lam = torch.rand(17, generator=g, dtype=torch.float64).sort(descending=True).values
    mu = torch.rand(11, generator=g, dtype=torch.float64).sort(descending=True).values
    for rho in (0.3, 0.7, 0.95):
        sel = corrected_mass_selection(torch.outer(lam, mu), rho)
        st = curvature_mass_cutoffs(lam, mu, rho)
        assert torch.equal(sel.mask, st.mask()) and torch.equal(sel.mask, brute_force_mask(lam, mu, rho))


def test_ekfac_edit_is_the_projection_onto_the_kept_components():
    g = torch.Generator().manual_seed(2)
    d_out, d_in = 12, 8
    UG, _ = torch.linalg.qr(torch.randn(d_out, d_out, generator=g, dtype=torch.float64))
    UA, _ = torch.linalg.qr(torch.randn(d_in, d_in, generator=g, dtype=torch.float64))
    L = torch.rand(d_out, d_in, generator=g, dtype=torch.float64) ** 3
    e = ModuleEigen(torch.linspace(1, 0.1, d_in, dtype=torch.float64), UA,
                    torch.linspace(1, 0.1, d_out, dtype=torch.float64), UG, eigvals_corrected=L)
    W = torch.randn(d_out, d_in, generator=g)
    edit = compute_edit(W, e, 0.6, selection="ekfac_mass", dtype=torch.float64)
    M = brute_force_corrected_mask(L, 0.6)
    want = UG @ ((UG.T @ W.double() @ UA) * M) @ UA.T
    assert (edit.dense() - want).abs().max() < 1e-12
    assert edit.rank == min(int(M.any(1).sum()), int(M.any(0).sum()))
    assert torch.equal(edit.cutoffs, M.sum(1))


def test_ekfac_edit_lifecycle(tmp_path):
    """selection='ekfac_mass' builds an adapter that saves, reloads with PEFT to the same outputs, toggles and merges,
    and records the selection."""
    model = tiny_llama().double()
    rows = padded_rows(6, seed=4)
    factors, _ = fit_with_correction(model, rows, tmp_path / "f")
    cfg = CurvatureEditConfig(keep_mass=0.7, selection="ekfac_mass")
    edited = build_curvature_edit(model, factors, cfg)
    x = torch.tensor([rows[0]])
    with torch.no_grad():
        out = edited(input_ids=x).logits
        with edited.disable_adapter():
            base = edited(input_ids=x).logits
    assert not torch.allclose(out, base)
    edited.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(tiny_llama().double(), tmp_path / "adapter")
    assert reloaded.peft_config["default"].selection == "ekfac_mass"
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=x).logits, out)
        merged = reloaded.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=x).logits, out, rtol=1e-9, atol=1e-9)
    report = curvature_edit_report(edited)
    assert report and all(r.selection == "ekfac_mass" for r in report)


def test_matches_kronfluence_lambda_matrix(tmp_path):
    """kronfluence's EK-FAC (the reference implementation) on the same blocks with data labels gives the same
    corrected eigenvalues to float64 round-off. Runs where kronfluence is installed (the benchmark environment, see
    benchmarks/kronfluence_parity.py; it is no dependency of hf-curvedit)."""
    pytest.importorskip("kronfluence")
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments
    from kronfluence.task import Task

    from hf_curvedit.curvature.tasks import valid_position_mask

    rows = padded_rows(6, seed=5)
    ids = torch.zeros(len(rows), SEQ, dtype=torch.long)
    mask = torch.zeros(len(rows), SEQ, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    model = tiny_llama().double()
    names = resolve_target_modules(model)
    factors, corr = fit_with_correction(model, rows, tmp_path / "ours")

    class LMTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            valid = valid_position_mask(batch["attention_mask"])
            labels = batch["input_ids"].roll(-1, dims=1).masked_fill(~valid, -100)
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum")

        def compute_measurement(self, batch, model):
            return self.compute_train_loss(batch, model)

        def get_influence_tracked_modules(self):
            return names

        def get_attention_mask(self, batch):
            # the positions that are samples: the same rows of A as hf-curvedit's (a real next token)
            return valid_position_mask(batch["attention_mask"]).long()

    data = [{"input_ids": ids[i], "attention_mask": mask[i]} for i in range(len(rows))]
    task = LMTask()
    kf_model = prepare_model(tiny_llama().double(), task)
    analyzer = Analyzer("ekfac", kf_model, task, cpu=True, disable_tqdm=True, output_dir=str(tmp_path / "kf"))
    f64 = torch.float64
    args = FactorArguments(strategy="ekfac", use_empirical_fisher=True, activation_covariance_dtype=f64,
                           gradient_covariance_dtype=f64, eigendecomposition_dtype=f64, per_sample_gradient_dtype=f64,
                           lambda_dtype=f64)
    analyzer.fit_all_factors("f", dataset=data, per_device_batch_size=3, factor_args=args,
                             overwrite_output_dir=True)
    kf = analyzer.load_lambda_matrices("f")
    for n in names:
        want = kf["lambda_matrix"][n] / kf["num_lambda_processed"][n]
        want = want.flip(0).flip(1)  # kronfluence orders eigenvalues ascending
        err = float((corr[n] - want).abs().max() / want.abs().max())
        print(f"{n}: relative error {err:.1e}")
        assert err <= 1e-12, n


@slow
def test_publish_of_an_ekfac_edit_names_its_curvature_and_draws_its_kept_set(tmp_path):
    """The card says which curvature ranked the components; the spectrum plot shows the kept set (not a staircase)
    when the corrected eigenvalues are beside the bases, and the per-row counts the adapter saved otherwise."""
    from hf_curvedit.publish.hub import publish
    from hf_curvedit.publish.plots import plot_spectrum

    model = tiny_llama().double()
    factors, corr = fit_with_correction(model, padded_rows(6, seed=6), tmp_path / "f")
    name = "model.layers.1.mlp.up_proj"
    edited = build_curvature_edit(model, factors, CurvatureEditConfig(keep_mass=0.7, selection="ekfac_mass",
                                                                      target_modules=[name]))
    edited.save_pretrained(tmp_path / "adapter")
    result = publish(tmp_path / "adapter", repo_id="user/tiny-ekfac", out_dir=tmp_path / "out",
                     eigen=tmp_path / "f" / "eigen.safetensors", dry_run=True)
    card = (result.folder / "README.md").read_text()
    assert "`ekfac_mass` (components ranked by their EK-FAC measured curvature" in card
    assert list((result.folder / "plots").glob("spectrum_*.png"))

    eigen = load_factors(tmp_path / "f").eigendecompose()
    _, kept = plot_spectrum(eigen[name], 0.7, tmp_path / "p.png", selection="ekfac_mass")
    saved = edited.get_submodule(f"base_model.model.{name}").curvedit_cutoffs["default"]
    assert torch.equal(kept.cutoffs, saved.cpu()) and kept.kept_mass_fraction >= 0.7
    bare = ModuleEigen(eigen[name].eigvals_A, eigen[name].eigvecs_A, eigen[name].eigvals_G, eigen[name].eigvecs_G)
    path, none = plot_spectrum(bare, 0.7, tmp_path / "q.png", selection="ekfac_mass", cutoffs=saved)
    assert none is None and path.read_bytes().startswith(b"\x89PNG")


def test_sweep_with_ekfac_selection_records_it_and_its_pick_needs_it(tmp_path):
    """Every candidate of an EK-FAC sweep is an EK-FAC edit; the saved sweep reruns with it, and an adapter of the
    pick's ρ and modules but another selection is not the pick."""
    from hf_curvedit import SweepConfig, SweepResult, sweep_edits
    from hf_curvedit.evaluation import RecitationSet, TextSet
    from hf_curvedit.tuner.locate import curvature_edit_report as report

    model = tiny_llama().double()
    factors, _ = fit_with_correction(model, padded_rows(6, seed=7), tmp_path / "f")
    eigen = factors.eigendecompose()
    rows = random_token_rows(6, lo=12, hi=14, seed=4)
    rec = RecitationSet([r[:8] for r in rows], [r[8:] for r in rows])
    heldout = TextSet(random_token_rows(6, lo=10, hi=20, seed=9))
    regex = r".*layers\.1\.mlp\.(gate|up|down)_proj"
    config = SweepConfig(keep_masses=(0.6, 0.9), layer_choices={"L1": regex}, perplexity_budget=100.0,
                         selection="ekfac_mass", allocation="uniform")
    result = sweep_edits(model, eigen, {"mem": rec}, heldout, config)
    chosen = result.chosen
    edited = build_curvature_edit(model, eigen, CurvatureEditConfig(keep_mass=chosen.keep_mass, target_modules=regex,
                                                                    selection="ekfac_mass"))
    assert all(r.selection == "ekfac_mass" for r in report(edited))
    edited.unload()
    saved = SweepResult.load(result.save(tmp_path / "sweep.json"))
    assert SweepConfig.from_dict(saved.config).selection == "ekfac_mass"
    same = {"keep_mass": chosen.keep_mass, "target_modules": chosen.target_modules}
    assert saved.pick_mismatch({**same, "selection": "ekfac_mass"}) is None
    assert "selection is 'curvature_mass'" in saved.pick_mismatch(same)
    with pytest.raises(ValueError, match="selection must be one of"):
        SweepConfig(selection="ekfac")


@slow
def test_expert_lambda_split_across_passes_equals_one_pass(tmp_path):
    """A budget that holds two experts' bases and Λ at a time: each expert projection is measured in slices of its
    experts over several passes, and the store gives the same Λ as one pass."""
    from family_configs import tiny_causal_lm

    model = tiny_causal_lm("mixtral", seed=1)
    rows = [[t % 128 for t in r] for r in padded_rows(6)]
    data = Dataset.from_dict({"input_ids": rows})
    cfg = FactorConfig(label_mode="empirical", seq_len=SEQ, batch_size=3, packing=False)
    factors = fit_factors(model, data, cfg, tmp_path / "f", progress=False)
    whole = fit_eigen_correction(model, data, factors, output_dir=tmp_path / "whole", progress=False)
    budget = FactorConfig(label_mode="empirical", seq_len=SEQ, batch_size=3, packing=False,
                          max_factor_memory_gb=2.2 * (32 * 32 + 128 * 128 + 128 * 32) * 4 / 1024**3)
    split = fit_eigen_correction(model, data, factors, budget, tmp_path / "split", progress=False)
    assert len(list((tmp_path / "split").glob("ekfac-*.safetensors"))) > 4, "slices of experts, several passes"
    for n in whole:
        torch.testing.assert_close(split[n], whole[n], rtol=1e-5, atol=1e-9)
