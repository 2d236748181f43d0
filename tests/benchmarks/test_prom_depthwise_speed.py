"""benchmarks.prom_depthwise_speed at one round: a row per MobileNetV2 depthwise shape and per narrow
shape, the kernel in the plan exactly from prom_direct's threshold on, times and ratios positive."""

from __future__ import annotations

import pytest

from benchmarks import prom_depthwise_speed, records
from benchmarks.prom_op_speed import _layer_shapes
from fxslim.runtime import onednn_capi, prom_depthwise
from fxslim.runtime import prom_direct as D

pytestmark = pytest.mark.skipif(not (prom_depthwise.available() and onednn_capi.available()),
                                reason="needs the kernel's vector form (AVX-512 VNNI) and oneDNN's C library")


def test_prom_depthwise_speed_times_every_layer_both_ways(tmp_path, one_thread):
    assert prom_depthwise_speed.main(["--batches", "1", "--rounds", "1", "--out", str(tmp_path)]) == 0
    (section,) = [s for s in records.load("prom_depthwise_speed", tmp_path).sections if s.table is not None]
    rows = {row[0]: row[1:] for row in section.table.rows}
    shapes = {(c, size, stride) for c, _, size, stride in _layer_shapes()[1]} | set(prom_depthwise_speed._EXTRA)
    assert set(rows) == {f"{c} @ {size}, stride {stride}" for c, size, stride in shapes}
    for label, (in_plan, kernel_us, onednn_us, ratio) in rows.items():
        channels = int(label.split()[0])
        assert in_plan == ("yes" if channels >= D.NATIVE_DEPTHWISE_CHANNELS else "no (oneDNN)")
        assert kernel_us > 0 and onednn_us > 0 and ratio > 0
