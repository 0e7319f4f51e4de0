"""From the options to the values one joint graph keeps: budget, policy, excluded
modules, tagged values.

The passes know nothing of options: ``passes.budget`` solves a chain of segments
under a byte budget with a set of allowed groups. This module reads the options,
resolves the budget to bytes ("6GB", a fraction of the peak without recomputation,
"auto"), turns a policy into the groups it allows, ``exclude`` into values that
are never recomputed and ``save_only`` into the only values that may be kept
(``passes.remat.solve_keep_only``), and says what it decided. With offloading
(``remat.offloading``) it also weighs plans that recompute less and offload the rest.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import gc
import math
import re
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.fx as fx

from remat._torch_internals import JointInfo
from remat.cost_models.devices import available_memory
from remat.cost_models.runtime import make_estimator
from remat.cost_models.sizes import graph_device, human_bytes
from remat.options import RematOptions, parse_budget
from remat.offloading import OffloadChoice, choose_offloads, describe_offloads, offload_problem, offload_tags, pick_offloads
from remat.passes.backward_copies import (
    BackwardCopy,
    find_backward_copies,
    find_late_copies,
    insert_backward_copies,
    with_backward_copies,
)
from remat.passes.budget import (
    KEEP_MODES, RECOMPUTE, BudgetProblem, Group, InfeasibleBudget, Solution, budget_text, lowest_plan, simulate_saved,
    solve_budget,
)
from remat.passes.offload import OffloadOutcome, OffloadProblem
from remat.passes.remat import solve_keep_only
from remat.passes.recompute_rules import source_op
from remat.passes.schedule import complete_saved_set
from remat.passes.segments import Segment, find_segments
from remat.tags import tagged_values
from remat.warning_site import user_stacklevel

AUTO_MARGIN = 0.9
UNBOUNDED = 1e30
# With offloading, plans that recompute less than the budget needs are tried too, at
# these multiples of the budget, and offload makes up the difference.
OFFLOAD_RELAXATIONS = (1.25, 1.5, 2.0, 3.0, UNBOUNDED)
# Of two plans that miss the budget, peaks this close (a fraction of the lower) are
# equal: the faster wins (late copies lowered the U-Net's lowest peak by 256 bytes
# for 7% more time)
SAME_PEAK = 1e-3


class RematBudgetWarning(UserWarning):
    """The memory budget cannot be met (the lowest-memory plan is used instead), or
    does not bound the whole step (a graph break splits it)."""


@dataclass
class BudgetedChoice:
    """What the solver kept, why, and the numbers behind it."""

    saved: list[fx.Node]
    reasons: dict[str, str]
    budget_bytes: int | None
    predicted_peak_bytes: int
    groups: list[str]
    solve_seconds: float
    offload: OffloadChoice | None = None


class SaveOnlyOverBudget(InfeasibleBudget):
    """The one plan that ``save_only`` allows does not fit the memory budget."""

    def __init__(self, budget: int, plan: Solution, save_only: tuple[str, ...], stated: str | None = None) -> None:
        super().__init__(budget, plan, stated)
        self.args = (
            f"memory_budget {budget_text(budget, stated)} cannot be met with save_only={list(save_only)!r}: keeping only "
            f"the values tagged with these names (and what can never be recomputed), the simulated peak "
            f"is {human_bytes(plan.peak)} (of which {human_bytes(plan.timeline.resident_bytes)} are parameters and "
            "inputs). Raise the budget, tag fewer or smaller values, or pass on_infeasible='closest' "
            "to train with this plan anyway",
        )



def fused_model(options: RematOptions) -> bool:
    """Plan memory as Inductor runs the graphs (fused) or as they run op by op."""
    return options.inner_compiler == "inductor"


def uses_solver(options: RematOptions) -> bool:
    return (
        options.memory_budget is not None
        or options.policy is not None
        or bool(options.exclude)
        or bool(options.save_only)
        or bool(options.offload_only)
    )


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


def resolve_budget(
    options: RematOptions, resident: int, save_peak: Callable[[], int], device: torch.device
) -> int | None:
    """The budget in bytes of the whole step (resident bytes included). ``save_peak``:
    the simulated peak with nothing recomputed, asked for only by a fraction."""
    if options.memory_budget is None:
        return None
    kind, value = parse_budget(options.memory_budget)
    if kind == "bytes":
        return int(value)
    if kind == "fraction":
        return int(value * save_peak())
    return int(AUTO_MARGIN * available_memory(device)) + resident


def stated_budget(options: RematOptions, save_peak: Callable[[], int]) -> str | None:
    """How ``options`` gave the memory budget where that was not in bytes: the fraction
    and the peak it is a fraction of (``save_peak``, as for ``resolve_budget``), or
    "auto". For error messages."""
    kind, value = parse_budget(options.memory_budget)
    if kind == "fraction":
        return f"{value:g} x the {human_bytes(save_peak())} peak without rematerialization"
    if kind == "auto":
        return f"'auto': {AUTO_MARGIN:.0%} of the memory free on the device, plus the parameters and inputs"
    return None


def _save_everything_peak(problem: BudgetProblem) -> int:
    return problem.simulate([Group(i, i, "save") for i in range(len(problem.segments))]).peak


def choose_saved(
    graph: fx.Graph, info: JointInfo, num_fwd_outputs: int, options: RematOptions, graph_name: str
) -> BudgetedChoice:
    """The values to keep for ``graph`` under the budget and policy of ``options``."""
    with _garbage_collection_paused():
        if options.save_only:
            return _choose_tagged(graph, info, num_fwd_outputs, options, graph_name)
        return _choose_budgeted(graph, info, num_fwd_outputs, options, graph_name)


@contextlib.contextmanager
def _garbage_collection_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for the solve. Each simulation allocates
    thousands of short-lived objects, which start collections of the oldest
    generation, and those scan every object of the traced program (its graph and fake
    tensors): a quarter of the solve time on a 12-layer GPT (``make solver-sweep``
    at commit ba24989: 1.38 s without it, 1.83 s with it the commit before). The solve
    makes few reference cycles; the collector runs again after."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _choose_budgeted(
    graph: fx.Graph, info: JointInfo, num_fwd_outputs: int, options: RematOptions, graph_name: str
) -> BudgetedChoice:
    """The fastest plan under the budget; under Inductor, of the graph as it is and of
    the graph whose backward reads its own copies of skip connections
    (``passes.backward_copies``), which ``graph`` then takes on; where neither meets
    the budget, also of the graph with late copies (each try is one more solve)."""
    started = time.perf_counter()
    device = graph_device(graph)
    estimator = make_estimator(options.time_estimator, device)
    segments = find_segments(graph, info)
    modes, starts = _policy_groups(options, len(segments))

    def problem_for(joint: fx.Graph, joint_info: JointInfo, chain: list[Segment], never: _NeverRecompute) -> BudgetProblem:
        return BudgetProblem(
            joint, joint_info, num_fwd_outputs, estimator,
            modes=modes, never_recompute=never, group_starts=starts, segments=chain, fused=fused_model(options),
        )

    never = _NeverRecompute(options, graph)
    problem = problem_for(graph, info, segments, never)
    _warn_unmatched(options, never.matched, graph_name)
    save_peak = functools.cache(lambda: _save_everything_peak(problem))
    budget = resolve_budget(options, problem.resident, save_peak, device)

    def with_best_copies(current: _Outcome, candidates: list[list[BackwardCopy]]) -> _Outcome:
        """The best of ``current`` and the graph with each set of copies, which
        ``graph`` takes on if it wins."""
        best, chosen = current, None
        distinct = [c for i, c in enumerate(candidates) if c and c not in candidates[:i]]  # one solve each
        for copies in distinct:
            twin, twin_info = with_backward_copies(graph, info, copies)
            never = _NeverRecompute(options, twin)
            copied = _outcome(problem_for(twin, twin_info, find_segments(twin, twin_info), never), budget, options)
            if copied.better_than(best):
                best, chosen = copied, copies
        if chosen is not None:
            insert_backward_copies(graph, chosen, info)
        return best

    outcome = _outcome(problem, budget, options)
    if problem.fused:
        outcome = with_best_copies(outcome, [find_backward_copies(graph, info, segments)])
        if outcome.infeasible is not None:
            outcome = with_best_copies(outcome, [find_late_copies(graph, info, behind) for behind in (False, True)])
    solution, offload, peak = outcome.solution, outcome.offload, outcome.peak
    if outcome.infeasible is not None:
        error = InfeasibleBudget(outcome.infeasible.budget, outcome.infeasible.lowest, stated_budget(options, save_peak))
        if options.on_infeasible == "raise":
            raise error
        warnings.warn(f"{error}. Using the lowest-memory plan (on_infeasible='closest').", RematBudgetWarning, stacklevel=user_stacklevel())
        offload = choose_offloads(outcome.problem.graph, solution.saved, num_fwd_outputs, options, fused_model(options))
        peak = offload.peak_bytes if offload is not None else solution.peak
    reasons = {}
    for group in solution.groups:
        label = _group_label(group)
        for node in outcome.problem.group_saved(group):
            reasons.setdefault(node.name, f"segment plan: {label}")
    for node, why in outcome.problem.banned.items():
        reasons[node.name] = f"cannot be recomputed: {why}"
    by_name = {node.name: node for node in graph.nodes}
    return BudgetedChoice(
        saved=[by_name[node.name] for node in solution.saved],
        reasons=reasons,
        budget_bytes=budget,
        predicted_peak_bytes=peak,
        groups=[_group_label(g) for g in solution.groups],
        solve_seconds=time.perf_counter() - started,
        offload=offload,
    )


@dataclass
class _Outcome:
    """A problem solved under a budget: the plan, what it offloads and its simulated
    peak; where no plan meets the budget, the lowest plan and the error that says so."""

    problem: BudgetProblem
    solution: Solution
    offload: OffloadChoice | None
    peak: int
    infeasible: InfeasibleBudget | None = None

    def better_than(self, other: _Outcome) -> bool:
        """Meeting the budget first, then the least estimated time (exposed transfers
        included); of two plans that miss it, the lower, unless their peaks are the
        same within ``SAME_PEAK``."""
        if (self.infeasible is None) != (other.infeasible is None):
            return self.infeasible is None
        if self.infeasible is not None and abs(self.peak - other.peak) > SAME_PEAK * min(self.peak, other.peak):
            return self.peak < other.peak
        return self.seconds < other.seconds

    @property
    def seconds(self) -> float:
        return self.solution.seconds + (self.offload.exposed_s if self.offload is not None else 0.0)


def _outcome(problem: BudgetProblem, budget: int | None, options: RematOptions) -> _Outcome:
    try:
        return _Outcome(problem, *_solve(problem, budget, options))
    except InfeasibleBudget as error:
        return _Outcome(problem, error.lowest, None, error.lowest.peak, error)


class _NeverRecompute:
    """What may not be recomputed: values of ``exclude``'d modules and values that
    ``offload_only`` names (they are kept, to be offloaded)."""

    def __init__(self, options: RematOptions, graph: fx.Graph) -> None:
        self.excluded, self.matched = excluded_by(options.exclude)
        self.tags = offload_tags(options, graph) if options.offload_only else {}

    def __call__(self, node: fx.Node) -> str | None:
        return self.excluded(node) or self.tags.get(node)


def _solve(
    problem: BudgetProblem, budget: int | None, options: RematOptions
) -> tuple[Solution, OffloadChoice | None, int]:
    """The fastest plan under ``budget``, and what it offloads: without offloading, the
    budgeted solver's plan; with it, that plan and the plans that recompute less (at
    ``OFFLOAD_RELAXATIONS`` of the budget) with offloads that bring the peak back under
    the budget, compared by estimated step time plus exposed transfer time."""
    if not options.offload:
        solution = solve_budget(problem, budget if budget is not None else int(UNBOUNDED))
        return solution, None, solution.peak
    limit = budget if budget is not None else int(UNBOUNDED)
    factors = (1.0, *OFFLOAD_RELAXATIONS) if budget is not None else (1.0,)
    best: tuple[float, Solution, OffloadProblem, OffloadOutcome] | None = None
    failure: InfeasibleBudget | None = None
    tried: set[tuple[Group, ...]] = set()
    for factor in factors:
        try:
            solution = solve_budget(problem, int(min(limit * factor, UNBOUNDED)))
        except InfeasibleBudget as error:
            failure = failure or error
            continue
        if tuple(solution.groups) in tried:
            continue
        tried.add(tuple(solution.groups))
        offloads = offload_problem(problem.graph, solution.order, options, problem.seconds, problem.fused)
        outcome = pick_offloads(offloads, options, budget)
        if outcome is None:
            continue
        seconds = solution.seconds + outcome.schedule.exposed_s
        if best is None or seconds < best[0]:
            best = (seconds, solution, offloads, outcome)
    if best is None:
        if failure is not None:
            raise failure
        raise InfeasibleBudget(limit, lowest_plan(problem))
    _, solution, offloads, outcome = best
    return solution, describe_offloads(problem.graph, offloads, outcome, options), outcome.peak


def _choose_tagged(
    graph: fx.Graph, info: JointInfo, num_fwd_outputs: int, options: RematOptions, graph_name: str
) -> BudgetedChoice:
    """``save_only``: keep only the values tagged with its names (and what can never be
    recomputed); with a budget, check the plan's simulated peak against it."""
    started = time.perf_counter()
    device = graph_device(graph)
    estimator = make_estimator(options.time_estimator, device)
    never = _NeverRecompute(options, graph)
    matched = never.matched
    names = set(options.save_only)
    tagged = tagged_values(graph)
    found = set().union(*tagged.values())
    for name in options.save_only:
        if name not in found:
            warnings.warn(
                f"remat option save_only={list(options.save_only)!r}: no value of graph {graph_name} is "
                f"tagged {name!r} (name values with remat.tag(x, {name!r}))", RematBudgetWarning, stacklevel=user_stacklevel(),
            )
    kept_tags = {
        node: f"tagged {', '.join(map(repr, sorted(tags & names)))} (save_only)"
        for node, tags in tagged.items()
        if tags & names
    }
    cut = solve_keep_only(graph, info, lambda node: never(node) or kept_tags.get(node))
    _warn_unmatched(options, matched, graph_name)
    must_save = {n for n in graph.nodes if n.name in cut.banned}
    saved = complete_saved_set(graph, cut.saved, num_fwd_outputs, must_save)
    plan = simulate_saved(graph, saved, num_fwd_outputs, estimator, fused_model(options))
    budget = None
    if options.memory_budget is not None:
        @functools.cache
        def save_peak() -> int:
            problem = BudgetProblem(
                graph, info, num_fwd_outputs, estimator, modes=("save",), never_recompute=never, fused=fused_model(options)
            )
            return _save_everything_peak(problem)

        budget = resolve_budget(options, plan.timeline.resident_bytes, save_peak, device)
    offload, peak = None, plan.peak
    if options.offload:
        offloads = offload_problem(graph, plan.order, options, estimator, fused_model(options))
        outcome = pick_offloads(offloads, options, budget) or offloads.evaluate(
            offloads.candidates if options.offload is True else []
        )
        offload, peak = describe_offloads(graph, offloads, outcome, options), outcome.peak
    if budget is not None:
        if peak > budget:
            error = SaveOnlyOverBudget(budget, plan, options.save_only, stated_budget(options, save_peak))
            if options.on_infeasible == "raise":
                raise error
            warnings.warn(f"{error}. Using it (on_infeasible='closest').", RematBudgetWarning, stacklevel=user_stacklevel())
    reasons = {name: f"cannot be recomputed: {why}" for name, why in cut.banned.items()}
    for node in saved:  # the parts of a tuple-valued op that may not be recomputed
        if (source := source_op(node)) is not node and source.name in reasons:
            reasons.setdefault(node.name, reasons[source.name])
    reasons.update({node.name: why for node, why in kept_tags.items()})
    return BudgetedChoice(
        saved=saved,
        reasons=reasons,
        budget_bytes=budget,
        predicted_peak_bytes=peak,
        groups=[],
        solve_seconds=time.perf_counter() - started,
        offload=offload,
    )


def _warn_unmatched(options: RematOptions, matched: set[str], graph_name: str) -> None:
    for pattern in options.exclude:
        if pattern not in matched:
            warnings.warn(
                f"remat option exclude={list(options.exclude)!r}: pattern {pattern!r} matches no module "
                f"of graph {graph_name}", RematBudgetWarning, stacklevel=user_stacklevel(),
            )


def _group_label(group: Group) -> str:
    span = f"segment {group.first}" if group.first == group.last else f"segments {group.first}-{group.last}"
    return f"{span}: {group.mode}"


