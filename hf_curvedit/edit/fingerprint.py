"""Fingerprints of a weight: shape, scale and a few fixed random projections, to tell the base an edit was built for
from another one (and accept a bf16 copy of the same weights)."""

from __future__ import annotations

import math

import torch

__all__ = ["FINGERPRINT_SIZE", "fingerprint_mismatch", "weight_fingerprint"]

_N_PROBES = 6
FINGERPRINT_SIZE = 3 + _N_PROBES  # d_out, d_in, RMS, then the probes
# A different weight moves each normalized probe by ~1/sqrt(n); bf16 rounding of the same weight by ~0.002/sqrt(n).
_PROBE_TOL = 0.1
_RMS_RTOL = 1e-2


def _probe_vectors(n: int, offset: int, device: torch.device) -> torch.Tensor:
    # Deterministic quasi-random unit vectors (no RNG, so they are the same on every machine and torch version).
    i = torch.arange(1, n + 1, dtype=torch.float64, device=device)[:, None]
    alphas = torch.tensor([math.sqrt(p) % 1.0 for p in (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)],
                          dtype=torch.float64, device=device)[offset: offset + _N_PROBES]
    v = torch.cos(2 * math.pi * torch.remainder(i * alphas[None, :], 1.0) + 0.5)
    return v / v.norm(dim=0, keepdim=True)


def weight_fingerprint(weight: torch.Tensor) -> torch.Tensor:
    """A float64 fingerprint of a logical ``(d_out, d_in)`` weight: shape, RMS and 6 normalized bilinear probes.

    The probes ``uᵀ W v / ‖W‖_F`` are insensitive to the storage dtype (a bf16 copy of the same weight matches) but
    tell apart two different weights of the same shape and scale.
    """
    d_out, d_in = weight.shape
    w = weight.detach().float()
    u = _probe_vectors(d_out, 0, w.device)
    v = _probe_vectors(d_in, _N_PROBES, w.device)
    norm = float(torch.linalg.vector_norm(w, dtype=torch.float64))
    probes = ((u.T.float() @ w) @ v.float()).diagonal().double()
    probes = probes / norm if norm > 0 else probes
    rms = norm / math.sqrt(max(d_out * d_in, 1))
    return torch.cat([torch.tensor([d_out, d_in, rms], dtype=torch.float64), probes.cpu()])


def fingerprint_mismatch(expected: torch.Tensor, actual: torch.Tensor) -> str | None:
    """What differs between two weight fingerprints, in words, or ``None`` when they match (or ``expected`` is
    unfilled)."""
    expected, actual = expected.double().cpu(), actual.double().cpu()
    if expected.shape != actual.shape:
        return "the fingerprint format differs"
    if not torch.isfinite(expected).all() or expected[0] == 0:
        return None  # an unfilled (all-zero) fingerprint: nothing to compare against
    shape_e, shape_a = tuple(int(x) for x in expected[:2]), tuple(int(x) for x in actual[:2])
    if shape_e != shape_a:
        return f"weight shape (d_out, d_in) is {shape_a}, the adapter was built for {shape_e}"
    rms_e, rms_a = float(expected[2]), float(actual[2])
    if abs(rms_e - rms_a) > _RMS_RTOL * max(abs(rms_e), 1e-30):
        return f"weight RMS is {rms_a:.6g}, the adapter was built for {rms_e:.6g}"
    tol = _PROBE_TOL / math.sqrt(shape_e[0] * shape_e[1])
    diff = (expected[3:] - actual[3:]).abs()
    n_bad = int((diff > tol).sum())
    if n_bad:
        return (f"{n_bad} of {diff.numel()} fixed random projections of the weight differ "
                f"(max |Δ| {float(diff.max()):.3g} > tolerance {tol:.3g}): same shape and scale, different values")
    return None
