"""A graph as Inductor compiles it, as far as memory goes: the fused mode of the simulator.

Inductor lowers each FX node to a loop body (``torch/_inductor/graph.py``, ``ir.py``).
The body of a pointwise op, of an op that only indexes its inputs (embedding,
gather, iota, full, ...) or of a random op, is not stored: it stays an expression, and each reader that
Inductor generates loops for (pointwise ops, reductions, indexing, cat, scatters)
computes it inline where it reads it. A value is stored ("realized") only when

- it leaves the graph: a forward output (returned, or saved for the backward) or a
  gradient the backward returns (``GraphLowering.run_node``);
- a kernel Inductor does not generate reads it: matmuls, convolutions, attention, and
  any op it has no lowering for run on real tensors (``ExternKernel.realize_input``);
  here, any reader not known to inline its inputs, and ``as_strided``;
- several FX nodes read it and inlining would repeat costly work
  (``StorageBox.should_realize_on_reuse``): when the expression reads more than
  ``realize_reads_threshold`` (4) stored values; on the CPU also when it contains exp,
  log, sigmoid or tanh, or when a reader broadcasts it (reads each element many
  times: the ``expand`` lowering's reuse; an indexing reader, such as an upsampling
  ``_unsafe_index``, does not count);
- its expression has grown too big (``has_exceeded_max_reads``): more than
  ``realize_cpu_acc_reads_threshold`` (12; 8 elsewhere) reads, or more ops than
  ``realize_cpu_opcount_threshold`` (50; ``realize_opcount_threshold``, 30, elsewhere).

Reductions, scatters, cat and extern kernels' outputs are stored; a view of an inlined
value is inlined with it. Checked against what Inductor realizes on the zoo's GPT, MLP
and U-Net graphs: the same values, up to a few tiny ones.

The scheduler then fuses kernels (``Scheduler.fuse_nodes``): a fused kernel runs where
its first part did, so a later part allocates its result early and frees its inputs
early (``Fusion.runs_with``), and what a later part needs from after that place runs
just before it (``Fusion.pulled``). A fusion that would pull an extern kernel ahead (a
recomputed LayerNorm or GELU fused with its backward pulls the matmul that makes the
backward's input, and the weight-gradient matmul then runs with all of them alive) is
refused in remat's compiles (``_torch_internals.no_extern_pulls``), and so here: on the
GPT of the budget sweep, with the weight gradients first (``passes.weight_gradients``),
the lowest plan measured 29.2 MiB where it measured 31.0 MiB with such fusions (scratch
runs). A stored value only its own fused kernel reads is not
stored after all (``remove_kernel_local_buffers``); and a kernel may write its result
over an input it reads for the last time at its own index (``Fusion.in_place``), which
a reshape of a channels-last value is not. On the CPU,
convolutions run channels-last, without the scratch they need eagerly
(``fused_workspace_bytes``); the kernels scheduled between two extern kernels are
generated into one C++ function, whose results are all allocated before it runs
(``_calls``); and in a graph with a convolution, a convolution reads a channels-last
copy of a value whose layout was fixed otherwise (``_channels_last_copies``: a
U-Net's recomputed upsampling, GroupNorm's input gradients), and a graph input it
copies so that the graph also returns is returned as the copy
(``Fusion.returned_copies``: weights saved for the backward). A backward, which remat
compiles without that layout, still reads its forward's channels-last weights, and
its convolutions copy an input a kernel stored in another layout
(``_weight_layout_copies``: a recomputed upsampling), unless only they read it: then
remat makes it channels-last where it is made (``Fusion.made_channels_last``,
``passes.conv_input_layout``). Each rule was needed to
come within 10% of the peaks ``benchmarks/predict.py`` measures under Inductor; the
last two for U-Net plans that recompute convolutions (issue 4: 45.2 MiB predicted
without them, 55.0 MiB with, 60.2 MiB measured); the pulled matmul for the demo GPT,
before remat refused such fusions (81.1 MiB predicted without it, 83.1 MiB with, 83.3 MiB
measured); the returned
copies for the U-Net (59.2 MiB predicted without them, 62.2 MiB with, 62.8 MiB
measured).

Not modelled: Inductor's ``reorder_for_peak_memory`` pass, which reorders the fused
kernels where its own estimate says another topological order has a lower peak. On
``make predict``'s MLP it ran the LayerNorm weight-gradient sums before a matmul rather
than after, and the measured peak was 3.4% under the prediction, until the weight
gradients ran first (``passes.weight_gradients``); the two now agree.
"""

from __future__ import annotations

import bisect
import functools
import math
import operator
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.fx as fx

from remat._torch_internals import (
    inductor_fallback_random,
    inductor_lowers_convolution_backward,
    is_builtin_op,
    is_late_copy,
    is_op_overload,
    size_hint,
)
from remat.cost_models.node_memo import input_nodes, per_node
from remat.cost_models.sizes import contiguous_at_hints, node_storage_bytes, tensors_in
from remat.cost_models.workspace import workspace_bytes

aten = torch.ops.aten
prims = torch.ops.prims

# Inductor's thresholds (torch/_inductor/config.py), for the CPU and for other devices.
REALIZE_READS_THRESHOLD = 4
REALIZE_OPCOUNT_THRESHOLD = {"cpu": 50, "other": 30}
REALIZE_ACC_READS_THRESHOLD = {"cpu": 12, "other": 8}
# On the CPU a reused expression with one of these is stored rather than recomputed.
HEAVY_ON_CPU = frozenset({aten.exp, aten.log, aten.log10, aten.log1p, aten.log2, aten.sigmoid, aten.tanh})

# Ops that are not tagged pointwise but that Inductor lowers to an expression of
# their inputs (loads at computed indices), so they can be inlined themselves.
INDEXING = frozenset(
    {
        aten.embedding,
        aten.gather,
        aten.index,
        aten._unsafe_index,
        aten.upsample_nearest2d_backward,  # windows of up to 25 elements (passes.upsample_gradients)
        aten.constant_pad_nd,
        aten.slice_scatter,
        aten.select_scatter,
        aten.full,
        aten.scalar_tensor,
        aten._to_copy,
        aten.copy,
        prims.iota,
    }
)
# Random numbers, drawn inside the kernels that read them (Inductor's replace_random
# pass) unless ``config.fallback_random`` calls them as eager does.
RANDOM = frozenset({aten.rand.default, aten.randn.default})
REDUCTIONS = frozenset(
    {
        aten.sum,
        aten.mean,
        aten.amax,
        aten.amin,
        aten.var_mean,
        aten.var,
        aten.std,
        aten.prod,
        aten.any,
        aten.all,
        aten.argmax,
        aten.argmin,
        aten.max,
        aten.min,
    }
)
# Ops whose output Inductor stores, but that read their inputs through expressions
# (reductions, scatters into a copy of their input, cat writing each input into its
# slice of the output).
STORED_READERS = REDUCTIONS | frozenset(
    {
        aten.cat,
        aten.scatter,
        aten.scatter_add,
        aten.scatter_reduce,
        aten.index_put,
        aten._unsafe_index_put,
        aten._unsafe_masked_index_put_accumulate,
        aten.index_add,
    }
)


@per_node
def _packet(node: fx.Node) -> object:
    target = node.target
    return target.overloadpacket if is_op_overload(target) else target


@per_node
def _inlinable(node: fx.Node) -> bool:
    """An op Inductor lowers to an expression that it need not store."""
    if node.target in RANDOM:
        return not inductor_fallback_random()
    return _lowered_to_expression(node.target)


@functools.cache
def _lowered_to_expression(target: object) -> bool:
    if not is_builtin_op(target):
        return False
    return torch.Tag.pointwise in target.tags or target.overloadpacket in INDEXING


@functools.cache
def _is_alias_op(target: object) -> bool:
    if target is operator.getitem:
        return True
    return is_op_overload(target) and target.is_view and target.overloadpacket is not aten.as_strided


@per_node
def _is_alias(node: fx.Node) -> bool:
    """A view (or a part of a multi-output op): it has no storage of its own."""
    return _is_alias_op(node.target)


@per_node
def _reads_inline(node: fx.Node) -> bool:
    """A reader that computes an unstored input inline; any other makes it stored."""
    return _inlinable(node) or _packet(node) in STORED_READERS


def inlined_by_inductor(node: fx.Node) -> bool:
    """Whether Inductor can compute ``node`` inside the kernels that read it (a
    pointwise or indexing op) rather than in a kernel of its own."""
    return _inlinable(node)


def reads_stored(node: fx.Node) -> bool:
    """Whether ``node`` runs as a kernel that needs its inputs stored in memory (an
    extern kernel: matmul, convolution, an op without a lowering), not one that
    Inductor generates and that computes an inlined input where it reads it."""
    return not (_is_alias(node) or _reads_inline(node))


def is_reduction(node: fx.Node) -> bool:
    """A reduction Inductor generates a kernel of its own for (it cannot be inlined)."""
    return _packet(node) in REDUCTIONS


class _Expression(NamedTuple):
    """What a value's expression holds: the stored values it reads (``aligned``: those
    read only at the value's own element index), the FX nodes inlined into it, and
    whether it has an op the CPU would rather not repeat. (A named tuple: ``fuse``
    makes one per node of every simulated plan, and builds it in less than half the
    time of a frozen dataclass.)"""

    reads: frozenset[fx.Node]
    aligned: frozenset[fx.Node]
    nodes: frozenset[fx.Node]
    heavy: bool

    @property
    def ops(self) -> int:
        """About the ops Inductor counts: one per inlined node and per load."""
        return len(self.nodes) + len(self.reads)


@dataclass(frozen=True)
class Fusion:
    """One graph as Inductor compiles it, as far as memory goes.

    inlined: values computed inside their readers' kernels and never stored.
    runs_with: for a kernel fused into the kernel of an earlier node, or generated
        into the same C++ function (on the CPU), that node: it runs there, allocating
        its result and reading its inputs there.
    in_place: for each stored value that a generated kernel computes elementwise,
        the stored values it reads at its own index with the same dtype and size. If
        one of them is last read by this kernel, Inductor writes the value over it
        (``SchedulerNode.decide_inplace_update``, ``config.inplace_buffers``): the
        two never take memory together.
    copies: for a value a convolution reads (as it reads it: the value or a view of
        it) and that convolution, the stored value it is a copy of: the convolution
        reads a channels-last copy of its own, made where that value's kernel runs.
    loads: for each value a kernel Inductor generates computes (stored, or local to
        its fused kernel), the stored values its expression loads from outside its
        fused kernel (those in ``inlined`` are computed in the same fused kernel too):
        what the kernel reads from memory.
    pulled: for a node that runs ahead of its place in the graph, because a fused
        kernel needs it and came earlier (with what it needs in turn), the node of the
        graph it now runs just before.
    returned_copies: for a graph input that the graph returns as a channels-last copy
        (``_returned_input_copies``), the convolution where the copy is made.
    into_cat: for a stored value that its kernel writes straight into its slice of a
        concatenation (``_written_into_cat``), that cat: it has no buffer of its own.
    made_channels_last: values that only convolutions read, each of which would copy
        it to channels-last (``_weight_layout_copies``): remat makes them channels-last
        where they are made instead (``passes.conv_input_layout``), so they are stored
        once and copied by none.
    """

    inlined: set[fx.Node]
    runs_with: dict[fx.Node, fx.Node]
    in_place: dict[fx.Node, list[fx.Node]]
    copies: dict[tuple[fx.Node, fx.Node], fx.Node]
    loads: dict[fx.Node, frozenset[fx.Node]]
    pulled: dict[fx.Node, fx.Node]
    returned_copies: dict[fx.Node, fx.Node]
    into_cat: dict[fx.Node, fx.Node]
    made_channels_last: frozenset[fx.Node] = frozenset()


def fuse(
    nodes: Sequence[fx.Node], outputs: Collection[fx.Node], *, inputs_channels_last: bool = False, backward: bool = False
) -> Fusion:
    """How Inductor compiles the graph running ``nodes`` (in order) and returning
    ``outputs``. Readers outside ``nodes`` (another graph's) are not looked at.
    ``inputs_channels_last``: the graph's 4-d inputs come channels-last (a backward
    whose forward Inductor lays out so, ``lays_out_channels_last``); ``backward``: the
    graph is a backward."""
    members = set(nodes)
    returned = set(outputs)
    on_cpu = _on_cpu(nodes)
    laid_out = on_cpu and lays_out_channels_last(nodes, backward=backward)
    channels_last = _channels_last_layouts(nodes) if laid_out or on_cpu and inputs_channels_last else None
    layouts: dict[fx.Node, tuple[object, ...] | None] = {}
    inlined: set[fx.Node] = set()
    expressions: dict[fx.Node, _Expression] = {}
    kernels: dict[fx.Node, _Expression] = {}  # stored values Inductor generates a kernel for
    for node in nodes:
        if _is_alias(node):
            base = node.args[0]
            if base in inlined:
                inlined.add(node)
                expressions[node] = expressions[base]
            continue
        if not _reads_inline(node):
            continue
        expression = _expression(node, inlined, expressions, layouts, channels_last)
        if _inlinable(node) and not _stored(node, expression, members, returned):
            inlined.add(node)
            expressions[node] = expression
        else:
            kernels[node] = expression
    index = {node: i for i, node in enumerate(nodes)}
    leader, pulled = _group_kernels(kernels, index, _scheduled(nodes, inlined))
    called = _calls(nodes, kernels, inlined, leader) if on_cpu else leader
    readers: dict[fx.Node, list[fx.Node]] = {}
    for node, expression in kernels.items():
        for value in expression.reads:
            readers.setdefault(_base(value), []).append(node)
    for node in kernels:
        if _kernel_local(node, readers.get(node, []), leader, members, returned, inlined, kernels):
            inlined.add(node)
    runs_with = {node: first for node, first in called.items() if first is not node}
    made_channels_last: frozenset[fx.Node] = frozenset()
    if laid_out:
        copies = _channels_last_copies(nodes, kernels, members, channels_last or {})
    elif channels_last is not None:
        copies = _weight_layout_copies(nodes, kernels, _channels_last_layouts(nodes, repropagated=True))
        made_channels_last = _only_copied(copies, kernels, members, returned)
        copies = {(arg, reader): value for (arg, reader), value in copies.items() if arg not in made_channels_last}
    else:
        copies = {}
    returned_copies = _returned_input_copies(nodes, returned) if laid_out else {}
    loads = {  # a value made in the same fused kernel is read where it is computed
        node: frozenset(v for v in expression.reads if leader.get(_source(v), v) is not leader[node])
        for node, expression in kernels.items()
    }
    in_place = _in_place(kernels, readers, leader, index)
    into_cat = _written_into_cat(nodes, kernels, inlined, members, returned) if on_cpu else {}
    return Fusion(inlined, runs_with, in_place, copies, loads, pulled, returned_copies, into_cat, made_channels_last)


def _written_into_cat(
    nodes: Sequence[fx.Node],
    kernels: Collection[fx.Node],
    inlined: Collection[fx.Node],
    members: set[fx.Node],
    returned: set[fx.Node],
) -> dict[fx.Node, fx.Node]:
    """On the CPU, Inductor lowers every cat as a ``ConcatKernel``, which computes an
    input whose layout is still free (a generated kernel's value that nothing else
    reads) straight into its slice of the result (``can_realize_into_without_copy``):
    the U-Net's recomputed skip connection is written into the decoder's
    concatenation, not into a buffer of its own."""
    found = {}
    for node in nodes:
        if _packet(node) is not aten.cat or node not in kernels or node in inlined:
            continue
        for arg in node.args[0]:
            if (
                isinstance(arg, fx.Node) and arg in kernels and arg not in inlined and arg not in returned
                and [u for u in arg.users if u in members] == [node]
            ):
                found[arg] = node
    return found


CONVOLUTIONS = frozenset({aten.convolution.default, aten.convolution_backward.default})
RESHAPES = frozenset({aten.view, aten.reshape, aten._unsafe_view})
# Ops whose result Inductor's fake tensors lay out like their inputs.
LAYOUT_KEEPING = frozenset({aten.cat, aten.clone, aten._to_copy, aten.copy, aten.constant_pad_nd})

# Extern kernels Inductor calls with an ``out=`` buffer its wrapper allocates
# (``ExternKernelOut``, kernel/mm.py); the others allocate their results themselves.
OUT_EXTERNS = frozenset({aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default})


def wrapper_allocates(node: fx.Node, fusion: Fusion) -> bool:
    """Inductor's wrapper allocates ``node``'s result (so it may hand it a freed buffer
    of the same size): a kernel it generates, or an ``out=`` extern kernel."""
    return node in fusion.loads or node.target in OUT_EXTERNS


def _channels_last_copies(
    nodes: Sequence[fx.Node], kernels: Collection[fx.Node], members: set[fx.Node], channels_last: Mapping[fx.Node, bool]
) -> dict[tuple[fx.Node, fx.Node], fx.Node]:
    """Which convolutions read a copy. On the CPU with oneDNN, Inductor lays out a graph
    with a convolution channels-last (``GraphLowering.decide_layout_opt``): the lowerings
    of convolution and convolution_backward require channels-last inputs
    (``ExternKernel.require_channels_last``). A stored value whose layout is still
    free is stored that way; one whose layout is already fixed otherwise is copied, once
    for each such reader (``ExternKernel.copy_input``). Fixed are a value read through a
    view (the view pins its base's layout) and a value with several readers, one a
    convolution_backward (``GraphLowering.run_node`` gives it the strides of its FX
    value); those strides are channels-last except after a reshape or an indexing op
    (the upsampling of a U-Net). Both happen in the backward of a recomputed
    convolution: the graph without one is not laid out channels-last.
    ``channels_last``: ``_channels_last_layouts``."""
    copies = {}
    for reader in nodes:
        if reader.target not in CONVOLUTIONS:
            continue
        for arg in _convolution_operands(reader)[1]:
            if not isinstance(arg, fx.Node) or channels_last.get(arg, True):
                continue
            value = _source(arg)
            readers = {user for user in value.users if user in members}
            viewed = arg is not value
            shared = len(readers) > 1 and any(user.target is aten.convolution_backward.default for user in readers)
            if value in kernels and (viewed or shared):
                copies[arg, reader] = value
    return copies


def _weight_layout_copies(
    nodes: Sequence[fx.Node], kernels: Collection[fx.Node], channels_last: Mapping[fx.Node, bool]
) -> dict[tuple[fx.Node, fx.Node], fx.Node]:
    """Which convolutions read a copy in a CPU graph that is not laid out channels-last
    but reads channels-last weights: a backward whose forward Inductor laid out so
    (``lays_out_channels_last``). Inductor's lowerings ask a convolution's input for
    the stride order of its result (``conv_layout``) and a convolution_backward's
    output gradient and input for that of its weight gradient
    (``conv_bwd_weight_layout``); a channels-last weight makes both channels-last. A
    value a generated kernel stores in another layout (a recomputed upsampling) is
    stored as its FX value is and copied channels-last in the same kernel, once for
    each such reader; the original then dies there unless something else reads it.
    Where Inductor calls convolution_backward as a fallback instead
    (``inductor_lowers_convolution_backward``), the op makes that copy itself, while it
    runs. On the budget sweep's U-Net, a plan that recomputes the decoder's
    upsampling allocated 39.10 MiB at its peak before ``passes.conv_input_layout``,
    predicted 35.16 MiB without this rule and 39.10 MiB with it
    (``benchmarks/results/unet_lowest_plan_search.md``).
    ``channels_last``: ``_channels_last_layouts`` with ``repropagated``."""
    copies = {}
    for reader in nodes:
        if reader.target not in CONVOLUTIONS:
            continue
        weight, read = _convolution_operands(reader)
        copies_itself = reader.target is aten.convolution_backward.default and not inductor_lowers_convolution_backward()
        if not isinstance(weight, fx.Node) or not _is_channels_last(weight, channels_last):
            continue
        for arg in read:
            if isinstance(arg, fx.Node) and not channels_last.get(arg, True) and not _channels_last(arg):
                if copies_itself:
                    copies[arg, reader] = reader
                elif _source(arg) in kernels:
                    copies[arg, reader] = _source(arg)
    return copies


def _convolution_operands(node: fx.Node) -> tuple[object, tuple[object, ...]]:
    """A convolution's or convolution_backward's weight, and the inputs whose layout
    Inductor's lowering sets: a convolution's input; a convolution_backward's output
    gradient and input."""
    if node.target is aten.convolution.default:
        return node.args[1], node.args[:1]
    return node.args[2], node.args[:2]


def _only_copied(
    copies: Collection[tuple[fx.Node, fx.Node]], kernels: Collection[fx.Node], members: set[fx.Node], returned: Collection[fx.Node]
) -> frozenset[fx.Node]:
    """The values a generated kernel stores that convolutions copy
    (``_weight_layout_copies``) and that nothing else reads: no other op, no view, not
    the graph's output."""
    readers: dict[fx.Node, set[fx.Node]] = {}
    for arg, reader in copies:
        readers.setdefault(arg, set()).add(reader)
    return frozenset(
        value for value, copying in readers.items()
        if value in kernels and value not in returned and {user for user in value.users if user in members} == copying
    )


def _returned_input_copies(nodes: Sequence[fx.Node], returned: Collection[fx.Node]) -> dict[fx.Node, fx.Node]:
    """Graph inputs that a graph laid out channels-last (``lays_out_channels_last``)
    returns as channels-last copies, each with the convolution where the copy is
    made. There a convolution requires its input and weight
    channels-last, and copies a graph input laid out otherwise (``copy_input``); where
    the graph returns that input too (a weight or an image saved for the backward), it
    returns the copy, which then lives until the backward's last use of it. On the
    issue-4 U-Net: 3.1 MiB of 3x3 weights and the 0.4 MiB image, which a 0.7 budget's
    plan measured above its prediction."""
    found: dict[fx.Node, fx.Node] = {}
    for node in nodes:
        if node.target is not aten.convolution.default:
            continue
        for arg in node.args[:2]:
            if isinstance(arg, fx.Node) and arg.op == "placeholder" and arg in returned and not _channels_last(arg):
                found.setdefault(arg, node)
    return found


@per_node
def _channels_last(node: fx.Node) -> bool:
    """Whether a 4-d value is laid out channels-last already (dims of size 1 aside)."""
    value = node.meta.get("val")
    if not isinstance(value, torch.Tensor) or value.dim() != 4:
        return True
    sizes = [size_hint(s) for s in value.shape]
    strides = [size_hint(s) for s in value.stride()]
    expected = 1
    for dim in (1, 3, 2, 0):  # channels vary fastest, then width, height, batch
        if sizes[dim] != 1 and strides[dim] != expected:
            return False
        expected *= sizes[dim]
    return True


def lays_out_channels_last(nodes: Sequence[fx.Node], *, backward: bool = False) -> bool:
    """Whether Inductor lays out the CPU graph running ``nodes`` channels-last: with
    oneDNN, a graph with a convolution (``GraphLowering.decide_layout_opt`` looks for
    ``aten.convolution`` only, so a backward with convolution_backward alone keeps
    the default layout). Never a ``backward``: remat compiles it without layout
    optimization (``compile_inductor``), so that recomputing a convolution does not
    lay out the whole backward channels-last. It did before: on the budget sweep's
    U-Net, recomputing the last two convolutions made the backward's kernels 1.4x
    slower (64 to 89 ms in a 225 ms step), and its lowest plan ran at 1.116x
    PyTorch's time at PyTorch's lowest point, against 1.012x without (the budget
    sweeps at 9406b89 and 03d4c60)."""
    return (
        not backward
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
        and any(node.target is aten.convolution.default for node in nodes)
    )


def _channels_last_layouts(nodes: Sequence[fx.Node], *, repropagated: bool = False) -> dict[fx.Node, bool]:
    """Whether each 4-d value is channels-last in the FX graph Inductor compiles: it
    propagates fake tensors again from the graph's inputs, which come channels-last
    (``GraphLowering.find_nodes_prefer_channels_last`` lays out the forward's outputs
    so); convolutions keep that layout and elementwise ops follow their inputs, while
    reshapes and indexing ops make contiguous values. ``repropagated``: as the fake
    tensors of a backward Inductor compiles without layout optimization are, by
    PyTorch's own rules: a reshape of a channels-last value is a view in its memory
    order (GroupNorm's groups), reshaping that back gives a channels-last value
    again, and a cat of channels-last values is channels-last."""
    layouts: dict[fx.Node, bool] = {}
    regrouped: dict[fx.Node, tuple[int, ...]] = {}  # in a channels-last value's order: its shape
    shape = functools.cache(_shape)
    for node in nodes:
        ndim = _ndim(node)
        reshaped = _packet(node) in RESHAPES and shape(node) != shape(node.args[0])
        if repropagated and ndim:
            if reshaped:
                base = node.args[0]
                origin = regrouped.get(base, shape(base) if layouts.get(base, _ndim(base) == 4) else None)
                if origin is not None and origin != shape(node):
                    regrouped[node] = origin
            elif _inlinable(node) and _packet(node) not in INDEXING:
                origins = {regrouped[a] for a in node.all_input_nodes if a in regrouped and shape(a) == shape(node)}
                if len(origins) == 1:
                    regrouped[node] = origins.pop()
        if ndim != 4:
            continue
        if _is_alias(node):
            base = node.args[0]
            layouts[node] = regrouped.get(base) == shape(node) if reshaped else layouts.get(base, True)
        elif node.target in CONVOLUTIONS:
            layouts[node] = True
        elif repropagated and _packet(node) is aten.cat:
            layouts[node] = all(layouts.get(a, True) for a in node.all_input_nodes)
        elif _packet(node) is aten.clone and node.kwargs.get("memory_format") is torch.channels_last:
            layouts[node] = True
        elif _inlinable(node) and _packet(node) not in INDEXING or _packet(node) in LAYOUT_KEEPING:
            layouts[node] = any(layouts.get(a, True) for a in node.all_input_nodes if _ndim(a) == 4 and shape(a) == shape(node))
        else:
            layouts[node] = False
    return layouts


def _is_channels_last(node: fx.Node, channels_last: Mapping[fx.Node, bool] | None) -> bool:
    """Whether Inductor stores ``node`` channels-last: as ``_channels_last_layouts``
    says, and any 4-d input of a graph laid out so (a backward reads the saved values
    as its forward made them)."""
    return channels_last is not None and channels_last.get(node, _ndim(node) == 4)


@per_node
def _shape(node: fx.Node) -> tuple[int, ...] | None:
    value = node.meta.get("val")
    return tuple(size_hint(s) for s in value.shape) if isinstance(value, torch.Tensor) else None


@per_node
def _ndim(node: fx.Node) -> int:
    value = node.meta.get("val")
    return value.dim() if isinstance(value, torch.Tensor) else 0


def _on_cpu(nodes: Sequence[fx.Node]) -> bool:
    """Whether the graph computes on the CPU, where Inductor generates C++ (a GPU graph
    may hold CPU tensors too: scalars, host copies of offloaded values)."""
    devices = {_device_type(n) for n in nodes} - {None}
    return "cpu" in devices and devices <= {"cpu", "meta"}


@per_node
def _device_type(node: fx.Node) -> str | None:
    """Where the tensor a node makes lives ("cpu", "cuda", ...); None for anything else."""
    value = node.meta.get("val")
    return value.device.type if isinstance(value, torch.Tensor) else None


def _calls(
    nodes: Sequence[fx.Node], kernels: Collection[fx.Node], inlined: Collection[fx.Node], leader: Mapping[fx.Node, fx.Node]
) -> dict[fx.Node, fx.Node]:
    """For each kernel, the first kernel of the C++ function it is generated into. On
    the CPU, Inductor generates every fused kernel scheduled between two extern kernels
    into one function, called once (``CppScheduling`` keeps one ``KernelGroup`` until
    ``Scheduler.flush``, which runs before each extern kernel): the wrapper allocates
    all their results before the call and frees their inputs after it."""
    first: dict[fx.Node, fx.Node] = {}
    current = None
    for node in nodes:
        if node in kernels:
            if leader[node] is node:
                current = current or node
                first[node] = current
        elif not (node in inlined or _is_alias(node) or _packet(node) is aten.as_strided):
            current = None  # an extern kernel ends the function (as_strided is a view)
    return {node: first[leader[node]] for node in kernels}


def _kernel_local(
    node: fx.Node,
    readers: Sequence[fx.Node],
    leader: Mapping[fx.Node, fx.Node],
    members: set[fx.Node],
    returned: set[fx.Node],
    inlined: set[fx.Node],
    kernels: Mapping[fx.Node, _Expression],
) -> bool:
    """A stored value that only kernels fused with its own read, and that the graph
    does not return: the fused kernel keeps it to itself (``remove_kernel_local_buffers``)."""
    if not (_inlinable(node) or _packet(node) in REDUCTIONS):
        return False  # scatters write into a copy of their input; cat into its parts
    if not readers or any(leader[reader] is not leader[node] for reader in readers):
        return False
    pending = [node]
    while pending:  # no view of it is returned or read by an extern kernel
        value = pending.pop()
        if value in returned:
            return False
        for user in value.users:
            if user not in members or user in inlined or user in kernels:
                continue
            if not _is_alias(user):
                return False
            pending.append(user)
    return True


MAX_FUSION_SIZE = 64  # config.max_fusion_size: nodes in one fused kernel
FUSION_DISTANCE = 64  # Scheduler.are_long_distant_nodes: farthest apart two independent groups fuse
PAIRWISE_ATTEMPTS = 64  # config.max_fusion_buffer_group_pairwise_attempts


def _group_kernels(
    kernels: Mapping[fx.Node, _Expression], index: Mapping[fx.Node, int], scheduled: Sequence[fx.Node]
) -> tuple[dict[fx.Node, fx.Node], dict[fx.Node, fx.Node]]:
    """Which kernels Inductor fuses into one (``Scheduler.fuse_nodes``), each mapped
    to the first node of its group, where the fused kernel runs (a fused node takes
    the place of its earliest part). As Inductor does: pairs of kernels with loops of
    the same size that touch a common stored value (one reads what the other makes,
    or both read it) fuse, best first (both reductions or neither, then the most
    bytes shared, then the closest), unless the fused kernel would exceed
    ``MAX_FUSION_SIZE`` nodes, depend on itself (a cycle), hold reductions over
    different ranges (``CppScheduling``: a LayerNorm backward's sums over each row
    and its weight gradient's sums over the rows are two kernels), or join two
    groups that do not depend on each other and lie more than ``FUSION_DISTANCE``
    apart among the ``scheduled`` nodes (``Scheduler.are_long_distant_nodes``: a
    value recomputed twice in the backward, for readers far apart, stays two kernels).

    What a fused kernel needs from after its place runs just before it, with what
    that needs in turn (``Scheduler.topological_sort_schedule`` after each round of
    fusion), unless that is an extern kernel: remat's compiles refuse such fusions
    (``_torch_internals.no_extern_pulls``). The second map sends each node pulled so
    to the node of the graph it now runs just before."""
    touching: dict[fx.Node, list[fx.Node]] = {}  # stored value -> kernels reading or making it
    needs: dict[fx.Node, set[fx.Node]] = {}
    touched: dict[fx.Node, set[fx.Node]] = {}  # what each kernel reads or makes
    for node, expression in kernels.items():
        needs[node] = {_source(value) for value in expression.reads}
        touched[node] = needs[node] | {node}
        for value in touched[node]:
            touching.setdefault(value, []).append(node)
    pairs: set[tuple[fx.Node, fx.Node]] = set()
    for group in touching.values():
        for i, first in enumerate(group):
            pairs.update((first, other) for other in group[i + 1 : i + 1 + PAIRWISE_ATTEMPTS])
    loops = {node: _loop_size(node) for node in kernels}
    reduces = {node: _packet(node) in REDUCTIONS for node in kernels}
    nbytes: dict[fx.Node, int] = {}
    ranked = []
    for a, b in pairs:
        if loops[a] != loops[b]:
            continue
        shared = touched[a] & touched[b]
        score = sum(nbytes[v] if v in nbytes else nbytes.setdefault(v, node_storage_bytes(v)) for v in shared)
        same_kind = reduces[a] == reduces[b] and score > 0
        ranked.append((same_kind, score, -abs(index[a] - index[b]), index[a], index[b], a, b))
    ranked.sort(key=lambda r: r[:5], reverse=True)

    schedule = _Schedule(kernels, needs, index, scheduled)
    for *_, a, b in ranked:
        first, second = sorted((schedule.leader[a], schedule.leader[b]), key=schedule.place.__getitem__)
        if first is second or len(schedule.members[first]) + len(schedule.members[second]) > MAX_FUSION_SIZE:
            continue
        schedule.fuse(first, second)
    return schedule.leader, schedule.pulled()


def _scheduled(nodes: Sequence[fx.Node], inlined: Collection[fx.Node]) -> list[fx.Node]:
    """The nodes Inductor's scheduler orders before fusing: every op that makes a
    buffer (a generated or an extern kernel), not the values inlined into their
    readers or views."""
    return [
        node for node in nodes
        if node.op == "call_function" and node not in inlined and not _is_alias(node)
    ]


def _ancestor_bits(index: Mapping[fx.Node, int], order: Mapping[fx.Node, int]) -> dict[fx.Node, int]:
    """For each node of the graph (``index``), the scheduled nodes (``order``) it
    depends on, through any chain of reads, as a bit set."""
    ancestors: dict[fx.Node, int] = {}
    for node in sorted(index, key=index.__getitem__):
        bits = 0
        for arg in input_nodes(node):
            bits |= ancestors.get(arg, 0)
            if arg in order:
                bits |= 1 << order[arg]
        ancestors[node] = bits
    return ancestors


class _Schedule:
    """The kernels' order while ``_group_kernels`` fuses them: each group of kernels
    named by its first node, and where each node runs (a place; a kernel runs at its
    group's)."""

    def __init__(
        self,
        kernels: Mapping[fx.Node, object],
        needs: Mapping[fx.Node, set[fx.Node]],
        index: Mapping[fx.Node, int],
        scheduled: Sequence[fx.Node],
    ) -> None:
        self.needs = needs
        self.leader = {node: node for node in kernels}
        self.members = {node: {node} for node in kernels}
        # Inductor's min_order and max_order of each group; what each node depends on,
        # as bit sets over the scheduled nodes, only once two groups far apart meet
        self.order = {node: i for i, node in enumerate(scheduled)}
        self.span = {node: (self.order[node], self.order[node]) for node in kernels}
        self._ancestors: dict[fx.Node, int] | None = None
        self.outside = {node: set(needs[node]) for node in kernels}  # what each group needs from elsewhere
        self.reduction = {node: _reduction_ranges(node) for node in kernels}  # a group's, None without one
        self.late = {node: is_late_copy(node) for node in kernels}  # whether a group holds a late copy
        self.index = index
        self.externs = sorted(index[node] for node in scheduled if node not in kernels)  # their places
        self.place: dict[fx.Node, float] = dict(index)
        self.moved: dict[int, list[float]] = {}  # places given to moved nodes, by the index they run before

    def _where(self, node: fx.Node) -> float:
        return self.place.get(self.leader.get(node, node), -1.0)

    def fuse(self, first: fx.Node, second: fx.Node) -> None:
        """Fuse the group of ``second`` into that of ``first`` (the earlier), pulling
        what it needs ahead, unless their reductions run over different ranges, the
        fused kernel would need its own result (a cycle), an extern kernel would be
        pulled or a late backward copy would move across one."""
        reductions = {self.reduction[first], self.reduction[second]} - {None}
        if len(reductions) > 1 or self._far_apart(first, second):
            return
        fused = self.members[first] | self.members[second]
        late = self.late[first] or self.late[second]
        if late and self._moves_a_copy(fused):
            return
        wanted = (self.outside[first] | self.outside[second]) - fused
        ahead = self._needed_after(wanted, self.place[first], fused)
        if ahead is None:
            return
        self.reduction[first] = next(iter(reductions), None)
        del self.reduction[second]
        self.late[first] = late
        del self.late[second]
        self._move_before(ahead, first)
        for node in self.members[second]:
            self.leader[node] = first
        self.members[first] = fused
        del self.members[second]
        (low, high), (low2, high2) = self.span[first], self.span.pop(second)
        self.span[first] = (min(low, low2), max(high, high2))
        self.outside[first] = wanted
        del self.outside[second]

    def _moves_a_copy(self, fused: set[fx.Node]) -> bool:
        """Whether an extern kernel runs between the parts of ``fused``, which holds a
        late backward copy (``_torch_internals.no_extern_pulls`` refuses that fusion)."""
        places = [self.place[node] for node in fused]
        return bisect.bisect_left(self.externs, max(places)) > bisect.bisect_right(self.externs, min(places))

    def _far_apart(self, first: fx.Node, second: fx.Node) -> bool:
        """Inductor fuses two groups of which neither depends on the other (a
        horizontal fusion) only when their scheduled nodes lie close together."""
        (low, high), (low2, high2) = self.span[first], self.span[second]
        if max(abs(low - high2), abs(low2 - high)) <= FUSION_DISTANCE:
            return False
        return not (self._depends(first, second) or self._depends(second, first))

    def _depends(self, group: fx.Node, other: fx.Node) -> bool:
        """Whether a node of ``group`` needs, through any chain of reads, one of ``other``."""
        if self._ancestors is None:
            self._ancestors = _ancestor_bits(self.index, self.order)
        needed = 0
        for node in self.members[group]:
            needed |= self._ancestors[node]
        return any(needed >> self.order[node] & 1 for node in self.members[other])

    def _needed_after(self, wanted: set[fx.Node], at: float, fused: set[fx.Node]) -> set[fx.Node] | None:
        """The kernels at or after ``at`` that ``wanted`` come from (whole groups), or
        None when one of them needs the fused group itself or when something else
        would be pulled ahead (an extern kernel: refused). It stops at the first such
        node: in a 48-layer GPT's backward, a pair far apart would otherwise walk
        every node between them, half the time of its simulation."""
        ahead: set[fx.Node] = set()
        pending = list(wanted)
        place, leader = self.place, self.leader
        while pending:
            value = pending.pop()
            if value in ahead or place.get(leader.get(value, value), -1.0) < at:  # ``_where``, inline: the hot loop
                continue
            if value not in self.leader:
                return None
            group = self.members[self.leader[value]]
            if not group.isdisjoint(fused):
                return None
            for node in group:
                ahead.add(node)
                pending.extend(self.needs[node] if node in self.needs else map(_source, input_nodes(node)))
        return ahead

    def _move_before(self, nodes: set[fx.Node], kernel: fx.Node) -> None:
        """Run ``nodes`` just before ``kernel``, in their order."""
        if not nodes:
            return
        at = self.place[kernel]
        slot = math.ceil(at)  # the places between slot - 1 (a node of the graph) and at
        taken = self.moved.setdefault(slot, [])
        below = max((p for p in taken if p < at), default=slot - 1.0)
        moved = sorted(nodes, key=lambda node: (self._where(node), self.place[node]))
        step = (at - below) / (len(moved) + 1)
        for i, node in enumerate(moved, 1):
            self.place[node] = below + i * step
            taken.append(self.place[node])

    def pulled(self) -> dict[fx.Node, fx.Node]:
        """For each node that now runs ahead of its place in the graph, the node of the
        graph it runs just before."""
        at_index = {i: node for node, i in self.index.items()}
        found = {}
        for node in self.index:
            head = self.leader.get(node, node)
            if self.place[head] != self.index[head]:
                found[node] = at_index[math.ceil(self.place[head])]
        return found


@per_node
def _reduction_ranges(node: fx.Node) -> tuple[int, int] | None:
    """A reduction's loops: the elements it keeps and the elements it sums into each."""
    if _packet(node) not in REDUCTIONS or not (node.args and isinstance(node.args[0], fx.Node)):
        return None
    outputs = tensors_in(node.meta.get("val"))
    kept = max(size_hint(outputs[0].numel()), 1) if outputs else 1
    return kept, _numel(node.args[0]) // kept


@per_node
def _loop_size(node: fx.Node) -> int:
    """Elements a kernel loops over: a reduction its input's, others their output's."""
    if _packet(node) in REDUCTIONS and node.args and isinstance(node.args[0], fx.Node):
        return _numel(node.args[0])
    return _numel(node)


def _in_place(
    kernels: Mapping[fx.Node, _Expression],
    readers: Mapping[fx.Node, Sequence[fx.Node]],
    leader: Mapping[fx.Node, fx.Node],
    index: Mapping[fx.Node, int],
) -> dict[fx.Node, list[fx.Node]]:
    """For each pointwise kernel, the inputs it may write over: read at its own index
    only, and by no other kernel of its fused group but its ancestors (Inductor
    reuses a buffer only for its one remaining reader, and a sibling in the same
    fused kernel that reads it too prevents that; earlier kernels are done)."""
    in_place = {}
    for node, expression in kernels.items():
        if not expression.aligned or not _inlinable(node):
            continue
        start = index[leader[node]]
        candidates = [
            value
            for value in sorted(expression.aligned, key=lambda value: value.name)
            if all(
                other is node or index[leader[other]] < start or _is_ancestor(other, node, index)
                for other in readers[_base(value)]
            )
        ]
        if candidates:
            in_place[node] = candidates
    return in_place


@per_node
def _source(node: fx.Node) -> fx.Node:
    """The node that computes what a view (or a part of a multi-output op) reads."""
    while _is_alias(node):
        node = node.args[0]
    return node


@per_node
def _base(node: fx.Node) -> fx.Node:
    """The node whose storage a view reads."""
    while node.target is not operator.getitem and _is_alias(node):
        node = node.args[0]
    return node


def _is_ancestor(ancestor: fx.Node, node: fx.Node, index: Mapping[fx.Node, int]) -> bool:
    """Whether ``node`` depends on ``ancestor`` (only nodes between them are searched)."""
    if ancestor not in index or node not in index or index[ancestor] >= index[node]:
        return False
    floor = index[ancestor]
    seen: set[fx.Node] = set()
    pending = [node]
    while pending:
        current = pending.pop()
        for arg in input_nodes(current):
            if arg is ancestor:
                return True
            if arg not in seen and index.get(arg, -1) > floor:
                seen.add(arg)
                pending.append(arg)
    return False


def _expression(
    node: fx.Node,
    inlined: set[fx.Node],
    expressions: Mapping[fx.Node, _Expression],
    layouts: dict[fx.Node, tuple[object, ...] | None],
    channels_last: Mapping[fx.Node, bool] | None,
) -> _Expression:
    reads: set[fx.Node] = set()
    aligned: set[fx.Node] = set()
    misaligned: set[fx.Node] = set()  # also read at another index (broadcast, transposed)
    nodes = {node}
    heavy = _packet(node) in HEAVY_ON_CPU
    layout = _layout(node, layouts, channels_last)
    for arg in input_nodes(node):
        elementwise = layout is not None and _layout(arg, layouts, channels_last) == layout
        if arg in inlined:
            inner = expressions[arg]
            reads |= inner.reads
            nodes |= inner.nodes
            heavy = heavy or inner.heavy
            if elementwise:
                aligned |= inner.aligned
                misaligned |= inner.reads - inner.aligned
            else:
                misaligned |= inner.reads
        else:
            reads.add(arg)
            (aligned if elementwise else misaligned).add(arg)
    return _Expression(frozenset(reads), frozenset(aligned - misaligned), frozenset(nodes), heavy)


def _layout(
    node: fx.Node, known: dict[fx.Node, tuple[object, ...] | None], channels_last: Mapping[fx.Node, bool] | None
) -> tuple[object, ...] | None:
    """(elements, dtype, channels-last) of a value contiguous in the FX graph; None for
    anything else. ``channels_last`` (``_channels_last_layouts``; None where neither
    the graph nor its inputs are laid out channels-last) says which values Inductor stores
    channels-last: they line up only with each other, and a reshape of one reads it
    in another order than its own (a GroupNorm's view of a saved convolution output),
    so it lines up with nothing."""
    if channels_last is None:
        return _plain_layout(node)  # nothing is channels-last: the same in every graph
    if node in known:
        return known[node]
    stored_channels_last = _is_channels_last(node, channels_last)
    reshaped = not stored_channels_last and _is_channels_last(_base(node), channels_last)
    contiguous = None if reshaped else _contiguous(node)
    layout = None if contiguous is None else (*contiguous, stored_channels_last)
    known[node] = layout
    return layout


@per_node
def _plain_layout(node: fx.Node) -> tuple[object, ...] | None:
    """``_layout`` where no value is channels-last."""
    contiguous = _contiguous(node)
    return None if contiguous is None else (*contiguous, False)


@per_node
def _contiguous(node: fx.Node) -> tuple[int, torch.dtype] | None:
    """(elements, dtype) of a value contiguous in the FX graph; None for anything else."""
    value = node.meta.get("val")
    if not isinstance(value, torch.Tensor) or not contiguous_at_hints(value):
        return None
    return size_hint(value.numel()), value.dtype


def _stored(node: fx.Node, expression: _Expression, members: set[fx.Node], returned: set[fx.Node]) -> bool:
    """Whether Inductor stores ``node``'s value (the rules in the module docstring)."""
    kind = "cpu" if _device_type(node) == "cpu" else "other"
    opcount = REALIZE_OPCOUNT_THRESHOLD[kind]
    if len(expression.reads) > REALIZE_ACC_READS_THRESHOLD[kind] or (expression.ops > opcount and len(expression.reads) > 1):
        return True
    fanout = sum(1 for u in node.users if u in members) > 1
    if fanout and len(expression.reads) > REALIZE_READS_THRESHOLD:
        return True
    if kind == "cpu" and expression.heavy and (fanout or _broadcast(node, members)):
        return True
    pending = [node]
    while pending:  # the value, its views, and their readers
        value = pending.pop()
        if value in returned:
            return True
        for reader in value.users:
            if reader not in members:
                continue
            if _is_alias(reader):
                pending.append(reader)
            elif not _reads_inline(reader):
                return True
    return False


def _broadcast(node: fx.Node, members: set[fx.Node]) -> bool:
    """Whether a reader computes more elements than ``node`` has, reading each of its
    elements many times through a broadcast (Inductor's ``expand`` lowering, which
    pointwise ops call on their inputs, marks that as reuse). An indexing reader (an
    upsampling ``_unsafe_index``, a gather) loads at computed indices and marks nothing."""
    numel = _numel(node)
    return any(u in members and _numel(u) > numel and _packet(u) not in INDEXING for u in node.users)


@per_node
def _numel(node: fx.Node) -> int:
    value = node.meta.get("val")
    return size_hint(value.numel()) if isinstance(value, torch.Tensor) else 0


@per_node
def fused_workspace_bytes(node: fx.Node) -> int:
    """Scratch of an op in a graph Inductor compiled. On the CPU with oneDNN, Inductor
    lays out graphs with convolutions channels-last (``decide_layout_opt``), and
    oneDNN convolves those without reordering them (``workspace_bytes``). The cases
    where ``decide_layout_opt`` keeps the default layout (some grouped, transposed or
    narrow convolutions) are not modelled: there the scratch is underestimated."""
    channels_last = torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
    return workspace_bytes(node, channels_last=channels_last)


def read_positions(nodes: Sequence[fx.Node], position: Mapping[fx.Node, int], fusion: Fusion) -> dict[tuple[fx.Node, fx.Node], int]:
    """Where each of one graph's ``nodes`` reads each of its inputs, by (input, node): a
    stored value where it runs; an inlined value, and a view, where the last kernel
    that reads it runs (a part of a multi-output op, where it is taken); a convolution
    that reads a copy (``Fusion.copies``) where the copy is made. The input must live
    until then. ``position``: each node's place in the timeline."""
    at = dict(position)
    edges: dict[tuple[fx.Node, fx.Node], int] = {}
    last_read: dict[fx.Node, int] = {}  # by the readers seen so far (all of them, in reverse)
    inlined, copies = fusion.inlined, fusion.copies
    for node in reversed(nodes):
        if node in inlined or _is_alias(node) and node.target is not operator.getitem:
            at[node] = last_read.get(node, position[node])
        here = at[node]
        for arg in input_nodes(node):
            copied = copies.get((arg, node)) if copies else None
            read = edges[arg, node] = here if copied is None else position[copied]
            if read > last_read.get(arg, -1):  # positions are never negative
                last_read[arg] = read
    return edges
