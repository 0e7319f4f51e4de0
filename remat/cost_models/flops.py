"""Work per FX node: FLOPs from torch.utils.flop_counter, element count otherwise."""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.utils.flop_counter import flop_registry, register_flop_formula, sdpa_backward_flop_count, sdpa_flop_count

from remat._torch_internals import size_hint
from remat.cost_models.sizes import node_tensor

# flop_counter counts the CUDA attention kernels but not the CPU one, which graphs
# traced on a CPU without decompositions (exported programs) call for every attention.
_cpu_flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_cpu_flash_backward = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)

if _cpu_flash is not None and _cpu_flash not in flop_registry:

    @register_flop_formula(_cpu_flash)
    def _cpu_flash_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)


if _cpu_flash_backward is not None and _cpu_flash_backward not in flop_registry:

    @register_flop_formula(_cpu_flash_backward)
    def _cpu_flash_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


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
