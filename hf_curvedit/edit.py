"""The curvature edit of one weight, as plain tensor math (no PEFT): selection, projection, exact factorization.

Given a logical ``(d_out, d_in)`` weight W and the K-FAC eigenbases of its factors, the edit keeps the components of
``C = U_Gᵀ W U_A`` chosen by the selection (the staircase of `hf_curvedit.selection`) and maps them back:
``W' = U_G (M ∘ C) U_Aᵀ``, the orthogonal projection of W onto the kept components. With ``r`` kept rows and ``s``
columns in the longest row, W' has the exact rank-``k`` factorization ``W' = B Qᵀ`` (k = s ≤ r, Q = U_A[:, :s]) or
``W' = Q Bᵀ`` (k = r < s, Q = U_G[:, :r]) with orthonormal Q; that factorization is what an adapter stores. See
docs/method.md.

The sweep, the baselines and the plots use this module directly; the PEFT tuner (`hf_curvedit.tuner`) only stores
and applies its results.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .curvature.eigen import ModuleEigen
from .selection import SELECTIONS, Selection, select_cutoffs

__all__ = ["FINGERPRINT_SIZE", "META_FIELDS", "CurvatureEdit", "ExpertsEdit", "ModuleEditReport", "compute_edit",
           "compute_experts_edit", "expert_token_threshold", "fingerprint_mismatch", "q_side_of",
           "weight_fingerprint"]

# Layout of the per-adapter float64 metadata buffer (persisted in adapter_model.safetensors).
META_FIELDS = (
    "keep_mass",
    "r",
    "s",
    "k",
    "rank",  # rank of the stored factorization (k, or the rank cap if smaller)
    "kept_components",
    "total_components",
    "kept_mass_fraction",
    "q_side_output",  # 0: Q spans input space (W' = B Qᵀ), 1: Q spans output space (W' = Q Bᵀ)
    "weight_norm",  # ‖W‖_F
    "edited_norm",  # ‖W'‖_F (after the rank cap)
    "residual_norm",  # ‖W - W'‖_F (after the rank cap)
    "rank_cap",  # 0 = none
    "rank_cap_error",  # ‖W'_capped - W'‖_F / ‖W'‖_F
    "selection",  # 0: curvature_mass, 1: factor_truncation
)
_M = {name: i for i, name in enumerate(META_FIELDS)}
_SELECTION_CODES = {name: code for code, name in enumerate(SELECTIONS)}

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


@dataclass
class CurvatureEdit:
    """The result of editing one weight: ``W' = B Qᵀ`` (``q_side="input"``) or ``W' = Q Bᵀ`` (``"output"``).

    Attributes:
        Q: orthonormal columns, ``(d_in, k)`` or ``(d_out, k)``.
        B: the other factor, ``(d_out, k)`` or ``(d_in, k)``.
        q_side: which space Q spans, ``"input"`` or ``"output"``.
        cutoffs: int64 ``(d_out,)``, the kept staircase: row i of ``C`` keeps columns ``j < cutoffs[i]``.
        meta: float64 statistics laid out as `META_FIELDS` (the one record of ρ, r, s, k, kept mass, norms, ...).
        fingerprint: float64 `weight_fingerprint` of the weight that was edited.
        protected: per protected domain, what its own selection kept (``r``, ``s``, ``kept_components``,
            ``kept_mass_fraction``), plus ``"_union"``: the solver's iterations and optimality (empty without
            protection).
    """

    Q: torch.Tensor
    B: torch.Tensor
    q_side: str
    cutoffs: torch.Tensor
    meta: torch.Tensor
    fingerprint: torch.Tensor
    protected: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        """Rank of the stored factorization (k, or the rank cap when it is smaller)."""
        return int(self.Q.shape[1])

    def dense(self) -> torch.Tensor:
        """The edited weight ``W'`` as a dense logical ``(d_out, d_in)`` matrix."""
        return self.B @ self.Q.T if self.q_side == "input" else self.Q @ self.B.T

    @classmethod
    def empty(cls, d_out: int, d_in: int, rank: int, q_side: str, dtype: torch.dtype = torch.float32) -> CurvatureEdit:
        """An all-zero edit of the given shape, to be filled by loading a saved one (its fingerprint reads unfilled)."""
        if q_side not in ("input", "output"):
            raise ValueError(f"q_side must be 'input' or 'output', got {q_side!r}")
        q_dim, b_dim = (d_in, d_out) if q_side == "input" else (d_out, d_in)
        return cls(Q=torch.zeros(q_dim, rank, dtype=dtype), B=torch.zeros(b_dim, rank, dtype=dtype), q_side=q_side,
                   cutoffs=torch.zeros(d_out, dtype=torch.int64),
                   meta=torch.zeros(len(META_FIELDS), dtype=torch.float64),
                   fingerprint=torch.zeros(FINGERPRINT_SIZE, dtype=torch.float64))


def _check_shape(eigen: ModuleEigen, d_out: int, d_in: int, what: str = "the eigenbasis") -> None:
    if eigen.shape != (d_out, d_in):
        raise ValueError(
            f"{what} is for a ({eigen.shape[0]}, {eigen.shape[1]}) weight but the module's weight is "
            f"({d_out}, {d_in}) (d_out, d_in); the factors were collected on a different model"
        )


class _KeptSpace:
    """One selection's kept components ``{U_G (M ∘ c) U_Aᵀ}`` as a subspace of ``(d_out, d_in)`` matrices (float64)."""

    def __init__(self, eigen: ModuleEigen, keep_mass: float, selection: Selection, device: torch.device):
        self.st = select_cutoffs(eigen.eigvals_G, eigen.eigvals_A, keep_mass, selection)
        r, s = self.st.r, self.st.s
        self.UG = eigen.eigvecs_G[:, :r].to(device, torch.float64)
        self.UA = eigen.eigvecs_A[:, :s].to(device, torch.float64)
        self.mask = torch.arange(s, device=device)[None, :] < self.st.cutoffs.to(device)[:r, None]

    def coords(self, X: torch.Tensor) -> torch.Tensor:
        """The adjoint: the kept coordinates ``M ∘ (U_Gᵀ X U_A)`` of a matrix (its projection, in this basis)."""
        return ((self.UG.T @ X) @ self.UA) * self.mask

    def matrix(self, c: torch.Tensor) -> torch.Tensor:
        return (self.UG @ c) @ self.UA.T


def _project_onto_union(W: torch.Tensor, spaces: list[_KeptSpace], tol: float, max_iter: int,
                        ) -> tuple[torch.Tensor, int, float]:
    """Orthogonal (Frobenius) projection of W onto the sum of the kept subspaces, by CGLS on the coordinates.

    Minimizes ``‖W − Σ_t U_Gt (M_t ∘ c_t) U_Atᵀ‖_F``. Its residual ``R = W − W'`` is orthogonal to every kept
    subspace exactly when ``W'`` is the projection onto their sum, so ``max_t ‖M_t ∘ (U_Gtᵀ R U_At)‖ / ‖W‖`` (returned)
    is the optimality gap. Returns ``(W', iterations, gap)``.
    """
    apply = lambda cs: sum(sp.matrix(c) for sp, c in zip(spaces, cs))  # noqa: E731
    adjoint = lambda X: [sp.coords(X) for sp in spaces]  # noqa: E731
    sq = lambda cs: sum(float((c * c).sum()) for c in cs)  # noqa: E731
    x = [torch.zeros_like(sp.mask, dtype=torch.float64) for sp in spaces]
    resid = W.clone()
    grad = adjoint(resid)
    p = [g.clone() for g in grad]
    gamma = gamma0 = sq(grad)
    it = 0
    while gamma > (tol**2) * gamma0 and it < max_iter:
        q = apply(p)
        alpha = gamma / float((q * q).sum())
        x = [xi + alpha * pi for xi, pi in zip(x, p)]
        resid = resid - alpha * q
        grad = adjoint(resid)
        gamma, gamma_old = sq(grad), gamma
        p = [g + (gamma / gamma_old) * pi for g, pi in zip(grad, p)]
        it += 1
    W_kept = apply(x)
    w_norm = float(torch.linalg.vector_norm(W)) or 1.0
    gap = max(float(torch.linalg.vector_norm(c)) for c in adjoint(W - W_kept)) / w_norm
    return W_kept, it, gap


def _orthonormal_span(*bases: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis (float64, by SVD) of the span of the columns of ``bases``."""
    stacked = torch.cat(bases, dim=1)
    U, S, _ = torch.linalg.svd(stacked, full_matrices=False)
    tol = S.max() * max(stacked.shape) * torch.finfo(torch.float64).eps if S.numel() else 0.0
    return U[:, : int((S > tol).sum())]


def compute_edit(
    weight: torch.Tensor,
    eigen: ModuleEigen,
    keep_mass: float,
    selection: Selection = "curvature_mass",
    rank_cap: int | None = None,
    dtype: torch.dtype = torch.float32,
    protect: Mapping[str, tuple[ModuleEigen, float]] | None = None,
    *,
    union_tol: float = 1e-12,
    union_max_iter: int = 2000,
) -> CurvatureEdit:
    """Edit one logical ``(d_out, d_in)`` weight with its K-FAC eigenbasis (float64 math, result in `dtype`).

    ``C = U_Gᵀ W U_A`` restricted to the ``r × s`` kept block, masked by the staircase; with ``s ≤ r`` the factors are
    ``Q = U_A[:, :s]``, ``B = U_G[:, :r] (M∘C)``, otherwise ``Q = U_G[:, :r]``, ``B = U_A[:, :s] (M∘C)ᵀ``.

    With ``protect`` (domain name → (that domain's eigenbasis of this module, its ρ)), a component is kept when the
    general selection *or* a protected domain's selection keeps it: ``W'`` is the orthogonal projection of W onto the
    sum of the kept subspaces (each a subspace of matrices in its own eigenbasis), solved in float64 by conjugate
    gradients (CGLS) on the kept coordinates until the norm of the residual's kept coordinates falls below
    ``union_tol`` times its start; the result is refused when the residual's largest kept component is still above
    ``1000 · union_tol · ‖W‖`` (not orthogonal to the kept subspaces). ``W'`` lies in
    ``span(U_G kept cols of all sets) ⊗ span(U_A kept cols of all sets)``, so ``Q`` is an orthonormal basis
    (SVD) of the smaller of those two spans and ``B = W' Q`` (or ``W'ᵀ Q``): still an exact factorization.
    See docs/method.md, "Protected domains".
    """
    d_out, d_in = weight.shape
    _check_shape(eigen, d_out, d_in)
    device = weight.device
    W = weight.detach().to(torch.float64)
    weight_norm = float(torch.linalg.vector_norm(W))
    protected: dict[str, dict[str, float]] = {}
    general = _KeptSpace(eigen, keep_mass, selection, device)
    st, r, s = general.st, general.st.r, general.st.s
    if protect:
        spaces = [general]
        for name, (domain_eigen, rho) in protect.items():
            _check_shape(domain_eigen, d_out, d_in, f"the eigenbasis of protected domain {name!r}")
            sp = _KeptSpace(domain_eigen, rho, selection, device)
            spaces.append(sp)
            protected[name] = {"keep_mass": float(rho), "r": sp.st.r, "s": sp.st.s,
                               "kept_components": sp.st.kept_components, "kept_mass_fraction": sp.st.kept_mass_fraction}
        W_kept, iters, gap = _project_onto_union(W, spaces, union_tol, union_max_iter)
        if gap > 1e3 * union_tol:
            raise RuntimeError(f"the projection onto the protected union did not converge in {iters} iterations "
                               f"(optimality gap {gap:.2e} > {1e3 * union_tol:.0e}); call compute_edit with a larger "
                               "union_max_iter, or report it with the factors: the kept subspaces may be nearly "
                               "parallel")
        protected["_union"] = {"iterations": iters, "optimality_gap": gap}
        Q_in = _orthonormal_span(*(sp.UA for sp in spaces))
        Q_out = _orthonormal_span(*(sp.UG for sp in spaces))
        if Q_in.shape[1] <= Q_out.shape[1]:
            q_side, Q, B = "input", Q_in, W_kept @ Q_in
        else:
            q_side, Q, B = "output", Q_out, W_kept.T @ Q_out
        k = int(Q.shape[1])
        kept_norm = float(torch.linalg.vector_norm(W_kept))
    else:
        D = general.coords(W)
        if s <= r:
            q_side, Q, B = "input", general.UA, general.UG @ D
        else:
            q_side, Q, B = "output", general.UG, general.UA @ D.T
        k = min(r, s)
        kept_norm = float(torch.linalg.vector_norm(D))
    rank, cap_error, edited_norm = k, 0.0, kept_norm
    if rank_cap is not None and rank_cap < k:
        # SVD of the non-orthonormal factor only: W' = B Qᵀ = U S (Q V)ᵀ, and Q V stays orthonormal
        U, S, Vh = torch.linalg.svd(B, full_matrices=False)
        B = U[:, :rank_cap] * S[:rank_cap]
        Q = Q @ Vh[:rank_cap].T
        rank = rank_cap
        edited_norm = float(torch.linalg.vector_norm(S[:rank_cap]))
        dropped = float(torch.linalg.vector_norm(S[rank_cap:]))
        cap_error = dropped / kept_norm if kept_norm > 0 else 0.0
    # W - W' splits into the removed components (orthogonal to the kept subspace) and the rank-cap loss inside it
    residual_norm = math.sqrt(max(weight_norm**2 - edited_norm**2, 0.0))
    meta = torch.zeros(len(META_FIELDS), dtype=torch.float64)
    values = {
        "keep_mass": float(keep_mass), "r": r, "s": s, "k": k, "rank": rank, "kept_components": st.kept_components,
        "total_components": st.total_components, "kept_mass_fraction": st.kept_mass_fraction,
        "q_side_output": float(q_side == "output"), "weight_norm": weight_norm, "edited_norm": edited_norm,
        "residual_norm": residual_norm, "rank_cap": float(rank_cap or 0), "rank_cap_error": cap_error,
        "selection": _SELECTION_CODES[selection],
    }
    for name, value in values.items():
        meta[_M[name]] = value
    return CurvatureEdit(
        Q=Q.to(dtype).contiguous(), B=B.to(dtype).contiguous(), q_side=q_side, cutoffs=st.cutoffs.to(torch.int64),
        meta=meta, fingerprint=weight_fingerprint(weight), protected=protected,
    )


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


def expert_is_edited(meta: torch.Tensor) -> torch.Tensor:
    """bool ``(experts,)`` from stacked `META_FIELDS` rows: an unedited expert's row records no ρ (keep_mass 0)."""
    return meta[..., _M["keep_mass"]] > 0


def _unedited_meta(weight: torch.Tensor) -> torch.Tensor:
    d_out, d_in = weight.shape
    norm = float(torch.linalg.vector_norm(weight.detach(), dtype=torch.float64))
    meta = torch.zeros(len(META_FIELDS), dtype=torch.float64)
    for name, value in {"kept_components": d_out * d_in, "total_components": d_out * d_in, "kept_mass_fraction": 1.0,
                        "weight_norm": norm, "edited_norm": norm}.items():
        meta[_M[name]] = value
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
        raise ValueError(f"an expert projection needs a stacked eigenbasis with one basis per expert; got "
                         f"{num} bases for a weight of shape {tuple(weight.shape)}")
    _, d_out, d_in = weight.shape
    _check_shape(eigen, d_out, d_in)
    tokens = eigen.num_tokens
    if tokens is None:
        raise ValueError("the eigenbasis of an expert projection does not record how many tokens each expert saw; "
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


@dataclass
class ModuleEditReport:
    """What the edit did to one module (see `CurvatureEditModel.edit_report`)."""

    module: str
    adapter: str
    d_out: int
    d_in: int
    keep_mass: float
    selection: str
    r: int
    s: int
    k: int
    rank: int
    kept_components: int
    total_components: int
    kept_component_fraction: float
    kept_mass_fraction: float
    kept_norm_fraction: float  # ‖W'‖ / ‖W‖
    removed_norm_fraction: float  # ‖W - W'‖ / ‖W‖
    rank_cap: int | None
    rank_cap_error: float  # ‖W'_capped - W'‖ / ‖W'‖ (0 without a cap)
    adapter_bytes: int
    weight_bytes: int
    # expert projections only: how many experts, how many the edit changed (and which not), and the tokens each
    # expert's factors saw
    num_experts: int | None = None
    edited_experts: int | None = None
    unedited_experts: list[int] | None = None
    expert_tokens: list[int] | None = None

    @property
    def bytes_ratio(self) -> float:
        """Adapter bytes over the bytes of the weight it replaces."""
        return self.adapter_bytes / self.weight_bytes if self.weight_bytes else float("nan")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["bytes_ratio"] = self.bytes_ratio
        return out


    @classmethod
    def from_meta(cls, meta: torch.Tensor, *, module: str, adapter: str, d_out: int, d_in: int, adapter_bytes: int,
                  weight_bytes: int) -> ModuleEditReport:
        """Decode a `META_FIELDS` vector (the `CurvatureEdit.meta` of a computed or loaded edit)."""
        m = meta.detach().double().cpu()
        w_norm = float(m[_M["weight_norm"]])
        return cls(
            module=module, adapter=adapter, d_out=d_out, d_in=d_in, keep_mass=float(m[_M["keep_mass"]]),
            selection=SELECTIONS[int(m[_M["selection"]])],
            r=int(m[_M["r"]]), s=int(m[_M["s"]]), k=int(m[_M["k"]]), rank=int(m[_M["rank"]]),
            kept_components=int(m[_M["kept_components"]]), total_components=int(m[_M["total_components"]]),
            kept_component_fraction=float(m[_M["kept_components"]] / m[_M["total_components"]]),
            kept_mass_fraction=float(m[_M["kept_mass_fraction"]]),
            kept_norm_fraction=float(m[_M["edited_norm"]]) / w_norm if w_norm > 0 else 0.0,
            removed_norm_fraction=float(m[_M["residual_norm"]]) / w_norm if w_norm > 0 else 0.0,
            rank_cap=int(m[_M["rank_cap"]]) or None, rank_cap_error=float(m[_M["rank_cap_error"]]),
            adapter_bytes=adapter_bytes, weight_bytes=weight_bytes,
        )


    @classmethod
    def from_expert_meta(cls, meta: torch.Tensor, tokens: torch.Tensor, *, module: str, adapter: str, d_out: int,
                         d_in: int, adapter_bytes: int, weight_bytes: int) -> ModuleEditReport:
        """One report for a whole expert projection from its stacked `META_FIELDS` rows: components and norms summed
        over every expert (an unedited expert keeps all of its own), ρ, r, s, k and the rank cap's error the largest
        among edited experts, the kept mass fraction their mean."""
        m = meta.detach().double().cpu()
        edited = expert_is_edited(m)
        col = lambda name: m[:, _M[name]]  # noqa: E731
        mx = lambda name: float(col(name)[edited].max()) if bool(edited.any()) else 0.0  # noqa: E731
        w_norm = float(col("weight_norm").square().sum().sqrt())
        kept = float(col("kept_components").sum())
        total = float(col("total_components").sum())
        return cls(
            module=module, adapter=adapter, d_out=d_out, d_in=d_in, keep_mass=mx("keep_mass"),
            selection=SELECTIONS[int(mx("selection"))],
            r=int(mx("r")), s=int(mx("s")), k=int(mx("k")), rank=int(mx("rank")),
            kept_components=int(kept), total_components=int(total),
            kept_component_fraction=kept / total if total else 0.0,
            kept_mass_fraction=float(col("kept_mass_fraction")[edited].mean()) if bool(edited.any()) else 1.0,
            kept_norm_fraction=float(col("edited_norm").square().sum().sqrt()) / w_norm if w_norm > 0 else 0.0,
            removed_norm_fraction=float(col("residual_norm").square().sum().sqrt()) / w_norm if w_norm > 0 else 0.0,
            rank_cap=int(mx("rank_cap")) or None, rank_cap_error=mx("rank_cap_error"),
            adapter_bytes=adapter_bytes, weight_bytes=weight_bytes, num_experts=int(m.shape[0]),
            edited_experts=int(edited.sum()), unedited_experts=(~edited).nonzero().reshape(-1).tolist(),
            expert_tokens=[int(t) for t in tokens.reshape(-1).tolist()],
        )


def q_side_of(meta: torch.Tensor) -> str:
    """The side of Q recorded in a `META_FIELDS` vector: ``"input"`` or ``"output"``."""
    return "output" if float(meta.reshape(-1)[_M["q_side_output"]]) > 0.5 else "input"
