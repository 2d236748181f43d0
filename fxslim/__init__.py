"""fxslim: torch.fx passes that make vision models cheaper to run, and a cost model that says by how much.

    res = fxslim.optimize(model, example_inputs, passes=["haste:L=14"])
    res.module, res.report, res.compare()
    fxslim.estimate(model, example_inputs).total.macs
    qat = fxslim.prepare(model, example_inputs)           # PROM QAT model; train it, then
    int_model = fxslim.convert(qat)                        # integer GraphModule of torch.ops.fxslim ops
    fxslim.convert_report(int_model).islands               # the ops that run in float, and why
    fast = fxslim.micro_batched(fxslim.convert(qat, runtime="onednn"))   # oneDNN u8 kernels
    torch.compile(model, backend="fxslim", options={"passes": ["haste"]})
    fxslim.reestimate_bn_statistics(res.module, unlabelled_batches)   # optional, for HASTE: not data-free
    with fxslim.record_buckets() as rec: res.module(x)     # HASTE bucket counts on sample inputs, then
    res.compare(haste_buckets=fxslim.HasteBuckets(measured=rec))   # measured MACs beside predicted
"""

from fxslim import runtime  # registers the torch.ops.fxslim.* custom ops
from fxslim.api import OptimizeReport, OptimizeResult, optimize, prepare
from fxslim.bn_statistics import reestimate_bn_statistics
from fxslim.capture import CaptureError, capture
from fxslim.config import Config
from fxslim.cost_model import Conventions, compare, estimate
from fxslim.passes.base import Pass, parse_pass, register_pass, registered_passes
from fxslim.passes.haste import HASTE
from fxslim.passes.httm import HTTM
from fxslim.passes.prom import PROM, calibrate
from fxslim.passes.prom_batching import micro_batched
from fxslim.passes.prom_convert import convert, convert_report
from fxslim.passes.prom_islands import ConvertReport
from fxslim.policy import Policy
from fxslim.runtime.haste import record_buckets
from fxslim.runtime.haste_counts import HasteBuckets

__all__ = [
    "optimize", "OptimizeResult", "OptimizeReport", "capture", "CaptureError", "Config", "Pass", "Policy",
    "parse_pass", "register_pass", "registered_passes", "runtime", "estimate", "compare", "Conventions",
    "PROM", "prepare", "calibrate", "convert", "convert_report", "ConvertReport", "HASTE", "HTTM", "reestimate_bn_statistics",
    "record_buckets", "HasteBuckets", "micro_batched",
]
__version__ = "0.1.0"
