"""Where one HTTM global layer spends its time: each stage's share of the op, per frame count.

One global attention layer (frames x 261 tokens, 16 heads x 64, fp32, paper defaults Q 0.2 / KV 0.3
kept), timed stage by stage, all stages of one frame count interleaved (medians over rounds):
dense SDPA, the whole op, the plan (``httm_plan``: matching + outlier filtering), the matching alone
(``httm_match`` on Q and K), the apply step (``httm_apply_plan``: merge + SDPA + unmerge) and SDPA
alone at the merged lengths. Outlier filtering = plan - matching and merge + unmerge = apply - SDPA
are differences of medians. Shares are of the op's median time.

Each run records its medians in ``results/httm_stages_<label>.json`` (rendered to .md); with
``--baseline`` (the label of an earlier run, e.g. before a kernel change) the page puts both runs side
by side. The two runs are not interleaved with each other, so compare shares and speed-ups against the
dense SDPA timed in the same run, not absolute times. Run:
``python -m benchmarks.httm_stages --label after --baseline before``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks import records
from benchmarks.records import Results, Section, Table, environment
from fxslim.app.timing import interleaved_samples, paired_ratio
from fxslim.runtime.httm import httm_apply_plan, httm_layout, httm_match, httm_plan

__all__ = ["BEFORE", "measure", "stage_table", "from_stage_table", "shares_table", "stages_of", "shares_section",
           "run", "main"]

P, HEADS, DIM = 261, 16, 64
_OP = torch.ops.fxslim.httm_attention
BEFORE = "httm_stages_before"  # the records of the run before issue 22's kernel work
_STAGES = ("dense SDPA", "op", "plan", "matching", "apply", "merged SDPA")
def _stage_fns(frames: int) -> dict:
    g = torch.Generator().manual_seed(frames)
    q, k, v = (torch.randn(1, HEADS, frames * P, DIM, generator=g) for _ in range(3))
    plan = httm_plan(q, k, frames, P)
    m_q = int(plan.q_lengths.max())
    short = (q[:, :, :m_q].contiguous(), k[:, :, :plan.kv_length].contiguous(), v[:, :, :plan.kv_length].contiguous())
    q_layout, kv_layout = httm_layout(frames, P, 5, 0.9, 128, 30), httm_layout(frames, P, 5, 0.7, 128, 30)
    return {
        "dense SDPA": lambda: F.scaled_dot_product_attention(q, k, v),
        "op": lambda: _OP(q, k, v, frames, P),
        "plan": lambda: httm_plan(q, k, frames, P),
        "matching": lambda: (httm_match(q, q_layout), httm_match(k, kv_layout)),
        "apply": lambda: httm_apply_plan(q, k, v, plan),
        "merged SDPA": lambda: F.scaled_dot_product_attention(*short),
    }


def measure(frame_counts: list[int], repeats: int, reduced_repeats: dict[int, int]) -> list[dict]:
    """One record per frame count: median ms per stage and the op's paired speed-up over dense."""
    records = []
    for frames in frame_counts:
        samples = interleaved_samples(_stage_fns(frames), reduced_repeats.get(frames, repeats))
        ms = {name: statistics.median(t) * 1e3 for name, t in samples.items()}
        records.append({"frames": frames, "tokens": frames * P, "rounds": len(samples["op"]), "ms": ms,
                        "speedup": paired_ratio(samples["dense SDPA"], samples["op"])})
    return records


def _breakdown(ms: dict) -> dict[str, float]:
    """The op's parts in ms: matching, outlier filtering, merge + unmerge, merged SDPA."""
    return {"matching": ms["matching"], "outlier filtering": ms["plan"] - ms["matching"],
            "merge + unmerge": ms["apply"] - ms["merged SDPA"], "merged SDPA": ms["merged SDPA"]}


def stage_table(measured: list[dict]) -> Table:
    """``measure``'s records as a table: median ms per stage and the speed-up, per frame count."""
    rows = [[r["frames"], r["tokens"], r["rounds"], *(r["ms"][s] for s in _STAGES), r["speedup"]] for r in measured]
    return Table(["frames", "N", "rounds", *(f"{s} ms" for s in _STAGES), "speed-up"], rows,
                 ["d", "d", "d", *(".1f" for _ in _STAGES), ".2f}x"])


def from_stage_table(table: Table) -> list[dict]:
    """The records ``stage_table`` was made from."""
    return [{"frames": r[0], "tokens": r[1], "rounds": r[2], "ms": dict(zip(_STAGES, r[3:-1], strict=True)),
             "speedup": r[-1]} for r in table.rows]


def shares_table(measured: list[dict]) -> Table:
    """ms and share of the op's median of each part of the op, per frame count."""
    rows = []
    for r in measured:
        op = r["ms"]["op"]
        rows.append([r["frames"], r["tokens"], r["rounds"], r["ms"]["dense SDPA"], op, r["speedup"],
                     *(f"{t:.0f} ms ({100 * t / op:.0f} %)" for t in _breakdown(r["ms"]).values())])
    return Table(["frames", "N", "rounds", "dense ms", "op ms", "speed-up", "matching", "outlier filtering",
                  "merge + unmerge", "merged SDPA"], rows, ["d", "d", "d", ".0f", ".0f", ".2f}x", "", "", "", ""],
                 [True] * 10)


_RAW = "median ms per stage"  # the heading of the section holding a run's records


def _shares_section(label: str, env: dict[str, Any], measured: list[dict]) -> Section:
    return Section(label, [f"Commit {env['commit']}: torch {env['torch']}, CPU dispatch {env['cpu_capability']}, "
                           f"{env['threads']} thread(s), load average {env['load_at_start']:.1f} at start, "
                           f"{env['load_average']:.1f} at the end."], shares_table(measured))


def stages_of(results: Results) -> list[dict]:
    """The records (as ``measure`` returns them) of a run's results."""
    return from_stage_table(next(s for s in results.sections if s.heading == _RAW).table)


def shares_section(results: Results) -> Section:
    """A run's shares table, headed by its label and where it ran."""
    return _shares_section(results.name.removeprefix("httm_stages_"), results.environment, stages_of(results))


def _commit() -> str:
    """Short hash of the checkout the kernel was imported from (the run's code version)."""
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], check=False)
    return done.stdout.strip() or "unknown"


def run(args: argparse.Namespace, command: str = "python -m benchmarks.httm_stages") -> Results:
    """The stage medians of every frame count, and their shares beside the baseline's."""
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    measured = measure(args.frames, args.repeats, {64: args.repeats_64})
    env: dict[str, Any] = {**environment(), "commit": _commit(), "load_at_start": round(load_start, 2)}
    baseline = args.out / f"httm_stages_{args.baseline}.json"
    before = ([shares_section(records.load(baseline.stem, args.out))]
              if args.baseline and args.baseline != args.label and baseline.is_file() else [])
    return Results(f"httm_stages_{args.label}", "HTTM stage shares on CPU", command, [
        Section(text=["Per stage: median ms and share of the op's median (outlier filtering and merge + unmerge are "
                      "differences of medians). Speed-up = median of per-round dense / op ratios."]),
        *before, _shares_section(args.label, env, measured), Section(_RAW, table=stage_table(measured))], env)


def _parser() -> argparse.ArgumentParser:
    parser = records.parser(__doc__)
    parser.add_argument("--frames", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--repeats-64", type=int, default=2, help="rounds at 64 frames (dense SDPA takes seconds)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--label", default="after")
    parser.add_argument("--baseline", default="before",
                        help="label of an earlier run to show beside this one (default: the 'before' run, if any)")
    return parser


def main(argv: list[str] | None = None) -> int:
    return records.run_and_write("benchmarks.httm_stages", _parser(), run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
