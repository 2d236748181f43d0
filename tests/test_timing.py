"""Side-by-side timing (``fxslim.app.timing``): every function once per round, shuffled orders,
steady-state calls, and the bad-input path."""

from __future__ import annotations

import pytest

from fxslim.app.timing import interleaved_samples, paired_ratio


def _recorder():
    log: list[str] = []
    return log, {name: (lambda name=name: log.append(name)) for name in "abcd"}


def test_fixed_order_runs_each_function_once_per_round_in_turn():
    log, fns = _recorder()
    times = interleaved_samples(fns, 3, warm_up=False)
    assert log == list("abcd") * 3 and all(len(t) == 3 for t in times.values())


def test_shuffled_rounds_each_hold_every_function_once_in_changing_orders():
    log, fns = _recorder()
    interleaved_samples(fns, 12, warm_up=False, shuffle=True)
    rounds = [log[i : i + 4] for i in range(0, len(log), 4)]
    assert len(rounds) == 12 and all(sorted(r) == list("abcd") for r in rounds)
    assert len({tuple(r) for r in rounds}) > 1 and len({r[0] for r in rounds}) > 1


def test_steady_state_calls_one_untimed_then_averages_the_rest():
    ticks = iter(range(1000))
    log, fns = _recorder()
    times = interleaved_samples(fns, 2, warm_up=True, calls=5, clock=lambda: float(next(ticks)))
    assert len(log) == 4 + 2 * 4 * 6  # warm-up, then per round and function 1 untimed + 5 timed
    assert all(t == [0.2, 0.2] for t in times.values())  # two clock reads 1 apart, over 5 calls
    assert paired_ratio(times["a"], times["b"]) == 1.0


@pytest.mark.parametrize("calls", [0, -3])
def test_calls_below_one_raise_value_error_naming_it(calls):
    with pytest.raises(ValueError, match="calls"):
        interleaved_samples({"a": lambda: None}, 1, calls=calls)
