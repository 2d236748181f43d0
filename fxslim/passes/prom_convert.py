"""PROM convert: a prepared (fake-quant) PROM model → an integer GraphModule of ``torch.ops.fxslim`` ops.

Reads the graph ``fxslim.prepare`` made, in order. Every ActFakeQuant node closes a
chain that becomes one integer op writing uint8 codes on that quantizer's grid:

    model input                         → quant    fxslim::quantize_per_tensor
    QConv2d → [BN] → [ReLU | ReLU6]     → quant    fxslim::ternary_conv2d / fxslim::int8_conv2d
    QLinear → [ReLU | ReLU6]            → quant    fxslim::int8_linear
    a + b → [ReLU | ReLU6]              → quant    fxslim::int8_add
    codes → BN → [ReLU | ReLU6]         → quant    fxslim::int8_conv2d (depthwise 1×1, weight 1, BN folded)
    global average pool                 → quant    fxslim::int8_global_avg_pool2d
    codes → layout / pointwise / max pool / cat → quant    replayed on codes + fxslim::lut (prom_pointwise)

With ``runtime="onednn"`` convs, linears and adds become ``fxslim::qconv2d`` / ``qlinear`` /
``qadd`` (``fxslim.runtime.prom_onednn``) and a conv feeding a residual add fuses with it
(``prom_fuse``). BN is folded with its running statistics, ReLU/ReLU6 become clamp bounds, value-preserving
ops (flatten, view, reshape, permute, transpose, slicing, dropout, identity) are replayed on the codes, and quantized graph
outputs are dequantized. Every other op runs as a float island (``prom_islands``): its uint8
inputs dequantized with their observers' grids, the float op, then quantized to the grid of the
quantizer that closes its chain; ``int_model.meta[META_PROM_CONVERT]`` names each island and why. Codes
cannot hold NaN: ``fxslim::nan_samples`` flags the samples
whose input holds one, and their outputs are NaN (as the fake-quant model's are when
every output sees the whole input, e.g. after a global pool). Weights (ternary ones packed, 2 bits
each), int32 biases, multipliers, rounding offsets and tables become buffers under the layer's own name;
scalars are op arguments. The prepared model is only read, never modified.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import inspect
import itertools
import logging
import operator
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.fx as fx
from torch.fx.graph_module import reduce_graph_module
from torch import Tensor, nn

from fxslim.capture import compiled_original, is_input_guard, is_mode_check
from fxslim.hooks import copy_hooks, hooked_modules
from fxslim.ir import (
    META_PASS, META_PROM_CONVERT, META_PROM_QUANT, META_REPORT, copy_attributes, keep_output_type, meta_val, node_fqn,
)
from fxslim.modes import outside_inference_mode
from fxslim.inplace import mutates_input, remove_dead_code, unused_calls
from fxslim.passes.prom_agreement import Agreement, code_agreement
from fxslim.passes.prom_build import Builder, codes_layout, replay_codes
from fxslim.passes.prom_fuse import fuse_conv_add
from fxslim.passes.prom_graph import is_activation, is_quant, is_residual_add, is_shape_op, module_of
from fxslim.passes.prom_islands import ConvertReport, Island, group_islands, merge_reports
from fxslim.passes.prom_lower import (
    ScaleOutOfRange, convert_add, convert_conv, convert_global_avg_pool, convert_input, convert_linear, convert_output,
)
from fxslim.passes.prom_nan import ROWS, nan_reach, sample_count
from fxslim.passes.prom_lower_onednn import convert_add_onednn, convert_conv_onednn, convert_linear_onednn
from fxslim.passes.prom_pointwise import (
    NoIntegerForm, PointwiseChain, batch_norm_of, is_codes_source, pointwise_chain, unit_depthwise_conv,
)
from fxslim.passes.prom_versions import share_version_counter
from fxslim.propagate import propagate
from fxslim.runtime.prom_onednn import onednn_available
from fxslim.runtime.prom_qat import ActFakeQuant, QConv2d, QLinear
from fxslim.tensor_attributes import check_traced_attribute
from fxslim.warn import warn_user

__all__ = ["IntegerModel", "convert", "convert_report", "prepared_parts", "code_agreement", "Agreement", "RUNTIMES"]

_log = logging.getLogger(__name__)
_INPUT_SHAPES = "fxslim_prom_input_shapes"  # IntegerModel.meta: zeros of the example's input shapes
RUNTIMES = ("reference", "onednn")


@dataclass
class _Chain:
    """core → [BN] → [activation and value-preserving ops] → quant."""

    quant: fx.Node
    core: fx.Node
    kind: str  # input | conv | linear | add | pool | bn
    bn: nn.BatchNorm2d | None = None
    activation: str = "none"
    tail: list[fx.Node] = field(default_factory=list)  # value-preserving ops, graph order
    members: list[fx.Node] = field(default_factory=list)  # core and everything up to the quant


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
    """Walk back from a quant node to the op that computes its tensor (``NoIntegerForm`` when that
    op and its tail are not one of the module docstring's patterns)."""
    chain = _Chain(quant, quant.args[0], "")
    cur = quant.args[0]
    while is_shape_op(gm, cur) or is_activation(gm, cur):
        act = is_activation(gm, cur)
        if act and chain.activation != "none":
            raise NoIntegerForm(cur, "two activations in a row")
        chain.activation = act or chain.activation
        if not act:
            chain.tail.insert(0, cur)
        cur = cur.args[0]
    bn = batch_norm_of(gm, cur)
    if bn is not None and isinstance(module_of(gm, cur.args[0]), QConv2d):
        chain.bn, cur = bn, cur.args[0]
    elif bn is not None:
        value = meta_val(cur)
        if not (is_codes_source(gm, cur.args[0]) and isinstance(value, Tensor) and value.dim() == 4):
            raise NoIntegerForm(cur, "batch norm not after a conv or on a quantized [N, C, H, W] tensor")
        chain.bn, chain.kind = bn, "bn"
    module = module_of(gm, cur)
    chain.core = cur
    if chain.kind == "bn":
        pass  # a unit depthwise 1×1 conv with the batch norm folded into it (_convert_core)
    elif isinstance(module, QConv2d):
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
        raise NoIntegerForm(cur, "not a conv, linear, residual add, global average pool or model input")
    if chain.kind in ("input", "pool") and chain.activation != "none":
        raise NoIntegerForm(quant, f"activation after the {chain.kind}")
    inputs = [] if chain.kind == "input" else list(cur.args) if chain.kind == "add" else [cur.args[0]]
    if not all(is_codes_source(gm, x) for x in inputs):
        raise NoIntegerForm(cur, "float input (no quantizer at its producer)")
    chain.members = _members(quant, cur)
    return chain


def _members(quant: fx.Node, core: fx.Node) -> list[fx.Node]:
    """The nodes from core to quant; each must feed only the next (a float copy cannot escape)."""
    node, out = quant.args[0], []
    while True:
        if len(node.users) != 1 and not (node is core and node.op == "placeholder"):
            raise NoIntegerForm(node, "intermediate escapes")
        out.append(node)
        if node is core:
            return out
        node = node.args[0]


def _plan(gm: fx.GraphModule) -> tuple[dict[fx.Node, _Chain | PointwiseChain], dict[fx.Node, str]]:
    """Per quantizer, its integer chain (a layer chain, else a pointwise one) or why it has none."""
    chains: dict[fx.Node, _Chain | PointwiseChain] = {}
    islands: dict[fx.Node, str] = {}
    for node in gm.graph.nodes:
        if not is_quant(gm, node):
            continue
        try:
            chains[node] = _chain(gm, node)
        except NoIntegerForm as layer:
            try:
                chains[node] = pointwise_chain(gm, node)
            except NoIntegerForm as pointwise:
                islands[node] = _reason(gm, layer, pointwise)
                _log.debug("PROM convert: %s runs in float: %s / %s", node.target, layer, pointwise)
    return chains, islands


_VIEWS = frozenset({"narrow", "view", "view_as", "reshape", "transpose", "permute", "select", "expand", "expand_as",
                    "unsqueeze", "squeeze", "t", "flatten", "unflatten", "getitem", "__getitem__", "unfold", "diagonal",
                    "as_strided", "split", "chunk", "unbind", "movedim", "swapaxes", "detach"})


def _refuse_writes_into_codes(gm: fx.GraphModule, integer_ops: set[fx.Node]) -> None:
    """ValueError where an in-place op writes into (a view of) a quantizer's value that an integer
    op reads after it (``y.narrow(1, 0, 3).add_(1)`` before a conv reading ``y``): the fake-quant
    model's conv sees the write, the integer conv reads the codes from before it. A float island
    or a model output reading that value sees the write (they share one dequantized tensor)."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in gm.graph.nodes:
        if not mutates_input(node) or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        base = node.args[0]
        while not is_quant(gm, base) and base.op in ("call_method", "call_function") and base.args and isinstance(
                base.args[0], fx.Node) and getattr(base.target, "__name__", str(base.target)) in _VIEWS:
            base = base.args[0]
        late = [u for u in base.users if u in integer_ops and order[u] > order[node]] if is_quant(gm, base) else []
        if late:
            raise ValueError(f"convert: {node.name} writes in place into {base.name}'s value, which "
                             f"{late[0].name} then reads as integer codes from before the write; write it out of "
                             "place (y = torch.cat([y[:, :3] + 1, y[:, 3:]], 1)) and prepare again")


def _reason(gm: fx.GraphModule, layer: NoIntegerForm, pointwise: NoIntegerForm) -> str:
    """Why a chain runs in float, naming the op that blocks it: the layer walk's reason when it
    found a layer, the pointwise walk's when that stopped at an op without an integer form."""
    if not layer.reason.startswith("not a conv"):
        return f"{_describe(gm, layer.node)}: {layer.reason}"
    if isinstance(module_of(gm, pointwise.node), (QConv2d, QLinear)):  # conv → op → quant, no quantizer between
        return f"{_describe(gm, layer.node)}: after a conv/linear with no quantizer between (only ReLU/ReLU6 fold into it)"
    return f"{_describe(gm, pointwise.node)}: {pointwise.reason}"


def _describe(gm: fx.GraphModule, node: fx.Node) -> str:
    """``name (op)`` for a report: the module class or the function/method name."""
    op = type(gm.get_submodule(str(node.target))).__name__ if node.op == "call_module" else getattr(
        node.target, "__name__", str(node.target))
    return f"{node.name} ({op})"


def _convert_chain(b: Builder, chain: _Chain | PointwiseChain) -> fx.Node:
    """The chain's integer op, then its value-preserving tail replayed on the codes."""
    if isinstance(chain, PointwiseChain):
        return _convert_pointwise(b, chain)
    out = _convert_core(b, chain)
    for node in chain.tail:
        out = b.replay(node, out)
    return out


def _convert_pointwise(b: Builder, chain: PointwiseChain) -> fx.Node:
    # a cat: each input through its table to the output grid, cat, then the steps;
    # a per-channel table: where its ops are, before or after the layout steps (it indexes that layout's channels);
    # otherwise: the steps (layout, max pool, pad) on the source's codes, then its table
    prefix = str(chain.quant.target)
    sources = [b.quantized(s, chain.quant)[0] for s in chain.sources]

    def table(out: fx.Node, i: int) -> fx.Node:
        if chain.tables[i] is None:
            return out
        b.buffers[f"{prefix}.table{i}"] = chain.tables[i]
        dim = () if chain.channel_dim is None else (chain.channel_dim,)
        return b.graph.call_function(torch.ops.fxslim.lut.default, (out, b.graph.get_attr(f"{prefix}.table{i}"), *dim))

    if chain.cat is not None:
        coded = {s: table(new, i) for i, (s, new) in enumerate(zip(chain.sources, sources))}
        out = b.graph.node_copy(chain.cat, lambda a: coded[a] if a in coded else b.env[a][0])
    elif chain.channel_dim is not None and not chain.lut_after_steps:
        out = table(sources[0], 0)
    else:
        out = sources[0]
    for node in chain.steps:
        out = b.pad(node, out, chain.pad_codes[node]) if node in chain.pad_codes else b.replay(node, out)
    return out if chain.cat is not None or (chain.channel_dim is not None and not chain.lut_after_steps) else table(out, 0)


def _convert_core(b: Builder, chain: _Chain) -> fx.Node:
    quant = b.gm.get_submodule(str(chain.quant.target))
    core, name = chain.core, chain.core.name
    if chain.kind == "input":
        return b.emit(convert_input(quant), [b.model_input(core)], "", f"{name}_quantized")
    onednn = b.runtime == "onednn"
    if chain.kind == "bn":
        # bn(x) ≡ depthwise 1×1 conv with weight 1 then bn: the conv's folding and requantization
        x, grid = b.quantized(core.args[0], core)
        layer = unit_depthwise_conv(meta_val(core).shape[1])
        op = (convert_conv_onednn if onednn else convert_conv)(layer, quant, bn=chain.bn, activation=chain.activation,
                                                               x_quant=grid)
        return b.emit(op, [x], str(core.target) if core.op == "call_module" else core.name, name)
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


class IntegerModel(fx.GraphModule):
    """A converted PROM graph. Inference only: it stays in eval mode, so a float island's BN keeps
    using (and never updates) its running statistics and dropout stays the identity, also when a
    model around it is put in train mode. Its state dict carries a digest of its code, whose
    literals hold the quantization constants: it loads only into a model converted with the same ones."""

    def train(self, mode: bool = True) -> "IntegerModel":
        if mode:
            warn_user("PROM integer model: train() keeps it in eval mode (integer ops do not train; "
                      "train the fake-quant model from fxslim.prepare and convert it again)")
        return super().train(False)

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self._register_load_state_dict_pre_hook(_refuse_other_constants, with_module=True)
        self.register_load_state_dict_post_hook(_count_load)

    def _apply(self, fn, recurse: bool = True):
        # .to(device) and the like move it; a dtype change (.double(), .half(), .to(torch.float64)) of
        # its float tensors would change the scales and biases its ops take (or its float islands')
        floats = {t.dtype for t in itertools.chain(self.parameters(), self.buffers()) if t.is_floating_point()}
        for dtype in sorted(floats, key=str):
            if fn(torch.empty(0, dtype=dtype)).dtype != dtype:
                raise ValueError("PROM integer model: .double(), .half(), .float() or .to(dtype) would change the "
                                 f"{dtype} scales and biases its integer ops compute with, fixed at convert; it "
                                 "takes inputs of any float dtype as they are: leave its dtype, or convert a "
                                 "fake-quant model of that dtype")
        return super()._apply(fn, recurse)

    @property
    def loads(self) -> int:
        """How many state dicts it has loaded: what a lowered copy of it (``micro_batched``) checks,
        as ``load_state_dict(assign=True)`` replaces tensors rather than bumping their versions."""
        return self.__dict__.get("_loads", 0)

    def get_extra_state(self) -> torch.Tensor:
        # the quantization constants (input scales, zero points) are literals in the graph's code, not
        # buffers: the state carries the code's digest, as a tensor like every other value of a state dict
        return torch.frombuffer(bytearray(hashlib.sha256(self.code.encode()).digest()), dtype=torch.uint8)

    def set_extra_state(self, state: torch.Tensor) -> None:
        if not (isinstance(state, torch.Tensor) and torch.equal(state, self.get_extra_state())):
            raise ValueError(
                "PROM integer model: load_state_dict got the state of a model converted with other quantization "
                "constants (scales and zero points are in the graph's code, not in its buffers), and loading its "
                "buffers alone would mix the two models; load the fake-quant model's state_dict into "
                "fxslim.prepare(...) and convert that, or torch.save/torch.load the whole integer model")

    def __reduce__(self) -> tuple:
        # GraphModule's pickle rebuilds a plain GraphModule without meta or node shapes: rebuild this class.
        # Its own load hooks stay out (__init__ registers them again): the pre-hook holds the model, which
        # the pickle then held twice, and unpickled as a second model sharing this one's submodules.
        _, (body, import_block) = super().__reduce__()
        for key in ("_load_state_dict_pre_hooks", "_load_state_dict_post_hooks"):
            body[key] = type(body[key])((k, h) for k, h in body[key].items()
                                        if getattr(h, "hook", h) not in (_refuse_other_constants, _count_load))
        return (_unpickled, (body, import_block))

    def __deepcopy__(self, memo: dict) -> "IntegerModel":
        copied = super().__deepcopy__(memo)
        share_version_counter(copied)  # its tensors are its own copies: a counter of their own (``prom_versions``)
        return copied


def _refuse_other_constants(module: nn.Module, state_dict: dict, prefix: str, *args: object) -> None:
    """Load pre-hook of an IntegerModel and of a model converted in parts: before ``module`` loads
    anything, each integer model in it refuses a state of other constants, rather than after its
    own tensors or the parts before it were overwritten."""
    for path, part in module.named_modules(prefix=prefix.rstrip(".")):
        if not isinstance(part, IntegerModel):
            continue
        start = f"{path}." if path else ""
        key = f"{start}_extra_state"
        own = {start + name for name in part.state_dict()} - {key}
        given = {k for k in state_dict if k.startswith(start) and k != key}
        if key not in state_dict and own & given:
            # a state of weights alone (a checkpoint filtered to tensors) cannot say which constants it needs
            raise ValueError(f"PROM integer model: load_state_dict got {len(own & given)} of its tensors without "
                             f"{key!r}, the digest of the quantization constants they were converted with, so it "
                             "cannot tell that they fit this model's; pass the integer model's whole state_dict")
        if key in state_dict and own != given and not torch.equal(state_dict[key], part.get_extra_state()):
            missing, unexpected = sorted(own - given), sorted(given - own)
            raise ValueError("PROM integer model: load_state_dict got the state of another converted model (another "
                             f"runtime, or another model: keys missing {missing[:3]}, unexpected {unexpected[:3]}); "
                             "convert the fake-quant model again with this model's runtime")
        if key in state_dict:
            part.set_extra_state(state_dict[key])


def _count_load(module: IntegerModel, incompatible_keys: object) -> None:
    module.__dict__["_loads"] = module.loads + 1


def _unpickled(body: dict, import_block: str) -> IntegerModel:
    """An IntegerModel from its pickled code and attributes, with its meta and node shapes again."""
    plain = reduce_graph_module(body, import_block)
    model = IntegerModel(plain, plain.graph, type(plain).__name__)
    model.meta.update(body.get("meta", {}))
    if _INPUT_SHAPES in model.meta:
        _propagate_zeros(model)
    share_version_counter(model)
    return model.eval()


@outside_inference_mode
def convert(qat_model: nn.Module, runtime: Literal["reference", "onednn"] = "reference", *,
            fuse_adds: bool = True) -> nn.Module:
    """The integer model of a prepared PROM model (``prepare`` output, trained or calibrated).

    ``runtime``: ``"reference"`` emits the fixed-point ops of ``fxslim.runtime.prom`` (ternary
    weights packed 2 bits each, the cost model's view); ``"onednn"`` emits the fused u8 oneDNN ops
    of ``fxslim.runtime.prom_onednn`` (weights prepacked, a conv feeding a residual add fused with
    it, unless ``fuse_adds`` is False: see ``prom_fuse``). On a CPU without VNNI/AMX int8 dot products
    (AVX2) oneDNN runs the ternary and depthwise convs, whose sums it gets exactly there, and the ops
    sum 8-bit dense layers in float (``prom_onednn.exact_sums``).

    Input: the float tensors the model takes; output: float32 logits (dequantized). BN running
    statistics and the observers' grids are used as they are; dropout is the identity. A model
    that traces whole gives a GraphModule. A model prepared in parts (``prepare`` returned it with
    its traced submodules as GraphModules) gives a copy in eval mode whose parts are integer
    GraphModules with float inputs and outputs: the code between them stays the float model's. So
    do the parts traced apart inside a module a traced part calls as a leaf (a block whose own
    forward does not trace). ``convert_report`` reads what was converted either way.
    """
    qat_model = compiled_original(qat_model, returns="fxslim.convert")
    if isinstance(qat_model, nn.parallel.DistributedDataParallel):
        qat_model = qat_model.module
    parts = prepared_parts(qat_model)
    if not parts:
        raise TypeError(f"convert: expected the GraphModule returned by fxslim.prepare (or a model whose traced parts "
                        f"it prepared), got {type(qat_model).__name__} without ActFakeQuant nodes (when prepare rewrote "
                        "nothing, its warning says why)")
    for name, module in qat_model.named_modules():
        if isinstance(module, ActFakeQuant) and not bool(module.initialized):
            raise ValueError(f"convert: observer {name!r} has seen no data; run calibrate() or train the model first")
    for path, part in parts.items():
        inputs = [n for n in part.graph.nodes if n.op == "placeholder"]
        if inputs and all(meta_val(n) is None for n in inputs):
            raise ValueError(f"convert: the prepared model{f' part {path!r}' if path else ''} has no shape metadata "
                             "(torch.load and pickle drop it from a GraphModule): save qat.state_dict() instead, and "
                             "load it into fxslim.prepare(model, example) to convert")
    if runtime not in RUNTIMES:
        raise ValueError(f"convert: runtime must be one of {RUNTIMES}, got {runtime!r}")
    if not isinstance(fuse_adds, bool):
        raise ValueError(f"convert: fuse_adds must be True or False, got {fuse_adds!r}")
    if runtime == "onednn" and not onednn_available():
        raise ValueError("convert: runtime 'onednn' needs torch's oneDNN quantized ops (torch.backends.mkldnn), "
                         "which this torch build lacks; use runtime='reference'")
    converted = {path: _converted(part, runtime, fuse_adds) for path, part in parts.items()}
    if list(parts) == [""]:
        out = converted[""]
    else:
        out = copy.deepcopy(qat_model).eval()
        for path, part in converted.items():
            out.set_submodule(path, part)
        out._register_load_state_dict_pre_hook(_refuse_other_constants, with_module=True)
    # inside a leaf an outer part calls, which the outer integer graph holds a float copy of at its path
    for path in _nested_parts(qat_model, parts):
        out.set_submodule(path, _converted(qat_model.get_submodule(path), runtime, fuse_adds))
    _warn_dropped_hooks(qat_model, out)
    return out


def _converted(part: fx.GraphModule, runtime: str, fuse_adds: bool) -> fx.GraphModule:
    """``_convert_graph`` of one part, with the part's hooks (float in, float out: the hooks of what
    became integer ops still apply) and plain attributes."""
    integer = _convert_graph(part, runtime, fuse_adds)
    copy_hooks(part, integer)
    copy_attributes(part, integer)
    return integer


def _nested_parts(model: nn.Module, outer: dict[str, fx.GraphModule]) -> list[str]:
    """Paths of the prepared GraphModules inside an outer part (``prepared_parts``), outer first:
    parts traced apart inside a module the outer graph calls as a leaf (a block whose own forward
    does not trace, a hooked module). Converting only the outer part left them fake-quant float
    layers in the integer model (timm's mobilevit_xxs: 9 convs and 36 linears), unreported."""
    found = [path for path, module in model.named_modules() if path not in outer and _holds_quantizers(module)]
    return sorted(found, key=lambda path: path.count("."))  # outer first: an inner one replaces part of it


def _warn_dropped_hooks(qat_model: nn.Module, out: nn.Module) -> None:
    """Warn, naming them, about hooked modules of ``qat_model`` whose hooks ``out`` does not run: the
    parts and float islands keep theirs; a module that became integer ops inside a part has none."""
    kept = hooked_modules(out)
    dropped = [path for path in hooked_modules(qat_model) if path not in kept]
    if dropped:
        warn_user(f"convert: the hooks of {', '.join(repr(p or type(qat_model).__name__) for p in dropped)} do not "
                  "run in the integer model: their layers are integer ops (they run in the prepared model)")


def prepared_parts(model: nn.Module) -> dict[str, fx.GraphModule]:
    """The outermost GraphModules of ``model`` holding ActFakeQuant nodes, by path ("" for the model itself)."""
    parts: dict[str, fx.GraphModule] = {}
    for path, module in model.named_modules():
        inside = any(path.startswith(f"{p}.") or p == "" for p in parts)
        if not inside and _holds_quantizers(module):
            parts[path] = module
    return parts


def _holds_quantizers(module: nn.Module) -> bool:
    """A GraphModule with ActFakeQuant nodes: a part ``prepare`` made."""
    return isinstance(module, fx.GraphModule) and any(is_quant(module, n) for n in module.graph.nodes)


def convert_report(int_model: nn.Module) -> ConvertReport:
    """What ``convert`` made: the report of a whole-graph model, or its parts' reports merged
    (names prefixed with each part's path, ``parts`` listing them)."""
    reports = {path: m.meta[META_PROM_CONVERT] for path, m in int_model.named_modules()
               if isinstance(m, fx.GraphModule) and META_PROM_CONVERT in m.meta}
    if list(reports) == [""]:
        return reports[""]
    if not reports:
        raise TypeError(f"convert_report: expected a model returned by fxslim.convert, got {type(int_model).__name__}")
    return merge_reports(reports)


def _convert_graph(qat_model: fx.GraphModule, runtime: str, fuse_adds: bool) -> fx.GraphModule:
    """One prepared GraphModule → its integer GraphModule (module docstring)."""
    gm = _in_current_dtype(_in_eval_mode(qat_model))
    b = Builder(gm, runtime)
    chains, island_quants = _plan(gm)
    reach = nan_reach(gm)
    inside = {m for c in chains.values() for m in c.members if m.op != "placeholder"}
    _refuse_writes_into_codes(gm, inside)
    for node in gm.graph.nodes:
        if node in chains:
            try:
                new = _convert_chain(b, chains[node])
            except ScaleOutOfRange as exc:
                core = chains[node].core
                raise ScaleOutOfRange(f"{exc} [at {node_fqn(core, gm) or core.name}]") from None
            new.meta[META_PROM_QUANT] = str(node.target)
            b.env[node] = (new, gm.get_submodule(str(node.target)))
        elif node in island_quants:
            # float island → quant  ≡  quantize_per_tensor(float value): the fake quantizer's arithmetic
            grid = gm.get_submodule(str(node.target))
            new = b.emit(convert_input(grid), [b.float_value(node.args[0], node)], "", f"{node.name}_quantized")
            new.meta[META_PROM_QUANT] = str(node.target)
            b.env[node] = (new, grid)
        elif node in inside:
            continue
        elif node.op == "placeholder":
            default = node.args[0] if node.args else inspect.Signature.empty  # e.g. attn_mask=None
            b.env[node] = (b.graph.placeholder(node.target, node.type, default_value=default), None)
        elif is_mode_check(node):
            continue  # an integer model runs in eval mode only; prepare warned where the trace is frozen in train
        elif node.op == "call_function" and node.target is check_traced_attribute and node.args[0].op != "placeholder":
            continue  # the dtype an activation had at trace: here it is codes, in the arithmetic fixed at convert
        elif is_input_guard(node) or (node.op == "call_function" and node.target is check_traced_attribute):
            b.env[node] = (b.graph.node_copy(node, lambda a: b.env[a][0]), None)
        elif node.op == "output":
            b.graph.output(fx.node.map_arg(node.args[0], lambda a: _output(b, a, reach.get(a.name, {}))))
        elif codes_layout(b, node):
            b.env[node] = (replay_codes(b, node), b.env[node.args[0]][1])
        else:
            b.env[node] = (b.copy_float(node), None)
    keep_output_type(gm.graph, b.graph)
    out = IntegerModel(b.buffers, b.graph, f"{type(gm).__name__}PROM").eval()
    if runtime == "onednn" and fuse_adds:
        fuse_conv_add(out)
    remove_dead_code(out, keep={b.env[n][0] for n in unused_calls(gm) if n in b.env})
    out.graph.lint()
    out.recompile()
    _propagate_shapes(out, gm)
    out.meta[META_PROM_CONVERT] = _report(b, out, chains, island_quants)
    share_version_counter(out)
    _log.info("PROM convert: %d integer ops, %d float islands, %d buffers", out.meta[META_PROM_CONVERT].integer_ops,
              len(out.meta[META_PROM_CONVERT].islands), len(b.buffers))
    return out


def _is_training_flag(node: fx.Node) -> bool:
    """A read of the graph's or a submodule's ``training`` flag (``training``, ``head.training``)."""
    return node.op == "get_attr" and str(node.target).rpartition(".")[2] == "training"


def _in_eval_mode(qat_model: fx.GraphModule) -> fx.GraphModule:
    """``qat_model`` with its reads of its own and its submodules' ``training`` flags (``capture.trace``
    makes them for ``F.dropout(x, p, self.training)`` and stochastic depth, in the module that makes
    the call: torchvision's EfficientNet and ConvNeXt read ``features.1.0.stochastic_depth.training``)
    replaced by False, as the integer model is inference only: a copy of the graph around the same
    modules (``qat_model`` is only read)."""
    if not any(_is_training_flag(n) for n in qat_model.graph.nodes):
        return qat_model
    gm = _graph_copy(qat_model)
    for node in [n for n in gm.graph.nodes if _is_training_flag(n)]:
        for user in [u for u in node.users if u.op == "call_function" and u.target is operator.not_]:
            user.replace_all_uses_with(True)
            gm.graph.erase_node(user)
        node.replace_all_uses_with(False)
        gm.graph.erase_node(node)
    gm.recompile()
    return gm


def _graph_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm``'s graph and metadata around the same modules, for convert to edit (the
    prepared model is only read)."""
    copied = fx.GraphModule(gm, copy.deepcopy(gm.graph), type(gm).__name__)
    copied.meta.update(gm.meta)
    return copied


def _in_current_dtype(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm``, or a copy of its graph whose shapes were propagated again in its modules' float dtype
    now, where that is not the one it was prepared in (``qat.double()`` after ``prepare``): the
    integer model gives its float islands and outputs the dtype the graph's metadata names, so it
    answered in float32 for a float64 QAT model, or failed in a float island with mixed dtypes."""
    now = {p.dtype for p in gm.parameters() if p.is_floating_point()}
    then = {v.dtype for n in gm.graph.nodes if n.op == "call_module" and isinstance(v := meta_val(n), torch.Tensor)
            and v.is_floating_point() and any(True for _ in gm.get_submodule(str(n.target)).parameters())}
    if len(now) != 1 or len(then) != 1 or now == then:
        return gm
    (old,), (new,) = then, now
    copied = _graph_copy(gm)
    inputs = [meta_val(n) for n in copied.graph.nodes if n.op == "placeholder"]
    inputs = [torch.empty(v.shape, dtype=new) if isinstance(v, torch.Tensor) and v.dtype == old else v for v in inputs]
    propagate(copied, inputs)
    return copied


def _output(b: Builder, node: fx.Node, reach: dict[str, str]) -> fx.Node:
    """A model output: codes dequantized, float tensors as they are; marked NaN where the inputs'
    NaN samples reach it (``prom_nan``): their rows, or all of it."""
    new, grid = b.env[node]
    flags = _output_flags(b, reach)
    if grid is not None and node in b.dequantized:  # the float tensor an island read: it may have written into it
        new, grid = b.dequantized[node], None
    if grid is not None:
        dequantized = b.emit(convert_output(grid), [new], "", f"{node.name}_dequantized")
        if flags is not None:
            dequantized.args = (*dequantized.args, flags)
        return b.in_dtype_of(node, dequantized)
    value = meta_val(node)
    if flags is None or not isinstance(value, Tensor) or not value.is_floating_point() or value.dim() < 1:
        return new
    return b.graph.call_function(torch.ops.fxslim.mark_nan_samples.default, (new, flags))


def _output_flags(b: Builder, reach: dict[str, str]) -> fx.Node | None:
    """The ``nan_samples`` flags of one output: the OR of the flags of the inputs whose NaN samples
    reach their own rows (those of the first such input's batch length; any others count as
    whole-output), each element OR any NaN sample of the inputs that reach the whole output. A flag
    vector of another length than the output's dim 0 marks the whole output (``mark_nan_samples``)."""
    rows, whole, length = None, None, None
    for placeholder, flags in b.nan_samples.items():
        kind = reach.get(placeholder.name)
        if kind is None:
            continue
        size = sample_count(placeholder)
        if kind == ROWS and length in (None, size):
            length = size
            rows = flags if rows is None else b.graph.call_function(torch.logical_or, (rows, flags))
            continue
        anywhere = b.graph.call_method("any", (flags,))
        whole = anywhere if whole is None else b.graph.call_function(torch.logical_or, (whole, anywhere))
    if whole is None:
        return rows
    if rows is None:
        return b.graph.call_method("reshape", (whole, (1,)))
    return b.graph.call_function(torch.logical_or, (rows, whole))


def _report(b: Builder, out: fx.GraphModule, chains: dict, island_quants: dict[fx.Node, str]) -> ConvertReport:
    """The convert report, from the nodes that survived dead-code elimination; chains by kind."""
    alive = set(out.graph.nodes)
    float_ops = [n for n, new in b.float_ops.items() if new in alive]
    outputs: list[fx.Node] = []
    fx.node.map_arg(next(n for n in b.gm.graph.nodes if n.op == "output").args[0], outputs.append)
    integer = {str(q.target): c.kind for q, c in chains.items()}
    islands = group_islands(float_ops, island_quants, [n for n in outputs if n in b.float_ops], b.reads)
    return ConvertReport(integer, tuple(_with_prepare_skips(b.gm, island) for island in islands))


def _with_prepare_skips(gm: fx.GraphModule, island: Island) -> Island:
    """The island with, first among its reasons, each of its modules that prepare skipped and why (a
    conv called twice stays float as ``shared_module``): the chains' own reasons name only a symptom
    downstream ("float input")."""
    report = gm.meta.get(META_REPORT)
    skipped = {e.fqn: e.reason for e in report.entries() if e.status == "skipped"} if report is not None else {}
    nodes = {n.name: n for n in gm.graph.nodes}
    first = tuple(f"{_describe(gm, node)}: left float by prepare ({skipped[str(node.target)]})"
                  for name in island.ops if (node := nodes.get(name)) is not None and node.op == "call_module"
                  and str(node.target) in skipped)
    return dataclasses.replace(island, reasons=tuple(dict.fromkeys(first + island.reasons))) if first else island


def _propagate_shapes(out: fx.GraphModule, source: fx.GraphModule) -> None:
    """meta['val'] on every new node, from the prepared graph's input shapes (fake tensors, or one
    run on zeros where an island leaf is data-dependent), which ``out.meta`` keeps for a copy
    rebuilt by pickle (``IntegerModel.__reduce__``); fxslim_pass tags."""
    inputs = [meta_val(n) for n in source.graph.nodes if n.op == "placeholder"]
    out.meta[_INPUT_SHAPES] = [_Zeros(tuple(int(d) for d in v.shape), v.dtype) if isinstance(v, Tensor) else v
                               for v in inputs]
    _propagate_zeros(out)


def _propagate_zeros(out: fx.GraphModule) -> None:
    propagate(out, [v.tensor() if isinstance(v, _Zeros) else v for v in out.meta[_INPUT_SHAPES]], real_fallback=True)
    for node in out.graph.nodes:
        node.meta[META_PASS] = "prom"


@dataclass(frozen=True)
class _Zeros:
    """An input's shape and dtype, kept to propagate shapes again: zeros of them."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    def tensor(self) -> Tensor:
        return torch.zeros(self.shape, dtype=self.dtype)
