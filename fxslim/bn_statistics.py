"""Re-estimate BatchNorm running statistics of a (rewritten) model on a few unlabelled batches.

HASTE is data-free: the hashed model keeps the BN statistics the dense model was trained with,
although merging channels shifts the activations they normalise. With a few hundred unlabelled
images at hand (the budget a pruning baseline gets to re-estimate its own statistics),
``reestimate_bn_statistics(haste_model, batches)`` recomputes them for the hashed model. It is an
option, off unless called: nothing in ``fxslim.optimize`` reads data.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["reestimate_bn_statistics"]

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@torch.no_grad()
def reestimate_bn_statistics(model: nn.Module, batches: Iterable[Any]) -> nn.Module:
    """A copy of ``model`` (in eval mode) whose BatchNorm running mean and variance are the average,
    over ``batches`` (tensors or argument tuples), of each batch's statistics.

    Only the BN layers run in train mode (dropout and the rest stay in eval mode); the affine
    weights and every other parameter are unchanged, and so is ``model``. Raises ValueError when
    ``batches`` is empty or the model has no BatchNorm layer.
    """
    result = copy.deepcopy(model).eval()
    norms = [m for m in result.modules() if isinstance(m, _BATCH_NORMS) and m.track_running_stats]
    if not norms:
        raise ValueError(
            f"reestimate_bn_statistics: model must have BatchNorm layers that track running statistics, "
            f"found none in {type(model).__name__}"
        )
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over the batches
        norm.train()
    seen = 0
    for batch in batches:
        result(*batch) if isinstance(batch, (tuple, list)) else result(batch)
        seen += 1
    if seen == 0:
        raise ValueError("reestimate_bn_statistics: batches must hold at least one batch, got none")
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
    return result.eval()
