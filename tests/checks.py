"""Assertions shared by the test modules."""

from __future__ import annotations

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
