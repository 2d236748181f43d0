"""Run a converted PROM model on slices of the batch, so that no activation outgrows the allocator's cache.

A converted model treats every sample on its own (BN folded, no op mixes samples), so slicing the
batch and concatenating the outputs changes no value. It changes the speed: an activation of more
than 32 MB (glibc's largest mmap threshold) is a fresh mmap at every call and costs a page fault
per 4 KB page on first touch — 38.5 MB of u8 codes after MobileNetV2's first expansion conv at
batch 32, 224 px, 12 ms of faults for a 6 ms conv. Slices below ``max_activation_bytes`` (30 MB:
under that threshold, and as few slices as possible, since every slice pays each op's call
overhead again, and of equal size) reuse freed heap memory.

In eager mode and under ``torch.compile`` a ``runtime="onednn"`` model runs lowered
(``fxslim.runtime.prom_lowered``): the same values without the ops' per-call layer, its convs as
oneDNN primitives called directly when oneDNN's library is installed (``direct``; within 1 LSB of
the ops), else as ATen's quantized convs (bit-identical to the ops).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from fxslim.hooks import copy_hooks
from fxslim.ir import meta_val
from fxslim.modes import outside_inference_mode
from fxslim.passes.prom_versions import stamp, watched, written
from fxslim.runtime.prom_lowered import has_onednn_ops, lower

__all__ = ["MicroBatched", "micro_batched", "DEFAULT_MAX_ACTIVATION_BYTES"]

_log = logging.getLogger(__name__)

DEFAULT_MAX_ACTIVATION_BYTES = 30 << 20


class MicroBatched(nn.Module):
    """``module`` applied to slices of dim 0 of its single tensor input, outputs concatenated on dim 0.

    ``sample_bytes``: the largest activation of one sample at ``sample_pixels`` input pixels
    (H·W); at another resolution it scales with H·W. ``example_shape``: the shape of the input the
    model was converted at; an input of another rank or channel count is refused with a ValueError
    (the runtime's own errors would name its internals), any batch and resolution are taken.
    """

    def __init__(self, module: nn.Module, sample_bytes: int, sample_pixels: int,
                 max_activation_bytes: int = DEFAULT_MAX_ACTIVATION_BYTES, lowered: bool = True,
                 direct: bool = True, example_shape: tuple[int, ...] | None = None) -> None:
        super().__init__()
        if not isinstance(max_activation_bytes, int) or isinstance(max_activation_bytes, bool) or (
                max_activation_bytes <= 0):
            raise ValueError(f"max_activation_bytes: expected a positive integer (bytes), got {max_activation_bytes!r}")
        self.module = module
        self.sample_bytes = int(sample_bytes)
        self.sample_pixels = int(sample_pixels)
        self.max_activation_bytes = int(max_activation_bytes)
        self.lowered = bool(lowered)
        self.direct = bool(direct)
        self.example_shape = None if example_shape is None else tuple(int(n) for n in example_shape)
        self.__dict__["_runner"] = None  # built on the first eager call; kept out of submodules and state
        # (the module's state dicts loaded, (tensor, its version) of each buffer and parameter) the runner was built from
        self.__dict__["_read"] = (0, ())

    @property
    def runner(self) -> nn.Module:
        """What eager calls run: ``module`` lowered (``prom_lowered.lower``) when ``lowered`` and it
        is a ``runtime="onednn"`` graph, else ``module`` itself. Same values either way: the lowered
        copy reads the weights once, so it is built again once any of them changed in place (an
        in-place op; a converted model's tensors share one version counter, so that is one read a
        call, ``prom_versions``), the module loaded a state dict (``IntegerModel.loads``, also
        with ``assign=True``) or this wrapper moved (``.to()``). A tensor replaced otherwise
        (``register_buffer``, ``.data =``) is not seen: wrap the model again."""
        runner = self.__dict__["_runner"]
        loads, read = self.__dict__.get("_read", (0, ()))
        if runner is None or getattr(self.module, "loads", 0) != loads or written(read):
            graph = isinstance(self.module, fx.GraphModule) and has_onednn_ops(self.module)
            runner = lower(self.module, direct=self.direct) if self.lowered and graph else self.module
            self.__dict__.update(_runner=runner,
                                 _read=(getattr(self.module, "loads", 0), stamp(watched(self.module))))
        return runner

    def _apply(self, fn, recurse: bool = True):
        self.__dict__["_runner"] = None  # .to(), .double(), ...: tensors replaced, not changed in place
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict:
        # oneDNN's packed weights cannot be copied or pickled: a copy lowers its module again
        return {**self.__dict__, "_runner": None, "_read": (0, ())}

    def rows_per_slice(self, x: Tensor) -> int:
        pixels = math.prod(x.shape[2:]) if x.dim() > 2 else self.sample_pixels
        per_sample = self.sample_bytes * pixels / max(1, self.sample_pixels)
        return max(1, int(self.max_activation_bytes // max(1.0, per_sample)))

    def forward(self, x: Tensor) -> Tensor:
        if torch.compiler.is_exporting() or torch.jit.is_tracing():
            # an exported program holds the fxslim ops themselves, on the whole batch: slices sized
            # from symbolic sizes would pin the export's resolution and batch in guards; a
            # TorchScript trace records no oneDNN call made through ctypes (it kept only the
            # output's allocation, uninitialised memory)
            self._check_input(x)
            return self.module.forward(x)
        if self.lowered and torch.compiler.is_compiling():
            return self._run_lowered(x)
        return self._run(self.runner, x)

    def _check_input(self, x: Tensor) -> None:
        if isinstance(x, Tensor) and not x.is_floating_point():  # as the converted model's first op refuses it
            raise ValueError(f"x: expected a floating-point tensor, got {x.dtype}")
        shape = self.example_shape
        # the channels: dim 1 of images [N, C, H, W] and [N, F]; of [N, T, F] tokens (a linear's) or
        # [N, C, L] (a conv1d's) either dim 1 or the last, which the example does not tell apart
        channel_dims = (1, 2) if shape is not None and len(shape) == 3 else (1,)
        if shape is None or (isinstance(x, Tensor) and x.dim() == len(shape)
                             and (x.dim() < 2 or any(x.shape[d] == shape[d] for d in channel_dims))):
            return
        spatial = ("H", "W") if len(shape) == 4 else tuple(f"d{i}" for i in range(2, len(shape)))
        dims = ", ".join(("N", *(str(n) for n in shape[1:2]), *spatial))
        if len(shape) == 3:
            dims += f"] or [N, d1, {shape[2]}"
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x: expected a tensor of shape [{dims}] (any batch and size, as the example "
                         f"{list(shape)} the model was converted at), got {got}")

    def _run(self, module: nn.Module, x: Tensor) -> Tensor:
        self._check_input(x)
        rows = self.rows_per_slice(x)
        run = module.forward  # not module(): the integer model's own hooks run once, on this wrapper
        if x.shape[0] <= rows:
            return run(x)
        # as few slices as fit, of equal size: 16 + 16 rather than 24 + 8 at batch 32, 224 px, is 2.5 %
        # faster (measured side by side), and every slice then allocates the same sizes
        slices = math.ceil(x.shape[0] / rows)
        return torch.cat([run(part) for part in x.split(math.ceil(x.shape[0] / slices))])

    # Under torch.compile the lowered runner is called as it is, outside the traced graph: traced,
    # the model's weights become graph inputs that dynamo guards and gathers on every call (0.2 to
    # 0.4 ms at batch 1 for MobileNetV2's 260 tensors, as much as the rest of the per-call overhead),
    # and between the oneDNN calls there is nothing left for a compiler to fuse.
    @torch.compiler.disable
    def _run_lowered(self, x: Tensor) -> Tensor:
        return self._run(self.runner, x)


@outside_inference_mode
def micro_batched(int_model: fx.GraphModule, max_activation_bytes: int = DEFAULT_MAX_ACTIVATION_BYTES, *,
                  lowered: bool = True, direct: bool = True) -> MicroBatched:
    """Wrap a converted PROM model (one tensor input, one tensor output with the batch first).

    The per-sample activation size comes from the graph's shape metadata (``meta['val']``). With
    ``lowered`` (default) eager calls of a ``runtime="onednn"`` model run its lowered copy
    (``fxslim.runtime.prom_lowered.lower``: the same values without the ops' per-call checks).
    ``direct`` (default): its convs as oneDNN primitives through oneDNN's own library where that is
    installed (``prom_direct``); ``direct=False`` keeps ATen's quantized convs, slower on MobileNetV2
    (benchmarks/results/prom_vs_peers.md times both side by side). The direct runtime's outputs do
    not depend on the batch; switching between the two may move a code by 1 LSB at a rare tie
    (``prom_direct``'s docstring says where).
    """
    if not isinstance(int_model, fx.GraphModule):
        raise ValueError(f"int_model: expected the GraphModule fxslim.convert returned, got {type(int_model).__name__} "
                         "(a model converted in parts, or not converted: call it directly)")
    placeholders = [n for n in int_model.graph.nodes if n.op == "placeholder"]
    outputs = next(n for n in int_model.graph.nodes if n.op == "output").args[0]
    if len(placeholders) != 1 or not isinstance(outputs, fx.Node):
        raise ValueError(f"micro_batched: expected a model with one tensor input and one tensor output, got "
                         f"{len(placeholders)} inputs and output {type(outputs).__name__}")
    example = meta_val(placeholders[0])
    if not isinstance(example, Tensor) or example.dim() < 1 or example.shape[0] < 1:
        raise ValueError("micro_batched: the input has no shape metadata with a batch dimension (convert sets it)")
    out = meta_val(outputs)
    if isinstance(out, Tensor) and (out.dim() < 1 or out.shape[0] != example.shape[0]):
        # e.g. a torch.cat of two views of the batch on dim 0: slices would come back interleaved
        raise ValueError(f"micro_batched: expected an output with the input's batch first ({example.shape[0]} rows at "
                         f"the example), got shape {tuple(out.shape)}: the model mixes or regroups samples, so "
                         "running it on slices of the batch would change its output; call the model directly")
    mixing = _mixes_samples(int_model, example)
    if mixing is not None:
        raise ValueError(f"micro_batched: {mixing} mixes or regroups the samples of the batch (its output's first dim "
                         "does not grow with the batch as the input's does), so running the model on slices of the "
                         "batch would change its output; call the model directly")
    largest = max(v.numel() * v.element_size() for n in int_model.graph.nodes
                  if isinstance(v := meta_val(n), Tensor))
    pixels = math.prod(example.shape[2:]) if example.dim() > 2 else 1
    wrapper = MicroBatched(int_model, largest // example.shape[0], pixels, max_activation_bytes, lowered, direct,
                           tuple(example.shape))
    copy_hooks(int_model, wrapper)  # float in, float out, once per call (the slices run the model's forward)
    wrapper.runner  # noqa: B018  (lowered and packed now, not on the first call)
    return wrapper


def _mixes_samples(int_model: fx.GraphModule, example: Tensor) -> str | None:
    """The first node computed from the input whose first dim does not scale with the batch (a mean
    over it, a transpose that moves it, a sum to a scalar), named with its op; None when every one
    does. Found by running the graph at two batch sizes on fake tensors: an output of k·B rows (the
    views of a sample folded into the batch) keeps the samples apart, as slices of the batch do."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    rows: list[dict[fx.Node, int | None]] = []
    for batch in _PROBE_BATCHES:
        try:
            with FakeTensorMode(allow_non_fake_inputs=True) as mode:
                x = mode.from_tensor(torch.empty((batch, *example.shape[1:]), dtype=example.dtype))
                rows.append(_first_dims(int_model, x))
        except Exception as error:  # noqa: BLE001 - an op with no fake kernel: the check cannot run, the model can
            _log.info("micro_batched: could not check that the model keeps samples apart (%s)", error)
            return None
    (small, large), (b1, b2) = rows, _PROBE_BATCHES
    for node, n1 in small.items():
        n2 = large.get(node)
        if n1 is None or n2 is None or n1 % b1 or n2 * b1 != n1 * b2:
            return f"{node.name} ({node.target if node.op != 'call_module' else type(int_model.get_submodule(str(node.target))).__name__})"
    return None


_PROBE_BATCHES = (7, 11)  # primes: a first dim that is a multiple of both by chance is unlikely


class _FirstDims(fx.Interpreter):
    """Runs the graph, keeping the first dim of each tensor computed from the input (None: 0-d)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.dims: dict[fx.Node, int | None] = {}
        self.from_input: set[fx.Node] = set()

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.op == "placeholder" or any(a in self.from_input for a in n.all_input_nodes):
            self.from_input.add(n)
            if isinstance(out, Tensor) and n.op not in ("placeholder", "output"):
                self.dims[n] = int(out.shape[0]) if out.dim() else None
        return out


def _first_dims(gm: fx.GraphModule, x: Tensor) -> dict[fx.Node, int | None]:
    runner = _FirstDims(gm)
    with torch.no_grad():
        runner.run(x)
    return runner.dims
