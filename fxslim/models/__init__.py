"""fxslim.models."""
