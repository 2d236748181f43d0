"""PROM convert: a prepared (fake-quant) PROM model → an integer GraphModule of ``torch.ops.fxslim`` ops.

Reads the graph ``fxslim.prepare`` made, in order. Every ActFakeQuant node closes a
chain that becomes one integer op writing uint8 codes on that quantizer's grid:

    model input                         → quant    fxslim::quantize_per_tensor
    QConv2d → [BN] → [ReLU | ReLU6]     → quant    fxslim::ternary_conv2d / fxslim::int8_conv2d
    QLinear → [ReLU | ReLU6]            → quant    fxslim::int8_linear
    a + b → [ReLU | ReLU6]              → quant    fxslim::int8_add
    global average pool                 → quant    fxslim::int8_global_avg_pool2d

With ``runtime="onednn"`` convs, linears and adds become ``fxslim::qconv2d`` / ``qlinear`` /
``qadd`` (``fxslim.runtime.prom_onednn``) and a conv feeding a residual add fuses with it
(``prom_fuse``). BN is folded with its running statistics, ReLU/ReLU6 become clamp bounds, value-preserving
ops (flatten, view, reshape, dropout, identity) are replayed on the codes, and quantized graph
outputs are dequantized. Codes cannot hold NaN: ``fxslim::nan_samples`` flags the samples
whose input holds one, and their dequantized outputs are NaN (as the fake-quant model's are when
every output sees the whole input, e.g. after a global pool). Weights (ternary ones packed, 2 bits
each), int32 biases, multipliers and rounding offsets become buffers under the layer's own name;
scalars are op arguments. An op outside these patterns raises ValueError naming the node. The
prepared model is only read, never modified.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.fx as fx
from torch import nn

from fxslim.ir import META_PASS, meta_val
from fxslim.passes.inplace import remove_dead_code
from fxslim.propagate import propagate
from fxslim.passes.prom_fuse import fuse_conv_add
from fxslim.passes.prom_graph import is_activation, is_quant, is_residual_add, is_shape_op
from fxslim.runtime.quant import (
    ActFakeQuant, IntegerOp, QConv2d, QLinear, convert_add, convert_conv, convert_global_avg_pool, convert_input,
    convert_linear, convert_output,
)
from fxslim.runtime.prom_onednn import onednn_available, vnni_available
from fxslim.runtime.quant_onednn import convert_add_onednn, convert_conv_onednn, convert_linear_onednn

__all__ = ["convert", "code_agreement", "Agreement", "QUANT_META", "RUNTIMES"]

_log = logging.getLogger(__name__)
QUANT_META = "fxslim_prom_quant"  # node meta on converted ops: the ActFakeQuant whose grid they write
_PASSTHROUGH = (nn.Dropout, nn.Identity)
RUNTIMES = ("reference", "onednn")


@dataclass
class _Chain:
    """core → [BN] → [activation and value-preserving ops] → quant."""

    quant: fx.Node
    core: fx.Node
    kind: str  # input | conv | linear | add | pool
    bn: nn.BatchNorm2d | None = None
    activation: str = "none"
    tail: list[fx.Node] = field(default_factory=list)  # value-preserving ops, graph order
    members: list[fx.Node] = field(default_factory=list)  # core and everything up to the quant


def _error(node: fx.Node, what: str) -> ValueError:
    return ValueError(f"PROM convert: {what}: {node.format_node()}")


def _is_global_pool(gm: fx.GraphModule, node: fx.Node) -> bool:
    """adaptive_avg_pool2d to 1×1 (module or function), or mean over the two spatial dims."""
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        return isinstance(module, nn.AdaptiveAvgPool2d) and module.output_size in (1, (1, 1))
    if node.op == "call_function" and node.target is torch.nn.functional.adaptive_avg_pool2d:
        return node.args[1:2] in ((1,), ((1, 1),), ([1, 1],)) or node.kwargs.get("output_size") in (1, (1, 1))
    is_mean = (node.op == "call_function" and node.target is torch.mean) or (node.op == "call_method" and node.target == "mean")
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    shape = meta_val(node.args[0]).shape if is_mean and meta_val(node.args[0]) is not None else ()
    return is_mean and len(shape) == 4 and isinstance(dims, (tuple, list)) and sorted(d % 4 for d in dims) == [2, 3]


def _chain(gm: fx.GraphModule, quant: fx.Node) -> _Chain:
    """Walk back from a quant node to the op that computes its tensor."""
    chain = _Chain(quant, quant.args[0], "")
    cur = quant.args[0]
    while is_shape_op(gm, cur) or is_activation(gm, cur):
        act = is_activation(gm, cur)
        if act and chain.activation != "none":
            raise _error(cur, "two activations in a row cannot become one clamp")
        chain.activation = act or chain.activation
        if not act:
            chain.tail.insert(0, cur)
        cur = cur.args[0]
    module = gm.get_submodule(str(cur.target)) if cur.op == "call_module" else None
    if isinstance(module, nn.BatchNorm2d):
        chain.bn = module
        cur = cur.args[0]
        module = gm.get_submodule(str(cur.target)) if cur.op == "call_module" else None
        if not isinstance(module, QConv2d):
            raise _error(cur, "BatchNorm can only be folded into the conv that feeds it")
    chain.core = cur
    if isinstance(module, QConv2d):
        chain.kind = "conv"
    elif isinstance(module, QLinear):
        chain.kind = "linear"
    elif cur.op == "placeholder":
        chain.kind = "input"
    elif is_residual_add(cur):
        chain.kind = "add"
    elif _is_global_pool(gm, cur):
        chain.kind = "pool"
    else:
        raise _error(cur, f"cannot convert this op (it feeds {quant.name}); expected a conv, linear, residual add, "
                          "global average pool or the model input")
    if chain.kind in ("input", "pool") and chain.activation != "none":
        raise _error(quant, f"an activation after the {chain.kind} has no integer form here")
    chain.members = _members(quant, cur)
    return chain


def _members(quant: fx.Node, core: fx.Node) -> list[fx.Node]:
    """The nodes from core to quant; each must feed only the next (a float copy cannot escape)."""
    node, out = quant.args[0], []
    while True:
        if len(node.users) != 1 and not (node is core and node.op == "placeholder"):
            raise _error(node, f"its float value is used outside the chain ending in {quant.name} (intermediate escapes)")
        out.append(node)
        if node is core:
            return out
        node = node.args[0]


class _Builder:
    """The new graph, its buffers, and the map from prepared nodes to (new node, grid or None)."""

    def __init__(self, gm: fx.GraphModule, runtime: str) -> None:
        self.gm = gm
        self.runtime = runtime
        self.graph = fx.Graph()
        self.buffers: dict[str, torch.Tensor] = {}
        self.env: dict[fx.Node, tuple[fx.Node, ActFakeQuant | None]] = {}
        self.nan_samples: list[fx.Node] = []  # per quantized model input: which samples hold a NaN

    def quantized(self, node: fx.Node, user: fx.Node) -> tuple[fx.Node, ActFakeQuant]:
        new, grid = self.env[node]
        if grid is None:
            raise _error(user, f"its input {node.name} is a float tensor (no ActFakeQuant at its producer)")
        return new, grid

    def emit(self, op: IntegerOp, inputs: list[fx.Node], prefix: str, name: str) -> fx.Node:
        """One integer op call, positional in schema order; its tensors become buffers under prefix."""
        values = dict(zip(op.inputs, inputs), **op.scalars)
        for key, tensor in op.tensors.items():
            path = f"{prefix}.{key}"
            self.buffers[path] = tensor
            values[key] = self.graph.get_attr(path)
        args = []
        for argument in op.op._schema.arguments:
            if argument.name not in values:
                break  # the rest keep their defaults
            args.append(values[argument.name])
        return self.graph.create_node("call_function", op.op, tuple(args), name=name)

    def replay(self, node: fx.Node, source: fx.Node) -> fx.Node:
        """A value-preserving op applied to ``source`` (a new-graph node): dropout and identity
        vanish, view becomes reshape."""
        if node.op == "call_module":
            module = self.gm.get_submodule(str(node.target))
            if isinstance(module, _PASSTHROUGH):
                return source
            return self.graph.call_function(torch.flatten, (source, module.start_dim, module.end_dim))
        if node.op == "call_function" and node.target is torch.nn.functional.dropout:
            return source
        new = self.graph.node_copy(node, lambda a: source if a is node.args[0] else self.env[a][0])
        if new.op == "call_method" and new.target == "view":
            new.target = "reshape"  # integer codes are channels_last: view may not apply
        return new


def _convert_chain(b: _Builder, chain: _Chain) -> fx.Node:
    """The chain's integer op, then its value-preserving tail replayed on the codes."""
    out = _convert_core(b, chain)
    for node in chain.tail:
        out = b.replay(node, out)
    return out


def _convert_core(b: _Builder, chain: _Chain) -> fx.Node:
    quant = b.gm.get_submodule(str(chain.quant.target))
    core, name = chain.core, chain.core.name
    if chain.kind == "input":
        source = b.env[core][0]
        b.nan_samples.append(b.graph.call_function(torch.ops.fxslim.nan_samples.default, (source,)))
        return b.emit(convert_input(quant), [source], "", f"{name}_quantized")
    onednn = b.runtime == "onednn"
    if chain.kind in ("conv", "linear"):
        layer = b.gm.get_submodule(str(core.target))
        x, grid = b.quantized(core.args[0], core)
        if chain.kind == "conv":
            op = (convert_conv_onednn if onednn else convert_conv)(layer, quant, bn=chain.bn, activation=chain.activation,
                                                                   x_quant=grid)
        else:
            op = (convert_linear_onednn if onednn else convert_linear)(layer, quant, activation=chain.activation,
                                                                       x_quant=grid)
        return b.emit(op, [x], str(core.target), name)
    if chain.kind == "add":
        (a, grid_a), (c, grid_c) = (b.quantized(arg, core) for arg in core.args)
        op = (convert_add_onednn if onednn else convert_add)(grid_a, grid_c, quant, activation=chain.activation)
        return b.emit(op, [a, c], "", name)
    x, grid = b.quantized(core.args[0], core)
    pooled = b.emit(convert_global_avg_pool(grid, quant), [x], "", name)
    if meta_val(core).dim() == 2:  # mean without keepdim: [N, C]
        pooled = b.graph.call_function(torch.flatten, (pooled, 1))
    return pooled


def convert(qat_model: nn.Module, runtime: Literal["reference", "onednn"] = "reference", *,
            fuse_adds: bool = True) -> fx.GraphModule:
    """The integer model of a prepared PROM model (``prepare`` output, trained or calibrated).

    ``runtime``: ``"reference"`` emits the fixed-point ops of ``fxslim.runtime.prom_ops`` (ternary
    weights packed 2 bits each, the cost model's view); ``"onednn"`` emits the fused u8 oneDNN ops
    of ``fxslim.runtime.prom_onednn`` (weights prepacked, a conv feeding a residual add fused with
    it, unless ``fuse_adds`` is False: see ``prom_fuse``; needs a CPU with VNNI/AMX int8 dot
    products).

    Input: the float tensors the model takes; output: float32 logits (dequantized). BN running
    statistics and the observers' grids are used as they are; dropout is the identity.
    """
    if isinstance(qat_model, nn.parallel.DistributedDataParallel):
        qat_model = qat_model.module
    if not isinstance(qat_model, fx.GraphModule) or not any(is_quant(qat_model, n) for n in qat_model.graph.nodes):
        raise TypeError(f"convert: expected the GraphModule returned by fxslim.prepare, got {type(qat_model).__name__}")
    for name, module in qat_model.named_modules():
        if isinstance(module, ActFakeQuant) and not bool(module.initialized):
            raise ValueError(f"convert: observer {name!r} has seen no data; run calibrate() or train the model first")
    if runtime not in RUNTIMES:
        raise ValueError(f"convert: runtime must be one of {RUNTIMES}, got {runtime!r}")
    if runtime == "onednn" and not (onednn_available() and vnni_available()):
        raise ValueError("convert: runtime 'onednn' needs torch's oneDNN quantized ops and a CPU with VNNI or AMX "
                         "int8 dot products (exact u8·s8 sums); use runtime='reference'")
    gm = qat_model
    b = _Builder(gm, runtime)
    chains = {n: _chain(gm, n) for n in gm.graph.nodes if is_quant(gm, n)}
    inside = {m for c in chains.values() for m in c.members if m.op != "placeholder"}
    for node in gm.graph.nodes:
        if node in chains:
            chain = chains[node]
            new = _convert_chain(b, chain)
            new.meta[QUANT_META] = str(node.target)
            b.env[node] = (new, gm.get_submodule(str(node.target)))
        elif node in inside:
            continue
        elif node.op == "placeholder":
            b.env[node] = (b.graph.placeholder(node.name, node.type), None)
        elif node.op == "output":
            b.graph.output(fx.node.map_arg(node.args[0], lambda a: _dequantized(b, a)))
        elif is_shape_op(gm, node):
            b.env[node] = (b.replay(node, b.env[node.args[0]][0]), b.env[node.args[0]][1])
        else:
            raise _error(node, "cannot convert this op (not part of a conv/linear/add/pool chain ending in an ActFakeQuant)")
    out = fx.GraphModule(b.buffers, b.graph, f"{type(gm).__name__}PROM")
    if runtime == "onednn" and fuse_adds:
        fuse_conv_add(out)
    remove_dead_code(out)
    out.graph.lint()
    out.recompile()
    _propagate_shapes(out, gm)
    _log.info("PROM convert: %d integer ops, %d buffers", sum(QUANT_META in n.meta for n in out.graph.nodes), len(b.buffers))
    return out


def _dequantized(b: _Builder, node: fx.Node) -> fx.Node:
    new, grid = b.env[node]
    if grid is None:
        return new
    dequantized = b.emit(convert_output(grid), [new], "", f"{node.name}_dequantized")
    if b.nan_samples:
        flags = b.nan_samples[0]
        for other in b.nan_samples[1:]:
            flags = b.graph.call_function(torch.logical_or, (flags, other))
        dequantized.args = (*dequantized.args, flags)
    return dequantized


def _propagate_shapes(out: fx.GraphModule, source: fx.GraphModule) -> None:
    """meta['val'] on every new node, from the prepared graph's input shapes; fxslim_pass tags."""
    inputs = [meta_val(n) for n in source.graph.nodes if n.op == "placeholder"]
    propagate(out, [torch.zeros(v.shape, dtype=v.dtype) if isinstance(v, torch.Tensor) else v for v in inputs])
    for node in out.graph.nodes:
        node.meta[META_PASS] = "prom"


@dataclass(frozen=True)
class Agreement:
    """Per quantizer (ActFakeQuant name): (elements, elements within 1 LSB, elements equal)."""

    layers: dict[str, tuple[int, int, int]]

    @property
    def within_one(self) -> float:
        return sum(v[1] for v in self.layers.values()) / sum(v[0] for v in self.layers.values())

    @property
    def exact(self) -> float:
        return sum(v[2] for v in self.layers.values()) / sum(v[0] for v in self.layers.values())


@torch.no_grad()
def code_agreement(qat_model: fx.GraphModule, int_model: fx.GraphModule, *inputs: Any,
                   mode: Literal["local", "end_to_end"] = "local") -> Agreement:
    """Compare the uint8 codes of every converted op with the fake-quant model's codes (eval mode).

    ``local``: each integer op reads the fake-quant model's codes of its inputs, so a difference is
    that op's own rounding; ``end_to_end``: the integer model runs on its own, so 1-LSB differences
    propagate and can grow from layer to layer.
    """
    fake: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: fake.__setitem__(n, torch.round(o / m.scale) + m.zero_point))
             for n, m in qat_model.named_modules() if isinstance(m, ActFakeQuant)]
    was_training = qat_model.training
    try:
        qat_model.eval()(*inputs)
    finally:
        for h in hooks:
            h.remove()
        qat_model.train(was_training)
    ours: dict[str, torch.Tensor] = {}

    class _Recorder(fx.Interpreter):
        def run_node(self, node: fx.Node) -> Any:
            out = super().run_node(node)
            name = node.meta.get(QUANT_META)
            if name is not None:
                ours[name] = out
                if mode == "local":
                    out = torch.empty_like(out).copy_(fake[name].view(out.shape))
            return out

    _Recorder(int_model).run(*inputs)
    layers = {}
    for name, codes in ours.items():
        diff = (codes.to(torch.float32) - fake[name].view(codes.shape)).abs()
        layers[name] = (diff.numel(), int((diff <= 1).sum()), int((diff == 0).sum()))
    return Agreement(layers)
