"""``fxslim demo``: each pass on its reference model, end to end, with every number measured at run time.

1. PROM: the MNIST MobileNetV2-style checkpoint -> ``fxslim.prepare`` -> a short QAT -> ``fxslim.convert``:
   top-1 of the float and the integer model on MNIST-5k test digits.
2. HASTE: the MNIST ResNet18 (width 0.25) checkpoint -> ``fxslim.optimize(HASTE(L))``: top-1 dense vs
   HASTE; the HASTE convs are costed from the bucket counts recorded on those digits.
3. HTTM: the VGGT architecture at a small size (random weights) on a simulated camera sequence over
   a photo -> ``fxslim.optimize(HTTM())``: cosine and relative error of the depth map vs dense.

For each part: cost-model MACs, energy and storage before and after, and wall-clock latency (median
of interleaved repeats, dense and optimized side by side, fixed thread count). ``run_demo`` returns
the results; ``write_report`` writes ``index.html`` (plots inlined), the PNGs and ``summary.json``;
``demo_command`` is what ``fxslim demo`` runs.
"""

from __future__ import annotations

import contextlib
import functools
import html
import json
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

import fxslim
from fxslim.cost_model.format import comparison_html_body, html_image, html_page, html_table, human
from fxslim.app.timing import interleaved_medians
from fxslim.cost_model.plots import plot_comparison, png_bytes
from fxslim.models.data import mnist_5k
from fxslim.models.mobilenet_mnist import load_mobilenet_mnist
from fxslim.models.multiview import camera_sequence
from fxslim.models.resnet_cifar import pad_to_32, pretrained_mnist_resnet18_small
from fxslim.models.train import train_step
from fxslim.models.vggt import vggt_small
from fxslim.runtime.haste import record_buckets
from fxslim.runtime.haste_counts import HasteBuckets
from fxslim.runtime.prom_onednn import onednn_available
from fxslim.runtime.prom_qat import freeze_observers

__all__ = ["PARTS", "DemoSizes", "FULL", "QUICK", "PartResult", "run_demo", "SUMMARY_HEADER", "summary_rows",
           "summary_table", "relative_figure", "write_report", "results_markdown", "demo_command"]

PARTS = ("prom", "haste", "httm")
# On the bundled checkpoint L=12 keeps top-1 within about half a point of dense with about a fifth fewer
# conv MACs; L=10 and 11 save a few points more MACs but lose one to three points of top-1.
HASTE_L = 12
_METRICS = (("macs", "MACs"), ("energy_pj", "energy (pJ)"), ("storage_bytes", "storage (bytes)"),
            ("latency_ms", "latency (ms)"))


@dataclass(frozen=True)
class DemoSizes:
    """How much work each part does: test digits, QAT steps and batch, camera frames and image side,
    latency batch (digits) and repeats."""

    digits: int
    qat_steps: int
    qat_batch: int
    frames: int
    image_size: int
    latency_batch: int
    repeats: int


FULL = DemoSizes(digits=1000, qat_steps=100, qat_batch=64, frames=8, image_size=224, latency_batch=32, repeats=3)
QUICK = DemoSizes(digits=100, qat_steps=4, qat_batch=16, frames=2, image_size=56, latency_batch=16, repeats=2)


@dataclass
class PartResult:
    """One part of the demo: quality before/after, cost and latency before/after, and what was done."""

    part: str
    model: str
    change: str
    quality_name: str
    quality_before: float
    quality_after: float
    before: dict[str, float]
    after: dict[str, float]
    notes: list[str] = field(default_factory=list)
    comparison: Any = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "comparison"}


# ----------------------------------------------------------------------------------------------
# Progress and timing


class _Steps:
    """Rich progress bars, one task per step; ``step(description, total)`` yields an advance function."""

    def __init__(self, progress: Any) -> None:
        self._progress = progress

    @contextlib.contextmanager
    def step(self, description: str, total: int | None = None) -> Iterator[Callable[[int], None]]:
        if not self._progress.console.is_terminal:  # rich draws no bars into a pipe: say it plainly
            print(f"fxslim demo: {description} ...", file=sys.stderr, flush=True)
        task = self._progress.add_task(description, total=total)
        start = time.perf_counter()
        yield lambda n=1: self._progress.advance(task, n)
        self._progress.update(task, total=total or 1, completed=total or 1,
                              description=f"{description} ({time.perf_counter() - start:.1f} s)")


def _median_latency_ms(dense: Callable[[], Any], fast: Callable[[], Any], repeats: int,
                       advance: Callable[[int], None], warm_up: bool = True) -> tuple[float, float]:
    """Median wall time (ms) of each callable, run alternately ``repeats`` times (after one warm-up
    call each unless both already ran)."""
    with torch.no_grad():
        medians = interleaved_medians({"dense": dense, "fast": fast}, repeats, warm_up=warm_up,
                                      after_round=lambda: advance(1))
    return 1e3 * medians["dense"], 1e3 * medians["fast"]


def _top1(model: nn.Module, x: torch.Tensor, y: torch.Tensor, advance: Callable[[int], None],
          batch: int = 100) -> float:
    """Top-1 (%) in eval mode, ``advance`` called once per batch."""
    model.eval()
    hits = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            hits += int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum())
            advance(1)
    return 100.0 * hits / len(x)


def _batches(n: int, batch: int = 100) -> int:
    return math.ceil(n / batch)


@functools.lru_cache(maxsize=1)
def _mnist() -> Any:
    """MNIST-5k, loaded once for PROM and HASTE."""

    return mnist_5k()


def _cost(report: Any) -> dict[str, float]:
    t = report.total
    return {"macs": float(t.macs), "energy_pj": float(t.energy_pj), "storage_bytes": float(t.storage_bytes)}


# ----------------------------------------------------------------------------------------------
# The three parts


def _prom(sizes: DemoSizes, steps: _Steps) -> PartResult:
    with steps.step("PROM: loading MNIST-5k"):
        split = _mnist()
    x, y = split.x_test[: sizes.digits], split.y_test[: sizes.digits]
    model = load_mobilenet_mnist().eval()
    torch.manual_seed(0)  # the QAT's dropout
    with steps.step("PROM: float top-1", _batches(len(x))) as advance:
        float_top1 = _top1(model, x, y, advance)
    qat = fxslim.prepare(model, split.x_train[:1])  # batch 1: the converted graph is costed per image
    optimizer = torch.optim.SGD(qat.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, sizes.qat_steps)
    generator = torch.Generator().manual_seed(0)
    with steps.step(f"PROM: QAT, {sizes.qat_steps} steps of {sizes.qat_batch} digits", sizes.qat_steps) as advance:
        for i in range(sizes.qat_steps):
            idx = torch.randint(0, len(split.x_train), (sizes.qat_batch,), generator=generator)
            train_step(qat, optimizer, split.x_train[idx], split.y_train[idx])
            scheduler.step()
            if i == int(0.8 * sizes.qat_steps):
                freeze_observers(qat)  # the activation grids stay fixed for the last steps
            advance(1)
    int_model = fxslim.convert(qat)
    with steps.step("PROM: integer top-1", _batches(len(x))) as advance:
        int_top1 = _top1(int_model, x, y, advance)
    with steps.step("PROM: cost model"):
        comparison = fxslim.compare(fxslim.estimate(model, x[:1]), fxslim.estimate(int_model, x[:1]))
    batch = x[: sizes.latency_batch]
    fast, runtime = _fastest_integer_model(qat, int_model)
    with steps.step(f"PROM: latency, batch {len(batch)}", sizes.repeats) as advance:
        dense_ms, int_ms = _median_latency_ms(lambda: model(batch), lambda: fast(batch), sizes.repeats, advance)
    ops = [n.target for n in int_model.graph.nodes if n.op == "call_function"]
    ternary = sum(t is torch.ops.fxslim.ternary_conv2d.default for t in ops)
    int8 = sum(t in (torch.ops.fxslim.int8_conv2d.default, torch.ops.fxslim.int8_linear.default) for t in ops)
    return PartResult(
        part="PROM", model="MobileNetV2-style MNIST net (float32 checkpoint)",
        change=f"QAT {sizes.qat_steps} steps, then integer model: {ternary} ternary 1×1 convs, {int8} int8 layers",
        quality_name=f"top-1 (%) on {len(x):,} test digits", quality_before=float_top1, quality_after=int_top1,
        before=_cost(comparison.before) | {"latency_ms": dense_ms},
        after=_cost(comparison.after) | {"latency_ms": int_ms},
        notes=["before: float32 weights and MACs; after: as many MACs, but the ternary ones are additions only",
               f"latency: batch of {len(batch)} digits, {runtime}"],
        comparison=comparison,
    )


def _fastest_integer_model(qat: Any, reference: Any) -> tuple[Any, str]:
    """The integer model a user would deploy on this CPU: oneDNN's fused u8 convs, run as README shows
    (``micro_batched``: lowered, its convs called as oneDNN primitives), else (a torch without oneDNN)
    the reference integer ops (what the costs and top-1 come from)."""
    if onednn_available():
        return fxslim.micro_batched(fxslim.convert(qat, runtime="onednn")), "oneDNN integer runtime (micro_batched)"
    return reference, "reference integer ops (this torch has no oneDNN quantized ops)"


def _haste(sizes: DemoSizes, steps: _Steps) -> PartResult:
    with steps.step("HASTE: loading MNIST-5k"):
        split = _mnist()
    x, y = pad_to_32(split.x_test[: sizes.digits]), split.y_test[: sizes.digits]
    model = pretrained_mnist_resnet18_small().eval()
    with steps.step(f"HASTE: rewrite (L={HASTE_L})"):
        res = fxslim.optimize(model, x[:1], passes=[fxslim.HASTE(L=HASTE_L)], strict=True)
    with steps.step("HASTE: dense top-1", _batches(len(x))) as advance:
        dense_top1 = _top1(model, x, y, advance)
    with steps.step("HASTE: HASTE top-1, recording buckets", _batches(len(x))) as advance:
        with record_buckets() as recorded:
            haste_top1 = _top1(res.module, x, y, advance)
    with steps.step("HASTE: cost model"):  # HASTE convs costed with the bucket counts measured on the digits
        comparison = res.compare(haste_buckets=HasteBuckets(calibration=recorded, measured=recorded))
    batch = x[: sizes.latency_batch]
    with steps.step(f"HASTE: latency, batch {len(batch)}", sizes.repeats) as advance:
        dense_ms, haste_ms = _median_latency_ms(lambda: model(batch), lambda: res.module(batch), sizes.repeats,
                                                advance)
    rows = [r for r in comparison.after.rows if r.measured_macs is not None]
    dense_conv, measured_conv = sum(r.info["dense_macs"] for r in rows), sum(r.measured_macs for r in rows)
    overhead = sum(r.info["measured_overhead"] for r in rows)
    return PartResult(
        part="HASTE", model="ResNet18 (width 0.25), MNIST checkpoint",
        change=f"{res.report.rewritten('haste')} convs hashed, L={HASTE_L}",
        quality_name=f"top-1 (%) on {len(x):,} test digits", quality_before=dense_top1, quality_after=haste_top1,
        before=_cost(comparison.before) | {"latency_ms": dense_ms},
        after=_cost(comparison.after) | {"latency_ms": haste_ms},
        notes=[f"HASTE convs: {dense_conv:,.0f} dense MACs per image -> {measured_conv:,.0f} measured "
               f"({100 * (1 - measured_conv / dense_conv):.1f} % fewer), plus {overhead:,.0f} hashing and merging ops",
               f"latency: batch of {len(batch)} digits (32×32)"],
        comparison=comparison,
    )


def _httm(sizes: DemoSizes, steps: _Steps) -> PartResult:
    torch.manual_seed(0)
    model = vggt_small(init_values=1.0).eval()  # LayerScale 1: attention changes reach the outputs
    images = camera_sequence("astronaut", frames=sizes.frames, size=sizes.image_size).images[None]
    with steps.step("HTTM: rewrite"):
        res = fxslim.optimize(model, images, passes=[fxslim.HTTM()], strict=True)
    with steps.step(f"HTTM: forward, {sizes.frames} frames", 2) as advance, torch.no_grad():
        dense = model(images)["depth"]
        advance(1)
        merged = res.module(images)["depth"]
        advance(1)
    cosine = float(F.cosine_similarity(merged.flatten().double(), dense.flatten().double(), dim=0))
    relative = float((merged - dense).norm() / dense.norm())
    with steps.step("HTTM: cost model"):
        comparison = res.compare()
    with steps.step(f"HTTM: latency, {sizes.frames} frames", sizes.repeats) as advance:
        dense_ms, httm_ms = _median_latency_ms(lambda: model(images), lambda: res.module(images), sizes.repeats,
                                               advance, warm_up=False)  # both ran for the fidelity above
    config = res.passes[0]
    return PartResult(
        part="HTTM", model=f"VGGT architecture, small (random weights), {sizes.frames} views {sizes.image_size} px",
        change=f"{res.report.rewritten('httm')} global attentions merged, keeping {config.q:.0%} of queries "
               f"and {config.kv:.0%} of keys/values",
        quality_name="depth vs dense: relative error", quality_before=0.0, quality_after=relative,
        before=_cost(comparison.before) | {"latency_ms": dense_ms},
        after=_cost(comparison.after) | {"latency_ms": httm_ms},
        notes=[f"depth cosine similarity to dense {cosine:.7f}", "camera moving over the scikit-image astronaut photo",
               f"latency: one forward of the {sizes.frames}-frame sequence"],
        comparison=comparison,
    )


_RUNNERS: dict[str, Callable[[DemoSizes, _Steps], PartResult]] = {"prom": _prom, "haste": _haste, "httm": _httm}


# ----------------------------------------------------------------------------------------------
# Running and reporting


def _check_parts(parts: Sequence[str]) -> list[str]:
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts:
        raise ValueError(f"demo: --parts must be one or more of {', '.join(PARTS)}; got {' '.join(parts) or 'nothing'}")
    return [p for p in PARTS if p in parts]


def run_demo(parts: Sequence[str] = PARTS, sizes: DemoSizes = FULL, threads: int = 1,
             console: Any = None) -> list[PartResult]:
    """Run the chosen parts (in the order of ``PARTS``) with ``threads`` intra-op threads; rich
    progress bars go to ``console``. Restores the caller's thread count."""

    chosen = _check_parts(parts)
    if threads < 1:
        raise ValueError(f"demo: --threads must be an integer >= 1, got {threads}")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
    try:
        with Progress(*columns, console=console) as progress:
            return [_RUNNERS[name](sizes, _Steps(progress)) for name in chosen]
    finally:
        torch.set_num_threads(previous)


def _ratio(before: float, after: float) -> str:
    return f"{before / after:.2f}×" if after else "—"


def _number(value: float, metric: str) -> str:
    return f"{value:.1f}" if metric == "latency_ms" else human(value)


def _quality(value: float, name: str) -> str:
    if "error" in name:
        return f"{value:.2e}" if value else "0"
    return f"{value:.1f}"


def summary_rows(results: Sequence[PartResult]) -> list[list[str]]:
    """One row per part and measure: [pass, measure, before, after, before/after]."""
    rows = []
    for r in results:
        rows.append([r.part, r.quality_name, _quality(r.quality_before, r.quality_name),
                     _quality(r.quality_after, r.quality_name), ""])
        for metric, label in _METRICS:
            b, a = r.before[metric], r.after[metric]
            rows.append(["", label, _number(b, metric), _number(a, metric), _ratio(b, a)])
    return rows


SUMMARY_HEADER = ("pass", "measure", "before", "after", "before/after")


def summary_table(results: Sequence[PartResult], threads: int) -> Any:
    """The one summary table (rich): quality, MACs, energy, storage, latency before and after per part."""

    table = Table(title="fxslim demo: before -> after", caption=f"latency: median of interleaved repeats, "
                  f"{threads} thread(s); before/after > 1: smaller or faster", caption_justify="left")
    for col in SUMMARY_HEADER:
        table.add_column(col, justify="left" if col in ("pass", "measure") else "right")
    rows = summary_rows(results)
    for i, row in enumerate(rows):
        table.add_row(*row, end_section=i + 1 < len(rows) and rows[i + 1][0] != "")
    return table


def results_markdown(results: Sequence[PartResult], threads: int, seconds: float, command: str = "fxslim demo") -> str:
    """The summary table as Markdown (for benchmarks/results/demo.md)."""
    header, rows = SUMMARY_HEADER, summary_rows(results)
    lines = ["# fxslim demo: each pass on its reference model", "",
             f"Generated by `{command}` in {seconds:.0f} s; latency is the median of "
             f"interleaved repeats with {threads} thread(s), MACs / energy / storage per image (per sequence "
             "for HTTM) from the cost model (45 nm energy table).", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += [""] + [f"- {r.part} ({r.model}): {r.change}; " + "; ".join(r.notes) for r in results] + [""]
    return "\n".join(lines)


def _figure(width: float, height: float) -> Any:
    """A matplotlib Figure on the Agg canvas (no pyplot state)."""

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _summary_figure(results: Sequence[PartResult]) -> Any:
    """Before/after bars per part for each metric (log scale: the parts differ by orders of magnitude)."""
    columns = 2  # two panels a row: at the page's width each keeps 10 px+ labels
    rows = math.ceil(len(_METRICS) / columns)
    fig = _figure(9.0, 3.6 * rows)
    xs = range(len(results))
    for i, (metric, label) in enumerate(_METRICS):
        ax = fig.add_subplot(rows, columns, i + 1)
        before = [r.before[metric] for r in results]
        after = [r.after[metric] for r in results]
        ax.bar([x - 0.2 for x in xs], before, width=0.4, label="before", color="#4c72b0")
        ax.bar([x + 0.2 for x in xs], after, width=0.4, label="after", color="#dd8452")
        for x, b, a in zip(xs, before, after):
            ax.annotate(_ratio(b, a), (x, max(b, a)), ha="center", va="bottom", fontsize=10)
        ax.set_yscale("log")
        ax.set_xticks(list(xs), [r.part for r in results])
        ax.set_title(label)
        ax.margins(y=0.15)
    fig.axes[0].legend(fontsize=9, loc="lower left", bbox_to_anchor=(0.0, 1.08), ncol=2, frameon=False)
    fig.suptitle("before and after, log scale (label: before ÷ after)")
    fig.tight_layout()
    return fig


def relative_figure(results: Sequence[PartResult]) -> Any:
    """After as a percentage of before, per metric and part (below the 100 % line: the pass saves)."""
    fig = _figure(9.0, 4.2)
    ax = fig.add_subplot()
    width = 0.8 / len(results)
    colors = ("#4c72b0", "#dd8452", "#55a868")
    for j, r in enumerate(results):
        xs = [i - 0.4 + width * (j + 0.5) for i in range(len(_METRICS))]
        values = [100.0 * r.after[m] / r.before[m] for m, _ in _METRICS]
        ax.bar(xs, values, width=width, label=r.part, color=colors[j % len(colors)])
        for x, v in zip(xs, values):
            ax.annotate(f"{v:.0f}%", (x, v), ha="center", va="bottom", fontsize=8)
    ax.axhline(100.0, color="#333", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(_METRICS)), [label for _, label in _METRICS])
    ax.set_ylabel("after, % of before")
    ax.set_title("What each pass leaves (100 % = unchanged, lower is better)")
    ax.margins(y=0.12)
    ax.legend()
    fig.tight_layout()
    return fig


def _quality_figure(results: Sequence[PartResult]) -> Any:
    """Quality before and after, one small panel per part (their units differ)."""
    fig = _figure(3.2 * len(results), 3.4)
    for i, r in enumerate(results):
        ax = fig.add_subplot(1, len(results), i + 1)
        ax.bar(["before", "after"], [r.quality_before, r.quality_after], color=["#4c72b0", "#dd8452"])
        low, high = sorted((r.quality_before, r.quality_after))
        if "error" in r.quality_name:
            ax.set_ylim(0.0, 1.25 * high or 1.0)
        else:  # top-1 in percent: zoom on the difference
            ax.set_ylim(max(0.0, low - 5.0), high + 1.5)
        for x, v in enumerate((r.quality_before, r.quality_after)):
            ax.annotate(_quality(v, r.quality_name), (x, v), ha="center", va="bottom", fontsize=8)
        ax.set_title(f"{r.part}: {r.quality_name.split(' on ')[0]}", fontsize=9)
    fig.tight_layout()
    return fig


def _figures(results: Sequence[PartResult]) -> dict[str, Any]:
    """File stem -> figure: the summary bars, quality, and per part the per-layer energy before/after."""

    figures = {"relative": relative_figure(results), "summary": _summary_figure(results),
               "quality": _quality_figure(results)}
    for r in results:
        figures[f"{r.part.lower()}_layers"] = plot_comparison(r.comparison, "energy_pj")
    return figures


def _index_html(results: Sequence[PartResult], pngs: dict[str, bytes], threads: int, seconds: float) -> str:
    header, rows = SUMMARY_HEADER, summary_rows(results)
    body = ["<h1>fxslim demo</h1>",
            f'<p class="note">{seconds:.0f} s, {threads} thread(s), torch {html.escape(torch.__version__)}. '
            "Every number was measured or computed in this run.</p>",
            "<h2>Summary</h2>", html_table(header, rows), html_image(pngs["relative"], "after as % of before"),
            html_image(pngs["quality"], "quality"), html_image(pngs["summary"], "before and after")]
    for r in results:
        body += [f"<h2>{html.escape(r.part)}: {html.escape(r.model)}</h2>", "<ul>",
                 f"<li>{html.escape(r.change)}</li>"]
        body += [f"<li>{html.escape(n)}</li>" for n in r.notes]
        body += ["</ul>", html_image(pngs[f"{r.part.lower()}_layers"], f"{r.part} per layer"),
                 "<details><summary>cost per module, before and after</summary>",
                 *comparison_html_body(r.comparison, plots=False, level=3), "</details>"]
    return html_page("fxslim demo", body)


def write_report(results: Sequence[PartResult], out: Path, threads: int, seconds: float) -> Path:
    """Write ``out/index.html`` (self-contained), one PNG per figure and ``out/summary.json``; returns index.html."""

    out.mkdir(parents=True, exist_ok=True)
    pngs = {name: png_bytes(fig) for name, fig in _figures(results).items()}
    for name, data in pngs.items():
        (out / f"{name}.png").write_bytes(data)
    summary = {"threads": threads, "seconds": seconds, "torch": torch.__version__,
               "parts": {r.part.lower(): r.to_dict() for r in results}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    index = out / "index.html"
    index.write_text(_index_html(results, pngs, threads, seconds), encoding="utf-8")
    return index


def demo_command(out: str | Path = "fxslim-demo", parts: Sequence[str] = PARTS, quick: bool = False,
                 threads: int = 1, results_md: str | Path | None = None, console: Any = None) -> int:
    """What ``fxslim demo`` does: run, print the summary table, write the report (and the Markdown
    results when ``results_md`` is given), print where it went. Returns the exit code."""

    console = console or Console()
    start = time.perf_counter()
    results = run_demo(parts, QUICK if quick else FULL, threads, console)
    seconds = time.perf_counter() - start
    console.print(summary_table(results, threads))
    for r in results:
        console.print(f"[bold]{r.part}[/] ({r.model}): {r.change}; " + "; ".join(r.notes))
    index = write_report(results, Path(out), threads, seconds)
    console.print(f"report: {index.resolve()}")
    if results_md is not None:
        path = Path(results_md)
        path.parent.mkdir(parents=True, exist_ok=True)
        command = (f"fxslim demo --threads {threads} --results-md {path.as_posix()}" + (" --quick" if quick else "")
                   + (f" --parts {' '.join(parts)}" if set(parts) != set(PARTS) else ""))
        path.write_text(results_markdown(results, threads, seconds, command), encoding="utf-8")
        (path.with_suffix(".png")).write_bytes((Path(out) / "relative.png").read_bytes())
        console.print(f"results: {path.resolve()} and {path.with_suffix('.png').name}")
    console.print(f"demo finished in {seconds:.0f} s")
    return 0
