"""``DelayedProgress``: drawn only on a terminal and only once the work outlasts its delay."""

import io

import torch
from rich.console import Console
from torch import nn

import fxslim
from fxslim.cost_model import shapes
from fxslim.progress import DelayedProgress


def _console(terminal: bool) -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=terminal, width=100), out


def test_a_bar_is_drawn_on_a_terminal_once_the_delay_passed_and_removed_after():
    console, out = _console(terminal=True)
    with DelayedProgress(3, "nodes", delay=0.0, console=console) as bar:
        for _ in range(3):
            bar.advance()
        assert bar.shown and bar.done == 3
    assert "nodes" in out.getvalue()


def test_no_bar_into_a_pipe_or_before_the_delay():
    for terminal, delay in ((False, 0.0), (True, 3600.0)):
        console, out = _console(terminal)
        with DelayedProgress(3, "nodes", delay=delay, console=console) as bar:
            for _ in range(3):
                bar.advance()
        assert not bar.shown and bar.done == 3 and out.getvalue() == ""


def test_symbolic_estimates_count_every_node_they_propagate(monkeypatch):
    bars = []

    class Immediate(DelayedProgress):
        def __init__(self, total, description, **_):
            super().__init__(total, description, delay=0.0, console=_console(terminal=True)[0])
            bars.append(self)

    monkeypatch.setattr(shapes, "DelayedProgress", Immediate)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(1))
    report = fxslim.estimate(model, torch.rand(1, 3, 8, 8), symbolic={"N": 0})
    assert len(bars) == 1 and bars[0].shown
    assert bars[0].done == bars[0].total == 5  # placeholder, 3 modules, output
    assert "N" in str(report.total.flops)
