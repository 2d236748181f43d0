"""HTTM on a VGGT-style model: merge tokens in every global attention of a multi-view sequence.

A simulated camera moves over a scikit-image photo (16 overlapping 224x224 views). The model is
the VGGT architecture at a small size with random weights. ``fxslim.optimize`` finds the global
attention layers (the frame layout comes from the RoPE positions), replaces their SDPA with
``fxslim::httm_attention`` at the paper's setting (20 % of queries, 30 % of keys/values kept),
and the script prints what was rewritten, how close the outputs stay and how much faster it runs.

Run: ``python examples/httm_vggt.py [--frames 16]`` (about half a minute on a laptop CPU; fewer
frames run faster, with less to merge).
"""

import argparse
import time

import torch
import torch.nn.functional as F

import fxslim
from fxslim.models.multiview import camera_sequence
from fxslim.models.vggt import vggt_small


def timed(fn):
    """(output, seconds) of one call."""
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=16, help="views in the camera sequence")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = vggt_small(init_values=1.0).eval()  # LayerScale 1: attention changes reach the outputs
    images = camera_sequence("astronaut", frames=args.frames, size=224).images[None]  # [1, frames, 3, 224, 224]

    result = fxslim.optimize(model, images, passes=["httm:q=0.2,kv=0.3"])
    fast = result.module
    rewritten = [e for e in result.report.entries("httm") if e.status == "rewritten"]
    info = rewritten[0].info
    print(f"rewrote {len(rewritten)} global attentions ({rewritten[0].fqn}, ...): {info['example_frames']} frames x "
          f"{info['tokens_per_frame']} tokens = {info['example_frames'] * info['tokens_per_frame']}, "
          f"keeping {info['kept_q']} queries and {info['kept_kv']} keys/values per head")
    print("skipped (reason: count):", dict(result.report.skipped("httm")))

    with torch.no_grad():  # dense and HTTM alternate for two rounds; the faster round of each counts
        dense_out, dense_s = timed(lambda: model(images))
        httm_out, httm_s = timed(lambda: fast(images))
        dense_s = min(dense_s, timed(lambda: model(images))[1])
        httm_s = min(httm_s, timed(lambda: fast(images))[1])
    depth, depth_httm = dense_out["depth"], httm_out["depth"]
    relative = float((depth_httm - depth).norm() / depth.norm())
    cosine = float(F.cosine_similarity(depth_httm.flatten().double(), depth.flatten().double(), dim=0))
    print(f"depth: relative error {relative:.2e}, cosine {cosine:.6f}")
    print(f"forward: dense {dense_s:.2f} s, HTTM {httm_s:.2f} s -> {dense_s / httm_s:.2f}x faster")


if __name__ == "__main__":
    main()
