"""DDP and FSDP2 with the remat backend, one process per device:

    torchrun --standalone --nproc_per_node=2 examples/distributed.py ddp     # or: fsdp2, fsdp2_per_block

Each process plans its own step (its share of the batch, its parameters) against the
budget: the budget is per process.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

OPTIONS = {"memory_budget": "8MiB", "inner_compiler": "eager"}  # per process
BATCH, WIDTH, DEPTH = 16, 256, 5  # the global batch, split evenly over the processes


class Net(nn.Module):
    """An MLP whose forward returns the loss, so that the plan covers it too."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh()) for _ in range(DEPTH))
        self.head = nn.Linear(WIDTH, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return nn.functional.mse_loss(self.head(x), y)


def ddp(model: Net) -> nn.Module:
    """Wrap in DDP, then compile: DDP's optimizer splits the graph at its buckets."""
    model = torch.compile(DistributedDataParallel(model), backend="remat", options=OPTIONS)
    return model


def cpu_mesh() -> DeviceMesh:
    """The processes as one mesh on the CPU, where this example trains: by default
    fully_shard meshes them on CUDA whenever a GPU is visible."""
    return init_device_mesh("cpu", (dist.get_world_size(),))


def fsdp2(model: Net) -> nn.Module:
    """Shard, then compile. FSDP2's hooks run outside the graph, so one FSDP unit (the
    whole model) gives one graph, whose parameters are the all-gathered ones."""
    fully_shard(model, mesh=cpu_mesh())
    model = torch.compile(model, backend="remat", options=OPTIONS)
    return model


def fsdp2_per_block(model: Net) -> nn.Module:
    """One FSDP unit per block, gathered only while it runs: compile each block, then
    shard it. A graph per block (blocks alike share one, and its Plan); the head and the
    loss run eagerly. Compiling only the root does less: FSDP2's hooks, outside Dynamo,
    break the graph at every unit, the loop over the blocks runs eagerly, and these
    nn.Sequential blocks would not be compiled at all."""
    mesh = cpu_mesh()
    for i, block in enumerate(model.blocks):
        model.blocks[i] = torch.compile(block, backend="remat", options=OPTIONS)
        fully_shard(model.blocks[i], mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def batch(step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This process's share of the global batch of ``step``."""
    x = torch.randn(BATCH, WIDTH, generator=torch.Generator().manual_seed(step))
    y = x.mean(1, keepdim=True)
    share = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    return x[share], y[share]


def main(strategy: str, steps: int = 3) -> None:
    dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT; "nccl" on GPUs
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same initial weights on every process
    model = Net()
    step_fn = {"ddp": ddp, "fsdp2": fsdp2, "fsdp2_per_block": fsdp2_per_block}[strategy](model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(steps):
        loss = step_fn(*batch(step, rank, world))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        print(f"rank {rank} step {step} loss {loss.item():.4f}", flush=True)
    dist.barrier()  # no process tears gloo down while another still talks to it
    dist.destroy_process_group()
    print(f"rank {rank} finished", flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "ddp")
