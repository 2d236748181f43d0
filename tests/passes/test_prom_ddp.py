"""PROM QAT under DistributedDataParallel: two gloo processes train the prepared MobileNetMNIST
with ``fxslim.models.train.fit`` on different shards and end with identical weights."""

from __future__ import annotations

import tempfile

import pytest
import torch

from fxslim.api import prepare
from fxslim.models.data import Split, mnist_5k
from fxslim.models.mobilenet_mnist import load_mobilenet_mnist
from fxslim.models.train import FitConfig, fit
from fxslim.passes.prom_convert import convert


def _worker(rank: int, world_size: int, init_file: str, results: dict) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    split = mnist_5k()
    shard = Split(split.x_train[rank:256:world_size], split.y_train[rank:256:world_size], split.x_test[:64], split.y_test[:64])
    torch.manual_seed(0)
    qat = prepare(load_mobilenet_mnist(), split.x_test[:2])
    ddp = torch.nn.parallel.DistributedDataParallel(qat)
    history = fit(ddp, shard, FitConfig(epochs=2, batch_size=32, lr=0.01, seed=rank), progress=False)
    results[rank] = {
        "params": {k: v.detach().clone() for k, v in qat.named_parameters()},
        "epochs": len(history),
        "converted_ops": sum(n.op == "call_function" for n in convert(ddp).graph.nodes),
    }
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_prom_qat_fit_under_ddp_ranks_end_with_identical_weights():
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp, mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(2, f"{tmp}/init", results), nprocs=2, join=True)
        ranks = dict(results)
    first, second = ranks[0]["params"], ranks[1]["params"]
    assert first.keys() == second.keys() and len(first) > 50
    assert all(torch.equal(first[k], second[k]) for k in first)  # all-reduced gradients, same updates
    reference = load_mobilenet_mnist().state_dict()
    moved = [k for k in first if k.endswith("conv.weight") and not torch.equal(first[k], reference[k.replace(".conv.weight", ".weight")])]
    assert moved, "QAT did not update the latent weights"
    assert ranks[0]["epochs"] == ranks[1]["epochs"] == 2 and ranks[0]["converted_ops"] > 0
