"""Give the backward its own copy of a forward value that a later layer reads too.

A U-Net's skip connection (SiLU of GroupNorm of an encoder convolution) is read by the
encoder's next convolution, by a decoder concatenation much later, and by the
encoder's own backward. Where the plan recomputes the concatenation, PyTorch's
partitioner recomputes the skip value once, for the decoder's backward, and holds it
until the encoder's backward reads it again: across the decoder's peak (4 MiB on the
U-Net of the budget sweep). With a copy of the pointwise ops that make the value,
computed from values the backward reads there anyway (the convolution output and the
GroupNorm statistics), the decoder's recomputation is freed at once and the copy is
made where the encoder's backward needs it. Inductor keeps the two apart: it does not
fuse independent kernels that lie far apart (``fusion.FUSION_DISTANCE``).

The copy is a choice: a plan that keeps the value recomputes it all the same (one
more pointwise kernel), so the solver solves the graph with and without the copies
and keeps the faster plan that fits (``solver``). Only the Inductor model uses them:
op by op, each op of the copied chain allocates its own result.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from remat._torch_internals import JointInfo, is_primal, mark_must_recompute
from remat.cost_models.fusion import inlined_by_inductor
from remat.cost_models.sizes import node_storage_bytes
from remat.passes.recompute_rules import ban_reason, is_view
from remat.passes.segments import Segment

MAX_CHAIN = 24  # ops in one copied chain: GroupNorm's affine and SiLU take 18
SMALLEST_SHARE = 16  # a value worth a copy has at least 1/16 of the bytes of the forward's largest
STATISTIC_RATIO = 8  # a value read by the backward, this many times smaller, is a statistic to read, not to copy


@dataclass(frozen=True)
class BackwardCopy:
    """The chain of forward ops to copy (in graph order, ending with ``value``), and
    the node the copies are placed before (the first reader in the backward)."""

    value: fx.Node
    chain: tuple[fx.Node, ...]
    before: fx.Node


def with_backward_copies(graph: fx.Graph, info: JointInfo, copies: list[BackwardCopy]) -> tuple[fx.Graph, JointInfo]:
    """A copy of ``graph`` with ``copies`` (found in ``graph``) inserted, and its info;
    ``graph`` stays as it is."""
    twin = fx.Graph()
    mapping: dict[fx.Node, fx.Node] = {}
    value, output = twin.graph_copy(graph, mapping, return_output_node=True)
    mapping[output] = twin.output(value)
    mapping[output].meta = dict(output.meta)
    twin_info = JointInfo(
        required_fw=frozenset(mapping[n] for n in info.required_fw),
        required_bw=frozenset(mapping[n] for n in info.required_bw),
        tangents_closure=frozenset(mapping[n] for n in info.tangents_closure),
    )
    twin_copies = [
        BackwardCopy(mapping[c.value], tuple(mapping[n] for n in c.chain), mapping[c.before]) for c in copies
    ]
    insert_backward_copies(twin, twin_copies, twin_info)
    return twin, twin_info


def find_backward_copies(graph: fx.Graph, info: JointInfo, segments: list[Segment]) -> list[BackwardCopy]:
    """The forward values worth a copy for the backward: pointwise values that a later
    segment's forward and the backward both read, made by a chain of at most
    ``MAX_CHAIN`` pointwise ops from values the backward reads at or after its first
    reader of the chain (or from parameters and inputs). Values under
    1/``SMALLEST_SHARE`` of the forward's largest (a causal mask's ``arange``) are not
    worth a kernel, nor a solve of the graph with them."""
    order = {node: i for i, node in enumerate(graph.nodes)}
    largest = max((node_storage_bytes(node) for node in info.required_fw), default=0)
    segment_of = {node: s.index for s in segments for node in s.nodes}
    copied: set[fx.Node] = set()
    found = []
    for value in graph.nodes:
        if value in copied or is_view(value) or not _copyable(value, info):
            continue
        if not isinstance(value.meta.get("val"), torch.Tensor) or node_storage_bytes(value) * SMALLEST_SHARE < largest:
            continue
        own = segment_of.get(value)
        if own is None or not _backward_readers(value, info):
            continue
        if not any(u in info.required_fw and segment_of.get(u, -1) > own for u in value.users):
            continue  # no later segment reads it: the backward reads it close by
        chain = _chain(value, info, order)
        if chain is None or copied & set(chain):
            continue
        copied.update(chain)
        before = min((u for n in chain for u in _backward_readers(n, info)), key=order.__getitem__)
        found.append(BackwardCopy(value, chain, before))
    return found


def insert_backward_copies(graph: fx.Graph, copies: list[BackwardCopy], info: JointInfo) -> set[fx.Node]:
    """Copy each chain before its first backward reader and let every backward reader
    of the chain read the copies; returns the new nodes. Each copy gets a value of its
    own (new storage: simulators tell storages apart by their fake tensors) and is
    marked must-recompute: keeping it would keep the same bytes twice."""
    made: set[fx.Node] = set()
    for found in copies:
        duplicates: dict[fx.Node, fx.Node] = {}
        with graph.inserting_before(found.before):
            for node in found.chain:
                duplicate = graph.node_copy(node, lambda arg: duplicates.get(arg, arg))
                args, kwargs = fx.node.map_arg((duplicate.args, duplicate.kwargs), lambda arg: arg.meta["val"])
                with node.meta["val"].fake_mode:
                    duplicate.meta["val"] = duplicate.target(*args, **kwargs)
                mark_must_recompute(duplicate)
                duplicates[node] = duplicate
        made.update(duplicates.values())
        for node, duplicate in duplicates.items():
            for reader in _backward_readers(node, info):
                if reader not in made:
                    reader.replace_input_with(node, duplicate)
    return made


def _copyable(node: fx.Node, info: JointInfo) -> bool:
    return (
        node.op == "call_function"
        and node in info.required_fw
        and (inlined_by_inductor(node) or is_view(node))
        and ban_reason(node) is None
    )


def _backward_readers(node: fx.Node, info: JointInfo) -> list[fx.Node]:
    return [u for u in node.users if u not in info.required_fw]


def _chain(value: fx.Node, info: JointInfo, order: dict[fx.Node, int]) -> tuple[fx.Node, ...] | None:
    """The pointwise ops that make ``value`` from its sources, in graph order, or None
    where the chain is too long or a source is not read by the backward from the
    value's first backward reader on (so the copy holds nothing longer)."""
    chain: set[fx.Node] = set()
    sources: set[fx.Node] = set()
    pending = [value]
    nbytes = node_storage_bytes(value)
    first = min(order[u] for u in _backward_readers(value, info))
    while pending:
        node = pending.pop()
        if node in chain or node in sources:
            continue
        statistic = (
            node is not value
            and node_storage_bytes(node) * STATISTIC_RATIO <= nbytes
            and _read_by_backward_from(node, first, info, order)
        )
        if not statistic and _copyable(node, info):
            chain.add(node)
            if len(chain) > MAX_CHAIN:
                return None
            pending.extend(node.all_input_nodes)
        else:
            sources.add(node)
    if not all(is_primal(s) or _read_by_backward_from(s, first, info, order) for s in sources):
        return None
    return tuple(sorted(chain, key=order.__getitem__))


def _read_by_backward_from(node: fx.Node, first: int, info: JointInfo, order: dict[fx.Node, int]) -> bool:
    """Whether a backward node at or after ``first`` reads ``node`` (or a view of it)."""
    pending = _backward_readers(node, info)
    while pending:
        reader = pending.pop()
        if order[reader] >= first:
            return True
        if is_view(reader):
            pending.extend(_backward_readers(reader, info))
    return False
