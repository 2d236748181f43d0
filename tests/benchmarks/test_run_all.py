"""benchmarks.run_all: the step list and its argument errors (no benchmark is run here)."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from benchmarks import run_all

BENCHMARKS = Path(run_all.__file__).resolve().parent


def _names(capsys) -> list[str]:
    return [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.strip()]


def test_run_all_list_every_benchmark_in_order(capsys):
    assert run_all.main(["--list"]) == 0
    names = _names(capsys)
    scripts = {p.stem for p in BENCHMARKS.glob("*.py")
               if 'if __name__ == "__main__"' in p.read_text(encoding="utf-8") and p.stem != "run_all"}
    assert set(names) == scripts  # every runnable script, trainings included, and nothing else
    assert names[:2] == ["train_mobilenet_mnist", "train_resnet_mnist"]
    assert names[-3:] == ["zoo_sweep", "headlines", "update_readme"]
    assert names.index("prom_op_speed") < names.index("haste_op_speed") < names.index("httm_speed")


def test_run_all_list_training_skipped_when_checkpoint_present(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(run_all, "CACHE", tmp_path)
    for name in ("resnet18_w100_mnist.pt", "resnet34_w100_wd0.01_mnist.pt"):
        (tmp_path / name).write_bytes(b"")
    assert run_all.main(["--list", "--only", "train_resnet_mnist"]) == 0
    assert capsys.readouterr().out.splitlines() == [  # one training per weight decay, each for what is missing
        "train_resnet_mnist --models resnet34",
        "train_resnet_mnist --models resnet18 --weight-decay 0.01",
    ]
    for name in ("resnet34_w100_mnist.pt", "resnet18_w100_wd0.01_mnist.pt"):
        (tmp_path / name).write_bytes(b"")
    assert run_all.main(["--list", "--only", "train_resnet_mnist"]) == 0
    assert capsys.readouterr().out.count("(skipped: checkpoints") == 2


def test_run_all_haste_accuracy_runs_again_on_the_weight_decay_checkpoints(capsys):
    assert run_all.main(["--list", "--only", "haste_accuracy"]) == 0
    assert capsys.readouterr().out.splitlines() == ["haste_accuracy", "haste_accuracy --weight-decay 0.01 --resume"]


def test_run_all_only_and_skip_select_steps(capsys):
    assert run_all.main(["--list", "--only", "zoo_sweep", "prom_speed"]) == 0
    assert _names(capsys) == ["prom_speed", "zoo_sweep"]  # the usual order, not the given one
    assert run_all.main(["--list", "--skip", "zoo_sweep", "update_readme"]) == 0
    names = _names(capsys)
    assert "zoo_sweep" not in names and "update_readme" not in names and "prom_speed" in names


@pytest.mark.parametrize("argv, message", [
    (["--only", "no_such_benchmark"], r"--only: unknown step\(s\) \['no_such_benchmark'\]"),
    (["--skip", "prom_speedd"], r"--skip: unknown step\(s\) \['prom_speedd'\]"),
    (["--only", "prom_speed", "--skip", "prom_speed"], r"leave no step to run"),
    (["--only"], r"expected at least one argument"),
])
def test_run_all_bad_arguments_exit_2_with_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        run_all.main(argv)
    assert exc.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_run_all_step_names_its_module_and_command():
    step = run_all.Step("haste_accuracy", ("--weight-decay", "0.01"))
    assert step.module == "benchmarks.haste_accuracy"
    assert step.command == "python -m benchmarks.haste_accuracy --weight-decay 0.01"


def _benchmarks(monkeypatch, mains: dict) -> list:
    """Steps a, b, c whose modules are ``mains`` (no benchmark runs); returns the calls made."""
    calls = []

    def module(name: str) -> SimpleNamespace:
        def main(argv):
            calls.append((name, argv, list(sys.argv)))
            return mains[name](argv)
        return SimpleNamespace(main=main)

    steps = [run_all.Step("a", ("--x", "1")), run_all.Step("b"), run_all.Step("c")]
    monkeypatch.setattr(run_all, "steps", lambda: steps)
    monkeypatch.setattr(run_all.importlib, "import_module", module)
    return calls


def test_run_all_imports_each_benchmark_and_calls_its_main(capsys, monkeypatch):
    def sets_threads(argv):
        torch.set_num_threads(1 if torch.get_num_threads() > 1 else 2)
        return 0

    threads = torch.get_num_threads()
    calls = _benchmarks(monkeypatch, {"benchmarks.a": sets_threads, "benchmarks.b": lambda argv: None,
                                      "benchmarks.c": lambda argv: 0})
    assert run_all.main([]) == 0
    assert calls == [("benchmarks.a", ["--x", "1"], ["benchmarks.a", "--x", "1"]),
                     ("benchmarks.b", [], ["benchmarks.b"]), ("benchmarks.c", [], ["benchmarks.c"])]
    assert torch.get_num_threads() == threads  # what a benchmark set is undone after it
    assert "all 3 steps done" in capsys.readouterr().out


@pytest.mark.parametrize("failing, why", [(lambda argv: 1, "exit code 1"), (lambda argv: 1 / 0, "an exception")])
def test_run_all_failing_step_stops_and_names_it(capsys, monkeypatch, failing, why):
    calls = _benchmarks(monkeypatch, {"benchmarks.a": lambda argv: 0, "benchmarks.b": failing,
                                      "benchmarks.c": lambda argv: 0})
    assert run_all.main([]) == 1
    assert [c[0] for c in calls] == ["benchmarks.a", "benchmarks.b"]
    err = capsys.readouterr().err
    assert f"b failed ({why})" in err and "--skip b" in err and "`python -m benchmarks.b`" in err
