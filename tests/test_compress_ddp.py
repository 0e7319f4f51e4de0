"""Issue 6 acceptance 3: compressed DDP communication, 2 processes on gloo (CPU).

A DDP-wrapped MLP compiled with backend="remat": without compression its gradients
equal one process on the full batch; with torch.distributed's PowerSGD comm hook
(``remat.register_compression_hook``) training converges; the bf16 hook, which needs
NCCL or XCCL, must refuse gloo clearly; with uneven batches
(one rank has more) DDP's ``join`` lets every rank finish, checked with a deadline
rather than trusted not to hang.

No ``from __future__ import annotations``: DDP reads comm hooks' annotations at runtime.
"""

from pathlib import Path

import pytest
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
        losses = result["powersgd"]
        start, end = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
        assert end < 0.5 * start, (start, end)
        assert "use method='powersgd'" in result["bf16_error"]
        assert result["uneven_done"]


def test_powersgd_refuses_cpu_parameters_while_cuda_is_visible(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's PowerSGD hook synchronizes the CUDA device for every bucket whenever CUDA
    is available, and fails on a CPU bucket in the middle of a backward (seen on a GPU
    machine); remat refuses at registration instead, naming the way out."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(_model())
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES"):
            remat.register_compression_hook(ddp, {"method": "powersgd", "rank": 2, "distributed": True})
        monkeypatch.undo()
        if not torch.cuda.is_available():
            assert remat.register_compression_hook(ddp, {"method": "powersgd", "rank": 2, "distributed": True})
    finally:
        dist.destroy_process_group()
