"""Loop-based reference of ``fxslim::httm_attention``, written step by step from docs/methods/HTTM.md.

Slow on purpose (Python loops over samples, heads, blocks and tokens): it is the oracle the fast
kernel in :mod:`fxslim.runtime.httm` is tested against, for small sizes only (N of a few hundred).
It follows the same documented choices (block order, time-innermost blocks, strided destinations,
tie-breaking, row order of the merged sequences) but shares none of the kernel's code apart from the
argument checks and the :class:`HttmPlan` container.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch
from torch import Tensor

from fxslim.runtime.httm import HttmPlan, _check_config, _check_tensors

__all__ = ["reference_blocks", "reference_permutation", "httm_plan_reference", "httm_attention_reference"]

_EPS = 1e-12


def reference_blocks(frames: int, tokens_per_frame: int, special_tokens: int, n_s: int, n_t: int,
                     whole_sequence: bool = False) -> tuple[list[int], list[tuple[int, int, list[int]]]]:
    """Step 0: special tokens (frame-major) and blocks as (first frame, frames in block, tokens).

    Tokens of a block are listed time innermost: for each patch position, its frames in order.
    """
    patches = tokens_per_frame - special_tokens
    if whole_sequence:
        n_s, n_t = max(patches, 1), frames
    specials = [s * tokens_per_frame + j for s in range(frames) for j in range(special_tokens)]
    blocks = []
    for f0, f1 in _runs(frames, n_t):
        for p0, p1 in _runs(patches, n_s):
            tokens = []
            for p in range(p0, p1):
                for f in range(f0, f1):
                    tokens.append(f * tokens_per_frame + special_tokens + p)
            blocks.append((f0, f1 - f0, tokens))
    return specials, blocks


def _runs(length: int, cap: int) -> list[tuple[int, int]]:
    """The fewest runs of at most ``cap`` covering ``length``, lengths differing by at most one, longer first."""
    count = math.ceil(length / cap)
    runs, start = [], 0
    for i in range(count):
        size = length // count + (1 if i < length % count else 0)
        runs.append((start, start + size))
        start += size
    return runs


def reference_permutation(frames: int, tokens_per_frame: int, special_tokens: int, n_s: int, n_t: int,
                          whole_sequence: bool = False) -> list[int]:
    """pi as a list: reordered position i holds original token pi[i]."""
    specials, blocks = reference_blocks(frames, tokens_per_frame, special_tokens, n_s, n_t, whole_sequence)
    order = list(specials)
    for _, _, tokens in blocks:
        order.extend(tokens)
    return order


def _destinations(n_b: int, first_frame: int, n_frames: int, ratio: float, anchor: bool, generator):
    """Step 2 (+8): local indices of the destinations of one block, and r."""
    removed = min(round(Fraction(str(float(ratio))) * n_b), n_b - 1)
    anchored = [i for i in range(n_b) if anchor and first_frame == 0 and i % n_frames == 0]
    n_dst = max(n_b - removed, len(anchored))
    rest = [i for i in range(n_b) if i not in anchored]
    count = n_dst - len(anchored)
    chosen = []
    if count > 0:
        if generator is None:
            chosen = [rest[(i * len(rest)) // count] for i in range(count)]
        else:
            chosen = [rest[j] for j in torch.randperm(len(rest), generator=generator)[:count].tolist()]
    return sorted(anchored + chosen), removed


def _cosine(a: Tensor, b: Tensor) -> float:
    """Similarity of source a to destination b: a . b / |b|, the cosine up to the factor 1 / |a|,
    which is the same for all of a's destinations (dividing by it would turn an infinite source's
    scores into NaN, losing the choice). -inf for NaN, so a NaN similarity never wins."""
    score = float(torch.dot(a, b / b.norm().clamp(min=_EPS)))
    return -math.inf if math.isnan(score) else score


def _rank(deviation: float, finite: bool) -> tuple[bool, float]:
    """Outlier rank of a deviation (larger leaves first): the NaN deviation of a query whose own
    features are not finite above all, any other NaN with +inf, above every number."""
    if math.isnan(deviation):
        return not finite, math.inf
    return False, deviation


def _groups_one_side(x: Tensor, specials, blocks, ratio, anchor, dst_rule, seed) -> tuple[list[list[int]], int]:
    """Steps 1-4 for one side and one sample: per head, the initial group slot of every token.

    x: [H', N, d]. Returns (slot lists per head, number of slots).
    """
    heads, n, _ = x.shape
    slots_per_head = []
    for h in range(heads):
        generator = torch.Generator().manual_seed(seed) if dst_rule == "random" else None
        slot = [-1] * n
        for i, token in enumerate(specials):
            slot[token] = i
        next_slot = len(specials)
        for first_frame, n_frames, tokens in blocks:
            dst_local, removed = _destinations(len(tokens), first_frame, n_frames, ratio, anchor, generator)
            dst = [tokens[i] for i in dst_local]
            for token in dst:
                slot[token] = next_slot
                next_slot += 1
            sources = [t for t in tokens if t not in dst]
            matches = []  # (score, source, best destination); first maximum wins
            for u in sources:
                best, best_score = None, None
                for v in dst:
                    score = _cosine(x[h, u], x[h, v])
                    if best_score is None or score > best_score:
                        best, best_score = v, score
                matches.append((best_score, u, best))
            ranked = sorted(matches, key=lambda m: -m[0])  # stable: ties keep source order
            selected = ranked[:removed]
            assert len(selected) == len(sources), "every source folds when destinations are n_b - r"
            for _, u, v in selected:
                slot[u] = slot[v]
        slots_per_head.append(slot)
    return slots_per_head, next_slot


def httm_plan_reference(q: Tensor, k: Tensor, frames: int, tokens_per_frame: int, special_tokens: int = 5,
                        q_ratio: float = 0.9, kv_ratio: float = 0.7, n_s: int = 128, n_t: int = 30,
                        outlier_fraction: float = 0.1, anchor_first_frame: bool = False,
                        dst_rule: str = "strided", seed: int = 0, mode: str = "headwise") -> HttmPlan:
    """Loop version of :func:`fxslim.runtime.httm.httm_plan` (same outputs, exact index maps)."""
    _check_tensors(q, k, k)
    _check_config(frames, tokens_per_frame, special_tokens, q_ratio, kv_ratio, n_s, n_t, outlier_fraction,
                  dst_rule, mode, num_tokens=q.shape[2])
    batch, heads, n, _ = q.shape
    specials, blocks = reference_blocks(frames, tokens_per_frame, special_tokens, n_s, n_t, mode == "global")
    q_slot = torch.zeros(batch, heads, n, dtype=torch.long)
    kv_slot = torch.zeros(batch, heads, n, dtype=torch.long)
    q_lengths = torch.zeros(batch, heads, dtype=torch.long)
    outliers = torch.zeros(batch, heads, n, dtype=torch.bool)
    kv_length = 0
    for b in range(batch):
        # planned in float64 for float64 inputs, else in float32 (the kernel's rule)
        work = torch.float64 if q.dtype == torch.float64 else torch.float32
        qb, kb = q[b].to(work), k[b].to(work)
        q_metric = qb.mean(0, keepdim=True) if mode == "uniform" else qb
        k_metric = kb.mean(0, keepdim=True) if mode == "uniform" else kb
        side = (specials, blocks)
        q_groups, num_q_slots = _groups_one_side(q_metric, *side, q_ratio, anchor_first_frame, dst_rule, seed)
        k_groups, kv_length = _groups_one_side(k_metric, *side, kv_ratio, anchor_first_frame, dst_rule, seed)
        if mode == "uniform":
            q_groups, k_groups = q_groups * heads, k_groups * heads

        # step 5: deviation of each query from its initial merged token
        deviation = [[0.0] * n for _ in range(heads)]
        for h in range(heads):
            members: dict[int, list[int]] = {}
            for u in range(n):
                members.setdefault(q_groups[h][u], []).append(u)
            for group in members.values():
                if len(group) > 1:
                    mean = torch.stack([qb[h, u] for u in group]).mean(0)
                    for u in group:
                        deviation[h][u] = float((qb[h, u] - mean).norm())
                if len(group) == 2:  # a pair deviates equally: one shared value, the tie rule decides
                    values = [deviation[h][u] for u in group]
                    shared = math.nan if any(math.isnan(d) for d in values) else max(values)  # NaN wins, as amax
                    for u in group:
                        deviation[h][u] = shared
        finite = qb.isfinite().all(dim=-1).tolist()  # [heads][n]
        flagged = [[False] * n for _ in range(heads)]
        if mode == "uniform":
            pooled = [sum(deviation[h][u] ** 2 for h in range(heads)) ** 0.5 for u in range(n)]
            token_finite = [all(finite[h][u] for h in range(heads)) for u in range(n)]
            order = sorted(range(n), key=lambda u: (_rank(pooled[u], token_finite[u]), -u), reverse=True)
            for u in order[: round(outlier_fraction * n)]:
                for h in range(heads):
                    flagged[h][u] = True
        else:
            order = sorted(((h, u) for h in range(heads) for u in range(n)),
                           key=lambda hu: (_rank(deviation[hu[0]][hu[1]], finite[hu[0]][hu[1]]), -(hu[0] * n + hu[1])),
                           reverse=True)
            for h, u in order[: round(outlier_fraction * heads * n)]:
                flagged[h][u] = True

        for h in range(heads):
            # outliers leave their groups; groups keep their slot order, then outliers in token order
            new_slot: dict[int, int] = {}
            for slot in range(num_q_slots):
                if any(q_groups[h][u] == slot and not flagged[h][u] for u in range(n)):
                    new_slot[slot] = len(new_slot)
            count = len(new_slot)
            for u in range(n):
                if flagged[h][u]:
                    q_slot[b, h, u] = count
                    count += 1
                else:
                    q_slot[b, h, u] = new_slot[q_groups[h][u]]
                outliers[b, h, u] = flagged[h][u]
                kv_slot[b, h, u] = k_groups[h][u]
            q_lengths[b, h] = count
    return HttmPlan(q_slot, q_lengths, kv_slot, kv_length, outliers)


def httm_attention_reference(q: Tensor, k: Tensor, v: Tensor, frames: int, tokens_per_frame: int,
                             special_tokens: int = 5, q_ratio: float = 0.9, kv_ratio: float = 0.7, n_s: int = 128,
                             n_t: int = 30, outlier_fraction: float = 0.1, proportional_attention: bool = False,
                             anchor_first_frame: bool = False, dst_rule: str = "strided", seed: int = 0,
                             mode: str = "headwise", scale: float | None = None) -> tuple[Tensor, HttmPlan]:
    """Steps 0-7 with explicit loops and an explicit softmax; returns (output, plan). One frame is
    dense attention (as the op: a one-frame global attention is frame attention): a plan of singletons."""
    _check_tensors(q, k, v)
    batch, heads, n, d = q.shape
    if frames == 1:
        _check_config(frames, tokens_per_frame, special_tokens, q_ratio, kv_ratio, n_s, n_t, outlier_fraction,
                      dst_rule, mode, num_tokens=n)
        every = torch.arange(n).expand(batch, heads, n)
        plan = HttmPlan(every.clone(), torch.full((batch, heads), n), every.clone(), n,
                        torch.zeros(batch, heads, n, dtype=torch.bool))
    else:
        plan = httm_plan_reference(q, k, frames, tokens_per_frame, special_tokens, q_ratio, kv_ratio, n_s, n_t,
                                   outlier_fraction, anchor_first_frame, dst_rule, seed, mode)
    scale = d**-0.5 if scale is None else scale
    out = torch.zeros(batch, heads, n, v.shape[-1], dtype=q.dtype)
    for b in range(batch):
        for h in range(heads):
            q_rows, k_rows, v_rows, sizes = [], [], [], []
            for slot in range(int(plan.q_lengths[b, h])):
                members = [u for u in range(n) if plan.q_slot[b, h, u] == slot]
                q_rows.append(torch.stack([q[b, h, u] for u in members]).mean(0))
            for slot in range(plan.kv_length):
                members = [u for u in range(n) if plan.kv_slot[b, h, u] == slot]
                k_rows.append(torch.stack([k[b, h, u] for u in members]).mean(0))
                v_rows.append(torch.stack([v[b, h, u] for u in members]).mean(0))
                sizes.append(len(members))
            logits = torch.stack(q_rows) @ torch.stack(k_rows).T * scale
            if proportional_attention:
                logits = logits + torch.tensor(sizes, dtype=logits.dtype).log()
            merged_out = torch.softmax(logits, dim=-1) @ torch.stack(v_rows)
            for u in range(n):
                out[b, h, u] = merged_out[plan.q_slot[b, h, u]]
    return out, plan
