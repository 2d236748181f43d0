"""Custom ops in the ``fxslim`` namespace (``torch.ops.fxslim.*``).

Each op module defines the op with ``torch.library.custom_op`` and a fake kernel (shapes, dtypes
and strides only); its test oracle is in ``<method>_reference``, and its FlopCounterMode formula is
the cost model's count (``fxslim.cost_model.formulas.<method>``: 2·MACs, one formula per op).
Importing this package registers the ops; ``torch.export.load`` of a rewritten model needs it.
"""

from fxslim.runtime import haste  # noqa: F401  (fxslim::haste_conv2d)
from fxslim.runtime import httm  # noqa: F401  (fxslim::httm_attention)
from fxslim.runtime import prom  # noqa: F401  (fxslim::ternary_conv2d, int8_conv2d, ...)
from fxslim.runtime import prom_onednn  # noqa: F401  (fxslim::qconv2d, qconv2d_add, qlinear, qadd)
from fxslim.runtime import prom_codes  # noqa: F401  (fxslim::lut, max_pool2d_codes, mark_nan_samples)
from fxslim.runtime.inference_only import register_inference_only

register_inference_only("fxslim::haste_conv2d", tensor_args=(0, 1, 2, 3))  # x, weight, bias, planes
register_inference_only("fxslim::httm_attention", tensor_args=(0, 1, 2))  # q, k, v

__all__: list[str] = []
