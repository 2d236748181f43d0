"""Cost-model prediction for VGGT-1B with and without HTTM, as a formula in the number of frames.

The VGGT-architecture model at VGGT-1B sizes (fxslim.models.vggt_1b, meta device: no memory, no
weights) at 518x392 inputs (P = 1041 tokens per frame) is rewritten with ``fxslim.optimize(...,
passes=["httm"])`` (paper setting Q 0.2 / KV 0.3 kept, n_s 128, n_t 30). The cost model then
gives the aggregator's MACs with frames as a sympy symbol, dense and with HTTM. Heads: the depth
and camera heads are costed numerically at 2 and 4 frames and fitted exactly (per-frame work plus
the camera trunk's attention across frames), checked at the first requested frame count. Our model
embeds patches with one conv where VGGT runs DINOv2 ViT-L/14 (24 blocks per frame), so a second
column adds that embedder's cost per frame, costed by the cost model on timm's architecture.

FLOP ratios are printed beside the paper's measured end-to-end speed-ups (A100, bf16,
FlashAttention; VGGT* vs VGGT*+HTTM at Q 0.2 / KV 0.3, Table 3). Records in
benchmarks/results/httm_vggt1b_cost.json, rendered to .md, and the plot as .png.

Run: ``python -m benchmarks.httm_vggt1b_cost [--frames 100 300 500 1000]``.
"""

from __future__ import annotations

import time

import sympy
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

import fxslim
from benchmarks import records
from benchmarks.records import Results, Section, Table
from fxslim.models.vggt import vggt_1b

__all__ = ["run", "main"]
PAPER_SPEEDUP = {100: 2.1, 300: 3.7, 500: 5.0, 1000: 7.0}  # HTTM paper, Table 3, Q 0.20 / KV 0.30


def _report(module, images, **kw):
    return fxslim.estimate(module, (images,), **kw)


def _embedder_macs_per_frame(height: int, width: int) -> int | None:
    """MACs of DINOv2 ViT-L/14 with 4 registers on one frame (None when timm is missing)."""
    try:
        import timm
    except ImportError:
        return None
    with torch.device("meta"):
        vit = timm.create_model("vit_large_patch14_reg4_dinov2", pretrained=False, img_size=(height, width),
                                num_classes=0).eval()
    return int(_report(vit, torch.empty(1, 3, height, width, device="meta")).total.macs)


def _multiple_of(expr: sympy.Expr, frames: sympy.Symbol, n_t: int) -> sympy.Expr:
    """The expression at frames a multiple of n_t (no remainder chunk) with round-half-even tie terms
    dropped (f*N is then a whole number): a polynomial in frames."""
    k = sympy.Symbol("k", integer=True, positive=True)
    expr = expr.subs(frames, n_t * k).replace(lambda e: isinstance(e, sympy.Piecewise), lambda e: sympy.Integer(0))
    return sympy.expand(expr.subs(k, frames / n_t))


def _heads_fit(model, dense_agg, frames: sympy.Symbol, height: int, width: int):
    """heads(S) = a*S + b*S^2 from exact numeric costs at 2 and 4 frames."""
    values = {}
    for s in (2, 4):
        images = torch.empty(1, s, 3, height, width, device="meta")
        values[s] = int(_report(model, images).total.macs) - int(dense_agg.subs(frames, s))
    b = sympy.Rational(values[4] - 2 * values[2], 8)
    a = sympy.Rational(values[2], 2) - 2 * b
    return a * frames + b * frames**2


def _fmt(expr: sympy.Expr) -> str:
    """A polynomial in frames as '1.234e+10·frames^2 + ...' (other expressions as sympy prints them)."""
    expr = sympy.expand(sympy.sympify(expr))
    if not expr.free_symbols or not expr.is_polynomial(*expr.free_symbols):
        return str(expr)
    (symbol,) = expr.free_symbols
    terms = sympy.Poly(expr, symbol).terms()
    return " + ".join(f"{float(c):.4g}" + (f"·{symbol}" if e == 1 else f"·{symbol}^{e}" if e else "")
                      for (e,), c in terms)


def run(frame_counts: list[int], height: int = 392, width: int = 518, config: str = "httm:q=0.2,kv=0.3",
        command: str = "python -m benchmarks.httm_vggt1b_cost") -> tuple[Results, dict[str, Figure]]:
    """The aggregator's MACs as formulas in frames, dense and with HTTM, the heads fitted, and the
    FLOP ratios at ``frame_counts`` beside the paper's measured speed-ups; and their plot."""
    start = time.perf_counter()
    with torch.device("meta"):
        model = vggt_1b().eval()
    example = torch.empty(1, 4, 3, height, width, device="meta")
    res = fxslim.optimize(model, (example,), passes=[config], strict=True)
    cfg = res.passes[0]
    dense_report = _report(model.aggregator, example, symbolic={"frames": (0, 1)})
    httm_report = _report(res.module.aggregator, example, symbolic={"frames": (0, 1)})
    frames = dense_report.symbols["frames"]
    dense_agg = dense_report.total.macs
    httm_agg = httm_report.total.macs.xreplace({httm_report.symbols["frames"]: frames})
    heads = _heads_fit(model, dense_agg, frames, height, width)
    check = frame_counts[0]
    heads_check = int(_report(model, torch.empty(1, check, 3, height, width, device="meta")).total.macs) \
        - int(dense_agg.subs(frames, check))
    embed = _embedder_macs_per_frame(height, width)
    conv_embed = sum(r.macs for r in dense_report.rows if r.fqn.startswith("patch_embed"))
    global_attn = sum(r.macs for r in dense_report.rows if r.kind == "attention" and r.fqn.startswith("global"))
    p = next(e.info["tokens_per_frame"] for e in res.report.entries("httm") if e.status == "rewritten")

    def at(expr, s):
        return int(sympy.sympify(expr).subs(frames, s))

    text = [
        f"Model: fxslim.models.vggt_1b (aggregator: 24 frame + 24 global blocks, 1024 wide, 16 heads), "
        f"{width}x{height} inputs, P = {p} tokens per frame; pass `{cfg.to_string()}` "
        f"(removed by merging: Q {cfg.q_removed}, K/V {cfg.kv_removed}; outliers {cfg.outliers}, n_s {cfg.n_s}, n_t {cfg.n_t}); "
        f"{res.report.rewritten('httm')} global attentions rewritten, skipped {dict(res.report.skipped('httm'))}. "
        "MACs from the cost model (FLOPs = 2·MACs), frames symbolic.",
        "",
        f"- Dense aggregator MACs = {_fmt(dense_agg)}",
        f"- HTTM aggregator MACs (frames a multiple of {cfg.n_t}) = {_fmt(_multiple_of(httm_agg, frames, cfg.n_t))}",
        f"- Heads (depth + camera) MACs = {_fmt(heads)} (fit at 2 and 4 frames; at {check} frames the fit gives "
        f"{at(heads, check):.4g}, a direct estimate {heads_check:.4g})",
        f"- Patch embedder: ours (one conv) {_fmt(sympy.sympify(conv_embed))} MACs; DINOv2 ViT-L/14 reg4 "
        + (f"{embed:.4g} MACs per frame" if embed else "not available (timm missing)"),
    ]
    rows = []
    curves: dict[str, list[float]] = {"aggregator": [], "model": [], "model + DINOv2": []}
    conv_per_frame = int(sympy.sympify(conv_embed).subs(frames, 1))
    grid = sorted({*range(10, 100, 10), *range(100, 1001, 50), *frame_counts})
    for s in grid:
        d_agg, h_agg, hd = at(dense_agg, s), at(httm_agg, s), at(heads, s)
        extra = (embed - conv_per_frame) * s if embed else 0
        curves["aggregator"].append(d_agg / h_agg)
        curves["model"].append((d_agg + hd) / (h_agg + hd))
        curves["model + DINOv2"].append((d_agg + hd + extra) / (h_agg + hd + extra))
        if s in frame_counts:
            rows.append([s, s * p, 2 * (d_agg + hd) / 1e12, 2 * (h_agg + hd) / 1e12,
                         at(global_attn, s) / (d_agg + hd), curves["model"][-1],
                         curves["model + DINOv2"][-1] if embed else None, PAPER_SPEEDUP.get(s)])
    table = Table(["frames", "N", "dense TFLOP", "HTTM TFLOP", "global attention share of dense FLOPs",
                   "FLOP ratio (our model)", "FLOP ratio (+ DINOv2 embedder)", "paper measured speed-up"],
                  rows, ["d", "d", ".1f", ".1f", ".1%", ".2f}x", ".2f}x", ".1f}x"])
    after = [
        "FLOP ratios assume time proportional to FLOPs. The paper's wall-clock speed-ups also pay for memory "
        "traffic, the merge/unmerge gathers and kernel efficiency at the shorter lengths, so they sit below the "
        "FLOP ratios; the growth with the number of frames (attention is quadratic in N, everything else linear) "
        "is what the two columns share.",
        "",
        f"Run time {time.perf_counter() - start:.0f} s.",
    ]
    results = Results("httm_vggt1b_cost", "VGGT-1B cost with and without HTTM", command,
                      [Section(text=text, table=table, after=after)])
    return results, {"": _plot(grid, curves)}


def main(argv: list[str] | None = None) -> int:
    parser = records.parser(__doc__)
    parser.add_argument("--frames", type=int, nargs="+", default=[100, 300, 500, 1000])
    parser.add_argument("--height", type=int, default=392)
    parser.add_argument("--width", type=int, default=518)
    parser.add_argument("--config", default="httm:q=0.2,kv=0.3", help="pass spec (kept fractions)")
    return records.run_and_write(
        "benchmarks.httm_vggt1b_cost", parser,
        lambda args, command: run(args.frames, args.height, args.width, args.config, command), argv)


def _plot(grid: list[int], curves: dict[str, list[float]]) -> Figure:
    fig = Figure(figsize=(7, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, values in curves.items():
        ax.plot(grid, values, label=f"FLOP ratio: {name}")
    ax.scatter(list(PAPER_SPEEDUP), list(PAPER_SPEEDUP.values()), color="black", zorder=3,
               label="paper, measured end-to-end (A100)")
    ax.set_xscale("log")
    ax.set_xlabel("frames (518x392)")
    ax.set_ylabel("dense / HTTM")
    ax.set_title("VGGT-1B: predicted FLOP reduction with HTTM (Q 0.2 / KV 0.3)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    raise SystemExit(main())
