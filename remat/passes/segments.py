"""Cut the forward into a chain of segments, the units the budgeted solver decides on.

A layer boundary is a point of the forward where little memory crosses: after a
transformer block's residual add only the residual stream is still needed by what
follows; inside the block, many more values are. The forward's nodes are laid out
in the joint graph's order; at each point the bytes of the values made before it and
read after it are summed, and the boundaries are the valleys of that curve (local
minima that stand out by at least a tenth of their own height, found with scipy's
``find_peaks``) and lie about as low as the valleys around them; a valley moves back
to the output of the heavy op (matmul, convolution) before it when no more bytes cross
there. Skip connections (U-Net, residual branches) simply raise the
valleys: the values they carry cross several boundaries and are inputs of the
segments that read them. Where a skip connection leaves a segment no more bytes cross
than at the boundary before it, and that point is a boundary too (``_skip_exits``).

Segments with the same structure (the repeated layers of a model) share a signature,
so their per-segment problems are solved once.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch.fx as fx
from scipy.signal import find_peaks

from remat._torch_internals import JointInfo, storage_key
from remat.cost_models.sizes import storage_size, tensors_in
from remat.passes.recompute_rules import is_heavy, is_view

MAX_SEGMENTS = 160
PROMINENCE = 0.1
DEPTH_RATIO = 1.5
NEIGHBOURS = 4
SNAP_TOLERANCE = 0.01


@dataclass(frozen=True)
class Segment:
    """A run of forward nodes, and the values from before it that it reads (views
    resolved to their base: what keeping them costs)."""

    index: int
    nodes: tuple[fx.Node, ...]
    inputs: tuple[fx.Node, ...]
    signature: tuple


def forward_nodes(graph: fx.Graph, info: JointInfo) -> list[fx.Node]:
    return [n for n in graph.nodes if n.op == "call_function" and n in info.required_fw]


def base_of(node: fx.Node) -> fx.Node:
    """The node whose storage a chain of views reads."""
    while is_view(node) and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def crossing_bytes(forward: Sequence[fx.Node]) -> np.ndarray:
    """For each point after ``forward[i]``: bytes of the storages made at or before it
    and read by a forward node after it."""
    at = {node: i for i, node in enumerate(forward)}
    born: dict[int, int] = {}
    last: dict[int, int] = {}
    size: dict[int, int] = {}
    for node in forward:
        for tensor in tensors_in(node.meta.get("val")):
            key = storage_key(tensor)
            if key not in born and node.op == "call_function":
                born[key], last[key], size[key] = at[node], at[node], storage_size(tensor).hint
    for node in forward:
        for arg in node.all_input_nodes:
            for tensor in tensors_in(arg.meta.get("val")):
                key = storage_key(tensor)
                if key in born:
                    last[key] = max(last[key], at[node])
    delta = np.zeros(len(forward) + 1, dtype=np.float64)
    for key, start in born.items():
        if last[key] > start:
            delta[start] += size[key]
            delta[last[key]] -= size[key]
    return np.cumsum(delta[:-1])


def find_segments(graph: fx.Graph, info: JointInfo, max_segments: int = MAX_SEGMENTS) -> list[Segment]:
    """The chain of segments of the forward of ``graph``, in order."""
    forward = forward_nodes(graph, info)
    if not forward:
        return []
    crossing = crossing_bytes(forward)
    valleys, props = find_peaks(-crossing, prominence=(PROMINENCE * crossing, None), plateau_size=1)
    valleys = _deepest(valleys, crossing[valleys])
    valleys = _after_heavy_ops(valleys, crossing, forward)
    valleys = _skip_exits(valleys, crossing, forward)
    if len(valleys) >= max_segments:
        valleys = np.sort(valleys[np.argsort(crossing[valleys], kind="stable")[: max_segments - 1]])
    ends = [int(v) + 1 for v in valleys] + [len(forward)]
    starts = [0] + ends[:-1]
    runs = [list(forward[start:end]) for start, end in zip(starts, ends)]
    _attach_unclaimed(graph, info, runs)
    segments = []
    for index, run in enumerate(runs):
        nodes = tuple(run)
        members = set(nodes)
        bases = (base_of(a) for node in nodes for a in node.all_input_nodes if a not in members)
        inputs = dict.fromkeys(b for b in bases if b.op == "call_function" and b not in members)
        segments.append(Segment(index, nodes, tuple(inputs), _signature(nodes, info)))
    return segments


def _deepest(valleys: np.ndarray, heights: np.ndarray) -> np.ndarray:
    """The valleys at most ``DEPTH_RATIO`` times as high as the lowest of their
    ``NEIGHBOURS`` neighbours on either side: between two residual adds lie valleys
    too (after an MLP's activation, say), but several times higher."""
    keep = [
        i for i in range(len(valleys))
        if heights[i] <= DEPTH_RATIO * heights[max(0, i - NEIGHBOURS) : i + NEIGHBOURS + 1].min()
    ]
    return valleys[keep]


def _after_heavy_ops(valleys: np.ndarray, crossing: np.ndarray, forward: Sequence[fx.Node]) -> np.ndarray:
    """Each valley moved back to the output of the nearest heavy op before it, where as
    few bytes cross. In conv -> norm -> activation -> conv, the bytes crossing after the
    conv, the norm and the activation are alike, but only a boundary at the conv's
    output lets a kept segment input (that output) be the one value its layer keeps: the
    norm and activation after it are recomputed from it, as checkpointing by hand does."""
    heavy = [i for i, node in enumerate(forward) if is_heavy(node)]
    moved = set()
    for valley in valleys.tolist():
        before = bisect.bisect_right(heavy, valley)  # heavy[before - 1] is the nearest at or before it
        if before and crossing[heavy[before - 1]] <= crossing[valley] * (1 + SNAP_TOLERANCE):
            moved.add(heavy[before - 1])
        else:
            moved.add(valley)
    return np.array(sorted(moved), dtype=valleys.dtype)


def _skip_exits(boundaries: np.ndarray, crossing: np.ndarray, forward: Sequence[fx.Node]) -> np.ndarray:
    """``boundaries`` and the points right after a value that a later segment reads
    (a skip connection), where no more bytes cross than at the segment's start. A U-Net
    encoder level runs conv -> GroupNorm -> SiLU, and the SiLU's output leaves for the
    decoder's concatenation: a boundary at the conv's output alone makes a plan keep
    both the conv output (the input of a recomputed group) and the SiLU output (read by
    the decoder), while one after the SiLU lets a recomputed group that follows keep
    the SiLU output alone. On the U-Net of the budget sweep, the model's lowest plan
    simulated at 46.16 MiB with these boundaries, 48.16 MiB without (issue 4)."""
    position = {node: i for i, node in enumerate(forward)}
    ends = sorted(boundaries.tolist())
    found = set(ends)
    for i, node in enumerate(forward):
        later = bisect.bisect_left(ends, i)  # ends[later] closes the segment of node i
        if i in found or later == len(ends) or is_view(node):
            continue
        start = crossing[ends[later - 1]] if later else 0.0
        read_later = any(position.get(user, -1) > ends[later] for user in node.users)
        if read_later and crossing[i] <= start * (1 + SNAP_TOLERANCE):
            found.add(i)
    return np.array(sorted(found), dtype=boundaries.dtype)


def _attach_unclaimed(graph: fx.Graph, info: JointInfo, runs: list[list[fx.Node]]) -> None:
    """Nodes that only forward values feed but only the backward reads (the
    partitioner calls them unclaimed) may be kept or recomputed like forward nodes:
    each joins the segment of its latest input, or, where only unclaimed nodes of
    later segments read it (a late backward copy's embedding lookup and LayerNorm
    statistics, read by its normalization in the next segment), the earliest of
    theirs: as an input of that segment it would be kept."""
    segment_of = {node: i for i, run in enumerate(runs) for node in run}
    unclaimed = []
    for node in graph.nodes:
        if node.op != "call_function" or node in info.required_fw or node in info.required_bw:
            continue
        owners = [segment_of[a] for a in node.all_input_nodes if a in segment_of]
        if owners:
            segment_of[node] = max(owners)
            unclaimed.append(node)
    moved: dict[fx.Node, int] = {}
    for node in reversed(unclaimed):
        readers = [moved.get(u, segment_of.get(u)) for u in node.users]
        if readers and None not in readers and min(readers) > segment_of[node]:
            moved[node] = min(readers)
    for node in unclaimed:
        runs[moved.get(node, segment_of[node])].append(node)


def _signature(nodes: Sequence[fx.Node], info: JointInfo) -> tuple:
    """Equal for segments whose per-segment problems are the same up to renaming."""
    local = {node: i for i, node in enumerate(nodes)}
    outside: dict[fx.Node, int] = {}
    counter = itertools.count()

    def ref(value: object) -> object:
        if isinstance(value, fx.Node):
            if value in local:
                return ("in", local[value])
            if value not in outside:
                outside[value] = next(counter)
            return ("ext", outside[value], _describe(value))
        if isinstance(value, (tuple, list)):
            return tuple(ref(v) for v in value)
        return repr(value)

    return tuple(
        (
            str(node.target),
            ref(node.args),
            ref(tuple(sorted(node.kwargs.items()))),
            _describe(node),
            node in info.required_bw,
            any(u not in info.required_fw for u in node.users),
            node.meta.get("recompute") is not None,
        )
        for node in nodes
    )


def _describe(node: fx.Node) -> tuple:
    return tuple((str(tuple(t.shape)), str(t.dtype), str(t.stride())) for t in tensors_in(node.meta.get("val")))


def remap(saved: Sequence[fx.Node], source: Segment, target: Segment) -> list[fx.Node]:
    """``source``'s solution, applied to ``target`` (same signature)."""
    position = {node: i for i, node in enumerate(source.nodes)}
    return [target.nodes[position[node]] for node in saved]

