"""The curvature edit of an expert projection: each expert's matrix edited in its own eigenbasis, under-sampled
experts left as they are (docs/method.md, "Mixture-of-experts")."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..curvature.eigen import ModuleEigen
from ..errors import InputError
from ..selection import Selection
from .fingerprint import weight_fingerprint
from .weight import META_FIELDS, META_INDEX, CurvatureEdit, _check_shape, compute_edit

__all__ = ["ExpertsEdit", "ExpertsFactors", "compute_experts_edit", "expert_is_edited", "expert_token_threshold"]


def expert_token_threshold(min_expert_tokens: int | None, d_out: int, d_in: int) -> int:
    """The fewest tokens an expert's factors must have seen for the expert to be edited.

    ``None`` (the default policy) asks for ``max(d_out, d_in)``: fewer samples cannot give full-rank factors, and a
    rank-deficient factor has zero curvature in directions it never saw, so the edit would drop them on no evidence.
    An expert that no token reached is never edited, whatever the setting.
    """
    return max(d_out, d_in) if min_expert_tokens is None else max(int(min_expert_tokens), 1)


@dataclass
class ExpertsEdit:
    """The edit of an expert projection (a 3D parameter, one ``(d_out, d_in)`` matrix per expert).

    Each edited expert has its own `CurvatureEdit` (``W'_e`` in its own eigenbasis); an under-sampled expert is left
    as it is (``None``). For storage the per-expert factors are stacked, zero-padded to the largest rank ``k``:
    ``W'_e = out_e in_eᵀ`` with ``out`` ``(experts, d_out, k)`` and ``in`` ``(experts, d_in, k)`` (the zero columns add
    nothing, so the stack is exact). Which side is orthonormal is in each expert's `META_FIELDS` row.

    Attributes:
        experts: one `CurvatureEdit` per expert, ``None`` for an expert left unedited.
        num_tokens: int64 ``(experts,)``, the tokens each expert's factors saw.
        meta: float64 ``(experts, len(META_FIELDS))``, each expert's statistics; an unedited expert's row records
            ρ = 0, every component kept and its weight norm.
        fingerprint: float64 ``(experts, FINGERPRINT_SIZE)``, the `weight_fingerprint` of every expert's matrix.
        d_out, d_in: the shape of one expert's matrix.
    """

    experts: list[CurvatureEdit | None]
    num_tokens: torch.Tensor
    meta: torch.Tensor
    fingerprint: torch.Tensor
    d_out: int
    d_in: int

    @property
    def rank(self) -> int:
        """The padded rank of the stacked factors (the largest rank among edited experts, at least 1)."""
        return max([e.rank for e in self.experts if e is not None] + [1])

    @property
    def edited(self) -> torch.Tensor:
        """bool ``(experts,)``: which experts the edit changes."""
        return torch.tensor([e is not None for e in self.experts])

    def stacked(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(out, in, cutoffs)``: the padded factor stacks and the int64 ``(experts, d_out)`` staircases."""
        n, k = len(self.experts), self.rank
        out = torch.zeros(n, self.d_out, k, dtype=dtype)
        inp = torch.zeros(n, self.d_in, k, dtype=dtype)
        cutoffs = torch.zeros(n, self.d_out, dtype=torch.int64)
        for i, e in enumerate(self.experts):
            if e is None:
                continue
            o, q = (e.B, e.Q) if e.q_side == "input" else (e.Q, e.B)
            out[i, :, : e.rank] = o.to("cpu", dtype)
            inp[i, :, : e.rank] = q.to("cpu", dtype)
            cutoffs[i] = e.cutoffs.cpu()
        return out, inp, cutoffs

    def dense(self, weight: torch.Tensor) -> torch.Tensor:
        """``W'`` as a logical ``(experts, d_out, d_in)`` stack; unedited experts keep their rows of ``weight``."""
        out = weight.detach().clone()
        for i, e in enumerate(self.experts):
            if e is not None:
                out[i] = e.dense().to(out.dtype)
        return out


@dataclass
class ExpertsFactors:
    """An expert projection's edit as exposure reads it: ``W′_e = out_e in_eᵀ`` for each edited expert (``edited``);
    the others keep their matrix."""

    out: torch.Tensor  # (experts, d_out, k)
    inp: torch.Tensor  # (experts, d_in, k)
    edited: torch.Tensor  # (experts,) bool

    @classmethod
    def of(cls, edit: ExpertsEdit) -> ExpertsFactors:
        """From an `ExpertsEdit` (what `compute_module_edits` gives an expert projection)."""
        out, inp, _ = edit.stacked(torch.float64)
        return cls(out, inp, edit.edited)


def expert_is_edited(meta: torch.Tensor) -> torch.Tensor:
    """bool ``(experts,)`` from stacked `META_FIELDS` rows: an unedited expert's row records no ρ (keep_mass 0)."""
    return meta[..., META_INDEX["keep_mass"]] > 0


def _unedited_meta(weight: torch.Tensor) -> torch.Tensor:
    d_out, d_in = weight.shape
    norm = float(torch.linalg.vector_norm(weight.detach(), dtype=torch.float64))
    meta = torch.zeros(len(META_FIELDS), dtype=torch.float64)
    for name, value in {"kept_components": d_out * d_in, "total_components": d_out * d_in, "kept_mass_fraction": 1.0,
                        "weight_norm": norm, "edited_norm": norm}.items():
        meta[META_INDEX[name]] = value
    return meta


def compute_experts_edit(
    weight: torch.Tensor,
    eigen: ModuleEigen,
    keep_mass: float,
    selection: Selection = "curvature_mass",
    rank_cap: int | None = None,
    dtype: torch.dtype = torch.float32,
    protect: Mapping[str, tuple[ModuleEigen, float]] | None = None,
    *,
    min_expert_tokens: int | None = None,
) -> ExpertsEdit:
    """Edit every expert of a logical ``(experts, d_out, d_in)`` weight with its own eigenbasis (`compute_edit` per
    expert).

    An expert whose factors saw fewer tokens than `expert_token_threshold` (or none, or whose factors carry no
    curvature mass) is left unedited and recorded as such. A protected domain protects the experts its own factors
    reached; for an expert that none of its tokens reached, that domain adds nothing.
    """
    num = eigen.num_experts
    if num is None or weight.dim() != 3 or weight.shape[0] != num:
        raise InputError(f"an expert projection needs a stacked eigenbasis with one basis per expert; got "
                         f"{num} bases for a weight of shape {tuple(weight.shape)}")
    _, d_out, d_in = weight.shape
    _check_shape(eigen, d_out, d_in)
    tokens = eigen.num_tokens
    if tokens is None:
        raise InputError("the eigenbasis of an expert projection does not record how many tokens each expert saw; "
                         "eigendecompose the factors with this version of hf-curvedit")
    tokens = tokens.to(torch.int64).cpu()
    need = expert_token_threshold(min_expert_tokens, d_out, d_in)
    experts: list[CurvatureEdit | None] = []
    metas, prints = [], []
    for e in range(num):
        w = weight[e]
        basis = eigen.expert(e)
        usable = int(tokens[e]) >= need and bool(basis.eigvals_G.sum() > 0) and bool(basis.eigvals_A.sum() > 0)
        if usable:
            domain = {}
            for name, (d_eigen, rho) in (protect or {}).items():
                d_basis = d_eigen.expert(e)
                d_tokens = d_eigen.num_tokens
                if (d_tokens is None or int(d_tokens[e]) > 0) and bool(d_basis.eigvals_G.sum() > 0):
                    domain[name] = (d_basis, rho)
            edit = compute_edit(w, basis, keep_mass, selection, rank_cap, dtype, domain or None)
            experts.append(edit)
            metas.append(edit.meta)
            prints.append(edit.fingerprint)
        else:
            experts.append(None)
            metas.append(_unedited_meta(w))
            prints.append(weight_fingerprint(w))
    return ExpertsEdit(experts, tokens, torch.stack(metas), torch.stack(prints), int(d_out), int(d_in))
