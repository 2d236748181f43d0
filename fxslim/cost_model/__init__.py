"""fxslim.cost_model: MACs/FLOPs, arithmetic by bit width, energy, storage and memory of every node.

    report = fxslim.estimate(model, (x,))                 # CostReport: rows, total, unknown_ops
    report.total.macs, report.total.energy_pj, report.to_markdown(), report.table()
    report.with_conventions(deploy="prom")                # the same float model "as deployed"
    fxslim.compare(before, after)                         # before/after per module
    fxslim.estimate(model, (x,), symbolic={"frames": (0, 1)}).scaling(frames=[1, 2, 4, 8])
    sweep(model, lambda s: torch.randn(1, s, 196, 64), "frames", [1, 2, 4, 8])   # numeric, any cost

Importing this package registers every formula (``registry.register_cost``): the aten formulas in
``formulas/aten.py`` and one ``formulas/<method>.py`` per method (the fxslim ops its pass emits).
"""

from fxslim.cost_model.formulas import aten  # noqa: F401  (registers the aten formulas)
from fxslim.cost_model.formulas import haste  # noqa: F401  (fxslim::haste_conv2d)
from fxslim.cost_model.formulas import httm  # noqa: F401  (registers fxslim::httm_attention)
from fxslim.cost_model.formulas import prom  # noqa: F401  (PROM integer ops)
from fxslim.cost_model.conventions import FORMATS, KINDS, PACKINGS, Conventions, deploy_preset, parse_deploy
from fxslim.cost_model.energy import EnergyTable, available_tables, load_table, mac_arithmetic
from fxslim.cost_model.estimate import estimate, sweep
from fxslim.cost_model.graph import graph_peak_bytes, peak_activation_bytes, to_networkx
from fxslim.cost_model.registry import OpCall, OpCost, TensorSpec, lookup, register_cost, registered_costs
from fxslim.cost_model.report import Comparison, CostReport, CostRow, CostTotals, ScalingTable, compare
from fxslim.cost_model.storage import state_dict_bytes

__all__ = [
    "estimate", "compare", "sweep", "Conventions", "CostReport", "CostRow", "CostTotals", "Comparison", "ScalingTable",
    "EnergyTable", "load_table", "available_tables", "mac_arithmetic", "register_cost", "registered_costs",
    "lookup", "OpCall", "OpCost", "TensorSpec", "deploy_preset", "parse_deploy", "FORMATS", "KINDS", "PACKINGS",
    "state_dict_bytes", "to_networkx", "peak_activation_bytes", "graph_peak_bytes",
]
