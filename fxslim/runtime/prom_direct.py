"""PROM's runs of quantized convs as oneDNN primitives called through its C API, planned per input shape.

``prom_lowered`` makes each run of consecutive quantized convs a ``QuantizedSegment``: ATen's
quantized convs called from TorchScript, with 7.5 µs of bookkeeping per conv on top of the kernel
(MobileNetV2 at batch 1: about 0.4 ms of 2.7). ``DirectSegment`` runs the same run with oneDNN's own
library (``onednn_capi``), planned once per input shape, layout and thread count:

- one convolution primitive per conv with the attributes ATen gives oneDNN (u8 NHWC src and dst,
  s8 weights reordered once into the layout the primitive picks, f32 bias, runtime scales and zero
  points, the sum and ReLU post-ops), less what oneDNN 3.2's kernels pay for at every call though
  it changes nothing but rounding (each made MobileNetV2 faster at batch 1 and 32, measured side by
  side when it was made; benchmarks/results/prom_vs_peers.md has the model's speed now):
  - a zero point of 0 (a ReLU's output, written or read) is left out rather than passed as 0;
  - the input zero point z of a conv without padding (MobileNetV2's 1×1 expansions) is folded into
    its bias, as every tap reads the input: Σ w·(q − z) = Σ w·q − z·Σ w;
  - the src and dst scales are folded into the weights' scales, the bias and the sum's scale, so
    that the weights' are the only scales the primitive applies;
- a 3×3 depthwise conv of at least ``NATIVE_DEPTHWISE_CHANNELS`` channels between two of the plan's
  buffers as ``prom_depthwise``'s C kernel instead (1.1-2.3× oneDNN 3.2's speed on MobileNetV2's layers,
  benchmarks/results/prom_depthwise_speed.md);
- every activation in a buffer allocated when planning and reused once the last reader of its
  value ran; a conv with a sum post-op accumulates in its skip's buffer (a skip from outside the run
  is copied in first: the run never writes its inputs); one scratchpad for all;

so a call points the memory objects of the inputs and outputs at this call's tensors and makes one
C call per conv (``dnnl_primitive_execute`` or the kernel's), all from one ctypes call
(``native/prom_steps.c``; step by step from Python where native kernels are off).

Values: the same integer sums on oneDNN 3.2 instead of torch's oneDNN, requantized with the folded
constants above. A conv feeding a residual add (``prom_onednn.quantized_conv_add``) is rounded onto
its own grid by post-ops before the sum (to its codes, saturated, rounded half to even, and back:
about 3 % of MobileNetV2's time at batch 1), as the segment and the fake-quant model do. The
codes equal ATen's except at rare ties, 1 LSB apart (in depthwise convs, and
where the folded constants round differently in float32 from oneDNN's own products: about 1 code
in 100,000 per layer on MobileNetV2's shapes, tests/runtime/test_prom_direct.py; through a deep
model such ties add up to 1-LSB moves of some logits),
and where torch's oneDNN is wrong and 3.2 is not: one output column at a column stride above 1
(which the ATen segment widens the input for, ``prom_onednn.one_column_widened``) and some grouped convs
(``prom_onednn.miscomputed_grouping``, which the lowering gives to direct segments only). A run
the plan cannot take (an unknown op, a geometry this oneDNN refuses) runs the TorchScript segment,
unless it holds such a grouped conv: then the call raises, naming ``lower(..., direct=False)``,
which computes those exactly. Calls are serialised by a lock: a plan's buffers serve one call at a time.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import threading
from collections.abc import Callable

import torch
import torch.fx as fx
from torch import Tensor, nn

from fxslim.runtime import native_kernels
from fxslim.runtime import onednn_capi as capi
from fxslim.runtime import prom_depthwise, prom_onednn
from fxslim.runtime.prom import conv_output_size

__all__ = ["DirectSegment", "PLANS", "AVOIDED", "NATIVE_DEPTHWISE_CHANNELS"]

_log = logging.getLogger(__name__)

# Implementations that write past their output: oneDNN 3.2's AMX 1×1 kernel writes whole blocks of 16
# pixels (96 → 40 channels on a 6×6 input: 480 bytes past the end of dst, corrupting the heap)
AVOIDED = ("jit_1x1:avx512_core_amx",)
# The depthwise kernel works on 64 channels at a time, or two outputs' 32 in one vector: with fewer than
# 32 its lanes are partly idle; oneDNN 3.2 is faster at 16 channels (0.6× at 112×112) and the two trade
# places at 24 from run to run; from 32 channels on (all of MobileNetV2's) the kernel is 1.1-2.3× faster
# (benchmarks/results/prom_depthwise_speed.md: Intel Xeon with AVX-512 VNNI, batch 1 and 16).
NATIVE_DEPTHWISE_CHANNELS = 32
PLANS = 4  # input shapes (and layouts, thread counts) a segment keeps a plan for; the least recently used goes
_CONV = {op: attr for attr, op in prom_onednn.QUANTIZED_CONV.items()}


class DirectSegment(nn.Module):
    """``fallback`` (a ``prom_lowered.QuantizedSegment``) run as oneDNN primitives (module docstring)."""

    def __init__(self, fallback: nn.Module) -> None:
        super().__init__()
        self.fallback = fallback
        # the fallback's ATen convs would get these wrong
        self.needs_plan = any(prom_onednn.miscomputed_grouping(w.weight, w.groups) for w in fallback.weights.values())
        self.__dict__["_plans"] = collections.OrderedDict()
        self.__dict__["_lock"] = threading.Lock()

    @property
    def planned(self) -> dict[tuple, bool]:
        """For each (input shapes, whether each is read channels_last, threads) seen: whether it runs as
        primitives (False: the fallback)."""
        return {key: plan is not None for key, plan in self._plans.items()}

    def forward(self, *args: Tensor) -> tuple[Tensor, ...]:
        key = (tuple(tuple(a.shape) for a in args), tuple(_channels_last(a) for a in args), torch.get_num_threads())
        with self._lock:
            plan = self._plans.get(key, False)
            if plan is False:
                plan = _Plan.build(self.fallback.graph, self.fallback.weights, args)
                self._plans[key] = plan
                if len(self._plans) > PLANS:
                    self._plans.popitem(last=False)
            else:
                self._plans.move_to_end(key)
            if plan is not None:
                return plan.run(args)
        if self.needs_plan:
            raise RuntimeError(
                f"PROM direct runtime: a run of convs could not be planned at input shapes {[tuple(a.shape) for a in args]}, "
                "and it holds grouped convs that ATen's quantized convs get wrong; lower the model with "
                "prom_lowered.lower(model, direct=False), which computes them exactly")
        return self.fallback(*args)


class _Group:
    """Values sharing one buffer: a conv's output and the convs accumulating into it in place."""

    def __init__(self, shape: tuple[int, ...], first: int, input_index: int | None = None,
                 channels_last: bool = True) -> None:
        self.shape, self.first, self.last, self.input_index = shape, first, first, input_index
        self.escaping: tuple[float, int] | None = None  # (scale, zero point) of the value the run returns
        n, c, h, w = shape
        self.channels_last = channels_last
        self.desc = capi.MemoryDesc(shape, capi.U8, (c * h * w, 1, w * c, c) if channels_last else (c * h * w, h * w, w, 1))
        self.memory: capi.Memory | None = None
        self.pointer: int | None = None  # the buffer's address when it is the plan's own (not re-pointed per call)


class _Value:
    def __init__(self, group: _Group, scale: float, zero_point: int) -> None:
        self.group, self.scale, self.zero_point = group, scale, zero_point
        self.last_reader = -1  # position of the last node that reads this value (through any node naming it)


def _exec_args(memories: list[tuple[int, capi.Memory]]) -> ctypes.Array:
    """dnnl_exec_arg_t array of (argument index, memory object) pairs."""
    return (capi.ExecArg * len(memories))(*(capi.ExecArg(arg, memory.handle) for arg, memory in memories))


def _scalar_memory(values: Tensor, keep: list) -> capi.Memory:
    keep.append(values)
    return capi.Memory(capi.MemoryDesc(values.shape, capi.F32 if values.is_floating_point() else capi.S32, (1,)),
                       values.data_ptr())


class _Plan:
    """The primitives, buffers and memory objects of one run at one input shape."""

    def __init__(self) -> None:
        self.inputs: list[tuple[int, capi.Memory, bool]] = []  # (index, memory, channels_last)
        self.fresh: list[tuple[capi.Memory, tuple[int, ...], float, int]] = []
        self.outputs: list[int] = []  # index into the call's fresh tensors, per output of the run
        # (C function, its arguments): a oneDNN primitive's execution or a native depthwise conv
        self.steps: list[tuple[Callable[..., int], tuple]] = []
        self.raw: list[_Step] = []  # the same steps for native/prom_steps.c, which runs them in one call
        self.array: ctypes.Array | None = None
        self.keep: list[object] = []  # what the steps' raw pointers point into

    @classmethod
    def build(cls, graph: fx.Graph, convs: dict[str, prom_onednn.ConvWeights], args: tuple[Tensor, ...]) -> _Plan | None:
        """The plan of ``graph`` (a ``QuantizedSegment``'s) for ``args``, or None where it must run as
        TorchScript (an op the plan does not know, a geometry this oneDNN refuses)."""
        if not capi.available() or any(a.dtype != torch.quint8 or a.dim() != 4 for a in args):
            return None
        try:
            return cls()._fill(graph, convs, args)
        except _Unsupported:
            return None
        except capi.OneDNNError as error:  # a geometry this oneDNN cannot run: ATen's can
            _log.warning("PROM direct runtime: a run of convs stays on ATen's quantized convs at input shapes %s (%s)",
                         [tuple(a.shape) for a in args], error)
            return None

    def _fill(self, graph: fx.Graph, convs: dict[str, prom_onednn.ConvWeights], args: tuple[Tensor, ...]) -> _Plan:
        values: dict[fx.Node, _Value] = {}
        groups: list[_Group] = []
        # (x, out, weights, relu, the value accumulated into or None, the conv's own grid before it or None)
        convs_to_build: list[tuple] = []
        copies: list[tuple[int, _Value, _Value]] = []  # (index of the conv they precede, from, to)
        outputs: list[_Value] = []

        def read(node: object, position: int) -> _Value:
            if not isinstance(node, fx.Node) or node not in values:
                raise _Unsupported
            value = values[node]
            value.group.last = max(value.group.last, position)
            return value

        def new_value(shape: tuple[int, ...], position: int, scale: float, zero_point: int) -> _Value:
            groups.append(_Group(shape, position))
            return _Value(groups[-1], scale, zero_point)

        nodes = list(graph.nodes)
        position_of = {node: i for i, node in enumerate(nodes)}
        last_reader = {node: max((position_of[u] for u in node.users), default=-1) for node in nodes}

        def name(node: fx.Node, value: _Value) -> None:
            values[node] = value
            value.last_reader = max(value.last_reader, last_reader[node])

        placeholders = 0
        for position, node in enumerate(nodes):
            if node.op == "placeholder":
                x = args[placeholders]
                layout = _channels_last(x)
                groups.append(_Group(tuple(x.shape), position, placeholders, layout))
                value = _Value(groups[-1], x.q_scale(), x.q_zero_point())
                if not layout:  # reordered to channels_last by oneDNN (a few µs where ATen takes 75 at 224 px)
                    source, value = value, new_value(tuple(x.shape), position, x.q_scale(), x.q_zero_point())
                    copies.append((len(convs_to_build), source, value))
                name(node, value)
                placeholders += 1
            elif node.op == "get_attr":
                continue
            elif node.op == "output":
                outputs = [read(n, position) for n in node.args[0]]
            elif node.target in _CONV or node.target is prom_onednn.quantized_conv_add:
                add = node.target is prom_onednn.quantized_conv_add
                x = read(node.args[0], position)
                weights = convs.get(node.args[2 if add else 1].target)
                if weights is None or weights.weight.dtype != torch.int8:
                    raise _Unsupported
                out_scale, out_zero_point = node.args[-2], node.args[-1]
                shape = _conv_shape(x.group.shape, weights)
                accumulated = read(node.args[1], position) if add else None
                if accumulated is None:
                    out = new_value(shape, position, out_scale, out_zero_point)
                elif (accumulated.group.input_index is not None or accumulated.last_reader > position
                      or accumulated.group is x.group):
                    # an input, read again later, or the conv's own input (x + conv(x): the sum would
                    # overwrite pixels the conv has yet to read): the skip is copied into the output first
                    out = new_value(shape, position, out_scale, out_zero_point)
                    copies.append((len(convs_to_build), accumulated, out))
                else:
                    out = _Value(accumulated.group, out_scale, out_zero_point)  # in place
                if out.group.shape != shape:
                    raise _Unsupported
                name(node, out)
                relu = node.args[5] if add else _CONV[node.target] == "relu"
                convs_to_build.append((x, out, weights, relu, accumulated, node.args[3:5] if add else None))
            elif node.op == "call_function" and getattr(node.target, "__name__", "") == "widened_qtensor":
                # torch's oneDNN needs the input widened at one output column; oneDNN 3.2 does not (tests)
                name(node, read(node.args[0], position))
            elif node.op == "call_function" and getattr(node.target, "__name__", "") == "first_column":
                name(node, read(node.args[0], position))
            else:
                raise _Unsupported
        for value in outputs:
            group = value.group
            if group.input_index is not None or group.escaping not in (None, (value.scale, value.zero_point)):
                raise _Unsupported
            group.escaping = (value.scale, value.zero_point)
        self._bind(groups, args)
        self._steps(convs_to_build, copies)
        fresh = [g for g in groups if g.escaping is not None]
        self.outputs = [fresh.index(v.group) for v in outputs]
        return self

    def _bind(self, groups: list[_Group], args: tuple[Tensor, ...]) -> None:
        """Memory objects for every group: the inputs' and returned values' re-pointed per call, the
        others over buffers shared by groups whose values are not alive at the same time."""
        free: list[Tensor] = []
        alive: list[tuple[int, Tensor]] = []
        for group in sorted(groups, key=lambda g: g.first):
            if group.input_index is not None:
                group.memory = capi.Memory(group.desc, args[group.input_index].data_ptr())
                self.inputs.append((group.input_index, group.memory, group.channels_last))
                continue
            if group.escaping is not None:
                group.memory = capi.Memory(group.desc, 0)
                self.fresh.append((group.memory, group.shape, *group.escaping))
                continue
            free += [buffer for last, buffer in alive if last < group.first]
            alive = [(last, buffer) for last, buffer in alive if last >= group.first]
            size = group.desc.size
            fitting = [i for i, b in enumerate(free) if b.numel() >= size]
            if fitting:
                buffer = free.pop(min(fitting, key=lambda i: free[i].numel()))
            else:
                buffer = torch.empty(size, dtype=torch.uint8)
            alive.append((group.last, buffer))
            self.keep.append(buffer)
            group.pointer = buffer.data_ptr()
            group.memory = capi.Memory(group.desc, group.pointer)

    def _steps(self, convs: list[tuple], copies: list[tuple[int, _Value, _Value]]) -> None:
        built, scratchpad = [], 0
        for x, out, weights, relu, accumulated, grid in convs:
            if _native_depthwise(x, out, weights, accumulated):
                built.append(prom_depthwise.DepthwiseStep(
                    weights, x.group.shape, out.group.shape, x.scale, x.zero_point, out.scale, out.zero_point, relu,
                    x.group.pointer, out.group.pointer))
                continue
            desc = self._convolution(x, out, weights, relu, accumulated, grid)
            built.append(desc)
            scratchpad = max(scratchpad, desc[1].size)
        buffer = torch.empty(max(scratchpad, 1), dtype=torch.uint8)
        self.keep.append(buffer)
        pending = collections.deque(sorted(copies, key=lambda c: c[0]))
        for index, step in enumerate(built):
            while pending and pending[0][0] == index:
                self._copy(*pending.popleft()[1:])
            if isinstance(step, prom_depthwise.DepthwiseStep):
                self.keep.append(step)
                self.steps.append((step.fn, (step.arg,)))
                self.raw.append(_Step(_address(step.fn), ctypes.addressof(step.params), None, 0, None, 1))
                continue
            primitive, scratch_desc, memories = step
            scratch = capi.Memory(scratch_desc, buffer.data_ptr())
            self._step(primitive, [*memories, (capi.ARG_SCRATCHPAD, scratch)])
        for _, source, target in pending:  # copies after the last conv
            self._copy(source, target)
        self.array = (_Step * len(self.raw))(*self.raw)

    def _convolution(self, x: _Value, out: _Value, w: prom_onednn.ConvWeights, relu: bool, accumulated: _Value | None,
                     grid: tuple[float, int] | None) -> tuple[capi.Primitive, capi.MemoryDesc, list]:
        weight = w.weight.contiguous()
        o, i, kh, kw = weight.shape
        g = w.groups
        if g == 1:
            plain = capi.MemoryDesc((o, i, kh, kw), capi.S8, (i * kh * kw, kh * kw, kw, 1))
            shape, mask = (o, i, kh, kw), 1
        else:
            plain = capi.MemoryDesc((g, o // g, i, kh, kw), capi.S8, (o // g * i * kh * kw, i * kh * kw, kh * kw, kw, 1))
            shape, mask = (g, o // g, i, kh, kw), 3
        bias, x_zero_point = w.bias.double(), x.zero_point
        if x_zero_point and not any(w.padding):
            # every tap reads the input, none the padding: Σ w·(q − z) = Σ w·q − z·Σ w, a constant per channel
            bias = bias - x.scale * w.w_scale.double() * x_zero_point * weight.sum((1, 2, 3), dtype=torch.float64)
            x_zero_point = 0
        # src and dst scales folded into the weights' scales, the bias and the sum's scale: oneDNN computes
        # round((s_x·s_w·acc + bias + s_skip·(skip − z_skip)) / s_out) + z_out, where a conv feeding an add
        # has its value rounded onto its own grid (s_c, z_c) first, and ReLU commutes with 1/s_out
        bias = (bias / out.scale).to(torch.float32).contiguous()
        w_scale = (w.w_scale.double() * (x.scale / out.scale)).to(torch.float32).contiguous()
        bias_desc = capi.MemoryDesc((o,), capi.F32, (1,))
        sum_post_op = None if accumulated is None else (accumulated.scale / out.scale, accumulated.zero_point)
        relative = None if grid is None else (grid[0] / out.scale, grid[1])
        # a zero point of 0 is left out: oneDNN's kernels pay for a zero-point argument even when it is 0
        attr = capi.conv_attr(mask, sum_post_op, relu, (x_zero_point != 0, out.zero_point != 0), relative)
        desc = capi.ConvolutionDesc(x.group.desc, capi.MemoryDesc(shape, capi.S8, None), bias_desc, out.group.desc,
                                    w.stride, w.padding, w.dilation, attr)
        desc.skip(AVOIDED)
        packed_desc = desc.weights_desc
        packed = torch.empty(packed_desc.size, dtype=torch.uint8)
        source, target = capi.Memory(plain, weight.data_ptr()), capi.Memory(packed_desc, packed.data_ptr())
        capi.execute(capi.reorder(plain, packed_desc), _exec_args([(capi.ARG_SRC, source), (capi.ARG_DST, target)]))
        keep = self.keep
        keep += [packed, bias]
        memories = [
            (capi.ARG_SRC, x.group.memory), (capi.ARG_WEIGHTS, target), (capi.ARG_BIAS, capi.Memory(bias_desc, bias.data_ptr())),
            (capi.ARG_DST, out.group.memory), (capi.ARG_SCALES | capi.ARG_WEIGHTS, _scalar_memory(w_scale, keep)),
        ]
        for arg, zero_point in ((capi.ARG_SRC, x_zero_point), (capi.ARG_DST, out.zero_point)):
            if zero_point:
                memories.append((capi.ARG_ZERO_POINTS | arg,
                                 _scalar_memory(torch.tensor([zero_point], dtype=torch.int32), keep)))
        return desc.primitive(), desc.scratchpad_desc, memories

    def _step(self, primitive: capi.Primitive, memories: list[tuple[int, capi.Memory]]) -> None:
        array = _exec_args(memories)
        self.keep += [primitive, array, *(m for _, m in memories)]
        execute = capi.library().dnnl_primitive_execute
        self.steps.append((execute, (primitive.handle.value, capi.stream(), len(memories), array)))
        self.raw.append(_Step(_address(execute), primitive.handle.value, capi.stream().value, len(memories),
                              ctypes.addressof(array), 4))

    def _copy(self, source: _Value, target: _Value) -> None:
        """A step copying ``source``'s codes into ``target``'s buffer (reordered to its layout)."""
        self._step(capi.reorder(source.group.desc, target.group.desc),
                   [(capi.ARG_SRC, source.group.memory), (capi.ARG_DST, target.group.memory)])

    def run(self, args: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        alive = []
        for index, memory, channels_last in self.inputs:
            x = args[index]
            if channels_last != _channels_last(x):
                x = x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            alive.append(x)
            memory.point_to(x.data_ptr())
        fresh = []
        for memory, shape, scale, zero_point in self.fresh:
            t = torch._empty_affine_quantized(shape, scale=scale, zero_point=zero_point, dtype=torch.quint8,
                                              memory_format=torch.channels_last)
            memory.point_to(t.data_ptr())
            fresh.append(t)
        run_steps = _run_steps()
        if run_steps is not None:
            failed = run_steps(ctypes.addressof(self.array), len(self.raw))
            if failed:
                step, status = (failed >> 32) - 1, failed & 0xFFFFFFFF
                raise capi.OneDNNError(f"step {step} of a PROM plan failed with status {status}")
        else:
            for function, arguments in self.steps:
                status = function(*arguments)
                if status:
                    raise capi.OneDNNError(f"oneDNN primitive execution failed with status {status}")
        return tuple(fresh[i] for i in self.outputs)


class _Step(ctypes.Structure):
    """prom_step of native/prom_steps.c: a C function and its one or four arguments."""

    _fields_ = [("fn", ctypes.c_void_p), ("a", ctypes.c_void_p), ("b", ctypes.c_void_p), ("count", ctypes.c_int64),
                ("args", ctypes.c_void_p), ("arity", ctypes.c_int64)]


def _address(function: Callable[..., int]) -> int:
    """Where a ctypes function's C code starts."""
    return ctypes.cast(function, ctypes.c_void_p).value


def _run_steps() -> Callable[[int, int], int] | None:
    """native/prom_steps.c's runner (all of a plan's steps in one ctypes call), or None where native
    kernels are off (the steps are then called one by one: the same values)."""
    if not native_kernels.active():
        return None
    return native_kernels.function("prom_steps", "prom_run_steps", ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64)


def _native_depthwise(x: _Value, out: _Value, weights: prom_onednn.ConvWeights, accumulated: _Value | None) -> bool:
    """Whether a conv runs as ``prom_depthwise``'s kernel rather than a oneDNN primitive: a depthwise
    conv it computes, of at least ``NATIVE_DEPTHWISE_CHANNELS`` channels, without a sum post-op,
    between two of the plan's own buffers (the kernel's addresses are fixed when planning)."""
    return (accumulated is None and x.group.pointer is not None and out.group.pointer is not None
            and x.group.shape[1] >= NATIVE_DEPTHWISE_CHANNELS and prom_depthwise.supported(weights, x.group.shape[1])
            and prom_depthwise.available())


def _channels_last(x: Tensor) -> bool:
    """Whether a plan reads ``x`` as NHWC (else as NCHW, reordered inside the plan)."""
    return x.is_contiguous(memory_format=torch.channels_last) or not x.is_contiguous()


class _Unsupported(Exception):
    """The run holds something the plan does not run as primitives (it runs as TorchScript instead)."""


def _conv_shape(x: tuple[int, ...], w: prom_onednn.ConvWeights) -> tuple[int, ...]:
    n, _, h, width = x
    kh, kw = w.weight.shape[2:]
    out = (conv_output_size(h, kh, w.stride[0], w.padding[0], w.dilation[0]),
           conv_output_size(width, kw, w.stride[1], w.padding[1], w.dilation[1]))
    if min(out) < 1:
        raise _Unsupported
    return (n, w.weight.shape[0], *out)

