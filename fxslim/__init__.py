"""fxslim: torch.fx passes that make vision models cheaper to run, and a cost model that says by how much.

    res = fxslim.optimize(model, example_inputs, passes=["haste:L=14"])
    res.module, res.report, res.compare()
    fxslim.estimate(model, example_inputs).total.macs
    torch.compile(model, backend="fxslim", options={"passes": ["haste"]})
"""

from fxslim import runtime  # registers the torch.ops.fxslim.* custom ops
from fxslim.api import OptimizeReport, OptimizeResult, optimize
from fxslim.capture import capture
from fxslim.config import Config
from fxslim.cost_model import Conventions, compare, estimate
from fxslim.passes.base import Pass, parse_pass, register_pass, registered_passes
from fxslim.passes.httm import HTTM
from fxslim.policy import Policy

__all__ = [
    "optimize", "OptimizeResult", "OptimizeReport", "capture", "Config", "Pass", "Policy", "HTTM",
    "parse_pass", "register_pass", "registered_passes", "runtime", "estimate", "compare", "Conventions",
]
__version__ = "0.1.0"
