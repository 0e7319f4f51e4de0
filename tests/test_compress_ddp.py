"""Issue 6 acceptance 3: compressed DDP communication, 2 processes on gloo (CPU).

A DDP-wrapped MLP compiled with backend="remat": without compression its gradients
equal one process on the full batch; with torch.distributed's PowerSGD and bf16 comm
hooks (``remat.register_compression_hook``) training converges (bf16 where DDP offers
it: NCCL or XCCL; on gloo it must refuse clearly); with uneven batches
(one rank has more) DDP's ``join`` lets every rank finish, checked with a deadline
rather than trusted not to hang.

No ``from __future__ import annotations``: DDP reads comm hooks' annotations at runtime.
"""

from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

import remat
from tests.checks import run_ranks

WORLD = 2
LOCAL_BATCH = 8
STEPS = 40
DEADLINE_S = 120


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 1))


def _data(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A learnable regression: y = tanh(x @ w / 4)."""
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(16, 1, generator=generator)
    batches = []
    for _ in range(steps):
        x = torch.randn(WORLD * LOCAL_BATCH, 16, generator=generator)
        batches.append((x, torch.tanh(x @ w / 4)))
    return batches


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (model(x) - y).square().mean()


def _train(rank: int, compress: dict, steps: int) -> list[float]:
    ddp = DistributedDataParallel(_model())
    remat.register_compression_hook(ddp, compress)
    compiled = torch.compile(ddp, backend="remat", options={"inner_compiler": "eager", "compress": compress})
    optimizer = torch.optim.Adam(ddp.parameters(), lr=1e-2)
    losses = []
    for x, y in _data(steps):
        local = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        loss = _loss(compiled, x[local], y[local])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def _worker(rank: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        results = {}
        ddp = DistributedDataParallel(_model())
        compiled = torch.compile(ddp, backend="remat", options={"inner_compiler": "eager"})
        x, y = _data(1)[0]
        local = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        _loss(compiled, x[local], y[local]).backward()
        results["grads"] = [p.grad.clone() for p in ddp.parameters()]
        results["powersgd"] = _train(rank, {"method": "powersgd", "rank": 2, "distributed": True}, STEPS)
        bf16 = {"method": "bf16", "error_feedback": False, "distributed": True}
        if dist.is_nccl_available() and torch.cuda.is_available():  # pragma: no cover - a GPU machine
            results["bf16"] = _train(rank, bf16, STEPS)
        else:
            try:
                remat.register_compression_hook(DistributedDataParallel(_model()), bf16)
            except ValueError as error:
                results["bf16_error"] = str(error)
        uneven = DistributedDataParallel(_model())
        compiled = torch.compile(uneven, backend="remat", options={"inner_compiler": "eager"})
        with uneven.join():
            for x, y in _data(3 + 2 * rank):  # rank 1 runs two more steps than rank 0
                _loss(compiled, x[:LOCAL_BATCH], y[:LOCAL_BATCH]).backward()
        results["uneven_done"] = True
        torch.save(results, f"{out}/rank{rank}.pt")
        dist.barrier()  # no process tears gloo down while another still talks to it
    finally:
        dist.destroy_process_group()


def test_compressed_ddp_on_two_processes(tmp_path: Path) -> None:
    ranks = run_ranks(_worker, tmp_path, WORLD, DEADLINE_S)

    reference = _model()
    x, y = _data(1)[0]
    _loss(reference, x, y).backward()
    for result in ranks:
        for got, want in zip(result["grads"], (p.grad for p in reference.parameters()), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        for method in ("powersgd", "bf16"):
            if method in result:
                losses = result[method]
                start, end = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
                assert end < 0.5 * start, (method, start, end)
        assert "bf16" in result or "use method='powersgd'" in result["bf16_error"]
        assert result["uneven_done"]
