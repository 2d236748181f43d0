"""torch.export of a model, else of its largest exportable submodules.

Research code often has one construct that no exporter takes: a Python branch on a tensor value
(``if x.abs().max().item() > 1e4``) in a head. Exporting the whole model then fails, although the
backbone around it exports fine. Like symbolic capture does for tracing, this exports the whole
model if it can, and otherwise each submodule the example calls, top down, keeping the first
submodule of each branch that exports and leaving the rest eager. The items of a container the
example never calls itself (a ModuleList of blocks) are tried in turn; a module with weights never
called stays eager, named with why like every other.

Each export is tried non-strict first (the default; fast), then strict: dynamo's tracing turns
``int(positions.max())`` into an unbacked size where non-strict export needs a concrete integer.

A submodule is only exported when every call the example makes to it has the same input shapes
and values for non-tensor arguments (a RoPE shared by frame and global attention is called with
two batch sizes; an exported program holds one). Exported parts are specialised to the example's
shapes, as a whole exported model is; called with other shapes, they raise naming the input.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import itertools
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from fxslim import generators
from fxslim.ir import set_submodule

__all__ = ["Calls", "ExportedPart", "TensorSpec", "buffers_kept", "call_signature", "export_parts", "export_module",
           "record_calls", "run_example", "saved_buffers", "scratch_copy", "short_reason", "specs"]

_log = logging.getLogger(__name__)


@dataclass
class ExportedPart:
    """``gm`` (an ``ExportedProgram.module()``) sits at ``path`` in the root; ``inputs`` are the
    real values of its placeholders on the example."""

    path: str
    gm: fx.GraphModule
    inputs: dict[str, Any]


def export_module(module: nn.Module, args: tuple, kwargs: dict | None = None) -> torch.export.ExportedProgram:
    """``torch.export.export`` non-strict, then strict; raises the non-strict error if both fail.

    Each attempt exports a ``scratch_copy`` of ``module``, so ``module`` itself is never traced.
    """
    kwargs = kwargs or {}
    try:
        return _export(scratch_copy(module), args, kwargs, strict=False)
    except Exception as non_strict:
        _log.info("non-strict export of %s failed (%s); trying strict", type(module).__name__, short_reason(non_strict))
        try:
            return _export(scratch_copy(module), args, kwargs, strict=True)
        except Exception:
            raise non_strict from None


def scratch_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` that shares its parameters and buffers.

    Why: export runs forward on fake tensors and symbolic sizes, and a forward that caches in
    Python state (VGGT's PositionGetter keeps the position grids it builds in a dict, its RoPE the
    cos/sin tables keyed by size) keeps them there when the export fails. Run next, the module
    would compute with them (GuardOnDataDependentSymNode). Shared tensors: the exported program
    holds the module's own weights, so weights tied with a part that stays eager stay tied.
    """
    memo = {id(t): t for t in itertools.chain(module.parameters(), module.buffers())}
    return copy.deepcopy(module, memo)


def _export(module: nn.Module, args: tuple, kwargs: dict, strict: bool) -> torch.export.ExportedProgram:
    """``torch.export.export``, without the partial graph it prints to stderr when it fails (the
    error says what stopped it, and a capture in parts may try many modules)."""
    printed = io.StringIO()
    with contextlib.redirect_stderr(printed):
        program = torch.export.export(module, args, kwargs, strict=strict)
    sys.stderr.write(printed.getvalue())  # a successful export's warnings stay visible
    return program


def export_parts(model: nn.Module, example_inputs: Sequence[Any]) -> tuple[nn.Module, list[ExportedPart], list[tuple[str, str]]]:
    """A copy of ``model`` with its largest exportable submodules replaced by their exported
    graphs, those parts, and ``(path, reason)`` for each module that stayed eager.

    Raises the whole-model export error when nothing exports.
    """
    root = copy.deepcopy(model)
    try:
        program = export_module(root, tuple(example_inputs))
    except Exception as whole_error:
        whole_reason = short_reason(whole_error)
        calls = record_calls(root, example_inputs)
        parts: list[ExportedPart] = []
        eager: list[tuple[str, str]] = [("", f"not exportable ({whole_reason}); its submodules were exported instead")]
        _export_children(root, "", calls, parts, eager)
        if not parts:
            raise whole_error
        for part in parts:
            set_submodule(root, part.path, part.gm)
        return root, parts, eager
    gm = program.module()
    return gm, [ExportedPart("", gm, _placeholder_inputs(gm, tuple(example_inputs), {}))], []


@dataclass(frozen=True)
class TensorSpec:
    """What a tensor of the example is, without its values."""

    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    def fake(self) -> torch.Tensor:
        return torch.empty_strided(self.shape, self.stride, dtype=self.dtype, device=self.device)


def specs(value: Any) -> Any:
    """``value`` with every tensor replaced by its ``TensorSpec`` (kept without holding memory)."""
    return tree_map(lambda t: TensorSpec(tuple(t.shape), tuple(t.stride()), t.dtype, t.device)
                    if isinstance(t, torch.Tensor) and t.layout == torch.strided else t, value)


@dataclass
class Calls:
    """The first call's inputs of one submodule, whether every call looked the same, and the
    forward arguments that had their default value in every call (``_default_args``)."""

    args: tuple
    kwargs: dict
    signature: Any
    default_args: dict[str, Any]
    consistent: bool = True
    both_ways: set[str] = field(default_factory=set)  # None-default arguments None in one call, given in another
    outputs: dict[str, Any] = field(default_factory=dict)  # the first output (``specs``) of each ``signature`` seen


def call_signature(args: tuple, kwargs: dict) -> str:
    """The shapes and dtypes of a call's tensors, and its other values: calls alike have equal ones."""
    def one(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return ("tensor", tuple(value.shape), value.dtype)
        return value

    return repr(tree_map(one, (args, kwargs)))


def record_calls(root: nn.Module, example_inputs: Sequence[Any]) -> dict[str, Calls]:
    """Run the example once and keep each submodule's calls by path (buffers restored after), with
    the first output of each different call.

    A module reachable under several paths (a RoPE shared by every block) has all its calls
    under each of them.
    """
    calls: dict[str, Calls] = {}
    hooks, outputs = [], []
    for path, module in root.named_modules(remove_duplicate=False):
        if not path:
            continue

        def hook(mod: nn.Module, args: tuple, kwargs: dict, _path: str = path) -> None:
            signature = call_signature(args, kwargs)
            default_args = _default_args(mod, args, kwargs)
            seen = calls.get(_path)
            if seen is None:
                calls[_path] = Calls(args, dict(kwargs), signature, default_args)
                return
            if seen.signature != signature:
                seen.consistent = False
            nones = {name for name, v in default_args.items() if v is None}
            seen.both_ways |= {name for name, v in seen.default_args.items() if v is None} ^ nones
            seen.default_args = {name: v for name, v in seen.default_args.items() if name in default_args}

        def output_hook(mod: nn.Module, args: tuple, kwargs: dict, output: Any, _path: str = path) -> None:
            seen = calls.get(_path)
            if seen is not None:
                signature = call_signature(args, kwargs)
                if signature not in seen.outputs:
                    seen.outputs[signature] = specs(output)

        hooks.append((module, hook))
        outputs.append(module.register_forward_hook(output_hook, with_kwargs=True))
    try:
        run_example(root, hooks, example_inputs)
    finally:
        for handle in outputs:
            handle.remove()
    return calls


_SCALARS = (bool, int, float, str)


def _default_args(module: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Name -> value of the parameters of ``module.forward`` that have their default in this call,
    where that default is None or a scalar (``attn_mask=None``, ``is_causal=False``): one value a
    trace can fix as a constant."""
    try:
        signature = inspect.signature(module.forward)
        bound = signature.bind(*args, **kwargs)
    except (TypeError, ValueError):  # no signature to read, or one the call does not fit
        return {}
    bound.apply_defaults()
    return {name: value for name, value in bound.arguments.items()
            if _is_default(value, signature.parameters[name].default)}


def _is_default(value: Any, default: Any) -> bool:
    """Whether ``value`` is ``default``, a None or scalar default (``True`` is not ``1``)."""
    if default is None:
        return value is None
    return type(default) in _SCALARS and type(value) is type(default) and value == default


def example_call(module: nn.Module, inputs: Sequence[Any]) -> tuple[tuple, dict[str, Any]]:
    """(args, kwargs) that call ``module`` on example ``inputs``: one value per forward parameter in
    order, keyword-only ones included (the form ``as_example`` asks for), those passed by keyword.
    More values than parameters stay positional, for the call to refuse them.

    Why: the example of ``forward(self, x, *, flip)`` is ``(x, True)``, and ``module(x, True)`` is a
    TypeError; a root that does not trace whole is run on its example, and failed there."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):  # a builtin or C forward: positional, as given
        return tuple(inputs), {}
    positional = sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)
    keyword = [p.name for p in params if p.kind is p.KEYWORD_ONLY]
    if any(p.kind is p.VAR_POSITIONAL for p in params) or len(inputs) > positional + len(keyword):
        return tuple(inputs), {}
    return tuple(inputs[:positional]), dict(zip(keyword, inputs[positional:]))


def call_with(module: nn.Module, inputs: Sequence[Any]) -> Any:
    """``module`` called on example ``inputs`` (``example_call``)."""
    args, kwargs = example_call(module, inputs)
    return module(*args, **kwargs)


def run_example(root: nn.Module, pre_hooks: list[tuple[nn.Module, Callable]], example_inputs: Sequence[Any]) -> Any:
    """Run ``root`` on a copy of the example once, with forward pre-hooks (``hook(module, args,
    kwargs)``) on the given modules, and undo what the run wrote into buffers (a call counter, BN
    statistics in train mode), and to the global random generators (dropout in train mode:
    ``generators.kept``). The copy: a forward that normalises its input in place must not change
    the caller's example. Returns the output."""
    handles = [module.register_forward_pre_hook(hook, with_kwargs=True) for module, hook in pre_hooks]
    inputs = tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, tuple(example_inputs))
    try:
        with torch.no_grad(), buffers_kept(root), generators.kept():
            return call_with(root, inputs)
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def buffers_kept(module: nn.Module) -> Iterator[None]:
    """Put back the values of ``module``'s buffers after a run that may write them (a call
    counter, BN statistics in train mode); meta buffers hold no values."""
    put_back = saved_buffers(module)
    try:
        yield
    finally:
        put_back()


def saved_buffers(module: nn.Module) -> Callable[[], None]:
    """A function putting back the values ``module``'s buffers have now (``buffers_kept``)."""
    saved = [(b, b.clone()) for b in module.buffers() if not b.is_meta]

    def put_back() -> None:
        with torch.no_grad():
            for buffer, value in saved:
                if not torch.equal(buffer, value):
                    buffer.copy_(value)

    return put_back


def _export_children(module: nn.Module, path: str, calls: dict[str, Calls], parts: list[ExportedPart],
                     eager: list[tuple[str, str]]) -> None:
    """Export each child of ``module`` (at ``path``), top down; each child ends exported, eager with
    a reason in ``eager``, or (a container such as a ModuleList of blocks, never called itself while
    modules under it are) with its own children visited: nothing that holds weights is dropped
    silently."""
    for name, child in module.named_children():
        child_path = f"{path}.{name}" if path else name
        record = calls.get(child_path)
        if record is None:
            if any(p.startswith(f"{child_path}.") for p in calls):
                _export_children(child, child_path, calls, parts, eager)
            elif any(True for _ in child.parameters()):  # a dropout or activation never called holds nothing
                eager.append((child_path, "not called by the example inputs: nothing to export it with"))
            continue
        if not record.consistent:
            eager.append((child_path, "called with inputs of different shapes; its submodules were exported instead"))
            _export_children(child, child_path, calls, parts, eager)
            continue
        try:
            program = export_module(child, record.args, record.kwargs)
        except Exception as error:
            if any(True for _ in child.children()):
                eager.append((child_path, f"not exportable ({short_reason(error)}); its submodules were exported instead"))
                _export_children(child, child_path, calls, parts, eager)
            else:
                eager.append((child_path, f"not exportable ({short_reason(error)})"))
            continue
        gm = program.module()
        parts.append(ExportedPart(child_path, gm, _placeholder_inputs(gm, record.args, record.kwargs)))


def _placeholder_inputs(gm: fx.GraphModule, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Placeholder name -> real value: an exported module's placeholders are its flattened inputs."""
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    leaves = tree_flatten((args, kwargs))[0]
    return dict(zip(names, leaves)) if len(names) == len(leaves) else {}



def short_reason(error: BaseException) -> str:
    """An exception's type and first line, short enough for a report row."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:200]
