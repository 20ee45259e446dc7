"""PNG plots for model cards and runs: curvature spectra with the ρ cut, recitation against perplexity over ρ, and the
trade-off of a sweep (curvature edits against the SVD-truncation baseline).

Figures are drawn with matplotlib's object API on an Agg canvas, so no global backend or pyplot state is touched;
matplotlib is imported on the first plot only.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..curvature.eigen import ModuleEigen
from ..errors import InputError
from ..evaluation.report import EditReport
from ..selection import (
    CorrectedSelection,
    Selection,
    Staircase,
    corrected_mass_selection,
    select_cutoffs,
    staircase_from_cutoffs,
)
from ..utils import atomic_path, strip_wrapper_prefix

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from ..sweep import SweepResult


def _figure(**kwargs: Any) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path, **kwargs: Any) -> Path:
    with atomic_path(path) as tmp:  # a kill mid-write leaves the old picture or none, never half of one
        fig.savefig(tmp, format="png", **{"dpi": 110, "bbox_inches": "tight", **kwargs})
    return Path(path)


def safe_filename(module: str) -> str:
    """A file-name-safe version of a module name (``model.layers.2.mlp.up_proj`` stays readable)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", module)


def plot_spectrum(eigen: ModuleEigen, keep_mass: float, path: str | Path, *, module: str = "",
                  selection: Selection = "curvature_mass",
                  cutoffs: torch.Tensor | None = None) -> tuple[Path, Staircase | CorrectedSelection]:
    """Plot one module's K-FAC spectra with the ρ cut and the kept staircase; write a PNG.

    Left: eigenvalues λ of G and μ of A (descending, log scale) with the cut at ``r`` rows of G and ``s`` columns of
    A. Right: the kept set in the (i, j) component grid, ``k_i`` columns kept in row ``i``.

    Args:
        cutoffs: the staircase an edit kept (an adapter's ``curvedit_cutoffs``); drawn as saved. Without it the
            staircase is selected again from the spectra with ``keep_mass`` and ``selection``.

    Returns:
        The PNG path and the `Staircase` the cut was drawn from.
    """
    lam = eigen.eigvals_G.detach().double().cpu()
    mu = eigen.eigvals_A.detach().double().cpu()
    if selection == "ekfac_mass":
        return _plot_corrected(eigen, lam, mu, keep_mass, Path(path), module, cutoffs)
    st = (staircase_from_cutoffs(cutoffs, lam, mu) if cutoffs is not None
          else select_cutoffs(lam, mu, keep_mass, selection))
    fig = _figure(figsize=(10, 3.6))
    ax, ax2 = fig.subplots(1, 2)
    _spectra_panel(ax, lam, mu, f"{module or 'module'}: spectra, ρ = {keep_mass:g}", cuts=(st.r, st.s))
    cut = st.cutoffs.detach().cpu().numpy()
    rows = np.arange(len(cut))
    ax2.fill_betweenx(rows, 0, cut, step="post", color="tab:green", alpha=0.5,
                      label=f"kept: {st.kept_components} / {st.total_components} components")
    ax2.set_xlim(0, len(mu))
    ax2.set_ylim(len(lam), 0)
    ax2.set_xlabel("j (A eigenvector)")
    ax2.set_ylabel("i (G eigenvector)")
    ax2.set_title(f"kept mass {st.kept_mass_fraction:.3f}, rank ≤ {st.k}", fontsize=9)
    ax2.legend(fontsize=8, loc="lower right")
    return _save(fig, Path(path)), st


def _spectra_panel(ax: Any, lam: torch.Tensor, mu: torch.Tensor, title: str,
                   cuts: tuple[int, int] | None = None) -> None:
    """The two eigenvalue spectra (descending, log scale), with the cut at ``r`` rows of G and ``s`` columns of A when
    the kept set is a staircase."""
    floor = 1e-12 * max(float(lam.max()), float(mu.max()), 1e-300)
    for side, (values, label, color) in enumerate(((lam, "λ (G, output side)", "tab:blue"),
                                                   (mu, "μ (A, input side)", "tab:orange"))):
        v = np.clip(values.numpy(), floor, None)
        if cuts is not None:
            label = f"{label}, cut at {cuts[side]}"
            ax.axvline(cuts[side] + 0.5, color=color, linestyle="--", linewidth=1)
        ax.semilogy(np.arange(1, len(v) + 1), v, color=color, label=label)
    ax.set_xlabel("eigenvalue index (descending)")
    ax.set_ylabel("eigenvalue")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)


def _plot_corrected(eigen: ModuleEigen, lam: torch.Tensor, mu: torch.Tensor, keep_mass: float, path: Path,
                    module: str, counts: torch.Tensor | None) -> tuple[Path, Any]:
    """The spectra, and the components an EK-FAC selection kept: the kept set itself when the corrected eigenvalues
    are at hand, else how many components each row kept (the adapter's ``curvedit_cutoffs`` of such an edit)."""
    fig = _figure(figsize=(10, 3.6))
    ax, ax2 = fig.subplots(1, 2)
    _spectra_panel(ax, lam, mu, f"{module or 'module'}: spectra, ρ = {keep_mass:g} of the EK-FAC mass")
    result: Any = None
    if eigen.eigvals_corrected is not None:
        result = corrected_mass_selection(eigen.eigvals_corrected, keep_mass)
        ax2.imshow(result.mask.numpy(), aspect="auto", cmap="Greens", interpolation="nearest", vmin=0, vmax=1.6)
        ax2.set_title(f"kept {result.kept_components} / {result.total_components} components (EK-FAC Λ), "
                      f"rank ≤ {result.k}", fontsize=9)
        ax2.set_xlabel("j (A eigenvector)")
    else:
        per_row = (counts if counts is not None else torch.zeros(len(lam))).detach().cpu().numpy()
        ax2.barh(np.arange(len(per_row)), per_row, height=1.0, color="tab:green", alpha=0.6)
        ax2.set_xlim(0, len(mu))
        ax2.set_ylim(len(lam), 0)
        ax2.set_title(f"components kept per row (EK-FAC Λ): {int(per_row.sum())} / {len(lam) * len(mu)}",
                      fontsize=9)
        ax2.set_xlabel("components kept")
    ax2.set_ylabel("i (G eigenvector)")
    return _save(fig, path), result


def plot_tradeoff(reports: Mapping[float, EditReport], path: str | Path, *,
                  perplexity_set: str | None = None) -> Path:
    """Plot recitation (Strict, per recitation set) against perplexity over several ρ; write a PNG.

    Args:
        reports: one [`EditReport`] per ρ, keyed by ρ. Each needs a perplexity set and at least one recitation set.
        path: where the PNG goes.
        perplexity_set: which perplexity set is the x axis; the first one of the first report by default.

    Raises:
        ValueError: with fewer than two reports, or when the reports lack perplexity or recitation.
    """
    if len(reports) < 2:
        raise InputError(f"a recitation/perplexity trade-off needs reports for at least two ρ, got {len(reports)}")
    items = sorted(reports.items())
    first = items[0][1]
    if not first.perplexity or not first.recitation:
        raise InputError("the reports need a perplexity set and a recitation set to plot the trade-off")
    ppl_set = perplexity_set or next(iter(first.perplexity))
    fig = _figure(figsize=(5.5, 4))
    ax = fig.subplots()
    for set_name in first.recitation:
        xs, ys, rhos = [], [], []
        for rho, rep in items:
            if set_name not in rep.recitation or ppl_set not in rep.perplexity:
                raise InputError(f"the report for ρ = {rho} has no recitation set {set_name!r} or perplexity set "
                                 f"{ppl_set!r}; evaluate every ρ on the same sets")
            xs.append(rep.perplexity[ppl_set].edited.perplexity)
            ys.append(100 * rep.recitation[set_name].edited.strict)
            rhos.append(rho)
        line, = ax.plot(xs, ys, marker="o", label=f"{set_name} (edited)")
        for x, y, rho in zip(xs, ys, rhos):
            ax.annotate(f"ρ={rho:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.scatter([first.perplexity[ppl_set].base.perplexity], [100 * first.recitation[set_name].base.strict],
                   marker="*", s=120, color=line.get_color(), label=f"{set_name} (base)")
    ax.set_xlabel(f"perplexity on {ppl_set}")
    ax.set_ylabel("Strict recitation (%)")
    ax.set_title("Recitation against perplexity over ρ", fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, Path(path))


def plot_sweep(result: SweepResult, path: str | Path) -> Path:
    """Plot a sweep: Strict recitation on its primary set against the held-out perplexity change, one point per
    curvature edit (the allocation search's candidates apart) and per baseline setting (SVD rank, BalancedSubnet
    ratio), the chosen edit circled, each baseline's matched point squared, and the perplexity budget dashed; write a
    PNG."""
    fig = _figure(figsize=(6, 4))
    ax = fig.subplots()
    s = result.primary_set
    kinds = (("curvedit", "o", "curvature edit"), ("searched", "D", "curvature edit, ρ per layer (search)"),
             ("svd", "x", "SVD truncation"), ("balanced_subnet", "^", "BalancedSubnet"))
    for method, marker, label in kinds:
        pts = [p for p in result.points if ("searched" if p.search_round is not None else p.method) == method]
        if pts:
            ax.scatter([100 * p.perplexity_change for p in pts], [100 * p.recitation[s]["strict"] for p in pts],
                       marker=marker, label=label)
    if result.matches:
        ms = list(result.matches.values())
        ax.scatter([100 * p.perplexity_change for p in ms], [100 * p.recitation[s]["strict"] for p in ms], s=160,
                   marker="s", facecolors="none", edgecolors="black", label="baseline at matched perplexity")
    if result.chosen is not None:
        ax.scatter([100 * result.chosen.perplexity_change], [100 * result.chosen.recitation[s]["strict"]],
                   s=160, facecolors="none", edgecolors="red", label="chosen")
    ax.axvline(100 * result.perplexity_budget, color="grey", ls="--", lw=1, label="perplexity budget")
    if max(abs(p.perplexity_change) for p in result.points or [result.base]) > 20 * result.perplexity_budget:
        # a ρ scale fitted to the model spans orders of magnitude of perplexity: linear near the budget, log beyond
        ax.set_xscale("symlog", linthresh=100 * result.perplexity_budget)
    ax.set_xlabel("held-out perplexity change (%)")
    ax.set_ylabel(f"Strict recitation on {s} (%)")
    ax.legend()
    fig.tight_layout()
    return _save(fig, Path(path), dpi=120, bbox_inches=None)


def eigen_for_module(eigen: Mapping[str, ModuleEigen], module: str) -> ModuleEigen | None:
    """Find `module` in `eigen`, with wrapper prefixes (PEFT's ``base_model.model.``, torch.compile's
    ``_orig_mod.``) removed on either side; None when it has no eigenbasis."""
    if module in eigen:
        return eigen[module]
    key = strip_wrapper_prefix(module)
    if key in eigen:
        return eigen[key]
    for name in eigen:
        if strip_wrapper_prefix(name) == key:
            return eigen[name]
    return None


__all__ = ["plot_spectrum", "plot_sweep", "plot_tradeoff", "safe_filename", "eigen_for_module"]
