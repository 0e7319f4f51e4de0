"""Sizes of the tensors in an FX graph.

Shapes may be symbolic (``dynamic=True``): sizes are kept as sympy expressions, so a
plan can say how memory scales with the batch, and evaluated with the shape hints
(the sizes seen when the graph was traced) where a number is needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import sympy
import torch
import torch.fx as fx
from torch.multiprocessing.reductions import StorageWeakRef

from remat._torch_internals import size_hint, storage_key, sym_expr
from remat.cost_models.node_memo import per_node


@dataclass(frozen=True)
class Size:
    """A number of bytes: the symbolic expression and its value at the shape hints."""

    expr: sympy.Expr
    hint: int

    def __str__(self) -> str:
        return str(self.expr)


def as_size(value: int | torch.SymInt, scale: int = 1) -> Size:
    """Wrap an int or SymInt (times ``scale``) as a Size."""
    if isinstance(value, torch.SymInt):
        return Size(sympy.sympify(sym_expr(value)) * scale, size_hint(value) * scale)
    return Size(sympy.Integer(int(value) * scale), int(value) * scale)


def tensor_size(value: torch.Tensor) -> Size:
    """Bytes of a tensor's own elements (numel x itemsize)."""
    return as_size(value.numel(), value.element_size())


@per_node
def tensor_bytes(node: fx.Node) -> tuple[int, ...]:
    """Bytes of the elements of each tensor a node makes (at the shape hints)."""
    return tuple(tensor_size(t).hint for t in tensors_in(node.meta.get("val")))


@per_node
def value_bytes(node: fx.Node) -> int:
    """Bytes of the elements of the tensors a node makes (at the shape hints)."""
    return sum(tensor_bytes(node))


def storage_size(value: torch.Tensor) -> Size:
    """Bytes of the storage a tensor lives in: what keeping the tensor alive costs."""
    return as_size(value.untyped_storage().nbytes())


def storage_bytes(value: torch.Tensor) -> int:
    """``storage_size`` as a plain int (its hint): for the simulator's hot loops."""
    return size_hint(value.untyped_storage().nbytes())


@per_node
def node_storages(node: fx.Node) -> tuple[tuple[int, int], ...]:
    """(``storage_key``, ``storage_bytes``) of each tensor a node makes, in order: the
    simulator asks for them at every node of every plan."""
    return tuple((storage_key(t), storage_bytes(t)) for t in tensors_in(node.meta.get("val")))


def contiguous_at_hints(value: torch.Tensor, order: Sequence[int] | None = None) -> bool:
    """Whether ``value``, its dimensions taken in ``order`` (default: as they are), is
    contiguous. Read at the hints, as ``packed_strides``: deciding must not add guards."""
    expected = 1
    for dim in reversed(range(value.dim()) if order is None else order):
        size = size_hint(value.shape[dim])
        if size != 1 and size_hint(value.stride()[dim]) != expected:
            return False
        expected *= size
    return True


def packed_strides(value: torch.Tensor) -> bool:
    """Whether the elements sit side by side, with no gaps and no overlaps, in some
    order of the dimensions (row-major, channels-last, ...). Read at the hints:
    deciding must not add guards (a guard would specialize the compiled graph)."""
    expected = 1
    for stride, size in sorted((size_hint(st), size_hint(sz)) for sz, st in zip(value.shape, value.stride()) if size_hint(sz) != 1):
        if stride != expected:
            return False
        expected *= size
    return True


@per_node
def node_storage_bytes(node: fx.Node) -> int:
    """``storage_bytes`` of the tensor a node makes; 0 for anything else."""
    value = node.meta.get("val")
    return storage_bytes(value) if isinstance(value, torch.Tensor) else 0


def node_tensor(node: fx.Node) -> torch.Tensor | None:
    """The (fake) tensor a node produces, or None for non-tensor nodes."""
    value = node.meta.get("val")
    return value if isinstance(value, torch.Tensor) else None


def leaves(value: object) -> list[object]:
    """The items of a (nested) tuple or list, in order; a single value for anything else."""
    if isinstance(value, (tuple, list)):
        return [leaf for item in value for leaf in leaves(item)]
    return [value]


def tensors_in(value: object) -> list[torch.Tensor]:
    """The tensors in a node's value: itself, or those in its (nested) tuple or list."""
    return [t for t in leaves(value) if isinstance(t, torch.Tensor)]


def graph_device(graph: fx.Graph) -> torch.device:
    """Where a graph computes: the first accelerator a tensor of it is on, else the CPU
    (host copies of offloaded values and CPU scalars live beside device tensors)."""
    for node in graph.nodes:
        value = node_tensor(node)
        if value is not None and value.device.type not in ("cpu", "meta"):
            return value.device
    return torch.device("cpu")


def unique_storage_size(nodes: Sequence[fx.Node], exclude: Sequence[fx.Node] = ()) -> Size:
    """Bytes of the distinct storages behind ``nodes``, skipping storages of ``exclude``.

    Views share their base's storage and count once; values that alias an excluded
    node (say, a transposed parameter) cost nothing extra.
    """
    excluded = {StorageWeakRef(t.untyped_storage()) for t in map(node_tensor, exclude) if t is not None}
    seen: dict[StorageWeakRef, Size] = {}
    for node in nodes:
        value = node_tensor(node)
        if value is None:
            continue
        ref = StorageWeakRef(value.untyped_storage())
        if ref not in excluded:
            seen[ref] = storage_size(value)
    return Size(sympy.Add(*(size.expr for size in seen.values())), sum(size.hint for size in seen.values()))


def human_bytes(n: float) -> str:
    """Bytes for messages: in the largest binary unit under ``n`` (``"1.50 MiB"``)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"
