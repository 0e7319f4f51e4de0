"""A plan and what a report compares it with, from one trace of the step.

The report shows the chosen plan against the step with nothing recomputed (policy
``"none"``: the "before" of the memory timeline) and against plans over a sweep of
budgets (the Pareto curve of step time against peak). All of them are partitions of
one joint graph (``planning.plan_each``), so a sweep costs one trace.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from remat.options import RematOptions
from remat.plan import Plan
from remat.planning import Partitioned, plan_each
from remat.solver import RematBudgetWarning

DEFAULT_BUDGETS = (1.0, 0.8, 0.6, 0.4, 0.2)

# options that describe how the step runs and is estimated, not what it keeps
_RUNTIME_OPTIONS = ("inner_compiler", "time_estimator")


@dataclass(frozen=True)
class Sweep:
    """``chosen``: the plan for the options given, with its graphs. ``before``: nothing
    recomputed. ``points``: one plan per budget of the sweep, each the lowest-memory
    plan where its budget cannot be met (``budget_met`` tells)."""

    chosen: Plan
    graphs: Partitioned
    before: Plan
    points: list[Plan]


def budget_met(plan: Plan) -> bool | None:
    """Whether the predicted peak (parameters and inputs included) fits the plan's
    budget; None for a plan without one."""
    memory = plan.step_memory
    if plan.budget_bytes is None or memory is None:
        return None
    return memory.peak_bytes + memory.resident_bytes <= plan.budget_bytes


def sweep(
    model: Callable[..., Any],
    example_inputs: Sequence[Any],
    options: Mapping[str, Any],
    budgets: Sequence[float] = DEFAULT_BUDGETS,
    *,
    on_partitioned: Callable[[int], None] | None = None,
) -> Sweep:
    """Plan ``model`` with ``options``, with nothing recomputed, and at each of
    ``budgets`` (fractions or bytes, as ``memory_budget`` takes them; the other options
    as given). Raises what ``remat.plan`` raises for the chosen options, nothing for a
    sweep point that cannot meet its budget."""
    chosen = RematOptions.from_mapping(options).to_dict()
    runtime = {name: chosen[name] for name in _RUNTIME_OPTIONS}
    points = [{**chosen, "memory_budget": budget, "on_infeasible": "closest"} for budget in budgets]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RematBudgetWarning)  # budget_met tells which points missed
        planned = plan_each(
            model, example_inputs, [*points, {**runtime, "policy": "none"}, chosen], on_partitioned=on_partitioned
        )
    *swept, (before, _), (plan, graphs) = planned
    return Sweep(chosen=plan, graphs=graphs, before=before, points=[p for p, _ in swept])
