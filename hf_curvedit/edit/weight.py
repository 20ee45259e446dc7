"""The curvature edit of one weight, as plain tensor math (no PEFT): selection, projection, exact factorization.

Given a logical ``(d_out, d_in)`` weight W and the K-FAC eigenbases of its factors, the edit keeps the components of
``C = U_Gᵀ W U_A`` chosen by the selection (the staircase of `hf_curvedit.selection`) and maps them back:
``W' = U_G (M ∘ C) U_Aᵀ``, the orthogonal projection of W onto the kept components. With ``r`` kept rows and ``s``
columns in the longest row, W' has the exact rank-``k`` factorization ``W' = B Qᵀ`` (k = s ≤ r, Q = U_A[:, :s]) or
``W' = Q Bᵀ`` (k = r < s, Q = U_G[:, :r]) with orthonormal Q; that factorization is what an adapter stores. See
docs/method.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from ..curvature.eigen import ModuleEigen
from ..errors import Fix, InputError
from ..selection import (
    SELECTIONS,
    CorrectedSelection,
    Selection,
    Staircase,
    corrected_mass_selection,
    select_cutoffs,
)
from .fingerprint import FINGERPRINT_SIZE, weight_fingerprint

__all__ = ["META_FIELDS", "META_INDEX", "CurvatureEdit", "compute_edit", "q_side_of"]

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
    "selection",  # 0: curvature_mass, 1: factor_truncation, 2: ekfac_mass
)
META_INDEX = {name: i for i, name in enumerate(META_FIELDS)}
_SELECTION_CODES = {name: code for code, name in enumerate(SELECTIONS)}
# how the corrected eigenvalues that selection="ekfac_mass" needs are measured
MEASURE_EKFAC = Fix(python="fit_eigen_correction(model, data, factors_folder)",
                    cli="hf-curvedit fit --ekfac with the same --output-dir")


@dataclass
class CurvatureEdit:
    """The result of editing one weight: ``W' = B Qᵀ`` (``q_side="input"``) or ``W' = Q Bᵀ`` (``"output"``).

    Attributes:
        Q: orthonormal columns, ``(d_in, k)`` or ``(d_out, k)``.
        B: the other factor, ``(d_out, k)`` or ``(d_in, k)``.
        q_side: which space Q spans, ``"input"`` or ``"output"``.
        cutoffs: int64 ``(d_out,)``, the kept staircase: row i of ``C`` keeps columns ``j < cutoffs[i]`` (with
            ``selection="ekfac_mass"``, whose kept set is no staircase: how many components row i keeps).
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
            raise InputError(f"q_side must be 'input' or 'output', got {q_side!r}")
        q_dim, b_dim = (d_in, d_out) if q_side == "input" else (d_out, d_in)
        return cls(Q=torch.zeros(q_dim, rank, dtype=dtype), B=torch.zeros(b_dim, rank, dtype=dtype), q_side=q_side,
                   cutoffs=torch.zeros(d_out, dtype=torch.int64),
                   meta=torch.zeros(len(META_FIELDS), dtype=torch.float64),
                   fingerprint=torch.zeros(FINGERPRINT_SIZE, dtype=torch.float64))


def _check_shape(eigen: ModuleEigen, d_out: int, d_in: int, what: str = "the eigenbasis") -> None:
    if eigen.shape != (d_out, d_in):
        raise InputError(
            f"{what} is for a ({eigen.shape[0]}, {eigen.shape[1]}) weight but the module's weight is "
            f"({d_out}, {d_in}) (d_out, d_in); the factors were collected on a different model"
        )


class _KeptSpace:
    """One selection's kept components ``{U_G (M ∘ c) U_Aᵀ}`` as a subspace of ``(d_out, d_in)`` matrices (float64)."""

    def __init__(self, eigen: ModuleEigen, keep_mass: float, selection: Selection, device: torch.device):
        if selection == "ekfac_mass":
            if eigen.eigvals_corrected is None:
                raise InputError(
                    "selection='ekfac_mass' needs EK-FAC corrected eigenvalues, and these factors have none. Measure "
                    f"them first: {MEASURE_EKFAC}")
            self.st: Staircase | CorrectedSelection = corrected_mass_selection(eigen.eigvals_corrected, keep_mass)
            rows, cols = self.st.rows, self.st.columns
            self.mask = self.st.mask[rows][:, cols].to(device)
        else:
            self.st = select_cutoffs(eigen.eigvals_G, eigen.eigvals_A, keep_mass, selection)
            rows, cols = slice(0, self.st.r), slice(0, self.st.s)
            self.mask = torch.arange(self.st.s, device=device)[None, :] < self.st.cutoffs.to(device)[:self.st.r, None]
        # the kept rows and columns: a prefix of each basis for a staircase, any subset for EK-FAC
        self.UG = eigen.eigvecs_G[:, rows].to(device, torch.float64)
        self.UA = eigen.eigvecs_A[:, cols].to(device, torch.float64)

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
        meta[META_INDEX[name]] = value
    return CurvatureEdit(
        Q=Q.to(dtype).contiguous(), B=B.to(dtype).contiguous(), q_side=q_side, cutoffs=st.cutoffs.to(torch.int64),
        meta=meta, fingerprint=weight_fingerprint(weight), protected=protected,
    )


def q_side_of(meta: torch.Tensor) -> str:
    """The side of Q recorded in a `META_FIELDS` vector: ``"input"`` or ``"output"``."""
    return "output" if float(meta.reshape(-1)[META_INDEX["q_side_output"]]) > 0.5 else "input"
