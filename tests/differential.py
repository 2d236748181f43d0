"""Differential check of a rewritten model against its reference on inputs other than the example.

A rewrite at its exact limit (HASTE all-singleton buckets, HTTM ``q=1,kv=1,outliers=0``, the PROM
integer model against its fake-quant model) must compute what the reference computes, and not only
on the example it was built with. ``differential`` runs both on four variants of the example:

- ``example``: the example itself;
- ``batch``: another batch size (3 samples, new values);
- ``size``: another spatial size (half, else double, the last two dims of a >= 4-D first input):
  the first one the reference accepts;
- ``nan``: the ``batch`` inputs with one NaN in sample 1: the NaN stays in sample 1 (the rewritten
  output is non-finite wherever the reference's is), samples 0 and 2 are unchanged, and (with the
  default comparison) sample 1's outputs finite in both are the reference's.

Each variant ends as ``same``, ``refused`` (the rewritten model raised ValueError: a clear error
that names what differs from the example), ``n/a`` (the reference itself does not take it) or
``differs`` (what differs, or the unclear error the rewritten model raised). Used by the tests
and by the zoo sweep (benchmarks/zoo_sweep.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["Variant", "Verdict", "input_variants", "differential", "summary", "outputs", "assert_same"]

# compare(got, want, rewritten, reference, inputs) raises AssertionError naming a difference
Compare = Callable[[Any, Any, nn.Module, nn.Module, tuple], None]

BATCH = 3  # the other batch size; the NaN goes into sample 1 of it


@dataclass(frozen=True)
class Variant:
    name: str
    inputs: tuple


@dataclass(frozen=True)
class Verdict:
    variant: str
    status: str  # "same" | "refused" | "n/a" | "differs"
    detail: str = ""


def outputs(out: Any) -> list[torch.Tensor]:
    """The tensors of a model output (tensor, tuple, list or dict), in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in outputs(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in outputs(o)]
    return []


def assert_same(got: Any, want: Any, what: str = "output", rel: float = 1e-4) -> None:
    """Equal within float rounding of a reordered sum: |error| <= rel * max(1, max |reference|),
    NaN where the reference has NaN."""
    got_t, want_t = outputs(got), outputs(want)
    if [t.shape for t in got_t] != [t.shape for t in want_t]:
        raise AssertionError(f"{what}: shapes {[tuple(t.shape) for t in got_t]} != {[tuple(t.shape) for t in want_t]}")
    for i, (g, w) in enumerate(zip(got_t, want_t)):
        g, w = g.detach().float(), w.detach().float()
        finite = torch.isfinite(w)
        if not torch.equal(torch.isfinite(g), finite):
            raise AssertionError(f"{what} {i}: non-finite values at other places than the reference's")
        if finite.any():
            scale = max(1.0, w[finite].abs().max().item())
            err = (g[finite] - w[finite]).abs().max().item()
            if err > rel * scale:
                raise AssertionError(f"{what} {i}: max abs error {err:.3g} (allowed {rel * scale:.3g})")


def _compare_outputs(got: Any, want: Any, rewritten: nn.Module, reference: nn.Module, inputs: tuple) -> None:
    assert_same(got, want)


def _refusal(exc: Exception) -> str | None:
    """The message of a clear refusal: a ValueError, or torch.export's shape guard naming the size
    it was exported at ("Guard failed: x.size()[2] == 28"); None for any other error."""
    if isinstance(exc, ValueError) or (isinstance(exc, AssertionError) and str(exc).startswith("Guard failed")):
        return str(exc).splitlines()[0][:200]
    return None


def _resample(x: torch.Tensor, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if x.dtype.is_floating_point:
        return torch.randn(shape, generator=generator, dtype=x.dtype)
    return torch.randint(0, max(2, int(x.max()) + 1) if x.numel() else 2, shape, generator=generator, dtype=x.dtype)


def input_variants(example: tuple) -> list[Variant]:
    """example, batch, size (half and double, when the first input has >= 4 dims), nan."""
    first, rest = example[0], tuple(example[1:])
    batch = (_resample(first, (BATCH, *first.shape[1:]), 1), *rest)
    out = [Variant("example", tuple(example)), Variant("batch", batch)]
    if first.dim() >= 4:
        h, w = first.shape[-2:]
        for scale in (0.5, 2.0):
            size = (max(1, int(h * scale)), max(1, int(w * scale)))
            out.append(Variant(f"size {size[0]}x{size[1]}", (_resample(first, (*first.shape[:-2], *size), 2), *rest)))
    if first.dtype.is_floating_point:
        nan = batch[0].clone()
        nan[1].view(-1)[nan[1].numel() // 2] = float("nan")
        out.append(Variant("nan", (nan, *rest)))
    return out


def _run(model: nn.Module, inputs: tuple) -> Any:
    with torch.no_grad():
        return model(*inputs)


def _check_nan(rewritten: nn.Module, reference: nn.Module, variant: Variant, clean: tuple, exact: bool) -> None:
    """NaN in sample 1 stays in sample 1 (where the reference has it); samples 0 and 2 unchanged;
    with ``exact`` (the default comparison), sample 1's outputs finite in both as the reference's."""
    with_nan = outputs(_run(rewritten, variant.inputs))
    without = outputs(_run(rewritten, clean))
    reference_nan = outputs(_run(reference, variant.inputs))
    for i, (got, base, want) in enumerate(zip(with_nan, without, reference_nan)):
        if got.dim() == 0 or got.shape[0] != BATCH:
            continue
        others = [0, 2]
        try:  # the same model on the same samples: equal up to the summation order of a batched kernel
            assert_same(got[others], base[others], rel=1e-5)
        except AssertionError as exc:
            raise AssertionError(f"output {i}: a NaN in sample 1 changed samples 0 and 2 ({exc})") from None
        lost = (~torch.isfinite(want[1])) & torch.isfinite(got[1])
        if lost.any():
            raise AssertionError(f"output {i}: NaN in sample 1 vanished at {int(lost.sum())} places "
                                 "where the reference keeps it (a plausible finite value instead)")
        both = torch.isfinite(want[1]) & torch.isfinite(got[1])
        if exact and both.any():  # a NaN may spread wider (PROM marks its whole sample), not move what stays finite
            assert_same(got[1][both], want[1][both], f"output {i}, sample 1 beside its NaN")


def differential(rewritten: nn.Module, reference: nn.Module, example: tuple, *,
                 compare: Compare = _compare_outputs, variants: list[Variant] | None = None) -> list[Verdict]:
    """One ``Verdict`` per input variant (see the module docstring)."""
    verdicts = []
    variants = input_variants(tuple(example)) if variants is None else variants
    clean = next((v.inputs for v in variants if v.name == "batch"), None)
    sized = False
    for variant in variants:
        if variant.name.startswith("size") and sized:
            continue  # one other size is enough
        try:
            expected = _run(reference, variant.inputs)
        except Exception as exc:  # the reference model does not take this input: nothing to compare
            verdicts.append(Verdict(variant.name, "n/a", f"reference: {type(exc).__name__}"))
            continue
        sized = sized or variant.name.startswith("size")
        try:
            got = _run(rewritten, variant.inputs)
        except Exception as exc:  # refused clearly, or an error that does not say what differs
            message = _refusal(exc)
            status = "refused" if message else "differs"
            verdicts.append(Verdict(variant.name, status, message or f"unclear error {type(exc).__name__}: {str(exc)[:160]}"))
            continue
        try:
            if variant.name == "nan":
                _check_nan(rewritten, reference, variant, clean, compare is _compare_outputs)
            else:
                compare(got, expected, rewritten, reference, variant.inputs)
        except AssertionError as exc:
            verdicts.append(Verdict(variant.name, "differs", str(exc)[:200]))
        else:
            verdicts.append(Verdict(variant.name, "same"))
    return verdicts


def summary(verdicts: list[Verdict]) -> str:
    """'4 same' / '3 same, 1 refused (size 28x28: ...)' — one line for a results table."""
    counts: dict[str, int] = {}
    for v in verdicts:
        counts[v.status] = counts.get(v.status, 0) + 1
    text = ", ".join(f"{n} {status}" for status, n in counts.items())
    notes = [f"{v.variant}: {v.detail}" for v in verdicts if v.status in ("refused", "differs")]
    return text + (f" ({'; '.join(notes)})" if notes else "")
