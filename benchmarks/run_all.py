"""Run every benchmark in order, then refresh the results pages (docs/results/, README.md) from their results (what ``make bench`` runs).

    python -m benchmarks.run_all                       # everything (hours on a laptop CPU)
    python -m benchmarks.run_all --list                # the steps, in order, and which would run
    python -m benchmarks.run_all --only prom_speed prom_accuracy
    python -m benchmarks.run_all --skip zoo_sweep haste_accuracy

Order: the trainings whose checkpoints are missing (MobileNetMNIST, shipped in
``fxslim/models/checkpoints``; full-width ResNet18/34 in ``benchmarks/.cache``, which the HASTE
benchmarks read, once with the default weight decay and once with the paper's model zoo's 0.01),
the cost model's own speed, then the PROM, HASTE and HTTM benchmarks, any other benchmark script
found in benchmarks/ (one with a ``__main__`` block), the zoo sweep, and last
``update_readme``. Every step imports ``benchmarks.<name>`` and calls its ``main`` with the step's
arguments (none: the benchmark's defaults), in this process; the thread count a benchmark sets is
undone after it. ``haste_accuracy`` runs a second time on the weight-decay-0.01 checkpoints, adding
their sections to its results. The first step that fails (a non-zero exit code or an exception)
stops the run with a message naming it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from benchmarks.resnet_checkpoints import DEFAULT_WEIGHT_DECAY, ZOO_WEIGHT_DECAY, checkpoint_name, weight_decay_flag

__all__ = ["Step", "steps", "main"]

_HERE = Path(__file__).resolve().parent
ROOT = _HERE.parent
CACHE = _HERE / ".cache"
_MOBILENET_CHECKPOINT = ROOT / "fxslim" / "models" / "checkpoints" / "mobilenet_mnist.pt"
_RESNETS = ("resnet18", "resnet34")  # full width, what haste_accuracy / haste_speed / haste_op_speed read
# Steps that run a second time, after their plain run, with these arguments.
_EXTRA_RUNS = {"haste_accuracy": [(*weight_decay_flag(ZOO_WEIGHT_DECAY).split(), "--resume")]}

# The known benchmarks in the order they run; scripts not listed run after them, before the sweep.
_ORDER = (
    "estimate_speed",
    "prom_op_speed", "prom_depthwise_speed", "prom_speed", "prom_vs_peers", "prom_energy_storage", "prom_accuracy",
    "prom_peers_accuracy",
    "haste_op_speed", "haste_speed", "haste_accuracy", "haste_vs_pruning",
    "httm_speed", "httm_fidelity", "httm_vggt1b_cost",
    "demo_results",
)
_LAST = ("zoo_sweep", "headlines", "update_readme")  # headlines reads the others' results files
_NOT_BENCHMARKS = {"run_all", "update_readme"}


@dataclass(frozen=True)
class Step:
    """One ``benchmarks.<name>`` run with ``args``; ``skip_reason`` set when it has nothing to do."""

    name: str
    args: tuple[str, ...] = ()
    skip_reason: str = ""

    @property
    def module(self) -> str:
        return f"benchmarks.{self.name}"

    @property
    def command(self) -> str:
        """The command line that runs the step on its own."""
        return " ".join(["python -m", self.module, *self.args])

    def run(self) -> int:
        """Import the benchmark and call its ``main`` with the step's arguments; its exit code."""
        main = importlib.import_module(self.module).main
        with _as_command_line(self.module, self.args):
            try:
                code = main(list(self.args))
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) or exit_.code is None else 1
        return code or 0


@contextlib.contextmanager
def _as_command_line(module: str, args: tuple[str, ...]) -> Iterator[None]:
    """While a step runs: ``sys.argv`` as ``python -m <module> <args>`` would set it, and the torch
    thread count it may change restored afterwards (so the next step starts from the default)."""
    import torch

    saved_argv, threads = sys.argv, torch.get_num_threads()
    sys.argv = [module, *args]
    try:
        yield
    finally:
        sys.argv = saved_argv
        torch.set_num_threads(threads)


def _benchmark_scripts() -> list[str]:
    """Names of the runnable scripts in benchmarks/ (those with a ``__main__`` block)."""
    names = []
    for path in sorted(_HERE.glob("*.py")):
        if path.stem in _NOT_BENCHMARKS or path.stem.startswith("train_"):
            continue
        if 'if __name__ == "__main__"' in path.read_text(encoding="utf-8"):
            names.append(path.stem)
    return names


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _resnet_training(weight_decay: float = DEFAULT_WEIGHT_DECAY) -> Step:
    """Train the full-width ResNets of one weight decay that are missing from the cache."""
    decay = tuple(weight_decay_flag(weight_decay).split())
    names = {m: f"{checkpoint_name(m, 1.0, weight_decay)}.pt" for m in _RESNETS}
    missing = [m for m, name in names.items() if not (CACHE / name).exists()]
    if not missing:
        return Step("train_resnet_mnist", decay, f"checkpoints {', '.join(names.values())} present in {_shown(CACHE)}")
    return Step("train_resnet_mnist", ("--models", *missing, *decay))


def _train_steps() -> list[Step]:
    mobilenet = Step("train_mobilenet_mnist", skip_reason="" if not _MOBILENET_CHECKPOINT.exists()
                     else f"checkpoint {_shown(_MOBILENET_CHECKPOINT)} present")
    return [mobilenet, _resnet_training(), _resnet_training(ZOO_WEIGHT_DECAY)]


def steps() -> list[Step]:
    """Every step, in the order ``make bench`` runs them."""
    found = _benchmark_scripts()
    known = [n for n in _ORDER if n in found]
    others = [n for n in found if n not in _ORDER and n not in _LAST]
    last = [n for n in _LAST if n in found or n == "update_readme"]
    runs = [Step(n, args) for n in known + others + last for args in [(), *_EXTRA_RUNS.get(n, [])]]
    return _train_steps() + runs


def _duration(seconds: float) -> str:
    minutes, s = divmod(int(round(seconds)), 60)
    h, m = divmod(minutes, 60)
    return f"{h}:{m:02d}:{s:02d}"


def _bar(done: int, total: int, width: int = 24) -> str:
    filled = width * done // total if total else width
    return "[" + "#" * filled + "-" * (width - filled) + f"] {done}/{total}"


def _select(all_steps: list[Step], only: list[str] | None, skip: list[str] | None,
            parser: argparse.ArgumentParser) -> list[Step]:
    names = [s.name for s in all_steps]
    for option, given in (("--only", only), ("--skip", skip)):
        unknown = [n for n in given or [] if n not in names]
        if unknown:
            parser.error(f"{option}: unknown step(s) {unknown}; expected names from {names}")
    chosen = [s for s in all_steps if (not only or s.name in only) and s.name not in (skip or [])]
    if not chosen:
        parser.error("--only/--skip leave no step to run")
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these steps (in the usual order)")
    parser.add_argument("--skip", nargs="+", metavar="NAME", help="run every step but these")
    parser.add_argument("--list", action="store_true", help="print the steps in order and exit")
    args = parser.parse_args(argv)
    chosen = _select(steps(), args.only, args.skip, parser)

    if args.list:
        for step in chosen:
            note = f"  (skipped: {step.skip_reason})" if step.skip_reason else ""
            print(f"{step.name}{' ' + ' '.join(step.args) if step.args else ''}{note}")
        return 0

    start = time.perf_counter()
    for i, step in enumerate(chosen):
        print(f"\n{_bar(i, len(chosen))} {_duration(time.perf_counter() - start)} elapsed -- {step.name}", flush=True)
        if step.skip_reason:
            print(f"skipping {step.name}: {step.skip_reason}", flush=True)
            continue
        print(f"$ {step.command}", flush=True)
        step_start = time.perf_counter()
        try:
            rc = step.run()
            why = f"exit code {rc}"
        except Exception:  # a benchmark's error stops the run, with its traceback and the step's name
            traceback.print_exc()
            rc, why = 1, "an exception"
        if rc != 0:
            print(f"\nbenchmarks.run_all: {step.name} failed ({why}) after "
                  f"{_duration(time.perf_counter() - step_start)}; stopped there. Rerun it alone with "
                  f"`{step.command}`, or go on without it with `--skip {step.name}`.",
                  file=sys.stderr)
            return 1
        print(f"{step.name} done in {_duration(time.perf_counter() - step_start)}", flush=True)
    print(f"\n{_bar(len(chosen), len(chosen))} all {len(chosen)} steps done in {_duration(time.perf_counter() - start)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
