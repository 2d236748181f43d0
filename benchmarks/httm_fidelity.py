"""Fidelity of HTTM on real photos with random weights: head-wise vs uniform vs global merging.

Multi-view sequences: a simulated camera moves over a scikit-image photo (overlapping, rotated,
zoomed windows; fxslim.models.multiview.camera_sequence), 224x224, 8 and 32 frames by default.
Model: the VGGT architecture at 256 wide, 24 deep, 4 heads of dim 64 (``vggt_small`` made 24
deep, so the depth head reads layers 4, 11, 17, 23 as VGGT's does), random weights, LayerScale
initialised to 1 so that attention changes reach the outputs (VGGT initialises it to 0.01, under
which random blocks barely touch the residual stream and all variants look alike). Every variant
keeps the same fractions (Q 0.2, K/V 0.3 by default) and is applied with ``fxslim.optimize``:

- per layer: cosine similarity between each global attention's HTTM output and dense attention on
  the same q, k, v (mean over tokens of the per-token cosine of the heads-concatenated output; on
  a fixed random sample of query rows when N is large);
- aggregator outputs at the layers the depth head reads: mean per-token cosine to the dense model;
- depth head output: relative error ||depth - depth_dense|| / ||depth_dense||.

Records in benchmarks/results/httm_fidelity.json, rendered to .md, and the plot as .png. Run:
``python -m benchmarks.httm_fidelity [--frames 8 32] [--photos astronaut] [--init-values 1.0]``.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from rich.progress import track
from torch.utils._python_dispatch import TorchDispatchMode

import fxslim
from benchmarks import records
from benchmarks.records import Results, Section, Table
from fxslim.models.multiview import camera_sequence
from fxslim.models.vggt import CONFIGS, VGGT

__all__ = ["run", "main"]
_OP = torch.ops.fxslim.httm_attention.default
_ARG_NAMES = [a.name for a in _OP._schema.arguments]


def _variants(q: float, kv: float, outliers: float) -> dict[str, str]:
    kept = f"q={q},kv={kv}"
    return {
        "head-wise, outliers": f"httm:{kept},outliers={outliers}",
        "head-wise, no outlier filtering": f"httm:{kept},outliers=0",
        "uniform, outliers": f"httm:{kept},outliers={outliers},mode=uniform",
        "uniform, no outlier filtering": f"httm:{kept},outliers=0,mode=uniform",
        "global, outliers": f"httm:{kept},outliers={outliers},mode=global",
        "global, no outlier filtering": f"httm:{kept},outliers=0,mode=global",
        "head-wise, outliers, proportional attention": f"httm:{kept},outliers={outliers},proportional_attention=true",
    }


def _token_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over tokens of the cosine between rows of a and b ([..., tokens, channels])."""
    return float(F.cosine_similarity(a.flatten(0, -2).double(), b.flatten(0, -2).double(), dim=-1).mean())


class _LocalFidelity(TorchDispatchMode):
    """Compares every HTTM op call with dense SDPA on the same q, k, v (sampled query rows)."""

    def __init__(self, sample: int, seed: int) -> None:
        super().__init__()
        self.sample, self.seed, self.cosines = sample, seed, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is _OP:
            named = dict(zip(_ARG_NAMES, args)) | kwargs
            q, k, v = named["q"], named["k"], named["v"]
            n = q.shape[2]
            rows = torch.arange(n)
            if n > self.sample:
                rows = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))[: self.sample].sort().values
            dense = F.scaled_dot_product_attention(q[:, :, rows], k, v, scale=named.get("scale"))
            # [B, H, rows, d_v] -> [B, rows, H*d_v]: the vector the output projection sees
            self.cosines.append(_token_cosine(out[:, :, rows].transpose(1, 2).flatten(2),
                                              dense.transpose(1, 2).flatten(2)))
        return out


def _run(model: torch.nn.Module, images: torch.Tensor, probe: _LocalFidelity | None = None):
    """(aggregator outputs by layer, depth) of one forward pass."""
    seen = {}

    def keep(module, inputs, output) -> None:
        seen["agg"] = output[0]

    handle = model.aggregator.register_forward_hook(keep)
    try:
        with torch.no_grad():
            if probe is None:
                result = model(images)
            else:
                with probe:
                    result = model(images)
    finally:
        handle.remove()
    return seen["agg"], result["depth"]


def _plot(per_layer: dict[tuple[str, int], dict[str, list[float]]]) -> Figure:
    keys = list(per_layer)
    fig = Figure(figsize=(6.5 * len(keys), 4.2), dpi=100)
    FigureCanvasAgg(fig)
    for i, key in enumerate(keys):
        ax = fig.add_subplot(1, len(keys), i + 1)
        for label, values in per_layer[key].items():
            ax.plot(range(len(values)), values, marker=".", label=label)
        ax.set_title(f"{key[0]}, {key[1]} frames: global attention output vs dense")
        ax.set_xlabel("global layer")
        ax.set_ylabel("mean per-token cosine")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def run(args: argparse.Namespace,
        command: str = "python -m benchmarks.httm_fidelity") -> tuple[Results, dict[str, Figure]]:
    """Every variant against the dense model on every sequence: records and the per-layer plot."""
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    config = CONFIGS[args.config]
    model = VGGT(type(config)(**{**config.__dict__, "depth": args.depth, "init_values": args.init_values,
                                 "head_layers": None})).eval()
    layers = model.config.layers_read
    sequences = {(photo, s): camera_sequence(photo, s, args.size, seed=args.seed).images[None]
                 for photo in args.photos for s in args.frames}
    dense = {key: _run(model, images) for key, images in sequences.items()}
    variants = _variants(args.q, args.kv, args.outliers)
    rows: dict[tuple[str, int], list[list]] = {key: [] for key in sequences}
    per_layer: dict[tuple[str, int], dict[str, list[float]]] = {key: {} for key in sequences}
    # the rewritten graph computes frames = N // P, so a short example sequence serves every length
    example = camera_sequence(args.photos[0], 2, args.size, seed=args.seed).images[None]
    for label, spec in track(list(variants.items()), description="HTTM variants", transient=True):
        optimized = fxslim.optimize(model, (example,), passes=[spec], strict=True).module
        for key, images in sequences.items():
            probe = _LocalFidelity(args.sample, args.seed)
            agg, depth = _run(optimized, images, probe)
            dense_agg, dense_depth = dense[key]
            agg_cos = [_token_cosine(agg[i], dense_agg[i]) for i in layers]
            error = float((depth - dense_depth).norm() / dense_depth.norm())
            per_layer[key][label] = probe.cosines
            rows[key].append([label, sum(probe.cosines) / len(probe.cosines), min(probe.cosines), *agg_cos, error])
    p = args.size // model.config.patch_size
    sections = [Section(text=[
        f"Model: VGGT architecture, {model.config.embed_dim} wide, {model.config.depth} deep, "
        f"{model.config.num_heads} heads of dim {model.config.head_dim}, LayerScale init {args.init_values}, "
        f"random weights (seed {args.seed}); {args.size}x{args.size} frames ({p}x{p} patches + 5 special = "
        f"{p * p + 5} tokens per frame). Kept: Q {args.q} (incl. {args.outliers} outliers where filtered), "
        f"K/V {args.kv}; n_s 128, n_t 30. Local cosine: HTTM vs dense attention on the same q, k, v "
        f"(<= {args.sample} sampled query rows per layer), mean over the {model.config.depth} global layers and "
        "the worst layer. Aggregator cosine: mean per-token cosine of the [frame, global] outputs the depth "
        "head reads."])]
    columns = ["variant", "local cos (mean)", "local cos (worst layer)",
               *(f"aggregator cos L{i}" for i in layers), "depth rel. error"]
    formats = ["", ".4f", ".4f", *(".5f" for _ in layers), ".2e"]
    for (photo, frames), table in rows.items():
        sections.append(Section(f"{photo}, {frames} frames (N = {frames * (p * p + 5)})",
                                table=Table(columns, table, formats)))
    sections.append(Section(text=[f"Run time {time.perf_counter() - start:.0f} s, {args.threads} threads."]))
    results = Results("httm_fidelity", "HTTM fidelity on real photos, random weights", command, sections)
    return results, {"": _plot(per_layer)}


def main(argv: list[str] | None = None) -> int:
    parser = records.parser(__doc__)
    parser.add_argument("--frames", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--photos", nargs="+", default=["astronaut"])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--config", default="vggt_small", choices=sorted(CONFIGS))
    parser.add_argument("--depth", type=int, default=24)
    parser.add_argument("--init-values", type=float, default=1.0,
                        help="LayerScale init (VGGT's is 0.01: with random weights the residual stream then hides "
                             "what attention does, and every variant looks lossless downstream)")
    parser.add_argument("--q", type=float, default=0.2, help="fraction of queries kept")
    parser.add_argument("--kv", type=float, default=0.3, help="fraction of keys/values kept")
    parser.add_argument("--outliers", type=float, default=0.1)
    parser.add_argument("--sample", type=int, default=2048, help="query rows compared per layer")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    return records.run_and_write("benchmarks.httm_fidelity", parser, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
