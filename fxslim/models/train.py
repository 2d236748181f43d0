"""A small supervised training loop for the reference models (float training and QAT alike).

Two ways to use it: ``fit(model, split, ...)`` runs whole epochs with a progress bar and returns a
per-epoch log; ``train_step(model, optimizer, x, y)`` is one step to call from your own loop (it is
what ``fit`` calls, so both behave the same, also under DistributedDataParallel).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fxslim.models.data import Split

__all__ = ["FitConfig", "EpochLog", "fit", "train_step", "evaluate", "predict"]

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FitConfig:
    """SGD (Nesterov) with a one-cycle schedule; small random shifts as augmentation."""

    epochs: int = 5
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    max_shift: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"FitConfig.{name}: expected an integer >= 1, got {getattr(self, name)!r}")
        if not self.lr > 0:
            raise ValueError(f"FitConfig.lr: expected a positive float, got {self.lr!r}")
        if self.max_shift < 0:
            raise ValueError(f"FitConfig.max_shift: expected an integer >= 0, got {self.max_shift!r}")


@dataclass(frozen=True)
class EpochLog:
    epoch: int
    loss: float
    train_acc: float
    test_acc: float
    seconds: float


def _shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Random translation by up to ``max_shift`` pixels (zero fill), one offset per batch."""
    if max_shift == 0:
        return x
    dy, dx = torch.randint(-max_shift, max_shift + 1, (2,), generator=generator).tolist()
    padded = F.pad(x, (max_shift, max_shift, max_shift, max_shift))
    h, w = x.shape[-2:]
    return padded[..., max_shift + dy : max_shift + dy + h, max_shift + dx : max_shift + dx + w]


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    label_smoothing: float = 0.0,
) -> tuple[float, int]:
    """One optimisation step; returns (loss, number of correct predictions in the batch)."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    logits = model(x)
    loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
    loss.backward()
    optimizer.step()
    return float(loss.detach()), int((logits.argmax(1) == y).sum())


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 250) -> torch.Tensor:
    """Logits for ``x`` in eval mode, computed in batches."""
    model.eval()
    return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 250) -> float:
    """Top-1 accuracy in percent."""
    return 100.0 * float((predict(model, x, batch_size).argmax(1) == y).float().mean())


def fit(
    model: nn.Module,
    split: Split,
    config: FitConfig = FitConfig(),
    *,
    progress: bool = True,
    description: str = "training",
) -> list[EpochLog]:
    """Train ``model`` in place on ``split``; returns one EpochLog per epoch."""
    from rich.progress import Progress

    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=config.momentum,
        weight_decay=config.weight_decay, nesterov=True,
    )
    steps_per_epoch = math.ceil(len(split.x_train) / config.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch
    )
    history: list[EpochLog] = []
    with Progress(transient=True, disable=not progress) as bar:
        task = bar.add_task(description, total=config.epochs * steps_per_epoch)
        for epoch in range(config.epochs):
            start = time.perf_counter()
            order = torch.randperm(len(split.x_train), generator=generator)
            total_loss, correct = 0.0, 0
            for i in range(0, len(order), config.batch_size):
                idx = order[i : i + config.batch_size]
                x = _shift(split.x_train[idx], config.max_shift, generator)
                loss, hits = train_step(model, optimizer, x, split.y_train[idx], config.label_smoothing)
                scheduler.step()
                total_loss += loss * len(idx)
                correct += hits
                bar.advance(task)
            entry = EpochLog(
                epoch=epoch + 1,
                loss=total_loss / len(order),
                train_acc=100.0 * correct / len(order),
                test_acc=evaluate(model, split.x_test, split.y_test),
                seconds=time.perf_counter() - start,
            )
            history.append(entry)
            _log.info("%s epoch %d: loss %.4f train %.2f%% test %.2f%% (%.1fs)", description,
                      entry.epoch, entry.loss, entry.train_acc, entry.test_acc, entry.seconds)
    return history
