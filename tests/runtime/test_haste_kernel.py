"""fxslim.runtime.haste_kernel: bucketing, chunking and the whole-layer kernel against the loop oracle."""

from __future__ import annotations

import pytest
import torch

from fxslim.runtime import haste_kernel
from fxslim.runtime.haste import haste_conv2d, make_planes, patch_shape
from fxslim.runtime.haste_reference import haste_conv2d_reference


def test_tile_buckets_groups_equal_codes_and_sorts_tiles_by_count():
    codes = torch.tensor([[3.0, 1.0, 3.0, 2.0], [5.0, 5.0, 5.0, 5.0]])
    bk = haste_kernel.tile_buckets(codes)
    assert bk.order.tolist() == [1, 0]  # the one-bucket tile first
    assert bk.count.tolist() == [1, 3]
    # tile 0 (now row 1): codes 1 | 2 | 3 3 -> channels 1 | 3 | 0 2, buckets start at 0, 1, 2
    assert bk.channels[1, :2].tolist() == [1, 3] and sorted(bk.channels[1, 2:].tolist()) == [0, 2]
    assert bk.starts.tolist() == [[0, 4, 4], [0, 1, 2]]  # a missing bucket starts at C: empty
    assert bk.bucket_size.tolist() == [[4] * 4, [1, 1, 2, 2]]


def test_chunks_cover_the_tiles_once_within_the_budget(monkeypatch):
    monkeypatch.setattr(haste_kernel, "CHUNK_ELEMENTS", 100)
    count = [1, 2, 2, 3, 5, 40]
    chunks = haste_kernel._chunks(count, row=10)
    assert [(a, b) for a, b, _ in chunks] == [(0, 3), (3, 5), (5, 6)]  # 3·2·10, 2·5·10 <= 100
    assert all(pad == count[b - 1] for _, b, pad in chunks)  # padded to the chunk's largest count
    assert all((b - a) * pad * 10 <= 100 for a, b, pad in chunks[:-1])  # a lone tile may exceed it


@pytest.mark.parametrize("chunk, block", [(1 << 21, 1 << 20), (64, 64)])
def test_kernel_with_many_chunks_and_blocks_equals_reference(monkeypatch, chunk, block, one_thread):
    # Small budgets force one tile per chunk and output-channel blocks of 2: the paths big layers take.
    monkeypatch.setattr(haste_kernel, "CHUNK_ELEMENTS", chunk)
    monkeypatch.setattr(haste_kernel, "BLOCK_ELEMENTS", block)
    monkeypatch.setattr(haste_kernel, "GROUP_ELEMENTS", 64)  # one sample per group
    g = torch.Generator().manual_seed(3)
    x = (torch.randint(-3, 4, (3, 6, 10, 9), generator=g) * 6).float()  # exact channel means
    weight, bias = torch.randn(8, 6, 3, 3, generator=g), torch.randn(8, generator=g)
    th, tw = patch_shape((3, 3), (2, 1), (1, 1), 3)
    planes = make_planes(5, th * tw, 2 / 3, seed=4)
    y = haste_conv2d(x, weight.clone(), bias, planes, [2, 1], [1, 1], [1, 1], 3, True, "")
    expected = haste_conv2d_reference(x, weight, bias, planes, (2, 1), (1, 1), (1, 1), 3, True)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-4)


def test_kernel_float64_bucket_means_keep_float64_precision():
    # three equal channels merge into one bucket of size 3: a float32 1/3 would be off by ~1e-8
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 1, 5, 5, generator=g, dtype=torch.float64).repeat(1, 3, 1, 1) / 7
    weight = torch.randn(2, 3, 3, 3, generator=g, dtype=torch.float64)
    planes = make_planes(4, 36, 0.0, seed=1).double()
    y = haste_conv2d(x, weight, None, planes, [1, 1], [1, 1], [1, 1], 4, True, "")
    expected = haste_conv2d_reference(x, weight, None, planes, (1, 1), (1, 1), (1, 1), 4, True)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)


def test_kernel_filter_larger_than_a_block_cuts_one_output_channel_per_block(monkeypatch, one_thread):
    # C·k_h·k_w = 24 values per output channel over a budget of 16: ceil(48 / 16) = 3 blocks for 2
    # outputs, and the search for a divisor of O >= 3 never ended (with the real budget: any conv with
    # C·k_h·k_w > 2^20, e.g. O=1, C=1100, a 31×31 kernel, hung).
    monkeypatch.setattr(haste_kernel, "BLOCK_ELEMENTS", 16)
    g = torch.Generator().manual_seed(6)
    weight = torch.randn(2, 8, 3, 1, generator=g)
    assert haste_kernel.weight_rows(weight.clone()).shape == (2, 24, 1)
    x = (torch.randint(-3, 4, (2, 8, 7, 6), generator=g) * 8).float()  # exact channel means
    planes = make_planes(5, 24, 2 / 3, seed=2)  # patch 6×4
    y = haste_conv2d(x, weight, None, planes, [1, 1], [1, 0], [1, 1], 4, True, "")
    expected = haste_conv2d_reference(x, weight, None, planes, (1, 1), (1, 0), (1, 1), 4, True)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-4)
