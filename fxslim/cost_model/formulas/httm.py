"""Cost formula of ``fxslim::httm_attention`` (HTTM): attention at the merged lengths, plus matching and merging.

MACs (FLOPs = 2·MACs, the same count FlopCounterMode gives the op): the reduced attention
b·h·M_q·M_kv·(d + d_v) at the predicted kept lengths per head (M_q = special tokens + destinations
+ round(f·N) outliers, M_kv = special tokens + destinations), plus the source × destination cosine
similarities of the matching, per block and head (one head-averaged head in ``uniform`` mode), for Q
and for K. Merging and unmerging (normalisation, argmax, group means, outlier deviations and
selection, the copy back to N rows) and the softmax go to the elementwise column.

The block grid (docs/methods/HTTM.md, step 0) is counted in closed form: k = ceil(S / n_t) temporal
runs, S - k·floor(S / k) of them one frame longer than floor(S / k), times the spatial runs cut the
same way from the P - 5 patch positions with n_s.
Sizes are ints or SymInts: with ``frames`` a symbol the counts are sympy expressions (floor, Mod,
Min/Max and Python's round-half-even written out), exact at every frame count.
"""

from __future__ import annotations

from typing import Any

import sympy
import torch
from torch.utils.flop_counter import register_flop_formula

from fxslim.cost_model.formulas.aten import SOFTMAX_OPS, sdpa_cost
from fxslim.cost_model.registry import OpCall, OpCost, register_cost
from fxslim.runtime.httm import removed_tokens, run_sizes

__all__ = ["httm_attention_cost", "httm_counts"]


def _sym(value: Any) -> Any:
    """ints stay ints; SymInts become their sympy expression."""
    return value.node.expr if isinstance(value, torch.SymInt) else value


def _is_int(*values: Any) -> bool:
    return all(isinstance(v, int) for v in values)


def _round(x: Any) -> Any:
    """Python's round (half to even) of a rational number or expression."""
    if isinstance(x, (int, float)):
        return round(x)
    y = x + sympy.Rational(1, 2)
    return sympy.floor(y) - sympy.Piecewise((1, sympy.Eq(sympy.Mod(y, 2), 1)), (0, True))


def _min(a: Any, b: Any) -> Any:
    return min(a, b) if _is_int(a, b) else sympy.Min(a, b)


def _max(a: Any, b: Any) -> Any:
    return max(a, b) if _is_int(a, b) else sympy.Max(a, b)


def _runs(length: Any, cap: int) -> list[tuple[Any, Any]]:
    """(count, size) of the runs cutting ``length`` into ceil(length / cap) runs as equal as possible
    (the op's block grid: ``httm.run_sizes`` for an int): ``longer`` runs one longer than the rest.
    Symbolic counts may be expressions that are 0 at some lengths (a term times 0 adds nothing)."""
    if isinstance(length, int):
        return run_sizes(length, cap)
    count = sympy.ceiling(length / cap)
    size = sympy.floor(length / count)
    longer = length - count * size
    return [(longer, size + 1), (count - longer, size)]


def _present(count: Any) -> Any:
    """1 when ``count`` >= 1, else 0 (count a non-negative integer or expression)."""
    return int(count > 0) if isinstance(count, int) else sympy.Min(count, 1)


def _ratio(value: float) -> Any:
    """A ratio as the decimal it was written as (0.9 -> 9/10), so ties round like the op's floats."""
    return sympy.Rational(str(float(value)))


def _block(n_b: Any, n_anchor: Any, ratio: float) -> tuple[Any, Any]:
    """(destinations, sources x destinations) of one block of n_b tokens removing ``ratio`` of it."""
    removed = removed_tokens(n_b, ratio) if isinstance(n_b, int) else _min(_round(_ratio(ratio) * n_b), n_b - 1)
    dst = _max(n_b - removed, n_anchor)
    return dst, (n_b - dst) * dst


def _side(frames: Any, patches: int, ratio: float, n_s: int, n_t: int, anchor: bool, whole: bool) -> tuple[Any, Any]:
    """(destinations, matching pairs) of one side (Q or K/V) over the whole block grid."""
    if patches == 0:
        return 0, 0
    if whole:  # global mode: one block of every patch token
        return _block(frames * patches, patches if anchor else 0, ratio)
    temporal, spatial = _runs(frames, n_t), _runs(patches, n_s)
    dst: Any = 0
    pairs: Any = 0
    for t_count, t_len in temporal:
        for s_count, s_len in spatial:
            d, p = _block(t_len * s_len, 0, ratio)
            dst, pairs = dst + t_count * s_count * d, pairs + t_count * s_count * p
    # the first temporal run (the longer size where there are longer runs) makes frame 0's tokens destinations
    if anchor:
        first = temporal[0][1] if isinstance(frames, int) else temporal[1][1] + _present(temporal[0][0])
        for s_count, s_len in spatial:
            (d1, p1), (d0, p0) = _block(first * s_len, s_len, ratio), _block(first * s_len, 0, ratio)
            dst, pairs = dst + s_count * (d1 - d0), pairs + s_count * (p1 - p0)
    return dst, pairs


def httm_counts(frames: Any, tokens_per_frame: Any, special_tokens: int = 5, q_ratio: float = 0.9,
                kv_ratio: float = 0.7, n_s: int = 128, n_t: int = 30, outlier_fraction: float = 0.1,
                anchor_first_frame: bool = False, mode: str = "headwise") -> dict[str, Any]:
    """Per head: kept queries, kept keys/values, destinations and matching pairs of each side.

    Equal to ``httm_kept_lengths`` and to the blocks of ``httm_layout`` for ints; sympy expressions when
    ``frames`` is symbolic. One frame keeps every token and matches none: the op is SDPA there (each
    expression a Piecewise with that case first).
    """
    frames, p = _sym(frames), _sym(tokens_per_frame)
    if not isinstance(p, int):
        raise ValueError(f"httm cost: tokens_per_frame must be a fixed int (symbolic frames only), got {p}")
    one_frame = {"kept_q": p, "kept_kv": p, "dst_q": 0, "dst_kv": 0, "pairs_q": 0, "pairs_kv": 0, "groups_q": p}
    if isinstance(frames, int):
        return one_frame if frames == 1 else _counts(frames, p, special_tokens, q_ratio, kv_ratio, n_s, n_t,
                                                     outlier_fraction, anchor_first_frame, mode)
    counts = _counts(frames, p, special_tokens, q_ratio, kv_ratio, n_s, n_t, outlier_fraction, anchor_first_frame, mode)
    return {k: sympy.Piecewise((one_frame[k], sympy.Eq(frames, 1)), (v, True)) for k, v in counts.items()}


def _counts(frames: Any, p: int, special_tokens: int, q_ratio: float, kv_ratio: float, n_s: int, n_t: int,
            outlier_fraction: float, anchor_first_frame: bool, mode: str) -> dict[str, Any]:
    """``httm_counts`` of 2 frames or more."""
    n, whole = frames * p, mode == "global"
    patches = p - special_tokens
    dst_q, pairs_q = _side(frames, patches, q_ratio, n_s, n_t, anchor_first_frame, whole)
    dst_kv, pairs_kv = _side(frames, patches, kv_ratio, n_s, n_t, anchor_first_frame, whole)
    outliers = round(outlier_fraction * n) if isinstance(n, int) else _round(_ratio(outlier_fraction) * n)
    specials = frames * special_tokens
    return {"kept_q": _min(n, specials + dst_q + outliers), "kept_kv": specials + dst_kv, "dst_q": dst_q,
            "dst_kv": dst_kv, "pairs_q": pairs_q, "pairs_kv": pairs_kv, "groups_q": specials + dst_q}


def _macs(b: Any, h: Any, d: Any, dv: Any, counts: dict[str, Any], mode: str) -> tuple[Any, Any]:
    """(attention MACs at the kept lengths, matching MACs: sources x destinations x d per block,
    side and head; one head-averaged match in uniform mode)."""
    attention = b * h * counts["kept_q"] * counts["kept_kv"] * (d + dv)
    matching = b * (1 if mode == "uniform" else h) * d * (counts["pairs_q"] + counts["pairs_kv"])
    return attention, matching


@register_flop_formula(torch.ops.fxslim.httm_attention)
def _httm_attention_flop(q_shape, k_shape, v_shape, frames, tokens_per_frame, special_tokens=5, q_ratio=0.9,
                         kv_ratio=0.7, n_s=128, n_t=30, outlier_fraction=0.1, proportional_attention=False,
                         anchor_first_frame=False, dst_rule="strided", seed=0, mode="headwise", scale=None,
                         *args, out_shape=None, **kwargs) -> int:
    """FlopCounterMode's count of the op: 2 x the MACs ``httm_attention_cost`` counts."""
    b, h, _, d = q_shape
    counts = httm_counts(frames, tokens_per_frame, special_tokens, q_ratio, kv_ratio, n_s, n_t, outlier_fraction,
                         anchor_first_frame, mode)
    return int(2 * sum(_macs(b, h, d, v_shape[-1], counts, mode)))


@register_cost(torch.ops.fxslim.httm_attention, kind="attention")
def httm_attention_cost(call: OpCall) -> OpCost:
    """[b, h, M_q, d] @ [b, h, d, M_kv] -> @ [b, h, M_kv, d_v], plus [n_src, d] @ [d, n_dst] per block, head, side.
    Ignores: query padding to the longest head, and outliers whose group is left empty (counts are predicted)."""
    a = call.arguments
    if isinstance(a["frames"], int) and a["frames"] == 1:  # one frame: the op is SDPA
        return sdpa_cost(call)
    b, h, n, d = (_sym(s) for s in a["q"].shape)
    dv = _sym(a["v"].shape[-1])
    c = httm_counts(a["frames"], a["tokens_per_frame"], a["special_tokens"], a["q_ratio"], a["kv_ratio"],
                    a["n_s"], a["n_t"], a["outlier_fraction"], a["anchor_first_frame"], a["mode"])
    m_q, m_kv = c["kept_q"], c["kept_kv"]
    match_heads = 1 if a["mode"] == "uniform" else h
    attention, matching = _macs(b, h, d, dv, c, a["mode"])
    # per head: [S, d] @ [d, S'] scores -> softmax + scale (+ log-size bias with proportional attention)
    scores = h * m_q * m_kv * (SOFTMAX_OPS + 1 + (1 if a["proportional_attention"] else 0))
    # matching: normalise destinations (3 per element), argmax (1 per score); uniform: head means of q and k
    match_work = match_heads * (3 * d * (c["dst_q"] + c["dst_kv"]) + c["pairs_q"] + c["pairs_kv"])
    if a["mode"] == "uniform":
        match_work += 2 * (h + 1) * n * d
    # outliers: group means of q, deviation (subtract, square, sum, sqrt), top-k over H·N
    outlier_work = h * (n * d + c["groups_q"] * d + 3 * n * d + 2 * n)
    # merge q, k, v (adds + one divide per merged row) and copy each output row back to its N tokens
    merge_work = h * ((n + m_q) * d + (n + m_kv) * (d + dv) + n * dv)
    elementwise = b * (scores + match_work + outlier_work + merge_work)
    if not isinstance(a["frames"], int):  # a formula in the frames: SDPA's at one frame
        elementwise = sympy.Piecewise((sdpa_cost(call).elementwise, sympy.Eq(_sym(a["frames"]), 1)), (elementwise, True))
    info = {"kept_q": m_q, "kept_kv": m_kv, "matching_macs": matching, "attention_macs": attention}
    return OpCost(macs=attention + matching, elementwise=elementwise, info=info)
