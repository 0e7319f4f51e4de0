"""Copy a concatenation's gradient out into its slices where one slice waits.

A concatenation's backward slices its gradient, one view per input. In a U-Net's
decoder the upsampling convolution's backward reads its slice soon, and the skip
connection's slice waits for the encoder's backward, at the end of the step: a view
holds its whole base, so the whole gradient stays alive until then (8 MiB on the U-Net
of the budget sweep, from the top decoder level's backward to the encoder's, where the
skip connection's slice is 4 MiB). Copied into slices of their own where it is made,
the gradient is freed at once, and each slice after its own readers.

The copies are ``remat::copy_out``, an op of their own: Inductor would inline a
``clone`` into its reader, at the encoder's backward, and hold the whole again; an op
it has no lowering for runs as an extern kernel where the graph puts it. A copy has
the same values and its readers read them as before, so the gradients are
bit-identical. On the U-Net of the budget sweep the lowest plan measured 35.6 MiB
with the copies and 41.0 MiB without (issue 4).

While the copies are made, the gradient and its copies are alive together: the
gradient's bytes once more. That cannot raise the peak only where the op that made
the gradient was the last reader of inputs at least as large, freed when it
returned (a U-Net's convolution backward frees the concatenation it read), so the
copies are made only there. Elsewhere (a linear layer's backward reads a weight and a
small gradient) they would add the whole gradient on top of what the op held: a
concatenation before a linear head simulated 20.0 MiB with copies, 16.3 without.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from remat.cost_models.sizes import node_storage_bytes
from remat.passes.fake_values import derive_value, rederive_views
from remat.passes.recompute_rules import is_view, source_op, views_of
from remat.passes.schedule import backward_nodes
from remat.passes.segments import base_of

aten = torch.ops.aten


@torch.library.custom_op("remat::copy_out", mutates_args=())
def copy_out(value: torch.Tensor) -> torch.Tensor:
    """A copy of ``value`` in storage of its own, laid out as ``value`` is."""
    return value.clone()


@copy_out.register_fake
def _(value: torch.Tensor) -> torch.Tensor:
    return value.clone()


COPY_OUT = torch.ops.remat.copy_out.default


def copy_out_waiting_slices(graph: fx.Graph) -> int:
    """For each backward value read only through slices, one of which waits (all its
    readers run after the other slices' readers, in graph order, which the backward
    keeps), copy every slice out right after the last of them and let its readers
    read the copy. At the copies, the value and its copies are alive together once;
    from there on each copy is freed after its own readers, and only the waiting
    one's bytes wait. Returns how many slices were copied out."""
    backward = backward_nodes(graph)
    nodes = list(graph.nodes)
    order = {node: i for i, node in enumerate(nodes)}
    copied = 0
    for base in [n for n in nodes if n in backward and _read_through_slices(n)]:
        slices = sorted(base.users, key=order.__getitem__)
        if not any(_waits(piece, slices, order) for piece in slices):
            continue
        if not _maker_frees_as_much(base, nodes[order[source_op(base)] + 1 : order[slices[-1]] + 1], order):
            continue
        at = slices[-1]
        for piece in slices:
            at = _copy_after(graph, at, piece)
        copied += len(slices)
    return copied


def _maker_frees_as_much(base: fx.Node, between: list[fx.Node], order: dict[fx.Node, int]) -> bool:
    """Whether the op that makes ``base`` is the last reader of computed inputs whose
    storages hold at least ``base``'s bytes, and only views and that op's other outputs
    run from it to the copies (``between``). Then what is alive at the copies (``base``
    and the copies, in place of those inputs) is no more than at the op."""
    maker = source_op(base)
    if any(not (is_view(node) or source_op(node) is maker) for node in between):
        return False
    storages = {base_of(arg) for arg in maker.all_input_nodes}
    freed = sum(
        node_storage_bytes(storage)
        for storage in storages
        if storage.op != "placeholder"
        and max(order[reader] for value in (storage, *views_of(storage)) for reader in value.users) <= order[maker]
    )
    return freed >= node_storage_bytes(base)


def _waits(piece: fx.Node, slices: list[fx.Node], order: dict[fx.Node, int]) -> bool:
    """Whether every reader of ``piece`` runs after every reader of the other slices."""
    others = [order[r] for s in slices if s is not piece for r in s.users]
    return bool(others) and bool(piece.users) and min(order[r] for r in piece.users) > max(others)


def _copy_after(graph: fx.Graph, at: fx.Node, piece: fx.Node) -> fx.Node:
    """A copy of ``piece`` right after ``at``, which ``piece``'s readers read instead."""
    readers = list(piece.users)
    with graph.inserting_after(at):
        copy = graph.call_function(COPY_OUT, (piece,))
    derive_value(copy)
    for reader in readers:
        reader.replace_input_with(piece, copy)
    rederive_views(readers)
    return copy


def _read_through_slices(node: fx.Node) -> bool:
    """Whether ``node`` is a tensor that two or more slices read, and nothing else."""
    users = list(node.users)
    return (
        len(users) >= 2
        and isinstance(node.meta.get("val"), torch.Tensor)
        and all(u.op == "call_function" and u.target is aten.slice.Tensor for u in users)
    )
