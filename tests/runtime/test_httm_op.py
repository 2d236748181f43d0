"""Tests of fxslim::httm_attention, its planner and its loop reference (docs/methods/HTTM.md)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

import fxslim.runtime.httm as httm_module
from fxslim.runtime.frame_layout import frame_layout_from_positions
from fxslim.runtime.httm import (
    MODES,
    httm_apply_plan,
    httm_kept_lengths,
    httm_layout,
    httm_match,
    httm_plan,
)
from fxslim.runtime.httm_reference import httm_attention_reference, reference_blocks, reference_permutation

httm = torch.ops.fxslim.httm_attention


pytestmark = pytest.mark.usefixtures("one_thread")


def _qkv(b, h, n, d, dv=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, n, d, generator=g), torch.randn(b, h, n, d, generator=g),
            torch.randn(b, h, n, dv or d, generator=g))


def _groups(slot_row: torch.Tensor) -> set[frozenset[int]]:
    """Partition of tokens given by one head's slot map."""
    groups: dict[int, set[int]] = {}
    for token, s in enumerate(slot_row.tolist()):
        groups.setdefault(s, set()).add(token)
    return {frozenset(g) for g in groups.values()}


# ----------------------------------------------------------------------------------------------
# Exact limits
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("proportional", [False, True])
def test_httm_attention_zero_ratios_equals_sdpa(mode, proportional):
    q, k, v = _qkv(2, 3, 4 * 21, 16, dv=8)
    out = httm(q, k, v, 4, 21, q_ratio=0.0, kv_ratio=0.0, outlier_fraction=0.0, n_s=5, n_t=3, mode=mode,
               proportional_attention=proportional)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=1e-6, rtol=1e-5)


def test_httm_plan_zero_ratios_keeps_every_token():
    q, k, _ = _qkv(1, 2, 3 * 13, 8)
    plan = httm_plan(q, k, 3, 13, q_ratio=0.0, kv_ratio=0.0, outlier_fraction=0.0, n_s=4, n_t=2)
    assert plan.q_lengths.tolist() == [[39, 39]]
    assert plan.kv_length == 39
    assert all(len(g) == 1 for g in _groups(plan.q_slot[0, 0]))


def test_httm_attention_scale_argument_matches_sdpa_scale():
    q, k, v = _qkv(1, 2, 2 * 9, 8)
    out = httm(q, k, v, 2, 9, q_ratio=0.0, kv_ratio=0.0, outlier_fraction=0.0, scale=0.3)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, scale=0.3), atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Step 0: reordering
# ----------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(frames=st.integers(1, 9), patches=st.integers(0, 23), special=st.integers(0, 5), n_s=st.integers(1, 10),
       n_t=st.integers(1, 12), whole=st.booleans())
def test_httm_layout_permutation_round_trips(frames, patches, special, n_s, n_t, whole):
    p = special + patches
    if p == 0:
        return
    layout = httm_layout(frames, p, special, 0.5, n_s, n_t, whole_sequence=whole)
    n = frames * p
    assert sorted(layout.perm.tolist()) == list(range(n))  # a bijection
    assert torch.equal(layout.perm[layout.inverse], torch.arange(n))
    assert torch.equal(layout.inverse[layout.perm], torch.arange(n))
    assert layout.perm.tolist() == reference_permutation(frames, p, special, n_s, n_t, whole)
    # each block: consecutive frames x a run of at most n_s consecutive patch positions
    _, blocks = reference_blocks(frames, p, special, n_s, n_t, whole)
    for first, n_frames, tokens in blocks:
        frame_ids = {t // p for t in tokens}
        positions = sorted({t % p - special for t in tokens})
        assert frame_ids == set(range(first, first + n_frames))
        assert positions == list(range(positions[0], positions[0] + len(positions)))
        assert whole or (len(positions) <= n_s and n_frames <= n_t)
        assert len(tokens) == n_frames * len(positions)


def test_httm_layout_cuts_frames_and_positions_into_equal_runs():
    # 32 frames x 256 patches, n_s=128, n_t=30: two runs of 16 frames (not 30 + 2) x two runs of 128
    layout = httm_layout(32, 261, 5, 0.9, 128, 30)
    assert [src + dst for src, dst in layout.blocks] == [2048] * 4
    assert layout.blocks[0] == (1843, 205)  # r = round(0.9 * 2048) sources, the rest destinations
    # 45 frames x 1036 patches (518x392): 23 + 22 frames x (116 + 8 x 115) positions, longer runs first
    sizes = [src + dst for src, dst in httm_layout(45, 1041, 5, 0.7, 128, 30).blocks]
    assert sizes == [23 * 116] + [23 * 115] * 8 + [22 * 116] + [22 * 115] * 8


def test_httm_layout_ratio_is_exact_decimal():
    # 0.7 * 2645 is 1851.4999... in floats; the layout removes round(1851.5) = 1852 (half to even)
    (src, dst), = httm_layout(1, 2650, 5, 0.7, 2645, 1).blocks
    assert (src, dst) == (1852, 2645 - 1852)


def test_httm_layout_global_mode_is_one_block():
    layout = httm_layout(6, 15, 5, 0.7, 4, 2, whole_sequence=True)
    assert len(layout.blocks) == 1 and sum(layout.blocks[0]) == 60


def test_httm_layout_anchor_first_frame_makes_frame0_destinations():
    layout = httm_layout(4, 5 + 12, 5, 0.9, 6, 4, anchor_first_frame=True)
    frame0_patches = torch.arange(5, 17)
    assert bool((layout.base_slot[frame0_patches] >= 0).all())
    plain = httm_layout(4, 5 + 12, 5, 0.9, 6, 4)
    assert layout.num_slots > plain.num_slots


def test_httm_layout_special_tokens_are_never_sources():
    layout = httm_layout(3, 5 + 10, 5, 0.9, 4, 3)
    specials = (torch.arange(3)[:, None] * 15 + torch.arange(5)).reshape(-1)
    assert layout.base_slot[specials].tolist() == list(range(15))


# ----------------------------------------------------------------------------------------------
# Steps 2-4: matching and merging
# ----------------------------------------------------------------------------------------------


def test_httm_plan_sources_only_join_destinations_of_their_block():
    frames, p, special = 5, 5 + 9, 5
    q, k, _ = _qkv(1, 2, frames * p, 8)
    plan = httm_plan(q, k, frames, p, special, q_ratio=0.6, kv_ratio=0.5, n_s=4, n_t=2, outlier_fraction=0.0)
    _, blocks = reference_blocks(frames, p, special, 4, 2)
    block_of = {t: i for i, (_, _, tokens) in enumerate(blocks) for t in tokens}
    for slot_map in (plan.q_slot, plan.kv_slot):
        for h in range(2):
            for group in _groups(slot_map[0, h]):
                assert len({block_of.get(t, ("special", t)) for t in group}) == 1


def test_httm_attention_identical_frames_query_merge_is_lossless():
    # every frame's patch queries are copies of frame 0's: merged query groups are exact duplicates
    frames, p = 8, 5 + 16
    q, k, v = _qkv(1, 2, frames * p, 16)
    q = q.view(1, 2, frames, p, 16)
    q[:, :, :, 5:] = q[:, :, :1, 5:]
    q = q.reshape(1, 2, frames * p, 16)
    kw = dict(q_ratio=0.75, kv_ratio=0.0, outlier_fraction=0.0, n_s=8, n_t=8)
    plan = httm_plan(q, k, frames, p, **kw)
    assert int(plan.q_lengths.max()) < frames * p // 2
    out = httm(q, k, v, frames, p, **kw)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=1e-6, rtol=1e-5)


def test_httm_attention_identical_frames_key_merge_lossless_only_with_proportional_attention():
    frames, p = 8, 5 + 16
    q, k, v = _qkv(1, 2, frames * p, 16)
    k, v = (t.view(1, 2, frames, p, 16).clone() for t in (k, v))
    k[:, :, :, 5:], v[:, :, :, 5:] = k[:, :, :1, 5:], v[:, :, :1, 5:]
    k, v = k.reshape(1, 2, frames * p, 16), v.reshape(1, 2, frames * p, 16)
    kw = dict(q_ratio=0.0, kv_ratio=0.75, outlier_fraction=0.0, n_s=8, n_t=8)
    dense = F.scaled_dot_product_attention(q, k, v)
    with_bias = httm(q, k, v, frames, p, proportional_attention=True, **kw)
    without_bias = httm(q, k, v, frames, p, proportional_attention=False, **kw)
    torch.testing.assert_close(with_bias, dense, atol=1e-5, rtol=1e-5)
    assert (without_bias - dense).abs().max() > 1e-3  # uneven group sizes: duplicates lose weight


def test_httm_plan_headwise_maps_follow_each_heads_structure():
    # head 0: every frame repeats frame 0 (temporal duplicates); head 1: each frame is one constant
    # vector (spatial duplicates). Head-wise matching must merge across time in head 0 and within
    # frames in head 1.
    frames, special, patches = 3, 5, 12
    p = special + patches
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, frames, p, 16, generator=g)
    q[0, 0, :, special:] = q[0, 0, :1, special:]
    q[0, 1, :, special:] = torch.randn(frames, 1, 16, generator=g)
    q = q.reshape(1, 2, frames * p, 16)
    plan = httm_plan(q, q, frames, p, special, q_ratio=0.5, kv_ratio=0.5, n_s=patches, n_t=3, outlier_fraction=0.0)
    head0, head1 = _groups(plan.q_slot[0, 0]), _groups(plan.q_slot[0, 1])
    assert head0 != head1
    merged0 = [gr for gr in head0 if len(gr) > 1]
    merged1 = [gr for gr in head1 if len(gr) > 1]
    assert merged0 and merged1
    assert all(len({t % p for t in gr}) == 1 for gr in merged0)  # same position, several frames
    assert all(len({t // p for t in gr}) == 1 for gr in merged1)  # same frame, several positions


def test_httm_plan_uniform_mode_shares_maps_across_heads():
    q, k, _ = _qkv(2, 4, 4 * 15, 8)
    plan = httm_plan(q, k, 4, 15, q_ratio=0.7, kv_ratio=0.5, n_s=5, n_t=2, outlier_fraction=0.1, mode="uniform")
    for slot_map in (plan.q_slot, plan.kv_slot, plan.outliers):
        assert torch.equal(slot_map, slot_map[:, :1].expand_as(slot_map))
    headwise = httm_plan(q, k, 4, 15, q_ratio=0.7, kv_ratio=0.5, n_s=5, n_t=2, outlier_fraction=0.1)
    assert not torch.equal(headwise.q_slot, headwise.q_slot[:, :1].expand_as(headwise.q_slot))


# ----------------------------------------------------------------------------------------------
# Step 5: outliers
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.05, 0.1, 0.23])
def test_httm_plan_outlier_count_equals_round_fraction_of_pool(fraction):
    b, h, frames, p = 2, 4, 6, 5 + 20
    q, k, _ = _qkv(b, h, frames * p, 8, seed=3)
    plan = httm_plan(q, k, frames, p, q_ratio=0.9, kv_ratio=0.7, n_s=10, n_t=3, outlier_fraction=fraction)
    expected = round(fraction * h * frames * p)
    assert plan.outliers.sum(dim=(1, 2)).tolist() == [expected] * b
    per_head = plan.outliers.sum(dim=2)
    assert len(set(per_head.flatten().tolist())) > 1  # the budget is shared, not split evenly
    # length accounting: groups that keep a non-outlier member + one row per outlier
    for bi in range(b):
        for hi in range(h):
            rows = set(plan.q_slot[bi, hi].tolist())
            assert plan.q_lengths[bi, hi] == len(rows) == max(rows) + 1
            outlier_rows = set(plan.q_slot[bi, hi][plan.outliers[bi, hi]].tolist())
            assert len(outlier_rows) == int(plan.outliers[bi, hi].sum())  # outliers are singletons


def test_httm_plan_outlier_counts_property_sums_the_mask():
    q, k, _ = _qkv(1, 3, 4 * 15, 8)
    plan = httm_plan(q, k, 4, 15, n_s=5, n_t=2)
    assert torch.equal(plan.outlier_counts, plan.outliers.sum(dim=-1))
    assert int(plan.outlier_counts.sum()) == round(0.1 * 3 * 60)


def test_httm_plan_planted_far_token_is_an_outlier():
    frames, p = 4, 5 + 8
    q, k, _ = _qkv(1, 2, frames * p, 8, seed=5)
    q = q * 0.01
    far = 2 * p + 7  # a patch token of frame 2
    q[0, 1, far] = 50.0
    plan = httm_plan(q, k, frames, p, q_ratio=0.75, kv_ratio=0.5, n_s=8, n_t=4, outlier_fraction=0.02)
    assert bool(plan.outliers[0, 1, far])
    assert int((plan.q_slot[0, 1] == plan.q_slot[0, 1, far]).sum()) == 1


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("where", ["token", "frame"])
def test_httm_attention_nan_queries_stay_where_sdpa_has_them(mode, where):
    # NaN queries in sample 0 (one patch token, or all of frame 2): no source joins a NaN
    # destination, NaN deviations rank first, so the NaN queries become their own outliers and the
    # NaN rows are SDPA's; the sample keeps its whole outlier budget and the reference agrees
    frames, p, heads = 4, 2 + 6, 2
    q, k, v = _qkv(2, heads, frames * p, 8, seed=7)
    q[0, :, 2 * p + 3 if where == "token" else slice(2 * p, 3 * p)] = float("nan")
    kw = dict(special_tokens=2, q_ratio=0.5, kv_ratio=0.5, n_s=3, n_t=2, outlier_fraction=0.3, mode=mode)
    ref_out, ref_plan = httm_attention_reference(q, k, v, frames, p, **kw)
    plan = httm_plan(q, k, frames, p, **kw)
    for name in ("q_slot", "kv_slot", "q_lengths", "outliers"):
        assert torch.equal(getattr(plan, name), getattr(ref_plan, name)), name
    budget = round(0.3 * frames * p) * heads if mode == "uniform" else round(0.3 * heads * frames * p)
    assert plan.outliers.sum(dim=(1, 2)).tolist() == [budget, budget]
    out = httm(q, k, v, frames, p, **kw)
    assert torch.equal(out.isnan(), F.scaled_dot_product_attention(q, k, v).isnan())
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5, equal_nan=True)
    torch.testing.assert_close(out[1:], httm(q[1:], k[1:], v[1:], frames, p, **kw), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("mode,fraction", [("headwise", 0.01), ("uniform", 0.1), ("global", 0.01)])
def test_httm_nan_query_leaves_its_group_before_its_finite_members(mode, fraction):
    # one NaN feature in one head of one token, a small outlier budget: every member of its group
    # deviates NaN from the NaN mean, and the tie rule used to send the finite members of lower
    # index out first (uniform: 8 of them, the budget, and 9 NaN rows where SDPA has 1)
    frames, p, heads = 4, 21, 4
    q, k, v = _qkv(1, heads, frames * p, 16, seed=0)
    q[0, 1, 50, 3] = float("nan")
    kw = dict(special_tokens=5, q_ratio=0.8 + fraction, kv_ratio=0.7, outlier_fraction=fraction, mode=mode)
    plan = httm_plan(q, k, frames, p, **kw)
    assert bool(plan.outliers[0, 1, 50])
    ref_out, ref_plan = httm_attention_reference(q, k, v, frames, p, **kw)
    for name in ("q_slot", "kv_slot", "q_lengths", "outliers"):
        assert torch.equal(getattr(plan, name), getattr(ref_plan, name)), name
    out = httm(q, k, v, frames, p, **kw)
    assert torch.equal(out.isnan(), F.scaled_dot_product_attention(q, k, v).isnan())
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5, equal_nan=True)


@pytest.mark.parametrize("seed", range(16, 40))
def test_httm_plan_non_finite_queries_match_the_reference(seed):
    # a pair holding an infinite query deviates NaN in the op (amax propagates NaN) and NaN or inf
    # in the reference, by the order of Python's max: the outlier ranks then differed
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(2, 2, 27, 8, generator=g), torch.randn(2, 2, 27, 8, generator=g)
    for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
        b, h, n, f = (int(torch.randint(0, s, (1,), generator=g)) for s in (2, 2, 27, 8))
        q[b, h, n, f] = [math.nan, math.inf, -math.inf][seed % 3]
    kw = dict(special_tokens=2, q_ratio=0.55, kv_ratio=0.6, outlier_fraction=0.05, mode="headwise", n_s=4, n_t=2)
    plan, (_, ref) = httm_plan(q, k, 3, 9, **kw), httm_attention_reference(q, k, k, 3, 9, **kw)
    for name in ("q_slot", "q_lengths", "outliers"):
        assert torch.equal(getattr(plan, name), getattr(ref, name)), name


def test_httm_plan_infinite_query_joins_the_same_destination_as_in_the_reference():
    # an infinite source scores +-inf against each destination (a . b / |b|); the cosine's extra
    # 1 / |a| made every score NaN in the reference, so the two chose different destinations
    q, k, _ = _qkv(2, 3, 3 * 9, 4, seed=27)
    q[1, :, 13] = float("inf")
    kw = dict(special_tokens=0, q_ratio=0.3, kv_ratio=0.0, n_s=9, n_t=3, outlier_fraction=0.1,
              anchor_first_frame=True)
    plan = httm_plan(q, k, 3, 9, **kw)
    _, ref_plan = httm_attention_reference(q, k, k, 3, 9, **kw)
    for name in ("q_slot", "q_lengths", "outliers"):
        assert torch.equal(getattr(plan, name), getattr(ref_plan, name)), name


def test_httm_attention_nan_query_stays_nan_when_merged_keys_are_few():
    # 24 tokens merged to 2 keys: torch's CPU SDPA kernel returns 0, not NaN, for an all-NaN row of
    # logits when the keys are fewer than its vector width; SDPA on all 24 keys and the reference
    # give NaN for the NaN query, so the merged attention must too
    q, k, v = _qkv(1, 2, 4 * 6, 8, seed=3)
    q[0, 1, 9] = float("nan")
    kw = dict(special_tokens=0, q_ratio=0.5, kv_ratio=0.9, n_s=6, n_t=4, outlier_fraction=0.1)
    plan = httm_plan(q, k, 4, 6, **kw)
    assert plan.kv_length == 2 and bool(plan.outliers[0, 1, 9])
    out = httm(q, k, v, 4, 6, **kw)
    assert torch.equal(out.isnan(), F.scaled_dot_product_attention(q, k, v).isnan())
    torch.testing.assert_close(out, httm_attention_reference(q, k, v, 4, 6, **kw)[0], equal_nan=True)


# ----------------------------------------------------------------------------------------------
# Reference equivalence
# ----------------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batch=st.integers(1, 2), heads=st.integers(1, 3), frames=st.integers(1, 4), patches=st.integers(1, 14),
    special=st.integers(0, 3), n_s=st.integers(1, 8), n_t=st.integers(1, 4),
    q_ratio=st.sampled_from([0.0, 0.3, 0.5, 0.9]), kv_ratio=st.sampled_from([0.0, 0.4, 0.7]),
    fraction=st.sampled_from([0.0, 0.1, 0.25]), mode=st.sampled_from(MODES), anchor=st.booleans(),
    rule=st.sampled_from(["strided", "random"]), proportional=st.booleans(), seed=st.integers(0, 2**16),
)
@example(batch=1, heads=2, frames=4, patches=7, special=1, n_s=1, n_t=3, q_ratio=0.3, kv_ratio=0.0, fraction=0.1,
         mode="uniform", anchor=False, rule="strided", proportional=False, seed=222)  # a two-token group at the cut
def test_httm_attention_matches_loop_reference(batch, heads, frames, patches, special, n_s, n_t, q_ratio, kv_ratio,
                                               fraction, mode, anchor, rule, proportional, seed):
    p = special + patches
    q, k, v = _qkv(batch, heads, frames * p, 8, dv=6, seed=seed)
    kw = dict(special_tokens=special, q_ratio=q_ratio, kv_ratio=kv_ratio, n_s=n_s, n_t=n_t,
              outlier_fraction=fraction, anchor_first_frame=anchor, dst_rule=rule, seed=seed % 7, mode=mode)
    ref_out, ref_plan = httm_attention_reference(q, k, v, frames, p, proportional_attention=proportional, **kw)
    if frames > 1:  # one frame is dense attention in both (test_httm_attention_of_one_frame_is_sdpa)
        plan = httm_plan(q, k, frames, p, **kw)
        assert torch.equal(plan.q_slot, ref_plan.q_slot)
        assert torch.equal(plan.kv_slot, ref_plan.kv_slot)
        assert torch.equal(plan.q_lengths, ref_plan.q_lengths)
        assert torch.equal(plan.outliers, ref_plan.outliers)
        assert plan.kv_length == ref_plan.kv_length
    out = httm(q, k, v, frames, p, proportional_attention=proportional, **kw)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_httm_attention_of_one_frame_is_sdpa(mode):
    """A global attention over one frame is that frame's attention, which HTTM leaves alone: the op
    (and the loop reference, and the cost model) give SDPA, whatever the ratios; bad arguments still raise."""
    q, k, v = _qkv(2, 3, 40, 8, dv=6, seed=4)
    kw = dict(special_tokens=2, q_ratio=0.9, kv_ratio=0.7, n_s=4, n_t=2, mode=mode, scale=0.3)
    dense = F.scaled_dot_product_attention(q, k, v, scale=0.3)
    assert torch.equal(httm(q, k, v, 1, 40, **kw), dense)
    torch.testing.assert_close(httm_attention_reference(q, k, v, 1, 40, **kw)[0], dense, atol=1e-6, rtol=1e-6)
    assert httm_kept_lengths(1, 40, 2, 0.9, 0.7, 4, 2, mode=mode) == (40, 40)
    with FlopCounterMode(display=False) as counter:
        httm(q, k, v, 1, 40, **kw)
    assert counter.get_total_flops() == 2 * 2 * 3 * 40 * 40 * (8 + 6)
    with pytest.raises(ValueError, match="N must equal"):
        httm(q, k, v, 1, 39, **kw)


@pytest.mark.parametrize("mode", MODES)
def test_httm_plan_exact_similarity_ties_resolved_like_the_reference(mode):
    # every token of a head is one of two vectors: each source ties exactly with many destinations
    # and must join the first of them. (No outliers: group means of equal mathematical value but
    # different members round differently in the two implementations, so deviations of different
    # groups are not bitwise ties; the pair rule that makes them exact is pinned by the
    # reference-equivalence example above.)
    frames, p = 6, 5 + 40
    g = torch.Generator().manual_seed(4)
    pair = torch.randn(2, 2, 8, generator=g)
    q = pair[:, torch.randint(0, 2, (frames * p,), generator=g)][None]
    kw = dict(q_ratio=0.9, kv_ratio=0.7, n_s=16, n_t=4, outlier_fraction=0.0, mode=mode)
    _, ref_plan = httm_attention_reference(q, q, q, frames, p, **kw)
    plan = httm_plan(q, q, frames, p, **kw)
    for name in ("q_slot", "kv_slot", "q_lengths", "outliers"):
        assert torch.equal(getattr(plan, name), getattr(ref_plan, name)), name


def test_httm_match_chunked_scores_equal_one_chunk(monkeypatch):
    # the score chunking (rows x heads) must not change any decision
    q, k, _ = _qkv(2, 3, 5 * 69, 16, seed=6)
    whole = httm_plan(q, k, 5, 69, n_s=16, n_t=4)
    monkeypatch.setattr(httm_module, "_SCORE_FLOATS", 64)
    monkeypatch.setattr(httm_module, "_MIN_ROWS", 3)
    chunked = httm_plan(q, k, 5, 69, n_s=16, n_t=4)
    assert torch.equal(whole.q_slot, chunked.q_slot) and torch.equal(whole.kv_slot, chunked.kv_slot)


@settings(max_examples=25, deadline=None)
@given(heads=st.integers(1, 3), d=st.integers(1, 40), scale_exp=st.integers(-30, 30), seed=st.integers(0, 2**16))
def test_httm_pair_features_normalise_destinations_as_f_normalize(heads, d, scale_exp, seed):
    """The destinations are normalised in a reused scratch buffer, in place: bit for bit F.normalize of
    the gathered rows, zero rows, tiny and huge scales and a NaN included, on every call."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(heads, 4 * 60, d, generator=g) * 10.0 ** scale_exp
    x[0, :: 7] = 0.0
    x[-1, 5, 0] = float("nan")
    layout = httm_layout(4, 60, 2, 0.7, 16, 2)
    for _ in range(2):  # the second call finds the buffer the first one left
        for cls in layout.classes:
            flat, src_rows, dst = httm_module._pair_features(x, cls)
            _, dst_rows = httm_module._pair_rows(x, cls)
            want = F.normalize(flat.index_select(0, dst_rows), dim=-1).view(dst.shape)
            assert torch.equal(dst.nan_to_num(nan=7.0), want.nan_to_num(nan=7.0))
            assert torch.equal(src_rows, httm_module._pair_rows(x, cls)[0])


# ----------------------------------------------------------------------------------------------
# Op contract: opcheck, fake kernel, FLOP formula, errors
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [
    {},
    {"q_ratio": 0.5, "kv_ratio": 0.5, "mode": "uniform", "proportional_attention": True},
    {"mode": "global", "anchor_first_frame": True, "dst_rule": "random", "seed": 3, "scale": 0.2},
])
def test_httm_attention_opcheck(kwargs):
    q, k, v = _qkv(2, 2, 3 * 13, 8, dv=4)
    torch.library.opcheck(httm, (q, k, v, 3, 13), dict(n_s=4, n_t=2, **kwargs))


def test_httm_attention_fake_kernel_gives_sdpa_shape():
    with FakeTensorMode():
        q, k = torch.empty(2, 4, 3 * 13, 8), torch.empty(2, 4, 3 * 13, 8)
        v = torch.empty(2, 4, 3 * 13, 6)
        out = httm(q, k, v, 3, 13)
    assert out.shape == (2, 4, 39, 6) and out.dtype == torch.float32


def test_httm_attention_flop_counter_uses_predicted_lengths():
    # S=2 frames, P=5+8, n_s=4, n_t=2: 2 blocks of 4 positions x 2 frames = 8 tokens.
    # rho=0.5 -> r=4, 4 destinations per block: groups = 2*5 specials + 2*4 = 18 on both sides.
    # kept_q = 18 + round(0.1 * 26) = 21, kept_kv = 18.
    # attention MACs = B*H*21*18*(d + d_v); matching MACs = B*H*(2 sides * 2 blocks * 4 src * 4 dst * d)
    b, h, d, dv = 1, 2, 8, 4
    q, k, v = _qkv(b, h, 26, d, dv=dv)
    with FlopCounterMode(display=False) as counter:
        httm(q, k, v, 2, 13, q_ratio=0.5, kv_ratio=0.5, n_s=4, n_t=2, outlier_fraction=0.1)
    attention = b * h * 21 * 18 * (d + dv)
    matching = b * h * 2 * 2 * 4 * 4 * d
    assert counter.get_total_flops() == 2 * (attention + matching)
    assert httm_kept_lengths(2, 13, 5, 0.5, 0.5, 4, 2, 0.1) == (21, 18)


def test_httm_kept_lengths_match_measured_lengths():
    frames, p = 12, 5 + 64
    q, k, _ = _qkv(1, 4, frames * p, 16, seed=2)
    plan = httm_plan(q, k, frames, p, n_s=16, n_t=6)
    kept_q, kept_kv = httm_kept_lengths(frames, p, n_s=16, n_t=6)
    assert plan.kv_length == kept_kv
    assert abs(plan.q_lengths.float().mean().item() - kept_q) <= 0.02 * kept_q


@pytest.mark.parametrize("kwargs, name", [
    ({"q_ratio": 1.0}, "q_ratio"),
    ({"q_ratio": -0.1}, "q_ratio"),
    ({"kv_ratio": 1.5}, "kv_ratio"),
    ({"outlier_fraction": 1.0}, "outlier_fraction"),
    ({"n_s": 0}, "n_s"),
    ({"n_t": 0}, "n_t"),
    ({"frames": 4}, "frames"),
    ({"tokens_per_frame": 12}, "tokens_per_frame"),
    ({"special_tokens": 14}, "special_tokens"),
    ({"mode": "blocky"}, "mode"),
    ({"dst_rule": "every_other"}, "dst_rule"),
])
def test_httm_attention_bad_arguments_raise_value_error(kwargs, name):
    q, k, v = _qkv(1, 2, 3 * 13, 8)
    args = {"frames": 3, "tokens_per_frame": 13, **kwargs}
    with pytest.raises(ValueError, match=name):
        httm(q, k, v, **args)
    with pytest.raises(ValueError, match=name), FakeTensorMode():
        httm(torch.empty(1, 2, 39, 8), torch.empty(1, 2, 39, 8), torch.empty(1, 2, 39, 8), **args)


def test_httm_attention_mismatched_k_shape_raises_value_error():
    q, k, v = _qkv(1, 2, 26, 8)
    with pytest.raises(ValueError, match="k must have"):
        httm(q, k[:, :, :13], v, 2, 13)


def test_httm_attention_float64_inputs_keep_float64_precision():
    # values float32 cannot hold (randn in float64; and 1e50, past float32's range): nothing merged
    # is SDPA to float64 rounding, merged equals the loop reference, which averages in float64
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 3 * 7, 8, generator=g, dtype=torch.float64) for _ in range(3))
    exact = httm(q, k, v, 3, 7, special_tokens=2, q_ratio=0.0, kv_ratio=0.0, outlier_fraction=0.0)
    torch.testing.assert_close(exact, F.scaled_dot_product_attention(q, k, v), atol=1e-12, rtol=1e-12)
    kw = dict(special_tokens=2, q_ratio=0.5, kv_ratio=0.5, n_s=2, n_t=2, outlier_fraction=0.1)
    for scale, big in ((None, 1.0), (1e-50, 1e50)):
        ref, ref_plan = httm_attention_reference(q * big, k, v, 3, 7, scale=scale, **kw)
        plan = httm_plan(q * big, k, 3, 7, **kw)
        assert torch.equal(plan.q_slot, ref_plan.q_slot) and torch.equal(plan.kv_slot, ref_plan.kv_slot)
        out = httm(q * big, k, v, 3, 7, scale=scale, **kw)
        assert out.dtype == torch.float64 and bool(out.isfinite().all())
        torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("shapes, name", [(((1, 2, 26, 0), (1, 2, 26, 4)), "q"), (((1, 2, 26, 8), (1, 2, 26, 0)), "v")])
def test_httm_attention_empty_head_dim_raises_value_error(shapes, name):
    qk, v = shapes
    with pytest.raises(ValueError, match=f"{name} must have a head dim"):
        httm(torch.randn(qk), torch.randn(qk), torch.randn(v), 2, 13)
    with pytest.raises(ValueError, match=f"{name} must have a head dim"), FakeTensorMode():
        httm(torch.empty(qk), torch.empty(qk), torch.empty(v), 2, 13)


def test_httm_apply_plan_and_match_refuse_a_plan_or_layout_of_another_shape():
    # a plan for B=2, H=2 has as many entries as one for B=1, H=4: it used to run on the wrong heads
    q, k, v = _qkv(2, 2, 3 * 7, 4)
    plan = httm_plan(q, k, 3, 7, special_tokens=2, n_s=2, n_t=2)
    for shape in ((1, 4, 21, 4), (1, 2, 21, 4), (2, 2, 28, 4)):
        other = torch.randn(shape)
        with pytest.raises(ValueError, match=r"plan is for q of \[B, H, N\] = \[2, 2, 21\]"):
            httm_apply_plan(other, other, other, plan)
    torch.testing.assert_close(httm_apply_plan(q, k, v, plan), httm(q, k, v, 3, 7, special_tokens=2, n_s=2, n_t=2))
    layout = httm_layout(3, 7, 2, 0.5, 2, 2)
    with pytest.raises(ValueError, match="layout is for N=21"):
        httm_match(torch.randn(1, 2, 28, 4), layout)
    with pytest.raises(ValueError, match=r"x must be \[B, H, N, d\]"):
        httm_match(torch.randn(2, 21, 4), layout)


def test_httm_attention_bfloat16_inputs_give_bfloat16_output_close_to_float32():
    # matching runs in float32 on the bf16 values, so the decisions equal those for the upcast inputs
    q, k, v = (t.bfloat16() for t in _qkv(1, 2, 4 * 21, 16))
    kw = dict(n_s=8, n_t=2, q_ratio=0.5, kv_ratio=0.5)
    out = httm(q, k, v, 4, 21, **kw)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    torch.testing.assert_close(out.float(), httm(q.float(), k.float(), v.float(), 4, 21, **kw), atol=2e-2, rtol=2e-2)


def test_httm_attention_survives_torch_export_with_config_in_the_graph():
    class Wrapper(torch.nn.Module):
        def forward(self, q, k, v):
            return httm(q, k, v, 3, 13, n_s=4, n_t=2, q_ratio=0.5, mode="uniform")

    q, k, v = _qkv(1, 2, 39, 8)
    exported = torch.export.export(Wrapper(), (q, k, v))
    calls = [n for n in exported.graph.nodes if n.op == "call_function" and "httm_attention" in str(n.target)]
    assert len(calls) == 1
    assert calls[0].args[3:5] == (3, 13) and calls[0].kwargs.get("mode", calls[0].args[-1]) == "uniform"
    torch.testing.assert_close(exported.module()(q, k, v), Wrapper()(q, k, v))


def test_frame_layout_from_positions_reads_vggt_positions():
    grid = torch.stack(torch.meshgrid(torch.arange(3), torch.arange(4), indexing="ij"), -1).reshape(-1, 2) + 1
    per_frame = torch.cat([torch.zeros(5, 2, dtype=torch.long), grid])
    layout = frame_layout_from_positions(per_frame.repeat(6, 1)[None])
    assert (layout.frames, layout.tokens_per_frame, layout.grid_h, layout.grid_w) == (6, 17, 3, 4)
    with pytest.raises(ValueError, match="whole number"):
        frame_layout_from_positions(per_frame.repeat(6, 1)[None, :-1])
    with pytest.raises(ValueError, match="rewritten for 4 special tokens"):
        frame_layout_from_positions(per_frame.repeat(6, 1)[None], special_tokens=4)


@pytest.mark.parametrize("fill", [float("nan"), float("inf"), 1e30])
def test_httm_match_of_a_sample_does_not_depend_on_a_non_finite_neighbour(fill):
    """A non-finite (or overflowing) sample sent the whole batch from the bfloat16 screen to the float32
    path, which rounds near-ties apart: about 300 of a finite sample's 552 choices moved (a probe of
    vggt_tiny moved its pose by 1e-3). Near-duplicate tokens make near-ties on purpose."""
    layout = httm_layout(4, 69, 5, 0.7, 64, 4)
    n = layout.base_slot.numel()
    g = torch.Generator().manual_seed(0)
    base, pick = torch.randn(1, 2, 8, 64, generator=g), torch.randint(0, 8, (n,), generator=g)
    x = base[:, :, pick] * (1 + 1e-3 * torch.rand(1, 2, n, 1, generator=g)) + 1e-6 * torch.randn(1, 2, n, 64, generator=g)
    alone = httm_match(x, layout)
    assert torch.equal(httm_match(torch.cat([x, torch.full_like(x, fill)]), layout)[:1], alone)
    assert torch.equal(httm_match(torch.cat([torch.full_like(x, fill), x]), layout)[1:], alone)
