"""Every file in examples/ runs to completion and prints what it is meant to show.

Examples are found by glob, so a new one is covered without touching this file. Each runs as a
subprocess of the current interpreter (``.sh`` files through bash, with the interpreter's bin
directory first on PATH so ``fxslim`` resolves) with the repository root on PYTHONPATH, so the
checkout under test is imported whether or not it is installed. Threads are capped at 1.
The slower examples get smaller settings here so the file stays around three minutes.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted(p for p in (ROOT / "examples").iterdir() if p.suffix in (".py", ".sh"))
TIMEOUT_S = 300

# Smaller settings for the tests (the examples' defaults are what a reader runs).
_QUICK_ARGS = {
    "httm_vggt.py": ["--frames", "4"],
    "prom_qat_own_loop.py": ["--steps", "30"],
    "haste_resnet.py": ["--digits", "100"],
    "compile_backend.py": ["--size", "64"],
}
# What each example must print; an example not listed must print something.
_EXPECTED = {
    "optimize_own_model.py": [r"\d+ rewritten", r"skipped \(stem\)", r"MACs\s+[\d,]+ -> [\d,]+",
                              r"your model unchanged: True"],
    "compile_backend.py": [r"pass haste: [1-9]\d* rewritten", r"compiled vs eager: relative difference"],
    "cli_cost_report.sh": [r"\d+ convs, of which \d+ pointwise", r"MACs: [\d,]+ -> [\d,]+", r"wrote .*\.html"],
    "haste_resnet.py": [r"rewritten [1-9]\d* convs", r"top-1 on \d+ digits"],
    "httm_vggt.py": [r"rewrote [1-9]\d* global attentions", r"depth: relative error"],
    "prom_qat_own_loop.py": [r"integer model top-1 \d+\.\d+%"],
}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
    env["OMP_NUM_THREADS"] = "1"
    env["MKL_NUM_THREADS"] = "1"
    env["MPLBACKEND"] = "Agg"
    return env


def test_examples_found():
    names = {p.name for p in EXAMPLES}
    assert {"optimize_own_model.py", "compile_backend.py", "cli_cost_report.sh"} <= names


@pytest.mark.slow
@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs_prints_expected(path: Path, tmp_path: Path):
    if path.suffix == ".sh":
        cmd = ["bash", str(path), str(tmp_path)]
    else:
        cmd = [sys.executable, str(path), *_QUICK_ARGS.get(path.name, [])]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"{path.name} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.stdout.strip(), f"{path.name} printed nothing"
    for pattern in _EXPECTED.get(path.name, []):
        assert re.search(pattern, proc.stdout), f"{path.name}: no line matches {pattern!r}\nstdout:\n{proc.stdout}"
    if path.suffix == ".sh":
        assert any(tmp_path.iterdir()), f"{path.name} wrote nothing to its output directory"
