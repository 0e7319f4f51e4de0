"""From the options to the values one joint graph keeps: budget, policy, excluded modules.

The passes know nothing of options: ``passes.budget`` solves a chain of segments
under a byte budget with a set of allowed groups. This module reads the options,
resolves the budget to bytes ("6GB", a fraction of the peak without recomputation,
"auto"), turns a policy into the groups it allows and ``exclude`` into values that
are never recomputed, and says what it decided.
"""

from __future__ import annotations

import fnmatch
import math
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx as fx

from remat._torch_internals import JointInfo
from remat.cost_models.devices import available_memory
from remat.cost_models.runtime import make_estimator
from remat.cost_models.sizes import graph_device
from remat.options import RematOptions, parse_budget
from remat.passes.budget import KEEP_MODES, RECOMPUTE, BudgetProblem, Group, InfeasibleBudget, solve_budget
from remat.passes.segments import find_segments

AUTO_MARGIN = 0.9
UNBOUNDED = 1e30


class RematBudgetWarning(UserWarning):
    """The memory budget cannot be met; the lowest-memory plan is used instead."""


@dataclass
class BudgetedChoice:
    """What the solver kept, why, and the numbers behind it."""

    saved: list[fx.Node]
    reasons: dict[str, str]
    budget_bytes: int | None
    predicted_peak_bytes: int
    groups: list[str]
    solve_seconds: float


def uses_solver(options: RematOptions) -> bool:
    return options.memory_budget is not None or options.policy is not None or bool(options.exclude)


def module_path(entry: str) -> str:
    """``L['self'].blocks[0].attn`` -> ``blocks.0.attn`` (relative to the compiled module)."""
    path = re.sub(r"^L\[['\"][^'\"]+['\"]\]\.?", "", entry)
    path = re.sub(r"\[['\"]?([^\]'\"]+)['\"]?\]", r".\1", path)
    return path.strip(".")


def excluded_by(patterns: tuple[str, ...]) -> tuple[Callable[[fx.Node], str | None], set[str]]:
    """A predicate naming the excluded module a node belongs to, and the set that
    records which patterns matched something (to warn about the others)."""
    matched: set[str] = set()

    def reason(node: fx.Node) -> str | None:
        for entry, *_ in (node.meta.get("nn_module_stack") or {}).values():
            path = module_path(entry)
            for pattern in patterns:
                if fnmatch.fnmatchcase(path, pattern) or fnmatch.fnmatchcase(path, "*." + pattern):
                    matched.add(pattern)
                    return f"in excluded module {path!r} (exclude={pattern!r})"
        return None

    return reason, matched


def _policy_groups(options: RematOptions, segments: int) -> tuple[tuple[str, ...], list[int] | None]:
    """The modes and recompute-group starts a policy allows (None: any group)."""
    budgeted = options.memory_budget is not None
    policy = options.policy
    if policy is None:  # without a budget: remat's default, the fewest bytes without heavy recompute
        return ((*KEEP_MODES, RECOMPUTE) if budgeted else ("mincut",)), None
    if policy == "none":
        return ("save",), None
    if policy == "heavy_ops":
        return ("heavy",), None
    if policy == "full":
        return (RECOMPUTE,), list(range(segments))
    size = options.every_n if policy == "every_n" else max(1, math.ceil(math.sqrt(segments)))
    modes = (*KEEP_MODES, RECOMPUTE) if budgeted else (RECOMPUTE,)
    return modes, list(range(0, segments, size))


def resolve_budget(options: RematOptions, problem: BudgetProblem, device: torch.device) -> int | None:
    """The budget in bytes of the whole step (resident bytes included)."""
    if options.memory_budget is None:
        return None
    kind, value = parse_budget(options.memory_budget)
    if kind == "bytes":
        return int(value)
    if kind == "fraction":
        top = problem.simulate([Group(i, i, "save") for i in range(len(problem.segments))])
        return int(value * top.peak)
    return int(AUTO_MARGIN * available_memory(device)) + problem.resident


def choose_saved(
    graph: fx.Graph, info: JointInfo, num_fwd_outputs: int, options: RematOptions, graph_name: str
) -> BudgetedChoice:
    """The values to keep for ``graph`` under the budget and policy of ``options``."""
    device = graph_device(graph)
    estimator = make_estimator(options.time_estimator, device)
    never, matched = excluded_by(options.exclude)
    segments = find_segments(graph, info)
    modes, starts = _policy_groups(options, len(segments))
    problem = BudgetProblem(
        graph, info, num_fwd_outputs, estimator,
        modes=modes, never_recompute=never, group_starts=starts, segments=segments,
    )
    for pattern in options.exclude:
        if pattern not in matched:
            warnings.warn(
                f"remat option exclude={list(options.exclude)!r}: pattern {pattern!r} matches no module "
                f"of graph {graph_name}", RematBudgetWarning, stacklevel=2,
            )
    budget = resolve_budget(options, problem, device)
    try:
        result = solve_budget(problem, budget if budget is not None else int(UNBOUNDED))
        solution = result.solution
    except InfeasibleBudget as error:
        if options.on_infeasible == "raise":
            raise
        warnings.warn(f"{error}. Using the lowest-memory plan (on_infeasible='closest').", RematBudgetWarning, stacklevel=2)
        solution, result = error.lowest, None
    reasons = {}
    for group in solution.groups:
        label = _group_label(group)
        for node in problem.group_saved(group):
            reasons.setdefault(node.name, f"segment plan: {label}")
    for node, why in problem.banned.items():
        reasons[node.name] = f"cannot be recomputed: {why}"
    return BudgetedChoice(
        saved=solution.saved,
        reasons=reasons,
        budget_bytes=budget,
        predicted_peak_bytes=solution.peak,
        groups=[_group_label(g) for g in solution.groups],
        solve_seconds=result.solve_seconds if result is not None else 0.0,
    )


def _group_label(group: Group) -> str:
    span = f"segment {group.first}" if group.first == group.last else f"segments {group.first}-{group.last}"
    return f"{span}: {group.mode}"


