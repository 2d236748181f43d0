"""A traced tensor's dtype and device, read from the example while tracing, each read guarded in the graph.

Why: research code branches on them (π³'s attention picks its SDPA kernel with ``if q.dtype ==
torch.bfloat16``, Fast3R's checks ``if dtype == torch.float32``). To a symbolic trace ``q.dtype``
is a Proxy, the branch raises, and the whole module stays an opaque leaf: HTTM never saw π³'s or
Fast3R's global attention. What: a traced value whose ``dtype``, ``device`` or ``is_cuda`` is
read and compared (or taken for its truth) gets it from the example: the graph
traced so far runs on fake tensors made from the example's shapes, dtypes and devices, torch's
own functions only, a module giving what it gave in the example for such inputs (lazily, up to
the value compared: graphs that compare none pay nothing). The trace takes the example's branch,
and ``check_traced_attribute`` in the graph raises a ValueError when a later call's tensor has
another dtype or device, instead of running the branch traced for the example's. Passed to an
op the attribute stays a node (``device=x.device`` follows the tensor). A value the example
cannot give (after a data-dependent op, or the user's own functions) stays a Proxy, and the
trace fails as before.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.fx as fx
import torch.fx._symbolic_trace as fx_trace
import torch.utils._pytree as pytree
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import _disable_current_modes
from torch.fx.node import has_side_effect

from fxslim import generators
from fxslim.export_parts import TensorSpec, call_signature
from fxslim.hooks import has_hooks
from fxslim.ir import op_namespace

__all__ = ["ExampleNeeded", "TypedProxy", "KnownAttribute", "KnownAttributes", "autocasts_inert", "check_traced_attribute"]

ATTRIBUTES = ("dtype", "device", "is_cuda")
_UNKNOWN = object()


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


class ExampleNeeded(BaseException):
    """Raised through the traced code when a comparison needs the example and it has not run yet:
    the caller runs it (``prepare``) outside the trace, which holds ``nn.Module``'s patched methods
    and watches for draws and autocast entries, and traces again. A BaseException, so that the
    traced code's own ``except Exception`` lets it through."""

    def __init__(self, prepare: Callable[[], Any]) -> None:
        super().__init__("the example has not run yet")
        self.prepare = prepare


def autocasts_inert(autocasts: list[Any], example: Callable[[], Any]) -> bool:
    """Whether the ``torch.autocast`` contexts forward entered change nothing in the example's run:
    each for a device none of its tensors is on (Fast3R wraps attention in ``autocast("cuda")``; on
    the CPU it does nothing, where a symbolic trace, which records no autocast, would do the same)."""
    found = example()
    devices = {s.device.type for s in pytree.tree_leaves(found[:2]) if isinstance(s, TensorSpec)} if found else set()
    return bool(devices) and all(getattr(a, "device", None) not in devices for a in autocasts)


class KnownAttributes:
    """The example's value of each node a tracer has made so far, computed on fake tensors when asked."""

    def __init__(self, tracer: fx.Tracer, example: Callable[[], tuple[tuple, dict, Callable[[str], Any]] | None]) -> None:
        self.tracer, self.example = tracer, example
        self.values: dict[fx.Node, Any] = {}
        self.guarded: set[tuple[fx.Node, str]] = set()
        self.mode: FakeTensorMode | None = None
        self.bound: dict[str, Any] | None = None
        self.outputs: Callable[[str], Any] = lambda target: None

    def guard_devices(self, graph: fx.Graph) -> None:
        """Check the device of every tensor input against the example's: on another device, the
        autocast contexts ``autocasts_inert`` found would change what forward computes."""
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
        """The example's value of ``proxy`` (a fake tensor), ``_UNKNOWN`` where the example cannot say."""
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
                self.bound = self._bound()  # raises ExampleNeeded where the example has not run yet
                self.mode = FakeTensorMode(allow_non_fake_inputs=True)
            # the trace's own watch (``generators.kept``: a draw would keep the module eager) does not see
            # this run, which is not the traced code
            with _disable_current_modes(), self.mode, torch.no_grad(), _no_autocast(), generators.kept():
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
        """The example's value of ``n`` on fake tensors: torch's own functions and tensor methods run,
        a module without hooks gives what it gave in the example for inputs of these shapes and
        dtypes, and other code is not run (a cache it fills would keep fake tensors)."""
        args, kwargs = fx.node.map_arg((n.args, n.kwargs), lambda a: self.values.get(a, _UNKNOWN))
        if any(v is _UNKNOWN for v in pytree.tree_leaves((args, kwargs))):
            return _UNKNOWN
        try:
            if n.op == "placeholder":  # a constant argument's is ``name_1`` and unknown: only its guard reads it
                name = str(n.target).lstrip("*")
                if self.bound is None or name not in self.bound:
                    return _UNKNOWN
                return _fakes(self.bound[name])
            if n.op == "get_attr":
                value: Any = self.tracer.root
                for part in str(n.target).split("."):
                    value = _attribute(value, part)
                return self.mode.from_tensor(value) if isinstance(value, torch.Tensor) else value
            if n.op == "call_function" and _torchs(n.target):
                return n.target(*args, **kwargs)
            if n.op == "call_method" and isinstance(args[0], torch.Tensor):
                return getattr(args[0], str(n.target))(*args[1:], **kwargs)
            if n.op == "call_module" and not has_hooks(self.tracer.root.get_submodule(str(n.target))):
                # (the example's calls are recorded with hooks silenced: a hook may change the output)
                recorded = (self.outputs(str(n.target)) or {}).get(call_signature(args, kwargs))
                return _UNKNOWN if recorded is None else _fakes(recorded)
        except Exception:  # noqa: BLE001 - torch's code on fake tensors (data-dependent ops): unknown
            return _UNKNOWN
        return _UNKNOWN


def _fakes(value: Any) -> Any:
    return pytree.tree_map(lambda s: s.fake() if isinstance(s, TensorSpec) else s, value)


def _torchs(target: Any) -> bool:
    """Whether a graph's function is torch's own (an op, ``torch.*``, ``F.*``) or an operator: code
    that caches nothing of its arguments."""
    if op_namespace(target) is not None:
        return True
    module = getattr(target, "__module__", None) or ""
    return module.split(".")[0] in ("torch", "_operator", "operator", "builtins") or module == "math"


@contextlib.contextmanager
def _no_autocast() -> Iterator[None]:
    """The caller's autocast off: it would cast (and cache the casts of) real weights into fake ones.
    Switched, not entered: an autocast context entered during a trace keeps the module eager."""
    devices = [d for d in ("cpu", "cuda") if torch.is_autocast_enabled(d)]
    for device in devices:
        torch.set_autocast_enabled(device, False)
    try:
        yield
    finally:
        for device in devices:
            torch.set_autocast_enabled(device, True)


class TypedProxy(fx.Proxy):
    """A Proxy whose ``dtype``, ``device`` and ``is_cuda`` are ``KnownAttribute``s."""

    def __getattr__(self, name: str) -> Any:
        known = getattr(self.tracer, "known", None)
        if name in ATTRIBUTES and known is not None:
            return KnownAttribute(self, name, known)
        return super().__getattr__(name)


class KnownAttribute(fx.proxy.Attribute):
    """A traced tensor's ``dtype``, ``device`` or ``is_cuda`` (or a device's ``type`` and ``index``).
    Passed to an op it is a node of the graph (``torch.arange(n, device=x.device)`` follows the
    tensor's device); compared or taken for its truth, it gives the example's value, looked up
    only then, and the first time it does, a guard of the tensor's attribute in the graph. Where
    the example cannot say, it is a plain Proxy (the trace fails as before). Not for ``str`` or
    ``hash``: a cache keyed by ``str(x.device)`` (timm's LeViT) would pin the graph to the example's
    device for nothing."""

    def __init__(self, root: fx.Proxy, attr: str, known: KnownAttributes) -> None:
        super().__init__(root, attr)
        self.known = known

    def _example(self) -> Any:
        """The example's value, guarded; ``_UNKNOWN`` where the example cannot say."""
        chain: list[str] = []
        proxy: Any = self
        while isinstance(proxy, KnownAttribute):
            chain.append(proxy.attr)
            proxy = proxy.root
        value = self.known.read(proxy)
        if value is _UNKNOWN:
            return _UNKNOWN
        self.known.guard(proxy, chain[-1])
        for name in reversed(chain):
            value = getattr(value, name)
        return value

    def __eq__(self, other: Any) -> Any:  # type: ignore[override]
        value = _UNKNOWN if isinstance(other, fx.Proxy) else self._example()
        return super().__eq__(other) if value is _UNKNOWN else value == other

    def __ne__(self, other: Any) -> Any:  # type: ignore[override]
        value = _UNKNOWN if isinstance(other, fx.Proxy) else self._example()
        return super().__ne__(other) if value is _UNKNOWN else value != other

    def __bool__(self) -> bool:
        value = self._example()
        return super().__bool__() if value is _UNKNOWN else bool(value)

    def __getattr__(self, name: str) -> Any:
        if self.attr == "device" and name in ("type", "index"):
            return KnownAttribute(self, name, self.known)
        return super().__getattr__(name)


def _attribute(obj: Any, name: str) -> Any:
    """``getattr`` past the tracer's patch of ``nn.Module.__getattr__`` (which gives parameters as
    Proxies while it traces)."""
    if isinstance(obj, nn.Module):
        try:
            return object.__getattribute__(obj, name)
        except AttributeError:
            return fx_trace._orig_module_getattr(obj, name)
    return getattr(obj, name)

