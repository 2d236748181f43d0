"""Which model outputs a NaN sample of each input reaches, and how: for convert's NaN marking.

Codes cannot hold NaN, so the integer model flags the samples (dim 0) of each input that hold one
and marks its outputs. Which output values to mark depends on the graph: a classifier's logits
take the NaN in the same row, a transposed head in a column, ``y - y.mean(0)`` everywhere, and an
output computed from parameters alone nowhere. The prepared graph is static (tracing resolved its
control flow), so runs of the fake-quant model answer it for every batch: inputs of twice the
example's dim 0 (as two examples side by side in one batch; the example's size where a graph
fixed it), and each input in turn with NaN in row 1. Each output is

- ``ROWS``: NaN reached only rows of the example copy that holds row 1 (only row 1 at the
  example's size), so NaN samples mark their own rows. Where a model's rows are frames of one
  sample (a part of a multi-view model, [B·S, ...]) and attention mixes the frames, this marks the
  NaN frame's rows, not the sample's other frames;
- ``ALL``: NaN reached other rows or another layout (or a run failed), so a NaN anywhere in that
  input marks the whole output: never a finite value computed from NaN garbage codes in a row the
  reference computes from clean samples only;
- absent: nothing turned NaN, so the input's NaN never reaches it (as in the float model).
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import Tensor

from fxslim import generators
from fxslim.hooks import hooks_silenced
from fxslim.ir import meta_val, op_namespace

__all__ = ["ROWS", "ALL", "flagged_leaves", "nan_reach", "sample_count"]

_log = logging.getLogger(__name__)
ROWS, ALL = "rows", "all"
_ROW = 1  # the probe's NaN row: not 0, so a head that moves rows (roll, transpose) shows


def flagged_leaves(value: Any) -> list[tuple[Any, Tensor]]:
    """(pytree path, tensor) of the leaves of an input whose NaN samples ``Builder.model_input`` flags:
    float tensors with a dim 0."""
    return [(path, v) for path, v in pytree.tree_flatten_with_path(value)[0]
            if isinstance(v, Tensor) and v.is_floating_point() and v.dim() >= 1]


def sample_count(placeholder: fx.Node) -> int:
    """The example's dim 0 of the input's first flagged leaf: the length of its ``nan_samples`` flags."""
    return int(flagged_leaves(meta_val(placeholder))[0][1].shape[0])


def _probe_inputs(gm: fx.GraphModule, copies: int) -> dict[str, Any] | None:
    """Random inputs shaped as the example, float leaves of dim 0 = their input's sample count
    ``copies`` times as long; None where an input has no example shape."""
    generator = torch.Generator().manual_seed(0)
    values: dict[str, Any] = {}
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        value = meta_val(node)
        if value is None and not node.args:
            return None
        if value is None:  # an argument the example did not give: its default
            values[node.name] = node.args[0]
            continue
        count = sample_count(node) if flagged_leaves(value) else None

        def make(v: Any, count: int | None = count) -> Any:
            if not isinstance(v, Tensor):
                return v
            shape = list(v.shape)
            if v.is_floating_point() and v.dim() >= 1 and shape[0] == count:
                shape[0] *= copies
            if v.is_floating_point():
                return torch.randn(shape, generator=generator).to(v.dtype)
            return torch.zeros(shape, dtype=v.dtype)

        values[node.name] = pytree.tree_map(make, value)
    return values


def _run(gm: fx.GraphModule, inputs: dict[str, Any], outputs: list[str],
         clean: dict[str, Any] | None = None) -> dict[str, Any]:
    """The values of ``outputs`` (node names) after running ``gm`` on ``inputs``; every node's
    value where ``outputs`` is None. With ``clean`` (a run's every value) the NaN-unsafe calls
    (``_unsafe``) that NaN reaches are not made: their value is ``clean``'s, all NaN."""
    interpreter = _Probe(gm, clean)
    # a probe of a copy: the user's hooks would see it, and it must not move the user's random streams
    with torch.no_grad(), hooks_silenced(gm), generators.kept():
        interpreter.run(*inputs.values())
    by_name = {n.name: v for n, v in interpreter.env.items()}
    return by_name if outputs is None else {name: by_name[name] for name in outputs}


class _Probe(fx.Interpreter):
    """An interpreter that keeps every value, and with ``clean`` given does not call native code
    that reads coordinates from values (torchvision's deform_conv2d, roi_align, ...: ``_unsafe``)
    on NaN: it turns them into indices unchecked and kills the process (SIGSEGV), which no
    ``except`` catches, though the model never sees a NaN unless its user passes one."""

    def __init__(self, gm: fx.GraphModule, clean: dict[str, Any] | None) -> None:
        super().__init__(gm, garbage_collect_values=False)
        self.clean = clean

    def run_node(self, n: fx.Node) -> Any:
        if self.clean is not None and n.name in self.clean and _unsafe(self.module, n):
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            if any(isinstance(v, Tensor) and v.is_floating_point() and bool(v.isnan().any())
                   for v in pytree.tree_leaves((args, kwargs))):
                return pytree.tree_map(lambda v: torch.full_like(v, float("nan"))
                                       if isinstance(v, Tensor) and v.is_floating_point() else v, self.clean[n.name])
        return super().run_node(n)


# torchvision's ops whose C kernels read memory at coordinates computed from values (sampling
# offsets, boxes): NaN there is an unchecked index. Its Python-only ops (stochastic_depth) are safe.
_COORDINATE_OPS = frozenset({"deform_conv2d", "roi_align", "roi_pool", "ps_roi_align", "ps_roi_pool", "nms",
                             "batched_nms", "_batched_nms_vanilla", "_batched_nms_coordinate_trick",
                             "_multiscale_roi_align", "DeformConv2d", "RoIAlign", "RoIPool", "PSRoIAlign",
                             "PSRoIPool", "MultiScaleRoIAlign"})


def _unsafe(root: torch.nn.Module, n: fx.Node) -> bool:
    """Whether ``n`` calls one of torchvision's coordinate-reading ops (``_COORDINATE_OPS``): as a
    module called as a leaf, a function, or a ``torch.ops.torchvision`` op."""
    if n.op == "call_module":
        target: Any = type(root.get_submodule(str(n.target)))
    elif n.op == "call_function":
        target = n.target
    else:
        return False
    if op_namespace(target) is not None:
        return op_namespace(target) == "torchvision"
    return (getattr(target, "__module__", "") or "").startswith("torchvision.ops") and getattr(
        target, "__name__", "") in _COORDINATE_OPS


def _with_nan(value: Any, row: int) -> Any:
    """A copy of ``value`` with ``row`` of every flagged leaf NaN."""
    def poison(v: Any) -> Any:
        if isinstance(v, Tensor) and v.is_floating_point() and v.dim() >= 1 and v.shape[0] > row:
            v = v.clone()
            v[row] = float("nan")
        return v
    return pytree.tree_map(poison, value)


def _kind(clean: Any, poisoned: Any, rows: int, start: int, stop: int) -> str | None:
    """How the NaN reached one output value: ROWS (only rows start .. stop - 1 of ``rows``), ALL or
    None (not at all)."""
    if not isinstance(poisoned, Tensor) or not poisoned.is_floating_point():
        return None
    new = poisoned.isnan() & ~clean.isnan() if isinstance(clean, Tensor) else poisoned.isnan()
    if not bool(new.any()):
        return None
    if poisoned.dim() >= 1 and poisoned.shape[0] == rows and not bool(new[:start].any() | new[stop:].any()):
        return ROWS
    return ALL


def _clean_run(probe: fx.GraphModule) -> tuple[int, dict[str, Any], dict[str, Any]] | None:
    """(copies, inputs, every node's value) of the first probe size that runs: 2 copies of the
    example's samples, else 1; None when neither does."""
    for copies in (2, 1):
        inputs = _probe_inputs(probe, copies)
        if inputs is None:
            return None
        try:
            return copies, inputs, _run(probe, inputs, None)
        except Exception as error:  # noqa: BLE001 - any failure only makes the marking coarser
            _log.info("PROM convert: NaN probe of %s at %dx the example's samples failed (%s)",
                      type(probe).__name__, copies, error)
    return None


def nan_reach(gm: fx.GraphModule) -> dict[str, dict[str, str]]:
    """{output node name: {placeholder name: ROWS | ALL}} for the prepared graph ``gm`` (not modified:
    a copy runs, in eval mode). Inputs without a float tensor are left out; a probe that cannot run
    gives ALL for every output of that input."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder" and flagged_leaves(meta_val(n))]
    outputs = [n.name for n in next(n for n in gm.graph.nodes if n.op == "output").all_input_nodes]
    if not placeholders:
        return {name: {} for name in outputs}
    probe = copy.deepcopy(gm).eval()
    run = _clean_run(probe)
    if run is None:
        return {name: {p.name: ALL for p in placeholders} for name in outputs}
    copies, inputs, clean = run
    reach: dict[str, dict[str, str]] = {name: {} for name in outputs}
    for p in placeholders:
        count = sample_count(p)
        row = min(_ROW, count * copies - 1)
        start, stop = (row // count * count, row // count * count + count) if copies == 2 else (row, row + 1)
        try:
            poisoned = _run(probe, {**inputs, p.name: _with_nan(inputs[p.name], row)}, outputs, clean)
        except Exception as error:  # noqa: BLE001
            _log.info("PROM convert: NaN probe of input %s failed (%s); it marks whole outputs", p.name, error)
            poisoned = None
        for name in outputs:
            kind = ALL if poisoned is None else _kind(clean[name], poisoned[name], count * copies, start, stop)
            if kind is not None:
                reach[name][p.name] = kind
    return reach
