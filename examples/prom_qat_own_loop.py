"""PROM quantization-aware training inside your own training loop.

    python examples/prom_qat_own_loop.py [--steps 150]

1. ``fxslim.prepare`` turns the trained float MobileNetMNIST into a fake-quantized QAT model
   (ternary 1×1 convs, 8-bit everything else, uint8 activations with EMA observers).
2. A plain PyTorch loop fine-tunes it: the optimizer updates the latent float weights, the ternary
   codes and scales are recomputed from them at every forward. Observers freeze for the last steps.
3. ``fxslim.convert`` produces the integer GraphModule of ``torch.ops.fxslim`` ops.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import fxslim
from fxslim.models.data import mnist_5k
from fxslim.models.mobilenet_mnist import load_mobilenet_mnist
from fxslim.runtime.prom_qat import freeze_observers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.01)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)

    split = mnist_5k()
    qat = fxslim.prepare(load_mobilenet_mnist(), split.x_train[:2])
    optimizer = torch.optim.SGD(qat.parameters(), lr=args.lr, momentum=0.9, nesterov=True)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.steps)
    qat.train()
    for step in range(args.steps):
        idx = torch.randint(0, len(split.x_train), (args.batch_size,))
        loss = F.cross_entropy(qat(split.x_train[idx]), split.y_train[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step == int(0.8 * args.steps):
            freeze_observers(qat)  # the activation grids stay fixed from here on
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}")

    int_model = fxslim.convert(qat)
    with torch.no_grad():
        fake_top1 = (qat.eval()(split.x_test).argmax(1) == split.y_test).float().mean().item()
        int_top1 = (int_model(split.x_test).argmax(1) == split.y_test).float().mean().item()
    print(f"fake-quant model top-1 {100 * fake_top1:.2f}%")
    print(f"integer model top-1 {100 * int_top1:.2f}% ({len(split.y_test)} test digits)")


if __name__ == "__main__":
    main()
