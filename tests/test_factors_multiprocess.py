"""A 2-process (gloo, CPU) run equals a 1-process run: the factors and the EK-FAC pass.

The two processes come from `torchrun --nproc_per_node 2` in a subprocess: on CPU,
`accelerate launch --num_processes 2` starts one process, and forking from a pytest process whose
OpenMP pool is already running can deadlock.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import torch
from datasets import Dataset
from testing_utils import random_token_rows, slow, tiny_llama

from hf_curvedit import EigenCorrection, FactorConfig, fit_eigen_correction, fit_factors, load_factors
from hf_curvedit.curvature import collect_factor_sums

CFG = dict(seq_len=16, batch_size=2, label_mode="sampled", seed=3, checkpoint_every=1)


def _data() -> Dataset:
    # 11 blocks → 6 batches, the last one partial: each rank gets 3 batches of unequal sizes.
    return Dataset.from_dict({"input_ids": random_token_rows(30, lo=4, hi=14, seed=5)})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_sums_of_each_ranks_batches_add_up_to_the_sums_of_all(tmp_path):
    """What a multi-process run reduces: every rank's raw sums over its batches (the even and the odd global batches,
    labels drawn per global batch index), added, are the sums over all batches in one process."""
    model = tiny_llama()
    names = [n for n, _ in model.named_modules() if n.endswith(("up_proj", "down_proj"))]
    g = torch.Generator().manual_seed(2)
    batches = [(i, {"input_ids": torch.randint(1, 61, (2, 12), generator=g),
                    "attention_mask": torch.ones(2, 12, dtype=torch.long)}) for i in range(5)]
    cfg = FactorConfig(**CFG, accumulate_dtype="float64")
    whole = collect_factor_sums(model, batches, names, cfg)
    ranks = [collect_factor_sums(model, batches[r::2], names, cfg) for r in (0, 1)]
    for key, total in whole.sums().items():
        torch.testing.assert_close(ranks[0].sums()[key] + ranks[1].sums()[key], total, rtol=1e-10, atol=1e-12)
    assert {n: ranks[0].count[n] + ranks[1].count[n] for n in names} == whole.count


@slow
def test_two_process_run_equals_one_process(tmp_path):
    out = tmp_path / "multi"
    out.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(Path(__file__).with_name("_mp_fit_worker.py")), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "rank0.done").exists() and (out / "rank1.done").exists()

    single = fit_factors(tiny_llama(), _data(), FactorConfig(**CFG), progress=False)
    multi = load_factors(out)
    assert multi.num_tokens == single.num_tokens
    for n in single.module_names:
        torch.testing.assert_close(multi.A[n], single.A[n], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(multi.G[n], single.G[n], rtol=1e-5, atol=1e-7)
    assert not (out / "checkpoint").exists()

    # the EK-FAC pass too, in the same eigenbasis (the multi-process run's): one process gives the same Λ
    one = tmp_path / "one"
    one.mkdir()
    for path in [*out.glob("factors*"), *out.glob("eigen*")]:  # the stores, single files or shards and an index
        shutil.copy(path, one / path.name)
    single_corr = fit_eigen_correction(tiny_llama(), _data(), one, progress=False)
    multi_corr = EigenCorrection.load(out)
    assert multi_corr.num_samples == single_corr.num_samples > 0
    for n in single.module_names:
        torch.testing.assert_close(multi_corr[n], single_corr[n], rtol=1e-5, atol=1e-9)
    assert not (out / "ekfac_checkpoint").exists()
