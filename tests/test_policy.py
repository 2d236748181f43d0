"""Policy precedence: module name > glob > kind > global config; None and filter_fn skip."""

from __future__ import annotations

import pytest
import torch.fx as fx

from tests.toy_pass import ToyScalePointwise

from fxslim.passes.base import parse_overrides
from fxslim.passes.haste import HASTE
from fxslim.policy import Policy

NODE = fx.Graph().placeholder("x")
BASE = ToyScalePointwise(scale=1.0)


def test_policy_precedence_module_over_glob_over_kind():
    policy = Policy(overrides={
        "layer1.0": ToyScalePointwise(scale=2.0),
        "layer1.*": ToyScalePointwise(scale=3.0),
        "kind:pointwise_conv": ToyScalePointwise(scale=4.0),
    })
    assert policy.resolve(BASE, NODE, "layer1.0", "pointwise_conv")[0].scale == 2.0
    assert policy.resolve(BASE, NODE, "layer1.1", "pointwise_conv")[0].scale == 3.0
    assert policy.resolve(BASE, NODE, "layer2.0", "pointwise_conv")[0].scale == 4.0
    assert policy.resolve(BASE, NODE, "layer2.0", "conv")[0] is BASE


def test_policy_none_override_and_filter_fn_skip_with_reason():
    policy = Policy(overrides={"head": None})
    assert policy.resolve(BASE, NODE, "head", "pointwise_conv") == (None, "filtered_out")
    policy = Policy(filter_fn=lambda node, fqn: not fqn.startswith("stem"))
    assert policy.resolve(BASE, NODE, "stem.0", "conv") == (None, "filtered_out")
    assert policy.resolve(BASE, NODE, "body.0", "conv") == (BASE, "")


def test_policy_overrides_for_other_passes_do_not_apply():
    policy = Policy(overrides={"head": HASTE(L=4)})
    assert policy.resolve(BASE, NODE, "head", "conv") == (BASE, "")


def test_policy_override_strings_parse_and_other_values_raise():
    """A string override ("haste:L=4", as passes= takes) was silently ignored."""
    assert Policy(overrides=parse_overrides({"head": "haste:L=4"})).overrides["head"] == HASTE(L=4)
    with pytest.raises(ValueError, match=r"overrides\['head'\]: expected a pass config .* got int"):
        Policy(overrides={"head": 4})
    with pytest.raises(ValueError, match=r"overrides\['head'\]: expected a pass config .* got str"):
        Policy(overrides={"head": "haste:L=4"})  # unparsed: optimize and the backend parse first
    with pytest.raises(ValueError, match="unknown pass 'hast'"):
        parse_overrides({"head": "hast:L=4"})


def test_policy_bad_arguments_raise_type_error():
    with pytest.raises(TypeError, match="filter_fn"):
        Policy(filter_fn=3)
    with pytest.raises(TypeError, match="overrides"):
        Policy(overrides=[("a", None)])
