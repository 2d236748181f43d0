"""README's headline table: per method, the paper's figure, ours, and the peer a user would pick
instead, read from the results records the other benchmarks write (``results/<name>.json``; nothing
is measured or typed here but the papers' figures, quoted from docs/methods/), each row naming the
page it comes from.

    python -m benchmarks.headlines        # writes benchmarks/results/headlines.md

A test renders the headlines again from the results and fails when the committed file differs.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from benchmarks import records
from benchmarks.prom_vs_peers import INT8_PEERS, PROM_VARIANTS
from benchmarks.records import Results, Section, Table

RESULTS = records.RESULTS

# The papers' own figures (docs/methods/*.md and docs/papers.md quote their sources).
PAPER = {
    "prom_energy": "23.9× less energy than float16 (MobileNetV2, ImageNet)",
    "haste": "−46.72 % FLOPs at −1.25 pp top-1 (ResNet34, CIFAR-10, no training)",
    "httm": "7.0× faster end to end at 1000 frames (VGGT-1B, A100, bf16)",
}
_BUDGET = 1.25  # pp of top-1, the HASTE paper's

__all__ = ["render", "main"]


def _load(name: str) -> Results:
    if not (RESULTS / f"{name}.json").is_file():
        raise FileNotFoundError(f"headlines: {RESULTS / name}.json does not exist: run its benchmark first")
    return records.load(name, RESULTS)


def _section(results: Results, heading: str) -> Section | None:
    """The first section whose heading starts with ``heading``."""
    return next((s for s in results.sections if s.heading.startswith(heading)), None)


def _column(table: Table, name: str) -> list:
    i = table.columns.index(name)
    return [row[i] for row in table.rows]


def _rows(table: Table) -> list[dict]:
    """Rows as {column: value}; a repeated column name (``±``) keys the column before it: ``<name> ±``."""
    keys = [f"{table.columns[i - 1]} ±" if c == "±" else c for i, c in enumerate(table.columns)]
    return [dict(zip(keys, row, strict=True)) for row in table.rows]


def _prom() -> list[str]:
    energy = _section(_load("prom_energy_storage"), "Energy").table
    deployed = [row[len(row) - 1 - energy.columns[::-1].index("ratio")] for row in energy.rows]  # the last ratio column
    low, high = min(deployed), max(deployed)
    latency = [_latency("prom_vs_peers", ", VNNI CPU", f"fastest of {', '.join(INT8_PEERS)} (beside ours)")]
    if (RESULTS / "prom_vs_peers_avx2.json").is_file():  # a CPU without VNNI, where PROM sums 8-bit layers in float
        latency.append(_latency("prom_vs_peers_avx2", ", AVX2 CPU (no VNNI)", "the same"))
    return [
        f"| PROM | energy vs float16 | {PAPER['prom_energy']} | {low:.2f}×–{high:.2f}× over the accounting "
        "conventions (MobileNetV2, converted integer model) | — (the int8 peers do not report it) "
        "| prom_energy_storage.md |",
        *latency,
    ]


def _latency(name: str, cpu: str, peers: str) -> str:
    """The CPU latency row of one prom_vs_peers page: PROM's fastest variant and the fastest int8 peer, 1 thread."""
    speed = _load(name).sections[0].table  # median ms: variant, then one column per (batch, threads)
    ms = {r["variant"]: r for r in _rows(speed)}
    cells = []
    one_thread = [c for c in speed.columns[1:] if c.endswith(", 1 thr")]  # the row's claim; 2 threads in the file
    for column, label in ((c, c.split(",")[0]) for c in one_thread):
        best = min(INT8_PEERS, key=lambda p: ms[p][column])
        ours = min((p for p in PROM_VARIANTS if p in ms), key=lambda p: ms[p][column])
        cells.append(f"{label}: {ours} {ms[ours][column]:.1f} ms, {best} {ms[best][column]:.1f} ms")
    return f"| PROM | CPU latency, MobileNetV2 224 px, 1 thread{cpu} | — | {'; '.join(cells)} | {peers} | {name}.md |"


def _haste_speed() -> str:
    """'batch 1 X×, batch 32 Y×': HASTE / dense wall clock of the whole model, from haste_speed's records."""
    intro = _load("haste_speed").sections[0]
    level = re.search(r"HASTE: L=(\d+)", " ".join(intro.text))
    ratios = zip(_column(intro.table, "batch"), _column(intro.table, "HASTE / dense"), strict=True)
    cells = [f"batch {batch} {ratio:.2f}×" for batch, ratio in ratios]
    return f"{', '.join(cells)} the dense model's wall clock (L = {level.group(1) if level else '?'})"


def _mean_std(row: dict, column: str, suffix: str = "") -> str:
    std = row[f"{column} ±"]
    return f"{row[column]:.2f}{suffix}" if std is None else f"{row[column]:.2f} ± {std:.2f}{suffix}"


def _haste_vs_pruning() -> str:
    """HASTE and L1 pruning at matched MACs, without and with BN statistics, from haste_vs_pruning's records."""
    results = _load("haste_vs_pruning")
    section = _section(results, "resnet18 (checkpoint")
    if section is None:
        return "L1 channel pruning at matched MACs: ResNet18 not run"
    rows = {r["L"]: r for r in _rows(section.table)}
    row = rows.get(12, next(iter(rows.values())))
    top1 = {k: row[k] for k in ("HASTE top-1 %", "HASTE + BN stats", "pruning (L1)", "pruning + BN stats")}
    calibration = re.search(r"re-estimated on (\d+) unlabelled", " ".join(results.sections[0].text))

    def verdict(haste: float, pruning: float) -> str:
        return "HASTE ahead" if haste > pruning else "pruning ahead" if pruning > haste else "a tie"

    return (
        f"L1 channel pruning (Torch-Pruning) at the same MACs (−{row['MACs cut % HASTE']:.1f} %, "
        f"L = {row['L']}, ResNet18): with no data HASTE {top1['HASTE top-1 %']:.2f} %, pruning "
        f"{top1['pruning (L1)']:.2f} % ({verdict(top1['HASTE top-1 %'], top1['pruning (L1)'])}); with BN statistics "
        f"re-estimated on {calibration.group(1) if calibration else '?'} unlabelled digits HASTE "
        f"{top1['HASTE + BN stats']:.2f} %, pruning {top1['pruning + BN stats']:.2f} % "
        f"({verdict(top1['HASTE + BN stats'], top1['pruning + BN stats'])}); the pruned model runs at "
        f"{_mean_std(row, 'pruned / dense time', '×')} dense time, HASTE at "
        f"{_mean_std(row, 'HASTE / dense time', '×')}"
    )


def _haste() -> list[str]:
    section = _section(_load("haste_accuracy"), "resnet18, weight decay 0.01: every conv but the stem (")
    sources = "haste_accuracy.md, haste_speed.md, haste_vs_pruning.md"
    rows = _rows(section.table) if section else []
    # the deepest cut whose mean top-1 drop stays within the paper's budget (haste_accuracy.best_within_budget)
    within = [r for r in rows if -r["Δ top-1 pp"] <= _BUDGET + 1e-9]
    if not within:
        return [f"| HASTE | FLOPs at ≤ 1.25 pp | {PAPER['haste']} | no L within 1.25 pp | {_haste_vs_pruning()} | {sources} |"]
    best = max(within, key=lambda r: r["FLOPs reduction % (with overhead)"])
    reduction = "FLOPs reduction % (with overhead)"
    flops = f"−{best[reduction]:.2f} ± {best[reduction + ' ±']:.2f} %"
    return [
        f"| HASTE | FLOPs at ≤ 1.25 pp top-1 | {PAPER['haste']} | {flops} FLOPs at {best['Δ top-1 pp']:+.2f} pp "
        f"(L = {best['L']}, ResNet18 on MNIST-5k, overhead counted); it takes {_haste_speed()} | {_haste_vs_pruning()} "
        f"| {sources} |",
    ]


def _httm() -> list[str]:
    results = _load("httm_speed")
    layer = {r["variant"]: r for r in _rows(_section(results, "1. One global attention layer").table)}
    model = _section(results, "4. Whole model")
    whole = next(r["speed-up"] for r in _rows(model.table) if r["model"].startswith("HTTM (fxslim")) if model else None
    whole_cell = f"{whole:.2f}x" if whole is not None else "not run"
    headwise = layer["HTTM head-wise (paper defaults)"]["speed-up vs dense"]
    fastvggt = layer["HTTM global (matching over the whole sequence)"]["speed-up vs dense"]
    return [
        f"| HTTM | speed at Q 0.2 / KV 0.3 | {PAPER['httm']} | one global layer at 32 frames "
        f"{headwise:.2f}x faster than dense SDPA; whole vggt_small at 32 frames {whole_cell} (CPU, fp32) | "
        f"FastVGGT-style matching over the whole sequence, same op: {fastvggt:.2f}x | httm_speed.md |",
    ]


def render() -> str:
    lines = [
        "# Headlines",
        "",
        "Written by `python -m benchmarks.headlines` from the results files named in the last column; the "
        "papers' figures are quoted from the papers (docs/methods/).",
        "",
        "| method | measure | paper | fxslim on this CPU | what a user would pick instead | from |",
        "|---|---|---|---|---|---|",
        *_prom(), *_haste(), *_httm(),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS / "headlines.md")
    args = parser.parse_args(argv)
    args.out.write_text(render(), encoding="utf-8")
    print(args.out.read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
