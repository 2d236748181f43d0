"""Side-by-side timing for the demo and the benchmarks: on a shared machine only interleaved runs compare."""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from typing import Any

__all__ = ["interleaved_medians", "interleaved_samples", "paired_ratio", "round_ratios"]


def interleaved_samples(fns: dict[str, Callable[[], object]], rounds: int, warm_up: bool = True,
                        after_round: Callable[[], None] | None = None,
                        clock: Callable[[], float] = time.perf_counter, *, shuffle: bool = False,
                        calls: int = 1) -> dict[str, list[float]]:
    """Wall time (seconds) of each function in each round, after one warm-up call each (compilation,
    weight caches) unless ``warm_up`` is False; every round runs each function once, in turn, so load
    changes hit all of them alike and round i of two functions can be paired. ``after_round``: called
    after each round (a progress bar). ``clock``: ``time.process_time`` measures this process's CPU
    time instead (with one thread, robust to other load).

    ``shuffle``: each round in its own random order (seeded), so that no function always runs right
    after the same other one: a function that follows one sharing its weights finds them in cache.
    ``calls`` > 1: in its turn a function is called once untimed (its data back in cache after the
    others ran) and then ``calls`` times back to back, and the sample is their mean: the steady-state
    time of one call, as in a loop serving requests, rather than the first call after other work.
    """
    if calls < 1:
        raise ValueError(f"calls: expected an integer >= 1, got {calls}")
    if warm_up:
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    names, order = list(fns), random.Random(0)
    for _ in range(rounds):
        if shuffle:
            order.shuffle(names)
        for name in names:
            fn = fns[name]
            if calls > 1:
                fn()
            start = clock()
            for _ in range(calls):
                fn()
            times[name].append((clock() - start) / calls)
        if after_round is not None:
            after_round()
    return times


def interleaved_medians(fns: dict[str, Callable[[], object]], rounds: int, **options: Any) -> dict[str, float]:
    """Median of ``interleaved_samples`` per function (options as there)."""
    return {name: statistics.median(t) for name, t in interleaved_samples(fns, rounds, **options).items()}


def round_ratios(base: list[float], other: list[float]) -> list[float]:
    """base / other per round, each pair from the same round of ``interleaved_samples``."""
    return [b / o for b, o in zip(base, other, strict=True)]


def paired_ratio(base: list[float], other: list[float]) -> float:
    """Median of ``round_ratios`` (a load change between rounds cancels out of the ratio; a ratio of
    medians would keep it)."""
    return statistics.median(round_ratios(base, other))
