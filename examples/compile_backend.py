"""``torch.compile(model, backend="fxslim")``: the passes run inside torch.compile.

A torchvision ResNet18 (``weights=None``: random weights, nothing downloaded) is compiled with
``backend="fxslim"`` and ``options={"passes": [...], "inner": ..., "on_report": graphs.append}``.
Dynamo hands each graph to fxslim, which runs the passes on it and passes the result on to the
inner compiler (``aot_eager`` here, which compiles fast; ``inductor`` is the default). The script
prints what the backend rewrote (``on_report`` gets each graph's pass reports) and compares the
compiled model's outputs with eager.

Run: ``python examples/compile_backend.py [--inner inductor] [--passes haste:L=14]`` (well under
a minute with aot_eager; inductor takes longer to compile).
"""

from __future__ import annotations

import argparse
import time

import torch
import torchvision

import fxslim.backend


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", nargs="+", default=["haste:L=14"], help="pass specs, e.g. haste:L=14")
    parser.add_argument("--inner", choices=("aot_eager", "inductor", "eager"), default="aot_eager")
    parser.add_argument("--size", type=int, default=112, help="input height and width")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(2, 3, args.size, args.size)

    graphs: list = []  # one list of PassReports per graph dynamo hands the backend
    compiled = torch.compile(model, backend="fxslim",
                             options={"passes": args.passes, "inner": args.inner, "on_report": graphs.append})
    start = time.perf_counter()
    with torch.no_grad():
        out = compiled(x)  # the first call captures, rewrites and compiles
    print(f"compiled with passes {args.passes}, inner {args.inner!r}: first call {time.perf_counter() - start:.1f} s")

    for i, reports in enumerate(graphs):
        for report in reports:
            print(f"graph {i}, pass {report.pass_name}: {report.rewritten} rewritten, skipped {dict(report.skipped)}")
            names = [e.fqn or e.node for e in report.entries if e.status == "rewritten"]
            if names:
                print(f"  rewritten: {', '.join(names[:4])}{', ...' if len(names) > 4 else ''}")
    if not any(r.rewritten for reports in graphs for r in reports):
        raise SystemExit("the fxslim backend rewrote nothing")

    with torch.no_grad():
        ref = model(x)
    relative = float((out - ref).norm() / ref.norm())
    same = int((out.argmax(1) == ref.argmax(1)).sum())
    print(f"compiled vs eager: relative difference {relative:.3f}, same top-1 class {same}/{len(x)}")
    print("  (HASTE approximates by design: it merges channels that hash alike, so outputs move; more "
          "hyperplanes (haste:L=48,sparsity=0) merge fewer, though channels with the same sign pattern still "
          "share a bucket (docs/methods/HASTE.md). Random weights make the change look large; on a trained "
          "model see examples/haste_resnet.py)")


if __name__ == "__main__":
    main()
