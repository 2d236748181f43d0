"""Conventions applied to raw counts: operand formats, arithmetic by bit width, energy, storage, bytes.

Each MAC-bearing row (conv, linear, matmul, attention, or any op with MACs) gets an operand format:
the one an fxslim op declares, else the "as deployed" assignment, else its node's dtype. Other
rows take the deployed "default" format for their activations. See ``Conventions`` for what energy
and storage include.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import sympy
import torch

from fxslim.cost_model.conventions import KINDS, Conventions, format_bits
from fxslim.cost_model.energy import EnergyTable, mac_arithmetic
from fxslim.cost_model.report import CostRow
from fxslim.cost_model.shapes import to_expr
from fxslim.cost_model.walk import RawRow, is_zero

__all__ = ["RowPricer"]

_QUANTIZED = ("int8", "int4", "ternary")


def _twn_zero_fraction(weight: torch.Tensor) -> float:
    """Fraction of zeros after TWN ternarization (Δ_c = 0.7·mean|W_c| per output channel)."""
    w = weight.detach().float().reshape(weight.shape[0], -1).abs()
    delta = 0.7 * w.mean(dim=1, keepdim=True)
    return float((w <= delta).float().mean())


class RowPricer:
    """Prices raw rows: operand formats, arithmetic by bit width, energy and storage, by the
    conventions and the energy table."""

    def __init__(self, conventions: Conventions, table: EnergyTable, rename: Mapping[sympy.Symbol, sympy.Symbol]) -> None:
        self.conventions = conventions
        self.table = table
        self.rename = rename
        self.missing: dict[tuple[str, str], Any] = {}
        self.mem_pj = table.memory_energy(conventions.memory_level) if conventions.include_memory else 0.0

    def expr(self, value: Any) -> Any:
        """``value`` (an int, SymInt or expression) as a sympy expression in the report's symbols."""
        return to_expr(value, self.rename)

    def rows(self, raws: list[RawRow]) -> list[CostRow]:
        last: dict[str, RawRow] = {}
        for raw in raws:
            if raw.kind in KINDS and raw.declared is None:
                last[raw.kind] = raw
            for kind, declared in raw.mac_parts:
                if kind in KINDS and declared is None:
                    last[kind] = raw
        default_act = self.conventions.deploy_map.get("default")
        return [self._row(raw, {kind for kind, row in last.items() if row is raw}, default_act) for raw in raws]

    def _row(self, raw: RawRow, last_of: set[str], default_act: str | None) -> CostRow:
        mac_row = raw.kind in KINDS or not is_zero(raw.macs)
        deployed = None
        if raw.declared is not None:
            fmt = raw.declared
        elif mac_row:
            deployed = self.conventions.mac_format(raw.fqn, raw.kind, raw.kind in last_of)
            fmt = deployed or raw.dtype or "fp32"
        else:
            fmt = default_act or raw.dtype or "fp32"
        parts = self._mac_parts(raw, fmt, last_of)
        out_numel = self.expr(raw.out.numel) if raw.out is not None else 0
        ops = self._arithmetic(raw, fmt, parts, mac_row, out_numel)
        mixed = len(parts) > 1 and raw.declared is None
        params, storage = self._storage(raw, mac_row, deployed, last_of if mixed else None)
        act_bytes = self._act_bytes(fmt, raw)
        written = self.expr(raw.bytes_written) if raw.bytes_written is not None else out_numel * act_bytes
        read = (self.expr(raw.bytes_read) if raw.bytes_read is not None
                else sum((self.expr(s.numel) * act_bytes for s in raw.inputs), 0) + storage / 8)
        energy = self._energy(ops)
        if self.conventions.include_memory:
            energy = energy + (read + written) * self.mem_pj
        elementwise = self.expr(raw.elementwise)
        return CostRow(
            graph=raw.graph, node=raw.name, op=raw.op, kind=raw.kind, fqn=raw.fqn,
            input_shapes=tuple(tuple(self.expr(d) for d in s.shape) for s in raw.inputs),
            output_shape=tuple(self.expr(d) for d in raw.out.shape) if raw.out is not None else None,
            dtype=raw.dtype,
            format=("mixed" if len({f for f, _ in parts}) > 1 else fmt) if (mac_row or not is_zero(elementwise)) else None,
            macs=self.expr(raw.macs), elementwise=elementwise, ops=ops, energy_pj=energy, params=params,
            storage_bits=storage, activation_bytes=out_numel * act_bytes, bytes_read=read, bytes_written=written,
            measured_macs=self.expr(raw.measured_macs) if raw.measured_macs is not None else None,
            unknown=tuple(raw.unknown), info={k: self.expr(v) for k, v in raw.info.items()},
        )

    def _mac_parts(self, raw: RawRow, fmt: str, last_of: set[str]) -> list[tuple[str, Any]]:
        """(format, MACs) of the row: its MACs in ``fmt``, or, where its ops are of several kinds or
        declared formats (a leaf module's row), each part in its own declared or deployed format."""
        if len(raw.mac_parts) <= 1:
            return [(fmt, raw.macs)]
        return [(declared or self.conventions.mac_format(raw.fqn, kind, kind in last_of) or raw.dtype or "fp32", macs)
                for (kind, declared), macs in raw.mac_parts.items()]

    def _arithmetic(self, raw: RawRow, fmt: str, parts: list[tuple[str, Any]], mac_row: bool,
                    out_numel: Any) -> dict[tuple[str, str], Any]:
        """Operations by (operation, format): the MACs, the formula's extras and the optional terms."""
        rules = self.conventions
        ops: dict[tuple[str, str], Any] = {}
        for part_fmt, part_macs in parts:
            macs = self.expr(part_macs)
            if not is_zero(macs):
                zero_fraction = self._zero_fraction(raw) if part_fmt == "ternary" and rules.skip_zero_weights else 0.0
                _merge(ops, mac_arithmetic(macs, part_fmt, rules, zero_fraction))
        _merge(ops, {k: self.expr(v) for k, v in raw.ops.items()})
        integer = fmt.startswith("int") or fmt == "ternary"
        if rules.include_bias and raw.has_bias:
            adds = out_numel if raw.bias_adds is None else self.expr(raw.bias_adds)
            _merge(ops, {("add", f"int{rules.accumulator(fmt)}" if integer else fmt): adds})
        if rules.include_requant and fmt in _QUANTIZED and raw.declared is None and mac_row:
            _merge(ops, {("mul", rules.requant_format): out_numel})  # one rescale per output element
        elementwise = self.expr(raw.elementwise)
        if rules.include_elementwise and not is_zero(elementwise):
            _merge(ops, {("add", "int8" if fmt == "ternary" else fmt): elementwise})
        return ops

    def _storage(self, raw: RawRow, mac_row: bool, deployed: str | None,
                 last_of: set[str] | None = None) -> tuple[Any, Any]:
        """(parameters, storage bits) of the weights this node reads. ``last_of``: given for a row of
        several kinds of MAC ops, whose weights each take the format deployed for their own kind."""
        rules = self.conventions
        params: Any = 0
        storage: Any = 0
        for _, tensor, _ in raw.params:
            numel = tensor.numel()
            params += numel
            weight = mac_row and tensor.dim() >= 2
            fmt = deployed
            if weight and last_of is not None:
                kind = _weight_kind(tensor)
                fmt = self.conventions.mac_format(raw.fqn, kind, kind in last_of)
            if weight and fmt is not None:
                storage += numel * format_bits(fmt, rules.ternary_packing)
                if fmt in _QUANTIZED and rules.metadata_bits:
                    storage += tensor.shape[0] * rules.metadata_bits  # one scale per output channel
            elif not weight and rules.params_format is not None:
                storage += numel * format_bits(rules.params_format)
            else:
                storage += numel * tensor.dtype.itemsize * 8
        if raw.cost_params is not None:
            params = self.expr(raw.cost_params)
        if raw.storage_bits is not None:
            storage = self.expr(raw.storage_bits)
        if isinstance(storage, float) and storage.is_integer():
            storage = int(storage)
        return params, storage

    def _energy(self, ops: Mapping[tuple[str, str], Any]) -> Any:
        """pJ of the operations; pairs the table lacks are collected in ``missing``, not priced."""
        energy: Any = 0.0
        for key, count in ops.items():
            pj = self.table.op_energy(*key)
            if pj is None:
                self.missing[key] = self.missing.get(key, 0) + count
            else:
                energy = energy + count * pj
        return energy

    def _act_bytes(self, fmt: str, raw: RawRow) -> float:
        if fmt in _QUANTIZED:
            return 1  # quantized layers read and write 8-bit activations
        try:
            return format_bits(fmt) / 8
        except ValueError:
            return raw.out.dtype.itemsize if raw.out is not None else 4

    def _zero_fraction(self, raw: RawRow) -> float:
        if raw.zero_fraction is not None:
            return raw.zero_fraction
        if self.conventions.zero_fraction is not None:
            return self.conventions.zero_fraction
        weights = [real for _, tensor, real in raw.params if tensor.dim() >= 2 and real is not None]
        if not weights:
            return 0.0
        return _twn_zero_fraction(weights[0])


def _weight_kind(weight: torch.Tensor) -> str:
    """The kind of layer a weight's shape says it belongs to (a leaf module's several layers)."""
    if weight.dim() == 2:
        return "linear"
    if all(k == 1 for k in weight.shape[2:]):
        return "pointwise_conv"
    return "depthwise_conv" if weight.shape[1] == 1 else "conv"


def _merge(into: dict, extra: Mapping) -> None:
    for k, v in extra.items():
        into[k] = into.get(k, 0) + v


