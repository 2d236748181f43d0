"""fxslim.passes."""
