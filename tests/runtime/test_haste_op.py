"""Tests of torch.ops.fxslim.haste_conv2d: exact limits, oracle parity, recording, registration."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from fxslim.models.data import mnist_5k
from fxslim.models.resnet_cifar import pad_to_32, pretrained_mnist_resnet18_small
from fxslim.runtime import native_kernels
from fxslim.runtime.haste import haste_conv2d, make_planes, patch_shape, record_buckets, resolve_padding
from fxslim.runtime.haste_reference import haste_conv2d_reference, tile_buckets_reference, tile_patch_reference
from fxslim.runtime.haste_counts import expected_buckets

pytestmark = pytest.mark.usefixtures("one_thread")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _planes(kernel, stride, dilation, tile, L=14, sparsity=2 / 3, seed=0):
    th, tw = patch_shape(kernel, stride, dilation, tile)
    return make_planes(L, th * tw, sparsity, seed)


def _run(x, weight, bias, planes, stride, padding, dilation=(1, 1), tile=4, center=True, layer=""):
    return haste_conv2d(x, weight, bias, planes, list(stride), list(padding), list(dilation), tile, center, layer)


def _close(actual, expected, tol=1e-5):
    scale = expected.abs().max().clamp(min=1.0)
    assert (actual - expected).abs().max() <= tol * scale


# Sizes chosen so every edge tile keeps >= 2 valid outputs per axis: a 1-pixel edge tile of a 1x1
# conv hashes 1-dim vectors, which can only be told apart by their sign.
LIMIT_CASES = [  # (C, O, H, W, kernel, stride, padding, dilation)
    (8, 5, 11, 13, 3, 1, 1, 1),
    (8, 6, 11, 13, 3, 2, 1, 1),
    (8, 5, 11, 11, 1, 1, 0, 1),
    (8, 6, 13, 15, 1, 2, 0, 1),
    (6, 4, 12, 10, 3, 1, 2, 2),
    (7, 3, 9, 14, 3, 2, 0, 1),
]


@pytest.mark.parametrize("C,O,H,W,k,s,p,dl", LIMIT_CASES)
def test_haste_conv2d_all_singleton_buckets_equals_conv2d(C, O, H, W, k, s, p, dl):
    g = _gen(1)
    x, weight = torch.randn(2, C, H, W, generator=g), torch.randn(O, C, k, k, generator=g)
    bias = torch.randn(O, generator=g)
    planes = _planes((k, k), (s, s), (dl, dl), 4, L=48, sparsity=0.0)
    with record_buckets() as rec:
        y = _run(x, weight, bias, planes, (s, s), (p, p), (dl, dl), layer="conv")
    assert rec["conv"].buckets == C * rec["conv"].tiles  # every bucket a singleton
    _close(y, F.conv2d(x, weight, bias, s, p, dl))


@pytest.mark.parametrize("k,s,p", [(3, 1, 1), (3, 2, 1), (1, 1, 0)])
def test_haste_conv2d_duplicate_channels_merge_to_half_and_stay_exact(k, s, p):
    g = _gen(2)
    half = torch.randn(2, 6, 11, 11, generator=g)
    x = torch.cat([half, half], dim=1)[:, torch.randperm(12, generator=g)]
    weight, bias = torch.randn(5, 12, k, k, generator=g), torch.randn(5, generator=g)
    planes = _planes((k, k), (s, s), (1, 1), 4, L=48, sparsity=0.0)
    with record_buckets() as rec:
        y = _run(x, weight, bias, planes, (s, s), (p, p), layer="conv")
    assert rec["conv"].buckets == 6 * rec["conv"].tiles  # B = C/2 in every tile
    _close(y, F.conv2d(x, weight, bias, s, p))


def test_haste_conv2d_sample_alone_or_in_batch_same_output():
    g = _gen(3)
    x, weight = torch.randn(4, 16, 10, 10, generator=g).relu(), torch.randn(8, 16, 3, 3, generator=g)
    planes = _planes((3, 3), (1, 1), (1, 1), 4, L=6)
    batch = _run(x, weight, None, planes, (1, 1), (1, 1))
    for i in range(4):
        torch.testing.assert_close(_run(x[i : i + 1], weight, None, planes, (1, 1), (1, 1)), batch[i : i + 1])


def test_make_planes_same_seed_same_planes_other_seed_other_planes():
    a, b, c = make_planes(12, 36, seed=5), make_planes(12, 36, seed=5), make_planes(12, 36, seed=6)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert set(a.unique().tolist()) <= {-1.0, 0.0, 1.0}
    zeros = (make_planes(40, 1000, sparsity=2 / 3, seed=0) == 0).float().mean()
    assert abs(float(zeros) - 2 / 3) < 0.01


def test_haste_conv2d_same_seed_same_output_other_seed_other_output():
    g = _gen(4)
    x, weight = torch.randn(2, 16, 12, 12, generator=g).relu(), torch.randn(8, 16, 3, 3, generator=g)
    run = lambda seed: _run(x, weight, None, _planes((3, 3), (1, 1), (1, 1), 4, L=5, seed=seed), (1, 1), (1, 1))
    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))


@st.composite
def _cases(draw):
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    dh, dw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    ph, pw = draw(st.integers(0, 2)), draw(st.integers(0, 2))
    h = draw(st.integers(max(1, (kh - 1) * dh + 1 - 2 * ph), 11))
    w = draw(st.integers(max(1, (kw - 1) * dw + 1 - 2 * pw), 11))
    return dict(
        n=draw(st.integers(1, 2)), c=draw(st.integers(1, 7)), o=draw(st.integers(1, 4)), size=(h, w),
        kernel=(kh, kw), stride=(sh, sw), padding=(ph, pw), dilation=(dh, dw), tile=draw(st.integers(1, 5)),
        L=draw(st.integers(1, 10)), center=draw(st.booleans()), bias=draw(st.booleans()), seed=draw(st.integers(0, 99)),
    )


def test_haste_conv2d_channels_constant_over_a_patch_share_buckets_whatever_L():
    """The documented exception to the exact limit: centred, channels constant over a patch all point
    along ±(1, .., 1), and a sign hash gives them two codes however many planes it has."""
    x = torch.arange(1.0, 9.0).view(1, 8, 1, 1).expand(1, 8, 12, 12).contiguous()
    weight = torch.randn(4, 8, 3, 3, generator=_gen(4))
    with record_buckets() as rec:
        _run(x, weight, None, _planes((3, 3), (1, 1), (1, 1), 4, L=48, sparsity=0.0), (1, 1), (0, 0), layer="conv")
    assert rec["conv"].buckets == 2 * rec["conv"].tiles


@pytest.mark.parametrize("offset", [0.0, 10.0])
def test_haste_conv2d_channels_dominated_by_their_own_offset_share_buckets_at_large_L(offset):
    """The same exception, not only on flat regions: a constant per channel (a bias, a BN shift) much
    larger than the channel's variation over the patch leaves centred patches near ±(1, .., 1), so
    random inputs collide at L = 48 too (whole random-init models drift 0.02 to 0.6 at L = 53)."""
    x = torch.randn(1, 16, 32, 32, generator=_gen(5)) + offset * torch.randn(1, 16, 1, 1, generator=_gen(6))
    weight = torch.randn(16, 16, 3, 3, generator=_gen(7))
    planes = _planes((3, 3), (1, 1), (1, 1), 4, L=48, sparsity=0.0)
    with record_buckets() as rec:
        out = _run(x, weight, None, planes, (1, 1), (1, 1), layer="conv")
    dense = F.conv2d(x, weight, None, 1, 1)
    error = ((out - dense).abs().max() / dense.abs().max()).item()
    if offset == 0:
        assert rec["conv"].buckets == 16 * rec["conv"].tiles and error < 1e-5
    else:
        assert rec["conv"].buckets < 16 * rec["conv"].tiles and error > 1e-2


def _with_non_finite(x: torch.Tensor, value: float, all_channels: bool) -> torch.Tensor:
    """x with ``value`` at one pixel of sample 0: in channel 3 only, or in every channel (as after a conv)."""
    x = x.clone()
    x[0, slice(None) if all_channels else 3, 5, 6] = value
    return x


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("all_channels", [False, True])
def test_haste_conv2d_all_singleton_buckets_stay_exact_beside_a_non_finite_pixel(native, value, all_channels):
    """A NaN made the channel mean, so every code of its tile, the same: one bucket, and the finite
    outputs beside the NaN 1.3 off the dense conv at the exact limit; the dense conv's non-finite
    outputs stay where they are, and the other sample is untouched."""
    g = _gen(2)
    x, weight, bias = torch.randn(2, 16, 16, 16, generator=g), torch.randn(8, 16, 3, 3, generator=g), torch.randn(8)
    x = _with_non_finite(x, value, all_channels)
    planes = _planes((3, 3), (1, 1), (1, 1), 4, L=48, sparsity=0.0)
    with native_kernels.disabled() if not native else contextlib.nullcontext():
        y = _run(x, weight, bias, planes, (1, 1), (1, 1))
    expected = F.conv2d(x, weight, bias, 1, 1)
    finite = torch.isfinite(expected)
    assert 0 < int((~finite).sum()) and torch.equal(torch.isfinite(y), finite)
    assert torch.equal(y[~finite].nan_to_num(), expected[~finite].nan_to_num())  # the same NaN and signed inf
    _close(y[finite], expected[finite])


def test_haste_conv2d_hashes_a_non_finite_pixel_as_the_reference_does():
    g = _gen(3)
    x = (torch.randint(-3, 4, (2, 6, 9, 10), generator=g) * 6).float()
    x = _with_non_finite(x, float("nan"), all_channels=True)
    weight, planes = torch.randn(5, 6, 3, 3, generator=g), _planes((3, 3), (1, 1), (1, 1), 4, seed=3)
    y = _run(x, weight, None, planes, (1, 1), (1, 1))
    expected = haste_conv2d_reference(x, weight, None, planes, (1, 1), (1, 1), (1, 1), 4, True)
    assert torch.equal(torch.isfinite(y), torch.isfinite(expected))
    _close(y.nan_to_num(), expected.nan_to_num())


@settings(max_examples=40, deadline=None)
@given(_cases())
def test_haste_conv2d_vectorised_equals_reference(case):
    g = _gen(case["seed"])
    # Integer multiples of C: the channel means are exact, so hashing is exact in both
    # implementations and the buckets cannot differ by float rounding.
    x = (torch.randint(-3, 4, (case["n"], case["c"], *case["size"]), generator=g) * case["c"]).float()
    weight = torch.randn(case["o"], case["c"], *case["kernel"], generator=g)
    bias = torch.randn(case["o"], generator=g) if case["bias"] else None
    planes = _planes(case["kernel"], case["stride"], case["dilation"], case["tile"], L=case["L"], seed=case["seed"])
    geometry = (case["stride"], case["padding"], case["dilation"], case["tile"], case["center"])
    with record_buckets() as rec:
        y = _run(x, weight, bias, planes, *geometry, layer="conv")
    # a 1×1 output map runs the dense conv (the op's docstring), which the loop reference does not
    assume(y.shape[-2] * y.shape[-1] > 1)
    _close(y, haste_conv2d_reference(x, weight, bias, planes, *geometry))
    buckets = tile_buckets_reference(x, planes, case["kernel"], *geometry)
    assert rec["conv"].tiles == len(buckets)
    assert rec["conv"].buckets == sum(len(entry.members) for entry in buckets)
    pixels = [(e.rows[1] - e.rows[0]) * (e.cols[1] - e.cols[0]) for e in buckets]
    assert rec["conv"].pixels == sum(pixels)
    assert rec["conv"].bucket_pixels == sum(p * len(e.members) for p, e in zip(pixels, buckets))


def test_haste_conv2d_equals_dense_conv_on_bucket_mean_patches():
    g = _gen(5)
    c, k, s, p, dl = 12, 3, 2, 1, 1
    x = (torch.randint(-3, 4, (2, c, 13, 11), generator=g) * c).float().relu()
    weight, bias = torch.randn(6, c, k, k, generator=g), torch.randn(6, generator=g)
    planes = _planes((k, k), (s, s), (dl, dl), 3, L=4)
    y = _run(x, weight, bias, planes, (s, s), (p, p), (dl, dl), tile=3)
    merged_any = False
    for entry in tile_buckets_reference(x, planes, (k, k), (s, s), (p, p), (dl, dl), 3, True):
        padded = F.pad(x[entry.sample], (p, p, p, p))
        patch = tile_patch_reference(padded, entry.rows, entry.cols, (k, k), (s, s), (dl, dl))
        means = patch.clone()
        for members in entry.members:
            means[list(members)] = patch[list(members)].mean(dim=0)
            merged_any |= len(members) > 1
        expected = F.conv2d(means[None], weight, bias, s, 0, dl)[0]
        (r0, r1), (c0, c1) = entry.rows, entry.cols
        _close(y[entry.sample, :, r0:r1, c0:c1], expected)
    assert merged_any  # the identity was exercised on real merges, not only singletons


def test_haste_conv2d_without_centering_post_relu_channels_collide():
    # Post-ReLU-like maps: every channel is a gain times one shared non-negative map plus a little
    # noise. Uncentred, all channel vectors point the same way and share a code; centred, the
    # shared part cancels and the channels spread over many buckets.
    g = _gen(6)
    c = 32
    shared = 1 + torch.randn(2, 1, 16, 16, generator=g).abs()
    gains = 0.8 + 0.4 * torch.rand(1, c, 1, 1, generator=g)
    x = (gains * shared + 0.1 * torch.randn(2, c, 16, 16, generator=g)).relu()
    weight = torch.randn(8, c, 3, 3, generator=g)
    planes = _planes((3, 3), (1, 1), (1, 1), 4, L=14)
    dense = F.conv2d(x, weight, None, 1, 1)
    with record_buckets() as rec:
        centred = _run(x, weight, None, planes, (1, 1), (1, 1), center=True, layer="centred")
        uncentred = _run(x, weight, None, planes, (1, 1), (1, 1), center=False, layer="uncentred")
    assert rec["uncentred"].buckets / rec["uncentred"].tiles < 0.2 * c
    assert rec["centred"].buckets / rec["centred"].tiles > 0.8 * c
    error = lambda y: float((y - dense).norm() / dense.norm())
    assert error(uncentred) > 5 * error(centred)


class _HasteConv(torch.nn.Module):
    """A conv computed by the HASTE op (what the graph pass will emit), for model-level tests."""

    def __init__(self, conv: torch.nn.Conv2d, L: int, center: bool, seed: int):
        super().__init__()
        self.conv, self.center = conv, center
        self.register_buffer("planes", _planes(conv.kernel_size, conv.stride, conv.dilation, 4, L=L, seed=seed))

    def forward(self, x):
        c = self.conv
        return _run(x, c.weight, c.bias, self.planes, c.stride, c.padding, c.dilation, center=self.center)


def _with_haste(model: torch.nn.Module, L: int, center: bool) -> torch.nn.Module:
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d) and n != "conv1"]
    for seed, (name, conv) in enumerate(convs):  # every conv but the stem
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, _HasteConv(conv, L, center, seed))
    return model


@pytest.mark.slow
def test_haste_conv2d_pretrained_resnet_without_centering_accuracy_collapses():
    split = mnist_5k()
    x, y = pad_to_32(split.x_test[:64]), split.y_test[:64]
    accuracy = lambda model: float((model(x).argmax(1) == y).float().mean())
    with torch.no_grad():
        dense = accuracy(pretrained_mnist_resnet18_small())
        centred = accuracy(_with_haste(pretrained_mnist_resnet18_small(), L=10, center=True))
        uncentred = accuracy(_with_haste(pretrained_mnist_resnet18_small(), L=10, center=False))
    assert dense > 0.95 and centred > dense - 0.1
    assert uncentred < 0.5


def test_record_buckets_inactive_or_empty_layer_records_nothing():
    g = _gen(7)
    x, weight = torch.randn(1, 4, 8, 8, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    planes = _planes((3, 3), (1, 1), (1, 1), 4)
    _run(x, weight, None, planes, (1, 1), (1, 1), layer="outside")
    with record_buckets() as rec:
        _run(x, weight, None, planes, (1, 1), (1, 1), layer="")
    assert rec == {}
    with record_buckets() as rec:
        _run(x, weight, None, planes, (1, 1), (1, 1), layer="a")
        _run(x, weight, None, planes, (1, 1), (1, 1), layer="a")
    assert rec["a"].calls == 2 and rec["a"].samples == 2 and len(rec["a"].sample_buckets) == 2


def test_record_buckets_same_key_for_another_conv_raises():
    g = _gen(8)
    x = torch.randn(1, 4, 8, 8, generator=g)
    planes = _planes((3, 3), (1, 1), (1, 1), 4)
    with record_buckets(), pytest.raises(ValueError, match="layer key 'a'"):
        _run(x, torch.randn(2, 4, 3, 3), None, planes, (1, 1), (1, 1), layer="a")
        _run(x, torch.randn(3, 4, 3, 3), None, planes, (1, 1), (1, 1), layer="a")


def test_record_buckets_under_torch_compile_records_real_kernel():
    g = _gen(9)
    weight, bias = torch.randn(6, 8, 3, 3, generator=g), torch.randn(6, generator=g)
    planes = _planes((3, 3), (1, 1), (1, 1), 4, L=4)

    def block(x):
        return haste_conv2d(x, weight, bias, planes, [1, 1], [1, 1], [1, 1], 4, True, "block").relu()

    x = torch.randn(2, 8, 12, 12, generator=g).relu()
    torch._dynamo.reset()
    compiled = torch.compile(block, backend="inductor")
    with record_buckets() as compiled_rec:
        y = compiled(x)
    with record_buckets() as eager_rec:
        expected = block(x)
    torch.testing.assert_close(y, expected)
    assert compiled_rec["block"] == eager_rec["block"]


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("with_bias", [False, True])
def test_haste_conv2d_opcheck_passes(batch, with_bias):
    g = _gen(10)
    x, weight = torch.randn(batch, 5, 9, 7, generator=g), torch.randn(4, 5, 3, 3, generator=g)
    bias = torch.randn(4, generator=g) if with_bias else None
    planes = _planes((3, 3), (2, 2), (1, 1), 3, L=6)
    args = (x, weight, bias, planes, [2, 2], [1, 1], [1, 1], 3, True, "")
    torch.library.opcheck(torch.ops.fxslim.haste_conv2d.default, args)
    channels_last = x.contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.fxslim.haste_conv2d.default, (channels_last, *args[1:]))


def test_haste_conv2d_channels_last_input_gives_channels_last_output():
    g = _gen(11)
    x, weight = torch.randn(2, 6, 9, 9, generator=g), torch.randn(4, 6, 3, 3, generator=g)
    planes = _planes((3, 3), (1, 1), (1, 1), 4, L=6)
    y = _run(x, weight, None, planes, (1, 1), (1, 1))
    y_cl = _run(x.contiguous(memory_format=torch.channels_last), weight, None, planes, (1, 1), (1, 1))
    assert y.is_contiguous() and y_cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y_cl, y)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_haste_conv2d_other_dtypes_match_float32_computation(dtype):
    g = _gen(12)
    x = torch.randn(2, 6, 9, 9, generator=g).to(dtype)
    weight, bias = torch.randn(4, 6, 3, 3, generator=g).to(dtype), torch.randn(4, generator=g).to(dtype)
    planes = _planes((3, 3), (1, 1), (1, 1), 4, L=6)
    y = _run(x, weight, bias, planes, (1, 1), (1, 1))
    assert y.dtype == dtype
    expected = _run(x.float(), weight.float(), bias.float(), planes, (1, 1), (1, 1))
    tol = 1e-6 if dtype == torch.float64 else 1e-2
    _close(y.float(), expected, tol)


def test_haste_conv2d_weight_changed_in_place_uses_the_new_values():
    # The kernel keeps a transposed copy per weight tensor; an in-place change must not reuse it.
    g = _gen(13)
    x, weight = torch.randn(2, 6, 9, 9, generator=g), torch.randn(4, 6, 3, 3, generator=g)
    planes = _planes((3, 3), (1, 1), (1, 1), 4, L=6)
    before = _run(x, weight, None, planes, (1, 1), (1, 1))
    weight.mul_(2.0)
    _close(_run(x, weight, None, planes, (1, 1), (1, 1)), 2.0 * before)
    _close(_run(x, weight.clone(), None, planes, (1, 1), (1, 1)), 2.0 * before)


def test_haste_conv2d_weight_data_rebound_uses_the_new_values():
    # ``p.data = t`` (and ``module.double()``, which does that) keeps the Parameter and its version
    # counter: the kernel's transposed copy must not be reused for the new tensor.
    g = _gen(13)
    x, weight = torch.randn(2, 6, 9, 9, generator=g), torch.nn.Parameter(torch.randn(4, 6, 3, 3, generator=g))
    planes = _planes((3, 3), (1, 1), (1, 1), 4, L=6)
    with torch.no_grad():
        before = _run(x, weight, None, planes, (1, 1), (1, 1))
        weight.data = 2.0 * weight.data
        _close(_run(x, weight, None, planes, (1, 1), (1, 1)), 2.0 * before)
        weight.data = weight.data.double()  # was: "expected scalar type Double but found Float"
        y = _run(x.double(), weight, None, planes, (1, 1), (1, 1))
    assert y.dtype == torch.float64
    _close(y, 2.0 * before.double())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("x_dtype", [torch.float32, "autocast"])
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_haste_conv2d_under_autocast_runs_in_the_autocast_dtype(dtype, x_dtype, weight_dtype):
    # conv2d casts its floating inputs but float64 to the autocast dtype; the op took them as they came
    # (then only float32 ones), so in a rewritten model (x already cast by the ops before it, float32
    # or float16 weights) it raised "weight and bias must have x's dtype"
    g = _gen(15)
    x, weight = torch.randn(2, 6, 9, 9, generator=g), torch.randn(4, 6, 3, 3, generator=g).to(weight_dtype)
    bias = torch.randn(4, generator=g).to(weight_dtype)
    planes = _planes((3, 3), (1, 1), (1, 1), 4, L=6)
    expected = _run(x.to(dtype), weight.to(dtype), bias.to(dtype), planes, (1, 1), (1, 1))
    with torch.autocast("cpu", dtype=dtype):
        y = _run(x if x_dtype == torch.float32 else x.to(dtype), weight, bias, planes, (1, 1), (1, 1))
    assert y.dtype == dtype
    torch.testing.assert_close(y, expected, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_haste_conv2d_under_inference_mode_matches_grad_mode(dtype):
    g = _gen(14)
    x, weight = torch.randn(2, 6, 9, 9, generator=g).to(dtype), torch.randn(4, 6, 3, 3, generator=g).to(dtype)
    planes = _planes((3, 3), (1, 1), (1, 1), 4, L=6)
    expected = _run(x, weight, None, planes, (1, 1), (1, 1))
    with torch.inference_mode():
        inference_weight = weight.clone()  # an inference tensor: no version counter
        for w in (weight, inference_weight, inference_weight):
            torch.testing.assert_close(_run(x, w, None, planes, (1, 1), (1, 1)), expected)


def test_haste_conv2d_flop_count_is_the_cost_models_prediction():
    """FlopCounterMode and fxslim.estimate give the op one count: 2 x the reduced-conv MACs with the
    data-free expected buckets, below the dense conv's FLOPs."""
    x, weight = torch.randn(2, 6, 9, 9), torch.randn(4, 6, 3, 3)
    planes = _planes((3, 3), (2, 2), (1, 1), 4, L=6)
    with FlopCounterMode(display=False) as counter:
        _run(x, weight, None, planes, (2, 2), (1, 1))
    dense = 2 * (2 * 4 * 5 * 5) * 6 * 3 * 3  # 2 · (N·O·H_out·W_out) · C·k²
    expected_b = expected_buckets(6, 6)  # M·(1 − (1 − 1/M)^C), M = 2^6
    assert counter.get_total_flops() == round(dense * expected_b / 6)


@pytest.mark.parametrize(
    "change,argument",
    [
        (dict(weight=torch.randn(4, 3, 3, 3)), "weight"),  # groups=2 weight layout
        (dict(planes=torch.zeros(6, 35)), "planes"),
        (dict(planes=torch.zeros(54, 36)), "planes"),  # more bits than a code holds
        (dict(tile=0), "tile"),
        (dict(stride=[0, 1]), "stride"),
        (dict(bias=torch.zeros(5)), "bias"),
        # no output or no input channel: the kernel cut the weight into 0 blocks (ZeroDivisionError)
        (dict(weight=torch.randn(0, 6, 3, 3)), "weight"),
        (dict(x=torch.randn(1, 0, 9, 9), weight=torch.randn(4, 0, 3, 3)), "weight"),
    ],
)
def test_haste_conv2d_bad_argument_raises_value_error_naming_it(change, argument):
    args = dict(
        x=torch.randn(1, 6, 9, 9), weight=torch.randn(4, 6, 3, 3), bias=None,
        planes=_planes((3, 3), (1, 1), (1, 1), 4), stride=[1, 1], padding=[1, 1], dilation=[1, 1], tile=4,
    ) | change
    with pytest.raises(ValueError, match=argument):
        haste_conv2d(**args)


def test_haste_conv2d_integer_input_raises_type_error():
    with pytest.raises(TypeError, match="x must have dtype"):
        _run(torch.ones(1, 2, 5, 5, dtype=torch.int32), torch.ones(1, 2, 3, 3, dtype=torch.int32), None,
             _planes((3, 3), (1, 1), (1, 1), 4), (1, 1), (1, 1))


def test_resolve_padding_same_valid_and_numbers():
    assert resolve_padding("same", (3, 3)) == (1, 1)
    assert resolve_padding("same", (3, 1), (2, 1)) == (2, 0)
    assert resolve_padding("valid", (3, 3)) == (0, 0)
    assert resolve_padding(2, (3, 3)) == (2, 2)
    assert resolve_padding((1, 0), (3, 1)) == (1, 0)
    with pytest.raises(ValueError, match="odd effective kernel"):
        resolve_padding("same", (2, 2))
    with pytest.raises(ValueError, match="padding"):
        resolve_padding("full", (3, 3))


def test_haste_conv2d_survives_torch_export():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(6, 4, 3, padding=1)
            self.register_buffer("planes", _planes((3, 3), (1, 1), (1, 1), 4, L=6))

        def forward(self, x):
            return haste_conv2d(x, self.conv.weight, self.conv.bias, self.planes, [1, 1], [1, 1], [1, 1], 4, True, "b")

    block, x = Block().eval(), torch.randn(2, 6, 9, 9)
    exported = torch.export.export(block, (x,))
    targets = [node.target for node in exported.graph.nodes if node.op == "call_function"]
    assert torch.ops.fxslim.haste_conv2d.default in targets
    torch.testing.assert_close(exported.module()(x), block(x))
