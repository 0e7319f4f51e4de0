"""Assertions and spies shared by the test modules."""

from __future__ import annotations

import contextlib
import copy
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.fx as fx
import torch.multiprocessing as mp
import torch.nn as nn

import remat


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``count``, and back after, whatever fails."""
    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


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
    """Start ``worker(rank, store_path, out_dir)`` on ``world`` CPU processes and return
    what each saved to ``out_dir/rank{r}.pt``; a run past ``deadline_s`` is killed and
    fails. The workers see no GPU: they train on the CPU over gloo, on any machine (where
    CUDA is visible, torch's PowerSGD hook synchronizes it for CPU buckets, and remat
    refuses it)."""
    with mock.patch.dict(os.environ, {"CUDA_VISIBLE_DEVICES": ""}):
        context = mp.start_processes(worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=world, join=False)
    deadline = time.monotonic() + deadline_s
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            raise AssertionError(f"the {world} workers did not finish in {deadline_s} s (a hang?)")
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


def spy_on_joint_pass(monkeypatch: Any, module: Any, name: str) -> dict[str, Any]:
    """Replace the joint-graph pass ``module.name`` with a spy that records the joint
    graph module before the pass (a copy), the module after it, and what it returned."""
    found: dict[str, Any] = {}
    run = getattr(module, name)

    def spy(graph: fx.Graph) -> int:
        owner = graph.owning_module
        found["before"] = fx.GraphModule(owner, copy.deepcopy(graph))
        found["after"] = owner
        found["result"] = run(graph)
        return found["result"]

    monkeypatch.setattr(module, name, spy)
    return found


def assert_same_bits(before: Any, after: Any) -> None:
    """Both joint graph modules, run on the same random inputs, return the same bits."""
    generator = torch.Generator().manual_seed(0)
    inputs = [
        torch.randn(v.shape, generator=generator, dtype=v.dtype) if v.is_floating_point() else torch.zeros(v.shape, dtype=v.dtype)
        for v in (p.meta["val"] for p in before.graph.find_nodes(op="placeholder"))
    ]

    def flat(values: Any) -> list[Any]:
        if isinstance(values, (list, tuple)):
            return [leaf for value in values for leaf in flat(value)]
        return [values]

    expected, got = (flat(fx.Interpreter(module).run(*inputs)) for module in (before, after))
    assert len(expected) == len(got) > 0
    assert all((e is None and g is None) or torch.equal(e, g) for e, g in zip(expected, got, strict=True))
