"""Energy tables (pJ per operation and per memory access) and the arithmetic of a MAC.

Tables are JSON files in ``fxslim/cost_model/tables/`` carrying their citation; ``load_table``
takes a table name, a path to a JSON file or a dict with the same fields::

    {"name": ..., "citation": ..., "arithmetic": {"add": {"int8": 0.03, ...}, "mul": {...}},
     "memory_pj_per_64bit": {"sram_32kb": 20, ...}}

``mac_arithmetic`` turns MACs of an operand format into operations by (operation, format): a float
MAC is one multiply and one add of that format, an integer MAC an integer multiply and an add at
the accumulator width, a ternary MAC one add at the (ternary) accumulator width.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fxslim.cost_model.conventions import Conventions

__all__ = ["EnergyTable", "load_table", "table_for", "available_tables", "mac_arithmetic", "TABLE_DIR"]

TABLE_DIR = Path(__file__).parent / "tables"


@dataclass(frozen=True)
class EnergyTable:
    """pJ per (operation, format) and per byte at each memory level."""

    name: str
    citation: str
    arithmetic: Mapping[tuple[str, str], float]
    memory_pj_per_byte: Mapping[str, float] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def op_energy(self, op: str, fmt: str) -> float | None:
        return self.arithmetic.get((op, fmt))

    def memory_energy(self, level: str) -> float:
        if level not in self.memory_pj_per_byte:
            raise ValueError(f"memory_level: expected one of {tuple(self.memory_pj_per_byte)} "
                             f"(table {self.name!r}), got {level!r}")
        return self.memory_pj_per_byte[level]


def available_tables() -> list[str]:
    """Names of the bundled tables."""
    return sorted(p.stem for p in TABLE_DIR.glob("*.json"))


def load_table(table: str | Path | Mapping[str, Any] | EnergyTable) -> EnergyTable:
    """An EnergyTable from a bundled name, a JSON path, a dict or an EnergyTable."""
    if isinstance(table, EnergyTable):
        return table
    if isinstance(table, Mapping):
        return _from_dict(table, "table")
    if isinstance(table, (str, Path)):
        path = Path(table)
        if path.suffix == ".json":
            if not path.is_file():
                raise ValueError(f"table: file {str(path)!r} does not exist")
            try:
                data = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise ValueError(f"table: file {str(path)!r} is not JSON ({error})") from None
            return _from_dict(data, str(path))
        if str(table) in available_tables():
            return _from_dict(json.loads((TABLE_DIR / f"{table}.json").read_text()), str(table))
        raise ValueError(f"table: expected one of {available_tables()}, a .json path or a dict, got {str(table)!r}")
    raise TypeError(f"table: expected a name, a path or a dict, got {type(table).__name__}")


def table_for(conventions: Conventions, table: str | Path | Mapping[str, Any] | EnergyTable) -> EnergyTable:
    """``load_table(table)``, checked to have an energy for the memory level ``conventions`` charge."""
    energy_table = load_table(table)
    if conventions.include_memory:
        energy_table.memory_energy(conventions.memory_level)  # raises naming the level and the table
    return energy_table


def _from_dict(data: Any, where: str) -> EnergyTable:
    if not isinstance(data, Mapping):
        raise ValueError(f"table {where}: expected a JSON object with an 'arithmetic' mapping, got {type(data).__name__}")
    arithmetic = data.get("arithmetic")
    if not isinstance(arithmetic, Mapping) or not arithmetic:
        raise ValueError(f"table {where}: expected an 'arithmetic' mapping such as "
                         f"{{'add': {{'int8': 0.03}}, 'mul': {{'int8': 0.2}}}}, got {arithmetic!r}")
    flat: dict[tuple[str, str], float] = {}
    for op, by_format in arithmetic.items():
        if not isinstance(by_format, Mapping):
            raise ValueError(f"table {where}: arithmetic[{op!r}] must map formats to pJ, got {by_format!r}")
        for fmt, pj in by_format.items():
            if not _energy(pj):
                raise ValueError(f"table {where}: arithmetic[{op!r}][{fmt!r}] must be a finite number >= 0, got {pj!r}")
            flat[(str(op), str(fmt))] = float(pj)
    memory_table = data.get("memory_pj_per_64bit", {})
    if not isinstance(memory_table, Mapping) or not all(map(_energy, memory_table.values())):
        raise ValueError(f"table {where}: memory_pj_per_64bit must map memory levels to finite pJ >= 0, "
                         f"got {memory_table!r}")
    memory = {str(k): float(v) / 8.0 for k, v in memory_table.items()}
    return EnergyTable(
        name=str(data.get("name", where)), citation=str(data.get("citation", "")), arithmetic=flat,
        memory_pj_per_byte=memory, notes=tuple(data.get("notes", ())),
    )


def _energy(value: Any) -> bool:
    """A pJ figure: a finite number >= 0 (not NaN, not true/false, which JSON would give as 1 and 0)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def mac_arithmetic(macs: Any, fmt: str, conventions: Conventions, zero_fraction: float = 0.0) -> dict[tuple[str, str], Any]:
    """Operations of ``macs`` MACs with operands in ``fmt`` (see the module docstring)."""
    if fmt == "ternary":
        adds = macs if not zero_fraction else macs * (1 - zero_fraction)
        return {("add", f"int{conventions.accumulator(fmt)}"): adds}
    if fmt.startswith("int"):
        # the accumulator is never narrower than the operands
        acc = max(conventions.accumulator(fmt), int(fmt[3:]))
        return {("mul", fmt): macs, ("add", f"int{acc}"): macs}
    return {("mul", fmt): macs, ("add", fmt): macs}
