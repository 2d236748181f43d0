"""PROM's integer MobileNetV2 against the int8 CPU stacks a user would pick instead, timed side by side.

    python -m benchmarks.prom_vs_peers [--batches 1 32] [--threads 1 2] [--rounds 30 8]

torchvision mobilenet_v2 (weights=None, BN statistics estimated on the six scikit-image photos,
``prom_common``), 224×224, under ``torch.no_grad``. Variants, all calibrated on the same photos:

- fp32 eager; fp32 ``torch.compile`` with freezing;
- PT2E int8: torchao's X86InductorQuantizer, ``convert_pt2e``, ``torch.compile`` with freezing;
- ONNX Runtime int8: static QDQ, u8 activations, s8 per-channel weights;
- OpenVINO int8: NNCF post-training quantization, f32 inference precision, latency mode;
- PROM integer: ``convert(qat, runtime="onednn")`` (fused u8 oneDNN convs), ``micro_batched``
  (which runs the graph lowered to direct calls, ``prom_lowered``, its convs as oneDNN primitives
  through oneDNN's C library when the ``onednn`` extra is installed, ``prom_direct``), eager and under
  ``torch.compile(backend="fxslim")`` (whose backend lowers it the same way); and eager with
  ``micro_batched(..., direct=False)``, its convs as ATen's quantized convs (faster at batch 32).
  PROM's model is post-training calibrated here, not QAT-trained: speed does not depend on the weights.

Each (batch, threads) runs in its own process (inductor bakes the thread count in; ORT and
OpenVINO set theirs at session creation); within it every round runs each variant once, in an
order shuffled per round (``fxslim.app.timing``: PROM compiled shares PROM eager's packed weights
and ran faster whenever it came right after it), and the table gives medians in ms and PROM's speed
relative to each peer (median over rounds of peer time / PROM time, > 1: PROM faster). Those are
single calls after other variants ran (cold caches). At batch 1 a second set of rounds times the
steady state: each variant's turn is one untimed call and the mean of ``STEADY_CALLS`` back to back,
as in a loop serving one request at a time. A last set of rounds times what ``torch.compile`` costs
per call by itself (``compile_floor``): an empty module, eager and compiled, each called right after
a PROM call has filled the caches with the model's data, beside PROM compiled minus PROM eager. A
peer that cannot be installed is skipped with its reason. Records go to
benchmarks/results/prom_vs_peers.json, the page prom_vs_peers.md is rendered from them; on a CPU
without VNNI/AMX int8 dot products (AVX2) to prom_vs_peers_avx2.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import torch
from torch import nn

from benchmarks import prom_peers
from benchmarks.command import command_line
from benchmarks.records import RESULTS, Results, Section, Table, cpu_name, write
from fxslim.app.timing import interleaved_samples, paired_ratio

__all__ = ["PEERS", "INT8_PEERS", "PROM_VARIANTS", "measure", "results", "results_name", "run", "main"]
PEERS = ("PT2E int8 + compile", "ONNX Runtime int8")  # the target: PROM >= 1.0x these at 1 thread
INT8_PEERS = (*PEERS, "OpenVINO + NNCF int8")  # every int8 stack timed beside PROM
PROM_VARIANTS = ("PROM integer", "PROM integer compiled", "PROM integer, ATen convs")
STEADY_CALLS = 10  # back-to-back calls per turn in the steady-state rounds (batch 1 only)
_PACKAGES = ("torch", "torchao", "onnx", "onnxscript", "onnxruntime", "openvino", "nncf", "onednn-cpu-gomp")


def _prom_models(model: nn.Module, images: torch.Tensor) -> tuple[nn.Module, nn.Module, nn.Module, nn.Module]:
    """(fake-quant model, integer model eager, integer model compiled, integer model eager on ATen's convs)."""
    from fxslim.api import prepare
    from fxslim.passes.prom import calibrate
    from fxslim.passes.prom_batching import micro_batched
    from fxslim.passes.prom_convert import convert

    qat = calibrate(prepare(model, (images[:1],)), [images])
    eager = micro_batched(convert(qat, runtime="onednn"))
    wrapper = type("PromCompiled", (nn.Module,), {"forward": lambda self, x: self.inner(x)})()
    wrapper.inner = eager
    return qat.eval(), eager, torch.compile(wrapper, backend="fxslim"), micro_batched(eager.module, direct=False)


def _variants(batch: int) -> tuple[dict[str, Callable[[], object]], dict[str, str], dict[str, torch.Tensor]]:
    """(name → one inference, name → reason skipped, name → the logits it should reproduce: fp32
    eager's, for PROM its fake-quant model's) for a batch of ``batch`` photos."""
    from benchmarks.prom_common import photo_batch, random_mobilenet_v2

    images = photo_batch()
    model = random_mobilenet_v2(images)
    x = images.repeat((batch + len(images) - 1) // len(images), 1, 1, 1)[:batch].contiguous()
    # calibration batches shaped like x (the ONNX/OpenVINO models have a static batch)
    calibration = list(images.split(1)) if batch == 1 else [x]
    fns: dict[str, Callable[[], object]] = {"fp32 eager": lambda: model(x)}
    skipped: dict[str, str] = {}
    builders = {"fp32 compile + freezing": prom_peers.fp32_compiled, "PT2E int8 + compile": prom_peers.pt2e_int8,
                "ONNX Runtime int8": prom_peers.ort_int8, "OpenVINO + NNCF int8": prom_peers.openvino_int8}
    for name, build in builders.items():
        try:
            fns[name] = build(model, x, calibration)
        except prom_peers.PeerUnavailable as error:
            skipped[name] = str(error)
    qat, eager, compiled, aten = _prom_models(model, images)
    fns.update(zip(PROM_VARIANTS, (lambda: eager(x), lambda: compiled(x), lambda: aten(x)), strict=True))
    fp32, fake_quant = model(x), qat(x)
    return fns, skipped, {name: fake_quant if name in PROM_VARIANTS else fp32 for name in fns}


def _relative_error(logits: torch.Tensor, reference: torch.Tensor) -> float:
    """‖logits − reference‖ / ‖reference‖ over the batch."""
    return float((logits.float() - reference).norm() / reference.norm())


class _Empty(nn.Module):
    """A user's module around a model that dynamo cannot trace into: its forward calls a disabled
    function, as a model wrapping PROM's runtime does (``MicroBatched`` runs it outside the graph)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _untraced(x)


@torch.compiler.disable
def _untraced(x: torch.Tensor) -> torch.Tensor:
    return x


def compile_floor(evict: Callable[[], object], x: torch.Tensor, rounds: int) -> dict[str, float]:
    """Median µs per call of ``_Empty`` eager and under ``torch.compile(backend="fxslim")``, each timed
    right after ``evict()`` (a model call: the caches then hold its data, as when a model runs): the
    time ``torch.compile``'s per-call machinery adds whatever the compiled model computes."""
    eager, compiled = _Empty(), torch.compile(_Empty(), backend="fxslim")
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for fn in (eager, compiled):
        fn(x)
    for _ in range(rounds):
        for name, fn in (("eager", eager), ("compiled", compiled)):
            evict()
            start = time.perf_counter()
            fn(x)
            times[name].append(time.perf_counter() - start)
    return {name: 1e6 * statistics.median(t) for name, t in times.items()}


def measure(batch: int, threads: int, rounds: int) -> dict:
    """Medians (ms), PROM's paired speed ratios and each model's relative logit error, for one configuration."""
    torch.set_num_threads(threads)
    load_before = os.getloadavg()[0]
    with torch.no_grad():
        fns, skipped, references = _variants(batch)
        errors = {name: _relative_error(prom_peers.logits(fn()), references[name]) for name, fn in fns.items()}
        samples = interleaved_samples(fns, rounds, shuffle=True)
        steady = interleaved_samples(fns, rounds, warm_up=False, shuffle=True, calls=STEADY_CALLS) if batch == 1 else None
        floor = compile_floor(fns["PROM integer"], torch.zeros(batch, 3, 224, 224), rounds)
    eager, compiled = samples["PROM integer"], samples["PROM integer compiled"]
    floor["PROM compiled - eager"] = 1e6 * statistics.median(c - e for c, e in zip(compiled, eager, strict=True))
    record = {"batch": batch, "threads": threads, "rounds": rounds, "skipped": skipped, **_summary(samples),
              "logit_error": errors, "load": [load_before, os.getloadavg()[0]], "compile_floor_us": floor}
    if steady is not None:
        record["steady"] = _summary(steady)
    return record


def _summary(samples: dict[str, list[float]]) -> dict:
    """Medians (ms) and PROM's paired speed ratios against every variant."""
    return {"median_ms": {name: 1e3 * statistics.median(t) for name, t in samples.items()},
            "ratio": {prom: {name: paired_ratio(samples[name], samples[prom]) for name in samples} for prom in PROM_VARIANTS}}


def _cpu() -> str:
    from fxslim.runtime.prom_onednn import _cpu_flags

    flags = sorted(_cpu_flags() & {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16"})
    return f"{cpu_name()}; flags {', '.join(flags)}"


def _prom_runtime() -> str:
    from fxslim.runtime import onednn_capi, prom_native

    if onednn_capi.available():
        convs = "its convs run as oneDNN primitives through oneDNN's C library (fxslim.runtime.prom_direct)"
    else:
        convs = f"its convs run as ATen's quantized convs ({onednn_capi.unavailable_reason()})"
    return f"{convs}; {prom_native.status()} (fxslim.runtime.prom_native)"


def _versions() -> str:
    found = []
    for package in _PACKAGES:
        try:
            found.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            found.append(f"{package} not installed")
    return ", ".join(found)


def results(records: list[dict], command: str) -> Results:
    """The records of one run (one per configuration, from ``measure``) as a results page."""
    configs = [f"batch {r['batch']}, {r['threads']} thr" for r in records]
    names = list(dict.fromkeys(n for r in records for n in (*r["median_ms"], *r["skipped"])))
    times = Table(["variant", *configs], [[name, *(r["median_ms"].get(name) for r in records)] for name in names]
                  + [["load average (1 min) before → after",
                      *(f"{r['load'][0]:.1f} → {r['load'][1]:.1f}" for r in records)]],
                  ["", *[".1f"] * len(configs)])
    sections = [Section(text=[
        f"{_cpu()}. {_versions()}. One process per (batch, threads); variants interleaved round by round, in an "
        f"order shuffled per round, one call each (caches cold after the other variants); medians in ms per batch ({', '.join(str(r['rounds']) for r in records)} rounds; - : skipped). PROM's "
        f"model is calibrated, not trained (speed does not depend on the weights); {_prom_runtime()}. The machine "
        "is shared: compare within a column."], table=times)]
    for prom in PROM_VARIANTS:
        rows = [[name, *(r["ratio"][prom].get(name) for r in records)] for name in names if name != prom]
        sections.append(Section(
            text=[f"{prom}: speed relative to each variant (median of per-round peer time / {prom} time; > 1: PROM "
                  "faster)"], table=Table(["vs", *configs], rows, ["", *[".2f}×"] * len(configs)])))
    steady = [r for r in records if "steady" in r]
    if steady:
        columns = [f"batch {r['batch']}, {r['threads']} thr" for r in steady]
        rows = [[name, *(r["steady"]["median_ms"].get(name) for r in steady),
                 *(r["steady"]["ratio"][prom].get(name) for prom in PROM_VARIANTS for r in steady)] for name in names]
        sections.append(Section(
            text=[f"Steady state: each turn one untimed call, then the mean of {STEADY_CALLS} calls back to back "
                  f"({', '.join(str(r['rounds']) for r in steady)} rounds, order shuffled per round); ms, and each "
                  "PROM variant's speed relative to the row (> 1: PROM faster):"],
            table=Table(["variant", *[f"ms, {c}" for c in columns],
                         *[f"{prom} vs row, {c}" for prom in PROM_VARIANTS for c in columns]], rows,
                        ["", *[".2f"] * len(columns), *[".2f}×"] * (len(PROM_VARIANTS) * len(columns))])))
    errors = [[name, *(r["logit_error"].get(name) for r in records)] for name in names]
    sections.append(Section(
        text=["Relative logit error ‖y − y_ref‖/‖y_ref‖ on the timed batch, a sanity check of each model: y_ref is "
              "fp32 eager's logits, for PROM its own fake-quant model's (PROM's ternary weights are a different model, "
              "made for QAT; its accuracy is in prom_accuracy.md):"],
        table=Table(["variant", *configs], errors, ["", *[".4f"] * len(configs)])))
    floors = [r for r in records if "compile_floor_us" in r]
    if floors:
        labels = {"eager": "empty module, eager", "compiled": "empty module, torch.compile",
                  "PROM compiled - eager": "PROM integer compiled − PROM integer (median of per-round differences)"}
        sections.append(Section(
            text=["What torch.compile costs per call by itself: µs per call of an empty module (its forward calls a "
                  "function dynamo does not trace, as PROM's runtime is called), eager and compiled, each timed "
                  "right after a PROM integer call; beside it, how much longer PROM integer compiled took than "
                  "PROM integer in the same rounds. Dynamo enters a compiled frame, checks its guards and leaves "
                  "it on every call, and after a model run those structures are no longer in cache:"],
            table=Table(["µs per call", *(f"batch {r['batch']}, {r['threads']} thr" for r in floors)],
                        [[label, *(r["compile_floor_us"][key] for r in floors)] for key, label in labels.items()],
                        ["", *[".0f"] * len(floors)])))
    sections.append(Section(text=["Target (issue 16): PROM integer ≥ 1.0× PT2E int8 + compile and ONNX Runtime int8 "
                                  "at batch 1 and 32, 1 thread; PROM integer compiled at least as fast as PROM "
                                  "integer."], after=_verdicts(records)))
    name, title = results_name()
    return Results(name, title, command, sections)


def results_name() -> tuple[str, str]:
    """(file stem, title) of this CPU's results: a CPU without VNNI/AMX int8 dot products (AVX2, where
    PROM sums its 8-bit dense layers in float) keeps a page of its own beside the VNNI one."""
    from fxslim.runtime.prom_onednn import vnni_available

    if vnni_available():
        return "prom_vs_peers", "PROM integer MobileNetV2 vs int8 CPU peers, 224×224"
    return "prom_vs_peers_avx2", "PROM integer MobileNetV2 vs int8 CPU peers, 224×224, on a CPU without VNNI (AVX2)"


def _verdicts(records: list[dict]) -> list[str]:
    lines = []
    for r in records:
        if r["threads"] != 1:
            continue
        for peer in (*PEERS, INT8_PEERS[-1]):
            if peer in r["skipped"]:
                lines.append(f"- batch {r['batch']}: {peer} skipped ({r['skipped'][peer]})")
                continue
            for label, summary in (("single calls", r), ("steady state", r.get("steady"))):
                if summary is None:
                    continue
                best = max(summary["ratio"][p][peer] for p in PROM_VARIANTS)
                verdict = ("met" if best >= 1.0 else "NOT met") if peer in PEERS else "stretch, not a target"
                lines.append(f"- batch {r['batch']} vs {peer}, {label}: best PROM variant {best:.3f}× — {verdict}")
        for label, summary in (("single calls", r), ("steady state", r.get("steady"))):
            if summary is not None:
                ratio = summary["ratio"]["PROM integer compiled"]["PROM integer"]
                lines.append(f"- batch {r['batch']}, PROM integer compiled vs PROM integer, {label}: {ratio:.3f}× — "
                             f"{'met' if ratio >= 1.0 else 'NOT met'} (issue 16: compiled at least as fast as eager)")
    for r in records:
        lines += [f"- skipped at batch {r['batch']}, {r['threads']} thr: {name}: {why}" for name, why in r["skipped"].items()]
    return lines


def run(args: argparse.Namespace, command: str) -> Results:
    """Every (batch, threads) configuration in a child process of its own, then the results page."""
    records = []
    for i, batch in enumerate(args.batches):
        rounds = args.rounds[min(i, len(args.rounds) - 1)]
        for threads in args.threads:
            child = [sys.executable, "-m", "benchmarks.prom_vs_peers", "--one", str(batch), str(threads), str(rounds)]
            done = subprocess.run(child, check=True, capture_output=True, text=True)
            records.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"batch {batch}, {threads} thr: " + ", ".join(f"{k} {v:.1f} ms" for k, v in records[-1]["median_ms"].items()),
                  flush=True)
    torch.set_num_threads(min(args.threads))  # the environment line names the thread count the table used
    return results(records, command)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, nargs="+", default=[30, 8], help="per batch size, in order (last repeats)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory of prom_vs_peers.json / .md")
    parser.add_argument("--one", type=int, nargs=3, metavar=("BATCH", "THREADS", "ROUNDS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:  # child process: one configuration, JSON on the last line of stdout
        print(json.dumps(measure(*args.one)))
        return 0
    page = write(run(args, command_line("benchmarks.prom_vs_peers", argv)), directory=args.out)
    print(page.read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
