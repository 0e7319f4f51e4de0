"""The budgeted solver: the least recomputation that keeps the simulated peak under a budget.

The forward is a chain of segments (``segments``). A plan covers the chain with
groups; each group is one segment kept in some mode, or a run of segments recomputed
from the group's input:

- ``save``: keep every value of the segment that the backward reads (no recompute);
- ``fusible`` (graphs that Inductor compiles): recompute only what Inductor can
  recompute inside the backward's own kernels: like ``mincut``, but never a value
  that an extern kernel of the backward reads (``recompute_rules.stored_in_backward_reason``);
- ``mincut``: keep the fewest bytes, recomputing cheap ops but never matmul,
  convolution, attention or a reduction that shrinks its input (a min-cut inside the
  segment);
- ``heavy``: keep only matmul, convolution and attention outputs, recompute the rest;
- ``recompute``: keep only the group's input (and what can never be recomputed:
  random ops, ops with side effects, excluded modules); the backward recomputes the
  group when it first needs it.

The peak of a plan is modelled per segment from simulations of the whole step with
every segment in one mode (``GroupCost``): what a segment keeps adds to the memory
of everything after it in the forward and of its own part of the backward, on top of
the segment's own working set there. A dynamic program over the chain, with the
bytes kept so far as its state, finds the plan of least estimated step time
(``cost_models.step_time``: op by op, or as Inductor fuses the graphs) whose modelled
peak fits; the exact simulator (``memory.simulate_order``) then checks
the plan and the budget given to the model is corrected until the simulated peak
fits. ``solve_ilp`` solves the same model exactly with scipy's ``milp``, to check the
dynamic program against.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch.fx as fx
from scipy.optimize import Bounds, LinearConstraint, milp

from remat._torch_internals import JointInfo, is_primal
from remat.cost_models.memory import MemoryTimeline, order_fusions, simulate_order
from remat.cost_models.node_memo import Store, fixed_graph
from remat.cost_models.fusion import inlined_by_inductor
from remat.cost_models.sizes import human_bytes, node_storages
from remat.cost_models.step_time import position_seconds
from remat.passes.recompute_rules import (
    ban_reason, heavy_reason, is_heavy, is_view, reduction_reason, source_op, stored_in_backward_reason,
)
from remat.passes.remat import cheapest_saved
from remat.passes.schedule import StepOrder, complete_saved_set, step_order
from remat.passes.segments import Segment, find_segments, remap

FUSIBLE = "fusible"
KEEP_MODES = ("save", FUSIBLE, "mincut", "heavy")
RECOMPUTE = "recompute"
BUCKETS = 2048
MAX_BUCKETS = 8 * BUCKETS
CORRECTIONS = 8
BRACKET = 0.002  # corrections stop when the model budgets of a fit and a miss are this close
# After the corrections, the model is also asked for plans at these steps below the
# budget: its additive times miss some of the simulated ones (by 0.5% on a small GPT,
# enough to prefer a slower plan at a higher budget), and a leaner plan may run faster.
# A step at or above a model budget whose plan missed is skipped: where the model
# underestimates peaks, the corrections go below the steps, and a plan asked for there
# is no leaner than one that missed (two of the ten simulations of a 12-layer GPT's solve).
LADDER = 3
LADDER_STEP = 0.02
# Plans that the model times within this fraction of a step are worth telling apart
# by simulation, and no more than this: the corrections stop once the model sees no
# more to gain, and the ladder simulates only the plans that the model times within it
# of the best. In the searches for the budget sweeps' 24 plans (GPT and U-Net), the
# largest model gap a simulation overturned was 0.06%, and these cuts change none of
# the plans (benchmarks/results/solve_time_xeon.md); every simulation they skip saves
# a 12-layer GPT's solve 0.06-0.15 s.
GAIN = 0.001
BISECTIONS = 10
DESCENT_SIMULATIONS = 100  # the lowest plan's descent (``_descend``)


@dataclass(frozen=True)
class Group:
    """Segments ``first..last`` (inclusive) in one ``mode``; keep modes cover one segment."""

    first: int
    last: int
    mode: str


@dataclass(frozen=True)
class GroupCost:
    """A group in the peak model: the bytes it keeps for the backward (``kept``), its
    own peak above the bytes kept before it, per segment, in the forward and in the
    backward (``peaks``; ``top`` is their maximum), and the estimated time of its part
    of the step (its forward, its backward and what that recomputes: under Inductor,
    keeping a value has a price too)."""

    group: Group
    kept: float
    peaks: np.ndarray
    seconds: float

    @property
    def top(self) -> float:
        return float(self.peaks.max())


@dataclass
class Solution:
    """A plan: its groups, the saved values, the simulated timeline and the estimated
    seconds of each of its positions (``step_time``)."""

    groups: list[Group]
    saved: list[fx.Node]
    order: StepOrder
    timeline: MemoryTimeline
    position_seconds: list[float]

    @property
    def seconds(self) -> float:
        """Estimated seconds of the whole step."""
        return float(sum(self.position_seconds))

    @property
    def peak(self) -> int:
        return self.timeline.peak_bytes + self.timeline.resident_bytes


def simulate_saved(
    graph: fx.Graph, saved: list[fx.Node], num_fwd_outputs: int, seconds: Callable[[fx.Node], float], fused: bool
) -> Solution:
    """The step that keeps ``saved`` (a complete saved set): its order, simulated
    timeline and estimated time (``fused``: as Inductor compiles it)."""
    order = step_order(graph, saved, num_fwd_outputs)
    fusions = order_fusions(order) if fused else None
    timeline = simulate_order(order, fused=fused, fusions=fusions)
    return Solution([], saved, order, timeline, position_seconds(order.forward, order.backward, seconds, fusions))


def budget_text(budget: int, stated: str | None) -> str:
    """A budget in bytes, with how the user gave it where that was not in bytes
    (``stated``: "0.5 x the 313.25 KiB peak without rematerialization")."""
    return human_bytes(budget) + (f" ({stated})" if stated else "")


class InfeasibleBudget(ValueError):
    """No plan brings the simulated peak under the budget."""

    def __init__(self, budget: int, lowest: Solution, stated: str | None = None) -> None:
        self.budget = budget
        self.lowest = lowest
        self.stated = stated
        super().__init__(
            f"memory_budget {budget_text(budget, stated)} cannot be met: the lowest simulated peak remat can reach for "
            f"this graph is {human_bytes(lowest.peak)} (of which {human_bytes(lowest.timeline.resident_bytes)} are "
            "parameters and inputs). Raise the budget to at least that, or pass "
            "on_infeasible='closest' to train with the lowest-memory plan"
        )



class BudgetProblem:
    """The segments of one joint graph, the saved values of each mode, and the costs
    that the dynamic program and the ILP share."""

    def __init__(
        self,
        graph: fx.Graph,
        info: JointInfo,
        num_fwd_outputs: int,
        seconds: Callable[[fx.Node], float],
        *,
        modes: Sequence[str] = (*KEEP_MODES, RECOMPUTE),
        never_recompute: Callable[[fx.Node], str | None] = lambda node: None,
        group_starts: Sequence[int] | None = None,
        segments: list[Segment] | None = None,
        fused: bool = False,
    ) -> None:
        self.graph = graph
        self.fused = fused
        self.info = info
        self.num_fwd_outputs = num_fwd_outputs
        self.seconds = functools.cache(seconds)  # every simulated plan sums the same nodes' estimates
        # "fusible" and rebuilt inputs are about what Inductor fuses: op by op they are
        # recomputation like any other
        self.modes = tuple(m for m in modes if fused or m != FUSIBLE)
        self.segments = find_segments(graph, info) if segments is None else segments
        self.segment_of = {node: s.index for s in self.segments for node in s.nodes}
        forward = [n for n in graph.nodes if n in info.required_fw]
        self.banned = {  # views are never kept, so never banned: they follow their base
            n: reason for n in forward if (reason := ban_reason(n) or (not is_view(n) and never_recompute(n)))
        }
        self.group_starts = None if group_starts is None else sorted(set(group_starts) | {0})
        resident = dict(
            pair for n in graph.find_nodes(op="placeholder") if is_primal(n) for pair in node_storages(n)
        )
        self._resident_keys = set(resident)
        self._storage_cache: dict[fx.Node, dict[int, int]] = {}
        self._simulated: dict[tuple[Group, ...], Solution] = {}
        self._steps: dict[tuple[fx.Node, ...], Solution] = {}  # by saved set
        self._memo: Store = {}  # per-node facts its simulations share (the graph does not change)
        self.resident = sum(resident.values())
        self._pieces: dict[tuple[int, str], list[fx.Node]] = {}
        self._solve_pieces()
        self.costs = self._calibrate()

    @functools.cached_property
    def group_table(self) -> _GroupTable:
        """``costs`` as ``solve_dp`` reads them, built once: a solve calls it a dozen times."""
        return _GroupTable(list(self.costs.values()))

    # --- saved values -------------------------------------------------------

    def _solve_pieces(self) -> None:
        """Each segment's saved values in each keep mode; repeated segments once."""
        solved: dict[tuple, Segment] = {}
        banned_names = {n.name for n in self.banned}
        for segment in self.segments:
            first = solved.setdefault(segment.signature, segment)
            for mode in {*self.modes, "save"} - {RECOMPUTE}:  # "save" measures fractions
                if first is not segment:
                    self._pieces[segment.index, mode] = remap(self._pieces[first.index, mode], first, segment)
                    continue
                region = list(segment.nodes)
                if mode == "save":
                    bans, no_keep = {n.name for n in region if not is_view(n)}, frozenset()
                elif mode == "mincut":
                    bans = banned_names | {n.name for n in region if heavy_reason(n) or reduction_reason(n)}
                    no_keep = frozenset()
                elif mode == FUSIBLE:
                    bans = banned_names | {
                        n.name
                        for n in region
                        if heavy_reason(n) or reduction_reason(n) or stored_in_backward_reason(n, self._in_backward)
                    }
                    no_keep = frozenset()
                else:  # heavy
                    bans = banned_names | {n.name for n in region if is_heavy(n)}
                    no_keep = frozenset(
                        n for n in region if not is_heavy(n) and n not in self.banned and source_op(n) not in self.banned
                    )
                saved, _ = cheapest_saved(region, self.info, banned=bans, no_keep=no_keep)
                self._pieces[segment.index, mode] = saved

    def _in_backward(self, node: fx.Node) -> bool:
        return node not in self.info.required_fw

    def group_saved(self, group: Group) -> list[fx.Node]:
        """What a group keeps, besides what ``complete_saved_set`` adds."""
        first = self.segments[group.first]
        if group.mode != RECOMPUTE:
            return [*first.inputs, *self._pieces[group.first, group.mode]]
        inside = {n for s in self.segments[group.first : group.last + 1] for n in s.nodes}
        inputs = dict.fromkeys(
            n for s in self.segments[group.first : group.last + 1] for n in s.inputs if n not in inside
        )
        return list(inputs)

    def saved_values(self, groups: Iterable[Group]) -> list[fx.Node]:
        groups = list(groups)
        chosen = [n for g in groups for n in self.group_saved(g)]
        if self.fused:
            dropped = set(self._rebuildable_inputs(groups, set(chosen)))
            chosen = [n for n in chosen if n not in dropped]
        return complete_saved_set(self.graph, chosen, self.num_fwd_outputs, set(self.banned))

    def _rebuildable_inputs(self, groups: Sequence[Group], kept: set[fx.Node]) -> list[fx.Node]:
        """Group inputs that the backward can rebuild from other kept values with
        pointwise ops alone, which fuse into the kernels that read them: a group keeps
        its inputs, but an input made by another segment (a U-Net's skip connection)
        is often one pointwise step from what that segment keeps (GroupNorm and SiLU
        of a kept convolution output, with its statistics). "save" and "fusible"
        groups keep theirs (rebuilt, a value that an extern kernel reads is stored)."""
        inputs = dict.fromkeys(
            n for g in groups if g.mode not in ("save", FUSIBLE)
            for n in (self.segments[g.first].inputs if g.mode != RECOMPUTE else self.group_saved(g))
        )
        dropped: list[fx.Node] = []
        for node in inputs:
            if self._rebuilt_from(node, kept - {node}):
                kept = kept - {node}
                dropped.append(node)
        return dropped

    def _rebuilt_from(self, node: fx.Node, kept: set[fx.Node], limit: int = 32) -> bool:
        """Whether ``node`` is a pointwise function of ``kept`` values and parameters,
        through at most ``limit`` ops that may be recomputed."""
        pending, seen = [node], set()
        while pending:
            current = pending.pop()
            if current in seen or current in kept or is_primal(current):
                continue
            seen.add(current)
            if len(seen) > limit or current in self.banned or current.op != "call_function":
                return False
            if not (is_view(current) or inlined_by_inductor(current)):
                return False
            pending.extend(current.all_input_nodes)
        return True

    def simulate(self, groups: Sequence[Group]) -> Solution:
        """The plan of ``groups``, simulated once (calibration, the budget's fraction
        and the search ask for some plans more than once), and each saved set once:
        a segment may keep the same values in two modes (9% of the simulations for the
        budget sweeps' GPT and U-Net plans)."""
        key = tuple(groups)
        if key not in self._simulated:
            saved = self.saved_values(groups)
            saved_set = tuple(saved)  # in graph order
            step = self._steps.get(saved_set)
            if step is None:
                with fixed_graph(self._memo):
                    step = self._steps[saved_set] = simulate_saved(
                        self.graph, saved, self.num_fwd_outputs, self.seconds, self.fused
                    )
            self._simulated[key] = replace(step, groups=list(groups))
        return self._simulated[key]

    def was_simulated(self, groups: Sequence[Group]) -> bool:
        return tuple(groups) in self._simulated

    def simulated(self) -> list[Solution]:
        """Every plan simulated so far."""
        return list(self._simulated.values())

    # --- the peak model ------------------------------------------------------

    def _storages(self, node: fx.Node) -> dict[int, int]:
        """The storages ``node`` holds that are not resident, with their bytes."""
        found = self._storage_cache.get(node)
        if found is None:
            found = {key: nbytes for key, nbytes in node_storages(node) if key not in self._resident_keys}
            self._storage_cache[node] = found
        return found

    def _bytes(self, nodes: Iterable[fx.Node]) -> float:
        seen: dict[int, int] = {}
        for node in nodes:
            seen.update(self._storages(node))
        return float(sum(seen.values()))

    def _calibrate(self) -> dict[Group, GroupCost]:
        """Simulate the step with every segment in one mode, for each mode, and read
        each segment's share of the peak off the timeline."""
        count = len(self.segments)
        kept: dict[tuple[int, str], float] = {}
        forward_peak: dict[tuple[int, str], float] = {}
        backward_peak: dict[tuple[int, str], float] = {}
        segment_seconds: dict[tuple[int, str], float] = {}
        for mode in self.modes:
            groups = [Group(i, i, mode) for i in range(count)]
            solution = self.simulate(groups)
            timeline, order = solution.timeline, solution.order
            saved = set(order.saved)  # what the backward reads (the partitioner drops the rest)
            for i, group in enumerate(groups):
                kept[i, mode] = self._bytes(n for n in self.group_saved(group) if n in saved) + self._bytes(
                    n for n in self.segments[i].nodes if n in self.banned and n in saved
                )
            prefix = np.concatenate([[0.0], np.cumsum([kept[i, mode] for i in range(count)])])
            fw_max = np.full(count, -np.inf)
            bw_max = np.full(count, -np.inf)
            spent = np.zeros(count)
            for position, node in enumerate(order.forward):
                if node in self.segment_of:
                    k = self.segment_of[node]
                    fw_max[k] = max(fw_max[k], timeline.live_bytes[position])
                    spent[k] += solution.position_seconds[position]
            start = len(order.forward)
            for offset, k in enumerate(self._backward_owners(order.backward)):
                bw_max[k] = max(bw_max[k], timeline.live_bytes[start + offset])
                spent[k] += solution.position_seconds[start + offset]
            for k in range(count):
                forward_peak[k, mode] = (fw_max[k] - prefix[k]) if np.isfinite(fw_max[k]) else 0.0
                backward_peak[k, mode] = (bw_max[k] - prefix[k]) if np.isfinite(bw_max[k]) else 0.0
                segment_seconds[k, mode] = float(spent[k])
        read_by_backward = {
            k: self._bytes(
                n for n in s.nodes if any(u not in self.info.required_fw for u in n.users)
            )
            for k, s in enumerate(self.segments)
        }
        costs: dict[Group, GroupCost] = {}
        for group in self.candidate_groups():
            if group.mode != RECOMPUTE:
                k, mode = group.first, group.mode
                peak = max(forward_peak[k, mode], backward_peak[k, mode])
                costs[group] = GroupCost(group, kept[k, mode], np.array([peak]), segment_seconds[k, mode])
        if RECOMPUTE not in self.modes:
            return costs
        banned_bytes = np.array(
            [self._bytes(n for n in s.nodes if n in self.banned) for s in self.segments]
        )
        seconds = np.array([segment_seconds[k, RECOMPUTE] for k in range(count)])
        by_first: dict[int, list[Group]] = {}
        for group in self.candidate_groups():
            if group.mode == RECOMPUTE:
                by_first.setdefault(group.first, []).append(group)
        for first, groups in by_first.items():
            # Member k of a group from ``first`` peaks at max(forward[k], kept + backward[k]):
            # in the forward, above what the group's earlier segments keep; in the backward,
            # above the group's input and the recomputed values of earlier segments that
            # wait for their own backward. Only ``kept`` depends on where the group ends.
            members = np.arange(first, count)
            own = np.array([kept[k, RECOMPUTE] for k in members])
            before = np.concatenate([[0.0], np.cumsum(own)[:-1]])
            waiting = np.concatenate([[0.0], np.cumsum([read_by_backward[k] for k in members])[:-1]])
            forward = before + np.array([forward_peak[k, RECOMPUTE] for k in members])
            backward = waiting + np.array([backward_peak[k, RECOMPUTE] for k in members]) - own
            spent = np.cumsum(seconds[first:])
            banned = np.cumsum(banned_bytes[first:])
            inputs = self._group_input_bytes(first, max(g.last for g in groups))
            for group in groups:
                size = group.last - first + 1
                group_kept = inputs[size - 1] + banned[size - 1]
                peaks = np.maximum(forward[:size], group_kept + backward[:size])
                costs[group] = GroupCost(group, group_kept, peaks, float(spent[size - 1]))
        return costs

    def _group_input_bytes(self, first: int, last: int) -> list[float]:
        """Bytes of the inputs of the recompute groups ``first..j`` for j up to
        ``last``: the segments' inputs made before segment ``first``, each storage once."""
        seen: dict[int, int] = {}
        total = 0.0
        result = []
        for k in range(first, last + 1):
            for node in self.segments[k].inputs:
                if self.segment_of.get(node, -1) >= first:
                    continue
                for key, nbytes in self._storages(node).items():
                    if key not in seen:
                        seen[key] = nbytes
                        total += nbytes
            result.append(total)
        return result

    @functools.cached_property
    def _gradient_owners(self) -> dict[fx.Node, int]:
        """The segment each gradient op belongs to (see ``_backward_owners``)."""
        last = len(self.segments) - 1
        owner: dict[fx.Node, int] = {}
        for node in self.graph.nodes:
            if node in self.info.tangents_closure:
                reads = [self.segment_of[a] for a in node.all_input_nodes if a in self.segment_of]
                if not reads:
                    reads = [owner[a] for a in node.all_input_nodes if a in owner]
                owner[node] = min(reads, default=last)
        return owner

    def _backward_owners(self, backward: Sequence[fx.Node]) -> list[int]:
        """The segment whose backward each backward step belongs to: a gradient op
        belongs to the earliest segment it reads from; a recomputation, to the
        gradient op that runs next."""
        owner = self._gradient_owners
        last = len(self.segments) - 1
        result = [0] * len(backward)
        following = last
        for index in range(len(backward) - 1, -1, -1):
            node = backward[index]
            if node in owner:
                following = owner[node]
            result[index] = following
        return result

    def candidate_groups(self) -> list[Group]:
        count = len(self.segments)
        groups = [Group(i, i, m) for i in range(count) for m in self.modes if m != RECOMPUTE]
        if RECOMPUTE not in self.modes:
            return groups
        if self.group_starts is None:
            return groups + [Group(i, j, RECOMPUTE) for i in range(count) for j in range(i, count)]
        bounds = [*self.group_starts, count]
        return groups + [Group(a, b - 1, RECOMPUTE) for a, b in zip(bounds, bounds[1:]) if a < b]


def solve_dp(problem: BudgetProblem, budget: float) -> list[Group] | None:
    """The least estimated step time whose modelled peak (above resident bytes) fits
    ``budget``, up to the bucketing: a dynamic program over the chain. Its state is
    the bytes kept so far, in buckets of ``budget / BUCKETS`` (kept bytes may pass the
    budget where later segments peak lower, as the last ones do in the backward);
    each bucket holds the fastest partial plan that reaches it and that plan's exact
    bytes, so every fit is checked exactly, though a slower plan with fewer bytes in
    the same bucket is dropped. None if nothing fits."""
    count = len(problem.segments)
    if budget <= 0:
        return None
    table = problem.group_table
    costs = table.costs
    first = table.starting.get(0)
    if first is None or first.tops.min() > budget:
        return None  # not even the first group fits
    most_kept = sum(float(groups.kept.max()) for groups in table.starting.values())
    unit = budget / BUCKETS
    # kept bytes past the budget get buckets too, up to MAX_BUCKETS (the rest share the last)
    size = min(int(max(budget, most_kept) / unit) + 2, MAX_BUCKETS)
    seconds = np.full((count + 1, size), np.inf)
    kept = np.zeros((count + 1, size))
    # (cost index, source bucket); read only where written: the trace back follows reached states
    came_from = np.empty((count + 1, size, 2), dtype=np.int64)
    seconds[0, 0] = 0.0
    for i in range(count):
        if i in table.starting:
            _extend(table.starting[i], _undominated(seconds[i]), i, budget, unit, seconds, kept, came_from)
    if not np.isfinite(seconds[count]).any():
        return None
    at, position, groups = int(np.argmin(seconds[count])), count, []
    while position > 0:
        index, at = (int(v) for v in came_from[position, at])
        groups.append(costs[index].group)
        position = costs[index].group.first
    return groups[::-1]


def _undominated(seconds: np.ndarray) -> np.ndarray:
    """The states reached (finite ``seconds``) that no state with fewer bytes kept (an
    earlier one) reaches as fast: every plan that goes on from one of the others goes
    on from that one too, fits wherever it fits and is no slower. More than half the
    states of a 12-layer GPT's dynamic program are not worth extending (59%)."""
    reached = np.flatnonzero(np.isfinite(seconds))
    fastest_before = np.minimum.accumulate(np.concatenate([[np.inf], seconds[reached][:-1]]))
    return reached[seconds[reached] < fastest_before]


@dataclass(frozen=True)
class _Starting:
    """The groups that start at one segment, as ``_extend`` takes them: first those
    that end apart, by end (they never compete: ``apart`` of them), then those that end
    together, in order (the earliest wins a tie); their indices into the table and
    their costs."""

    indices: np.ndarray
    apart: int
    tops: np.ndarray
    kept: np.ndarray
    seconds: np.ndarray
    ends: np.ndarray


class _GroupTable:
    """The costs of ``solve_dp``'s groups, by index, and those that start at each
    segment as arrays (``starting``)."""

    def __init__(self, costs: Sequence[GroupCost]) -> None:
        self.costs = list(costs)
        by_start: dict[int, list[int]] = {}
        for index, cost in enumerate(costs):
            by_start.setdefault(cost.group.first, []).append(index)
        self.starting = {start: self._starting(indices) for start, indices in by_start.items()}

    def _starting(self, indices: list[int]) -> _Starting:
        end_of = {j: self.costs[j].group.last + 1 for j in indices}
        ends = Counter(end_of.values())
        apart = sorted((j for j in indices if ends[end_of[j]] == 1), key=end_of.__getitem__)
        ordered = np.array(apart + [j for j in indices if ends[end_of[j]] > 1], dtype=np.int64)
        chosen = [self.costs[j] for j in ordered]
        return _Starting(
            indices=ordered,
            apart=len(apart),
            tops=np.array([c.top for c in chosen]),
            kept=np.array([c.kept for c in chosen]),
            seconds=np.array([c.seconds for c in chosen]),
            ends=np.array([end_of[j] for j in ordered], dtype=np.int64),
        )


def _extend(
    groups: _Starting,
    sources: np.ndarray,
    start: int,
    budget: float,
    unit: float,
    seconds: np.ndarray,
    kept: np.ndarray,
    came_from: np.ndarray,
) -> None:
    """One step of ``solve_dp``: the ``groups`` that start at segment ``start``
    appended to the partial plans that end there (``sources``), each kept in the state
    it reaches where it is faster (or as fast with fewer bytes) than what is there."""
    size = seconds.shape[1]
    source_kept, source_seconds = kept[start, sources], seconds[start, sources]
    # a bucket's bytes lie within it, so the sources' kept bytes never decrease: each
    # group fits from a prefix of them, and the states it reaches never decrease
    fitting = np.count_nonzero(source_kept[None, :] + groups.tops[:, None] <= budget, axis=1)
    rows = np.repeat(np.arange(fitting.size), fitting)
    if not rows.size:
        return
    columns = np.arange(rows.size) - np.repeat(np.cumsum(fitting) - fitting, fitting)
    after = source_kept[columns] + groups.kept[rows]
    totals = source_seconds[columns] + groups.seconds[rows]
    ends = groups.ends[rows]
    targets = np.minimum((after / unit).astype(np.int64), size - 1)
    keys = ends * size + targets
    split = int(fitting[: groups.apart].sum())  # the rows of the groups that end apart come first
    first = np.concatenate([
        _fastest_per_run(keys[:split], totals[:split]),
        split + _fastest_per_state(keys[split:], totals[split:], after[split:]),
    ])
    end, target = ends[first], targets[first]
    current, current_kept = seconds[end, target], kept[end, target]
    better = (totals[first] < current) | ((totals[first] == current) & (after[first] < current_kept))
    chosen, end, target = first[better], end[better], target[better]
    seconds[end, target] = totals[chosen]
    kept[end, target] = after[chosen]
    came_from[end, target, 0] = groups.indices[rows[chosen]]
    came_from[end, target, 1] = sources[columns[chosen]]


def _fastest_per_state(keys: np.ndarray, totals: np.ndarray, after: np.ndarray) -> np.ndarray:
    """For each state reached (``keys``), the position of the least total, of equal
    ones the fewest bytes, then the earliest: groups that end together meet in the
    same states, so sorted."""
    if not keys.size:
        return keys
    order = np.lexsort((after, totals, keys))  # stable: the earliest of equals first
    ordered = keys[order]
    firsts = np.empty(ordered.size, dtype=bool)
    firsts[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=firsts[1:])
    return order[firsts]


def _fastest_per_run(keys: np.ndarray, totals: np.ndarray) -> np.ndarray:
    """For each run of equal ``keys`` (which never decrease), the position of its least
    total, the earliest of equal ones. Within one group, and across groups that end
    apart, the states never decrease and the bytes grow with the position: the
    earliest of equal totals has the fewest bytes, and the runs need no sort."""
    if not keys.size:
        return keys
    boundary = np.empty(keys.size, dtype=bool)
    boundary[0] = True
    np.not_equal(keys[1:], keys[:-1], out=boundary[1:])
    run = np.cumsum(boundary) - 1
    least = np.minimum.reduceat(totals, np.flatnonzero(boundary))
    at_least = np.flatnonzero(totals == least[run])
    firsts = np.empty(at_least.size, dtype=bool)
    firsts[0] = True
    np.not_equal(run[at_least[1:]], run[at_least[:-1]], out=firsts[1:])
    return at_least[firsts]


def solve_ilp(problem: BudgetProblem, budget: float) -> list[Group] | None:
    """The same model as ``solve_dp``, solved exactly with scipy's ``milp``."""
    costs = list(problem.costs.values())
    count = len(problem.segments)
    cover = np.zeros((count, len(costs)))
    memory = np.zeros((count, len(costs)))
    for j, cost in enumerate(costs):
        group = cost.group
        for k in range(group.first, group.last + 1):
            cover[k, j] = 1
            memory[k, j] += cost.peaks[k - group.first]
        memory[group.last + 1 :, j] += cost.kept
    result = milp(
        c=np.array([c.seconds for c in costs]),
        constraints=[LinearConstraint(cover, 1, 1), LinearConstraint(memory, -np.inf, budget)],
        integrality=np.ones(len(costs)),
        bounds=Bounds(0, 1),
    )
    if result.x is None:
        return None
    chosen = [c.group for c, x in zip(costs, result.x) if x > 0.5]
    return sorted(chosen, key=lambda g: g.first)


def model_seconds(problem: BudgetProblem, groups: Sequence[Group]) -> float:
    return sum(problem.costs[g].seconds for g in groups)


def solve_budget(problem: BudgetProblem, budget: int) -> Solution:
    """The fastest plan whose simulated peak fits ``budget`` (whole step, resident
    bytes included). Raises ``InfeasibleBudget`` with the lowest plan if none fits."""
    best, lowest = _fit(problem, budget)
    if best is not None:
        return best
    floor = lowest_plan(problem)
    if lowest is None or floor.peak < lowest.peak:
        lowest = floor
    if lowest.peak <= budget:
        return lowest
    raise InfeasibleBudget(budget, lowest)


def _fit(problem: BudgetProblem, budget: int) -> tuple[Solution | None, Solution | None]:
    """The fastest plan that fits ``budget``, if one is found, and
    the lowest plan simulated on the way. The model's budget is corrected by the
    simulated error until one model budget gives a plan that fits and another one
    that does not; then bisection between the two looks for the fastest that fits
    (the plans between them differ by a segment or two, and the simulated time and
    peak of each may fall either side of the model's), until the model's time of the
    plan that misses is within ``GAIN`` of the best's (the plans between are timed
    between the two); then the ladder of leaner plans (``LADDER``). If no plan fits,
    bisection from zero searches one."""
    resident = problem.resident
    best: Solution | None = None
    lowest: Solution | None = None
    target = float(budget)
    fits: float | None = None  # the highest model budget whose plan fits
    fails: float | None = None  # the lowest model budget whose plan does not
    missed_seconds = 0.0  # the model's time of the plan at ``fails``
    tried: set[tuple[Group, ...]] = set()
    for _ in range(CORRECTIONS):
        groups = solve_dp(problem, target - resident)
        if groups is None:
            break
        key = tuple(groups)
        bracketed = fits is not None and fails is not None
        if key in tried and not bracketed:
            break
        tried.add(key)
        solution = problem.simulate(groups)
        if lowest is None or solution.peak < lowest.peak:
            lowest = solution
        if solution.peak <= budget:
            if best is None or solution.seconds < best.seconds:
                best = solution
            fits = target if fits is None else max(fits, target)
        elif fails is None or target < fails:
            fails, missed_seconds = target, model_seconds(problem, groups)
        if best is not None and fits is not None and fails is not None:  # best and fits: set together
            if fails - fits < BRACKET * budget or -_model_gap(problem, best, missed_seconds) <= GAIN:
                break
            target = (fits + fails) / 2
        elif fits is not None:
            target += (budget - solution.peak) / 2 + BRACKET * budget  # the model was pessimistic: try for faster
        else:
            target -= solution.peak - budget
    if best is not None:  # the model's times are not exact: leaner plans may run faster
        for step in range(1, LADDER + 1):
            rung = budget * (1 - LADDER_STEP * step)
            if fails is not None and rung >= fails:
                continue  # where the corrections found a plan that misses: not leaner
            groups = solve_dp(problem, rung - resident)
            if groups is None or _model_gap(problem, best, model_seconds(problem, groups)) > GAIN:
                break  # leaner plans are timed slower still
            solution = problem.simulate(groups)
            if solution.peak <= budget and solution.seconds < best.seconds:
                best = solution
    low, high = 0.0, float(budget) - resident
    for _ in range(BISECTIONS if best is None else 0):  # the corrections failed: search
        middle = (low + high) / 2
        groups = solve_dp(problem, middle)
        if groups is None:
            low = middle
            continue
        solution = problem.simulate(groups)
        if lowest is None or solution.peak < lowest.peak:
            lowest = solution
        if solution.peak <= budget:
            best, low = solution, middle
        else:
            high = middle
    return best, lowest


def _model_gap(problem: BudgetProblem, best: Solution, model_time: float) -> float:
    """How much slower the model times a plan at ``model_time`` than ``best``, as a
    fraction of the best's simulated time (the model's errors differ between plans,
    so they are compared by the model's time alone)."""
    return (model_time - model_seconds(problem, best.groups)) / best.seconds


def lowest_plan(problem: BudgetProblem) -> Solution:
    """The plan of least simulated peak of those the policy allows (ties: the fastest
    the descent meets): from the one of least modelled peak, by bisection on the
    model's budget, or one that was simulated on the way and came out lower (the model
    is not exact: on a small MLP, keeping everything peaked 64 bytes under every plan
    that recomputes), a descent on the simulated peak (``_descend``). The descent never
    moves a kept segment to another keep mode: on the budget sweep's U-Net that left a
    plan at the same peak 0.5% faster by estimate, which measured the same
    (``benchmarks/results/unet_lowest_plan_search.md``)."""
    resident = problem.resident
    uniform = RECOMPUTE if RECOMPUTE in problem.modes else problem.modes[-1]
    everything = problem.simulate([Group(i, i, uniform) for i in range(len(problem.segments))])
    high = float(everything.peak - resident) * 4 + 1
    low = 0.0
    found = solve_dp(problem, high)
    if found is None:
        return everything
    for _ in range(20):
        middle = (low + high) / 2
        groups = solve_dp(problem, middle)
        if groups is None:
            low = middle
        else:
            high, found = middle, groups
    allowed = set(problem.candidate_groups())
    simulated = [s for s in problem.simulated() if all(g in allowed for g in s.groups)]
    start = min([problem.simulate(found), everything, *simulated], key=_lowest_first)
    return _descend(problem, start, allowed)


def _lowest_first(solution: Solution) -> tuple[int, float]:
    return solution.peak, solution.seconds


def _descend(problem: BudgetProblem, start: Solution, allowed: set[Group]) -> Solution:
    """From ``start``, the first neighbour (``_neighbours``) that is lower, or as low
    and faster, again and again while one is, in at most ``DESCENT_SIMULATIONS``
    simulations. The peak model adds up per-segment shares measured with every segment
    in one mode and misses how the segments of a U-Net meet in the decoder's backward:
    on the U-Net of the budget sweep, the model's lowest plan simulated at 44.16 MiB
    and the descent reached 35.10 MiB in 59 simulations (3.6 s; issue 4)."""
    best, left = start, DESCENT_SIMULATIONS
    while True:
        for groups in _neighbours(best.groups, problem.modes):
            if not all(g in allowed for g in groups):
                continue
            if not problem.was_simulated(groups):
                if left == 0:
                    return best
                left -= 1
            candidate = problem.simulate(groups)
            if _lowest_first(candidate) < _lowest_first(best):
                best = candidate
                break
        else:
            return best


def _neighbours(groups: Sequence[Group], modes: Sequence[str]) -> list[list[Group]]:
    """The plans one change away from ``groups``: a kept segment recomputed (alone, or
    joined to a recomputed group beside it), a one-segment recomputed group kept in
    another mode, two recomputed groups beside each other joined, and a recomputed
    run's first or last segment on its own."""
    result: list[list[Group]] = []
    for i, group in enumerate(groups):
        before, after = list(groups[:i]), list(groups[i + 1 :])
        if group.mode != RECOMPUTE:
            if RECOMPUTE in modes:
                result.append([*before, Group(group.first, group.last, RECOMPUTE), *after])
                if before and before[-1].mode == RECOMPUTE:
                    result.append([*before[:-1], Group(before[-1].first, group.last, RECOMPUTE), *after])
                if after and after[0].mode == RECOMPUTE:
                    result.append([*before, Group(group.first, after[0].last, RECOMPUTE), *after[1:]])
            continue
        if group.first == group.last:
            result += [[*before, Group(group.first, group.last, m), *after] for m in modes if m != RECOMPUTE]
        if after and after[0].mode == RECOMPUTE:
            result.append([*before, Group(group.first, after[0].last, RECOMPUTE), *after[1:]])
        if group.first < group.last:
            result.append([*before, Group(group.first, group.first, RECOMPUTE), Group(group.first + 1, group.last, RECOMPUTE), *after])
            result.append([*before, Group(group.first, group.last - 1, RECOMPUTE), Group(group.last, group.last, RECOMPUTE), *after])
    return result
