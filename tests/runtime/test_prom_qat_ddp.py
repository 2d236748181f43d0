"""ActFakeQuant under DistributedDataParallel (two gloo processes; slow because each imports torch)."""

from __future__ import annotations

import tempfile

import pytest
import torch
from torch import nn

from fxslim.runtime import prom_qat as Q


def _ddp_worker(rank: int, world_size: int, init_file: str, results: dict) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    torch.manual_seed(0)
    model = nn.Sequential(Q.ActFakeQuant(), nn.Linear(4, 2))
    ddp = nn.parallel.DistributedDataParallel(model)
    ddp(torch.full((3, 4), float(rank + 1)) * torch.tensor([-1.0, 1.0, 2.0, 3.0]))  # each rank its own range
    ddp(torch.ones(3, 4))  # same batch everywhere, after DDP broadcast rank 0's buffers
    act = model[0]
    results[rank] = (float(act.min_val), float(act.max_val), act.qparams())
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_act_fake_quant_under_ddp_buffers_follow_rank_zero():
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp, mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_ddp_worker, args=(2, f"{tmp}/init", results), nprocs=2, join=True)
        ranks = dict(results)
    # Without the broadcast rank 1 would end at 0.9·(-2) + 0.1·1 (its own first batch spans [-2, 6]).
    assert ranks[0] == ranks[1]
    # Rank 0 saw [-1, 3] first; then the EMA step with the ones batch: 0.9·(-1) + 0.1·1, 0.9·3 + 0.1·1.
    assert ranks[0][0] == pytest.approx(-0.8) and ranks[0][1] == pytest.approx(2.8)
