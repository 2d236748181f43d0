"""HTTM pass: global (all-frames) SDPA -> ``fxslim::httm_attention`` (head-wise temporal token merging).

Matches softmax attention whose sequence spans every frame (its batch is the model's batch or 1,
or RoPE positions show all frames), in SDPA form, in any IR (symbolic trace, dynamo, export);
frame, window and head attention, other attention forms and everything else stay untouched. Emits
the op with the frame layout from the pass config, else from the RoPE positions feeding q (the
integer ``[..., N, 2]`` tensor, evaluated from the graph); an owning module's
``fxslim_frame_layout``, when the graph module still holds it, marks frame attention and fixes the
special tokens. The graph reads the frames from a [B, S, C, H, W] input where it has one, else
computes frames = N // tokens_per_frame unless ``frames`` is configured, so the result runs at any
frame count. Whether q, k and v are one sequence: ``httm_sources``. Needs node
shapes (``fxslim.capture`` provides them). Semantics and defaults: docs/methods/HTTM.md.
"""

from __future__ import annotations

import builtins
import operator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.fx as fx
import torch.nn.functional as F

from fxslim.config import check_choice, check_int, check_range
from fxslim.ir import (
    AttentionView, LinearView, META_CALL_SHAPES, META_PLACEHOLDER_FQNS, META_PREFIX, meta_val, node_fqn, size_hint,
    views,
)
from fxslim.passes.base import Candidate, Pass, PassContext, PassReport, register_pass
from fxslim.passes.httm_sources import cross_tokens, data_ancestors, sized_by_values
from fxslim.passes.matchers import attention_scope, match_attention
from fxslim.propagate import propagate_node
from fxslim.runtime.frame_layout import (
    FrameLayout, clip_frames, frame_layout_from_positions, frames_for_trace, read_frame_layout,
)
from fxslim.runtime.httm import DST_RULES, MODES, httm_kept_lengths

__all__ = ["HTTM"]

_OP = torch.ops.fxslim.httm_attention.default
_SDPA = (F.scaled_dot_product_attention, torch.ops.aten.scaled_dot_product_attention.default)
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
_POSITION_HOPS = 16  # how far above q to look for the RoPE positions
_MAX_EVAL_NODES = 256  # positions come from a few shape-driven ops; more means they depend on activations
_COMPILE_AFTER = ("rewrite first and compile the result: "
                  "torch.compile(fxslim.optimize(model, inputs, passes=[...]).module)")
_BREAK_HINT = (" in this graph (if a graph break such as int(positions.max()) in a RoPE cuts them off, set "
               "torch._dynamo.config.capture_scalar_outputs = True; if the graph still breaks there (a table "
               f"cached in a dict keyed by that int), {_COMPILE_AFTER}; or pass HTTM(tokens_per_frame=..., "
               "special_tokens=...))")
_EVAL_ERRORS = (RuntimeError, TypeError, ValueError, IndexError, NotImplementedError)


@dataclass(frozen=True)
class _Layout:
    """Frame layout of one global attention at the example; ``frames``: configured frame count
    (None = read at run time). ``per_frame``: a node whose ``size(-2)`` is tokens_per_frame at run
    time (the per-frame positions the global ones are built from); ``frames_of``: (the model's
    [B, S, C, H, W] input, None) whose size(1) is the frame count at run time, or (input, C) when
    its example had S == C (``clip_frames`` tells the dims apart on every call); ``positions``:
    positions that arrive as a graph input of an eager graph, read on every call. With none of
    them, tokens_per_frame stays the example's (configured, or nothing in the graph tracks it)."""

    tokens_per_frame: int
    special_tokens: int
    frames: int | None
    example_frames: int
    grid: tuple[int, int] | None
    source: str
    per_frame: fx.Node | None = None
    frames_of: tuple[fx.Node, int | None] | None = None
    positions: fx.Node | None = None

    @property
    def runtime(self) -> str:
        """How the rewritten graph finds the layout at run time (for the report)."""
        if self.frames is not None and self.frames_of is None:
            return f"frames={self.frames}, tokens_per_frame = N // {self.frames}"
        if self.per_frame is not None:
            return f"tokens_per_frame = {self.per_frame.name}.size(-2), frames = N // tokens_per_frame"
        if self.frames_of is not None:
            node, channels = self.frames_of
            frames = f"{node.name}.size(1)" if channels is None else f"clip_frames({node.name}, {channels})"
            return f"frames = {frames}, tokens_per_frame = N // frames"
        if self.positions is not None:
            return f"frames, tokens_per_frame = frame_layout_from_positions({self.positions.name}) on every call"
        return f"tokens_per_frame = {self.tokens_per_frame} (fixed), frames = N // {self.tokens_per_frame}"


@dataclass(frozen=True)
class _HttmCandidate(Candidate):
    layout: _Layout | None = None
    scale: Any = None


@register_pass("httm")
@dataclass(frozen=True)
class HTTM(Pass):
    """Head-wise temporal token merging in every global attention (the paper's kept ratios).

    ``q``/``kv``: fraction of queries / keys and values KEPT (paper: Q 0.2, KV 0.3); ``outliers``:
    fraction of the H*N queries returned unmerged, included in ``q`` (so merging removes
    1 - q + outliers of the queries). ``q=1, kv=1, outliers=0`` keeps everything: outputs equal
    SDPA's. ``special_tokens``, ``frames``, ``tokens_per_frame``: layout overrides (None = inferred;
    with ``frames`` or ``tokens_per_frame`` given and ``special_tokens`` not, the RoPE positions'
    count where they give one, else VGGT's 5).
    """

    q: float = 0.2
    kv: float = 0.3
    outliers: float = 0.1
    n_s: int = 128
    n_t: int = 30
    mode: Literal["headwise", "uniform", "global"] = "headwise"
    proportional_attention: bool = False
    anchor_first_frame: bool = False
    dst_rule: Literal["strided", "random"] = "strided"
    seed: int = 0
    special_tokens: int | None = None
    frames: int | None = None
    tokens_per_frame: int | None = None

    kinds = ("global_attention",)

    def validate(self) -> None:
        check_range(self, "q", 0.0, 1.0, low_open=True)
        check_range(self, "kv", 0.0, 1.0, low_open=True)
        check_range(self, "outliers", 0.0, self.q, high_open=True)
        # the removed fractions are rounded to 12 digits (1 - 0.2 + 0.1 is then 0.9): a kept
        # fraction under 5e-13 rounds to "remove everything", which the op would refuse only
        # once the pass runs, under its own argument names
        if self.q_removed >= 1.0:
            raise ValueError(f"HTTM.q: expected q - outliers >= 1e-12 (queries left to merge into), "
                             f"got q={self.q!r}, outliers={self.outliers!r}")
        if self.kv_removed >= 1.0:
            raise ValueError(f"HTTM.kv: expected kv >= 1e-12, got {self.kv!r}")
        check_int(self, "n_s", 1)
        check_int(self, "n_t", 1)
        check_choice(self, "mode", MODES)
        check_choice(self, "dst_rule", DST_RULES)
        for name in ("proportional_attention", "anchor_first_frame"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"HTTM.{name}: expected True or False, got {getattr(self, name)!r}")
        check_int(self, "seed", 0, 2**32 - 1)
        for name, low in (("special_tokens", 0), ("frames", 1), ("tokens_per_frame", 1)):
            if getattr(self, name) is not None:
                check_int(self, name, low)
        if None not in (self.special_tokens, self.tokens_per_frame) and self.special_tokens > self.tokens_per_frame:
            raise ValueError(f"HTTM.special_tokens: expected <= tokens_per_frame={self.tokens_per_frame}, "
                             f"got {self.special_tokens}")

    @property
    def q_removed(self) -> float:
        """Fraction of queries removed by merging (before outliers come back): 1 - q + outliers."""
        return round(1.0 - self.q + self.outliers, 12)

    @property
    def kv_removed(self) -> float:
        """Fraction of keys/values removed by merging: 1 - kv."""
        return round(1.0 - self.kv, 12)

    def match(self, gm: fx.GraphModule, ctx: PassContext, report: PassReport) -> list[Candidate]:
        # 1. earlier rewrites are reported, never matched again (the op is no attention view)
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target in (_OP, torch.ops.fxslim.httm_attention):
                report.skip(node, node_fqn(node, gm), "global_attention", "already_rewritten")
        out: list[Candidate] = []
        # 2. global attention from the shared matcher; 3. module metadata may say "frame"
        matches = match_attention(gm, ctx.batch_size)
        lengths = {size_hint(m.view.q_len) for m in matches if m.view.q_len is not None}
        projections = {v.node: v.input for v in views(gm) if isinstance(v, LinearView)}
        for m in matches:
            view, metadata = m.view, _module_metadata(gm, m.view.node)
            if META_CALL_SHAPES in gm.meta:  # one graph for calls of other lengths: global for one, frame for another
                report.skip(view.node, view.fqn, m.kind, "shared_by_calls",
                            f"this module runs with inputs of {gm.meta[META_CALL_SHAPES]} shapes; one rewrite "
                            "would serve them all (trace the whole model, or give each call its own module)")
                continue
            reason, detail = self._scope(gm, view, ctx, m.reason, metadata, lengths)
            if reason:
                report.skip(view.node, view.fqn, m.kind, reason, detail)
                continue
            kind = "global_attention"
            cfg = self.resolve(ctx, view.node, view.fqn, kind, report)
            if cfg is None:
                continue
            # 4. SDPA without mask/causal/dropout on q, k of one shape; 5. the frame layout
            reason, detail, scale = _check_sdpa(view)
            if not reason:
                reason, detail = cross_tokens(gm, view, projections)
            layout = None
            if not reason:
                layout, reason, detail = cfg._layout(gm, view, ctx, metadata)
            if not reason:
                reason, detail = _window_of_frames(gm, ctx, layout, view)
            if reason:
                report.skip(view.node, view.fqn, kind, reason, detail)
            else:
                out.append(_HttmCandidate(view.node, view, view.fqn, kind, cfg, (view.node,), layout, scale))
        return out

    def _scope(self, gm: fx.GraphModule, view: AttentionView, ctx: PassContext, batch_reason: str,
               metadata: dict[str, Any], lengths: set[int]) -> tuple[str, str]:
        """("", "") when this attention's sequence spans every frame (global), else (reason, detail).

        1. the owning module's metadata says frame attention: local;
        2. with ``frames`` configured, another attention of the graph ``frames`` times as long (this
           one is frame attention) or as short (this one is global) decides, whatever the batches say;
        3. batch 1: one sequence holds every token of the call, so it spans every frame;
        4. the model's batch: global, unless (``frames`` configured) that batch may hold the frames;
        5. otherwise, without a configured layout, the RoPE positions (``_positions_scope``).
        """
        if batch_reason not in ("", "local_attention", "unknown_batch"):
            return batch_reason, ""
        if metadata.get("scope") == "frame":
            return "local_attention", "the owning module's fxslim_frame_layout says scope='frame'"
        if self.frames is not None and view.q_len is not None:
            n = size_hint(view.q_len)
            if n * self.frames in lengths:
                return "local_attention", f"another attention in this graph is frames={self.frames} times as long"
            if n % self.frames == 0 and n // self.frames in lengths:
                return "", ""
        if attention_scope(view, 1) == "global":
            return "", ""
        if not batch_reason:
            detail = self._batch_may_hold_frames(gm, ctx)
            return ("unknown_batch", detail) if detail else ("", "")
        if self.frames is None and self.tokens_per_frame is None:
            return self._positions_scope(gm, view, ctx, batch_reason)
        return batch_reason, _unknown_batch_detail(ctx, batch_reason)

    def _batch_may_hold_frames(self, gm: fx.GraphModule, ctx: PassContext) -> str:
        """With ``frames`` configured, an attention at the model's batch (> 1): why that batch may be
        the frames ("" when it cannot). It may when the example's first dim is a multiple of
        ``frames`` and no input of this graph or the model is 5-d (frames on a dim of their own): a model
        fed [S, 3, H, W] runs frame attention of P tokens at that batch, which would pass for
        ``frames`` frames of P / frames tokens (only step 2 of ``_scope`` tells them apart)."""
        if (self.frames is None or size_hint(ctx.batch_size) % self.frames or _frames_input(gm, self.frames) is not None
                or any(len(shape) == 5 for shape in ctx.input_shapes)):  # the frames have a dim of their own
            return ""
        return (f"its batch {ctx.batch_size} is the example's first dim, a multiple of frames={self.frames}: it may "
                "hold the frames (frame attention, as for [S, 3, H, W] input), and no attention in this graph "
                f"{self.frames} times as long or as short tells which. Make the model trace as one graph "
                "(torch._assert instead of assert, see report.untraced) or give it [B, S, 3, H, W] images")

    def _positions_scope(self, gm: fx.GraphModule, view: AttentionView, ctx: PassContext,
                         batch_reason: str) -> tuple[str, str]:
        """(reason, detail) of an attention at a batch > 1 that is not (or not known to be) the
        model's, from the RoPE positions feeding q: global ("", "") only when they show it spanning
        all S frames of a [B, S, C, H, W] input of this graph; sequences of a few frames at such a
        batch are windows over some of the frames."""
        unknown = _unknown_batch_detail(ctx, batch_reason)
        if view.q_len is None or meta_val(view.q) is None:
            return batch_reason, unknown
        layout, why, detail = self._layout(gm, view, ctx, {})
        if why == "dynamic_frame_layout":  # a sequence over several frames whose layout cannot follow the run
            return why, detail
        if layout is None or layout.example_frames < 2:
            return batch_reason, unknown
        frames = layout.example_frames
        if _frames_input(gm, frames) is not None:
            return "", ""
        window = (f"sequences of {frames} frames (RoPE positions) at batch {size_hint(view.batch)}: a window over some "
                  "of the frames is not global attention.")
        return batch_reason, f"{window} {unknown}".strip()

    def rewrite(self, gm: fx.GraphModule, cand: Candidate, ctx: PassContext) -> dict[str, Any]:
        # sdpa(q, k, v, scale=s) -> [B, H, N, d_v]
        # httm_attention(q, k, v, frames=N // P, P, specials, ratios..., scale=s) -> [B, H, N, d_v]
        assert isinstance(cand, _HttmCandidate) and cand.layout is not None
        cfg, lay, view, graph = cand.config, cand.layout, cand.view, gm.graph
        with graph.inserting_before(cand.anchor):
            frames, per_frame = _runtime_layout(gm, ctx, view, lay)
            if isinstance(frames, fx.Node) or isinstance(per_frame, fx.Node):  # read on each call
                frames = gm.graph.call_function(frames_for_trace, (frames, per_frame))
                propagate_node(gm, frames)
            kwargs = dict(
                frames=frames, tokens_per_frame=per_frame, special_tokens=lay.special_tokens,
                q_ratio=cfg.q_removed, kv_ratio=cfg.kv_removed, n_s=cfg.n_s, n_t=cfg.n_t,
                outlier_fraction=cfg.outliers, proportional_attention=cfg.proportional_attention,
                anchor_first_frame=cfg.anchor_first_frame, dst_rule=cfg.dst_rule, seed=cfg.seed,
                mode=cfg.mode, scale=cand.scale,
            )
            new = graph.call_function(_OP, (view.q, view.k, view.v), kwargs)
            new.meta["nn_module_stack"] = dict(cand.anchor.meta.get("nn_module_stack", {}))
            propagate_node(gm, new)
        cand.anchor.replace_all_uses_with(new)
        graph.erase_node(cand.anchor)
        kept_q, kept_kv = httm_kept_lengths(
            lay.example_frames, lay.tokens_per_frame, lay.special_tokens, cfg.q_removed, cfg.kv_removed, cfg.n_s,
            cfg.n_t, cfg.outliers, cfg.anchor_first_frame, cfg.mode)
        return {"frames": lay.frames or f"N // {lay.tokens_per_frame}", "runtime_layout": lay.runtime,
                "example_frames": lay.example_frames,
                "tokens_per_frame": lay.tokens_per_frame, "special_tokens": lay.special_tokens, "grid": lay.grid,
                "layout_from": lay.source, "kept_q": kept_q, "kept_kv": kept_kv, "mode": cfg.mode}

    # ------------------------------------------------------------------------------------------
    # Frame layout

    def _layout(self, gm: fx.GraphModule, view: AttentionView, ctx: PassContext,
                metadata: dict[str, Any]) -> tuple[_Layout | None, str, str]:
        """(layout, "", "") or (None, reason, detail): config, else RoPE positions (checked against
        the special tokens of the config or the module metadata)."""
        n = size_hint(view.q_len)
        specials = self.special_tokens if self.special_tokens is not None else metadata.get("special_tokens")
        if self.frames is not None or self.tokens_per_frame is not None:
            if self.tokens_per_frame is None and n % self.frames:
                return None, "frame_layout_mismatch", f"N={n} is not a multiple of frames={self.frames}"
            p = self.tokens_per_frame if self.tokens_per_frame is not None else n // self.frames
            clips = [s for _, s in _clip_inputs(gm)]
            if self.frames is None and clips and n // p > max(clips):
                # a configured P holds at the example's image size; a dynamo graph recompiled at another
                # (7 frames of 30 tokens: N = 210 = 10 x 21) has more "frames" than its clip: the clip's
                # S gives them, as it does for fxslim.optimize's graph at run time
                if n % max(clips):
                    return None, "frame_layout_mismatch", (
                        f"N={n} has more frames of tokens_per_frame={p} than the input's {max(clips)} and does "
                        "not split into that many")
                p = n // max(clips)
            if p == 1:
                return None, "one_token_per_frame", (
                    f"N={n} is one token per frame: attention over per-frame tokens (a head's), not over "
                    "the frames' patches")
            if specials is None:  # the RoPE positions' count, where they give one; else VGGT's 1 camera + 4 registers
                specials = _positions_specials(gm, view, ctx, n, p)
            sp = 5 if specials is None else specials
            if n % p or sp > p or (self.frames is not None and self.frames * p != n):
                return None, "frame_layout_mismatch", (
                    f"N={n} does not split into frames={self.frames} x tokens_per_frame={p} "
                    f"with {sp} special tokens")
            if n == p and self.frames is None:
                return None, "single_frame", (
                    f"N={n} is one frame of tokens_per_frame={p}: frame attention, not global")
            # a configured P holds at the example's image size, a configured frame count at the
            # example's; the frame count of a [B, S, C, H, W] input, when there is one, gives both at
            # every other size (HTTM(frames=4) called with 8 frames took 8 frames of 2P tokens), unless
            # the sequence is built after a size set by values (padded views dropped by a mask)
            frames_of = _frames_input(gm, n // p) if sized_by_values(gm, view.q) is None else None
            return _Layout(p, sp, self.frames, n // p, None, "config", frames_of=frames_of), "", ""
        pos_node = _positions_node(view.q, n)
        if pos_node is None and _frames_input(gm, n) is not None:
            return None, "one_token_per_frame", (
                f"N={n} is the frame count of the model's [B, S, C, H, W] input: attention over one token per "
                "frame (a camera head's), not over the frames' patches")
        if pos_node is None:
            detail = ("no integer [.., N, 2] RoPE positions feed q (a global attention over the frames' patches "
                      "needs them, or HTTM(tokens_per_frame=..., special_tokens=...); one over a token per frame, "
                      "such as a camera head's, is rightly left alone)")
            if ctx.ir == "torch":  # a dynamo graph: positions may sit before a graph break
                detail += _BREAK_HINT
            return None, "no_frame_layout", detail
        pos, detail = _evaluate(gm, pos_node, ctx)
        found, detail = read_frame_layout(pos, n) if pos is not None else (None, detail)
        if found is None:
            return None, "no_frame_layout", (f"positions {pos_node.name}: {detail}; "
                                             "HTTM(tokens_per_frame=..., special_tokens=...) gives the layout instead")
        if specials is not None and found.special_tokens != specials:
            return None, "frame_layout_mismatch", (
                f"positions give {found.special_tokens} special tokens per frame, config/metadata {specials}")
        if found.frames < 2:
            return None, "single_frame", "one frame: nothing to merge across, and not told apart from frame attention"
        grid = (found.grid_h, found.grid_w)
        per_frame = _per_frame_positions(pos_node, found.tokens_per_frame)
        frames_of = (None if per_frame is not None or sized_by_values(gm, view.q) is not None
                     else _frames_input(gm, found.frames))
        # an eager graph may read the layout from the positions' values on each call (one small max)
        read = pos_node if per_frame is None and frames_of is None and ctx.ir == "module" else None
        # a dynamo graph does not recompile for other values of an input: positions of 6 frames of 14
        # tokens after an example of 4 frames of 21 (N = 84 both) ran as 4 frames of 21
        if (per_frame is None and frames_of is None and read is None
                and any(n.op == "placeholder" for n in data_ancestors(gm, pos_node))):
            dynamic = isinstance(view.q_len, torch.SymInt)
            return None, "dynamic_frame_layout", (
                f"the positions {pos_node.name} come in as graph input values"
                + (" and N is dynamic" if dynamic else ", whose values a compiled graph does not check")
                + f", so the example's {found.tokens_per_frame} tokens per frame would be assumed for every "
                + ("N; compile with dynamic=False or pass" if dynamic else "call of that length; compute them in the "
                   "compiled code (not before a graph break), or pass")
                + " HTTM(tokens_per_frame=..., special_tokens=...)")
        return _Layout(found.tokens_per_frame, found.special_tokens, None, found.frames, grid, "positions",
                       per_frame, frames_of, read), "", ""


# ----------------------------------------------------------------------------------------------
# Helpers


def _positions_specials(gm: fx.GraphModule, view: AttentionView, ctx: PassContext, n: int, per_frame: int) -> int | None:
    """The special tokens per frame that RoPE positions feeding q give, when they lay out frames of
    ``per_frame`` tokens; None without such positions."""
    pos_node = _positions_node(view.q, n)
    pos = _evaluate(gm, pos_node, ctx)[0] if pos_node is not None else None
    found = read_frame_layout(pos, n)[0] if pos is not None else None
    return found.special_tokens if found is not None and found.tokens_per_frame == per_frame else None


def _runtime_layout(gm: fx.GraphModule, ctx: PassContext, view: AttentionView, lay: _Layout) -> tuple[Any, Any]:
    """(frames, tokens_per_frame) as ints or graph nodes, so the layout follows the run-time frame
    count and image size (inserted before the attention)."""
    if lay.positions is not None:
        layout = gm.graph.call_function(frame_layout_from_positions, (lay.positions, lay.special_tokens))
        layout.meta["val"] = FrameLayout(lay.example_frames, lay.tokens_per_frame, lay.special_tokens, *lay.grid)
        fields = []
        for name, example in (("frames", lay.example_frames), ("tokens_per_frame", lay.tokens_per_frame)):
            field_node = gm.graph.call_function(builtins.getattr, (layout, name))
            field_node.meta["val"] = example
            fields.append(field_node)
        return fields[0], fields[1]
    length = _size(gm, ctx, view.q, 2)
    if lay.frames is not None and lay.frames_of is None:
        return lay.frames, _floordiv(gm, length, lay.frames)
    if lay.frames_of is not None:
        node, channels = lay.frames_of
        if channels is None:
            frames = _size(gm, ctx, node, 1)
        else:
            frames = gm.graph.call_function(clip_frames, (node, channels))
            propagate_node(gm, frames)
        return frames, _floordiv(gm, length, frames)
    per_frame = lay.tokens_per_frame if lay.per_frame is None else _size(gm, ctx, lay.per_frame, -2)
    return _floordiv(gm, length, per_frame), per_frame


def _size(gm: fx.GraphModule, ctx: PassContext, node: fx.Node, dim: int) -> fx.Node:
    """A node for ``node.size(dim)`` in the graph's own IR."""
    if ctx.ir == "aten":
        dim = dim % meta_val(node).dim()
        new = gm.graph.call_function(torch.ops.aten.sym_size.int, (node, dim))
    else:
        new = gm.graph.call_method("size", (node, dim))
    propagate_node(gm, new)
    return new


def _floordiv(gm: fx.GraphModule, a: Any, b: Any) -> fx.Node:
    new = gm.graph.call_function(operator.floordiv, (a, b))
    propagate_node(gm, new)
    return new


def _per_frame_positions(pos: fx.Node, tokens_per_frame: int) -> fx.Node | None:
    """The ancestor of the global positions holding one frame's positions ([..., P, 2], integer):
    its size(-2) is tokens_per_frame whatever the image size."""
    return _nearest_positions(pos, tokens_per_frame, include_start=True)


def _clip_inputs(gm: fx.GraphModule) -> list[tuple[fx.Node, int]]:
    """(input, S) of each graph input shaped like multi-view images [B, S, C, H, W]."""
    return [(node, size_hint(meta_val(node).shape[1])) for node in _five_d_inputs(gm)
            if _views_first(meta_val(node).shape) and not _feeds_conv3d(gm, node)]


def _five_d_inputs(gm: fx.GraphModule) -> list[fx.Node]:
    """The graph's 5-d tensor inputs (not its weights): multi-view images or video clips."""
    params = gm.meta.get(META_PLACEHOLDER_FQNS, {})
    return [node for node in gm.graph.nodes if node.op == "placeholder" and node.name not in params
            and isinstance(val := meta_val(node), torch.Tensor) and val.dim() == 5]


def _views_first(shape: Sequence[Any]) -> bool:
    """Whether a shape reads as multi-view images [B, S, C, H, W] rather than a channels-first video
    clip [B, C, T, H, W] (VideoMAE, TimeSformer), whose dim 1 is 3 colours, not frames: RGB or grey
    channels on dim 1, and on dim 2 more than the 4 channels of a view (RGB-D, RGBA) say channels
    first. Clips of 2 to 4 frames look like views; ``_feeds_conv3d`` tells them apart in a graph."""
    if len(shape) != 5:
        return False
    second, third = size_hint(shape[1]), size_hint(shape[2])
    return not (second in (1, 3) and third > 4)


_CONV3D = (F.conv3d, torch.conv3d, torch.ops.aten.convolution.default, torch.ops.aten.conv3d.default)
_CONV3D_HOPS = 4  # ops between the input and its conv (a normalisation, a cast)


def _feeds_conv3d(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether a 5-d graph input reaches, still 5-d, a 3-d conv, which takes channels on dim 1: a
    channels-first clip [B, C, T, H, W] (VideoMAE's tubelet embedding)."""
    frontier, seen = [node], {node}
    for _ in range(_CONV3D_HOPS + 1):
        nxt = []
        for current in frontier:
            for user in current.users:
                if user in seen or not (isinstance(v := meta_val(user), torch.Tensor) and v.dim() == 5):
                    continue
                if user.op == "call_module" and isinstance(gm.get_submodule(str(user.target)), torch.nn.Conv3d):
                    return True
                if user.op == "call_function" and user.target in _CONV3D and user.args[0] is current:
                    return True
                seen.add(user)
                nxt.append(user)
        frontier = nxt
    return False


def _frames_input(gm: fx.GraphModule, frames: int) -> tuple[fx.Node, int | None] | None:
    """(the first graph input shaped like multi-view images [B, S, C, H, W] with S == frames, None),
    or (that input, C) when its example had S == C: a channels-first clip [B, C, T, H, W] with T == C
    looks the same, so the run-time sizes tell which dim holds the frames (``clip_frames``). Several
    such inputs (images and their masks) hold the same frames."""
    for node, s in _clip_inputs(gm):
        if s == frames:
            channels = size_hint(meta_val(node).shape[2])
            return node, (channels if channels == s else None)
    return None


def _unknown_batch_detail(ctx: PassContext, reason: str) -> str:
    """For ``reason`` "unknown_batch": why the model's batch is unknown in this graph (no attention is
    global by its batch), and the fix; "" for any other reason."""
    if reason != "unknown_batch":
        return ""
    if ctx.batch_size is not None:
        return f"its batch cannot be compared with the model's batch {ctx.batch_size}"
    if ctx.ir == "torch":
        return ("this graph resumes after a graph break, so the model's batch is unknown here: remove the break "
                "(torch._dynamo.config.capture_scalar_outputs = True keeps int(positions.max()) in the graph) or "
                + _COMPILE_AFTER)
    return ("no input of the model is a tensor (a list of per-view images?), so its batch is unknown: "
            "wrap the model so that it takes one [B, S, 3, H, W] tensor (forward(images): "
            "return model(list(images.unbind(1))))")


def _module_metadata(gm: fx.GraphModule, node: fx.Node) -> dict[str, Any]:
    """``fxslim_frame_layout`` of the module that owns ``node``, when the graph module still holds it."""
    prefix, fqn = gm.meta.get(META_PREFIX, ""), node_fqn(node, gm)
    try:
        owner = gm.get_submodule(fqn[len(prefix):].lstrip(".") if prefix else fqn)
    except AttributeError:
        return {}
    metadata = getattr(owner, "fxslim_frame_layout", None) if node.meta.get("nn_module_stack") else None
    return dict(metadata) if isinstance(metadata, dict) else {}


def _check_sdpa(view: AttentionView) -> tuple[str, str, Any]:
    """(reason, detail, scale): "" when the attention is a plain self-attention SDPA call."""
    if view.form != "sdpa" or view.node.target not in _SDPA:
        return "not_sdpa", (f"{view.form} attention ({view.node.target}); HTTM rewrites F.scaled_dot_product_attention "
                            "calls: make the attention call it (timm and VGGT attention: fused_attn=True)"), None
    node = view.node
    args = dict(zip(_SDPA_ARGS, node.args))
    args.update(node.kwargs)
    for reason, found in (("masked", args.get("attn_mask") is not None), ("causal", bool(args.get("is_causal"))),
                          ("dropout", args.get("dropout_p", 0.0) != 0)):
        if found:
            return reason, "", None
    qs, ks = meta_val(view.q).shape, meta_val(view.k).shape
    if len(qs) != 4 or len(ks) != 4:
        return "unsupported_shape", f"q {tuple(qs)}, k {tuple(ks)}: expected [B, H, N, d]", None
    if args.get("enable_gqa"):
        return "unsupported_shape", (f"q {tuple(qs)}, k {tuple(ks)}: grouped-query attention (enable_gqa=True), "
                                     "HTTM merges q and k/v of the same heads"), None
    if tuple(qs) != tuple(ks):
        return "cross_attention", f"q {tuple(qs)}, k {tuple(ks)}", None
    return "", "", args.get("scale")


def _window_of_frames(gm: fx.GraphModule, ctx: PassContext, layout: FrameLayout | None,
                      view: AttentionView) -> tuple[str, str]:
    """("local_attention", detail) when the sequence holds fewer frames than a [B, S, C, H, W] input
    (of this graph, or the model's example) has: a window over some of the frames at the model's
    batch (``for i in range(0, S, 2)``), not global attention. After a size set by values (padded
    views dropped by a mask) it cannot tell, and stays dense."""
    if layout is None:
        return "", ""
    # the model's input, when it is in this graph
    clips_first = {tuple(meta_val(n).shape) for n in _five_d_inputs(gm) if _feeds_conv3d(gm, n)}
    clips = {s for _, s in _clip_inputs(gm)} | {shape[1] for shape in ctx.input_shapes
                                                 if _views_first(shape) and tuple(shape) not in clips_first}
    frames = layout.example_frames
    if clips and frames not in clips and max(clips) > frames:
        masked = sized_by_values(gm, view.q)
        return "local_attention", (
            f"sequences of {frames} frames where the input has {max(clips)}: a window over some of the frames is not "
            "global attention" + ("" if masked is None else f", or views dropped at {masked.name} (optimize with an "
                                  "example whose views all count to tell)"))
    if ctx.input_views > frames:
        return "local_attention", (f"sequences of {frames} frames where the input is a list of {ctx.input_views} "
                                   "views: a window over some of the views is not global attention")
    return "", ""


def _positions_node(q: Any, n: int) -> fx.Node | None:
    """Nearest ancestor of q holding integer positions [..., N, 2]."""
    return _nearest_positions(q, n, include_start=False)


def _nearest_positions(start: fx.Node, length: int, include_start: bool) -> fx.Node | None:
    """Nearest node at or above ``start`` (breadth first, a few hops) holding integer positions
    [..., length, 2]."""
    frontier, seen = [start], {start}
    for _ in range(_POSITION_HOPS):
        nxt = []
        for node in frontier:
            val = meta_val(node)
            if ((include_start or node is not start) and isinstance(val, torch.Tensor)
                    and not val.dtype.is_floating_point and val.dim() >= 2 and val.shape[-1] == 2
                    and size_hint(val.shape[-2]) == length):
                return node
            for arg in node.all_input_nodes:
                if arg not in seen:
                    seen.add(arg)
                    nxt.append(arg)
        frontier = nxt
    return None


def _evaluate(gm: fx.GraphModule, target: fx.Node, ctx: PassContext) -> tuple[torch.Tensor | None, str]:
    """The real value of a node computed from shapes (e.g. RoPE positions built with arange).

    Runs the node's ancestors; a tensor whose values nothing needs (only its shape or device is
    read) is stood in for by a zero-stride CPU tensor, so the activations are never computed.
    """
    needed, stack = {target}, [target]
    while stack:
        for arg in stack.pop().all_input_nodes:
            if arg not in needed:
                needed.add(arg)
                stack.append(arg)
    data = data_ancestors(gm, target)
    if len(data) > _MAX_EVAL_NODES:
        return None, f"they depend on {len(data)} nodes"
    interpreter = fx.Interpreter(gm)
    env = interpreter.env
    for node in (n for n in gm.graph.nodes if n in needed):
        val = meta_val(node)
        if node not in data and isinstance(val, torch.Tensor):
            env[node] = torch.empty_strided([size_hint(s) for s in val.shape], [0] * val.dim(), dtype=val.dtype)
        elif node.op == "placeholder":
            if node.name not in ctx.placeholder_values:
                return None, f"input {node.name!r} has no real value"
            value = ctx.placeholder_values[node.name]
            env[node] = size_hint(value) if isinstance(value, torch.SymInt) else value
        else:
            try:
                with torch.no_grad():
                    env[node] = interpreter.run_node(node)
            except _EVAL_ERRORS as exc:
                return None, f"{type(exc).__name__} at {node.format_node()}: {str(exc)[:120]}"
    value = env[target]
    if not isinstance(value, torch.Tensor) or value.device.type == "meta" or value.__class__ is not torch.Tensor:
        return None, "no concrete values (meta or fake tensors)"
    return value, ""
