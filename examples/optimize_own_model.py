"""``fxslim.optimize`` on your own model: what each pass rewrote or skipped, and what it saves.

A small user-defined network (a 3x3 stem, 3x3 and 1x1 convs, a depthwise conv, a linear
classifier) with random weights goes through ``fxslim.optimize(model, x, passes=[...])``. The
script prints every report line (rewritten, or skipped with its reason), the predicted cost
before and after (``result.cost_before`` / ``result.cost_after``, per module with
``fxslim.compare``), how close the rewritten model's outputs stay, and checks that the caller's
model was left untouched.

Run: ``python examples/optimize_own_model.py [--passes haste:L=8]`` (a few seconds).
"""

from __future__ import annotations

import argparse
import warnings

import torch
from torch import nn

import fxslim


class SmallNet(nn.Module):
    """Stem, two 3x3 + 1x1 blocks (one with a depthwise conv), global pool, linear."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.block1 = nn.Sequential(
            nn.Conv2d(32, 64, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
            nn.Conv2d(64, 64, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
        )
        self.block2 = nn.Sequential(
            nn.Conv2d(64, 64, 3, padding=1, groups=64, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
            nn.Conv2d(64, 128, 1, bias=False), nn.BatchNorm2d(128), nn.ReLU(),
        )
        self.head = nn.Linear(128, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.block1(self.stem(x)))
        return self.head(x.mean((2, 3)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", nargs="+", default=["haste:L=8"],
                        help="pass specs, e.g. haste:L=14 (fewer bits L: more channels merged) or prom")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = SmallNet().eval()
    x = torch.randn(2, 3, 64, 64)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    with warnings.catch_warnings():  # a pass that rewrites nothing warns; the report below says why
        warnings.simplefilter("ignore")
        result = fxslim.optimize(model, x, passes=args.passes)

    print(f"passes {args.passes}: {result.report.rewritten()} rewritten, skipped {dict(result.report.skipped())}")
    for entry in result.report.entries():
        why = f" ({entry.reason}{': ' + entry.detail if entry.detail else ''})" if entry.status == "skipped" else ""
        print(f"  {entry.fqn or entry.node:<12} {entry.kind:<16} {entry.status}{why}")

    before, after = result.cost_before.total, result.cost_after.total
    print(f"MACs   {before.macs:,} -> {after.macs:,}")
    print(f"energy {before.energy_uj:.3f} uJ -> {after.energy_uj:.3f} uJ (45 nm table, each op at its own precision)")
    comparison = fxslim.compare(result.cost_before, result.cost_after)
    print("per module (MACs before -> after):")
    for row in comparison.rows:
        if row.before.macs or row.after.macs:
            print(f"  {row.fqn:<12} {row.before.macs:>12,} -> {row.after.macs:>12,}")
    print(f"whole model: {comparison.ratio('macs'):.2f}x fewer MACs, {comparison.ratio('energy_pj'):.2f}x less energy")

    with torch.no_grad():
        ref, out = model(x), result.module(x)
    print(f"outputs: relative difference {float((out - ref).norm() / ref.norm()):.3f}, "
          f"same argmax {int((out.argmax(1) == ref.argmax(1)).sum())}/{len(x)}")
    unchanged = all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    unchanged = unchanged and all(type(m).__module__.startswith("torch.nn") for m in model.modules() if m is not model)
    print(f"your model unchanged: {unchanged}")
    if not unchanged:
        raise SystemExit("fxslim.optimize modified the caller's model")


if __name__ == "__main__":
    main()
