"""Work per FX node: FLOPs from torch.utils.flop_counter, element count otherwise."""

from __future__ import annotations

import torch.fx as fx
import torch.utils._pytree as pytree
from torch.utils.flop_counter import flop_registry

from remat._torch_internals import size_hint
from remat.cost_models.sizes import node_tensor


def node_flops(node: fx.Node) -> int:
    """FLOPs of a node's op (at the shape hints); 0 when flop_counter has no formula."""
    if node.op != "call_function":
        return 0
    formula = flop_registry.get(getattr(node.target, "overloadpacket", None))
    if formula is None:
        return 0
    args, kwargs = pytree.tree_map(
        lambda a: a.meta.get("val") if isinstance(a, fx.Node) else a, (node.args, node.kwargs)
    )
    flops = formula(*args, **kwargs, out_val=node.meta.get("val"))
    return size_hint(flops)


def _elements(node: fx.Node) -> int:
    value = node_tensor(node)
    return size_hint(value.numel()) if value is not None else 0


def recompute_cost(node: fx.Node) -> int:
    """Relative cost of computing a node again: its FLOPs, or for memory-bound ops the
    elements it reads and writes (a reduction reads far more than it writes)."""
    moved = _elements(node) + sum(_elements(a) for a in node.all_input_nodes)
    return max(node_flops(node), moved)
