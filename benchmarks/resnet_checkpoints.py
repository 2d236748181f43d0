"""Names of the full-width ResNet checkpoints that train_resnet_mnist writes and the HASTE benchmarks read.

Kept free of torch so ``run_all --list`` can tell which trainings are missing without importing it.
"""

from __future__ import annotations

__all__ = ["DEFAULT_WEIGHT_DECAY", "ZOO_WEIGHT_DECAY", "checkpoint_name", "weight_decay_flag"]

DEFAULT_WEIGHT_DECAY = 5e-4  # train_resnet_mnist's own recipe
ZOO_WEIGHT_DECAY = 0.01  # the decay the CIFAR-10 model zoo behind the HASTE paper's baselines trained with


def weight_decay_flag(weight_decay: float) -> str:
    """`` --weight-decay <value>`` for a command line, or nothing for the default decay."""
    return "" if weight_decay == DEFAULT_WEIGHT_DECAY else f" --weight-decay {weight_decay:g}"


def checkpoint_name(model: str, width: float, weight_decay: float = DEFAULT_WEIGHT_DECAY) -> str:
    """``<model>_w<width·100>[_wd<decay>]_mnist``; the decay is named only when it is not the default."""
    decay = "" if weight_decay == DEFAULT_WEIGHT_DECAY else f"_wd{weight_decay:g}"
    return f"{model}_w{round(width * 100):03d}{decay}_mnist"
