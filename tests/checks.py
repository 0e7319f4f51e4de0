"""Assertions shared by the test modules."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp
import torch.nn as nn

import remat


def assert_planned_by_remat(model: nn.Module, label: str = "") -> list[remat.Plan]:
    """A plan exists and came from remat (its min-cut or its budgeted solver): the step
    really ran through remat, not through a silent Dynamo fallback to eager or
    PyTorch's partitioner."""
    plans = remat.plans(model)
    assert plans, f"{label}: no remat plan was made (did Dynamo fall back to eager?)"
    for plan in plans:
        assert plan.partitioner in ("remat-min-cut", "remat-budget"), f"{label}: {plan.graph} fell back: {plan.fallback_reason}"
        assert plan.fallback_reason is None
    return plans


def run_ranks(worker: Callable[..., None], tmp_path: Path, world: int, deadline_s: float) -> list[Any]:
    """Start ``worker(rank, store_path, out_dir)`` on ``world`` processes and return what
    each saved to ``out_dir/rank{r}.pt``; a run past ``deadline_s`` is killed and fails."""
    context = mp.start_processes(worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=world, join=False)
    deadline = time.monotonic() + deadline_s
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            raise AssertionError(f"the {world} workers did not finish in {deadline_s} s (a hang?)")
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
