"""Cost formulas, one module per family of ops: ``aten`` (the ops any model runs) and one per
method (``haste``, ``httm``, ``prom``: the ``torch.ops.fxslim`` ops its pass emits). Importing a
module registers its formulas with ``fxslim.cost_model.registry`` (and, for the fxslim ops,
FlopCounterMode's)."""
