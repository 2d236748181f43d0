"""HASTE's native tile kernel (native/haste_tiles.c) against the ATen path and the loop oracle."""

from __future__ import annotations

import ctypes
import shutil
import subprocess

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxslim.runtime import haste_kernel, haste_native, native_kernels
from fxslim.runtime.haste import haste_conv2d, make_planes, patch_shape
from fxslim.runtime.haste_reference import haste_conv2d_reference

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(haste_native._kernel() is None, reason=haste_native.status())]


def _both(x, weight, bias, planes, stride, padding, dilation, tile):
    args = (x, weight, bias, planes, list(stride), list(padding), list(dilation), tile, True, "")
    native = haste_conv2d(*args)
    with native_kernels.disabled():
        aten = haste_conv2d(*args)
    return native, aten


@settings(max_examples=30, deadline=None)
@given(c=st.integers(1, 40), o=st.integers(1, 70), k=st.sampled_from([1, 2, 3, 5]), stride=st.integers(1, 2),
       dilation=st.integers(1, 2), tile=st.integers(1, 5), size=st.integers(3, 13), bias=st.booleans(),
       L=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_native_kernel_equals_the_aten_path(c, o, k, stride, dilation, tile, size, bias, L, seed):
    # output channels past a whole vector of 32, tiles of 1..25 pixels (pixel groups of 8 and their tails)
    g = torch.Generator().manual_seed(seed)
    padding = (k - 1) * dilation // 2
    if size + 2 * padding < (k - 1) * dilation + 1:
        return
    x = torch.randn(2, c, size, size + 1, generator=g)
    weight = torch.randn(o, c, k, k, generator=g)
    b = torch.randn(o, generator=g) if bias else None
    th, tw = patch_shape((k, k), (stride, stride), (dilation, dilation), tile)
    planes = make_planes(L, th * tw, 2 / 3, seed=seed % 5)
    native, aten = _both(x, weight, b, planes, (stride, stride), (padding, padding), (dilation, dilation), tile)
    scale = float(aten.abs().max()) if aten.numel() else 1.0
    torch.testing.assert_close(native, aten, rtol=1e-5, atol=1e-5 * max(scale, 1.0))


def test_native_kernel_with_output_channel_blocks_equals_the_reference(monkeypatch):
    # filters larger than a block: the weight rows come in several blocks of output channels
    monkeypatch.setattr(haste_kernel, "BLOCK_ELEMENTS", 64)
    g = torch.Generator().manual_seed(3)
    x = (torch.randint(-3, 4, (2, 6, 10, 9), generator=g) * 6).float()
    weight, bias = torch.randn(40, 6, 3, 3, generator=g), torch.randn(40, generator=g)
    th, tw = patch_shape((3, 3), (1, 1), (1, 1), 4)
    planes = make_planes(5, th * tw, 2 / 3, seed=4)
    y = haste_conv2d(x, weight.clone(), bias, planes, [1, 1], [1, 1], [1, 1], 4, True, "")
    assert haste_kernel.weight_rows(weight).shape[0] > 1
    expected = haste_conv2d_reference(x, weight, bias, planes, (1, 1), (1, 1), (1, 1), 4, True)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-4)


def test_native_kernel_all_singleton_buckets_is_the_dense_conv():
    # as many planes as it takes for every channel of every tile to get its own code
    g = torch.Generator().manual_seed(6)
    x = torch.randn(1, 5, 8, 8, generator=g)
    weight, bias = torch.randn(33, 5, 3, 3, generator=g), torch.randn(33, generator=g)
    planes = make_planes(40, 36, 0.0, seed=2)
    y = haste_conv2d(x, weight, bias, planes, [1, 1], [1, 1], [1, 1], 4, True, "")
    torch.testing.assert_close(y, torch.nn.functional.conv2d(x, weight, bias, padding=1), rtol=1e-5, atol=1e-5)


def test_native_kernel_is_skipped_for_float64(monkeypatch):
    # float64 keeps its own precision on the ATen path: it never reaches the tile kernel
    calls = []
    real = haste_native.tile_convs
    monkeypatch.setattr(haste_native, "tile_convs", lambda *a: calls.append(real(*a)) or calls[-1])
    x, weight = torch.randn(1, 3, 6, 6, dtype=torch.float64), torch.randn(4, 3, 3, 3, dtype=torch.float64)
    haste_conv2d(x, weight, None, make_planes(4, 36).double(), [1, 1], [1, 1], [1, 1], 4, True, "")
    haste_conv2d(x.float(), weight.float(), None, make_planes(4, 36), [1, 1], [1, 1], [1, 1], 4, True, "")
    assert calls == [True]


def test_portable_c_path_equals_the_avx512_path(tmp_path):
    # the plain C loops (compilers not targeting AVX-512) against the vector code on one layer
    source = native_kernels._SOURCES / "haste_tiles.c"
    portable = tmp_path / "portable.so"
    subprocess.run([shutil.which("cc") or "cc", "-O2", "-march=x86-64", "-fPIC", "-shared", "-std=c11", "-o",
                    str(portable), str(source)], check=True)
    fn = ctypes.CDLL(str(portable)).haste_tile_convs
    fn.restype, fn.argtypes = haste_native._kernel().restype, haste_native._kernel().argtypes
    g = torch.Generator().manual_seed(7)
    x, weight, bias = torch.randn(2, 7, 9, 9, generator=g), torch.randn(37, 7, 3, 3, generator=g), torch.randn(37)
    planes = make_planes(3, 36, 2 / 3, seed=1)
    expected = haste_conv2d(x, weight, bias, planes, [1, 1], [1, 1], [1, 1], 4, True, "")
    with pytest.MonkeyPatch.context() as m:
        m.setattr(haste_native, "_kernel", lambda: fn)
        portable_out = haste_conv2d(x, weight, bias, planes, [1, 1], [1, 1], [1, 1], 4, True, "")
    torch.testing.assert_close(portable_out, expected, rtol=1e-5, atol=1e-5)


def test_native_kernel_gives_the_same_outputs_on_two_threads():
    # tiles are independent: OpenMP's split of them changes no value
    g = torch.Generator().manual_seed(8)
    x, weight = torch.randn(3, 16, 20, 20, generator=g), torch.randn(40, 16, 3, 3, generator=g)
    planes = make_planes(6, 36, 2 / 3, seed=2)
    one = haste_conv2d(x, weight, None, planes, [1, 1], [1, 1], [1, 1], 4, True, "")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        two = haste_conv2d(x, weight, None, planes, [1, 1], [1, 1], [1, 1], 4, True, "")
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


@pytest.mark.parametrize("dtype, planes", [(torch.float32, 12), (torch.float64, 30), (torch.float64, 50)])
def test_native_buckets_equal_tile_buckets(dtype, planes):
    # the same buckets per tile as the ATen path (whose tiles come sorted by count); codes past
    # 2^44 take the comparison sort
    g = torch.Generator().manual_seed(10)
    codes = torch.randint(0, 2**min(planes, 62), (37, 45), generator=g).to(dtype)
    codes[:, 20:30] = codes[:, :10]  # equal codes: buckets of several channels
    channels, starts, count = haste_native.buckets(codes)
    bk = haste_kernel.tile_buckets(codes)
    back = torch.argsort(bk.order)
    assert torch.equal(count, bk.count[back])
    assert torch.equal(starts, bk.starts[back][:, : starts.shape[1]])
    assert torch.equal(codes.gather(1, channels), codes.gather(1, bk.channels[back]))
    assert bool((channels.sort(dim=1).values == torch.arange(45)).all())  # a permutation per tile


@settings(max_examples=25, deadline=None)
@given(c=st.integers(1, 5), k=st.sampled_from([1, 2, 3]), stride=st.integers(1, 3), dilation=st.integers(1, 2),
       padding=st.integers(0, 2), tile=st.integers(1, 5), h=st.integers(1, 12), w=st.integers(1, 12),
       layout=st.sampled_from(["contiguous", "channels_last", "strided"]))
def test_native_patches_equal_the_canvas_path(c, k, stride, dilation, padding, tile, h, w, layout):
    if h + 2 * padding < (k - 1) * dilation + 1 or w + 2 * padding < (k - 1) * dilation + 1:
        return
    x = torch.randn(2, c, h, 2 * w)[..., ::2] if layout == "strided" else torch.randn(2, c, h, w)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    geometry = ((k, k), (stride, stride), (padding, padding), (dilation, dilation))
    h_out = (h + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    w_out = (w + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    grid = (-(-h_out // tile), -(-w_out // tile))
    native = haste_kernel.patches(x, *geometry, tile, grid).clone()
    with native_kernels.disabled():
        aten = haste_kernel.patches(x, *geometry, tile, grid)
    assert torch.equal(native, aten)


def test_native_output_in_the_input_layout_with_cropped_edge_tiles():
    # 7x9 outputs: edge tiles of 3 rows and 1 column are cropped; channels_last in, channels_last out
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 6, 7, 9, generator=g).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(5, 6, 3, 3, generator=g), torch.randn(5, generator=g)
    planes = make_planes(5, 36, 2 / 3, seed=3)
    y = haste_conv2d(x, weight, bias, planes, [1, 1], [1, 1], [1, 1], 4, True, "")
    assert y.is_contiguous(memory_format=torch.channels_last) and y.shape == (2, 5, 7, 9)
    expected = haste_conv2d_reference(x, weight, bias, planes, (1, 1), (1, 1), (1, 1), 4, True)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("size", [(1, 1), (2, 3), (7, 9), (8, 8), (12, 5)])
@pytest.mark.parametrize("blocked", [False, True])
def test_native_kernel_writes_every_output_pixel_into_any_layout(size, blocked, monkeypatch):
    # the tile kernel writes the output map itself: whole 4x4 tiles transposed into NCHW, an edge tile's
    # pixels inside the output only (one of 16 on a 1x1 output), channels_last a pixel at a time, a
    # view's strides as given; 70 channels are a pass of 64 and one of 6, or several weight blocks
    if blocked:
        monkeypatch.setattr(haste_kernel, "BLOCK_ELEMENTS", 64)
    g = torch.Generator().manual_seed(12)
    x = torch.randn(2, 7, *size, generator=g)
    weight, bias = torch.randn(70, 7, 3, 3, generator=g), torch.randn(70, generator=g)
    tile, planes = 4, make_planes(4, 36, 2 / 3, seed=5)
    grid = (-(-size[0] // tile), -(-size[1] // tile))
    geometry = ((3, 3), (1, 1), (1, 1), (1, 1), tile, grid, size)
    rows, codes = haste_kernel.patches_and_codes(x, planes, True, *geometry[:4], tile, grid)
    channels, starts, count = haste_native.buckets(codes)
    w_rows = haste_kernel.weight_rows(weight)
    assert (w_rows.shape[0] > 1) == blocked
    maps = []
    for layout in (torch.contiguous_format, torch.channels_last):
        out = torch.full((2, 70, *size), float("nan")).contiguous(memory_format=layout)
        assert haste_native.tile_convs(rows, channels, starts, count, w_rows, bias, geometry, out)
        maps.append(out)
    wide = torch.full((2, 75, *size), float("nan"))
    assert haste_native.tile_convs(rows, channels, starts, count, w_rows, bias, geometry, wide[:, 5:])
    assert not maps[0].isnan().any() and torch.equal(maps[0], maps[1]) and torch.equal(maps[0], wide[:, 5:])
    assert bool(wide[:, :5].isnan().all())
    aten = torch.empty_like(maps[0])
    with native_kernels.disabled():  # the kernel's ATen path (the op runs a 1x1 output map as a dense conv)
        haste_kernel.haste_conv2d_into(x, weight, bias, planes, (1, 1), (1, 1), (1, 1), tile, True, aten)
    torch.testing.assert_close(maps[0], aten, rtol=1e-5, atol=1e-4)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 2), c=st.integers(1, 70), size=st.integers(3, 11), k=st.sampled_from([1, 3]),
       stride=st.integers(1, 2), tile=st.integers(1, 5), L=st.integers(1, 40), center=st.booleans(),
       integers=st.booleans(), seed=st.integers(0, 2**16))
def test_native_codes_equal_the_aten_path_away_from_ties(n, c, size, k, stride, tile, L, center, integers, seed):
    # 8-window blocks and their tails, codes past 24 planes in float64; integer inputs make exact
    # zeros after centring (bit 0 on both paths)
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-3, 4, (n, c, size, size), generator=g).float() if integers else torch.randn(n, c, size, size, generator=g)
    geometry = ((k, k), (stride, stride), (k // 2, k // 2), (1, 1))
    out = (size + 2 * (k // 2) - k) // stride + 1
    grid = (-(-out // tile), -(-out // tile))
    planes = make_planes(L, patch_shape((k, k), (stride, stride), (1, 1), tile)[0] ** 2, 2 / 3, seed=seed % 7)
    rows, native = (t.clone() for t in haste_kernel.patches_and_codes(x, planes, center, *geometry, tile, grid))
    with native_kernels.disabled():
        aten_rows, aten = haste_kernel.patches_and_codes(x, planes, center, *geometry, tile, grid)
    assert torch.equal(rows, aten_rows)
    tiles = rows.shape[0] // c
    assert native.dtype == aten.dtype == (torch.float32 if L <= 24 else torch.float64) and native.shape == (tiles, c)
    # float64 truth: a channel whose centred projection lies within float32 rounding of 0 may go either way
    proj = (rows.double() @ planes.double().t()).view(tiles, c, L)
    if center:
        proj = proj - proj.mean(dim=1, keepdim=True)
    scale = rows.abs().amax().double() * planes.shape[1]
    clear = torch.ones(tiles, c, dtype=torch.bool) if integers else (proj.abs() > 1e-5 * scale).all(dim=2)
    assert torch.equal(native[clear], aten[clear])
