"""Graphs and shapes for costing: a fast meta-device capture, symbolic sizes, and running a node
on meta tensors to see which aten ops it dispatches.

``capture_for_cost`` traces an ``nn.Module`` as a *meta twin* (its modules with parameters on the
meta device, the caller's model untouched) and propagates shapes on meta tensors while recording
each node's aten ops: fast, no memory, no second run. Models that do not trace whole, GraphModules,
ExportedPrograms and ``Captured`` objects go through ``fxslim.capture`` as they are; their nodes are
run one by one on meta tensors (``NodeRunner``) when their aten ops are needed.

``propagate_symbolic`` re-propagates shapes in a FakeTensorMode with a ShapeEnv where named input
dims are symbols, so every shape, and every count computed from it, is an expression in them.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sympy
import torch
import torch.fx as fx
from torch import nn
from torch._ops import OpOverload
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from fxslim.capture import Captured, Graph, batch_of, capture as capture_graphs, trace
from fxslim.export_parts import call_with
from fxslim.ir import ConvView, attribute, meta_val, views
from fxslim.progress import DelayedProgress
from fxslim.propagate import propagate

__all__ = ["Source", "capture_for_cost", "propagate_symbolic", "symbolic_dims", "record_eager", "to_expr", "NodeRunner",
           "Recorder", "meta_twin", "to_meta"]

_log = logging.getLogger(__name__)

_SKIP_RECORD = {
    torch.ops.aten.size.default, torch.ops.aten.sym_size.default, torch.ops.aten.stride.default,
    torch.ops.aten.sym_stride.default, torch.ops.aten.storage_offset.default, torch.ops.aten.numel.default,
    torch.ops.aten.sym_numel.default, torch.ops.aten.dim.default, torch.ops.aten.is_contiguous.default,
    torch.ops.aten.is_contiguous.memory_format, torch.ops.prim.device.default, torch.ops.prim.layout.default,
}


def meta_twin(model: nn.Module) -> nn.Module:
    """A structural copy of ``model`` whose parameters and buffers are meta tensors."""
    memo: dict[int, Any] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


def to_meta(value: Any) -> Any:
    """Meta tensors with the shapes, strides and dtypes of the tensors in ``value`` (nested)."""
    if isinstance(value, torch.Tensor):
        return torch.empty_strided(tuple(value.shape), tuple(value.stride()), dtype=value.dtype, device="meta")
    if isinstance(value, torch.Size):
        return value
    if isinstance(value, (list, tuple)):
        return type(value)(to_meta(v) for v in value)
    if isinstance(value, dict):
        return {k: to_meta(v) for k, v in value.items()}
    return value


def recording(recorded: dict[fx.Node, list]) -> Callable[[fx.Node], contextlib.AbstractContextManager]:
    """An ``around_node`` for ``fxslim.propagate.propagate`` that keeps the aten ops each call node
    dispatched in ``recorded`` (so costing does not run the nodes again)."""

    @contextlib.contextmanager
    def around(node: fx.Node) -> Iterator[None]:
        recorder = Recorder()
        with recorder:
            yield
        if node.op in ("call_function", "call_method", "call_module"):
            recorded[node] = recorder.calls

    return around


def counted(around: Callable[[fx.Node], contextlib.AbstractContextManager], bar: DelayedProgress
            ) -> Callable[[fx.Node], contextlib.AbstractContextManager]:
    """``around``, advancing ``bar`` once each node has run."""

    @contextlib.contextmanager
    def around_counted(node: fx.Node) -> Iterator[None]:
        with around(node):
            yield
        bar.advance()

    return around_counted


@dataclass
class Source:
    """A captured model plus where the real weight values are (the twin holds meta tensors)."""

    captured: Captured
    real: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: bool = False
    recorded: dict[fx.Node, list] = field(default_factory=dict)
    eager: dict[str, list] | None = field(default_factory=dict)  # untraced module -> its own aten ops
    repeats: dict[str, list[list]] = field(default_factory=dict)  # graph -> the aten ops of each further call


def capture_for_cost(model: Any, example_inputs: tuple | None, method: str, leaf_modules: Sequence[type],
                     dynamic: Mapping[str, Any] | None = None) -> Source:
    """Graphs of ``model`` with shapes on every node (see the module docstring); ``dynamic`` names
    the input dims an export must keep symbolic."""
    if isinstance(model, Captured):
        return Source(model)
    if isinstance(model, nn.Module) and not isinstance(model, fx.GraphModule) and example_inputs is not None:
        named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
        real = {name: t for name, t in named if t.device.type != "meta"}
        meta_inputs = to_meta(tuple(example_inputs))
        try:
            twin = meta_twin(model)
            if method == "export":
                ep = torch.export.export(twin, meta_inputs, dynamic_shapes=_dynamic_shapes(example_inputs, dynamic))
                gm = ep.module()
                return Source(Captured(gm, [Graph("", gm, "aten")], [], "export", batch_of(example_inputs)), real, True)
            gm = trace(twin, leaf_modules)
            recorded: dict[fx.Node, list] = {}
            propagate(gm, meta_inputs, fake=False, around_node=recording(recorded))
            captured = Captured(gm, [Graph("", gm, "module")], [], "symbolic", batch_of(example_inputs))
            return Source(captured, real, True, recorded)
        except Exception as exc:  # tracing or meta execution runs user code: fall back to full capture
            _log.info("meta capture of %s failed (%s: %s); capturing with real weights",
                      type(model).__name__, type(exc).__name__, exc)
    return Source(capture_graphs(model, example_inputs, method=method, leaf_modules=leaf_modules))


def symbolic_dims(dims: Mapping[str, Any], example_inputs: Sequence[Any]) -> dict[int, dict[int, str]]:
    """{input index: {dim: name}} from ``{"frames": (0, 1), "batch": 0}``, checked."""
    wanted: dict[int, dict[int, str]] = {}
    for name, where in dims.items():
        pair = isinstance(where, (tuple, list)) and len(where) == 2 and all(type(w) is int for w in where)
        if not (type(where) is int or pair):
            raise ValueError(f"symbolic[{name!r}]: expected a dim of the first input (an int) or (input index, dim), "
                             f"got {where!r}")
        index, dim = (0, where) if type(where) is int else tuple(where)
        if not (0 <= index < len(example_inputs)) or not isinstance(example_inputs[index], torch.Tensor):
            raise ValueError(f"symbolic[{name!r}]: expected a dim of a tensor input "
                             f"(index < {len(example_inputs)}), got {where!r}")
        if not (-example_inputs[index].dim() <= dim < example_inputs[index].dim()):
            raise ValueError(f"symbolic[{name!r}]: input {index} has {example_inputs[index].dim()} dims, got dim {dim}")
        named = wanted.setdefault(index, {})
        dim %= example_inputs[index].dim()
        if dim in named:
            raise ValueError(f"symbolic: {named[dim]!r} and {name!r} name the same dim (input {index}, dim {dim}); "
                             "give each dim one name")
        named[dim] = name
    return wanted


def _dynamic_shapes(example_inputs: Sequence[Any], dynamic: Mapping[str, Any] | None) -> tuple | None:
    if not dynamic:
        return None
    wanted = symbolic_dims(dynamic, example_inputs)
    return tuple({d: torch.export.Dim.AUTO for d in wanted.get(i, {})} or None for i in range(len(example_inputs)))


# ----------------------------------------------------------------------------------------------
# Symbolic sizes


def _symbolic_inputs(example_inputs: tuple, dims: Mapping[str, Any], mode: FakeTensorMode, device: str | None,
                     scale: int = 1) -> tuple[list[Any], dict[sympy.Symbol, sympy.Symbol], dict[str, sympy.Symbol]]:
    from torch.fx.experimental.symbolic_shapes import DimDynamic, StatelessSymbolicContext

    wanted = symbolic_dims(dims, example_inputs)
    fakes: list[Any] = []
    rename: dict[sympy.Symbol, sympy.Symbol] = {}
    symbols: dict[str, sympy.Symbol] = {}
    for i, x in enumerate(example_inputs):
        if not isinstance(x, torch.Tensor):
            fakes.append(x)
            continue
        named = wanted.get(i, {})
        dynamic = [DimDynamic.DYNAMIC if d in named else DimDynamic.STATIC for d in range(x.dim())]
        base = x if device is None else to_meta(x)
        if scale > 1 or any(base.shape[d] < 2 for d in named):
            # a named size of 1 in the example (batch 1) is a hint ops specialise on (a linear guards on
            # it): propagate from 2, which gives the same formulas, as the sizes stay symbolic
            shape = [max(size, 2) * scale if d in named else size for d, size in enumerate(base.shape)]
            base = torch.empty(shape, dtype=base.dtype, device=base.device)
        fake = mode.from_tensor(base, symbolic_context=StatelessSymbolicContext(dynamic_sizes=dynamic))
        for d, name in named.items():
            expr = fake.shape[d].node.expr
            symbol = sympy.Symbol(name, integer=True, positive=True)
            rename[expr] = symbol
            symbols[name] = symbol
        fakes.append(fake)
    return fakes, rename, symbols


_HINT_SCALES = (2, 4)  # example sizes times these, where a size derived at the example's is 1


def propagate_symbolic(
    source: Source, example_inputs: tuple, dims: Mapping[str, Any],
) -> tuple[FakeTensorMode, dict[sympy.Symbol, sympy.Symbol], dict[str, sympy.Symbol], tuple[Any, ...]]:
    """Re-run shape propagation with symbolic sizes: ``meta['val']`` then holds SymInt shapes and
    ``source.recorded`` the aten ops of every node on those shapes. Also returns the conditions on
    the named sizes under which the model took the path it was propagated on (``conditions``).

    A size the named ones give that is 1 at the example (resnet18's last stage at 32 px) is pinned
    by broadcasting against a size-1 operand (a BN's statistics): the guard ``Eq(expr, 1)`` fixes
    every formula after it. Then it propagates from the named sizes 2 and 4 times as large and
    keeps the first run with no such pin whose conditions hold at the example; failing that, the
    pinned formulas, their pin in the conditions."""
    first, pins = _propagate_at(source, example_inputs, dims, 1)
    if not pins:
        return first
    named = [(name, example_inputs[i].shape[d]) for i, names in symbolic_dims(dims, example_inputs).items()
             for d, name in names.items()]
    for scale in _HINT_SCALES:
        try:
            found, found_pins = _propagate_at(source, example_inputs, dims, scale)
        except Exception:  # a model that takes no other size: the pinned formulas, honestly bounded
            break
        at_example = {found[2][name]: size for name, size in named}
        at_retry = {first[2][name]: max(size, 2) * scale for name, size in named}
        # the same path as at the example: no pin left, its conditions hold at the example, and the
        # example's other conditions (a branch on a size of 1 in the model's code) hold where it ran
        if (not found_pins and all(_holds(c, at_example) for c in found[3])
                and all(_holds(c, at_retry) for c in first[3] if c not in pins and not _implied(c, pins))):
            return found
    return _propagate_at(source, example_inputs, dims, 1)[0]  # node meta and records of the pinned run again


def _propagate_at(
    source: Source, example_inputs: tuple, dims: Mapping[str, Any], scale: int,
) -> tuple[tuple[FakeTensorMode, dict[sympy.Symbol, sympy.Symbol], dict[str, sympy.Symbol], tuple[Any, ...]], set]:
    """``propagate_symbolic``'s result from the named sizes ``scale`` times the example's, and the
    conditions among its own that are broadcast pins (``broadcast_pins``)."""
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    env = ShapeEnv(specialize_zero_one=False, duck_shape=False, assume_static_by_default=True)
    mode = FakeTensorMode(shape_env=env, allow_non_fake_inputs=True)
    fakes, rename, symbols = _symbolic_inputs(example_inputs, dims, mode, "meta" if source.meta else None, scale)
    captured = source.captured
    source.recorded.clear()
    total = sum(len(graph.gm.graph.nodes) for graph in captured.graphs)
    with DelayedProgress(total, f"symbolic sizes, {type(captured.module).__name__}: nodes") as bar:
        checks: set = set()
        around = checks_kept(counted(recording(source.recorded), bar), env, checks)
        mode, rename, symbols, valid_where = _propagate_symbolic(source, fakes, mode, env, rename, symbols, around)
        return (mode, rename, symbols, conditions(env, rename, checks) + valid_where), broadcast_pins(env, rename, checks)


def _propagate_symbolic(source: Source, fakes: list[Any], mode: FakeTensorMode, env: Any,
                        rename: dict[sympy.Symbol, sympy.Symbol], symbols: dict[str, sympy.Symbol],
                        around: Callable[[fx.Node], contextlib.AbstractContextManager],
                        ) -> tuple[FakeTensorMode, dict[sympy.Symbol, sympy.Symbol], dict[str, sympy.Symbol], tuple[Any, ...]]:
    captured = source.captured
    if captured.whole:
        try:
            propagate(captured.graphs[0].gm, fakes, mode=mode, around_node=around)
        except Exception as exc:  # an op that takes no symbolic size (torchvision's shifted window attention)
            raise ValueError(
                f"symbolic: an op of {type(captured.module).__name__} cannot run with symbolic sizes "
                f"({type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}); cost the sizes you need "
                "one by one (fxslim.cost_model.sweep)") from exc
        _check_not_specialised(env, rename)
        return mode, rename, symbols, kernel_fits(source, rename)
    seen: dict[str, tuple] = {}
    recorder = _EagerRecorder()  # the eager code's own ops, on symbolic sizes too
    handles = recorder.hooks(captured.module, captured)
    for graph in captured.graphs:
        def hook(mod: nn.Module, args: tuple, _path: str = graph.path) -> None:
            seen.setdefault(_path, args)
        handles.append(graph.gm.register_forward_pre_hook(hook))
    try:
        with mode, torch.no_grad(), recorder:
            call_with(captured.module, fakes)
    except Exception as exc:  # the eager glue is user code: say why symbolic sizes are impossible
        untraced = ", ".join(p or "<root>" for p, _ in captured.untraced)
        raise ValueError(
            f"symbolic: {type(captured.module).__name__} does not trace whole and the parts that stay eager "
            f"({untraced}) cannot run with symbolic sizes ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
            "symbolic counts need eager code that depends on shapes only, not on tensor values"
        ) from exc
    finally:
        for h in handles:
            h.remove()
    source.eager, source.repeats = recorder.calls, recorder.repeats
    for graph in captured.graphs:
        if graph.path in seen:
            propagate(graph.gm, seen[graph.path], mode=mode, around_node=around)
    _check_not_specialised(env, rename)
    return mode, rename, symbols, kernel_fits(source, rename)


_TORCH_DIR = str(Path(torch.__file__).parent)
_SHAPE_FUNCTIONS = str(Path(torch.__file__).parent / "_meta_registrations.py")  # output sizes (pooling, ...)
_SAMPLE_SIZES = (*range(2, 130), 255, 256, 300, 512, 1000, 1024, 2048, 4096, 10_000, 65_536, 10**6, 10**9)


_CHECKS = {torch._assert, torch._check, torch._check_with}  # the model's own checks, as graph nodes


def checks_kept(around: Callable[[fx.Node], contextlib.AbstractContextManager], env: Any, checks: set
                ) -> Callable[[fx.Node], contextlib.AbstractContextManager]:
    """``around``, also keeping in ``checks`` the guards of ``env`` that a graph's ``torch._assert``
    (or ``torch._check``) nodes raise: the model's own limits (timm's PatchEmbed asserts a multiple
    of the patch), which ``conditions`` keeps though they arise in torch's interpreter."""

    @contextlib.contextmanager
    def around_checks(node: fx.Node) -> Iterator[None]:
        before = len(env.guards)
        with around(node):
            yield
        if node.op == "call_function" and node.target in _CHECKS:
            checks.update(guard.expr for guard in env.guards[before:])

    return around_checks


def conditions(env: Any, rename: Mapping[sympy.Symbol, sympy.Symbol], checks: set = frozenset()) -> tuple[Any, ...]:
    """The guards on the named sizes that choose what the model computes: where its formulas hold.

    Kept: guards raised by the model's own code (``if x.shape[-1] > 300`` in eager code), by
    torch's output-size functions (a ``ceil_mode`` pool has one more output row at odd sizes), and
    equalities from anywhere (a broadcast against a fixed-size bias: ``h*w/4 == 16``, or the model fails).
    Left out: torch's other guards, which choose a layout or a kernel and change no count (strides
    like channels-last, ``3*h*w <= 20480`` for an eager conv's backend), and a size other than 0 or 1
    (``batch != 1``, also as ``batch > 1``) from broadcast checks."""
    named = set(rename)
    out = []
    for guard in env.guards:
        expr = guard.expr
        if not expr.free_symbols or not expr.free_symbols <= named:
            continue
        if expr in checks:  # the model's own check: a limit whatever its form
            if expr.xreplace(dict(rename)) not in out:
                out.append(expr.xreplace(dict(rename)))
            continue
        filename = _guard_file(guard)
        against_0_or_1 = any(side in (sympy.Integer(0), sympy.Integer(1)) for side in expr.args)
        pinned = isinstance(expr, sympy.Eq)  # also to 1: a size broadcast as 1 fixes all after it
        if filename.startswith(_TORCH_DIR) and filename != _SHAPE_FUNCTIONS and not pinned:
            continue
        if isinstance(expr, sympy.Ne) and against_0_or_1:
            continue
        if len(expr.free_symbols) == 1:
            (size,) = expr.free_symbols
            if all(_holds(expr, {size: value}) for value in _SAMPLE_SIZES):
                continue  # only 0 or 1 break it (``batch > 1``), not a limit (``w <= 300``)
        renamed = expr.xreplace(dict(rename))
        if renamed not in out:
            out.append(renamed)
    return tuple(out)


def broadcast_pins(env: Any, rename: Mapping[sympy.Symbol, sympy.Symbol], checks: set = frozenset()) -> set:
    """The conditions (renamed) that torch's own code raised as ``Eq(expr, 1)``: a size the named ones
    give that is 1 here, broadcast against a size-1 operand, which fixes every formula after it.
    Not the model's own checks nor its branches (``if y.shape[-1] == 1``), raised from its code."""
    named = set(rename)
    return {guard.expr.xreplace(dict(rename)) for guard in env.guards
            if isinstance(guard.expr, sympy.Eq) and sympy.Integer(1) in guard.expr.args
            and guard.expr.free_symbols and guard.expr.free_symbols <= named and guard.expr not in checks
            and _guard_file(guard).startswith(_TORCH_DIR)}


def _implied(condition: Any, pins: set) -> bool:
    """Whether ``condition`` holds wherever the pins do: with each pinned size 1 it is true (r3d_18's
    ``Eq(h'·t'·w', h'·w')`` beside the pin ``Eq(t', 1)``, a flatten of the size-1 time axis)."""
    ones = {}
    for pin in pins:
        lhs, rhs = pin.args
        ones[lhs if rhs == 1 else rhs] = sympy.Integer(1)
    try:
        return condition.xreplace(ones) is sympy.true
    except (TypeError, ValueError):
        return False


def _guard_file(guard: Any) -> str:
    """The file whose code raised a guard ("" when unknown)."""
    where = getattr(getattr(guard, "sloc", None), "framework_loc", None)
    return str(getattr(where, "filename", "") or "")


def _holds(expr: Any, sizes: Mapping[sympy.Symbol, int]) -> bool:
    """Whether a guard holds at these sizes; not where it cannot be evaluated there (a size that
    divides by zero, ``h // (h // 8)`` below 8: the model fails there too)."""
    try:
        return expr.xreplace(dict(sizes)) is sympy.true
    except (ZeroDivisionError, TypeError, ValueError):
        return False


def kernel_fits(source: Source, rename: Mapping[sympy.Symbol, sympy.Symbol]) -> tuple[Any, ...]:
    """For each conv whose input height or width is a formula in the named sizes, that the kernel fits
    the padded input (``h + 2·pad >= dilation·(k − 1) + 1``), where it is not so for every size: the
    convs of the graphs and those the eager code and further graph calls ran (``source.eager``,
    ``source.repeats``).

    Why: the conv that raises "Kernel size can't be greater than actual input" checks this in
    ATen's kernel, not in the shape function a fake run goes through, so no guard records it, and
    a formula gave numbers (not even increasing) at sizes where the model fails."""
    convs = []  # (input sizes, kernel, padding, dilation)
    for graph in source.captured.graphs:
        for view in views(graph.gm):
            x = meta_val(view.input) if isinstance(view, ConvView) else None
            if isinstance(x, torch.Tensor) and x.dim() >= 3 and not view.transposed and view.padding_spec != "same":
                padding, dilation = tuple(map(_number, view.padding)), tuple(map(_number, view.dilation))
                if None not in padding + dilation:  # a padding forward computes is its formula
                    convs.append((x.shape[2:], view.kernel, padding, dilation))
    recorded = [op for ops in source.recorded.values() for op in ops]  # the graphs' 1-D and 3-D convs too
    recorded += [op for ops in (source.eager or {}).values() for op in ops]
    recorded += [op for calls in source.repeats.values() for ops in calls for op in ops]
    for func, args, _, _ in recorded:
        if func is torch.ops.aten.convolution.default and args[0].dim() >= 3 and not args[6]:
            convs.append((args[0].shape[2:], tuple(args[1].shape[2:]), tuple(args[4]), tuple(args[5])))
    named, out = set(rename), []
    for sizes, kernel, padding, dilation in convs:
        for size, k, pad, d in zip(sizes, kernel, padding, dilation):
            expr = size.node.expr if isinstance(size, torch.SymInt) else None
            if expr is None or not expr.free_symbols or not expr.free_symbols <= named:
                continue
            fits = sympy.Ge(expr + 2 * pad, d * (k - 1) + 1)
            if not fits.free_symbols <= named:
                continue
            if fits.xreplace({s: 1 for s in expr.free_symbols}) is sympy.true:
                continue  # holds at size 1, so at every size: the input grows with the named sizes
            renamed = fits.xreplace(dict(rename))
            if renamed not in out:
                out.append(renamed)
    return tuple(out)


def _number(value: Any) -> Any:
    """An int, or the formula of a size a graph node computed (its SymInt); None for anything else."""
    value = meta_val(value) if isinstance(value, fx.Node) else value
    if isinstance(value, torch.SymInt):
        return value.node.expr
    return value if isinstance(value, int) else None


def _check_not_specialised(env: Any, rename: Mapping[sympy.Symbol, sympy.Symbol]) -> None:
    """Raise when the graph pinned a named size to its example value (e.g. export's input checks)."""
    for symbol, name in rename.items():
        fixed = env.replacements.get(symbol)
        if fixed is not None and fixed.is_number:
            at = " (an example size of 1 is propagated at 2)" if fixed == 2 else ""
            raise ValueError(
                f"symbolic: the model fixes {str(name)!r} to {fixed}, the size it was propagated at{at}: an op needs "
                "that size (a flatten feeding a Linear; an exported graph checks its input sizes unless exported "
                "with dynamic shapes), or PyTorch fixes it under symbolic shapes where the model runs at any size "
                "(interpolation such as nn.Upsample, window attention); name only sizes that stay free, or cost the "
                "sizes you need one by one (fxslim.cost_model.sweep)"
            )


def to_expr(value: Any, rename: Mapping[sympy.Symbol, sympy.Symbol]) -> Any:
    """A count as an int, or a sympy expression in the named sizes."""
    if isinstance(value, (torch.SymInt, torch.SymFloat)):
        value = value.node.expr
    if isinstance(value, sympy.Basic):
        value = sympy.expand(value.xreplace(dict(rename))) if rename else value
        if value.is_Integer:
            return int(value)
        return value
    return value


# ----------------------------------------------------------------------------------------------
# Recording the aten ops of a node, and of the code that stayed eager


class Recorder(TorchDispatchMode):
    """Records every aten op (with its arguments and outputs) run inside it; a higher-order op
    (``torch.cond``) as itself, which no formula prices (an unknown op, as under export)."""

    supports_higher_order_operators = True

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[OpOverload, tuple, dict, Any]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func not in _SKIP_RECORD:
            self.calls.append((func, args, kwargs, out))
        return out


class _EagerRecorder(TorchDispatchMode):
    """Records the aten ops run outside the traced graphs, per innermost untraced module; and every
    op of each call of a graph after its first (``repeats``: graph path -> one list per further call).

    Why the repeats: a graph's rows come from one propagation, at its first call's shapes, so a
    module traced apart that eager code calls again (a detection head run on each FPN level) was
    costed once: retinanet's heads at the largest level only, the model 15 % short, silently."""

    supports_higher_order_operators = True  # torch.cond: recorded as itself (see Recorder)

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[str, list] = {}
        self.repeats: dict[str, list[list]] = {}
        self.modules: list[tuple[str, int]] = []  # (path, graph depth outside it): a leaf inside a graph
        self.in_graph = 0
        self.graph_calls: dict[str, int] = {}
        # per graph call running: the graph whose further call records its ops, or None (a first
        # call, whose ops the graph's own rows count, also inside another graph's further call)
        self.recording: list[str | None] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _SKIP_RECORD:
            return out
        if self.recording and self.recording[-1] is not None:
            self.repeats[self.recording[-1]][-1].append((func, args, kwargs, out))
        elif not self.in_graph and self.modules:
            self.calls.setdefault(self.modules[-1][0], []).append((func, args, kwargs, out))
        return out

    def hooks(self, root: nn.Module, captured: Captured) -> list[Any]:
        """Forward hooks on ``root``'s graphs and untraced modules that keep track of where we are."""
        def enter_graph(mod: nn.Module, *_: Any, _path: str = "") -> None:
            self.in_graph += 1
            self.graph_calls[_path] = calls = self.graph_calls.get(_path, 0) + 1
            outer = self.recording[-1] if self.recording else None
            if calls == 1:
                self.recording.append(None)
            elif outer is not None:  # inside another graph's further call: that call's ops
                self.recording.append(outer)
            else:
                self.repeats.setdefault(_path, []).append([])
                self.recording.append(_path)

        def leave_graph(*_: Any) -> None:
            self.in_graph -= 1
            self.recording.pop()

        def leave_module(*_: Any) -> None:
            self.in_graph = self.modules.pop()[1]

        handles = []
        for graph in captured.graphs:
            gm = root.get_submodule(graph.path)
            handles += [gm.register_forward_pre_hook(functools.partial(enter_graph, _path=graph.path)),
                        gm.register_forward_hook(leave_graph)]
        for path, _ in captured.untraced:
            mod = root.get_submodule(path) if path else root

            def enter_module(*_: Any, _path: str = path) -> None:
                self.modules.append((_path, self.in_graph))  # an untraced leaf called by a graph
                self.in_graph = 0  # runs its own code eagerly: record it

            handles += [mod.register_forward_pre_hook(enter_module), mod.register_forward_hook(leave_module)]
        return handles


def record_eager(source: Source, example_inputs: tuple | None) -> None:
    """``source.eager``: the aten ops that the untraced modules of a partly traced model run
    themselves (outside its graphs), per module path, and ``source.repeats``: those of the further
    calls of each graph traced apart; on a meta twin, else (value-dependent code) with the real
    weights. ``source.eager`` None when the eager code runs in neither way."""
    captured = source.captured
    source.eager, source.repeats = {}, {}
    if (not captured.untraced and not any(g.path for g in captured.graphs)) or example_inputs is None:
        return
    attempts = [(meta_twin(captured.module), to_meta(tuple(example_inputs))), (captured.module, tuple(example_inputs))]
    for root, inputs in attempts:
        recorder = _EagerRecorder()
        handles = recorder.hooks(root, captured)
        try:
            with torch.no_grad(), recorder:
                call_with(root, inputs)
            source.eager, source.repeats = recorder.calls, recorder.repeats
            return
        except Exception as exc:  # eager user code: try the next way, else report it as unknown
            _log.info("eager parts of %s did not run (%s: %s)", type(captured.module).__name__, type(exc).__name__, exc)
        finally:
            for h in handles:
                h.remove()
    source.eager = None


class NodeRunner:
    """Runs single nodes on meta tensors (or in the symbolic fake mode) to see their aten ops."""

    def __init__(self, mode: FakeTensorMode | None) -> None:
        self.mode = mode
        self._modules: dict[int, nn.Module] = {}

    def _module(self, mod: nn.Module) -> nn.Module:
        if self.mode is not None:
            return mod
        if id(mod) not in self._modules:
            self._modules[id(mod)] = meta_twin(mod)
        return self._modules[id(mod)]

    def _value(self, gm: fx.GraphModule, node: fx.Node) -> Any:
        if node.op == "get_attr":
            value = attribute(gm, str(node.target))
        else:
            value = meta_val(node)
            if value is None and "val" not in node.meta and "example_value" not in node.meta:
                raise ValueError(f"node {node.name!r} has no shape information")
        return value if self.mode is not None else to_meta(value)

    def record(self, gm: fx.GraphModule, node: fx.Node) -> list[tuple[OpOverload, tuple, dict, Any]]:
        args = fx.node.map_arg(node.args, lambda n: self._value(gm, n))
        kwargs = fx.node.map_arg(node.kwargs, lambda n: self._value(gm, n))
        recorder = Recorder()
        context = self.mode if self.mode is not None else contextlib.nullcontext()
        with context, torch.no_grad(), recorder:
            if node.op == "call_module":
                self._module(gm.get_submodule(str(node.target)))(*args, **kwargs)
            elif node.op == "call_method":
                getattr(args[0], str(node.target))(*args[1:], **kwargs)
            else:
                node.target(*args, **kwargs)
        return recorder.calls


