"""At scale: factors streamed to disk one data pass at a time (shards and an index), read back one module at a time,
resumed shard by shard and spread over processes; eigen caches and EK-FAC passes the same way; folders written by
earlier versions still read, and build the same adapters."""

from __future__ import annotations

import gc
import json
import os
import shutil
import socket
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from safetensors import safe_open
from testing_utils import assert_same_adapter_tensors, random_token_rows, slow, tiny_llama

from hf_curvedit import (
    CurvatureEditConfig,
    FactorConfig,
    build_curvature_edit,
    fit_eigen_correction,
    fit_factors,
    load_factors,
)
from hf_curvedit.curvature import passes as passes_mod
from hf_curvedit.integrity import DamagedFileError

# 2 layers of 3 MLP projections, each ~20 KB of fp32 accumulators: a budget of 42,000 bytes takes two per pass
BUDGET_CFG = dict(seq_len=16, batch_size=2, seed=3, checkpoint_every=1, max_factor_memory_gb=42_000 / 1024**3)
LEGACY = Path(__file__).with_name("data") / "legacy_v1"


def scale_model() -> torch.nn.Module:
    return tiny_llama(seed=5)


def scale_data() -> Dataset:
    return Dataset.from_dict({"input_ids": random_token_rows(24, lo=8, hi=20, seed=9)})


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


def _same_factors(got, want) -> None:
    assert got.num_tokens == want.num_tokens and got.module_names == want.module_names
    for n in want.module_names:
        _close(got.A[n], want.A[n])
        _close(got.G[n], want.G[n])


@slow
def test_each_pass_is_written_and_freed_before_the_next(tmp_path, monkeypatch):
    real = passes_mod.collect_factor_sums
    alive: list[weakref.ref] = []

    def collect(model, batches, part, config, *, collector, **kw):
        gc.collect()
        assert all(ref() is None for ref in alive), "the previous pass's accumulators are still held"
        result = real(model, batches, part, config, collector=collector, **kw)
        alive.append(weakref.ref(collector))
        return result

    monkeypatch.setattr(passes_mod, "collect_factor_sums", collect)
    factors = fit_factors(scale_model(), scale_data(), FactorConfig(**BUDGET_CFG), tmp_path, progress=False)
    assert len(alive) == 3
    shards = sorted(p.name for p in tmp_path.glob("factors-*.safetensors"))
    assert shards == [f"factors-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
    assert not (tmp_path / "factors.safetensors").exists() and not (tmp_path / "checkpoint").exists()
    index = json.loads((tmp_path / "factors.safetensors.index.json").read_text())
    assert set(index["shards"]) == set(shards)
    # each pass's modules live in its own shard
    names = factors.module_names
    for k, part in enumerate([names[0:2], names[2:4], names[4:6]]):
        assert {index["weight_map"][f"{n}.G"] for n in part} == {shards[k]}
    # read back one module at a time, equal to an unbudgeted fit held in memory
    assert not isinstance(factors.G, dict)
    whole = fit_factors(scale_model(), scale_data(), FactorConfig(**{**BUDGET_CFG, "max_factor_memory_gb": None}),
                        progress=False)
    _same_factors(factors, whole)


@slow
def test_a_rerun_skips_the_finished_passes(tmp_path, monkeypatch):
    real = passes_mod.collect_factor_sums
    parts: list[list[str]] = []

    class Killed(RuntimeError):
        pass

    def collect(model, batches, part, *a, crash=False, **kw):
        parts.append(list(part))

        def gen():
            for i, (b, batch) in enumerate(batches):
                if crash and len(parts) == 2 and i == 2:
                    raise Killed
                yield b, batch
        return real(model, gen(), part, *a, **kw)

    monkeypatch.setattr(passes_mod, "collect_factor_sums", lambda *a, **kw: collect(*a, crash=True, **kw))
    with pytest.raises(Killed):
        fit_factors(scale_model(), scale_data(), FactorConfig(**BUDGET_CFG), tmp_path, progress=False)
    assert (tmp_path / "factors-00001-of-00003.safetensors").exists()
    assert not (tmp_path / "factors.safetensors.index.json").exists(), "an unfinished store has no index"
    with pytest.raises(FileNotFoundError, match="resume"):
        load_factors(tmp_path)
    first = parts[0]
    parts.clear()
    monkeypatch.setattr(passes_mod, "collect_factor_sums", collect)
    resumed = fit_factors(scale_model(), scale_data(), FactorConfig(**BUDGET_CFG), tmp_path, progress=False)
    assert first not in parts and len(parts) == 2, "the finished pass is not run again"
    clean = fit_factors(scale_model(), scale_data(), FactorConfig(**BUDGET_CFG), tmp_path / "clean", progress=False)
    _same_factors(resumed, clean)


@slow
def test_a_shard_of_another_run_is_refused(tmp_path):
    for seed, folder in ((3, "a"), (4, "b")):
        fit_factors(scale_model(), scale_data(), FactorConfig(**{**BUDGET_CFG, "seed": seed}), tmp_path / folder,
                    progress=False)
    shard = "factors-00002-of-00003.safetensors"
    shutil.copy(tmp_path / "b" / shard, tmp_path / "a" / shard)
    factors = load_factors(tmp_path / "a")
    with pytest.raises(DamagedFileError, match="a shard of another run"):
        factors.factor(factors.module_names[2], "G")
    # and a fit into that folder collects the factors again instead of returning them
    again = fit_factors(scale_model(), scale_data(), FactorConfig(**BUDGET_CFG), tmp_path / "a", progress=False)
    _same_factors(again, load_factors(tmp_path / "a"))


@slow
def test_ekfac_pass_under_a_budget_equals_one_pass(tmp_path):
    factors = fit_factors(scale_model(), scale_data(), FactorConfig(**BUDGET_CFG), tmp_path, progress=False)
    split = fit_eigen_correction(scale_model(), scale_data(), tmp_path, progress=False)
    assert sorted(p.name for p in tmp_path.glob("ekfac-*.safetensors")) == [
        f"ekfac-0000{k}-of-00006.safetensors" for k in range(1, 7)], "each module's bases and Λ fill one pass"
    whole = fit_eigen_correction(scale_model(), scale_data(), factors, FactorConfig(
        **{**BUDGET_CFG, "max_factor_memory_gb": None}), tmp_path / "whole", progress=False)
    assert split.num_samples == whole.num_samples
    for n in factors.module_names:
        _close(split[n], whole[n])


# ------------------------------------------------------------------------------------- earlier versions' folders
def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("family,adapter,selection", [("llama", "adapter_curvature_mass", "curvature_mass"),
                                                     ("llama", "adapter_ekfac_mass", "ekfac_mass"),
                                                     ("mixtral", "adapter", "curvature_mass")])
def test_folders_of_earlier_versions_read_and_build_the_same_adapters(tmp_path, family, adapter, selection):
    sys.path.insert(0, str(LEGACY))
    try:
        import make
    finally:
        sys.path.remove(str(LEGACY))
    folder = shutil.copytree(LEGACY / family, tmp_path / family)
    model = make.llama() if family == "llama" else make.mixtral()
    factors = load_factors(folder, model)
    raw = _tensors(folder / "factors.safetensors")
    for n in factors.module_names:  # stacked experts, every stored factor
        torch.testing.assert_close(factors.G[n], raw[f"{n}.G"], rtol=0, atol=0)
    stamp = (folder / "eigen.safetensors").stat().st_mtime_ns
    eigen = factors.eigendecompose()
    assert (folder / "eigen.safetensors").stat().st_mtime_ns == stamp, "the earlier cache is read, not rewritten"
    config = CurvatureEditConfig(keep_mass=0.7, selection=selection, **(
        {"min_expert_tokens": 1} if family == "mixtral" else {}))
    built = build_curvature_edit(model, eigen, config)
    built.save_pretrained(tmp_path / "again")
    assert_same_adapter_tensors(_tensors(tmp_path / "again" / "adapter_model.safetensors"),
                                _tensors(folder / adapter / "adapter_model.safetensors"))
    # the earlier adapter itself still loads (its one digest per module checked) and runs
    from peft import PeftModel

    fresh = make.llama() if family == "llama" else make.mixtral()
    loaded = PeftModel.from_pretrained(fresh, folder / adapter)
    loaded(torch.randint(1, 50, (1, 6)))
    if selection == "ekfac_mass":  # its EK-FAC file too: a fit finds it complete
        corr = fit_eigen_correction(make.llama(), make.data(make.llama().config.vocab_size), folder, progress=False)
        assert corr.path == folder / "ekfac.safetensors"


# ------------------------------------------------------------------------------------------------ two processes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: Path, *args: str, nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(_free_port()), str(script), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


@slow
def test_two_processes_share_the_passes_and_the_eigendecomposition(tmp_path):
    out = tmp_path / "two"
    out.mkdir()
    proc = torchrun(Path(__file__).with_name("_mp_scale_worker.py"), str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    factors = load_factors(out)
    # each process collects its own partitions over all the data: the factor pass's 3 take 2 passes one after the
    # other (process 0: partitions 1 and 3, process 1: partition 2), the EK-FAC pass's 6 take 3
    batches = list(range(len(ranks[0]["passes"][0]["batches"])))
    assert batches and all(p["batches"] == batches for r in ranks for p in r["passes"]), "each pass reads all the data"
    assert [len(r["passes"]) for r in ranks] == [2 + 3, 1 + 3]
    names = factors.module_names
    assert [p["modules"] for p in ranks[0]["passes"][:2]] == [names[0:2], names[4:6]]
    assert ranks[1]["passes"][0]["modules"] == names[2:4]
    # the eigen cache: several shards, written by both processes
    assert all(r["shards"] for r in ranks) and len({s for r in ranks for s in r["shards"]}) >= 4
    # the same factors, bases and Λ as one process
    whole = fit_factors(scale_model(), scale_data(), FactorConfig(**{**BUDGET_CFG, "max_factor_memory_gb": None}),
                        progress=False)
    _same_factors(factors, whole)
    from hf_curvedit.curvature.decompose import _in_memory

    one = _in_memory(factors)
    for n, e in factors.eigendecompose().items():
        for kind in ("eigvals_A", "eigvecs_A", "eigvals_G", "eigvecs_G"):
            assert torch.equal(getattr(e, kind), getattr(one[n], kind)), (n, kind)
    single = fit_eigen_correction(scale_model(), scale_data(), factors, FactorConfig(
        **{**BUDGET_CFG, "max_factor_memory_gb": None}), tmp_path / "one", progress=False)
    from hf_curvedit import EigenCorrection

    multi = EigenCorrection.load(out)
    assert multi.num_samples == single.num_samples
    for n in factors.module_names:
        _close(multi[n], single[n])


@slow
def test_fit_help_names_every_file_a_fit_writes(tmp_path):
    """`hf-curvedit fit --help` says where the factors, their eigenbases and the EK-FAC eigenvalues go, in the names
    the writers give them: one file each, or shards and an index when the fit ran under a memory budget."""
    import argparse
    import re

    from hf_curvedit.cli.parser import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    helps = {a.dest: a.help for a in sub.choices["fit"]._actions}
    described = helps["output_dir"] + " " + helps["ekfac"]
    forms = set()
    for folder, budget in ((tmp_path / "budget", BUDGET_CFG["max_factor_memory_gb"]), (tmp_path / "whole", None)):
        config = FactorConfig(**{**BUDGET_CFG, "max_factor_memory_gb": budget})
        factors = fit_factors(scale_model(), scale_data(), config, folder, progress=False)
        factors.eigendecompose(folder)
        fit_eigen_correction(scale_model(), scale_data(), folder, progress=False)
        for f in folder.iterdir():
            if f.is_file() and not f.name.startswith("."):
                forms.add(re.sub(r"-\d{5}-of-\d{5}\.", "-NNNNN-of-MMMMM.", f.name))
    assert {"factors.safetensors", "factors-NNNNN-of-MMMMM.safetensors", "factors.safetensors.index.json",
            "eigen.safetensors", "ekfac.safetensors", "ekfac-NNNNN-of-MMMMM.safetensors"} <= forms, forms
    for form in sorted(forms):
        assert form in described, f"fit writes {form}, which its --help does not name: {described!r}"
