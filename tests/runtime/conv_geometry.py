"""Random conv geometries for the integer conv property tests: the kernels, strides, paddings,
dilations and groupings the converter can emit, on inputs down to one pixel."""

from __future__ import annotations

from typing import NamedTuple

from hypothesis import assume
from hypothesis import strategies as st

from fxslim.runtime.prom import conv_output_size


class ConvGeometry(NamedTuple):
    n: int
    c_in: int
    c_out: int
    h: int
    w: int
    kernel: tuple[int, int]
    stride: list[int]
    padding: list[int]
    dilation: list[int]
    groups: int


@st.composite
def conv_geometries(draw, max_side: int = 8) -> ConvGeometry:
    """A geometry with at least one output pixel; groups one, depthwise or two."""
    n, c_in, c_out = draw(st.integers(1, 2)), draw(st.integers(1, 8)), draw(st.integers(1, 8))
    h, w = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    kernel = draw(st.sampled_from([(1, 1), (3, 3), (2, 3)]))
    stride = draw(st.sampled_from([(1, 1), (2, 2), (2, 1)]))
    padding = draw(st.sampled_from([(0, 0), (1, 1), (0, 2)]))
    dilation = draw(st.sampled_from([(1, 1), (2, 2)]))
    grouping = draw(st.sampled_from(["one", "depthwise", "two"]))
    groups = {"one": 1, "depthwise": c_in, "two": 2}[grouping]
    if grouping == "depthwise":
        c_out = c_in
    elif grouping == "two":
        c_in, c_out = 2 * c_in, 2 * c_out
    assume(all(conv_output_size((h, w)[i], kernel[i], stride[i], padding[i], dilation[i]) >= 1 for i in range(2)))
    return ConvGeometry(n, c_in, c_out, h, w, kernel, list(stride), list(padding), list(dilation), groups)
