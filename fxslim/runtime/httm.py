"""HTTM: head-wise temporal token merging around scaled-dot-product attention (``fxslim::httm_attention``).

The op takes q, k, v ``[B, H, N, d]`` exactly as they would go into ``F.scaled_dot_product_attention``
in a global (all-frames) attention layer, shortens them by merging similar tokens inside temporal
blocks, runs attention on the short sequences and copies each merged query's output back to every
token it holds, so the output has SDPA's shape ``[B, H, N, d_v]``. Semantics: docs/methods/HTTM.md.

Choices this file fixes where the method spec leaves room:
- Reordering pi: all special tokens first (frame-major), then the blocks, temporal chunk outer and
  spatial chunk inner; inside a block the n_t frames of one patch position are adjacent
  ("time innermost"), so strided destinations sample every position at regular frame intervals.
- Block grid: frames and patch positions are each cut into the fewest runs of at most n_t (n_s),
  as equal as possible, longer runs first (``run_sizes``): 32 frames at n_t = 30 make two
  chunks of 16, not 30 + 2. No block is then a sliver whose tokens can only match a frame or two
  away, and the matching, quadratic in the block size, costs less (benchmarks/results/httm_speed.md).
- A block of n_b tokens removes r = round(rho * n_b) tokens, capped at n_b - 1 so
  every block keeps a destination; rho * n_b is exact, rho read as the decimal it is written as, and
  halves round to even (``removed_tokens``: float rounding would make 0.7 * 2645 = 1851.4999...).
  Destinations are the other n_b - r tokens, so every source folds
  into its best destination (the top-r ranking by score selects all sources). With
  ``anchor_first_frame`` frame 0's tokens are destinations as well, which can leave fewer sources.
- Ties: argmax keeps the first destination; the outlier top-k breaks ties by the lower flat index
  ``h * N + n`` (original token order). The two members of a two-token group deviate equally from
  its mean; both get the larger of their two rounded values, so that tie is exact.
- NaN (and inf, which turns into NaN similarities): a NaN similarity never wins the argmax (all NaN:
  the first destination), and a NaN deviation ranks above every number in the outlier selection,
  that of a query whose own features are not finite above those of the finite members of its group
  (which deviate NaN from the group's NaN mean). So no source joins a NaN destination and NaN queries
  leave their groups first: a NaN stays in the rows where SDPA has it (as far as the outlier budget
  reaches) and the sample keeps its budget.
- Merged query rows are ordered: surviving groups by slot (special tokens, then destinations in
  reordered order), then the outliers in token order. Key/value rows: groups by slot.
- ``uniform`` mode matches on head-averaged q (for Q) and k (for K/V) and selects round(f * N)
  outlier tokens by the norm of their deviation over all heads, so every head has the same maps.
- ``global`` mode is the same algorithm with one block holding every patch token.
- Precision: float64 inputs are matched, filtered and averaged in float64, every other dtype in
  float32 (``_work_dtype``).
- Speed on the CPU (``httm_native``): where the CPU has bfloat16 dot products, similarities come
  from a bfloat16 GEMM and only screen (destinations within a proven error bound of the best are
  scored again in float32), so choices stay float32's; merges, deviations and the unmerge run as
  C loops. Without a C compiler every step runs on ATen with the same results.
"""

from __future__ import annotations

import ctypes
import fractions
import functools
import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from fxslim.runtime import httm_native, memory

__all__ = [
    "MODES",
    "DST_RULES",
    "HttmLayout",
    "HttmPlan",
    "httm_layout",
    "httm_match",
    "httm_plan",
    "httm_apply_plan",
    "httm_attention",
    "httm_kept_lengths",
    "removed_tokens",
    "run_sizes",
]

MODES = ("headwise", "uniform", "global")
DST_RULES = ("strided", "random")
# Similarity scores are made in chunks of about this many floats (4 MB): the max that reads a chunk
# finds it still in cache (one [sources x destinations] tensor per block is 10-100x bigger and
# costs a trip to memory), while each chunk still holds enough rows for the GEMM to run at speed.
_SCORE_FLOATS = 1 << 20
_MIN_ROWS = 32  # fewer source rows per GEMM than this and its fixed costs dominate
# bfloat16 scores per chunk when screening (8 MB): ATen's bfloat16 GEMM runs 1.5x faster on a whole
# block's sources (2,688 x 1,152 scores at 32 frames) than on 1 MB slices of them, and the kernel
# that reads the scores is as fast either way (measured)
_SCREEN_SCORES = 1 << 22
_NORMALIZE_EPS = 1e-12  # F.normalize's default
_SCREEN_MAX_DIM = 1 << 20  # the screening's error bound needs float32 sums of fewer terms (bf16_margins)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the planning and of the group sums: float64 stays float64 (float32 sums would put
    1e-7 errors into float64 outputs, even where nothing merges, and overflow past 3.4e38), the
    half types are upcast to float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------
# Argument checks (shared by the op, its fake kernel, the planner and the reference)
# ----------------------------------------------------------------------------------------------


def _check_config(frames, tokens_per_frame, special_tokens, q_ratio, kv_ratio, n_s, n_t, outlier_fraction,
                  dst_rule, mode, num_tokens=None) -> None:
    ints = {"frames": frames, "tokens_per_frame": tokens_per_frame, "special_tokens": special_tokens,
            "n_s": n_s, "n_t": n_t}
    for name, value in ints.items():
        if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)):
            raise TypeError(f"httm_attention: {name} must be an int, got {type(value).__name__}")
    if frames < 1:
        raise ValueError(f"httm_attention: frames must be >= 1, got {frames}")
    if tokens_per_frame < 1:
        raise ValueError(f"httm_attention: tokens_per_frame must be >= 1, got {tokens_per_frame}")
    if not 0 <= special_tokens <= tokens_per_frame:
        raise ValueError(
            f"httm_attention: special_tokens must be in [0, tokens_per_frame={tokens_per_frame}], got {special_tokens}"
        )
    if n_s < 1:
        raise ValueError(f"httm_attention: n_s must be >= 1, got {n_s}")
    if n_t < 1:
        raise ValueError(f"httm_attention: n_t must be >= 1, got {n_t}")
    for name, value in {"q_ratio": q_ratio, "kv_ratio": kv_ratio, "outlier_fraction": outlier_fraction}.items():
        if not (isinstance(value, (int, float)) and 0.0 <= value < 1.0):
            raise ValueError(f"httm_attention: {name} must be in [0, 1), got {value!r}")
    if dst_rule not in DST_RULES:
        raise ValueError(f"httm_attention: dst_rule must be one of {DST_RULES}, got {dst_rule!r}")
    if mode not in MODES:
        raise ValueError(f"httm_attention: mode must be one of {MODES}, got {mode!r}")
    if num_tokens is not None and num_tokens != frames * tokens_per_frame:
        raise ValueError(
            f"httm_attention: N must equal frames * tokens_per_frame = {frames} * {tokens_per_frame} = "
            f"{frames * tokens_per_frame} (check frames and tokens_per_frame), got N={num_tokens}: a fixed "
            "tokens_per_frame holds at the image size it was set for; for other sizes the layout must follow the "
            "run (RoPE positions feeding q, or a [B, S, C, H, W] input in the attention's graph)"
        )


def _check_tensors(q: Tensor, k: Tensor, v: Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"httm_attention: {name} must be [B, H, N, d], got shape {tuple(t.shape)}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"httm_attention: {name} must be a floating tensor, got {t.dtype}")
        if t.shape[-1] == 0:  # no features to match on: the kernel's reshapes would fail unnamed
            raise ValueError(f"httm_attention: {name} must have a head dim >= 1, got shape {tuple(t.shape)}")
    if q.shape != k.shape:
        raise ValueError(
            f"httm_attention: k must have q's shape {tuple(q.shape)} (self-attention), got {tuple(k.shape)}"
        )
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(
            f"httm_attention: v must be [B, H, N, d_v] with B, H, N of k {tuple(k.shape[:3])}, got {tuple(v.shape)}"
        )


# ----------------------------------------------------------------------------------------------
# Layout: reordering pi, blocks, destinations (depends only on the configuration; cached)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _BlockClass:
    """All blocks with the same (n_src, n_dst): original token indices and destination slots."""

    src: Tensor  # [n_blocks, n_src] int64
    dst: Tensor  # [n_blocks, n_dst] int64
    dst_slot: Tensor  # [n_blocks, n_dst] int64


@dataclass(frozen=True)
class HttmLayout:
    """Static merge layout of one side (Q or K/V) for one sequence shape and ratio.

    ``perm[i]`` is the original index of the token at reordered position i (pi); ``inverse`` is
    pi^-1. ``base_slot[n]`` is the merged row of a destination or special token and -1 for a source.
    ``num_slots`` = special tokens + destinations = merged length before outlier filtering.
    ``blocks`` lists (n_src, n_dst) per block in order (for cost formulas).
    """

    perm: Tensor
    inverse: Tensor
    base_slot: Tensor
    classes: tuple[_BlockClass, ...]
    num_slots: int
    blocks: tuple[tuple[int, int], ...]


def run_sizes(length: int, cap: int) -> list[tuple[int, int]]:
    """(count, size) of the runs cutting ``length`` into ceil(length / cap) runs as equal as possible,
    the longer ones first (counts > 0): one axis of the block grid. 32 frames with n_t = 30 are
    [(2, 16)], not 30 + 2."""
    if length <= 0:
        return []
    count = -(-length // cap)
    size, longer = divmod(length, count)
    return [(c, n) for c, n in ((longer, size + 1), (count - longer, size)) if c]


def _balanced_runs(length: int, cap: int) -> list[tuple[int, int]]:
    """The runs of ``run_sizes`` as [start, end) ranges, in order."""
    ends = list(itertools.accumulate(size for count, size in run_sizes(length, cap) for _ in range(count)))
    return list(zip([0, *ends[:-1]], ends))


def _block_grid(frames: int, tokens_per_frame: int, special_tokens: int, n_s: int, n_t: int, whole: bool):
    """Yield (f0, f1, p0, p1) per block: frames [f0, f1) x patch positions [p0, p1), in block order."""
    patches = tokens_per_frame - special_tokens
    if whole:
        n_s, n_t = max(patches, 1), frames
    for f0, f1 in _balanced_runs(frames, n_t):
        for p0, p1 in _balanced_runs(patches, n_s):
            yield f0, f1, p0, p1


def removed_tokens(n_b: int, ratio: float) -> int:
    """r of a block of n_b tokens: round(ratio * n_b) in exact arithmetic (half to even), at most n_b - 1."""
    return min(round(fractions.Fraction(repr(float(ratio))) * n_b), n_b - 1)


def _num_destinations(n_b: int, n_anchor: int, ratio: float) -> int:
    removed = removed_tokens(n_b, ratio)
    return max(n_b - removed, n_anchor)


def _strided(length: int, count: int) -> Tensor:
    return torch.arange(count, dtype=torch.long) * length // count


@functools.lru_cache(maxsize=64)
def httm_layout(frames: int, tokens_per_frame: int, special_tokens: int, ratio: float, n_s: int, n_t: int,
                anchor_first_frame: bool = False, dst_rule: str = "strided", seed: int = 0,
                whole_sequence: bool = False) -> HttmLayout:
    """The (cached) merge layout for one side; ``whole_sequence`` makes one block (``global`` mode)."""
    _check_config(frames, tokens_per_frame, special_tokens, ratio, 0.0, n_s, n_t, 0.0, dst_rule, "headwise")
    n = frames * tokens_per_frame
    specials = (torch.arange(frames)[:, None] * tokens_per_frame + torch.arange(special_tokens)[None, :]).reshape(-1)
    base_slot = torch.full((n,), -1, dtype=torch.long)
    base_slot[specials] = torch.arange(specials.numel())
    next_slot = specials.numel()
    perm = [specials]
    generator = torch.Generator().manual_seed(seed) if dst_rule == "random" else None
    grouped: dict[tuple[int, int], list[tuple[Tensor, Tensor, Tensor]]] = {}
    blocks = []
    for f0, f1, p0, p1 in _block_grid(frames, tokens_per_frame, special_tokens, n_s, n_t, whole_sequence):
        n_f, n_p = f1 - f0, p1 - p0
        # time innermost: local index = position * n_f + frame
        positions = special_tokens + torch.arange(p0, p1)[:, None]
        tokens = (torch.arange(f0, f1)[None, :] * tokens_per_frame + positions).reshape(-1)
        perm.append(tokens)
        anchored = anchor_first_frame and f0 == 0
        is_dst = torch.zeros(n_f * n_p, dtype=torch.bool)
        n_anchor = n_p if anchored else 0
        if anchored:
            is_dst[torch.arange(n_p) * n_f] = True
        n_dst = _num_destinations(n_f * n_p, n_anchor, ratio)
        rest = torch.nonzero(~is_dst).flatten()
        count = n_dst - n_anchor
        if count > 0:
            if generator is None:
                pick = _strided(rest.numel(), count)
            else:
                pick = torch.randperm(rest.numel(), generator=generator)[:count]
            is_dst[rest[pick]] = True
        dst, src = tokens[is_dst], tokens[~is_dst]
        slots = torch.arange(next_slot, next_slot + dst.numel())
        base_slot[dst] = slots
        next_slot += dst.numel()
        blocks.append((src.numel(), dst.numel()))
        if src.numel():
            grouped.setdefault((src.numel(), dst.numel()), []).append((src, dst, slots))
    perm_t = torch.cat(perm)
    assert perm_t.numel() == n
    classes = tuple(
        _BlockClass(torch.stack([m[0] for m in members]), torch.stack([m[1] for m in members]),
                    torch.stack([m[2] for m in members]))
        for members in grouped.values()
    )
    return HttmLayout(perm_t, torch.argsort(perm_t), base_slot, classes, next_slot, tuple(blocks))


# ----------------------------------------------------------------------------------------------
# Matching, merging, outliers
# ----------------------------------------------------------------------------------------------


def httm_match(x: Tensor, layout: HttmLayout) -> Tensor:
    """Group slot of every token, ``[B, H, N]`` int64, for features x ``[B, H, N, d]``.

    Each source joins the destination of its block with the highest cosine similarity (per b, h;
    the first destination on ties). All samples, heads and equal-size blocks share one batched GEMM
    per chunk of source rows, and each chunk of scores is reduced (max) while it is in cache, so no
    full score tensor is ever made. Only destinations are normalised: the argmax over destinations
    does not depend on the source's norm. float32 on the CPU takes, in this order, the bfloat16
    screening where the CPU has bfloat16 dot products, else the native kernel that keeps each chunk of
    scores in registers (``_match_class_native``) where it is built with AVX-512, else ATen's GEMM.
    """
    # named errors: otherwise a 3-D x fails to unpack and a layout for another N fails in expand
    if x.dim() != 4:
        raise ValueError(f"httm_match: x must be [B, H, N, d], got shape {tuple(x.shape)}")
    b, h, n, d = x.shape
    if layout.base_slot.numel() != n:
        raise ValueError(f"httm_match: layout is for N={layout.base_slot.numel()} tokens, x has N={n}")
    rows_x = x.to(_work_dtype(x.dtype)).reshape(b * h, n, d).contiguous()
    slot = layout.base_slot.to(x.device).expand(b * h, n).clone()
    classes = layout.classes if b * h else ()
    cpu_float32 = rows_x.dtype == torch.float32 and rows_x.device.type == "cpu"
    screen = httm_native.bf16_screen() if cpu_float32 and d < _SCREEN_MAX_DIM else None
    # screening reads every matched row anyway and reports a norm that is not finite; the scores
    # of such features may be NaN, so then every class is matched (again) on the float32 path, which
    # writes the slot of every source. Only that sample's: the two paths round near-ties apart, so a
    # sample's choices must not depend on whether another sample of the batch is finite
    if screen is not None and all(_match_class_screened(rows_x, cls, slot, screen) for cls in classes):
        return slot.view(b, h, n)
    if screen is not None and b > 1:
        return torch.cat([httm_match(x[i:i + 1], layout) for i in range(b)])
    clean = None
    for cls in classes:
        if not _match_class_native(rows_x, cls, slot):
            clean = _scores_may_be_nan(rows_x) if clean is None else clean
            _match_class(rows_x, cls, slot, clean)
    return slot.view(b, h, n)


def _scores_may_be_nan(x: Tensor) -> bool:
    """Whether a score of features ``x`` may be NaN: only from a non-finite feature or a dot product that
    overflows, and only then are the scores cleaned (a pass over every chunk of scores costs 10 % of the
    matching). aminmax: one pass without a temporary, where abs().amax() took 15 ms at 32 frames; NaN
    propagates."""
    if not x.numel():
        return False
    low, high = torch.aminmax(x)
    return not bool(torch.maximum(-low, high) < torch.finfo(x.dtype).max / max(x.shape[-1], 1))


def _pair_rows(x: Tensor, cls: _BlockClass) -> tuple[Tensor, Tensor]:
    """Row indices into x [E, N, d] viewed [E * N, d] of the sources [E * blocks, sources] and of the
    destinations [E * blocks * destinations] of the blocks ``cls``, per (head, block) pair."""
    e, n, _ = x.shape
    head_offset = torch.arange(e, device=x.device).view(e, 1, 1) * n
    return ((cls.src.to(x.device) + head_offset).view(-1, cls.src.shape[1]),
            (cls.dst.to(x.device) + head_offset).view(-1))


def _pair_features(x: Tensor, cls: _BlockClass) -> tuple[Tensor, Tensor, Tensor]:
    """(x [E, N, d] viewed [E * N, d], source rows [pairs, sources] into it, the normalised destinations
    [pairs, destinations, d]) of the blocks ``cls``, per (head, block) pair (``_pair_rows``)."""
    e, n, d = x.shape
    src_rows, dst_rows = _pair_rows(x, cls)
    flat_x = x.view(e * n, d)
    if x.device.type != "cpu":
        dst = F.normalize(flat_x.index_select(0, dst_rows), dim=-1)
    else:  # F.normalize's arithmetic in a scratch buffer: fresh, its 10 MB (keys, 32 frames) fault 7 ms a call
        dst = torch.index_select(flat_x, 0, dst_rows, out=memory.scratch("httm.dst", (dst_rows.numel(), d), x.dtype))
        dst.div_(dst.norm(2, -1, keepdim=True).clamp_min(_NORMALIZE_EPS))
    return flat_x, src_rows, dst.view(src_rows.shape[0], cls.dst.shape[1], d)


def _match_class_native(x: Tensor, cls: _BlockClass, slot: Tensor) -> bool:
    """``_match_class`` in one native kernel (``httm_native.best_destinations``: the GEMM and the argmax
    in one pass, no score tensor); False, with nothing written, where that kernel does not run."""
    if not httm_native.matching_kernel_runs(x):
        return False
    flat_x, src_rows, dst = _pair_features(x, cls)
    best = torch.empty(src_rows.shape, dtype=torch.long, device=x.device)
    if not httm_native.best_destinations(flat_x, src_rows, dst, best):
        return False
    _assign(cls, slot, best)
    return True


def _match_class(x: Tensor, cls: _BlockClass, slot: Tensor, clean: bool) -> None:
    """Write the best destination slot of every source of the blocks ``cls`` into ``slot`` [E, N];
    ``clean``: scores may be NaN (``_scores_may_be_nan``).

    The batch of the GEMMs is (head, block) pairs; a chunk is up to ``_SCORE_FLOATS`` scores: as
    many source rows as fit (tall GEMMs run fastest), then as many pairs as fit.
    """
    e, n, d = x.shape
    nb, ns = cls.src.shape
    nd = cls.dst.shape[1]
    pairs = e * nb
    flat_x, src_rows, dst = _pair_features(x, cls)
    dst = dst.transpose(1, 2)
    rows = min(ns, max(_MIN_ROWS, _SCORE_FLOATS // nd))
    per_chunk = min(pairs, max(1, _SCORE_FLOATS // (rows * nd)))
    scores = torch.empty(per_chunk * rows * nd, device=x.device, dtype=x.dtype)
    sources = torch.empty(per_chunk * rows * d, device=x.device, dtype=x.dtype)
    best = torch.empty(pairs, ns, dtype=torch.long, device=x.device)
    for p0 in range(0, pairs, per_chunk):
        p1 = min(p0 + per_chunk, pairs)
        for r0 in range(0, ns, rows):
            r1 = min(r0 + rows, ns)
            size = (p1 - p0) * (r1 - r0)
            idx = src_rows[p0:p1, r0:r1].reshape(-1)
            src = torch.index_select(flat_x, 0, idx, out=sources[: size * d].view(size, d))
            chunk = scores[: size * nd].view(p1 - p0, r1 - r0, nd)
            torch.bmm(src.view(p1 - p0, r1 - r0, d), dst[p0:p1], out=chunk)
            if clean:  # max would pick a NaN score (a NaN destination would draw every source of its block)
                chunk.nan_to_num_(nan=-math.inf, posinf=math.inf, neginf=-math.inf)
            # torch.max returns the first maximal index (documented), the reference's tie rule
            best[p0:p1, r0:r1] = chunk.max(dim=-1).indices
    _assign(cls, slot, best)


def _assign(cls: _BlockClass, slot: Tensor, best: Tensor) -> None:
    """Write into ``slot`` [E, N] the slot of the destination ``best`` [E·blocks, sources] (a column of
    the block's destinations) that each source of the blocks ``cls`` chose."""
    e = slot.shape[0]
    nb, ns = cls.src.shape
    chosen = torch.gather(cls.dst_slot.to(slot.device).expand(e, nb, -1), 2, best.view(e, nb, ns))
    slot.index_copy_(1, cls.src.to(slot.device).reshape(-1), chosen.view(e, nb * ns))


def _match_class_screened(x: Tensor, cls: _BlockClass, slot: Tensor, screen: httm_native.Screen) -> bool:
    """``_match_class`` for float32 features on the CPU, through bfloat16 scores: per chunk, the
    sources gathered in bfloat16 and one bfloat16 GEMM, then the native kernel picks each source's
    destination, scoring again in float32 (from ``x`` itself) the destinations whose bfloat16 scores
    come within a margin of the best that it makes per row from the measured bfloat16 rounding errors
    (``httm_native.bf16_margins``). The same choices as the float32 GEMM, up to float32 rounding.
    Returns False, with this class's slots unwritten, at the first matched row whose norm is not
    finite (the screen's choices assume finite scores)."""
    e, n, d = x.shape
    nb, ns = cls.src.shape
    nd = cls.dst.shape[1]
    pairs = e * nb
    src_rows, dst_rows = _pair_rows(x, cls)
    dst16 = memory.scratch("httm.dst16", (pairs, nd, d), torch.bfloat16)
    dst_scales = memory.scratch("httm.dst_scales", (pairs * nd,))
    dst_err = ctypes.c_float()
    if screen.gather_destinations(x.data_ptr(), dst_rows.data_ptr(), pairs * nd, d, _NORMALIZE_EPS, dst16.data_ptr(),
                                  dst_scales.data_ptr(), ctypes.addressof(dst_err)):
        return False
    dst16 = dst16.transpose(1, 2)
    gamma, out_rel, abs_margin = httm_native.bf16_margins(d)
    rows = min(ns, max(_MIN_ROWS, _SCREEN_SCORES // nd))
    per_chunk = min(pairs, max(1, _SCREEN_SCORES // (rows * nd)))
    scores = memory.scratch("httm.scores", (per_chunk * rows * nd,), torch.bfloat16)
    sources16 = memory.scratch("httm.sources16", (per_chunk * rows, d), torch.bfloat16)
    norms = memory.scratch("httm.norms", (per_chunk * rows,))
    errs = memory.scratch("httm.errs", (per_chunk * rows,))
    best = torch.empty(pairs, ns, dtype=torch.long)
    for p0 in range(0, pairs, per_chunk):
        p1 = min(p0 + per_chunk, pairs)
        for r0 in range(0, ns, rows):
            r1 = min(r0 + rows, ns)
            size = (p1 - p0) * (r1 - r0)
            idx = src_rows[p0:p1, r0:r1].contiguous()
            if screen.gather_sources(x.data_ptr(), idx.data_ptr(), size, d, sources16.data_ptr(), norms.data_ptr(),
                                     errs.data_ptr()):
                return False
            chunk = scores[: size * nd].view(p1 - p0, r1 - r0, nd)
            torch.bmm(sources16[:size].view(p1 - p0, r1 - r0, d), dst16[p0:p1], out=chunk)
            if screen.best_destinations(chunk.data_ptr(), p1 - p0, r1 - r0, nd, x.data_ptr(), idx.data_ptr(),
                                        norms.data_ptr(), errs.data_ptr(), dst_rows[p0 * nd:].data_ptr(),
                                        dst_scales[p0 * nd:].data_ptr(), dst_err.value, d, gamma, out_rel, abs_margin,
                                        best[p0, r0:].data_ptr(), ns) < 0:
                raise MemoryError("httm_match: out of memory for the candidates of a row")
    _assign(cls, slot, best)
    return True


def _flat(slot: Tensor, length: int) -> Tensor:
    """Slots [h, N] into a table of h groups of ``length`` rows -> row indices into [h * length]."""
    return (slot + torch.arange(slot.shape[0], device=slot.device).unsqueeze(1) * length).reshape(-1)


def _group_sums(x: Tensor, flat: Tensor, rows: int, name: str, segments: int) -> Tensor:
    """Sums (in ``_work_dtype``) of the rows of x [.., d] over groups ``flat`` (one index_add) -> [rows, d],
    in the scratch buffer ``name`` on the CPU (a temporary of the op). ``flat`` comes from ``_flat``:
    ``segments`` equal runs of rows (samples x heads), each into its own equal run of groups."""
    d, dtype = x.shape[-1], _work_dtype(x.dtype)
    rows_x = x.reshape(-1, d).to(dtype)
    if x.device.type == "cpu":
        out = memory.scratch(name, (rows, d), dtype).zero_()
    else:
        out = torch.zeros(rows, d, device=x.device, dtype=dtype)
    if not httm_native.group_sums(rows_x, flat, out, max(segments, 1)):  # no samples or heads: no rows
        out.index_add_(0, flat, rows_x)
    return out


def _means(sums: Tensor, counts: Tensor) -> Tensor:
    """Group sums [rows, d] divided in place by their sizes; empty groups (query padding) stay 0."""
    return sums.div_(counts.clamp(min=1).unsqueeze(-1).to(sums.dtype))


def _deviations(x: Tensor, groups: Tensor, num_slots: int) -> Tensor:
    """Step 5's deviation of every token from the mean of its group, [E, N], for x [E, N, d] (work dtype).

    0 for a token alone in its group. The two members of a pair deviate equally: both get the
    larger of their two rounded values, so the outlier tie rule decides between them.
    """
    e, n, d = x.shape
    flat = _flat(groups, num_slots)
    counts = torch.bincount(flat, minlength=e * num_slots)
    means = _means(_group_sums(x, flat, e * num_slots, "httm.means", e), counts)
    dev = httm_native.deviations(x.view(-1, d), flat, means)
    if dev is None:
        dev = _deviations_aten(x, flat, means)
    size = counts.index_select(0, flat)
    pair = torch.zeros(e * num_slots, device=x.device, dtype=x.dtype).scatter_reduce_(0, flat, dev, "amax")
    return torch.where(size == 2, pair.index_select(0, flat), dev).masked_fill_(size == 1, 0.0).view(e, n)


def _deviations_aten(x: Tensor, flat: Tensor, means: Tensor) -> Tensor:
    """|x[i] - means[flat[i]]| for the rows of x [E, N, d] -> [E * N] (``_deviations`` without the kernel)."""
    e, n, d = x.shape
    # row chunks through one small buffer: a fresh [E * N, d] tensor costs more in page faults
    # than the subtraction it holds
    rows = x.view(-1, d)
    dev = torch.empty(e * n, device=x.device, dtype=x.dtype)
    step = max(1, _SCORE_FLOATS // d)
    own_mean = torch.empty(min(step, e * n), d, device=x.device, dtype=x.dtype)
    for r0 in range(0, e * n, step):
        r1 = min(r0 + step, e * n)
        chunk = torch.index_select(means, 0, flat[r0:r1], out=own_mean[: r1 - r0])
        torch.linalg.vector_norm(chunk.sub_(rows[r0:r1]), dim=-1, out=dev[r0:r1])
    return dev


def _top_fraction_mask(values: Tensor, count: int) -> Tensor:
    """Boolean mask of the ``count`` largest entries per row of ``values`` [B, M]; ties -> lower index.

    NaN counts as +inf: topk puts NaN first, but a NaN k-th value would match nothing (no outlier at
    all in that row), and a NaN deviation is the one that most needs to leave its group.
    """
    if count == 0:
        return torch.zeros_like(values, dtype=torch.bool)
    values = values.nan_to_num(nan=math.inf, posinf=math.inf, neginf=-math.inf)
    kth = torch.topk(values, count, dim=1, sorted=False).values.amin(dim=1, keepdim=True)
    above = values > kth
    need = count - above.sum(dim=1, keepdim=True)
    tied = values == kth
    return above | (tied & (tied.cumsum(dim=1) <= need))


@dataclass(frozen=True)
class HttmPlan:
    """Index maps of one HTTM call (per sample b and head h).

    q_slot [B, H, N]: merged query row holding each token (the unmerge map); q_lengths [B, H]: merged
    queries per head incl. outliers (the op pads to the max); kv_slot [B, H, N]: merged key/value row
    of each token; kv_length: merged keys per head (same for all heads); outliers [B, H, N] bool.
    """

    q_slot: Tensor
    q_lengths: Tensor
    kv_slot: Tensor
    kv_length: int
    outliers: Tensor

    @property
    def q_length_max(self) -> int:
        return int(self.q_lengths.max()) if self.q_lengths.numel() else 0

    @property
    def outlier_counts(self) -> Tensor:
        """Outliers per sample and head, [B, H]."""
        return self.outliers.sum(dim=-1)


def _layouts(frames, tokens_per_frame, special_tokens, q_ratio, kv_ratio, n_s, n_t, anchor_first_frame, dst_rule,
             seed, mode):
    whole = mode == "global"
    args = (frames, tokens_per_frame, special_tokens)
    tail = (n_s, n_t, anchor_first_frame, dst_rule, seed, whole)
    return httm_layout(*args, float(q_ratio), *tail), httm_layout(*args, float(kv_ratio), *tail)


def httm_plan(q: Tensor, k: Tensor, frames: int, tokens_per_frame: int, special_tokens: int = 5,
              q_ratio: float = 0.9, kv_ratio: float = 0.7, n_s: int = 128, n_t: int = 30,
              outlier_fraction: float = 0.1, anchor_first_frame: bool = False, dst_rule: str = "strided",
              seed: int = 0, mode: str = "headwise") -> HttmPlan:
    """Match, merge and filter outliers for q, k ``[B, H, N, d]``; returns the index maps (steps 0-5)."""
    _check_tensors(q, k, k)
    _check_config(frames, tokens_per_frame, special_tokens, q_ratio, kv_ratio, n_s, n_t, outlier_fraction,
                  dst_rule, mode, num_tokens=q.shape[2])
    q_layout, kv_layout = _layouts(frames, tokens_per_frame, special_tokens, q_ratio, kv_ratio, n_s, n_t,
                                   anchor_first_frame, dst_rule, seed, mode)
    b, h, n, d = q.shape
    uniform = mode == "uniform"
    q_rows = q.to(_work_dtype(q.dtype)).contiguous()
    q_metric = q_rows.mean(1, keepdim=True) if uniform else q_rows
    k_metric = k.to(_work_dtype(k.dtype)).mean(1, keepdim=True) if uniform else k
    q_groups = httm_match(q_metric, q_layout).expand(b, h, n)
    kv_slot = httm_match(k_metric, kv_layout).expand(b, h, n).contiguous()

    # adaptive outlier filtering: deviation of each query from the mean of its initial group
    g = q_layout.num_slots
    deviation = _deviations(q_rows.view(b * h, n, d), q_groups.reshape(b * h, n), g).view(b, h, n)
    if uniform:
        pooled = deviation.square().sum(1).sqrt()  # [B, N]
        if _any_nan(pooled):
            pooled = _non_finite_first(pooled, q_rows.isfinite().all(dim=-1).all(dim=1))
        outliers = _top_fraction_mask(pooled, round(outlier_fraction * n)).unsqueeze(1).expand(b, h, n)
    else:
        if _any_nan(deviation):
            deviation = _non_finite_first(deviation, q_rows.isfinite().all(dim=-1))
        outliers = _top_fraction_mask(deviation.view(b, h * n), round(outlier_fraction * h * n)).view(b, h, n)

    # outliers leave their group and become their own queries; empty groups disappear
    token = torch.arange(n, device=q.device).expand(b, h, n)
    key = torch.where(outliers, g + token, q_groups)
    used = torch.zeros(b, h, g + n, dtype=torch.bool, device=q.device).scatter_(2, key, True)
    q_slot = torch.gather(used.cumsum(dim=-1).sub_(1), 2, key)
    return HttmPlan(q_slot, used.sum(dim=-1), kv_slot, kv_layout.num_slots, outliers.contiguous())


def _non_finite_first(deviation: Tensor, finite: Tensor) -> Tensor:
    """``deviation`` ranked for the outlier selection when some of it is NaN: the NaN deviation of a
    query whose own features are not finite (``finite`` False, same shape) above every other, any
    other NaN or infinite deviation (a finite query sharing a group with such a query) at the
    largest finite value. Every member of a group holding a NaN query deviates NaN from its NaN
    mean; ranked alike, the tie rule sent the finite members of lower index out of the group first
    and the budget could run out before the NaN query itself left."""
    top = torch.finfo(deviation.dtype).max
    own = deviation.isnan() & ~finite
    return deviation.nan_to_num(nan=top, posinf=top).masked_fill_(own, math.inf)


def _any_nan(t: Tensor) -> bool:
    """Whether ``t`` holds a NaN: one reduction, no temporary (the minimum of a tensor with a NaN is NaN)."""
    return t.numel() > 0 and bool(torch.aminmax(t).min.isnan())


def httm_apply_plan(q: Tensor, k: Tensor, v: Tensor, plan: HttmPlan, proportional_attention: bool = False,
                    scale: float | None = None) -> Tensor:
    """Steps 6-7: merge by the plan's maps, attend on the short sequences, copy rows back.

    Merging is one index_add per tensor over all samples and heads, into ``[B, H, M, d]`` tables
    SDPA reads as they are; queries are padded to the longest head (padded rows are zero queries
    whose outputs are never read); the unmerge is one gather.
    """
    _check_tensors(q, k, v)
    b, h, n, d = q.shape
    # the maps are flat indices over B * H * N: a plan for another [B, H, N] with as many entries
    # (B=2, H=2 for B=1, H=4) would run without an error on the wrong samples and heads
    if tuple(plan.q_slot.shape) != (b, h, n) or tuple(plan.kv_slot.shape) != (b, h, n):
        raise ValueError(f"httm_apply_plan: plan is for q of [B, H, N] = {list(plan.q_slot.shape)}, "
                         f"got q of shape {tuple(q.shape)}")
    dv = v.shape[-1]
    m_q, m_kv = plan.q_length_max, plan.kv_length
    if b * h == 0:
        return q.new_empty(b, h, n, dv)
    q_flat, kv_flat = _flat(plan.q_slot.reshape(b * h, n), m_q), _flat(plan.kv_slot.reshape(b * h, n), m_kv)
    q_counts = torch.bincount(q_flat, minlength=b * h * m_q)
    q_merged = _means(_group_sums(q, q_flat, b * h * m_q, "httm.q_merged", b * h), q_counts)
    sizes = torch.bincount(kv_flat, minlength=b * h * m_kv)
    k_merged = _means(_group_sums(k, kv_flat, b * h * m_kv, "httm.k_merged", b * h), sizes)
    v_merged = _means(_group_sums(v, kv_flat, b * h * m_kv, "httm.v_merged", b * h), sizes)
    bias = sizes.view(b, h, 1, m_kv).to(q.dtype).log() if proportional_attention else None
    merged_out = F.scaled_dot_product_attention(
        q_merged.view(b, h, m_q, d).to(q.dtype), k_merged.view(b, h, m_kv, d).to(q.dtype),
        v_merged.view(b, h, m_kv, dv).to(q.dtype), attn_mask=bias, scale=scale)
    # torch's CPU SDPA kernel returns 0, not NaN, for a row of all-NaN logits (a NaN query, or only
    # NaN keys) when there are fewer keys than its vector width; merging makes short key sequences
    # where the full one was long enough to give NaN, so put the NaN back (the reference's softmax)
    # (looked for only when some merged feature is NaN: the masks cost 3 % of the op)
    if _any_nan(q_merged) or _any_nan(k_merged):
        all_nan = q_merged.isnan().any(-1).view(b, h, m_q) | k_merged.isnan().any(-1).view(b, h, m_kv).all(-1, True)
        merged_out.masked_fill_(all_nan.unsqueeze(-1), math.nan)
    table = merged_out.reshape(-1, dv)
    if q.device.type != "cpu":
        return table.index_select(0, q_flat).view(b, h, n, dv)
    out = torch.empty((b, h, n, dv), dtype=table.dtype)
    if not httm_native.gather_rows(table, q_flat, out.view(-1, dv)):
        torch.index_select(table, 0, q_flat, out=out.view(-1, dv))
    return out


# ----------------------------------------------------------------------------------------------
# The op
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("fxslim::httm_attention", mutates_args=())
def httm_attention(q: Tensor, k: Tensor, v: Tensor, frames: int, tokens_per_frame: int, special_tokens: int = 5,
                   q_ratio: float = 0.9, kv_ratio: float = 0.7, n_s: int = 128, n_t: int = 30,
                   outlier_fraction: float = 0.1, proportional_attention: bool = False,
                   anchor_first_frame: bool = False, dst_rule: str = "strided", seed: int = 0,
                   mode: str = "headwise", scale: float | None = None) -> Tensor:
    """HTTM attention: q, k [B, H, N, d], v [B, H, N, d_v] -> [B, H, N, d_v] (SDPA's output shape).

    frames * tokens_per_frame must equal N (frame-major tokens, ``special_tokens`` first in each
    frame). q_ratio / kv_ratio are the fractions REMOVED by merging; outlier_fraction of the H*N
    queries come back unmerged. All arguments are explicit so they show up in graphs.

    One frame (``frames == 1``) is SDPA itself: a global attention over one frame is that frame's
    attention, which HTTM leaves alone (docs/methods/HTTM.md), as the pass does when the example
    has one frame; a graph rewritten at more frames then computes what it would have left dense.
    """
    if frames == 1:
        _check_tensors(q, k, v)
        _check_config(frames, tokens_per_frame, special_tokens, q_ratio, kv_ratio, n_s, n_t, outlier_fraction,
                      dst_rule, mode, num_tokens=q.shape[2])
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    plan = httm_plan(q, k, frames, tokens_per_frame, special_tokens, q_ratio, kv_ratio, n_s, n_t,
                     outlier_fraction, anchor_first_frame, dst_rule, seed, mode)
    return httm_apply_plan(q, k, v, plan, proportional_attention, scale)  # checks v


@httm_attention.register_fake
def _(q, k, v, frames, tokens_per_frame, special_tokens=5, q_ratio=0.9, kv_ratio=0.7, n_s=128, n_t=30,
      outlier_fraction=0.1, proportional_attention=False, anchor_first_frame=False, dst_rule="strided", seed=0,
      mode="headwise", scale=None):
    _check_tensors(q, k, v)
    _check_config(frames, tokens_per_frame, special_tokens, q_ratio, kv_ratio, n_s, n_t, outlier_fraction,
                  dst_rule, mode, num_tokens=q.shape[2])
    return q.new_empty((*q.shape[:3], v.shape[-1]))


# ----------------------------------------------------------------------------------------------
# Predicted sizes (configuration only, no data)
# ----------------------------------------------------------------------------------------------


def httm_kept_lengths(frames: int, tokens_per_frame: int, special_tokens: int = 5, q_ratio: float = 0.9,
                      kv_ratio: float = 0.7, n_s: int = 128, n_t: int = 30, outlier_fraction: float = 0.1,
                      anchor_first_frame: bool = False, mode: str = "headwise") -> tuple[int, int]:
    """Predicted (kept queries per head, kept keys/values per head) from the configuration: the
    merged lengths of the layouts the op uses.

    kept_kv is exact. kept_q = special tokens + destinations + round(f * N), the per-head average when
    every outlier comes out of a group that keeps another member (usual case; the op pads every
    head of the batch to the longest one, which this ignores). One frame keeps every token (the op is SDPA).
    """
    _check_config(frames, tokens_per_frame, special_tokens, q_ratio, kv_ratio, n_s, n_t, outlier_fraction,
                  "strided", mode)
    n = frames * tokens_per_frame
    if frames == 1:  # the op is SDPA
        return n, n
    side = functools.partial(httm_layout, frames, tokens_per_frame, special_tokens, n_s=n_s, n_t=n_t,
                             anchor_first_frame=anchor_first_frame, whole_sequence=mode == "global")
    return min(n, side(q_ratio).num_slots + round(outlier_fraction * n)), side(kv_ratio).num_slots
