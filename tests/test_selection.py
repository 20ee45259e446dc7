"""Staircase selection against a brute-force sort of all products."""

from __future__ import annotations

import pytest
import torch
from testing_utils import brute_force_mask

from hf_curvedit.selection import (
    curvature_mass_cutoffs,
    factor_truncation_cutoffs,
    select_cutoffs,
)


def _sorted_desc(x: torch.Tensor) -> torch.Tensor:
    return torch.sort(x.double(), descending=True).values


def _check(lam, mu, rho):
    st = curvature_mass_cutoffs(lam, mu, rho)
    expected = brute_force_mask(lam, mu, rho)
    got = st.mask()
    assert torch.equal(got, expected), f"rho={rho}: {int((got != expected).sum())} components differ"
    # staircase shape, summary numbers consistent with the mask
    assert (st.cutoffs[1:] <= st.cutoffs[:-1]).all()
    assert st.kept_components == int(expected.sum())
    assert st.r == int(expected.any(1).sum())
    assert st.s == int(expected[0].sum())
    kept_mass = float((lam.double()[:, None] * mu.double()[None, :])[expected].sum())
    assert st.kept_mass == pytest.approx(kept_mass, rel=1e-12)
    if rho < 1.0:
        assert st.kept_mass >= rho * st.total_mass * (1 - 1e-12)
    return st


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("rho", [0.05, 0.3, 0.6, 0.9, 0.999])
def test_random_spectra_match_brute_force(seed, rho):
    g = torch.Generator().manual_seed(seed)
    d_out, d_in = 5 + 7 * seed, 3 + 11 * seed
    lam = _sorted_desc(torch.rand(d_out, generator=g) ** 4)  # spread spectra like real factors
    mu = _sorted_desc(torch.rand(d_in, generator=g) ** 4)
    _check(lam, mu, rho)


@pytest.mark.parametrize("rho", [0.1, 0.25, 0.5, 0.5 + 1e-9, 0.75, 0.9, 1.0])
def test_integer_spectra_with_many_ties(rho):
    # small integers: every product and every partial sum is exact, so ties are exact ties
    lam = torch.tensor([4, 4, 2, 2, 2, 1, 1, 0], dtype=torch.float64)
    mu = torch.tensor([8, 4, 4, 2, 1, 1, 1, 0, 0], dtype=torch.float64)
    _check(lam, mu, rho)


def test_tie_rule_is_row_major():
    # all products equal: the first components in row-major order are kept
    lam = torch.ones(3, dtype=torch.float64)
    mu = torch.ones(4, dtype=torch.float64)
    st = curvature_mass_cutoffs(lam, mu, 0.5)  # needs 6 of 12
    assert st.cutoffs.tolist() == [4, 2, 0]
    st = curvature_mass_cutoffs(lam, mu, 5 / 12)  # exactly 5 of 12 reach the mass; the 5th is kept
    assert st.cutoffs.tolist() == [4, 1, 0]


def test_huge_tie_group_uses_counting_path():
    # 360k equal products exceed the enumeration band: the tie-counting path must agree with brute force
    lam = torch.ones(600, dtype=torch.float64)
    mu = torch.ones(600, dtype=torch.float64)
    for rho in (0.3, 0.77):
        _check(lam, mu, rho)


def test_rho_one_keeps_all_positive_products_and_zero_eigenvalues_never():
    lam = torch.tensor([3.0, 2.0, 0.0, 0.0], dtype=torch.float64)
    mu = torch.tensor([5.0, 1e-300, 0.0], dtype=torch.float64)
    st = _check(lam, mu, 1.0)
    assert st.cutoffs.tolist() == [2, 2, 0, 0]
    assert st.kept_mass_fraction == pytest.approx(1.0)


def test_rho_near_zero_keeps_only_the_top_component():
    g = torch.Generator().manual_seed(1)
    lam = _sorted_desc(torch.rand(20, generator=g))
    mu = _sorted_desc(torch.rand(30, generator=g))
    st = _check(lam, mu, 1e-12)
    assert st.kept_components == 1 and st.cutoffs[0] == 1


def test_invalid_inputs_are_refused_with_clear_errors():
    lam = torch.tensor([2.0, 1.0], dtype=torch.float64)
    with pytest.raises(ValueError, match="keep_mass"):
        curvature_mass_cutoffs(lam, lam, 0.0)
    with pytest.raises(ValueError, match="descending"):
        curvature_mass_cutoffs(torch.tensor([1.0, 2.0]), lam, 0.5)
    with pytest.raises(ValueError, match="negative"):
        curvature_mass_cutoffs(torch.tensor([1.0, -1.0]), lam, 0.5)
    with pytest.raises(ValueError, match="zero"):
        curvature_mass_cutoffs(torch.zeros(3), lam, 0.5)
    with pytest.raises(ValueError, match="unknown selection"):
        select_cutoffs(lam, lam, 0.5, "heap")


def test_large_layer_selection_is_minimal():
    # spectra of an 11008 x 4096 layer (LLaMA-7B up_proj); its speed is measured by benchmarks/scale_7b.py
    g = torch.Generator().manual_seed(0)
    lam = _sorted_desc(torch.rand(11008, generator=g, dtype=torch.float64) ** 6)
    mu = _sorted_desc(torch.rand(4096, generator=g, dtype=torch.float64) ** 6)
    st = curvature_mass_cutoffs(lam, mu, 0.6)
    assert st.kept_mass >= 0.6 * st.total_mass * (1 - 1e-12)
    # the previous (lighter) product is below the threshold: the set is minimal
    prefix = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(mu, 0)])
    assert float((lam * prefix[st.cutoffs]).sum()) == pytest.approx(st.kept_mass, rel=1e-12)
    smallest_kept = min(float(lam[i] * mu[st.cutoffs[i] - 1]) for i in range(st.r))
    assert st.kept_mass - smallest_kept < 0.6 * st.total_mass


@pytest.mark.parametrize("rho", [0.3, 0.8, 1.0])
def test_factor_truncation_matches_definition(rho):
    g = torch.Generator().manual_seed(3)
    lam = _sorted_desc(torch.rand(17, generator=g))
    mu = _sorted_desc(torch.rand(9, generator=g))
    st = factor_truncation_cutoffs(lam, mu, rho)
    r = int(torch.nonzero(torch.cumsum(lam, 0) >= rho * lam.sum() * (1 - 1e-12))[0]) + 1
    s = int(torch.nonzero(torch.cumsum(mu, 0) >= rho * mu.sum() * (1 - 1e-12))[0]) + 1
    assert (st.r, st.s) == (r, s)
    assert st.cutoffs[:r].eq(s).all() and st.cutoffs[r:].eq(0).all()
    assert st.kept_components == r * s
    assert select_cutoffs(lam, mu, rho, "factor_truncation").cutoffs.equal(st.cutoffs)


def test_staircase_from_saved_cutoffs_equals_the_selection():
    from hf_curvedit.selection import staircase_from_cutoffs

    g = torch.Generator().manual_seed(5)
    lam = torch.rand(40, generator=g, dtype=torch.float64).sort(descending=True).values
    mu = torch.rand(25, generator=g, dtype=torch.float64).sort(descending=True).values
    for rho in (0.3, 0.6, 0.9):
        for selection in ("curvature_mass", "factor_truncation"):
            st = select_cutoffs(lam, mu, rho, selection)
            again = staircase_from_cutoffs(st.cutoffs, lam, mu)
            assert torch.equal(again.cutoffs, st.cutoffs)
            assert (again.r, again.s, again.kept_components) == (st.r, st.s, st.kept_components)
            assert again.kept_mass == pytest.approx(st.kept_mass, rel=1e-12)
            if selection == "curvature_mass":
                assert again.threshold == st.threshold
    with pytest.raises(ValueError, match="non-increasing"):
        staircase_from_cutoffs(torch.arange(40), lam, mu)
