"""The int8 CPU stacks PROM's integer runtime is measured against (docs/background/peers.md), each built
from the same float torchvision MobileNetV2 and calibrated on the same images.

Every builder takes (model, example batch x, calibration batches) and returns a callable of no
arguments that runs one inference on x. A peer whose package is missing raises ``PeerUnavailable``
with the reason, so the benchmark can skip its row and say why. Builders compile under the thread
count that is current when they are called (inductor bakes it into its code).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

__all__ = ["PeerUnavailable", "fp32_compiled", "pt2e_int8", "onnx_export", "ort_int8", "openvino_int8", "logits"]

_TMP = Path(tempfile.mkdtemp(prefix="prom_vs_peers_"))


class PeerUnavailable(RuntimeError):
    """A peer cannot run here (its package is not installed, or it has no CPU backend)."""


def logits(out: object) -> torch.Tensor:
    """The logits tensor of any variant's output (ORT: list of arrays, OpenVINO: result dict)."""
    if isinstance(out, torch.Tensor):
        return out
    first = out[0] if isinstance(out, (list, tuple)) else next(iter(out.values()))
    return torch.as_tensor(first)


def _compiled(model: nn.Module, wrapper_name: str) -> nn.Module:
    """``torch.compile`` with freezing, of a fresh wrapper class (dynamo reuses a compiled graph
    across instances of one class)."""
    wrapper = type(wrapper_name, (nn.Module,), {"forward": lambda self, x: self.inner(x)})()
    wrapper.inner = model
    torch._inductor.config.freezing = True
    return torch.compile(wrapper)


def fp32_compiled(model: nn.Module, x: torch.Tensor, calibration: list[torch.Tensor]) -> Callable[[], torch.Tensor]:
    compiled = _compiled(model, "Fp32Compiled")
    return lambda: compiled(x)


def pt2e_int8(model: nn.Module, x: torch.Tensor, calibration: list[torch.Tensor]) -> Callable[[], torch.Tensor]:
    """PT2E: export, X86InductorQuantizer (static, per-channel weights), calibrate, convert, compile."""
    try:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
            X86InductorQuantizer, get_default_x86_inductor_quantization_config,
        )
    except ImportError as error:
        raise PeerUnavailable(f"torchao is not installed ({error}); pip install -e '.[bench]'") from error
    exported = torch.export.export(model, (x,)).module()
    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported, quantizer)
    for batch in calibration:
        prepared(batch)
    compiled = _compiled(convert_pt2e(prepared), "Pt2eInt8")
    return lambda: compiled(x)


def onnx_export(model: nn.Module, x: torch.Tensor) -> Path:
    """The fp32 model as ONNX (dynamo exporter), static shapes of ``x``."""
    try:
        import onnx  # noqa: F401  (the exporter needs it)
        import onnxscript  # noqa: F401
    except ImportError as error:
        raise PeerUnavailable(f"onnx/onnxscript are not installed ({error}); pip install -e '.[bench]'") from error
    path = _TMP / f"{type(model).__name__}_b{x.shape[0]}.onnx"
    if not path.exists():
        torch.onnx.export(model, (x,), str(path), dynamo=True, external_data=False)
    return path


def ort_int8(model: nn.Module, x: torch.Tensor, calibration: list[torch.Tensor]) -> Callable[[], object]:
    """ONNX Runtime static QDQ: u8 activations, s8 per-channel weights, MinMax calibration."""
    try:
        import onnxruntime as ort
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError as error:
        raise PeerUnavailable(f"onnxruntime is not installed ({error}); pip install -e '.[bench]'") from error
    source = onnx_export(model, x)
    prepped, quantized = source.with_suffix(".prep.onnx"), source.with_suffix(".int8.onnx")
    quant_pre_process(str(source), str(prepped))
    name = ort.InferenceSession(str(prepped), providers=["CPUExecutionProvider"]).get_inputs()[0].name

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter([{name: b.numpy()} for b in calibration])

        def get_next(self) -> dict | None:
            return next(self._batches, None)

    quantize_static(str(prepped), str(quantized), _Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(quantized), options, providers=["CPUExecutionProvider"])
    feed = {name: x.numpy()}
    return lambda: session.run(None, feed)


def openvino_int8(model: nn.Module, x: torch.Tensor, calibration: list[torch.Tensor]) -> Callable[[], object]:
    """OpenVINO: the ONNX model, NNCF post-training int8 quantization, latency-mode f32 inference."""
    try:
        import nncf
        import openvino as ov
    except ImportError as error:
        raise PeerUnavailable(f"openvino/nncf are not installed ({error}); pip install -e '.[bench]'") from error
    ov_model = ov.convert_model(str(onnx_export(model, x)))
    quantized = nncf.quantize(ov_model, nncf.Dataset([b.numpy() for b in calibration]), subset_size=len(calibration))
    config = {"INFERENCE_NUM_THREADS": torch.get_num_threads(), "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1,
              "INFERENCE_PRECISION_HINT": "f32"}
    compiled = ov.Core().compile_model(quantized, "CPU", config)
    request = compiled.create_infer_request()
    array = x.numpy()
    return lambda: request.infer([array])
