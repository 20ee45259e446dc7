"""Which eigen-components of a weight to keep: staircase cutoffs from curvature mass (docs/method.md §4).

Component ``(i, j)`` of a weight in the K-FAC eigenbasis has curvature ``Π_ij = λ_i μ_j`` (λ: eigenvalues of the
output-side factor G, rows; μ: eigenvalues of the input-side factor A, columns; both sorted descending). The kept set is
the *smallest* set of components, taken in descending ``Π``, whose mass reaches ``ρ · total``. Because both spectra are
sorted, that set is a staircase: row ``i`` keeps columns ``j < k_i`` with ``k_i`` non-increasing, so it is described by
the cutoff vector ``k`` alone.

Tie rule: components are ordered by ``Π`` descending, then row ``i`` ascending, then column ``j`` ascending (row-major
among equal products). Every order of the tied components needs the same number of them (they all carry the same
mass), and the row-major rule keeps the staircase shape. Products are float64 ``λ_i * μ_j``, compared exactly.

The search never materialises the ``d_out · d_in`` products: it bisects the threshold over the bit patterns of positive
doubles (ordered like the values), counts per row with ``searchsorted`` and gets the mass from prefix sums of μ;
only the
few products in the final band around the threshold are enumerated and sorted. The arithmetic runs in NumPy: these are
many small vector operations, where torch's intra-op threading costs more than the work (10-20x on a busy 2-core box).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import torch

from .errors import InputError

__all__ = ["SELECTIONS", "CorrectedSelection", "Selection", "Staircase", "corrected_mass_selection",
           "curvature_mass_cutoffs", "factor_truncation_cutoffs", "select_cutoffs", "staircase_from_cutoffs"]

# The selection variants: the paper's staircase on λ_i μ_j, per-factor eigenvalue truncation, and the components of
# largest EK-FAC corrected curvature Λ_ij (any set, not a staircase).
Selection = Literal["curvature_mass", "factor_truncation", "ekfac_mass"]
SELECTIONS: tuple[str, ...] = get_args(Selection)

# Products in the final threshold band are enumerated and sorted when there are at most this many of them.
_BAND_LIMIT = 1 << 18


@dataclass
class Staircase:
    """The kept set of one module, as staircase cutoffs.

    Attributes:
        cutoffs (`torch.LongTensor` of shape `(d_out,)`): row ``i`` keeps columns ``j < cutoffs[i]``; non-increasing.
        r (`int`): number of rows that keep something.
        s (`int`): length of the longest row, ``cutoffs[0]``.
        kept_components (`int`): ``cutoffs.sum()``.
        total_components (`int`): ``d_out * d_in``.
        kept_mass (`float`): curvature mass of the kept components.
        total_mass (`float`): ``(Σλ)(Σμ)``.
        threshold (`float`): the smallest kept product (0 if nothing is kept).
    """

    cutoffs: torch.Tensor
    r: int
    s: int
    kept_components: int
    total_components: int
    kept_mass: float
    total_mass: float
    threshold: float

    @property
    def k(self) -> int:
        """Upper bound on the rank of the edited weight, ``min(r, s)``."""
        return min(self.r, self.s)

    @property
    def kept_fraction(self) -> float:
        """Fraction of components kept."""
        return self.kept_components / self.total_components if self.total_components else 0.0

    @property
    def kept_mass_fraction(self) -> float:
        """Fraction of the curvature mass kept."""
        return self.kept_mass / self.total_mass if self.total_mass > 0 else 0.0

    def mask(self) -> torch.Tensor:
        """Dense ``(d_out, d_in)`` boolean mask of the kept components (for tests and small layers)."""
        d_in = self.total_components // max(self.cutoffs.numel(), 1)
        return torch.arange(d_in)[None, :] < self.cutoffs[:, None]


def _check_spectrum(values: torch.Tensor, name: str) -> np.ndarray:
    v = torch.as_tensor(values).detach().to("cpu", torch.float64).reshape(-1).numpy()
    if v.size == 0:
        raise InputError(f"{name} is empty; a layer needs at least one eigenvalue per side")
    if not np.isfinite(v).all():
        raise InputError(f"{name} contains NaN or inf; recompute the eigendecomposition of the factor")
    if (v < 0).any():
        # eigen.symmetric_eigh clamps at 0; a negative value here means the caller skipped it
        raise InputError(f"{name} has negative eigenvalues (min {v.min():.3g}); clamp them at 0 first")
    if v.size > 1 and (v[1:] > v[:-1]).any():
        raise InputError(f"{name} must be sorted in descending order (as returned by symmetric_eigh)")
    return v


def _summary(cutoffs: np.ndarray, lam: np.ndarray, mu: np.ndarray, threshold: float) -> Staircase:
    prefix = np.concatenate([[0.0], np.cumsum(mu)])
    cutoffs = np.asarray(cutoffs, dtype=np.int64)
    return Staircase(
        cutoffs=torch.from_numpy(cutoffs.copy()),
        r=int((cutoffs > 0).sum()),
        s=int(cutoffs[0]) if cutoffs.size else 0,
        kept_components=int(cutoffs.sum()),
        total_components=int(lam.size * mu.size),
        kept_mass=float((lam * prefix[cutoffs]).sum()),
        total_mass=float(lam.sum() * mu.sum()),
        threshold=threshold,
    )


class _Counter:
    """Per-row counts ``#{j : λ_i μ_j > v}`` and their mass, exact with respect to float64 products."""

    def __init__(self, lam: np.ndarray, mu: np.ndarray):
        self.lam = lam
        self.mu = mu
        self.neg_mu = -mu  # ascending, for searchsorted
        self.n = mu.size
        self.prefix = np.concatenate([[0.0], np.cumsum(mu)])
        # μ padded with -1 so that index n reads as "no column" (a product that is never > v ≥ 0)
        self.mu_pad = np.concatenate([mu, [-1.0]])
        with np.errstate(divide="ignore"):
            self.inv_lam = np.where(self.lam > 0, 1.0 / np.where(self.lam > 0, self.lam, 1.0), np.inf)

    def counts(self, v: float) -> np.ndarray:
        lam, mu = self.lam, self.mu
        # first guess by division; rounding can put it off by a block of equal μ, so it is corrected below
        c = np.searchsorted(self.neg_mu, -(v * self.inv_lam), side="left")
        for _ in range(64):
            under = (c < self.n) & (lam * self.mu_pad[c] > v)
            over = (c > 0) & (lam * self.mu_pad[np.maximum(c - 1, 0)] <= v)
            any_under, any_over = under.any(), over.any()
            if not (any_under or any_over):
                return c
            if any_under:
                c[under] = np.searchsorted(self.neg_mu, -mu[c[under]], side="right")
            if any_over:
                c[over] = np.searchsorted(self.neg_mu, -mu[c[over] - 1], side="left")
        raise RuntimeError("staircase count correction did not converge; please report this with the spectra")

    def mass(self, c: np.ndarray) -> float:
        return float((self.lam * self.prefix[c]).sum())


def _bits(x: float) -> int:
    return int(np.array([x], dtype=np.float64).view(np.int64)[0])


def _from_bits(b: int) -> float:
    return float(np.array([b], dtype=np.int64).view(np.float64)[0])


def curvature_mass_cutoffs(eigvals_G: torch.Tensor, eigvals_A: torch.Tensor, keep_mass: float) -> Staircase:
    """Staircase cutoffs of the smallest set of components, in descending ``λ_i μ_j``, whose mass reaches ``ρ·total``.

    The component that crosses the threshold is kept. Ties are broken row-major (see the module docstring).
    Components with a zero product carry no mass and are never kept.

    Args:
        eigvals_G (`torch.Tensor` of shape `(d_out,)`): eigenvalues λ of the output-side factor, descending, ≥ 0.
        eigvals_A (`torch.Tensor` of shape `(d_in,)`): eigenvalues μ of the input-side factor, descending, ≥ 0.
        keep_mass (`float`): ρ in ``(0, 1]``.

    Returns:
        [`Staircase`]: the cutoffs and summary numbers.
    """
    if not (0.0 < float(keep_mass) <= 1.0):
        raise InputError(f"keep_mass must be in (0, 1], got {keep_mass}")
    lam = _check_spectrum(eigvals_G, "eigvals_G")
    mu = _check_spectrum(eigvals_A, "eigvals_A")
    lam_pos, mu_pos = lam[lam > 0], mu[mu > 0]
    if lam_pos.size == 0 or mu_pos.size == 0:
        raise InputError(
            "the total curvature mass is zero (all eigenvalues of A or of G are 0), so no component can be "
            "ranked; the factors were probably collected on no tokens or on a dead layer"
        )
    counter = _Counter(lam, mu)
    # every positive product is > lo: half the smallest positive product
    lo = float(lam_pos.min() * mu_pos.min()) * 0.5
    c_lo = counter.counts(lo)
    total = counter.mass(c_lo)  # the same arithmetic as every other mass below, so ρ = 1 is reachable exactly
    if float(keep_mass) >= 1.0:
        return _summary(c_lo, lam, mu, float(lam_pos[-1] * mu_pos[-1]))
    target = float(keep_mass) * total

    # Invariant: mass(> lo) ≥ target (enough) and mass(> hi) < target (not enough).
    hi = float(lam[0] * mu[0])
    c_hi = counter.counts(hi)  # all zeros
    lo_b, hi_b = _bits(lo), _bits(hi)
    while hi_b - lo_b > 1 and int((c_lo - c_hi).sum()) > _BAND_LIMIT:
        mid = _from_bits((lo_b + hi_b) // 2)
        c_mid = counter.counts(mid)
        if counter.mass(c_mid) >= target:
            lo_b, c_lo = _bits(mid), c_mid
        else:
            hi_b, c_hi = _bits(mid), c_mid
    hi = _from_bits(hi_b)
    base_mass = counter.mass(c_hi)
    lengths = c_lo - c_hi
    n_band = int(lengths.sum())
    starts = np.cumsum(lengths) - lengths

    if n_band > _BAND_LIMIT:
        # lo and hi are adjacent doubles: the whole band is one value (= hi), a tie group. The number needed does not
        # depend on which tied components are taken; take them row-major.
        need = max(int(np.ceil((target - base_mass) / hi)), 1)
        while need > 1 and base_mass + (need - 1) * hi >= target:
            need -= 1
        while base_mass + need * hi < target and need < n_band:
            need += 1
        take = np.minimum(np.maximum(need - starts, 0), lengths)
        return _summary(c_hi + take, lam, mu, hi)

    rows = np.repeat(np.arange(lam.size), lengths)
    cols = c_hi[rows] + (np.arange(n_band) - starts[rows])
    prods = lam[rows] * mu[cols]
    # generated row-major, so a stable sort on the product alone realises the documented tie rule
    order = np.argsort(-prods, kind="stable")
    cum = base_mass + np.cumsum(prods[order])
    hits = cum >= target
    n_take = int(np.argmax(hits)) + 1 if hits.any() else n_band  # the component that crosses is kept
    cutoffs = c_hi + np.bincount(rows[order[:n_take]], minlength=lam.size)
    return _summary(cutoffs, lam, mu, float(prods[order[n_take - 1]]))


def _mass_prefix_count(values: np.ndarray, fraction: float) -> int:
    total = float(values.sum())
    if total <= 0:
        raise InputError("the eigenvalue mass of a factor is zero; it cannot be truncated by mass")
    n_pos = int((values > 0).sum())
    if fraction >= 1.0:
        return n_pos
    cum = np.cumsum(values)
    return min(int(np.searchsorted(cum, fraction * total, side="left")) + 1, n_pos)


def factor_truncation_cutoffs(
    eigvals_G: torch.Tensor, eigvals_A: torch.Tensor, keep_mass_G: float, keep_mass_A: float | None = None
) -> Staircase:
    """Factor-truncation variant (docs/method.md §4): keep the top eigenvectors of G and of A separately.

    The top ``r`` eigenvectors of G are kept until ``Σ_{i<r} λ_i ≥ ρ_G Σλ`` (the one that crosses is kept), likewise
    ``s`` for A with ``ρ_A``; the edited weight is ``P_G W P_A``, a full ``r × s`` rectangle in the eigenbasis.

    Args:
        eigvals_G (`torch.Tensor`): λ, descending, ≥ 0.
        eigvals_A (`torch.Tensor`): μ, descending, ≥ 0.
        keep_mass_G (`float`): ρ_G in ``(0, 1]``.
        keep_mass_A (`float`, *optional*): ρ_A in ``(0, 1]``; defaults to ``keep_mass_G``.
    """
    keep_mass_A = keep_mass_G if keep_mass_A is None else keep_mass_A
    for name, v in (("keep_mass_G", keep_mass_G), ("keep_mass_A", keep_mass_A)):
        if not (0.0 < float(v) <= 1.0):
            raise InputError(f"{name} must be in (0, 1], got {v}")
    lam = _check_spectrum(eigvals_G, "eigvals_G")
    mu = _check_spectrum(eigvals_A, "eigvals_A")
    r = _mass_prefix_count(lam, float(keep_mass_G))
    s = _mass_prefix_count(mu, float(keep_mass_A))
    cutoffs = np.zeros(lam.size, dtype=np.int64)
    cutoffs[:r] = s
    return _summary(cutoffs, lam, mu, float(lam[r - 1] * mu[s - 1]))


def select_cutoffs(
    eigvals_G: torch.Tensor, eigvals_A: torch.Tensor, keep_mass: float, selection: Selection = "curvature_mass"
) -> Staircase:
    """Dispatch on the selection variant name used by [`CurvatureEditConfig`]."""
    if selection == "curvature_mass":
        return curvature_mass_cutoffs(eigvals_G, eigvals_A, keep_mass)
    if selection == "factor_truncation":
        return factor_truncation_cutoffs(eigvals_G, eigvals_A, keep_mass)
    if selection == "ekfac_mass":
        raise InputError("selection='ekfac_mass' ranks the measured curvature, not the eigenvalue products: use "
                         "corrected_mass_selection(eigen.eigvals_corrected, keep_mass)")
    raise InputError(f"unknown selection {selection!r}; use one of {SELECTIONS}")


def staircase_from_cutoffs(cutoffs: torch.Tensor, eigvals_G: torch.Tensor, eigvals_A: torch.Tensor) -> Staircase:
    """The `Staircase` of saved cutoffs (e.g. an adapter's ``curvedit_cutoffs``) on the spectra they were cut from.

    Reads what an edit kept instead of selecting again. ``threshold`` is the smallest kept product λ_i μ_j.
    """
    lam = _check_spectrum(eigvals_G, "eigvals_G")
    mu = _check_spectrum(eigvals_A, "eigvals_A")
    cut = np.asarray(torch.as_tensor(cutoffs).detach().cpu(), dtype=np.int64)
    if cut.shape != lam.shape or (cut < 0).any() or (cut > mu.size).any() or (np.diff(cut) > 0).any():
        raise InputError(f"cutoffs must be a non-increasing vector of {lam.size} counts in [0, {mu.size}] (one per "
                         f"eigenvalue of G); got shape {tuple(cut.shape)}")
    rows = np.nonzero(cut)[0]
    threshold = float(min(lam[i] * mu[cut[i] - 1] for i in rows)) if rows.size else 0.0
    return _summary(cut, lam, mu, threshold)


@dataclass
class CorrectedSelection:
    """The kept set of one module under ``selection="ekfac_mass"``: the components of largest corrected curvature
    ``Λ_ij``, which need not form a staircase.

    Attributes:
        mask (`torch.BoolTensor` of shape `(d_out, d_in)`): the kept components.
        kept_mass (`float`), total_mass (`float`): corrected curvature mass kept, and ``ΣΛ``.
        threshold (`float`): the smallest kept ``Λ`` (0 if nothing is kept).
    """

    mask: torch.Tensor
    kept_mass: float
    total_mass: float
    threshold: float

    @property
    def rows(self) -> torch.Tensor:
        """Indices of the rows (G eigenvectors) that keep something."""
        return self.mask.any(1).nonzero().squeeze(1)

    @property
    def columns(self) -> torch.Tensor:
        """Indices of the columns (A eigenvectors) that keep something."""
        return self.mask.any(0).nonzero().squeeze(1)

    @property
    def cutoffs(self) -> torch.Tensor:
        """Components kept per row (int64 ``(d_out,)``; a count, not a staircase cutoff)."""
        return self.mask.sum(1, dtype=torch.int64)

    @property
    def r(self) -> int:
        return int(self.mask.any(1).sum())

    @property
    def s(self) -> int:
        return int(self.mask.any(0).sum())

    k = Staircase.k

    @property
    def kept_components(self) -> int:
        return int(self.mask.sum())

    @property
    def total_components(self) -> int:
        return int(self.mask.numel())

    kept_fraction = Staircase.kept_fraction
    kept_mass_fraction = Staircase.kept_mass_fraction


def corrected_mass_selection(corrected: torch.Tensor, keep_mass: float) -> CorrectedSelection:
    """The smallest set of components, in descending corrected curvature ``Λ_ij``, whose mass reaches
    ``ρ · ΣΛ`` (the rule of `curvature_mass_cutoffs`, on measured rather than Kronecker-product curvature).

    The component that crosses the threshold is kept; ties are broken row-major; zero components are never kept.

    Args:
        corrected (`torch.Tensor` of shape `(d_out, d_in)`): ``Λ`` in the order of the module's eigenbasis, ≥ 0.
        keep_mass (`float`): ρ in ``(0, 1]``.
    """
    if not (0.0 < float(keep_mass) <= 1.0):
        raise InputError(f"keep_mass must be in (0, 1], got {keep_mass}")
    if corrected.dim() != 2:
        raise InputError(f"corrected eigenvalues must be a (d_out, d_in) matrix, got shape {tuple(corrected.shape)}")
    v = corrected.detach().to("cpu", torch.float64).reshape(-1).numpy()
    if not np.isfinite(v).all() or (v < 0).any():
        raise InputError("the corrected eigenvalues contain NaN, inf or negative values; measure them again "
                         "(fit_eigen_correction)")
    order = np.argsort(-v, kind="stable")  # stable on the row-major flat index: ties break row-major
    mass = np.cumsum(v[order])
    total = float(mass[-1]) if mass.size else 0.0
    if total <= 0:
        raise InputError("the total corrected curvature mass is zero, so no component can be ranked; the correction "
                         "was measured on no samples or on a dead layer")
    n = min(int(np.searchsorted(mass, keep_mass * total, side="left")) + 1, int((v > 0).sum()))
    flat = np.zeros(v.size, dtype=bool)
    flat[order[:n]] = True
    return CorrectedSelection(mask=torch.from_numpy(flat.reshape(corrected.shape)), kept_mass=float(mass[n - 1]),
                              total_mass=total, threshold=float(v[order[n - 1]]))
