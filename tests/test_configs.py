"""The public configs take None for every optional setting and give it its default, as PEFT's configs do."""

from __future__ import annotations

import dataclasses

import pytest

from hf_curvedit import (
    CapabilityConfig,
    CardOptions,
    CurvatureEditConfig,
    EvalConfig,
    FactorConfig,
    HubOptions,
    SweepConfig,
)
from hf_curvedit.baselines import BalancedSubnetConfig

REQUIRED = {CapabilityConfig: {"tasks": ["curvedit_logic"]}}
CONFIGS = [CurvatureEditConfig, FactorConfig, SweepConfig, CapabilityConfig, EvalConfig, BalancedSubnetConfig,
           CardOptions, HubOptions]


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_field_given_as_none_takes_its_default(cls):
    base = REQUIRED.get(cls, {})
    reference = cls(**base)
    for f in dataclasses.fields(cls):
        if f.name in base or not f.init:
            continue
        config = cls(**{**base, f.name: None})  # raised AttributeError/TypeError for mappings, tuples and numbers
        assert getattr(config, f.name) == getattr(reference, f.name), f.name


def test_an_unset_keep_mass_pattern_edits_with_the_global_rho():
    config = CurvatureEditConfig(keep_mass=0.99, keep_mass_pattern=None, target_modules=r".*mlp\.up_proj")
    assert config.keep_mass_pattern == {} and config.keep_mass_for("model.layers.0.mlp.up_proj") == 0.99
