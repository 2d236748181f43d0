"""A traced tensor's dtype and device, read from the example while tracing, each read guarded in the graph.

Why: research code branches on them (π³'s attention picks its SDPA kernel with ``if q.dtype ==
torch.bfloat16``, Fast3R's checks ``if dtype == torch.float32``). To a symbolic trace ``q.dtype``
is a Proxy, the branch raises, and the whole module stays an opaque leaf: HTTM never saw π³'s or
Fast3R's global attention. What: a traced value whose ``dtype``, ``device`` or ``is_cuda`` is
read gets it from the example: the graph traced so far runs on fake tensors made from the
example's shapes, dtypes and devices (lazily, only up to the value read, so graphs that read
none pay nothing). Passed to an op it stays a node (``device=x.device`` follows the tensor); a
comparison or a truth test of it takes the example's branch, and ``check_traced_attribute`` in
the graph then raises a ValueError when a later call's tensor has another dtype or device,
instead of running the branch traced for the example's. A value the fake run cannot give (data-dependent
ops, code that does not run on fake tensors) stays a Proxy, and the trace fails as before.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.fx._symbolic_trace as fx_trace
import torch.utils._pytree as pytree
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.node import has_side_effect

from fxslim.export_parts import call_signature
from fxslim.hooks import hooks_silenced

__all__ = ["TensorSpec", "specs", "TypedProxy", "KnownAttribute", "KnownAttributes", "check_traced_attribute"]

ATTRIBUTES = ("dtype", "device", "is_cuda")
_UNKNOWN = object()


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
    return pytree.tree_map(lambda t: TensorSpec(tuple(t.shape), tuple(t.stride()), t.dtype, t.device)
                           if isinstance(t, torch.Tensor) and t.layout == torch.strided else t, value)


@has_side_effect
def check_traced_attribute(x: Any, name: str, expected: Any, where: str) -> Any:
    """Raise a ValueError unless ``x.<name>`` is what the example's was: the graph took the branch
    the example's value chose (``if q.dtype == torch.bfloat16``). Traced again (a GraphModule
    loaded by ``torch.load``, or optimized again), it is a call of its own, as ``fx.wrap`` makes it."""
    if isinstance(x, fx.Proxy):
        return x.tracer.create_proxy("call_function", check_traced_attribute, (x, name, expected, where), {})
    if name != "dtype" and getattr(x, "is_meta", False):
        return None  # a run on the meta device (the cost model's, a model built on it) has no other device
    actual = getattr(x, name, expected)
    if actual != expected:
        raise ValueError(f"{where}: traced for a tensor with {name} {expected} (its forward branches on it); this "
                         f"call gives {name} {actual}. Fix: optimize with an example of that {name}, or call it "
                         f"with {name} {expected}")


class KnownAttributes:
    """The example's value of each node a tracer has made so far, computed on fake tensors when asked."""

    def __init__(self, tracer: fx.Tracer, example: Callable[[], tuple[tuple, dict, Callable[[str], Any]] | None]) -> None:
        self.tracer, self.example = tracer, example
        self.values: dict[fx.Node, Any] = {}
        self.guarded: set[tuple[fx.Node, str]] = set()
        self.mode: FakeTensorMode | None = None
        self.bound: dict[str, Any] | None = None
        self.outputs: Callable[[str], Any] = lambda target: None

    def inert(self, autocasts: list[Any]) -> bool:
        """Whether the ``torch.autocast`` contexts forward entered change nothing in the example's run:
        each for a device none of its tensors is on (Fast3R wraps attention in ``autocast("cuda")``;
        on the CPU it does nothing, where a symbolic trace, which records no autocast, would do the same)."""
        return self.inert_for(autocasts, self.example)

    @staticmethod
    def inert_for(autocasts: list[Any], example: Callable[[], Any]) -> bool:
        found = example()
        devices = {s.device.type for s in pytree.tree_leaves(found[:2]) if isinstance(s, TensorSpec)} if found else set()
        return bool(devices) and all(getattr(a, "device", None) not in devices for a in autocasts)

    def guard_devices(self, graph: fx.Graph) -> None:
        """Check the device of every tensor input against the example's: on another device, the
        autocast contexts ``inert`` found would change what forward computes."""
        if self.bound is None:
            self.bound = self._bound()
        where = type(self.tracer.root).__name__ + " (its forward enters torch.autocast for another device)"
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        if not placeholders:
            return
        with graph.inserting_after(placeholders[-1]):
            for node in reversed(placeholders):
                spec = self.bound.get(str(node.target).lstrip("*"))
                if isinstance(spec, TensorSpec):
                    graph.call_function(check_traced_attribute, (node, "device", spec.device, where))

    def read(self, proxy: fx.Proxy) -> Any:
        """The example's value of ``proxy`` (a fake tensor), ``_UNKNOWN`` where the fake run cannot say."""
        value = self._value(proxy.node)
        return value if isinstance(value, torch.Tensor) else _UNKNOWN

    def guard(self, proxy: fx.Proxy, name: str) -> None:
        """Check ``proxy.<name>`` against the example's in the graph, from here on (once per value)."""
        if (proxy.node, name) not in self.guarded:
            self.guarded.add((proxy.node, name))
            expected = getattr(self.values[proxy.node], name)
            where = type(self.tracer.root).__name__
            self.tracer.create_node("call_function", check_traced_attribute, (proxy.node, name, expected, where), {})

    def _value(self, node: fx.Node) -> Any:
        if node not in self.values:
            if self.mode is None:
                self.mode = FakeTensorMode(allow_non_fake_inputs=True)
                self.bound = self._bound()
            with self.mode, torch.no_grad(), _unpatched(), hooks_silenced(self.tracer.root):
                for n in self.tracer.graph.nodes:  # in order: the graph so far, up to ``node``
                    if n not in self.values:
                        self.values[n] = self._evaluate(n)
                    if n is node:
                        break
        return self.values.get(node, _UNKNOWN)

    def _bound(self) -> dict[str, Any]:
        """The example's value of each forward argument by name (placeholders carry the names)."""
        example = self.example()
        if example is None:
            return {}
        args, kwargs, self.outputs = example
        try:
            bound = inspect.signature(self.tracer.root.forward).bind(*args, **kwargs)
        except (TypeError, ValueError):
            return {}
        bound.apply_defaults()
        return dict(bound.arguments)

    def _evaluate(self, n: fx.Node) -> Any:
        def fetch(a: fx.Node) -> Any:
            return self.values.get(a, _UNKNOWN)

        args, kwargs = fx.node.map_arg((n.args, n.kwargs), fetch)
        if any(v is _UNKNOWN for v in pytree.tree_leaves((args, kwargs))):
            return _UNKNOWN
        root = self.tracer.root
        try:
            if n.op == "placeholder":  # a constant argument's is ``name_1`` and unknown: only its guard reads it
                name = str(n.target).lstrip("*")
                if self.bound is None or name not in self.bound:
                    return _UNKNOWN
                return pytree.tree_map(lambda s: s.fake() if isinstance(s, TensorSpec) else s, self.bound[name])
            if n.op == "get_attr":
                value: Any = root
                for part in str(n.target).split("."):
                    value = getattr(value, part)
                return value
            if n.op == "call_function":
                return n.target(*args, **kwargs)
            if n.op == "call_method":
                return getattr(args[0], str(n.target))(*args[1:], **kwargs)
            if n.op == "call_module":
                return root.get_submodule(str(n.target))(*args, **kwargs)
        except Exception:  # noqa: BLE001 - user code on fake tensors: the value is unknown, the trace decides
            if n.op != "call_module":
                return _UNKNOWN
        # a leaf that does not run on fake tensors (a RoPE with a table keyed by values): what a call
        # of it with tensors of these shapes and dtypes gave in the example
        recorded = (self.outputs(str(n.target)) or {}).get(call_signature(args, kwargs))
        if recorded is None:
            return _UNKNOWN
        return pytree.tree_map(lambda s: s.fake() if isinstance(s, TensorSpec) else s, recorded)


class TypedProxy(fx.Proxy):
    """A Proxy whose ``dtype``, ``device`` and ``is_cuda`` are ``KnownAttribute``s where the example
    gives them."""

    def __getattr__(self, name: str) -> Any:
        known = getattr(self.tracer, "known", None)
        if name in ATTRIBUTES and known is not None:
            value = known.read(self)
            if value is not _UNKNOWN:
                return KnownAttribute(self, name, getattr(value, name), functools.partial(known.guard, self, name))
        return super().__getattr__(name)


class KnownAttribute(fx.proxy.Attribute):
    """A traced tensor's ``dtype``, ``device`` or ``is_cuda`` (or a device's ``type`` and ``index``)
    whose example value is known: passed to an op it stays a node of the graph (``torch.arange(n,
    device=x.device)`` follows the tensor's device), while comparing it or taking its truth gives the
    example's answer, and the first time it does, a guard of the tensor's attribute in the graph."""

    def __init__(self, root: fx.Proxy, attr: str, value: Any, guard: Callable[[], None]) -> None:
        super().__init__(root, attr)
        self.value, self.guard = value, guard

    def _answer(self, answer: Any) -> Any:
        self.guard()
        return answer

    def __eq__(self, other: Any) -> Any:  # type: ignore[override]
        if isinstance(other, fx.Proxy):
            return super().__eq__(other)
        return self._answer(self.value == other)

    def __ne__(self, other: Any) -> Any:  # type: ignore[override]
        if isinstance(other, fx.Proxy):
            return super().__ne__(other)
        return self._answer(self.value != other)

    __hash__ = fx.proxy.Attribute.__hash__

    def __bool__(self) -> bool:
        return self._answer(bool(self.value))

    def __getattr__(self, name: str) -> Any:
        if isinstance(self.value, torch.device) and name in ("type", "index"):
            return KnownAttribute(self, name, getattr(self.value, name), self.guard)
        return super().__getattr__(name)


@contextlib.contextmanager
def _unpatched() -> Iterator[None]:
    """nn.Module's own ``__call__`` and ``__getattr__`` while the fake run calls modules: the
    tracer's patched ones would add the run's calls and parameter reads to the graph."""
    call, get = nn.Module.__call__, nn.Module.__getattr__
    nn.Module.__call__, nn.Module.__getattr__ = fx_trace._orig_module_call, fx_trace._orig_module_getattr
    try:
        yield
    finally:
        nn.Module.__call__, nn.Module.__getattr__ = call, get
