"""Simulate the live bytes of one training step: the forward graph, then the backward.

The budgeted solver optimizes against this function and every peak the README quotes
is checked against it, so it models what the runtime really does:

- one storage per allocation: views and in-place results share their base's storage
  and cost nothing; a storage is allocated by the first node that produces it and
  freed right after the last node that reads any alias of it (FX's generated code
  drops each value after its last use; the backward gets its inputs boxed, so saved
  activations are released one by one as the backward finishes with them);
- while a node runs, its inputs and its freshly allocated outputs are live together,
  with the scratch memory the op needs inside itself (``workspace``);
- parameters, buffers and inputs of the forward exist before and after the step
  (``resident_bytes``); the step's peak is counted above them, as it is measured;
- forward outputs that the backward does not read (the loss) and the gradients the
  backward returns live to the end of the step;
- with ``fused=True``, the graphs run as Inductor compiles them (``cost_models.fusion``):
  values it computes inside their readers' kernels get no storage, and what they read
  lives until the last kernel that computes them has run; kernels fused into an
  earlier one run there (on the CPU, so do all kernels between two extern kernels:
  one C++ function); a kernel that writes its result over an input it reads for the
  last time needs no new storage; convolutions need no reordering scratch, but may
  read a channels-last copy of their input, made with it; and a buffer is freed after
  its last reader, as remat's solver plans it. With ``buffer_pool=True`` (Inductor's
  default: PyTorch's own partitions get it, and remat keeps it where its holds fit the
  budget, ``partition.RematPartitioner._buffer_pool``), a freed buffer may be held
  until a later kernel of the same graph allocates one of the same dtype and size,
  which takes it over (``_reuse_freed_buffers``).

Each storage becomes an interval of timeline positions; the live bytes are their sum.
A full simulation is linear in the graph size (a difference array).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.fx as fx

from remat._torch_internals import is_primal, is_tangent, storage_key
from remat.cost_models.fusion import (
    Fusion, fuse, fused_workspace_bytes, lays_out_channels_last, read_positions, wrapper_allocates,
)
from remat.cost_models.sizes import graph_device, leaves, node_storages, storage_bytes, tensor_size, tensors_in
from remat.cost_models.transfers import Window
from remat.cost_models.workspace import workspace_bytes
from remat.passes.schedule import StepOrder


class Interval(NamedTuple):
    """``nbytes`` live from timeline position ``start`` to ``end``, both inclusive. (A
    named tuple: each simulated plan makes thousands.)"""

    label: str
    nbytes: int
    start: int
    end: int


@dataclass(frozen=True)
class MemoryTimeline:
    """Live bytes above the resident ones while each node runs, and where they peak.

    positions: ``"forward:<node>"`` / ``"backward:<node>"`` for every node that runs.
    """

    positions: list[str]
    live_bytes: list[int]
    intervals: list[Interval]
    resident_bytes: int
    host_peak_bytes: int = 0  # offloaded copies in host memory, at most at once

    @property
    def peak_bytes(self) -> int:
        return max(self.live_bytes, default=0)

    @property
    def peak_at(self) -> str:
        if not self.live_bytes:
            return ""
        return self.positions[self.live_bytes.index(self.peak_bytes)]

    def live_at_peak(self) -> list[Interval]:
        """The storages live at the peak, largest first: what to cut to lower it."""
        at = self.live_bytes.index(self.peak_bytes) if self.live_bytes else -1
        live = [i for i in self.intervals if i.start <= at <= i.end]
        return sorted(live, key=lambda i: -i.nbytes)


def running_nodes(graph: fx.Graph) -> list[fx.Node]:
    """The nodes of an extracted graph that run (neither its inputs nor its output)."""
    return [n for n in graph.nodes if n.op not in ("placeholder", "output")]


def graph_fusion(graph: fx.Graph, forward: fx.Graph | None = None) -> Fusion:
    """How Inductor compiles an extracted graph: its running nodes, returning its
    outputs; ``forward``: the graph whose saved values a backward reads."""
    inputs_channels_last = forward is not None and lays_out_channels_last(running_nodes(forward))
    return fuse(running_nodes(graph), _outputs(graph), inputs_channels_last=inputs_channels_last, backward=forward is not None)


def step_fusions(forward: fx.Graph, backward: fx.Graph | None = None) -> list[Fusion]:
    """``graph_fusion`` of each graph of a step, in order. The fusion model is the
    costliest part of a fused simulation, so a caller that simulates and times the
    same graphs computes this once and hands it to each."""
    return [graph_fusion(forward)] + ([graph_fusion(backward, forward)] if backward is not None else [])


@dataclass(eq=False, slots=True)
class _Storage:
    """A storage's bytes and the positions it is live at. ``kind``: what Inductor's
    reuse pool matches a freed buffer on (dtype and size), for storages a graph makes;
    None for its inputs. ``pooled``: Inductor's wrapper allocates it, so it may take
    a pooled buffer (``fusion.wrapper_allocates``)."""

    label: str
    nbytes: int
    start: int
    end: int
    kind: tuple[torch.dtype, object] | None = None
    pooled: bool = False


def _reuse_kind(node: fx.Node, tensor: torch.Tensor) -> tuple[torch.dtype, object] | None:
    """The pool key of a storage ``node`` allocates: dtype and (symbolic) byte size,
    as ``wrapper.buffer_reuse_key`` (a size is not matched to a different expression
    with the same hint)."""
    if node.op == "placeholder":
        return None
    nbytes = tensor.untyped_storage().nbytes()
    return tensor.dtype, str(nbytes) if isinstance(nbytes, torch.SymInt) else nbytes


def simulate_step(
    forward: fx.Graph,
    backward: fx.Graph | None = None,
    *,
    num_user_outputs: int | None = None,
    fused: bool = False,
    buffer_pool: bool = False,
    fusions: Sequence[Fusion] | None = None,
) -> MemoryTimeline:
    """The memory timeline of ``forward`` then ``backward`` (partitioned graphs whose
    values share fake tensors, as AOTAutograd's partitioner makes them). The first
    ``num_user_outputs`` forward outputs are the caller's; the rest are saved values.
    ``fused``: each graph compiled by Inductor, not run op by op; ``buffer_pool``: with
    the wrapper's buffer pool, as Inductor compiles by default; ``fusions``:
    ``step_fusions(forward, backward)``, where the caller has it already."""
    graphs = [("forward", forward)] + ([("backward", backward)] if backward is not None else [])
    positions: list[str] = []
    where: dict[fx.Node, int] = {}
    for name, graph in graphs:
        for node in running_nodes(graph):
            where[node] = len(positions)
            positions.append(f"{name}:{node.name}")
    last = len(positions) - 1

    resident: dict[int, int] = {}
    for node in forward.find_nodes(op="placeholder"):
        resident.update(node_storages(node))
    device = graph_device(forward)

    # Storages are told apart by graph: the backward's recomputed ops carry the fake
    # tensors of the forward ops they repeat, but allocate anew. Only the backward's
    # inputs (saved values, and views of them) are the forward's storages.
    storages: dict[tuple[int, int], _Storage] = {}
    copies: list[Interval] = []
    returned_copies: dict[int, _Storage] = {}  # by the storage of the input copied
    if not fused:
        fusions = [_UNFUSED] * len(graphs)
    elif fusions is None:
        fusions = step_fusions(forward, backward)
    fused_graphs: list[tuple[Fusion, dict[fx.Node, int], Callable[[fx.Node], _Storage | None]]] = []
    spans: list[tuple[int, int]] = []  # first and last position of each graph
    graph_start = 0
    for index, (name, graph) in enumerate(graphs):
        nodes = running_nodes(graph)
        graph_end = graph_start + len(nodes) - 1
        fusion = fusions[index]
        runs_at = _kernel_positions(fusion, {n: where[n] for n in nodes})
        read_at = read_positions(nodes, runs_at, fusion)
        copies.extend(_copies(fusion, runs_at))
        if index == 0:
            for value, convolution in fusion.returned_copies.items():
                at = runs_at[convolution]
                for tensor in tensors_in(value.meta.get("val")):
                    returned_copies[storage_key(tensor)] = _Storage(f"copy of {value.name}", storage_bytes(tensor), at, at)
        handed_over = {
            storage_key(t)
            for node in graph.find_nodes(op="placeholder")
            for t in tensors_in(node.meta.get("val"))
        }

        def storage_of(node: fx.Node, index: int = index, handed_over: set[int] = handed_over) -> _Storage | None:
            if node.op == "placeholder" and is_tangent(node):
                return None  # autograd's, not the graph's to write over
            ref = _only_storage(node)
            return storages.get((index - 1, ref) if index and ref in handed_over else (index, ref))

        fused_graphs.append((fusion, runs_at, storage_of))
        for node in graph.nodes:
            if node.op == "output" or node in fusion.inlined:
                continue
            born = graph_start if node.op == "placeholder" else runs_at[node]
            dies = max((read_at.get((node, u), graph_end) for u in node.users), default=born)
            for tensor in tensors_in(node.meta.get("val")):
                ref = storage_key(tensor)
                if ref in returned_copies:  # the copy lives as long as the input's readers
                    returned_copies[ref].end = max(returned_copies[ref].end, dies)
                if ref in resident or tensor.device != device:  # host copies are not device memory
                    continue
                key = (index - 1, ref) if index and ref in handed_over else (index, ref)
                storage = storages.get(key)
                if storage is None:
                    storages[key] = _Storage(
                        node.name, storage_bytes(tensor), born, dies, _reuse_kind(node, tensor), wrapper_allocates(node, fusion)
                    )
                else:
                    storage.end = max(storage.end, dies)
        spans.append((graph_start, graph_end))
        graph_start = graph_end + 1
    _keep_forward_outputs_to_end(forward, backward, storages, last, num_user_outputs)
    if fused:
        for (fusion, runs_at, storage_of), (first, final) in zip(fused_graphs, spans):
            _share_cat_buffers(fusion, storage_of)
            consumed = _write_in_place(fusion, runs_at, storage_of)
            if buffer_pool:
                _reuse_freed_buffers(storages.values(), first, final, consumed)

    kept = [*storages.values(), *returned_copies.values()]
    intervals = [Interval(s.label, s.nbytes, s.start, s.end) for s in kept] + copies
    scratch_of = fused_workspace_bytes if fused else workspace_bytes
    for node, position in where.items():
        if scratch := scratch_of(node):
            intervals.append(Interval(f"workspace of {node.name}", scratch, position, position))
    return MemoryTimeline(positions, _sum_intervals(intervals, len(positions)), intervals, sum(resident.values()))


def order_fusions(order: StepOrder) -> tuple[Fusion, Fusion]:
    """How Inductor compiles the forward and the backward graph of ``order``."""
    backward = fuse(order.backward, order.gradients, inputs_channels_last=lays_out_channels_last(order.forward), backward=True)
    return fuse(order.forward, {*order.saved, *order.user_outputs}), backward


def simulate_order(
    order: StepOrder,
    fused: bool = False,
    offloads: Mapping[fx.Node, Window] | None = None,
    host_is_device: bool = False,
    fusions: tuple[Fusion, Fusion] | None = None,
) -> MemoryTimeline:
    """The memory timeline of the partition described by ``order`` (see
    ``passes.schedule``), straight from the joint graph: the same accounting as
    ``simulate_step`` on the extracted graphs, without extracting them.

    ``offloads``: saved values moved to host memory between the passes, with their
    windows (``cost_models.transfers``): on the device until ``freed_after``, and
    again from ``reload_at`` to their last use. Their host copies live from the
    offload to the reload; they count as device memory when ``host_is_device`` (a
    step on the CPU), else as ``host_peak_bytes``.

    ``fused``: both graphs compiled by Inductor rather than run op by op
    (``cost_models.fusion``): the values it inlines into their readers take no memory,
    fused kernels run together. The positions stay one per node (an inlined value's
    position allocates nothing), so timelines of both kinds line up. ``fusions``:
    ``order_fusions(order)``, where the caller has it already."""
    steps = [("forward", n) for n in order.forward] + [("backward", n) for n in order.backward]
    positions = [f"{phase}:{node.name}" for phase, node in steps]
    last = len(steps) - 1
    backward_start = len(order.forward)
    if not fused:
        fw_fusion = bw_fusion = _UNFUSED
    else:
        fw_fusion, bw_fusion = fusions or order_fusions(order)
    fw_at = _kernel_positions(fw_fusion, {node: i for i, node in enumerate(order.forward)})
    bw_at = _kernel_positions(bw_fusion, {node: backward_start + i for i, node in enumerate(order.backward)})
    saved = set(order.saved)
    fw_inlined, bw_inlined = fw_fusion.inlined, bw_fusion.inlined
    fw_read_at = read_positions(order.forward, fw_at, fw_fusion)
    bw_read_at = read_positions(order.backward, bw_at, bw_fusion)

    # The last position reading each value: forward reads of forward values; backward
    # reads of the backward's own values, or of the saved values and inputs it receives.
    # An inlined value reads its inputs where its last reader runs.
    fw_last: dict[fx.Node, int] = {}
    bw_last: dict[fx.Node, int] = {}
    handed: dict[fx.Node, int] = {}
    for (arg, _), at in fw_read_at.items():
        if at > fw_last.get(arg, -1):  # positions are never negative
            fw_last[arg] = at
    for (arg, _), at in bw_read_at.items():
        target = bw_last if arg in bw_at else handed
        if at > target.get(arg, -1):
            target[arg] = at

    resident: dict[int, int] = {}
    inputs: list[fx.Node] = []
    for node in order.forward[0].graph.find_nodes(op="placeholder") if order.forward else []:
        if is_primal(node):
            resident.update(node_storages(node))
        else:
            inputs.append(node)  # tangents: handed to the backward by autograd

    storages: dict[tuple[int, int], _Storage] = {}
    handed_over: set[int] = set()
    offloads = offloads or {}
    reloaded = {storage_key(t) for node in offloads for t in tensors_in(node.meta.get("val"))}

    def live(node: fx.Node, phase: int, born: int, dies: int) -> None:
        for ref, nbytes in node_storages(node):
            if ref in resident:
                continue
            key = (0, ref) if phase == 0 or ref in handed_over else (1, ref)
            if phase == 1 and ref in reloaded:
                key = (2, ref)  # the backward reads the reloaded copy
            storage = storages.get(key)
            if storage is None:
                storages[key] = _Storage(node.name, nbytes, born, dies)
            else:
                storage.start = min(storage.start, born)
                storage.end = max(storage.end, dies)

    for node in (*saved, *inputs):
        handed_over.update(ref for ref, _ in node_storages(node))
    for node, at in fw_at.items():
        if node in fw_inlined:
            continue
        dies = fw_last.get(node, at)
        if node in offloads:
            dies = max(dies, offloads[node].freed_after)
        elif node in saved:
            dies = max(dies, handed.get(node, backward_start))
        live(node, 0, at, dies)
    host: list[Interval] = []
    for node, window in offloads.items():
        nbytes = sum(storage_bytes(t) for t in tensors_in(node.meta.get("val")))
        storages[2, storage_key(tensors_in(node.meta.get("val"))[0])] = _Storage(
            f"reload of {node.name}", nbytes, window.reload_at, handed.get(node, window.reload_at)
        )
        host.append(Interval(f"host copy of {node.name}", nbytes, fw_at[node], window.reload_at))
    for node in saved:
        if node.op == "placeholder" and node in handed:
            live(node, 0, backward_start, handed[node])
    for node in inputs:
        if node in handed:
            live(node, 0, backward_start, handed[node])
    for node, at in bw_at.items():
        if node not in bw_inlined:
            live(node, 1, at, bw_last.get(node, at))
    for node in order.user_outputs:
        live(node, 0, fw_at.get(node, 0), last)
    for node in order.gradients:
        if node in bw_at:
            live(node, 1, bw_at[node], last)
    if fused:
        tangents = set(inputs)

        def storage_of(node: fx.Node, phase: int) -> _Storage | None:
            ref = _only_storage(node)
            return None if node in tangents else storages.get((0, ref) if phase == 0 or ref in handed_over else (1, ref))

        for fusion, at, phase in ((fw_fusion, fw_at, 0), (bw_fusion, bw_at, 1)):
            _share_cat_buffers(fusion, lambda node, phase=phase: storage_of(node, phase))
            _write_in_place(fusion, at, lambda node, phase=phase: storage_of(node, phase))

    intervals = [Interval(s.label, s.nbytes, s.start, s.end) for s in storages.values()]
    intervals += _copies(fw_fusion, fw_at) + _copies(bw_fusion, bw_at)
    for value, convolution in fw_fusion.returned_copies.items():
        end = max(backward_start - 1, handed.get(value, 0))
        intervals += [
            Interval(f"copy of {value.name}", storage_bytes(t), fw_at[convolution], end)
            for t in tensors_in(value.meta.get("val"))
        ]
    scratch_of = fused_workspace_bytes if fused else workspace_bytes
    for node, at in itertools.chain(fw_at.items(), bw_at.items()):
        if scratch := scratch_of(node):
            intervals.append(Interval(f"workspace of {node.name}", scratch, at, at))
    if host_is_device:
        intervals.extend(host)
    host_peak = 0 if host_is_device else max(_sum_intervals(host, len(positions)), default=0)
    return MemoryTimeline(
        positions, _sum_intervals(intervals, len(positions)), intervals, sum(resident.values()), host_peak
    )


_UNFUSED = Fusion(set(), {}, {}, {}, {}, {}, {}, {})


def _copies(fusion: Fusion, position: Mapping[fx.Node, int]) -> list[Interval]:
    """The channels-last copies convolutions read (``Fusion.copies``): each made where
    the value it copies is, and freed after its convolution."""
    return [
        Interval(f"copy of {arg.name} for {reader.name}", tensor_size(arg.meta["val"]).hint, position[value], position[reader])
        for (arg, reader), value in fusion.copies.items()
    ]


def _kernel_positions(fusion: Fusion, position: dict[fx.Node, int]) -> dict[fx.Node, int]:
    """Where each node runs: a kernel fused into an earlier one, there; a node that a
    fused kernel pulls ahead, with the node it now runs just before."""
    placed = {node: position[before] for node, before in fusion.pulled.items()}
    for node, first in fusion.runs_with.items():
        position[node] = position[first]
    position.update(placed)
    return position


def _only_storage(node: fx.Node) -> int | None:
    tensors = tensors_in(node.meta.get("val"))
    return storage_key(tensors[0]) if len(tensors) == 1 else None


def _share_cat_buffers(fusion: Fusion, storage_of: Callable[[fx.Node], _Storage | None]) -> None:
    """A value written straight into its slice of a concatenation (``Fusion.into_cat``)
    takes no bytes of its own: the concatenation's buffer is allocated where the first
    such value is made."""
    for value, cat in fusion.into_cat.items():
        part, whole = storage_of(value), storage_of(cat)
        if part is None or whole is None:
            continue
        whole.start = min(whole.start, part.start)
        part.nbytes, part.kind = 0, None


def _write_in_place(
    fusion: Fusion, position: Mapping[fx.Node, int], storage_of: Callable[[fx.Node], _Storage | None]
) -> list[_Storage]:
    """A kernel that reads a stored input for the last time, elementwise at its own
    index, writes its result over it (``Fusion.in_place``): end the input's storage
    just before the kernel, so the two are never counted together; an input made at
    the kernel's own position (pulled ahead of it, ``Fusion.pulled``) takes no bytes
    of its own, the result's are its. Parameters and inputs are resident (no storage
    here); tangents are never written over. Returns the storages written over (not
    freed, so never pooled)."""
    consumed = []
    for node, candidates in fusion.in_place.items():
        result, at = storage_of(node), position[node]
        if result is None or result.start != at:
            continue
        for candidate in candidates:
            storage = storage_of(candidate)
            if storage is not None and storage is not result and storage.start <= at == storage.end and storage.nbytes == result.nbytes:
                if storage.start == at:
                    storage.nbytes = 0
                else:
                    storage.end = at - 1
                consumed.append(storage)
                break
    return consumed


def _reuse_freed_buffers(storages: Iterable[_Storage], first: int, last: int, consumed: Collection[_Storage]) -> None:
    """Inductor's reuse pool, over one graph (positions ``first`` to ``last``): the
    wrapper does not free a buffer after its last reader but pools it
    (``FreeIfNotReusedLine``); the next allocation of the same dtype and size takes
    the most recently pooled one (``AllocateLine.plan``), which stays allocated in
    between, if its own peak estimate (``memory.estimate_peak_memory``: the buffers
    the graph allocates, and the saved values it receives, each to its last reader;
    parameters and tangents not counted) would not rise by it. That estimate counts a
    value written over in place up to its writer, and no scratch, so it can allow a
    hold across the real peak: on a 6-layer GPT's backward, 1.24 MiB more (42.88 MiB,
    as a replay of the allocations in the generated code gives). The graph's outputs
    and inputs are never pooled; storages written over in place are taken."""
    span = last - first + 1
    if span <= 0:
        return
    made = sorted((s for s in storages if s.kind is not None and first <= s.start <= last), key=lambda s: s.start)
    received = [s for s in storages if s.kind is not None and s.start < first <= s.end]
    taken = set(consumed)
    delta = np.zeros(span + 1, dtype=np.int64)
    for storage in (*made, *received):
        # the estimate counts a value written over in place up to the kernel that does it
        end = min(storage.end + (storage in taken), last)
        delta[max(storage.start, first) - first] += storage.nbytes
        delta[end - first + 1] -= storage.nbytes
    estimate = np.cumsum(delta[:span])
    ceiling = int(estimate.max())
    allocated: dict[int, list[_Storage]] = {}
    freed: dict[int, list[_Storage]] = {}
    for storage in made:
        allocated.setdefault(storage.start, []).append(storage)
        if storage.end < last and storage not in taken:
            freed.setdefault(storage.end, []).append(storage)
    pool: dict[tuple[torch.dtype, object], list[_Storage]] = {}
    for at in sorted(allocated.keys() | freed.keys()):
        for storage in allocated.get(at, ()):
            candidates = pool.get(storage.kind) if storage.pooled else None
            if not candidates:
                continue
            held = candidates.pop()
            between = estimate[held.end + 1 - first : at - first]
            if storage.nbytes + (int(between.max()) if between.size else 0) > ceiling:
                candidates.append(held)
                continue
            between += storage.nbytes
            held.end = at - 1
        for storage in freed.get(at, ()):
            pool.setdefault(storage.kind, []).append(storage)


def _outputs(graph: fx.Graph) -> list[fx.Node]:
    (output_node,) = graph.find_nodes(op="output")
    return [v for v in leaves(output_node.args[0] if output_node.args else ()) if isinstance(v, fx.Node)]


def _keep_forward_outputs_to_end(
    forward: fx.Graph,
    backward: fx.Graph | None,
    storages: dict[tuple[int, int], _Storage],
    last: int,
    num_user_outputs: int | None,
) -> None:
    """The forward's user outputs (the loss, the model's outputs) go back to the caller
    and outlive both graphs, even when the backward reads them too. The rest are saved
    for the backward and die at their last use there. Without ``num_user_outputs``,
    every output the backward does not read is taken for a user output. (The
    backward's outputs, the gradients, already live to the end: the output node is
    their last use.)"""
    outputs = _outputs(forward)
    if num_user_outputs is not None:
        user = outputs[:num_user_outputs]
    else:
        read_by_backward = set()
        if backward is not None:
            for node in backward.find_nodes(op="placeholder"):
                read_by_backward.update(storage_key(t) for t in tensors_in(node.meta.get("val")))
        user = [v for v in outputs if not any(storage_key(t) in read_by_backward for t in tensors_in(v.meta.get("val")))]
    for value in user:
        for tensor in tensors_in(value.meta.get("val")):
            if (0, key := storage_key(tensor)) in storages:
                storages[0, key].end = last


def _sum_intervals(intervals: Iterable[Interval], length: int) -> list[int]:
    """Live bytes at each position: a difference array, then a running sum."""
    delta = [0] * (length + 1)
    for interval in intervals:
        delta[interval.start] += interval.nbytes
        delta[interval.end + 1] -= interval.nbytes
    return list(itertools.accumulate(delta[:length]))
