"""Energy tables: bundled JSON with its citation, loading by name/path/dict, clear errors, MAC
arithmetic by format, optional memory traffic."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import fxslim
from fxslim.cost_model import Conventions, available_tables, load_table, mac_arithmetic


def test_default_table_horowitz_values_and_citation():
    table = load_table("horowitz45nm")
    assert "Horowitz" in table.citation and "ISSCC" in table.citation
    assert table.op_energy("add", "int8") == 0.03 and table.op_energy("mul", "int8") == 0.2
    assert table.op_energy("add", "fp16") + table.op_energy("mul", "fp16") == pytest.approx(1.5)
    assert table.op_energy("mul", "fp32") == 3.7 and table.op_energy("mul", "int32") == 3.1
    assert table.memory_pj_per_byte["sram_32kb"] == 20 / 8  # 20 pJ per 64-bit read
    assert table.op_energy("mul", "bf16") is None
    assert "horowitz45nm" in available_tables()


def test_load_table_from_path_and_dict(tmp_path):
    data = {"name": "toy", "citation": "made up", "arithmetic": {"add": {"fp32": 1.0}, "mul": {"fp32": 2.0}}}
    path = tmp_path / "toy.json"
    path.write_text(json.dumps(data))
    for source in (data, path, str(path)):
        table = load_table(source)
        assert (table.name, table.op_energy("mul", "fp32")) == ("toy", 2.0)
    model = nn.Linear(4, 3).eval()
    report = fxslim.estimate(model, torch.randn(2, 4), table=data)
    assert report.total.energy_pj == 2 * 4 * 3 * (1.0 + 2.0)
    assert report.energy_table.name == "toy"


def test_load_table_bad_inputs_raise():
    with pytest.raises(ValueError, match=r"table: expected one of \['horowitz45nm'\], a .json path or a dict, got 'nope'"):
        load_table("nope")
    with pytest.raises(ValueError, match="table: file '/no/such.json' does not exist"):
        load_table("/no/such.json")
    with pytest.raises(ValueError, match="expected an 'arithmetic' mapping"):
        load_table({"name": "x"})
    for bad in (-1, float("nan"), float("inf"), True):  # NaN passed and failed later; true was 1 pJ
        with pytest.raises(ValueError, match=rf"arithmetic\['add'\]\['fp32'\] must be a finite number >= 0, got {bad}"):
            load_table({"arithmetic": {"add": {"fp32": bad}}})
    with pytest.raises(ValueError, match="memory_pj_per_64bit must map memory levels to finite pJ"):
        load_table({"arithmetic": {"add": {"fp32": 1}}, "memory_pj_per_64bit": {"dram": float("nan")}})
    with pytest.raises(TypeError, match="table: expected a name, a path or a dict"):
        load_table(3)


def test_mac_arithmetic_float_int_and_ternary():
    c = Conventions(accumulator_bits=16, ternary_accumulator_bits=8)
    assert mac_arithmetic(10, "fp16", c) == {("mul", "fp16"): 10, ("add", "fp16"): 10}
    assert mac_arithmetic(10, "int8", c) == {("mul", "int8"): 10, ("add", "int16"): 10}
    assert mac_arithmetic(10, "int32", c) == {("mul", "int32"): 10, ("add", "int32"): 10}  # never narrower
    assert mac_arithmetic(10, "ternary", c) == {("add", "int8"): 10}
    assert mac_arithmetic(10, "ternary", c, zero_fraction=0.5) == {("add", "int8"): 5}


def test_memory_traffic_optional_bytes_times_pj_per_byte():
    model, x = nn.Linear(4, 3, bias=False).eval(), torch.randn(2, 4)
    base = fxslim.estimate(model, x)
    memory = base.with_conventions(include_memory=True, memory_level="dram_low")
    (row,) = [r for r in memory.rows if r.macs]
    # read: input 2·4 fp32 + weight 4·3 fp32; written: output 2·3 fp32
    assert (row.bytes_read, row.bytes_written) == ((8 + 12) * 4, 6 * 4)
    assert memory.total.energy_pj - base.total.energy_pj == pytest.approx((20 + 6) * 4 * 1300 / 8)
