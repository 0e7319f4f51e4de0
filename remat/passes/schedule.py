"""The order in which the forward and backward graphs of a partition run.

The budgeted solver weighs many candidate sets of saved values and must know, for
each, what runs when, without paying for PyTorch's graph extraction every time. Given
the joint graph and a saved set, this module lists the nodes of the forward graph and
of the backward graph in the order the partitioner will emit them:

- the forward runs every forward node that a forward output or a saved value needs,
  in the joint graph's order; a saved value the backward does not read is not saved
  (PyTorch's partitioner drops it);
- the backward runs what the gradients need, computed from the saved values and the
  tangents, recomputing forward nodes that were not saved; each recomputation is
  placed just before its first use (the order of ``reordering_to_mimic_autograd_engine``,
  which the partitioner applies), so a low budget never recomputes the whole forward
  up front; generated code frees every value after its last use.

``tests/test_solver.py`` checks that the simulated timeline of this order equals the
one of the graphs PyTorch extracts.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx

from remat._torch_internals import is_primal, is_tangent
from remat.cost_models.node_memo import input_nodes
from remat.cost_models.sizes import leaves


@dataclass(frozen=True)
class StepOrder:
    """The nodes each graph of a partition runs, in order (placeholders left out).

    A node may appear in both lists: a forward value recomputed in the backward.
    """

    forward: list[fx.Node]
    backward: list[fx.Node]
    saved: list[fx.Node]
    user_outputs: list[fx.Node]
    gradients: list[fx.Node]


def recomputed_nodes(order: StepOrder) -> set[fx.Node]:
    """Forward nodes that the backward runs again."""
    return set(order.forward) & set(order.backward)


def graph_outputs(joint: fx.Graph, num_fwd_outputs: int) -> tuple[list[fx.Node], list[fx.Node]]:
    """The joint graph's forward outputs and its backward outputs (the gradients)."""
    (output,) = joint.find_nodes(op="output")
    values = leaves(output.args)
    forward = [v for v in values[:num_fwd_outputs] if isinstance(v, fx.Node)]
    backward = [v for v in values[num_fwd_outputs:] if isinstance(v, fx.Node)]
    return forward, backward


def backward_nodes(joint: fx.Graph) -> set[fx.Node]:
    """The nodes of the joint graph that read a tangent, directly or through others:
    its backward, before any partition says so."""
    found: set[fx.Node] = set()
    for node in joint.nodes:
        if (node.op == "placeholder" and is_tangent(node)) or any(a in found for a in node.all_input_nodes):
            found.add(node)
    return found


def _ancestors(targets: Iterable[fx.Node], stop: set[fx.Node]) -> set[fx.Node]:
    """``targets`` and everything they need, not looking past ``stop``."""
    seen: set[fx.Node] = set()
    pending = list(targets)
    while pending:
        node = pending.pop()
        if node in seen:
            continue
        seen.add(node)
        if node not in stop:
            pending.extend(input_nodes(node))
    return seen


def complete_saved_set(
    joint: fx.Graph, saved: Iterable[fx.Node], num_fwd_outputs: int, must_save: set[fx.Node]
) -> list[fx.Node]:
    """``saved`` plus what the backward cannot recompute on its own: the graph inputs
    and symbolic sizes it reads, and values in ``must_save`` (random ops, ops with
    side effects) that a recomputation would reach. Any saved set becomes valid."""
    saved = list(saved)
    # A tuple-valued op cannot be saved whole: the getitems the backward reads are.
    whole = {n for n in saved if _is_tuple(n)}
    chosen = {n for n in saved if n not in whole}
    _, gradients = graph_outputs(joint, num_fwd_outputs)
    tangents = {n for n in joint.find_nodes(op="placeholder") if is_tangent(n)}
    pending = [(g, g) for g in gradients]
    seen: set[fx.Node] = set()
    while pending:
        node, reader = pending.pop()
        if node in chosen or node in tangents:
            continue
        value = node.meta.get("val")
        if node.op == "placeholder" or node in must_save or node in whole or isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            chosen.add(_part_read(node, reader))  # per reader: each getitem of a tuple op
            continue
        if node in seen:
            continue
        seen.add(node)
        pending.extend((arg, node) for arg in input_nodes(node))
    order = {node: i for i, node in enumerate(joint.nodes)}
    return sorted(chosen, key=order.__getitem__)


def _is_tuple(node: fx.Node) -> bool:
    return isinstance(node.meta.get("val"), (tuple, list))


def _part_read(node: fx.Node, reader: fx.Node) -> fx.Node:
    """A tuple-valued op cannot be saved whole: its reader (a getitem) is saved."""
    return reader if _is_tuple(node) and reader is not node else node


def step_order(joint: fx.Graph, saved: Sequence[fx.Node], num_fwd_outputs: int) -> StepOrder:
    """What the forward and backward graphs of the partition saving ``saved`` run."""
    nodes = list(joint.nodes)
    order = {node: i for i, node in enumerate(nodes)}
    user_outputs, gradients = graph_outputs(joint, num_fwd_outputs)
    placeholders = set(joint.find_nodes(op="placeholder"))
    primals = {n for n in placeholders if is_primal(n)}

    inputs = set(saved) | {n for n in placeholders if not is_primal(n)}
    backward_needed = _ancestors(gradients, stop=inputs)
    saved = [n for n in saved if n in backward_needed]  # the partitioner drops what the backward does not read

    forward_needed = _ancestors([*user_outputs, *saved], stop=primals)
    forward = [n for n in nodes if n in forward_needed and n.op == "call_function"]
    extracted = [n for n in nodes if n in backward_needed and n.op == "call_function" and n not in inputs]
    backward = _just_in_time(extracted, gradients, order)
    return StepOrder(_raise_getitems(forward), _raise_getitems(backward), list(saved), user_outputs, gradients)


def _raise_getitems(nodes: list[fx.Node]) -> list[fx.Node]:
    """Each getitem right after the op whose tuple it reads, in their order (the
    partitioner's ``raise_getitems``, on both graphs): a backward that recomputes a
    GroupNorm's statistics reads the mean later than the variance, but both getitems
    run at once."""
    parts: dict[fx.Node, list[fx.Node]] = {}
    present = set(nodes)
    for node in nodes:
        if node.target is operator.getitem and node.args[0] in present:
            parts.setdefault(node.args[0], []).append(node)
    raised = {part for group in parts.values() for part in group}
    result: list[fx.Node] = []

    def place(node: fx.Node) -> None:  # a getitem of a getitem follows its own parent
        result.append(node)
        for part in parts.get(node, ()):
            place(part)

    for node in nodes:
        if node not in raised:
            place(node)
    return result


def _just_in_time(extracted: list[fx.Node], gradients: list[fx.Node], order: dict[fx.Node, int]) -> list[fx.Node]:
    """The backward order of ``reordering_to_mimic_autograd_engine``: from the first
    node that reads a tangent on, each node runs right after whatever it needs that
    has not run yet (in joint order); recomputations thus wait for their first use."""
    members = set(extracted)
    first = min(
        (order[n] for n in extracted if any(is_tangent(a) for a in input_nodes(n))),
        default=None,
    )
    if first is None:
        return extracted
    placed: set[fx.Node] = set()
    result: list[fx.Node] = []

    def place(node: fx.Node) -> None:
        needed: set[fx.Node] = set()
        pending = [node]
        while pending:
            current = pending.pop()
            if current in needed or current in placed or current not in members:
                continue
            needed.add(current)
            pending.extend(input_nodes(current))
        for ready in sorted(needed, key=order.__getitem__):
            placed.add(ready)
            result.append(ready)

    for node in extracted:
        if order[node] < first and node.target is torch.ops.aten.copy_.default:
            place(node)
    for node in extracted:
        if order[node] >= first:
            place(node)
    for node in gradients:  # the output node comes last and pulls in what is left
        place(node)
    return result
