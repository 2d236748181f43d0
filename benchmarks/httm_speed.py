"""HTTM speed on CPU: one global attention layer, the matching cost, and a whole VGGT-style model.

All timings are medians over interleaved repeats measured side by side in one run (speed-ups are
medians of per-round ratios), so ratios stay meaningful on a shared machine.

1. One global attention layer at N = frames x 261 tokens (224x224 frames), 16 heads of dim 64:
   dense SDPA vs fxslim::httm_attention at the paper's defaults (Q 0.2 / KV 0.3 kept) in head-wise,
   uniform and global modes (target >= 7x; the kernel-FLOP limit is 1 / (0.2 * 0.3) = 16.7x), the
   head-wise op's stages timed on their own, and FlopCounterMode's count of both.
2. Matching: head-wise blocks (n_s 128, n_t 30) vs ``global`` mode (one block) at the same ratios,
   Q and K sides, over several frame counts (paper: 4.58x less merging cost at 1000 frames).
3. Layer speed-up against frames, beside the cost model's FLOP ratio (plot).
4. The whole ``vggt_small`` model (256 wide, 8 deep, 4 heads of dim 64) at 32 frames of a real
   photo sequence: eager dense vs ``fxslim.optimize(model, images, passes=["httm"])`` (target
   >= 3x), beside its global attention calls timed alone, which bound what HTTM can gain.
5. The single-layer comparison again at other thread counts (``--also-threads``).
6. Each stage's share of the op at 8-64 frames (``benchmarks.httm_stages``), beside the run
   recorded before issue 22's kernel work (``results/httm_stages_before.json``).

Records in benchmarks/results/httm_speed.json, rendered to .md, and the plots as .png. Run:
``python -m benchmarks.httm_speed [--frames 32] [--repeats 5] [--model-frames 32] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch.utils.flop_counter import FlopCounterMode

import fxslim
from benchmarks import httm_stages, records
from benchmarks.records import Results, Section, Table
from fxslim.app.timing import interleaved_samples, paired_ratio, round_ratios
from fxslim.cost_model.formulas.httm import httm_counts
from fxslim.models.multiview import camera_sequence
from fxslim.models.vggt import vggt_small
from fxslim.runtime import httm_native, native_kernels
from fxslim.runtime.httm import httm_apply_plan, httm_layout, httm_match, httm_plan

__all__ = ["run", "main"]

P, HEADS, DIM = 261, 16, 64
_OP = torch.ops.fxslim.httm_attention


def _qkv(frames: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, HEADS, frames * P, DIM, generator=g) for _ in range(3))


def _flop_ratio(frames: int, mode: str = "headwise") -> float:
    """Dense attention MACs / HTTM MACs (attention at the kept lengths + matching), cost model."""
    c = httm_counts(frames, P, mode=mode)
    n = frames * P
    heads_matching = 1 if mode == "uniform" else HEADS
    httm = HEADS * c["kept_q"] * c["kept_kv"] * 2 * DIM + heads_matching * DIM * (c["pairs_q"] + c["pairs_kv"])
    return HEADS * n * n * 2 * DIM / httm


def _counted_flops(fn, frames: int) -> int:
    """FlopCounterMode's count for ``fn(q, k, v)`` on meta tensors (it skips CPU SDPA on real ones)."""
    q = torch.empty(1, HEADS, frames * P, DIM, device="meta")
    with FlopCounterMode(display=False) as counter:
        fn(q, q, q)
    return counter.get_total_flops()


def _without_kernels(fn):
    def run():
        with native_kernels.disabled():
            return fn()
    return run


def _layer(frames: int, repeats: int) -> tuple[Section, dict[str, list[float]]]:
    q, k, v = _qkv(frames)
    plan = httm_plan(q, k, frames, P)
    short = tuple(t[:, :, :m].contiguous() for t, m in ((q, plan.q_length_max), (k, plan.kv_length),
                                                          (v, plan.kv_length)))
    q_layout, kv_layout = httm_layout(frames, P, 5, 0.9, 128, 30), httm_layout(frames, P, 5, 0.7, 128, 30)
    variants = {  # name -> (the cost model's mode, or None for dense and the op's stages; the call)
        "dense SDPA": (None, lambda: F.scaled_dot_product_attention(q, k, v)),
        "HTTM head-wise (paper defaults)": ("headwise", lambda: _OP(q, k, v, frames, P)),
        "HTTM uniform (one merge for all heads)": ("uniform", lambda: _OP(q, k, v, frames, P, mode="uniform")),
        "HTTM global (matching over the whole sequence)": ("global", lambda: _OP(q, k, v, frames, P, mode="global")),
        "HTTM head-wise + proportional attention": (
            "headwise", lambda: _OP(q, k, v, frames, P, proportional_attention=True)),
        "HTTM head-wise, ATen only (no native kernels)": ("headwise", _without_kernels(lambda: _OP(q, k, v, frames, P))),
        "- plan: matching + outlier filtering": (None, lambda: httm_plan(q, k, frames, P)),
        "- matching Q and K only": (None, lambda: (httm_match(q, q_layout), httm_match(k, kv_layout))),
        "- apply: merge + attention + unmerge": (None, lambda: httm_apply_plan(q, k, v, plan)),
        "- SDPA alone at the merged lengths": (None, lambda: F.scaled_dot_product_attention(*short)),
    }
    samples = interleaved_samples({name: fn for name, (_, fn) in variants.items()}, repeats)
    dense = samples["dense SDPA"]
    n = frames * P
    dense_flops, httm_flops = (_counted_flops(fn, frames) for fn in (F.scaled_dot_product_attention,
                                                                       lambda *qkv: _OP(*qkv, frames, P)))
    rows = []
    for name, t in samples.items():
        ratios = round_ratios(dense, t)
        mode = variants[name][0]
        flop_ratio = 1.0 if name == "dense SDPA" else _flop_ratio(frames, mode) if mode else None
        rows.append([name, statistics.median(t) * 1e3, statistics.median(ratios), min(ratios), max(ratios), flop_ratio])
    return Section(
        f"1. One global attention layer: {frames} frames x {P} tokens = N {n}, {HEADS} heads x {DIM}, fp32",
        [f"Measured merged lengths (head-wise): queries {plan.q_lengths.min().item()}-{plan.q_length_max} per head "
         f"({plan.q_length_max / n:.3f} N, the kernel runs at the longest head), keys/values {plan.kv_length} "
         f"({plan.kv_length / n:.3f} N); outliers {int(plan.outliers.sum())} (= round(0.1 * H * N) = "
         f"{round(0.1 * HEADS * n)}). Rows starting with - time one stage of the head-wise op on its own."],
        Table(["variant", "median ms", "speed-up vs dense", "min over rounds", "max over rounds",
               "cost-model FLOP ratio"], rows, ["", ".0f", ".2f}x", ".2f}x", ".2f}x", ".1f}x"]),
        [f"FlopCounterMode (the op's registered formula): dense {dense_flops / 1e9:.1f} GFLOP, HTTM head-wise "
         f"{httm_flops / 1e9:.1f} GFLOP ({dense_flops / httm_flops:.1f}x fewer)."]), samples


def _matching(frame_counts: list[int], repeats: int) -> tuple[Section, dict[int, float]]:
    rows, ratios = [], {}
    for frames in frame_counts:
        q, k, _ = _qkv(frames, seed=frames)
        layouts = {whole: (httm_layout(frames, P, 5, 0.9, 128, 30, whole_sequence=whole),
                           httm_layout(frames, P, 5, 0.7, 128, 30, whole_sequence=whole)) for whole in (False, True)}
        cases = {}
        for whole, (lq, lk) in layouts.items():
            cases[("match", whole)] = lambda lq=lq, lk=lk: (httm_match(q, lq), httm_match(k, lk))
            cases[("plan", whole)] = lambda whole=whole: httm_plan(q, k, frames, P, mode="global" if whole else "headwise")
        s = interleaved_samples(cases, repeats)
        blocked, whole = httm_counts(frames, P), httm_counts(frames, P, mode="global")
        macs = (whole["pairs_q"] + whole["pairs_kv"]) / (blocked["pairs_q"] + blocked["pairs_kv"])
        ratios[frames] = paired_ratio(s[("match", True)], s[("match", False)])
        rows.append([frames, frames * P, statistics.median(s[("match", False)]) * 1e3,
                     statistics.median(s[("match", True)]) * 1e3, ratios[frames], macs,
                     paired_ratio(s[("plan", True)], s[("plan", False)])])
    return Section(
        "2. Matching cost: head-wise blocks vs global mode at the same ratios (Q 0.9, K/V 0.7 removed)",
        ["matching = cosine similarity + best destination for Q and K (``httm_match``); merge cost = matching + "
         "outlier filtering (``httm_plan``), the part the paper compares with FastVGGT's global matching."],
        Table(["frames", "N", "matching ms (blocks)", "matching ms (global)", "global / blocks, time",
               "global / blocks, MACs", "merge cost global / blocks, time"], rows,
              ["d", "d", ".0f", ".0f", ".2f}x", ".2f}x", ".2f}x"])), ratios


def _dense_and_httm(frames: int, repeats: int) -> dict[str, list[float]]:
    """Per-round times of dense SDPA ("dense") and the head-wise op ("httm") on one layer, side by side."""
    q, k, v = _qkv(frames)
    return interleaved_samples({"dense": lambda: F.scaled_dot_product_attention(q, k, v),
                                "httm": lambda: _OP(q, k, v, frames, P)}, repeats)


def _sweep(frame_counts: list[int], repeats: int, known: dict[int, dict[str, list[float]]]) -> tuple[Section, dict]:
    rows, curve = [], {}
    for frames in frame_counts:
        if frames in known:
            dense, httm = known[frames]["dense SDPA"], known[frames]["HTTM head-wise (paper defaults)"]
        else:
            s = _dense_and_httm(frames, repeats)
            dense, httm = s["dense"], s["httm"]
        curve[frames] = (paired_ratio(dense, httm), _flop_ratio(frames))
        rows.append([frames, frames * P, statistics.median(dense) * 1e3, statistics.median(httm) * 1e3, *curve[frames]])
    return Section("3. Layer speed-up against the number of frames (head-wise, paper defaults)", table=Table(
        ["frames", "N", "dense ms", "HTTM ms", "measured speed-up", "cost-model FLOP ratio"], rows,
        ["d", "d", ".0f", ".0f", ".2f}x", ".1f}x"])), curve


def _model(frames: int, repeats: int) -> Section:
    torch.manual_seed(0)
    model = vggt_small().eval()
    images = camera_sequence("astronaut", frames, 224).images[None]
    res = fxslim.optimize(model, (images,), passes=["httm"], strict=True)
    optimized = res.module
    layers, heads = model.config.depth, model.config.num_heads
    g = torch.Generator().manual_seed(frames)
    q, k, v = (torch.randn(1, heads, frames * P, DIM, generator=g) for _ in range(3))
    with torch.no_grad():
        samples = interleaved_samples({
            "dense": lambda: model(images), "httm": lambda: optimized(images),
            "dense attention": lambda: F.scaled_dot_product_attention(q, k, v),
            "httm attention": lambda: _OP(q, k, v, frames, P),
        }, repeats)
        depth, depth_httm = model(images)["depth"], optimized(images)["depth"]
    error = float((depth_httm - depth).norm() / depth.norm())
    attention = statistics.median(samples["dense attention"])
    # the model outside its global attention calls, per round from the HTTM model (the smaller
    # difference, so the least noisy one): what no attention kernel can speed up
    rest = [m - layers * a for m, a in zip(samples["httm"], samples["httm attention"], strict=True)]
    ceiling = statistics.median(d / r for d, r in zip(samples["dense"], rest, strict=True))
    return Section(
        f"4. Whole model: vggt_small ({model.config.embed_dim} wide, {layers} deep, {heads} heads x {DIM}), "
        f"{frames} frames of 224x224 (N {frames * P} in each global layer), eager",
        [f"{res.report.rewritten('httm')} global attentions rewritten; skipped {dict(res.report.skipped('httm'))}."],
        Table(["model", "median s", "speed-up"],
              [["dense", statistics.median(samples["dense"]), 1.0],
               ["HTTM (fxslim.optimize, passes=['httm'])", statistics.median(samples["httm"]),
                paired_ratio(samples["dense"], samples["httm"])]], ["", ".2f", ".2f}x"]),
        [f"One global attention call alone ({heads} heads): dense SDPA {attention * 1e3:.0f} ms, HTTM "
         f"{statistics.median(samples['httm attention']) * 1e3:.0f} ms "
         f"({paired_ratio(samples['dense attention'], samples['httm attention']):.2f}x). "
         f"The model outside its {layers} global attention calls takes about {statistics.median(rest):.2f} s (HTTM "
         f"model minus {layers} x the HTTM call, per round), so even free global attention would make it at most "
         f"{ceiling:.2f}x faster (median over rounds of dense model / that rest).",
         "",
         f"Depth output relative error (random weights, LayerScale 0.01): {error:.2e}."])


def _threads(frames: int, counts: list[int], repeats: int) -> Section:
    rows = []
    previous = torch.get_num_threads()
    for count in counts:
        torch.set_num_threads(count)
        s = _dense_and_httm(frames, repeats)
        rows.append([count, statistics.median(s["dense"]) * 1e3, statistics.median(s["httm"]) * 1e3,
                     paired_ratio(s["dense"], s["httm"])])
    torch.set_num_threads(previous)
    return Section(f"5. Thread count ({frames} frames): dense SDPA vs HTTM head-wise, each pair timed side by side",
                   table=Table(["threads", "dense ms", "HTTM ms", "speed-up"], rows, ["d", ".0f", ".0f", ".2f}x"]))


def _before() -> Results | None:
    """The stage records of the run before issue 22's kernel work, if they are in the results."""
    return records.load(httm_stages.BEFORE) if (records.RESULTS / f"{httm_stages.BEFORE}.json").is_file() else None


def _stages(frame_counts: list[int], repeats: int, repeats_64: int) -> list[Section]:
    measured = httm_stages.measure(frame_counts, repeats, {64: repeats_64})
    text = ["Outlier filtering = plan - matching and merge + unmerge = apply - merged SDPA (differences of "
            "medians); shares are of the op's median. The earlier run was not interleaved with this one: "
            "compare shares and speed-ups, not absolute times."]
    before = _before()
    if before is not None:
        env = before.environment
        text += ["", f"Before issue 22's kernel work: commit {env['commit']}, {records.cpu_of(env)}, "
                     f"load average {env['load_at_start']:.1f}-{env['load_average']:.1f} "
                     f"(``python -m benchmarks.httm_stages --label before``)."]
    shown = [Section("before", table=httm_stages.shares_table(httm_stages.stages_of(before)))] if before else []
    return [Section("6. Where the op's time goes: each stage's share, per frame count (head-wise, paper defaults)",
                    text), *shown, Section("this run", table=httm_stages.shares_table(measured))]


def _before_speedup(frames: int) -> str:
    """'; before issue 22's kernel work: Nx' from the recorded before run, if it has these frames."""
    before = _before()
    speedups = {r["frames"]: r["speedup"] for r in httm_stages.stages_of(before)} if before else {}
    if frames not in speedups:
        return ""
    cpu = before.environment.get("cpu")
    where = ("same CPU" if cpu == records.cpu_name() else f"on {cpu}") if cpu else "CPU not recorded"
    return f"; before issue 22's kernel work ({where}, dispatch {before.environment['cpu_capability']}): " \
           f"{speedups[frames]:.2f}x, section 6"


def _plot(curve: dict[int, tuple[float, float]], matching: dict[int, float]) -> Figure:
    fig = Figure(figsize=(11, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 2, 1)
    frames = sorted(curve)
    ax.plot(frames, [curve[f][0] for f in frames], marker="o", label="measured (CPU, median)")
    ax.plot(frames, [curve[f][1] for f in frames], marker="s", linestyle="--", label="cost-model FLOP ratio")
    ax.axhline(1 / (0.2 * 0.3), color="grey", linestyle=":", label="kernel-FLOP limit 16.7x")
    ax.set_xlabel("frames (x 261 tokens)")
    ax.set_ylabel("dense / HTTM")
    ax.set_title("One global attention layer: HTTM speed-up")
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    ax = fig.add_subplot(1, 2, 2)
    frames = sorted(matching)
    ax.plot(frames, [matching[f] for f in frames], marker="o")
    ax.axhline(4.58, color="grey", linestyle=":", label="paper: 4.58x at 1000 frames")
    ax.set_xlabel("frames (x 261 tokens)")
    ax.set_ylabel("global-mode / blocked matching time")
    ax.set_title("Matching cost: blocks vs whole sequence")
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return fig


def run(args: argparse.Namespace, command: str = "python -m benchmarks.httm_speed") -> tuple[Results, dict[str, Any]]:
    """Every section, and the plots of sections 2 and 3."""
    torch.set_num_threads(args.threads)
    start, load = time.perf_counter(), os.getloadavg()[0]
    layer, layer_samples = _layer(args.frames, args.repeats)
    matching_section, matching = _matching(args.matching_frames, args.repeats)
    sweep, curve = _sweep(args.sweep_frames, args.repeats, {args.frames: layer_samples})
    model = [_model(args.model_frames, args.model_repeats)] if args.model_frames else []
    threads = [_threads(args.frames, [args.threads, *args.also_threads], args.repeats)] if args.also_threads else []
    stages = _stages(args.stage_frames, args.repeats, args.stage_repeats_64) if args.stage_frames else []
    speedup = paired_ratio(layer_samples["dense SDPA"], layer_samples["HTTM head-wise (paper defaults)"])
    intro = Section(text=[
        f"{platform.machine()}, CPU dispatch level {torch.backends.cpu.get_cpu_capability()} "
        f"(torch.backends.cpu.get_cpu_capability()); HTTM's native kernels: {httm_native.status()}; "
        f"{args.threads} thread(s), {args.repeats} interleaved "
        f"repeats{f' ({args.model_repeats} for the whole model)' if args.model_frames else ''}, medians; "
        f"load average {load:.1f} at start (shared machine: compare ratios, not absolute times).",
        "",
        f"**One global layer at {args.frames} frames: HTTM {speedup:.2f}x faster than dense SDPA** (target >= 7x"
        f"{_before_speedup(args.frames)}). Matching, global mode / blocks: "
        + ", ".join(f"{matching[f]:.2f}x at {f} frames" for f in sorted(matching)) + " (target >= 4x)."])
    end = Section(text=[f"Run time {time.perf_counter() - start:.0f} s."])
    results = Results("httm_speed", "HTTM speed on CPU", command,
                      [intro, layer, matching_section, sweep, *model, *threads, *stages, end])
    return results, {"": _plot(curve, matching)}


def _parser() -> argparse.ArgumentParser:
    parser = records.parser(__doc__)
    parser.add_argument("--frames", type=int, default=32, help="frames of the single-layer comparison")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--matching-frames", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--sweep-frames", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--model-frames", type=int, default=32)
    parser.add_argument("--model-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared machine OpenMP barriers dominate small ops)")
    parser.add_argument("--also-threads", type=int, nargs="*", default=[2],
                        help="other thread counts for the single-layer comparison (section 5)")
    parser.add_argument("--stage-frames", type=int, nargs="*", default=[8, 16, 32, 64],
                        help="frame counts of the stage-share table (section 6; none skips it)")
    parser.add_argument("--stage-repeats-64", type=int, default=2, help="rounds of the stage table at 64 frames")
    return parser


def main(argv: list[str] | None = None) -> int:
    return records.run_and_write("benchmarks.httm_speed", _parser(), run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
