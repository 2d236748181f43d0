"""fxslim: torch.fx passes that make vision models cheaper to run, and a cost model that says by how much."""

from fxslim import runtime  # registers the torch.ops.fxslim.* custom ops

__all__ = ["runtime"]
__version__ = "0.1.0"
