"""Choose which forward values the backward keeps, by a min-cut on a networkx flow graph.

Every node ``n`` of the joint graph becomes two vertices ``n_in -> n_out``; cutting that
edge means "keep n for the backward" and costs its bytes. Forward values the backward
does not keep must be recomputed from kept ones. A minimum cut between the forward
inputs (source) and the backward (sink) is the set of kept values that costs the
fewest bytes.

The capacities are exact integers ``bytes * M + recompute_cost`` where M exceeds the sum
of every recompute cost, so the cut minimizes kept bytes first and, among the cuts that
keep the fewest bytes, the work recomputed in the backward. Nodes that must not be
recomputed (see ``recompute_rules``) are tied to the source. ``solve_keep_only`` is the
same cut where only those may be kept (the ``save_only`` option: tagged values).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import networkx as nx
from networkx.algorithms.flow import boykov_kolmogorov
import torch
import torch.fx as fx

from remat._torch_internals import JointInfo, checkpoint_policy, is_primal
from remat.cost_models.flops import recompute_cost
from remat.cost_models.sizes import node_tensor, tensor_size
from remat.passes.recompute_rules import ban_reason, heavy_reason, is_view, source_op

SOURCE, SINK = "__source__", "__sink__"


@dataclass
class MinCutResult:
    """The kept values, and for every node that may not be recomputed, why not."""

    saved: list[fx.Node]
    banned: dict[str, str] = field(default_factory=dict)
    cut_bytes: int = 0


def _keep_bytes(node: fx.Node) -> int | None:
    """Bytes that keeping ``node`` costs; None where it cannot be kept (no edge limit)."""
    if is_primal(node):
        return 0  # parameters and inputs are alive for the whole step anyway
    value = node.meta.get("val")
    if isinstance(value, (torch.SymInt, torch.SymBool)):
        return 0
    if isinstance(value, torch.SymFloat):
        return None
    tensor = node_tensor(node)
    if tensor is None:
        # tuples of tensors are kept through their getitems; opaque objects
        # (BackwardState and the like) carry no memory
        return None if isinstance(value, (tuple, list)) or value is None else 0
    if is_view(node):
        return None
    return tensor_size(tensor).hint


def solve_min_cut(
    graph: fx.Graph,
    info: JointInfo,
    cost: Callable[[fx.Node], int] = recompute_cost,
) -> MinCutResult:
    """Return the values the backward keeps; see the module docstring for the model."""
    nodes = [n for n in graph.nodes if n.op != "output"]
    banned = {n.name: r for n in nodes if n in info.required_fw and (r := ban_reason(n) or heavy_reason(n))}
    saved, cut_bytes = cheapest_saved(nodes, info, banned=set(banned), cost=cost)
    return MinCutResult(saved=saved, banned=banned, cut_bytes=cut_bytes)


def solve_keep_only(
    graph: fx.Graph,
    info: JointInfo,
    never_recompute: Callable[[fx.Node], str | None],
    cost: Callable[[fx.Node], int] = recompute_cost,
) -> MinCutResult:
    """Keep only values that may not be recomputed (``ban_reason``, and what
    ``never_recompute`` names, e.g. the values that ``save_only`` tags) and symbolic
    sizes (free), the cheapest cut of them that the backward needs; recompute
    everything else from them, compute-heavy ops included."""
    nodes = [n for n in graph.nodes if n.op != "output"]
    banned = {
        n.name: r
        for n in nodes
        if n in info.required_fw and (r := ban_reason(n) or (not is_view(n) and never_recompute(n)))
    }
    no_keep = frozenset(
        n for n in nodes if n.name not in banned and source_op(n).name not in banned and not _symbolic(n)
    )
    saved, cut_bytes = cheapest_saved(nodes, info, banned=set(banned), no_keep=no_keep, cost=cost)
    return MinCutResult(saved=saved, banned=banned, cut_bytes=cut_bytes)


def _symbolic(node: fx.Node) -> bool:
    return isinstance(node.meta.get("val"), (torch.SymInt, torch.SymFloat, torch.SymBool))


def cheapest_saved(
    region: Sequence[fx.Node],
    info: JointInfo,
    *,
    banned: set[str],
    no_keep: frozenset[fx.Node] = frozenset(),
    cost: Callable[[fx.Node], int] = recompute_cost,
) -> tuple[list[fx.Node], int]:
    """The cheapest values of ``region`` to keep, and their bytes. Nodes named in
    ``banned`` may not be recomputed; nodes in ``no_keep`` may not be kept. Values from
    outside the region are available for free (the caller keeps them), and of the uses
    outside it only the backward's count: a region can be solved on its own."""
    members = set(region)
    costs = {n: cost(n) for n in region if n in info.required_fw and n.name not in banned}
    scale = sum(costs.values()) + 1

    flow = nx.DiGraph()
    flow.add_node(SOURCE)
    flow.add_node(SINK)
    for node in region:
        n_in, n_out = f"{node.name}_in", f"{node.name}_out"
        if node in info.required_bw:
            if node in info.tangents_closure:
                flow.add_edge(n_in, SINK)  # runs in the backward: nothing to decide
                continue
            flow.add_edge(n_out, SINK)  # the backward reads it
        if checkpoint_policy(node) == "must_recompute":
            flow.add_edge(n_in, SINK)
            continue
        if node.name in banned:
            flow.add_edge(SOURCE, n_in)
        elif costs.get(node):
            flow.add_edge(SOURCE, n_in, capacity=costs[node])
        keep = None if node in no_keep else _keep_bytes(node)
        if keep is None:
            flow.add_edge(n_in, n_out)  # no capacity: infinite
        else:
            flow.add_edge(n_in, n_out, capacity=keep * scale)
        for arg in node.all_input_nodes:
            if arg not in members:
                flow.add_edge(SOURCE, f"{arg.name}_out")  # kept by the caller
        for user in node.users:
            if user in members:
                flow.add_edge(n_out, f"{user.name}_in")
            elif user.op != "output" and user not in info.required_fw:
                flow.add_edge(n_out, SINK)  # read on the backward's side

    # Boykov-Kolmogorov cuts these small graphs in 54% to 79% of preflow-push's time
    # (benchmarks/results/solve_time_xeon.md); the cut networkx reads off is the same
    # for any maximum flow (the sink side: what can still reach the sink)
    cut_value, (reachable, _) = nx.minimum_cut(flow, SOURCE, SINK, flow_func=boykov_kolmogorov)
    saved = [n for n in region if f"{n.name}_in" in reachable and f"{n.name}_out" not in reachable]
    return saved, int(cut_value) // scale
