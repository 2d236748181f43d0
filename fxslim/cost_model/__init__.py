"""fxslim.cost_model."""
