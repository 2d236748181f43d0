"""Every benchmark script imports: a module moved inside fxslim breaks no benchmark silently
(most benchmarks run only under ``make bench``)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

_NAMES = sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "benchmarks").glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("name", _NAMES)
def test_benchmark_module_imports(name):
    module = importlib.import_module(f"benchmarks.{name}")
    assert module.__doc__, f"benchmarks/{name}.py has no docstring saying what it measures"
