"""The ``torch.compile`` backend: ``torch.compile(model, backend="fxslim", options={...})``.

Found through the ``torch_dynamo_backends`` entry point once fxslim is installed (it is not also
registered with ``register_backend``: the lazy entry-point load would then fail with "duplicate
name"). For each graph dynamo hands over (one per graph break; with SymInt inputs under
``dynamic=True``) it runs the listed passes on the torch-level graph, whose parameters arrive as
placeholders backed by ``example_inputs``, then hands the graph to an inner compiler.

Options: ``passes`` (list of pass objects or strings like ``"haste:L=14"``), ``inner``
(``"inductor"`` default, ``"aot_eager"`` or ``"eager"``), ``filter_fn`` and ``overrides`` (as in
``fxslim.optimize``; an override naming no module is not reported here, as the module may be in
another graph), ``strict`` (raise when a pass rewrites nothing in a graph where it considered
layers; a graph break can leave graphs without any, which do not count; default False),
``on_report`` (called with the list of ``PassReport``s of each graph this compile rewrites, e.g.
``reports.append``: what the passes did, tied to this compiled model and nothing else).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from fxslim.backend_entry import compile_entry, frame_prefix, reads_image
from fxslim.capture import batch_of, placeholder_fqns
from fxslim.ir import META_PLACEHOLDER_FQNS, META_PREFIX, META_PROM_LOWERED, ConvView, View, detect_ir, meta_val, size_hint, views
from fxslim.passes.base import Pass, PassContext, PassReport, parse_overrides, parse_pass, pass_list, run_passes
from fxslim.passes.prom_versions import covering, stamp, written
from fxslim.policy import Policy
from fxslim.runtime.prom_lowered import has_onednn_ops, lower
from fxslim.warn import warn_user

__all__ = ["BackendOptions", "compile_fn"]

_log = logging.getLogger(__name__)
_INNER = ("inductor", "aot_eager", "eager")
_OPTION_KEYS = ("passes", "inner", "filter_fn", "overrides", "strict", "on_report")


@dataclass(frozen=True)
class BackendOptions:
    """Validated ``options=`` of ``torch.compile(..., backend="fxslim")``."""

    passes: tuple[Pass, ...] = ()
    inner: str = "inductor"
    policy: Policy = field(default_factory=Policy)
    strict: bool = False
    on_report: Callable[[list[PassReport]], Any] | None = None

    @classmethod
    def from_options(cls, options: dict[str, Any] | None) -> "BackendOptions":
        options = dict(options or {})
        unknown = sorted(set(options) - set(_OPTION_KEYS))
        if unknown:
            raise ValueError(f"torch.compile(backend='fxslim') options: unknown {unknown}; allowed: {list(_OPTION_KEYS)}")
        inner = options.get("inner", "inductor")
        if inner not in _INNER:
            raise ValueError(f"torch.compile(backend='fxslim') options['inner']: expected one of {_INNER}, got {inner!r}")
        passes = pass_list(options.get("passes", ()))
        overrides = parse_overrides(options.get("overrides") or {})
        policy = Policy(filter_fn=options.get("filter_fn"), overrides=overrides)
        on_report = options.get("on_report")
        if on_report is not None and not callable(on_report):
            raise ValueError(f"torch.compile(backend='fxslim') options['on_report']: expected a callable taking "
                             f"a list of PassReport (e.g. reports.append), got {on_report!r}")
        strict = options.get("strict", False)
        if not isinstance(strict, bool):
            raise ValueError(f"torch.compile(backend='fxslim') options['strict']: expected True or False, "
                             f"got {strict!r}")
        return cls(tuple(parse_pass(p) for p in passes), inner, policy, strict, on_report)


_RESUME_PREFIX = "torch_dynamo_resume_in_"  # dynamo's name for the code after a graph break


def _compiled_frame() -> tuple[Any, Any]:
    """(the code object dynamo is compiling the graph of, the module whose method it is: its ``self``,
    or its first module argument), (None, None) when unknown."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
        code = tx.f_code
        arguments = [tx.f_locals.get(name) for name in ("self", *code.co_varnames[:code.co_argcount])]
    except Exception:  # a private API: without it, the batch and the frame's module are unknown, not guessed
        return None, None
    # a method's self (a resume function after a graph break takes the stack first, then the locals)
    return code, next((a for a in arguments if isinstance(a, torch.nn.Module)), None)


def _input_batch(gm: fx.GraphModule, params: dict[str, str], code: Any) -> Any:
    """Batch size of the model's input: the first non-parameter tensor input of a graph that starts
    at the model's forward (may be a SymInt). None in a graph that resumes after a graph break,
    whose first input is an intermediate (e.g. frames folded into the batch), and when dynamo does
    not say which function it compiles (``code``, from ``_compiled_frame``)."""
    if code is None or code.co_name.startswith(_RESUME_PREFIX):
        return None
    return batch_of([meta_val(n) for n in gm.graph.nodes if n.op == "placeholder" and n.name not in params])


def _input_channels(placeholders: list[fx.Node], params: dict[str, str]) -> tuple[int, ...]:
    """Dim 1 of each tensor input of a graph that is not a weight (at its hint under dynamic shapes)."""
    values = [meta_val(n) for n in placeholders if n.name not in params]
    return tuple(size_hint(v.shape[1]) for v in values if isinstance(v, torch.Tensor) and v.dim() >= 2)


def _list_views(placeholders: list[fx.Node], params: dict[str, str]) -> int:
    """The number of items of the longest list input whose items this graph reads as tensors of one
    shape (dynamo's ``L['views'][i]`` placeholders): the views of a model fed per-view images, as
    ``fxslim.optimize`` counts them, so that HTTM tells a window over some of the views from global
    attention; 0 without one."""
    from torch._dynamo.source import GetItemSource

    lists: dict[str, dict[int, tuple]] = {}
    for node in placeholders:
        source = getattr(node.meta.get("grapharg"), "source", None)
        value = meta_val(node)
        if (node.name not in params and isinstance(source, GetItemSource) and type(source.index) is int
                and isinstance(value, torch.Tensor)):
            base = source.base.name() if callable(source.base.name) else source.base.name
            lists.setdefault(str(base), {})[source.index] = tuple(str(d) for d in value.shape)  # SymInts by name
    return max((len(items) for items in lists.values() if len(items) > 1 and len(set(items.values())) == 1), default=0)


def _inner_compile(gm: fx.GraphModule, example_inputs: list[Any], inner: str, modified: bool,
                   mode: str | None = None) -> Callable:
    """``gm`` compiled by ``inner``; ``mode`` (torch.compile's, e.g. "max-autotune-no-cudagraphs")
    reaches inductor as the config it stands for, as it does with ``backend="inductor"``."""
    if inner == "eager":
        return gm.forward
    if modified:
        # New get_attr constants are unknown to dynamo's param_name_to_source bookkeeping, which
        # inductor asserts on; a rebuilt GraphModule (no dynamo meta) compiles cleanly.
        gm = fx.GraphModule(gm, gm.graph)
    if inner == "inductor" and mode not in (None, "default"):
        from torch._inductor import list_mode_options
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs, config_patches=list_mode_options(mode))
    return torch._dynamo.lookup_backend(inner)(gm, example_inputs)


def compile_fn(gm: fx.GraphModule, example_inputs: Sequence[Any], *, options: dict[str, Any] | None = None,
               mode: str | None = None) -> Callable:
    """The dynamo backend entry point (see the module docstring)."""
    opts = BackendOptions.from_options(options)
    params = placeholder_fqns(gm)
    gm.meta[META_PLACEHOLDER_FQNS] = params
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    entry, (code, owner) = compile_entry(), _compiled_frame()
    module_keys = [str(k) for k in opts.policy.overrides if not str(k).startswith("kind:")]
    prefix, note = frame_prefix(entry, owner, module_keys, opts.policy.filter_fn is not None)
    if prefix:
        gm.meta[META_PREFIX] = prefix
    if note:
        warn_user(f"torch.compile(backend='fxslim'): {note}")
    has_conv = any(isinstance(v, ConvView) for v in views(gm))
    ctx = PassContext(
        ir=detect_ir(gm), batch_size=_input_batch(gm, params, code), input_shapes=entry.input_shapes if entry else (),
        input_views=_list_views(placeholders, params),
        at_input=reads_image(entry, code, _input_channels(placeholders, params), has_conv),
        placeholder_values={n.name: v for n, v in zip(placeholders, example_inputs)}, policy=opts.policy,
    )
    results = run_passes(gm, opts.passes, ctx)
    inside = _subgraph_views(gm)
    for p, r in zip(opts.passes, results):
        _report_inside_subgraphs(inside, p, r.report)
    if opts.on_report is not None:
        opts.on_report([r.report for r in results])
    if opts.strict:
        for p, r in zip(opts.passes, results):
            if r.report.entries and r.report.rewritten == 0:
                raise ValueError(f"fxslim backend: pass {p.name!r} rewrote nothing in a graph of "
                                 f"{r.report.entries[0].fqn!r} and the layers next to it (skipped: {dict(r.report.skipped)})")
    modified = any(r.modified for r in results)
    _log.info("fxslim backend: %d graph nodes, passes %s, modified=%s, inner=%s",
              len(gm.graph.nodes), [p.name for p in opts.passes], modified, opts.inner)
    if has_onednn_ops(gm):
        return _prom_onednn(gm, list(example_inputs), params)
    return _inner_compile(gm, list(example_inputs), opts.inner, modified, mode)


def _subgraph_views(gm: fx.GraphModule) -> list[View]:
    """Views of the graphs higher-order ops run (``torch.utils.checkpoint``'s, ``torch.cond``'s branches)."""
    found: list[View] = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.HigherOrderOperator):
            for arg in node.args:
                sub = getattr(gm, str(arg.target), None) if isinstance(arg, fx.Node) and arg.op == "get_attr" else None
                if isinstance(sub, fx.GraphModule):
                    found += [*views(sub), *_subgraph_views(sub)]
    return found


def _report_inside_subgraphs(inside: list[View], p: Pass, report: PassReport) -> None:
    """Layers of ``p``'s kinds among ``inside`` (``_subgraph_views``: in a higher-order op's graph, which
    the passes do not rewrite) go into its report as skipped (``inside_subgraph``): they ran dense with
    no word, and ``strict`` did not see them."""
    for view in inside:
        kind = view.conv_kind if isinstance(view, ConvView) else view.kind
        family = kind.rpartition("_")[2]  # conv, linear, attention
        if kind in p.kinds or any(k.rpartition("_")[2] == family for k in p.kinds):
            report.skip(view.node, view.fqn, kind, "inside_subgraph")


def _prom_onednn(gm: fx.GraphModule, example_inputs: list[Any], params: dict[str, str]) -> Callable:
    """A converted PROM model on the oneDNN runtime: its ops lowered to direct oneDNN calls with
    weights packed from the parameters and buffers dynamo passes in (``prom_lowered.lower``), and
    packed again when one of them was written in place or replaced (as eager ``micro_batched``
    does: one version read per call for a converted model, ``prom_versions``). No inner compiler:
    the graph is those calls plus a few cheap ones, which inductor would only wrap in another layer."""
    slot = {n.name: i for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")}
    names = [name for name in params if name in slot and isinstance(example_inputs[slot[name]], torch.Tensor)]
    slots = [slot[name] for name in names]
    state: dict[str, Any] = {}

    def pack(args: Sequence[Any]) -> None:
        weights = [args[i] for i in slots]
        state.update(lowered=lower(gm, dict(zip(names, weights))), weights=weights, read=stamp(covering(weights)))
        _log.info("fxslim backend: PROM oneDNN graph lowered: %s", state["lowered"].meta[META_PROM_LOWERED])

    def run(*args: Any) -> Any:
        if any(args[i] is not w for i, w in zip(slots, state["weights"])) or written(state["read"]):
            pack(args)
        return state["lowered"].forward(*args)

    pack(example_inputs)
    return run
