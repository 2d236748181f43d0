"""Operation counts of ``fxslim::haste_conv2d``: the op's own arithmetic, no cost conventions.

The HASTE pass reports predicted counts per rewritten conv and the cost formula
(``fxslim.cost_model.formulas.haste``) costs the op with the same counts, so both read them here, below
passes and cost_model. Terms, the data-free bucket estimate and calibrated vs measured stats: see
the cost formula's module docstring and docs/methods/HASTE.md.

``HasteBuckets(calibration=..., measured=...)`` carries ``record_buckets`` stats to the cost
formula, passed explicitly to ``fxslim.estimate``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

from fxslim.runtime.haste import HasteStats

__all__ = ["HasteCounts", "HasteLayer", "HasteBuckets", "expected_buckets"]


@dataclass(frozen=True)
class HasteCounts:
    """Operation counts of a HASTE conv over some samples and tiles (terms: ``fxslim.cost_model.formulas.haste``)."""

    centering: float = 0
    hashing: float = 0
    merge_adds: float = 0
    merge_divisions: float = 0
    filter_merge: float = 0
    reduced_conv: float = 0
    dense: float = 0

    @property
    def overhead(self) -> float:
        """Every op besides the reduced conv's MACs."""
        return self.centering + self.hashing + self.merge_adds + self.merge_divisions + self.filter_merge

    @property
    def ops(self) -> float:
        """Reduced-conv MACs plus overhead (a MAC counts as one op)."""
        return self.reduced_conv + self.overhead

    def __add__(self, other: HasteCounts) -> HasteCounts:
        return HasteCounts(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def as_dict(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self)} | {"overhead": self.overhead, "ops": self.ops}


def expected_buckets(channels: int, planes: int) -> float:
    """E[B] = M·(1 − (1 − 1/M)^C), M = 2^L: occupied buckets of C independent uniform L-bit codes."""
    m = 2.0**planes
    return -m * math.expm1(channels * math.log1p(-1.0 / m))


@dataclass(frozen=True)
class HasteLayer:
    """What the counts of one HASTE conv depend on besides the data: channels C -> O, kernel,
    L planes over d = t_h·t_w patch values with ``nnz`` non-zeros in all, centering."""

    channels: int
    out_channels: int
    kernel: tuple[int, int]
    planes: int
    d: int
    nnz: float
    center: bool = True

    @classmethod
    def of_stats(cls, stats: HasteStats, nnz: float, center: bool = True) -> HasteLayer:
        return cls(stats.channels, stats.out_channels, tuple(stats.kernel_size), stats.planes, stats.d, nnz, center)

    def counts(self, tiles: float, pixels: float, buckets: float, bucket_pixels: float) -> HasteCounts:
        """Counts over ``tiles`` tiles with Σ p_τ = ``pixels``, Σ B_τ = ``buckets``, Σ B_τ·p_τ = ``bucket_pixels``."""
        c, o, d, k2 = self.channels, self.out_channels, self.d, self.kernel[0] * self.kernel[1]
        return HasteCounts(
            centering=2 * c * d * tiles if self.center else 0,
            hashing=c * self.nnz * tiles,
            merge_adds=c * d * tiles,
            merge_divisions=d * buckets,
            filter_merge=o * k2 * (c * tiles - buckets),
            reduced_conv=o * k2 * bucket_pixels,
            dense=o * c * k2 * pixels,
        )

    def predicted(self, tiles: float, pixels: float, calibration: HasteStats | None = None) -> HasteCounts:
        """Counts with B/C from ``calibration`` (per tile and per output pixel), else ``expected_buckets``."""
        if calibration is None:
            per_tile = per_pixel = expected_buckets(self.channels, self.planes) / self.channels
        else:
            self._check(calibration, "calibration")
            per_tile = calibration.buckets / (calibration.tiles * self.channels)
            per_pixel = calibration.bucket_pixels / (calibration.pixels * self.channels)
        c = self.channels
        return self.counts(tiles, pixels, per_tile * c * tiles, per_pixel * c * pixels)

    def measured(self, stats: HasteStats, samples: int | None = None) -> HasteCounts:
        """Counts ``stats`` recorded; with ``samples``, their mean per sample times ``samples``."""
        self._check(stats, "measured")
        scale = 1.0 if samples is None else samples / stats.samples
        return self.counts(stats.tiles * scale, stats.pixels * scale, stats.buckets * scale,
                           stats.bucket_pixels * scale)

    def _check(self, stats: HasteStats, what: str) -> None:
        mine = (self.channels, self.out_channels, self.kernel, self.planes, self.d)
        theirs = (stats.channels, stats.out_channels, tuple(stats.kernel_size), stats.planes, stats.d)
        if mine != theirs:
            raise ValueError(f"HASTE {what} stats: expected (C, O, kernel, L, d) = {mine}, got {theirs}")


# ----------------------------------------------------------------------------------------------
# Stats given to the cost model


@dataclass(frozen=True)
class HasteBuckets:
    """Bucket counts recorded on sample inputs (``record_buckets``), given to the cost model as
    ``fxslim.estimate(..., haste_buckets=HasteBuckets(...))``: ``calibration`` sets B/C of a
    layer's predicted counts, ``measured`` gives its measured MACs (both: layer key -> ``HasteStats``).
    An explicit value, not ambient state: the same call always costs the same."""

    calibration: Mapping[str, HasteStats] = field(default_factory=dict)
    measured: Mapping[str, HasteStats] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("calibration", "measured"):
            value = getattr(self, name)
            if not (isinstance(value, Mapping) and all(isinstance(s, HasteStats) for s in value.values())):
                raise TypeError(f"HasteBuckets: {name} must map layer names to HasteStats "
                                f"(e.g. from record_buckets()), got {type(value).__name__}")
            object.__setattr__(self, name, dict(value))
