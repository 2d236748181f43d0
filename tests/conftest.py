"""Shared test setup: one torch thread per xdist worker (the suite runs on 2 cores), and the
hypothesis profile ``HYPOTHESIS_PROFILE`` names: ``ci`` (what .ci/run uses) draws the same examples
on every run, so CI passes or fails on the code, not on the draw; the default draws new ones."""

import os

import pytest
import torch
from hypothesis import settings

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

settings.register_profile("ci", derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(autouse=True)
def _seed_and_reset_dynamo():
    torch.manual_seed(0)
    yield
    torch._dynamo.reset()


def _on_one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    """Run a test on one torch thread: on a shared 2-core machine OpenMP barriers dominate small ops."""
    yield from _on_one_thread()


@pytest.fixture(scope="module")
def one_thread_module():
    """``one_thread`` for a whole module, its module-scoped fixtures (models built once) included."""
    yield from _on_one_thread()
