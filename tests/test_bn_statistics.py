"""fxslim.reestimate_bn_statistics: BN running statistics of a copy, re-estimated on unlabelled batches."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxslim
from fxslim.models.resnet_cifar import pretrained_mnist_resnet18_small


def _conv_bn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.ReLU()).eval()


def test_reestimate_bn_statistics_equal_the_batch_statistics_and_leave_the_model_alone():
    model = _conv_bn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(8, 3, 6, 6) * 3 + 1
    result = fxslim.reestimate_bn_statistics(model, [x[:4], x[4:]])
    features = model[0](x).detach()  # [8, 4, 4, 4]
    first, second = features[:4], features[4:]
    # momentum None: the plain average of the two batches' means and unbiased variances
    mean = (first.mean(dim=(0, 2, 3)) + second.mean(dim=(0, 2, 3))) / 2
    var = (first.var(dim=(0, 2, 3)) + second.var(dim=(0, 2, 3))) / 2
    torch.testing.assert_close(result[1].running_mean, mean)
    torch.testing.assert_close(result[1].running_var, var)
    assert not result.training and result[1].momentum == model[1].momentum
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # never in place
    torch.testing.assert_close(result[1].weight, model[1].weight)


def test_reestimate_bn_statistics_keeps_dropout_in_eval_mode():
    x = torch.randn(4, 3, 6, 6)
    result = fxslim.reestimate_bn_statistics(_conv_bn(), [x])
    torch.testing.assert_close(result(x), result(x))  # dropout off: deterministic


def test_reestimate_bn_statistics_of_a_haste_model_changes_its_statistics_only():
    model = pretrained_mnist_resnet18_small()
    x = torch.randn(6, 1, 32, 32)
    haste = fxslim.optimize(model, x[:1], passes=[fxslim.HASTE(L=8)]).module
    result = fxslim.reestimate_bn_statistics(haste, [x[:3], (x[3:],)])
    stats = {k for k in haste.state_dict() if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    changed = {k for k, v in result.state_dict().items() if not torch.equal(v, haste.state_dict()[k])}
    assert changed and changed <= stats


@pytest.mark.parametrize("model, batches, match", [
    (_conv_bn(), [], "batches must hold at least one batch"),
    (nn.Sequential(nn.Conv2d(3, 4, 3)), [torch.randn(1, 3, 6, 6)], "must have BatchNorm layers"),
])
def test_reestimate_bn_statistics_bad_argument_raises_value_error(model, batches, match):
    with pytest.raises(ValueError, match=match):
        fxslim.reestimate_bn_statistics(model, batches)
