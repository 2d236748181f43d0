"""README's headline table: per method, the paper's figure, ours, and the peer a user would pick
instead, read from the results files the other benchmarks write (nothing is measured or typed
here but the papers' figures, quoted from docs/methods/), each row naming the file it comes from.

    python -m benchmarks.headlines        # writes benchmarks/results/headlines.md

A test renders it again from the results files and fails when the committed file differs.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from benchmarks.prom_vs_peers import INT8_PEERS

RESULTS = Path(__file__).resolve().parent / "results"

# The papers' own figures (docs/methods/*.md and docs/papers.md quote their sources).
PAPER = {
    "prom_energy": "23.9× less energy than float16 (MobileNetV2, ImageNet)",
    "haste": "−46.72 % FLOPs at −1.25 pp top-1 (ResNet34, CIFAR-10, no training)",
    "httm": "7.0× faster end to end at 1000 frames (VGGT-1B, A100, bf16)",
}

__all__ = ["render", "main"]


def _tables(text: str) -> list[list[dict[str, str]]]:
    """Every Markdown table of ``text`` as rows of {header: cell}."""
    tables, lines = [], text.splitlines()
    i = 0
    while i < len(lines) - 1:
        if lines[i].startswith("|") and re.match(r"^\|\s*:?-", lines[i + 1]):
            header = [c.strip() for c in lines[i].strip("|").split("|")]
            rows, i = [], i + 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(dict(zip(header, (c.strip() for c in lines[i].strip("|").split("|")))))
                i += 1
            tables.append(rows)
        else:
            i += 1
    return tables


def _read(name: str) -> str:
    path = RESULTS / name
    if not path.is_file():
        raise FileNotFoundError(f"headlines: {path} does not exist: run its benchmark first")
    return path.read_text(encoding="utf-8")


def _prom() -> list[str]:
    energy = _tables(_read("prom_energy_storage.md"))[0]
    ratios = [r["ratio"] for r in energy if r["ratio"] not in ("—", "")]
    low, high = min(ratios, key=lambda r: float(r.rstrip("×"))), max(ratios, key=lambda r: float(r.rstrip("×")))
    speed = _tables(_read("prom_vs_peers.md"))[0]
    ms = {r["variant"]: r for r in speed}
    cells = []
    for column, label in ((c, c.split(",")[0]) for c in list(speed[0])[1:]):
        best = min(INT8_PEERS, key=lambda p: float(ms[p][column]))
        cells.append(f"{label}: PROM {ms['PROM integer compiled'][column]} ms, {best} {ms[best][column]} ms")
    return [
        f"| PROM | energy vs float16 | {PAPER['prom_energy']} | {low}–{high} over the accounting conventions "
        "(MobileNetV2, converted integer model) | — (the int8 peers do not report it) | prom_energy_storage.md |",
        f"| PROM | CPU latency, MobileNetV2 224 px, 1 thread | — | {'; '.join(cells)} | fastest of "
        f"{', '.join(INT8_PEERS)} (beside ours) | prom_vs_peers.md |",
    ]


def _haste_speed() -> str:
    """'b1 X×, b32 Y×': HASTE / dense wall clock of the whole model, from haste_speed.md."""
    text = _read("haste_speed.md")
    level = re.search(r"HASTE: L=(\d+)", text)
    cells = [f"batch {r['batch']} {r['HASTE / dense']}" for r in _tables(text)[0]]
    return f"{', '.join(cells)} the dense model's wall clock (L = {level.group(1) if level else '?'})"


def _haste_vs_pruning() -> str:
    """HASTE and L1 pruning at matched MACs, without and with BN statistics, from haste_vs_pruning.md."""
    text = _read("haste_vs_pruning.md")
    section = re.search(r"^## resnet18 \(checkpoint.*?(?=^## |\Z)", text, re.M | re.S)
    if section is None:
        return "L1 channel pruning at matched MACs: ResNet18 not run"
    rows = {r["L"]: r for r in _tables(section.group(0))[0]}
    row = rows.get("12", next(iter(rows.values())))
    top1 = {k: float(row[k].split()[0]) for k in ("HASTE top-1 %", "HASTE + BN stats", "pruning (L1)", "pruning + BN stats")}
    calibration = re.search(r"re-estimated on (\d+) unlabelled", text)

    def verdict(haste: float, pruning: float) -> str:
        return "HASTE ahead" if haste > pruning else "pruning ahead" if pruning > haste else "a tie"

    return (
        f"L1 channel pruning (Torch-Pruning) at the same MACs (−{row['MACs cut % (HASTE / pruning)'].split()[0]} %, "
        f"L = {row['L']}, ResNet18): with no data HASTE {top1['HASTE top-1 %']:.2f} %, pruning "
        f"{top1['pruning (L1)']:.2f} % ({verdict(top1['HASTE top-1 %'], top1['pruning (L1)'])}); with BN statistics "
        f"re-estimated on {calibration.group(1) if calibration else '?'} unlabelled digits HASTE "
        f"{top1['HASTE + BN stats']:.2f} %, pruning {top1['pruning + BN stats']:.2f} % "
        f"({verdict(top1['HASTE + BN stats'], top1['pruning + BN stats'])}); the pruned model runs at "
        f"{row['pruned / dense time']} dense time, HASTE at {row['HASTE / dense time']}"
    )


def _haste() -> list[str]:
    text = _read("haste_accuracy.md")
    line = re.search(r"^\*\*resnet18, weight decay 0\.01, every conv but the stem\*\* at ≤ 1\.25 pp: L = (\d+), "
                     r"(−[\d.]+ ± [\d.]+ %) FLOPs \(with overhead\) at (-?[\d.]+ pp)", text, re.M)
    sources = "haste_accuracy.md, haste_speed.md, haste_vs_pruning.md"
    if line is None:
        return [f"| HASTE | FLOPs at ≤ 1.25 pp | {PAPER['haste']} | no L within 1.25 pp | {_haste_vs_pruning()} | {sources} |"]
    level, flops, drop = line.groups()
    return [
        f"| HASTE | FLOPs at ≤ 1.25 pp top-1 | {PAPER['haste']} | {flops} FLOPs at {drop} (L = {level}, ResNet18 "
        f"on MNIST-5k, overhead counted); it takes {_haste_speed()} | {_haste_vs_pruning()} | {sources} |",
    ]


def _httm() -> list[str]:
    text = _read("httm_speed.md")
    layer = re.search(r"One global layer at 32 frames: HTTM ([\d.]+x) faster than dense SDPA", text)
    rows = [r for table in _tables(text) for r in table]
    whole = next(r for r in rows if r.get("model", "").startswith("HTTM (fxslim"))
    fastvggt = next(r for r in rows if r.get("variant", "").startswith("HTTM global"))
    return [
        f"| HTTM | speed at Q 0.2 / KV 0.3 | {PAPER['httm']} | one global layer at 32 frames "
        f"{layer.group(1) if layer else '?'} faster than dense SDPA; whole vggt_small at 32 frames "
        f"{whole['speed-up']} (CPU, fp32) | FastVGGT-style matching over the whole sequence, same op: "
        f"{fastvggt['speed-up vs dense']} | httm_speed.md |",
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
