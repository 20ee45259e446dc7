"""The scale benchmarks run end to end (at tiny shapes on CPU), so that they work the day they are needed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from testing_utils import slow

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(*args: str) -> str:
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@slow
def test_gpu_check_script_runs_at_tiny_shapes_on_cpu():
    out = _run(str(BENCH / "gpu_check.py"), "--shapes", "tiny", "--device", "cpu", "--tokens", "2048",
               "--seq-len", "64", "--batch-size", "8")
    row = next(line for line in out.splitlines() if line.startswith("| tiny |"))
    assert row.count("|") == 15 and "× |" in row


@slow
def test_scale_benchmark_runs_at_small_shapes():
    out = _run(str(BENCH / "scale_7b.py"), "--hidden", "96", "--mlp", "256", "--repeats", "2", "--prefill-repeats", "1",
               "--threads", "1")
    assert "| 96² |" in out and "| 256² |" in out
    assert out.count("| gate_proj |") == 3 and "| down_proj | 0.9 |" in out
    assert "| bfloat16 | 4×512 |" in out and "| float32 | 1×1 |" in out and "factorized" in out


@slow
def test_integrity_benchmark_runs_at_small_shapes():
    out = _run(str(BENCH / "integrity_overhead.py"), "--hidden", "64", "--mlp", "128", "--rank", "16", "--layers", "1",
               "--repeats", "1", "--threads", "1")
    assert "| PeftModel.from_pretrained + forward |" in out and "| load_adapter + forward |" in out
    assert out.count("× |") == 2 and "| verify_adapter_folder (no model) |" in out


@slow
def test_kronfluence_parity_benchmark_runs_at_small_shapes():
    """Where kronfluence is installed (the benchmark environment; no dependency of hf-curvedit)."""
    import pytest

    pytest.importorskip("kronfluence")
    out = _run(str(BENCH / "kronfluence_parity.py"), "--hidden", "128", "--layers", "1", "--vocab", "500",
               "--batches", "2", "--pairs", "1", "--threads", "1")
    for stage in ("factors", "eigen", "ekfac"):
        assert out.count(f"| {stage} |") == 1
    assert "relative difference (Frobenius)" in out and "fixed costs per fit" in out


@slow
def test_scale_fit_benchmark_runs_at_small_shapes():
    out = _run(str(BENCH / "scale_fit.py"), "--small", "--budget-gb", "0.0001", "--tokens", "2048")
    for stage in ("fit, no budget, 1 process", "fit, budget, 2 processes", "eigendecomposition, 2 processes"):
        assert out.count(f"| {stage} |") == 1
    assert "one after the other on 2 processes" in out and "2 processes / 1 process, fit:" in out


def test_experts_forward_benchmark_runs_at_small_shapes(tmp_path):
    out = _run(str(BENCH / "experts_forward.py"), "--small", "--ranks", "8", "--repeats", "1", "--threads", "1",
               "--moe-run-dir", str(tmp_path / "none"))
    rows = [line for line in out.splitlines() if line.startswith("| ") and "variant" not in line]
    assert [r.split(" | ")[0] for r in rows] == ["| base", "| dense W' copy", "| factored, rank 8"]
    assert "skipped" in out  # no trained MoE in that folder
