"""A model sharded with FSDP2 (``fully_shard``, the engine of accelerate's FSDP plugin), end to end on 2 CPU
processes under gloo: fit, EK-FAC pass, edit build, adapter save, unmerged, merged and disabled forwards, exposure.
The factors and Λ equal those of the unsharded model to round-off, and the adapter built on the sharded model is
bitwise the one built on the unsharded model from the same factors. Launched by plain torchrun, by ``accelerate
launch`` with its FSDP2 flags, and as two torchrun "nodes" on one machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from packaging.version import Version
from safetensors import safe_open
from test_scale import _free_port, torchrun
from testing_utils import assert_same_adapter_tensors, random_token_rows, slow, tiny_llama

from hf_curvedit import (
    CurvatureEditConfig,
    EigenCorrection,
    FactorConfig,
    build_curvature_edit,
    fit_eigen_correction,
    fit_factors,
    load_factors,
)
from hf_curvedit.data import count_batches, pack_into_blocks

CFG = dict(seq_len=16, batch_size=2, seed=3)
PROBE = torch.tensor([[5, 17, 3, 40, 9, 22, 31]])
WORKER = Path(__file__).with_name("_mp_fsdp_worker.py")


def fsdp_model() -> torch.nn.Module:
    return tiny_llama(seed=5)


def fsdp_data() -> Dataset:
    return Dataset.from_dict({"input_ids": random_token_rows(13, lo=8, hi=20, seed=9)})  # 5 batches


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1")


def _launch(mode: str, out: Path) -> None:
    if mode == "torch":
        proc = torchrun(WORKER, "torch", str(out))
        assert proc.returncode == 0, proc.stderr[-4000:]
    elif mode == "accelerate":
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--use_fsdp",
               "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
               "--fsdp_transformer_layer_cls_to_wrap", "LlamaDecoderLayer", "--main_process_port",
               str(_free_port()), str(WORKER), "accelerate", str(out)]
        proc = subprocess.run(cmd, env={**_env(), "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-4000:]
    else:  # two "nodes" of one process each, on one machine
        port = str(_free_port())
        procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank",
                                   str(rank), "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port",
                                   port, str(WORKER), "nodes", str(out)], env=_env(), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
        for p in procs:
            _, err = p.communicate(timeout=300)
            assert p.returncode == 0, err[-4000:]


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


# accelerate's FSDP2 plugin (`--fsdp_version 2`) arrived in accelerate 1.6; the lower bound of pyproject.toml is older,
# and with it FSDP2 runs through `fully_shard` under torchrun (the other two modes).
_ACCELERATE_FSDP2 = Version(version("accelerate")) >= Version("1.6")


@pytest.mark.parametrize("mode", ["torch", pytest.param("accelerate", marks=pytest.mark.skipif(
    not _ACCELERATE_FSDP2, reason="accelerate < 1.6 has no FSDP2 plugin")), "nodes"])
@slow
def test_a_sharded_model_end_to_end(tmp_path, mode):
    out = tmp_path / "sharded"
    out.mkdir()
    _launch(mode, out)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    # the processes split the data unevenly and stayed in step: the one with fewer batches took a muted step
    n_batches = count_batches(pack_into_blocks(fsdp_data(), None, CFG["seq_len"]), CFG["batch_size"], None)
    assert n_batches % 2 == 1
    real = [[s for s in r["steps"] if s >= 0] for r in ranks]
    assert sorted(real[0] + real[1]) == sorted(list(range(n_batches)) * 2), "both passes, every batch once each"
    assert len(ranks[0]["steps"]) == len(ranks[1]["steps"]) and -1 in ranks[1]["steps"]

    # factors and Λ equal the unsharded fit's to round-off
    factors = load_factors(out)
    whole = fit_factors(fsdp_model(), fsdp_data(), FactorConfig(**CFG), progress=False)
    assert factors.num_tokens == whole.num_tokens
    for n in whole.module_names:
        torch.testing.assert_close(factors.A[n], whole.A[n], rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(factors.G[n], whole.G[n], rtol=1e-5, atol=1e-8)
    corr = fit_eigen_correction(fsdp_model(), fsdp_data(), factors, output_dir=tmp_path / "ekfac", progress=False)
    sharded_corr = EigenCorrection.load(out)
    for n in whole.module_names:
        torch.testing.assert_close(sharded_corr[n], corr[n], rtol=1e-5, atol=1e-9)

    # the adapter built on the sharded model is bitwise the one built on the unsharded model from the same factors
    unsharded = build_curvature_edit(fsdp_model(), factors.eigendecompose(), CurvatureEditConfig(keep_mass=0.7))
    unsharded.save_pretrained(tmp_path / "unsharded")
    want = _tensors(tmp_path / "unsharded" / "adapter_model.safetensors")
    got = _tensors(out / "adapter" / "adapter_model.safetensors")
    assert_same_adapter_tensors(got, want)

    # every process saw the forwards of the unsharded edit: unmerged, merged, disabled, unmerged again
    with torch.no_grad():
        edited = unsharded(PROBE).logits
        with unsharded.disable_adapter():
            base = unsharded(PROBE).logits
    for r in ranks:
        for key, want_logits in (("unmerged", edited), ("merged", edited), ("again", edited), ("base", base)):
            torch.testing.assert_close(torch.tensor(r[key]), want_logits, rtol=1e-4, atol=1e-5, msg=key)
    from hf_curvedit.exposure import adapter_exposure

    exposure = adapter_exposure(unsharded, {"probe": [PROBE[0].tolist()]}, show_progress=False)
    for r in ranks:
        assert r["exposure"]["probe"] == pytest.approx(exposure.exposures("default")["probe"], rel=1e-5)


def test_an_fsdp2_model_in_a_world_of_one_builds_the_unsharded_edit(tmp_path):
    """In this process, a world of one under gloo: `fully_shard` makes every parameter a DTensor, as on several
    processes, and the edit built on the sharded model is the unsharded model's, as are its unmerged, merged and
    disabled forwards."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from hf_curvedit.curvature.distributed import is_sharded_model

    eigen = fit_factors(fsdp_model(), fsdp_data(), FactorConfig(**CFG), progress=False).eigendecompose()
    config = CurvatureEditConfig(keep_mass=0.7)
    unsharded = build_curvature_edit(fsdp_model(), eigen, config)
    unsharded.save_pretrained(tmp_path / "unsharded")
    with torch.no_grad():
        want = unsharded(PROBE).logits
    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = fsdp_model()
        mesh = init_device_mesh("cpu", (1,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        assert is_sharded_model(model)
        edited = build_curvature_edit(model, eigen, CurvatureEditConfig(keep_mass=0.7))
        edited.save_pretrained(tmp_path / "sharded")
        with torch.no_grad():
            torch.testing.assert_close(edited(PROBE).logits, want, rtol=1e-5, atol=1e-6)
            edited.merge_adapter()
            torch.testing.assert_close(edited(PROBE).logits, want, rtol=1e-4, atol=1e-5)
            edited.unmerge_adapter()
            with edited.disable_adapter():
                torch.testing.assert_close(edited(PROBE).logits, fsdp_model()(PROBE).logits, rtol=1e-5, atol=1e-6)
    finally:
        dist.destroy_process_group()
    assert_same_adapter_tensors(_tensors(tmp_path / "sharded" / "adapter_model.safetensors"),
                                _tensors(tmp_path / "unsharded" / "adapter_model.safetensors"))
