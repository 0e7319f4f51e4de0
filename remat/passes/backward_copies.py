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

Late copies (``find_late_copies``) are the same idea inside one layer, for a plan too
low for the budget otherwise. A weight gradient reads the layer's input (LayerNorm's
output into the attention's ``qkv``) after the layer's whole backward, and a plan that
recomputes the layer holds the recomputed input from the ``qkv`` matmul across the
attention's backward to that weight gradient (1 MiB at the lowest peak of the GPT of
the budget sweep). Its copy, made from the normalized values the LayerNorm backward
reads later anyway, is made where the weight gradient runs. Inductor would fuse the
copy into the kernel that makes its input and so run it early again; remat's compiles
refuse to fuse a late copy across an extern kernel (``_torch_internals.no_extern_pulls``,
modelled in ``cost_models.fusion``). Skip-connection copies are left to Inductor's
distance rule, under which their plans were measured.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx as fx

from remat._torch_internals import JointInfo, is_primal, mark_late_copy, mark_must_recompute
from remat.cost_models.fusion import inlined_by_inductor, is_reduction
from remat.cost_models.sizes import node_storage_bytes
from remat.passes.fake_values import derive_value, rederive_views
from remat.passes.recompute_rules import ban_reason, is_view
from remat.passes.segments import Segment, base_of
from remat.passes.weight_gradients import gradient_matmul_behind, move_behind_sibling

MAX_CHAIN = 24  # ops in one copied chain: GroupNorm's affine and SiLU take 18
SMALLEST_SHARE = 16  # a value worth a copy has at least 1/16 of the bytes of the forward's largest
STATISTIC_RATIO = 8  # a value read by the backward, this many times smaller, is a statistic to read, not to copy


@dataclass(frozen=True)
class BackwardCopy:
    """The chain of forward ops to copy (in graph order, ending with ``value``), and
    the node the copies are placed before (the first reader in the backward);
    ``late``: found by ``find_late_copies``, and so never fused across an extern
    kernel; ``behind_sibling``: that reader leads to a weight-gradient matmul, which
    moves back behind its input-gradient sibling first."""

    value: fx.Node
    chain: tuple[fx.Node, ...]
    before: fx.Node
    late: bool = False
    behind_sibling: bool = False


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
        dataclasses.replace(c, value=mapping[c.value], chain=tuple(mapping[n] for n in c.chain), before=mapping[c.before])
        for c in copies
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
    segment_of = {node: s.index for s in segments for node in s.nodes}

    def read_later(value: fx.Node) -> bool:
        own = segment_of.get(value)
        return own is not None and any(u in info.required_fw and segment_of.get(u, -1) > own for u in value.users)

    return _find(graph, info, read_later, late=False)


def find_late_copies(graph: fx.Graph, info: JointInfo, behind_siblings: bool) -> list[BackwardCopy]:
    """Copies for every value (or view of one) that the forward and the backward both
    read, made by at most ``MAX_CHAIN`` ops Inductor generates kernels for (pointwise,
    views, reductions) from parameters, inputs and values of any size the backward
    reads from the copy's place on: those values are alive there anyway, so the copy
    holds nothing longer than the plan does.

    ``behind_siblings``: the copy of a widening matmul's input (a layer's ``qkv`` or
    first MLP matmul: its ``dy`` larger than the copy) is made for its weight gradient
    moved back behind the input gradient. There it meets the input gradient, as small
    as itself; ahead of it, on the CPU, it meets whatever the kernels that make ``dy``
    hold (Inductor allocates all results of a run of kernels between two extern
    kernels before the run: the GELU's input, 4 MiB on the budget sweep's GPT). The
    solver tries both placements."""

    def read_by_the_forward(value: fx.Node) -> bool:
        return any(u in info.required_fw for u in value.users)

    return _find(graph, info, read_by_the_forward, late=True, behind_siblings=behind_siblings)


def _find(
    graph: fx.Graph, info: JointInfo, wanted: Callable[[fx.Node], bool], late: bool, behind_siblings: bool = False
) -> list[BackwardCopy]:
    order = {node: i for i, node in enumerate(graph.nodes)}
    largest = max((node_storage_bytes(node) for node in info.required_fw), default=0)
    copied: set[fx.Node] = set()
    found = []
    # late copies from the last value back: a weight gradient's input is found before
    # the normalized values it is made of, whose readers then read the same copies
    for value in reversed(graph.nodes) if late else graph.nodes:
        if value in copied or (is_view(value) and not late) or not _copyable(value, info, late):
            continue
        if not isinstance(value.meta.get("val"), torch.Tensor) or node_storage_bytes(value) * SMALLEST_SHARE < largest:
            continue
        if not _backward_readers(value, info) or not wanted(value):
            continue
        chain = _chain(value, info, order, late)
        if chain is None or copied & set(chain) or all(is_view(node) for node in chain):
            continue
        copied.update(chain)
        before = min((u for n in chain for u in _backward_readers(n, info)), key=order.__getitem__)
        found.append(BackwardCopy(value, chain, before, late, behind_siblings and _widening(value, before)))
    return found


def _widening(value: fx.Node, reader: fx.Node) -> bool:
    """Whether ``reader`` leads to a weight-gradient matmul whose ``dy`` (its input
    not made from ``value``) is larger than ``value``."""
    matmul = gradient_matmul_behind(reader)
    if matmul is None:
        return False
    made_from_value = {reader, *(n for n in matmul.all_input_nodes if base_of(n) is base_of(value))}
    others = [n for n in matmul.all_input_nodes if n not in made_from_value]
    return any(node_storage_bytes(base_of(n)) > node_storage_bytes(base_of(value)) for n in others)


def insert_backward_copies(graph: fx.Graph, copies: list[BackwardCopy], info: JointInfo) -> set[fx.Node]:
    """Copy each chain before its first backward reader and let every backward reader
    of the chain read the copies; returns the new nodes. Each copy gets a value of its
    own (new storage: simulators tell storages apart by their fake tensors) and is
    marked must-recompute (keeping it would keep the same bytes twice); a late copy is
    marked as one (Inductor must not fuse it into a kernel far ahead)."""
    made: set[fx.Node] = set()
    for found in copies:
        duplicates: dict[fx.Node, fx.Node] = {}
        before = found.before
        matmul = gradient_matmul_behind(before) if found.behind_sibling else None
        if matmul is not None:
            readers = [u for node in found.chain for u in _backward_readers(node, info)]
            before = move_behind_sibling(matmul, graph, ahead_of=readers)
        with graph.inserting_before(before):
            for node in found.chain:
                duplicate = graph.node_copy(node, lambda arg: duplicates.get(arg, arg))
                derive_value(duplicate)
                mark_must_recompute(duplicate)
                if found.late:
                    mark_late_copy(duplicate)
                duplicates[node] = duplicate
        made.update(duplicates.values())
        for node, duplicate in duplicates.items():
            readers = [reader for reader in _backward_readers(node, info) if reader not in made]
            for reader in readers:
                reader.replace_input_with(node, duplicate)
            rederive_views(readers)
    return made


def _copyable(node: fx.Node, info: JointInfo, late: bool) -> bool:
    """An op the copy may repeat: pointwise or a view; for late copies a reduction too
    (a LayerNorm's statistics) and the parts of a multi-output one."""
    generated = inlined_by_inductor(node) or is_view(node)
    if late:
        generated = generated or is_reduction(node) or node.target is operator.getitem
    return node.op == "call_function" and node in info.required_fw and generated and ban_reason(node) is None


def _backward_readers(node: fx.Node, info: JointInfo) -> list[fx.Node]:
    return [u for u in node.users if u not in info.required_fw]


def _chain(value: fx.Node, info: JointInfo, order: dict[fx.Node, int], late: bool) -> tuple[fx.Node, ...] | None:
    """The ops that make ``value`` from its sources, in graph order, or None where the
    chain is too long or a source is not read by the backward from the value's first
    backward reader on (so the copy holds nothing longer). A source is a parameter or
    input, or a statistic (a GroupNorm's, ``STATISTIC_RATIO`` times smaller) that the
    backward reads from there on; a late copy that cannot be made so may start from
    such values of any size."""
    if late:
        return _grow(value, info, order, late, any_size=False) or _grow(value, info, order, late, any_size=True)
    return _grow(value, info, order, late, any_size=False)


def _grow(
    value: fx.Node, info: JointInfo, order: dict[fx.Node, int], late: bool, any_size: bool
) -> tuple[fx.Node, ...] | None:
    chain: set[fx.Node] = set()
    sources: set[fx.Node] = set()
    pending = [value]
    nbytes = node_storage_bytes(value)
    first = min(order[u] for u in _backward_readers(value, info))
    while pending:
        node = pending.pop()
        if node in chain or node in sources:
            continue
        source = (
            node is not value
            and (any_size or node_storage_bytes(node) * STATISTIC_RATIO <= nbytes)
            and _read_by_backward_from(node, first, info, order)
        )
        if not source and _copyable(node, info, late):
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
