"""From the options to the saved values one partition offloads to host memory.

``passes.offload`` knows nothing of options: it simulates a partition with some values
offloaded and picks them greedily under a byte budget. This module reads ``offload``
(True: every candidate; "auto": what the budget needs), ``offload_only`` (tagged
values), ``offload_min_bytes`` and ``host_bandwidth``, and says what it decided and why.
The budgeted solver (``remat.solver``) combines it with its recomputation plans.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from remat.cost_models.devices import profile_for_device
from remat.cost_models.runtime import Estimator, make_estimator
from remat.cost_models.sizes import graph_device
from remat.options import RematOptions
from remat.passes.offload import OffloadOutcome, OffloadProblem
from remat.passes.schedule import StepOrder, step_order
from remat.tags import tagged_values


@dataclass
class OffloadChoice:
    """The saved values that go to host memory (name -> why), those that may not (name
    -> why not), and the estimated copy time and the part compute does not hide."""

    offloaded: dict[str, str]
    refused: dict[str, str]
    transfer_s: float
    exposed_s: float
    peak_bytes: int  # the simulated peak of the step with these offloads, resident bytes included
    host_peak_bytes: int  # the most bytes of host copies at once (0 on a CPU, where they are device memory)


def host_bandwidth(options: RematOptions, device: torch.device) -> float:
    """Bytes/s of one offload or reload: the option, else the device profile's."""
    return options.host_bandwidth or profile_for_device(device).host_copy_rate()


def offload_tags(options: RematOptions, graph: fx.Graph) -> dict[fx.Node, str]:
    """The values ``offload_only`` names, with the reason they are offloaded."""
    names = set(options.offload_only)
    return {
        node: f"tagged {', '.join(map(repr, sorted(tags & names)))} (offload_only)"
        for node, tags in tagged_values(graph).items()
        if tags & names
    }


def offload_problem(
    graph: fx.Graph, order: StepOrder, options: RematOptions, estimator: Estimator, fused: bool
) -> OffloadProblem:
    """The values of the partition of ``graph`` that runs ``order`` (``passes.schedule``)
    that may be offloaded (``fused``: memory simulated as Inductor runs the graphs)."""
    device = graph_device(graph)
    tags = offload_tags(options, graph) if options.offload_only else None
    return OffloadProblem(
        order,
        estimator,
        host_bandwidth(options, device),
        min_bytes=options.offload_min_bytes if tags is None else 0,
        fused=fused,
        host_is_device=device.type == "cpu",
        only=None if tags is None else tags.__contains__,
    )


def pick_offloads(problem: OffloadProblem, options: RematOptions, budget: int | None) -> OffloadOutcome | None:
    """``offload="auto"``: the fewest offloads that fit ``budget``, or without one
    (``on_infeasible="closest"``) those that lower the peak most; none on a CPU, where
    a host copy frees nothing. ``True``: every candidate. None if the budget is missed."""
    if options.offload == "auto" and problem.host_is_device:
        outcome: OffloadOutcome | None = problem.evaluate([])
    elif options.offload == "auto":
        outcome = problem.lowest() if budget is None else problem.choose(budget)
    else:
        outcome = problem.evaluate(problem.candidates)
    return outcome if outcome is not None and (budget is None or outcome.peak <= budget) else None


def describe_offloads(
    graph: fx.Graph, problem: OffloadProblem, outcome: OffloadOutcome, options: RematOptions
) -> OffloadChoice:
    """The Plan's account of ``outcome``: why each value moved, or why it stayed."""
    chosen = set(outcome.offloaded)
    if options.offload_only:
        why = offload_tags(options, graph)
        offloaded = {n.name: why[n] for n in outcome.offloaded}
    elif options.offload == "auto":
        offloaded = {n.name: "offloaded to bring the peak down to the memory budget (offload='auto')" for n in outcome.offloaded}
    else:
        offloaded = {n.name: "offloaded (offload=True)" for n in outcome.offloaded}
    refused = {n.name: why for n, why in problem.refused.items()}
    if options.offload == "auto":
        idle = "the device is the host: a host copy frees no memory" if problem.host_is_device else (
            "not needed to meet the memory budget"
        )
        refused.update({n.name: idle for n in problem.candidates if n not in chosen})
    return OffloadChoice(
        offloaded, refused, outcome.schedule.transfer_s, outcome.schedule.exposed_s, outcome.peak,
        outcome.timeline.host_peak_bytes,
    )


def choose_offloads(
    graph: fx.Graph, saved: list[fx.Node], num_fwd_outputs: int, options: RematOptions, fused: bool
) -> OffloadChoice | None:
    """Offloads for a partition chosen without a budget to meet (min-cut, policies, the
    lowest plan of ``on_infeasible="closest"``): every candidate under ``offload=True``
    or ``offload_only``; under ``"auto"``, those that lower the peak most."""
    if not options.offload:
        return None
    estimator = make_estimator(options.time_estimator, graph_device(graph))
    problem = offload_problem(graph, step_order(graph, saved, num_fwd_outputs), options, estimator, fused)
    outcome = pick_offloads(problem, options, None)
    assert outcome is not None  # no budget to miss
    return describe_offloads(graph, problem, outcome, options)
