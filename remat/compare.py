"""remat against PyTorch's partitioner on the same joint graph, budget by budget.

For each budget, remat plans with ``memory_budget`` = that fraction (of the peak with
nothing recomputed; the lowest-memory plan where it cannot be met) and PyTorch's
default partitioner runs with ``activation_memory_budget`` = the same number (a
fraction of the bytes its own default plan saves). Both partitions come from one
trace and are predicted by the same simulator and time model, so the rows compare
the decisions, and how each is compiled: PyTorch's with Inductor's buffer pool, remat's
with it only where its holds fit the budget. Both are simulated as remat compiles a
graph, which refuses fusions that pull a matmul ahead (``cost_models.fusion``): where
PyTorch's compile would make such a fusion, its real peak is higher than its row says.
Predictions, not measurements.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from remat import _torch_internals as internals
from remat.options import RematOptions
from remat.cost_models.memory import step_fusions
from remat.plan import Plan, estimate_time, predict_memory
from remat.partition import RematPartitioner
from remat.planning import partition_step
from remat.solver import RematBudgetWarning
from remat.sweep import budget_met


@dataclass(frozen=True)
class Row:
    """One budget: predicted peak (above parameters and inputs, as the inner compiler
    runs the step) and estimated step time of each partition."""

    budget: float
    remat_peak_bytes: int
    remat_time_s: float
    remat_budget_met: bool | None
    pytorch_peak_bytes: int
    pytorch_time_s: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare(
    model: Callable[..., Any],
    example_inputs: Sequence[Any],
    budgets: Sequence[float],
    options: Mapping[str, Any] | None = None,
    *,
    on_partitioned: Callable[[int], None] | None = None,
) -> list[Row]:
    """One row per budget (each a fraction 0 <= x <= 1)."""
    bad = [b for b in budgets if not 0.0 <= b <= 1.0]
    if bad or not budgets:
        raise ValueError(f"budgets must be fractions 0 <= x <= 1 (one at least); got {list(budgets)!r}")
    base = RematOptions.from_mapping(options).to_dict()
    plans: list[Plan] = []
    partitioners: list[internals.PartitionFn] = []
    for budget in budgets:
        # remat takes no budget of 0 (no step fits in nothing): its closest plan is the leanest
        opts = RematOptions.from_mapping({**base, "memory_budget": budget or 1e-9, "on_infeasible": "closest"})
        partitioners += [RematPartitioner(opts, graph_name="compare", on_plan=plans.append), internals.pytorch_budget_partitioner(budget)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RematBudgetWarning)  # Row.remat_budget_met tells
        graphs = partition_step(model, example_inputs, partitioners, on_partitioned=on_partitioned)
    fused = base["inner_compiler"] == "inductor"
    rows = []
    for budget, plan, theirs in zip(budgets, plans, graphs[1::2], strict=True):
        # PyTorch's partition compiles with Inductor's defaults: its buffer pool included
        fusions = step_fusions(theirs.forward.graph, theirs.backward.graph) if fused else None
        memory = predict_memory(
            theirs.forward, theirs.backward, theirs.num_fwd_outputs, fused=fused, buffer_pool=fused, fusions=fusions
        )
        seconds, _ = estimate_time(theirs.forward, theirs.backward, base["time_estimator"], fused, fusions)
        mine = plan.step_memory
        if mine is None or plan.estimated_time_s is None:
            raise ValueError(f"remat's plan at budget {budget} has no predictions (see the log for why)")
        rows.append(Row(budget, mine.peak_bytes, plan.estimated_time_s, budget_met(plan), memory.peak_bytes, seconds))
    return rows
