"""A plain training function under remat: ``python examples/train_function.py``."""

from __future__ import annotations

import torch
from torch import nn

import remat


@remat.optimize(memory_budget="1MiB", inner_compiler="eager")
def train(steps: int = 5) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 1))  # compiled while train runs
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        x = torch.randn(32, 16)
        loss = (model(x) - x.sum(1, keepdim=True)).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


if __name__ == "__main__":
    print(remat.explain(train()))
