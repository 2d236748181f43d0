"""The robustness sweep on the small zoo subset: no step may fail (a skip must name its reason).

Every step runs: capture in each IR, matchers, estimate, and HASTE/PROM/HTTM at their exact limit
and default. The whole zoo runs in `make bench` (benchmarks/zoo_sweep.py); this keeps the same
code path in `make test`.
"""

from __future__ import annotations

import pytest

from benchmarks.zoo import SUBSET, by_name
from benchmarks.zoo_sweep import STEPS, sweep_model


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", SUBSET)
def test_zoo_subset_every_step_ok_or_skipped_with_reason(name):
    run = sweep_model(by_name(name), list(STEPS))
    failed = {step: o.detail for step, o in run.outcomes.items() if o.status == "failed"}
    assert not failed, failed
    assert all(o.detail for o in run.outcomes.values() if o.status == "skipped")
    assert set(run.outcomes) == set(STEPS)
