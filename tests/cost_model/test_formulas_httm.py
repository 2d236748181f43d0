"""Cost formula of fxslim::httm_attention: hand arithmetic, FlopCounterMode, symbolic frames, the pass output."""

from __future__ import annotations

import pytest
import sympy
import torch
from torch.utils.flop_counter import FlopCounterMode

import fxslim
from fxslim.cost_model import Conventions, OpCall, TensorSpec
from fxslim.cost_model.formulas.aten import sdpa_cost
from fxslim.cost_model.formulas.httm import httm_attention_cost, httm_counts
from fxslim.models.vggt import vggt_tiny
from fxslim.runtime.httm import httm_kept_lengths, httm_layout

_OP = torch.ops.fxslim.httm_attention.default


pytestmark = pytest.mark.usefixtures("one_thread")


def _cost(b, h, n, d, dv=None, **kwargs):
    spec = TensorSpec((b, h, n, d), torch.float32)
    v = TensorSpec((b, h, n, dv or d), torch.float32)
    call = OpCall(_OP, (spec, spec, v), kwargs, TensorSpec((b, h, n, dv or d), torch.float32), Conventions())
    return httm_attention_cost(call)


def test_httm_cost_small_case_by_hand():
    # 2 frames x (5 special + 4 patches), n_s = n_t = 2: two blocks of 2 positions x 2 frames = 4 tokens.
    # Q removes round(0.5*4) = 2 per block -> 2 destinations, 2*2 pairs; K/V removes 1 -> 3 destinations, 1*3 pairs.
    # kept_q = 10 specials + 4 destinations + round(0.1 * 18) = 2 outliers = 16; kept_kv = 10 + 6 = 16.
    cost = _cost(1, 2, 18, 8, frames=2, tokens_per_frame=9, special_tokens=5, q_ratio=0.5, kv_ratio=0.25,
                 n_s=2, n_t=2, outlier_fraction=0.1)
    attention = 1 * 2 * 16 * 16 * (8 + 8)
    matching = 1 * 2 * 8 * (2 * 2 * 2 + 2 * 1 * 3)
    assert (cost.info["kept_q"], cost.info["kept_kv"]) == (16, 16)
    assert cost.macs == attention + matching == 8192 + 224
    # softmax + scale per reduced score (6 each) is only part of the elementwise work
    assert cost.elementwise > 2 * 16 * 16 * 6


@pytest.mark.parametrize("mode", ["headwise", "uniform", "global"])
@pytest.mark.parametrize("anchor", [False, True])
def test_httm_cost_equals_flop_counter_mode(mode, anchor):
    frames, p = 7, 5 + 20
    q = torch.empty(2, 3, frames * p, 16, device="meta")
    v = torch.empty(2, 3, frames * p, 8, device="meta")
    config = dict(special_tokens=5, q_ratio=0.9, kv_ratio=0.7, n_s=6, n_t=3, outlier_fraction=0.1,
                  anchor_first_frame=anchor, mode=mode)
    with FlopCounterMode(display=False) as counter:
        _OP(q, q, v, frames, p, **config)
    cost = _cost(2, 3, frames * p, 16, 8, frames=frames, tokens_per_frame=p, **config)
    assert 2 * cost.macs == counter.get_total_flops()


@pytest.mark.parametrize("mode", ["headwise", "uniform"])
def test_httm_cost_of_one_frame_is_sdpa_also_as_a_formula_in_frames(mode):
    """The op is SDPA on one frame: its cost there, given as an int or read off the formula in the
    frames, is SDPA's (the formula counted merging below the dense cost at 1)."""
    s, p = sympy.Symbol("frames", integer=True, positive=True), 37
    spec = TensorSpec((1, 4, s * p, 16), torch.float32)
    call = OpCall(_OP, (spec, spec, spec), dict(frames=s, tokens_per_frame=p, special_tokens=5, q_ratio=0.9,
                                                 kv_ratio=0.7, n_s=8, n_t=2, outlier_fraction=0.1,
                                                 proportional_attention=False, anchor_first_frame=False, mode=mode),
                  spec, Conventions())
    symbolic = httm_attention_cost(call)
    dense_spec = TensorSpec((1, 4, p, 16), torch.float32)
    dense = sdpa_cost(OpCall(torch.ops.aten.scaled_dot_product_attention.default, (dense_spec,) * 3, {}, dense_spec,
                             Conventions()))
    at_one = _cost(1, 4, p, 16, frames=1, tokens_per_frame=p, n_s=8, n_t=2, mode=mode)
    assert (at_one.macs, at_one.elementwise) == (dense.macs, dense.elementwise)
    assert (sympy.sympify(symbolic.macs).subs(s, 1), sympy.sympify(symbolic.elementwise).subs(s, 1)) == (
        dense.macs, dense.elementwise)
    at_two = _cost(1, 4, 2 * p, 16, frames=2, tokens_per_frame=p, n_s=8, n_t=2, mode=mode)
    assert sympy.sympify(symbolic.macs).subs(s, 2) == at_two.macs


def test_httm_cost_ratio_zero_equals_dense_attention():
    cost = _cost(1, 4, 3 * 21, 16, frames=3, tokens_per_frame=21, q_ratio=0.0, kv_ratio=0.0, outlier_fraction=0.0)
    spec = TensorSpec((1, 4, 63, 16), torch.float32)
    dense = sdpa_cost(OpCall(torch.ops.aten.scaled_dot_product_attention.default, (spec, spec, spec), {}, spec,
                             Conventions()))
    assert cost.macs == dense.macs  # every token kept, no source to match


def test_httm_cost_uniform_matches_once_proportional_adds_bias():
    base = dict(frames=4, tokens_per_frame=37, n_s=8, n_t=2)
    headwise, uniform = _cost(1, 4, 148, 16, **base), _cost(1, 4, 148, 16, mode="uniform", **base)
    proportional = _cost(1, 4, 148, 16, proportional_attention=True, **base)
    assert headwise.info["attention_macs"] == uniform.info["attention_macs"]
    assert headwise.info["matching_macs"] == 4 * uniform.info["matching_macs"]  # one head-averaged match
    m_q, m_kv = headwise.info["kept_q"], headwise.info["kept_kv"]
    assert proportional.elementwise - headwise.elementwise == 4 * m_q * m_kv  # log(size) added to every score


_FRAMES = (1, 2, 5, 15, 29, 30, 31, 45, 59, 61, 100, 300, 1000)  # one frame: SDPA (a Piecewise case)


@pytest.mark.parametrize("tokens_per_frame", [261, 1041])
@pytest.mark.parametrize("mode,anchor", [("headwise", False), ("headwise", True), ("uniform", False), ("global", False)])
def test_httm_counts_symbolic_frames_equal_integer_counts(tokens_per_frame, mode, anchor):
    s = sympy.Symbol("frames", integer=True, positive=True)
    symbolic = httm_counts(s, tokens_per_frame, anchor_first_frame=anchor, mode=mode)
    for frames in _FRAMES:
        value = {k: int(sympy.sympify(v).subs(s, frames)) for k, v in symbolic.items()}
        assert (value["kept_q"], value["kept_kv"]) == httm_kept_lengths(
            frames, tokens_per_frame, anchor_first_frame=anchor, mode=mode), frames
        assert value["pairs_q"] + value["pairs_kv"] == _layout_pairs(frames, tokens_per_frame, anchor, mode), frames


def _layout_pairs(frames, tokens_per_frame, anchor, mode, q_ratio=0.9, kv_ratio=0.7):
    """Sources x destinations summed over the blocks of the layouts the op runs (both sides; none
    for one frame, where the op is SDPA)."""
    return 0 if frames == 1 else sum(src * dst for ratio in (q_ratio, kv_ratio)
               for src, dst in httm_layout(frames, tokens_per_frame, 5, ratio, 128, 30, anchor,
                                           whole_sequence=mode == "global").blocks)


def test_httm_matching_linear_in_frames_blockwise_quadratic_global():
    def matching(frames, mode):
        counts = httm_counts(frames, 261, mode=mode)
        return counts["pairs_q"] + counts["pairs_kv"]

    blocked = [matching(s, "headwise") for s in (30, 60, 120)]
    whole = [matching(s, "global") for s in (30, 60, 120)]
    assert blocked[1] == 2 * blocked[0] and blocked[2] == 4 * blocked[0]
    assert whole[1] > 3.9 * whole[0] and whole[2] > 3.9 * whole[1]


def test_httm_counts_reject_symbolic_tokens_per_frame():
    with pytest.raises(ValueError, match="tokens_per_frame must be a fixed int"):
        httm_counts(4, sympy.Symbol("p"))


def test_httm_cost_of_pass_output_is_a_formula_in_frames():
    torch.manual_seed(0)
    model = vggt_tiny(depth=2).eval()
    images = {s: torch.rand(1, s, 3, 56, 56) for s in (4, 7)}
    config = "httm:n_s=8,n_t=3"
    report = fxslim.estimate(fxslim.optimize(model, images[4], passes=[config]).module.aggregator, images[4],
                             symbolic={"frames": (0, 1)})
    op_rows = [r for r in report.rows if r.op.startswith("fxslim.httm_attention")]
    assert len(op_rows) == 2 and all(r.kind == "attention" for r in op_rows)
    assert report.total.macs.free_symbols == {report.symbols["frames"]}
    scaled = report.scaling(frames=[4, 7]).column("macs")
    for frames, macs in zip((4, 7), scaled):  # a model optimised and costed at that frame count
        at = fxslim.optimize(model, images[frames], passes=[config]).module.aggregator
        assert macs == fxslim.estimate(at, images[frames]).total.macs
