"""The HASTE pass: what it rewrites and skips (with reasons), the exact limit in every IR, the
centring ablation on the trained small ResNet18, idempotence, configs, planes and report info."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxslim
import fxslim.backend
from fxslim.capture import capture
from fxslim.models.data import mnist_5k
from fxslim.models.resnet_cifar import pad_to_32, pretrained_mnist_resnet18_small, resnet18
from fxslim.passes.base import PassContext
from fxslim.passes.haste import HASTE
from fxslim.runtime.haste import make_planes, record_buckets

pytestmark = pytest.mark.usefixtures("one_thread")
_OP = torch.ops.fxslim.haste_conv2d.default


def _haste_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == _OP]


def _optimize(model, x, passes, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "rewrote nothing" warnings of the negative cases
        return fxslim.optimize(model, (x,), passes=passes, **kwargs)


class _Net(nn.Module):
    """stem 3×3 -> 3×3 -> 3×3 stride 2 (+ 1×1 stride 2 shortcut) -> 1×1 on an odd input; leaky ReLUs
    keep every channel's patch non-zero, so with many dense planes every bucket is a singleton."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 12, 3, padding=1, bias=False)
        self.b = nn.Conv2d(12, 16, 3, stride=2, padding=1)
        self.short = nn.Conv2d(8, 16, 1, stride=2)
        self.c = nn.Conv2d(16, 10, 1)
        self.act = nn.LeakyReLU(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.conv1(x))
        y = self.act(self.b(self.act(self.a(x))) + self.short(x))
        return self.c(y).mean((2, 3))


def _net_and_input() -> tuple[nn.Module, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    model = _Net().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model, torch.randn(2, 3, 23, 23, generator=g)


def _all_singletons(rec) -> bool:
    return bool(rec) and all(s.buckets == s.channels * s.tiles for s in rec.values())


# ----------------------------------------------------------------------------------------------
# What is rewritten


def test_haste_resnet18_rewrites_every_conv_but_the_stem():
    model, x = resnet18(in_channels=3, width=0.125).eval(), torch.randn(1, 3, 16, 16)
    res = _optimize(model, x, ["haste:L=12"])
    assert res.report.rewritten("haste") == 19  # 16 block convs + 3 downsample 1×1 convs
    assert res.report.skipped("haste") == {"stem": 1}
    assert len(_haste_nodes(res.module)) == 19
    entry = next(e for e in res.report.entries("haste") if e.fqn == "layer2.0.conv1")
    assert entry.info["layer"] == "layer2.0.conv1" and entry.info["L"] == 12 and entry.info["tile"] == 4
    assert entry.info["patch"] == (9, 9) and entry.info["d"] == 81  # t = (T−1)·σ + k = 3·2 + 3
    assert 0 < entry.info["predicted_macs"] <= entry.info["dense_macs"] == 16 * 8 * 9 * 8 * 8
    assert entry.info["predicted_ops"] == entry.info["predicted_macs"] + entry.info["predicted_overhead"]
    buffers = dict(res.module.named_buffers())
    assert buffers["layer2.0.conv1.haste_planes"].shape == (12, 81)  # persistent, next to the weight
    assert "layer2.0.conv1.haste_planes" in res.module.state_dict()


class _ImageIn(nn.Module):
    """The image arrives in a container: a dict, or a tuple of it and another tensor."""

    def __init__(self, container: str) -> None:
        super().__init__()
        self.container = container
        self.stem, self.conv = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, inputs):
        image = inputs["image"] if self.container == "dict" else inputs[0]
        return self.conv(self.stem(image))


@pytest.mark.parametrize("container", ["dict", "tuple"])
def test_haste_skips_the_stem_when_the_image_comes_in_a_container(container):
    """skip_stem knew the image only as a tensor input: given as {"image": x} or (x, mask), the stem
    was rewritten, 11 % off on a photo where skipping it leaves the conv that follows."""
    x = torch.randn(2, 3, 16, 16)
    inputs = {"image": x} if container == "dict" else (x, torch.ones(2, 1, 16, 16))
    res = _optimize(_ImageIn(container).eval(), inputs, ["haste:L=12"])
    assert res.report.skipped("haste") == {"stem": 1} and res.report.rewritten("haste") == 1
    assert [e.fqn for e in res.report.entries("haste") if e.status == "rewritten"] == ["conv"]


class _Preprocessing(nn.Module):
    """A deployment wrapper: a data-dependent check (the root stays eager), then [N, H, W, 3] uint8
    to [N, 3, 24, 24] floats, or a flip test-time augmentation; the backbone is traced apart."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.backbone = _ImageIn("tuple")

    def forward(self, image):
        if image.float().mean() > 254:
            raise ValueError("blank image")
        if self.how == "resize":
            x = F.interpolate(image.permute(0, 3, 1, 2).float() / 255, size=(24, 24), mode="bilinear")
        else:
            x = torch.cat([image, image.flip(-1)])
        return self.backbone((x,))


@pytest.mark.parametrize("capture", ["symbolic", "export"])
@pytest.mark.parametrize("how", ["resize", "flip"])
def test_haste_skips_the_stem_of_a_backbone_the_eager_root_feeds_another_shape(how, capture):
    # the image of a part traced apart was known only by the example's full shape: after a resize,
    # a transpose or a doubled batch the stem was rewritten
    torch.manual_seed(0)
    image = torch.randint(0, 256, (1, 20, 30, 3), dtype=torch.uint8) if how == "resize" else torch.rand(1, 3, 16, 16)
    res = _optimize(_Preprocessing(how).eval(), image, ["haste:L=12"], capture=capture)
    assert res.report.untraced
    assert {e.fqn: e.reason for e in res.report.entries("haste")}["backbone.stem"] == "stem"


class _FlowUpdate(nn.Module):
    """RAFT-like: an eager loop feeds a 2-channel flow to an update block traced apart."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = _ImageIn("tuple")
        self.update = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 2, 3, padding=1))

    def forward(self, image):
        features = self.encoder((image,))
        flow = torch.zeros(image.shape[0], 2, *image.shape[2:])
        for _ in range(2):
            flow = flow + self.update(flow + features[:, :2])
            if flow.abs().max() > 1e6:  # a data-dependent stop: the root stays eager
                break
        return flow


def test_haste_rewrites_a_few_channel_input_that_is_no_image():
    res = _optimize(_FlowUpdate().eval(), torch.rand(1, 3, 16, 16), ["haste:L=12"])
    assert res.report.untraced
    reasons = {e.fqn: e.reason for e in res.report.entries("haste")}
    assert reasons == {"encoder.stem": "stem", "encoder.conv": "", "update.0": "", "update.2": ""}


def test_haste_planes_come_from_seed_plus_layer_index_in_every_ir():
    model, x = _net_and_input()
    symbolic = _optimize(model, x, ["haste:L=9,seed=5"]).module
    exported = _optimize(model, x, ["haste:L=9,seed=5"], capture="export").module
    # layers in execution order: conv1 (the stem, index 0), a, b, short, c
    for index, name in [(1, "a"), (2, "b"), (3, "short"), (4, "c")]:
        planes = symbolic.get_buffer(f"{name}.haste_planes")
        assert torch.equal(planes, make_planes(9, planes.shape[1], 2 / 3, 5 + index))
        assert torch.equal(exported.get_buffer(f"{name}.haste_planes"), planes)
    other = _optimize(model, x, ["haste:L=9,seed=6"]).module
    assert not torch.equal(other.get_buffer("a.haste_planes"), symbolic.get_buffer("a.haste_planes"))


def test_haste_conv_module_called_twice_is_one_layer_with_one_planes_buffer():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.conv = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1)

        def forward(self, x):
            return self.conv(torch.relu(self.conv(self.stem(x))))

    model, x = Twice().eval(), torch.randn(1, 3, 12, 12)
    res = _optimize(model, x, ["haste:L=6"])
    assert res.report.rewritten("haste") == 2
    assert [n for n, _ in res.module.named_buffers()] == ["conv.haste_planes"]
    with torch.no_grad(), record_buckets() as rec:
        res.module(x)
    assert list(rec) == ["conv"] and rec["conv"].calls == 2


def test_haste_weight_shared_at_other_dilations_gets_a_record_key_per_geometry():
    # One weight at dilations 1, 2, 3 (TridentNet's branches): three patch sizes, three planes. Under one
    # record_buckets key the second call raised "layer key 'conv' was recorded for another conv".
    class Trident(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.conv = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x):
            x = torch.relu(self.stem(x))
            return sum(F.conv2d(x, self.conv.weight, self.conv.bias, 1, d, d) for d in (1, 2, 3, 1))

    model, x = Trident().eval(), torch.randn(2, 3, 12, 12)
    res = _optimize(model, x, ["haste:L=48,sparsity=0"])
    layers = [e.info["layer"] for e in res.report.entries("haste") if e.info]
    assert layers == ["conv", "conv#1", "conv#2", "conv"]  # the same geometry keeps its key
    with torch.no_grad(), record_buckets() as rec:
        y = res.module(x)
    assert sorted(rec) == ["conv", "conv#1", "conv#2"] and rec["conv"].calls == 2
    assert [rec[k].patch for k in ("conv", "conv#1", "conv#2")] == [(6, 6), (8, 8), (10, 10)]
    torch.testing.assert_close(y, model(x).detach(), rtol=1e-5, atol=1e-5)


def test_haste_skip_stem_false_and_overrides_per_module():
    model, x = resnet18(in_channels=3, width=0.125).eval(), torch.randn(1, 3, 16, 16)
    res = _optimize(model, x, [HASTE(L=12, skip_stem=False)], overrides={"layer4.*": HASTE(L=20)})
    assert res.report.rewritten("haste") == 20 and not res.report.skipped("haste")
    by_fqn = {e.fqn: e.info for e in res.report.entries("haste")}
    assert by_fqn["conv1"]["L"] == 12 and by_fqn["layer4.1.conv2"]["L"] == 20


# ----------------------------------------------------------------------------------------------
# What is skipped, with reasons


class _Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.conv = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, groups=8)

    def forward(self, x):
        return self.conv(self.stem(x))


class _Transposed(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.conv = nn.Conv2d(3, 8, 3, padding=1), nn.ConvTranspose2d(8, 4, 2, stride=2)

    def forward(self, x):
        return self.conv(self.stem(x))


class _Reflect(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.conv = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect")

    def forward(self, x):
        return self.conv(self.stem(x))


class _EvenSame(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.conv = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 2, padding="same")

    def forward(self, x):
        return self.conv(self.stem(x))


class _Unbatched(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.conv = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return self.conv(self.stem(x)[0])


class _Complex(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, dtype=torch.complex64)
        self.conv = nn.Conv2d(8, 8, 3, padding=1, dtype=torch.complex64)

    def forward(self, x):
        return self.conv(self.stem(x))


@pytest.mark.parametrize(
    "build,dtype,passes,filter_fn,reason",
    [
        (_Grouped, torch.float32, "haste", None, "grouped"),
        (_Transposed, torch.float32, "haste", None, "transposed"),
        (_Reflect, torch.float32, "haste", None, "padding_mode"),
        (_EvenSame, torch.float32, "haste", None, "asymmetric_padding"),
        (_Unbatched, torch.float32, "haste", None, "unbatched_input"),
        (_Complex, torch.complex64, "haste", None, "unsupported_dtype"),
        (_Grouped, torch.float32, "haste:skip_stem=true", None, "stem"),
        (resnet18, torch.float32, "haste:include_pointwise=false", None, "pointwise_excluded"),
        (_Reflect, torch.float32, "haste:skip_stem=false", lambda node, fqn: fqn != "stem", "filtered_out"),
    ],
)
def test_haste_skips_with_reason(build, dtype, passes, filter_fn, reason):
    model = build().eval()
    x = torch.randn(1, 3, 16, 16, dtype=dtype)
    res = _optimize(model, x, [passes], filter_fn=filter_fn)
    assert res.report.skipped("haste")[reason] >= 1
    skipped = [e for e in res.report.entries("haste") if e.reason == reason]
    expected = {"stem": "stem", "filtered_out": "stem", "pointwise_excluded": "layer2.0.downsample.0"}.get(reason, "conv")
    assert expected in [e.fqn for e in skipped]
    if reason == "pointwise_excluded":
        assert res.report.skipped("haste")[reason] == 3 and res.report.rewritten("haste") == 16


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_haste_cuda_conv_skipped_unsupported_device():
    model = _Grouped().cuda().eval()
    res = _optimize(model, torch.randn(1, 3, 16, 16, device="cuda"), ["haste:skip_stem=false"])
    assert res.report.skipped("haste")["unsupported_device"] == 1


def test_haste_second_run_changes_nothing():
    model, x = _net_and_input()
    captured = capture(model, (x,))
    gm = captured.graphs[0].gm
    ctx = PassContext(ir="module", batch_size=2)
    first = HASTE(L=8)(gm, ctx)
    code = gm.code
    second = HASTE(L=8)(gm, ctx)
    assert first.modified and first.report.rewritten == 4
    assert not second.modified and second.report.rewritten == 0
    assert second.report.skipped == {"already_rewritten": 4, "stem": 1}
    assert gm.code == code


# ----------------------------------------------------------------------------------------------
# Exact limit: all-singleton buckets reproduce the dense model


@pytest.mark.parametrize("capture_method", ["symbolic", "export"])
def test_haste_all_singleton_buckets_equal_dense_model(capture_method):
    model, x = _net_and_input()
    res = _optimize(model, x, ["haste:L=48,sparsity=0"], capture=capture_method)
    assert res.report.rewritten("haste") == 4
    with torch.no_grad(), record_buckets() as rec:
        y = res.module(x)
    assert _all_singletons(rec) and sorted(rec) == ["a", "b", "c", "short"]
    torch.testing.assert_close(y, model(x).detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("capture_method", ["symbolic", "export"])
def test_haste_conv_feeding_conv_directly_reads_the_rewritten_input(capture_method):
    # conv -> conv with nothing between: the second conv's input is the first conv's node, which the
    # first rewrite replaces (DPT heads do this); the second rewrite must read the replacement
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.LeakyReLU(0.2), nn.Conv2d(8, 12, 3, padding=1),
                          nn.Conv2d(12, 6, 3, stride=2, padding=1)).eval()
    x = torch.randn(2, 3, 13, 13)
    res = _optimize(model, x, ["haste:L=48,sparsity=0"], capture=capture_method)
    assert res.report.rewritten("haste") == 2
    with torch.no_grad():
        torch.testing.assert_close(res.module(x), model(x), rtol=1e-5, atol=1e-5)


def test_haste_rewritten_model_runs_under_autocast_like_the_model():
    model, x = _net_and_input()
    res = _optimize(model, x, ["haste:L=48,sparsity=0"])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y, expected = res.module(x), model(x)
    assert y.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), expected.float(), rtol=0.05, atol=0.05)


@pytest.mark.slow
def test_haste_torch_compile_backend_all_singletons_equal_dense_model():
    model, x = _net_and_input()
    seen: list = []
    compiled = torch.compile(model, backend="fxslim",
                             options={"on_report": seen.append, "passes": ["haste:L=48,sparsity=0"]})
    with torch.no_grad(), record_buckets() as rec:
        y = compiled(x)
        expected = model(x)
    (reports,) = seen
    assert reports[0].rewritten == 4 and reports[0].skipped == {"stem": 1}
    assert _all_singletons(rec) and sorted(rec) == ["a", "b", "c", "short"]
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_haste_torch_compile_backend_matches_optimize_at_small_L():
    model, x = _net_and_input()
    eager = _optimize(model, x, ["haste:L=4"]).module
    compiled = torch.compile(model, backend="fxslim", options={"passes": ["haste:L=4"], "inner": "aot_eager"})
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x))


def test_haste_rewritten_op_passes_opcheck():
    model, x = _net_and_input()
    gm = _optimize(model, x, ["haste:L=6"]).module
    interp = torch.fx.Interpreter(gm, garbage_collect_values=False)
    with torch.no_grad():
        interp.run(x)
    node = next(n for n in _haste_nodes(gm) if n.args[-1] == "b")  # 3×3, stride 2, with bias
    args = torch.fx.node.map_arg(node.args, lambda n: interp.env[n].detach())  # inference-only op: no autograd
    torch.library.opcheck(_OP, args)


# ----------------------------------------------------------------------------------------------
# Model unchanged, configs


def test_haste_never_modifies_the_users_model():
    model, x = _net_and_input()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = model(x).detach()
    res = _optimize(model, x, ["haste:L=6"])
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert not any("haste" in name for name, _ in model.named_buffers())
    assert type(model.a) is nn.Conv2d and len(_haste_nodes(res.module)) == 4
    torch.testing.assert_close(model(x).detach(), before, rtol=0, atol=0)
    # the result owns its weights, in the caller's layout: views and contiguous-only savers work
    weight = res.module.get_parameter("a.weight")
    assert weight.data_ptr() != model.a.weight.data_ptr() and torch.equal(weight, model.a.weight)
    assert all(w.stride() == model.get_parameter(n).stride() for n, w in res.module.named_parameters())


@pytest.mark.parametrize(
    "spec,match",
    [
        ("haste:L=0", r"HASTE\.L: expected 1 <= L <= 53, got 0"),
        ("haste:L=54", r"HASTE\.L: expected 1 <= L <= 53, got 54"),
        ("haste:L=1.5", r"HASTE\.L: expected an integer"),
        ("haste:sparsity=1", r"HASTE\.sparsity: expected 0.0 <= sparsity < 1.0, got 1.0"),
        ("haste:tile=0", r"HASTE\.tile: expected 1 <= tile"),
        ("haste:seed=-1", r"HASTE\.seed: expected 0 <= seed"),
        ("haste:center=maybe", r"HASTE\.center: expected true/false"),
        ("haste:planes=3", r"HASTE: unknown option 'planes'; allowed: L, center, include_pointwise"),
    ],
)
def test_haste_bad_string_config_raises_value_error_naming_the_field(spec, match):
    with pytest.raises(ValueError, match=match):
        fxslim.parse_pass(spec)


def test_haste_string_config_round_trips():
    cfg = fxslim.parse_pass("haste:l=12,s=1/2,tile=2,seed=3,skip_stem=false,include_pointwise=no,center=off")
    assert cfg == HASTE(L=12, sparsity=0.5, tile=2, seed=3, skip_stem=False, include_pointwise=False, center=False)
    assert fxslim.parse_pass(cfg.to_string()) == cfg
    assert HASTE.from_dict(cfg.to_dict()) == cfg
    assert fxslim.HASTE is HASTE and fxslim.parse_pass("haste") == HASTE()


# ----------------------------------------------------------------------------------------------
# Centring


@pytest.mark.slow
def test_haste_pass_without_centering_pretrained_resnet_accuracy_collapses():
    split = mnist_5k()
    x, y = pad_to_32(split.x_test[:32]), split.y_test[:32]
    model = pretrained_mnist_resnet18_small()
    accuracy = lambda m: float((m(x).argmax(1) == y).float().mean())
    with torch.no_grad():
        dense = accuracy(model)
        centred = accuracy(_optimize(model, x[:1], [HASTE(L=10)]).module)
        uncentred = accuracy(_optimize(model, x[:1], [HASTE(L=10, center=False)]).module)
    assert dense > 0.95 and centred > dense - 0.1
    assert uncentred < 0.5


class _PartsBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.c2(torch.relu(self.c1(x)))


class _PartsBackbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.block = nn.Conv2d(3, 16, 3, padding=1), _PartsBlock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(torch.relu(self.stem(x)))


class _PartsNet(nn.Module):
    """Traced in parts (an assert in the root): the backbone sees the image, the second block does not."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone, self.head_block = _PartsBackbone(), _PartsBlock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.backbone(x)
        assert y.shape[1] == 16
        return self.head_block(y).mean((2, 3))


def test_haste_in_parts_skips_only_the_conv_that_sees_the_image():
    """A part's own input counted as the image: the first conv of every block traced apart was
    skipped as the stem. Now a part's input is the image only with the example's shape."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = fxslim.optimize(_PartsNet().eval(), torch.randn(2, 3, 16, 16), passes=["haste:L=8"])
    status = {e.fqn: (e.status, e.reason) for e in result.report.entries("haste")}
    assert result.report.graphs == ["backbone", "head_block"]
    assert status["backbone.stem"] == ("skipped", "stem")
    assert all(status[f"{p}.{c}"] == ("rewritten", "") for p in ("backbone.block", "head_block") for c in ("c1", "c2"))


class _MultiView(nn.Module):
    """A multi-view model: [B, S, 3, H, W] folded into the batch before an embedding traced apart (a
    data-dependent check keeps the root eager), and a head traced apart on [B, S, P, C] tokens, whose
    dim 1 (S = 3 views) is not an image's channel count."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.ReLU(), nn.Conv2d(8, 8, 1))
        self.head = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 3, 1))

    def forward(self, clip):
        if clip.mean() > 1e6:
            raise ValueError("overexposed")
        b, s = clip.shape[:2]
        tokens = self.embed(clip.flatten(0, 1)).flatten(2).transpose(1, 2).reshape(b, s, -1, 8)
        return self.head(tokens)


def test_haste_skips_the_stem_of_a_multi_view_model_that_folds_the_views_into_the_batch():
    # the image was known only as a 4-d example: the patch embedding of a [B, S, 3, H, W] clip was rewritten
    torch.manual_seed(0)
    res = _optimize(_MultiView().eval(), torch.rand(1, 3, 3, 16, 16), ["haste:L=12"])
    assert res.report.untraced
    reasons = {e.fqn: (e.status, e.reason) for e in res.report.entries("haste")}
    assert reasons["embed.0"] == ("skipped", "stem")
    assert reasons["head.0"][0] == "rewritten"  # tokens [B, S=3, P, C]: not an image
