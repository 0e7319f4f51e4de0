"""Run each weight-gradient matmul of the backward before its input-gradient sibling.

Autograd's linear backward computes the input's gradient (``dy @ W``) and then the
weight's (``dy^T @ x``). The weight's gradient is the last reader of ``x``, so ``x``
is still live while the input's gradient is allocated. Run the other way round, ``x``
(a saved or recomputed activation) is freed first and the two never meet. Where the
backward recomputes ``x`` (a GPT's GELU output, 4 MiB per layer of the budget sweep's
model) this lowers the peak of every layer's backward. The weight's gradient, which
the step returns and keeps to the end, is then held during the input gradient's matmul
rather than made after it: at the pair the peak never rises. Moved any earlier, it
would be held longer for nothing, so it moves just ahead of its sibling.

Only the order changes: the same ops on the same values, so the gradients are
bit-identical. Inductor keeps the order unless a fusion pulls the input-gradient
matmul back ahead; remat's Inductor compiles refuse such fusions
(``_torch_internals.no_extern_pulls``).

``move_behind_sibling`` undoes the move for one matmul: a late backward copy of its
input is better made after the input gradient where the matmul widens
(``passes.backward_copies``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.fx as fx

from remat.passes.recompute_rules import is_view, views_of
from remat.passes.schedule import backward_nodes

aten = torch.ops.aten


def weight_gradients_first(graph: fx.Graph) -> int:
    """Move each weight-gradient matmul of the joint ``graph``'s backward that the step
    returns directly (with the views that feed only it) to just before the first op
    that reads the same gradient ``dy`` ahead of it (the input gradient's matmul),
    where its inputs exist by then. Not further: the weight gradient lives from there
    to the end of the step, and a matmul on a tangent moved among the forward ops
    would start the backward there (the partitioner recomputes forward values just in
    time from its first node on). Returns how many moved."""
    backward = backward_nodes(graph)
    order = {node: i for i, node in enumerate(graph.nodes)}  # moved nodes are never read again below
    moved = 0
    for node in [n for n in graph.nodes if n in backward and n.target is aten.mm.default and _is_gradient(n)]:
        chain = _with_own_views(node, backward)
        inputs = [a for member in chain for a in member.all_input_nodes if a not in chain]
        readers = [r for r in _readers(inputs, backward, chain) if order[r] < order[node]]
        if not readers:
            continue
        first = min(readers, key=order.__getitem__)
        if max(order[a] for a in inputs) >= order[first]:
            continue  # an input is made after it
        _move_after(first.prev, sorted(chain, key=order.__getitem__))
        moved += 1
    return moved


def gradient_matmul_behind(reader: fx.Node) -> fx.Node | None:
    """The weight-gradient matmul that ``reader`` is (or feeds through views it alone
    reads), if any."""
    node = reader
    while node.op == "call_function" and is_view(node) and len(node.users) == 1:
        node = next(iter(node.users))
    return node if node.target is aten.mm.default and _is_gradient(node) else None


def move_behind_sibling(matmul: fx.Node, graph: fx.Graph, ahead_of: Iterable[fx.Node] = ()) -> fx.Node:
    """Move the weight-gradient ``matmul`` (with its own views) back to just after its
    input-gradient sibling, where ``weight_gradients_first`` had moved it ahead of it;
    returns its first node. Unmoved where no reader of ``dy`` follows it, or where the
    sibling runs after a node of ``ahead_of`` (what must still come after the first
    node: the other readers of a copy made just before it)."""
    backward = backward_nodes(graph)
    order = {n: i for i, n in enumerate(graph.nodes)}
    members = _with_own_views(matmul, backward)
    chain = sorted(members, key=order.__getitem__)
    inputs = [a for member in chain for a in member.all_input_nodes if a not in members]
    later = [r for r in _readers(inputs, backward, members) if order[r] > order[matmul]]
    at = min(later, key=order.__getitem__, default=None)
    if at is not None and all(order[at] < order[n] for n in ahead_of if n not in members):
        outputs = views_of(matmul)  # they must follow it
        _move_after(at, [*chain, *sorted(outputs, key=order.__getitem__)])
    return chain[0]


def _move_after(at: fx.Node, nodes: list[fx.Node]) -> None:
    """Place ``nodes``, in this order, right after ``at``."""
    for node in nodes:
        at.append(node)
        at = node


def _readers(inputs: list[fx.Node], backward: set[fx.Node], chain: set[fx.Node]) -> list[fx.Node]:
    """The ops outside ``chain`` that read one of the backward's ``inputs``, directly
    or through views."""
    found = []
    pending = [a for a in inputs if a in backward]
    while pending:
        for user in pending.pop().users:
            if user in chain:
                continue
            if user.op == "call_function" and is_view(user):
                pending.append(user)
            else:
                found.append(user)
    return found


def _is_gradient(node: fx.Node) -> bool:
    """Whether ``node`` reaches the graph's output, and only that, through views if
    any: a gradient the step returns, read by nothing else."""
    if not node.users:
        return False
    pending = list(node.users)
    while pending:
        user = pending.pop()
        if user.op == "output":
            continue
        if user.op != "call_function" or not is_view(user):
            return False
        pending.extend(user.users)
    return True


def _with_own_views(node: fx.Node, backward: set[fx.Node]) -> set[fx.Node]:
    """``node`` and the backward views (of views) that only it reads."""
    chain = {node}
    pending = list(node.all_input_nodes)
    while pending:
        value = pending.pop()
        if value in backward and value.op == "call_function" and is_view(value) and set(value.users) <= chain:
            chain.add(value)
            pending.extend(value.all_input_nodes)
    return chain
