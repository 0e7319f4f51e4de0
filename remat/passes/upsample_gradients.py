"""Nearest-upsampling gradients as window sums, not scatter-adds.

AOTAutograd traces ``F.interpolate(mode="nearest")`` (``nn.Upsample``) through its
decomposition, an ``_unsafe_index`` gather, so its gradient reaches the joint graph as
``index_put(zeros, [None, None, rows, cols], grad, accumulate=True)``. Inductor
compiles that to a zero fill and one read-modify-write per gradient element. Where the
gradient is channels-last (a CPU backward reading channels-last convolutions) those
writes stride across the channels of an NCHW buffer: 27.6 ms for a (8, 64, 64, 64)
gradient on one CPU thread, where ``aten.upsample_nearest2d_backward`` takes 0.29 ms
(``benchmarks/results/upsample_gradient.md``). That op is the same sum, the one eager
PyTorch computes for this gradient; Inductor lowers it to a sum over each output
element's window, read straight from the gradient and inlined into its readers.

The rewrite is made only where it is provably the same sum:
- static shapes, each output size an exact multiple ``k`` of the input size, where the
  float32 formula that ATen's kernels (CPU and CUDA) use for a nearest index,
  ``floor(dst * (input / output))``, gives ``dst // k`` for every ``dst`` (evaluated),
  as do Inductor's windows; at most ``MAX_WINDOW`` elements per window (the windows
  Inductor computes inline);
- index tensors made from constants alone (no graph input, no random op) that, when
  evaluated, equal ``dst // k`` on each axis;
- a base that is all zeros, of the gradient's dtype and device, read by nothing else.
The sums may be added in another order than the scatter's (at most ``MAX_WINDOW``
terms each). Inductor's C++ scatter also fails to compile on more than one thread for
small gradients (an assertion in ``CppVecKernel.store``'s ``atomic_add``, torch 2.13: a
(8, 12, 2, 1) value upsampled 2x, 3x or 4x); the window sum has no scatter.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from remat._torch_internals import is_op_overload, real_kernels
from remat.passes.fake_values import derive_value

aten = torch.ops.aten

SCATTER_ADDS = frozenset({aten.index_put.default, aten._unsafe_index_put.default})
# Inductor unrolls window sums of up to 25 elements into an expression
# (torch/_inductor/lowering.py, _avg_poolnd); larger windows become reductions.
MAX_WINDOW = 25
# Index computations longer than this are not evaluated (nearest indices take about 8 ops).
MAX_INDEX_OPS = 32


def nearest_upsample_gradients(graph: fx.Graph, any_layout: bool) -> int:
    """Replace each scatter-add of the joint ``graph`` that sums a 2-d nearest
    upsampling's gradient with ``aten.upsample_nearest2d_backward``; returns how many.

    The window sum is laid out like the gradient (channels-last in a CPU backward
    that reads channels-last convolutions), the scatter like its zeros (contiguous).
    Inductor lays out what it computes from the ops that read it (``any_layout``), but
    run op by op the new layout reaches the readers, where a ``view`` traced on the
    contiguous result may not apply: there the rewrite is made only where the two
    layouts agree."""
    rewritten = 0
    for node in list(graph.nodes):
        sizes = _window_sum_sizes(node)
        if sizes is None:
            continue
        base, indices, values = node.args[:3]
        with graph.inserting_before(node):
            window_sum = graph.call_function(aten.upsample_nearest2d_backward.default, (values, *sizes, None, None))
        # the scatter's meta (its stack trace, for Inductor's kernel names), less its tensor_meta
        window_sum.meta = {key: value for key, value in node.meta.items() if key != "tensor_meta"}
        window_sum.meta["original_aten"] = aten.upsample_nearest2d_backward.default
        derive_value(window_sum)
        if not any_layout and window_sum.meta["val"].stride() != node.meta["val"].stride():
            graph.erase_node(window_sum)
            continue
        node.replace_all_uses_with(window_sum)
        graph.erase_node(node)
        for unread in (base, *indices):
            _erase_if_unread(unread, graph)
        rewritten += 1
    return rewritten


def _window_sum_sizes(node: fx.Node) -> tuple[list[int], list[int]] | None:
    """``(output_size, input_size)`` of the upsampling whose gradient ``node`` sums, if
    it provably does (see the module's docstring); else None."""
    if node.op != "call_function" or node.target not in SCATTER_ADDS:
        return None
    if len(node.args) < 3:
        return None
    base, indices, values = node.args[:3]
    accumulate = node.args[3] if len(node.args) > 3 else node.kwargs.get("accumulate", False)
    if accumulate is not True or not isinstance(base, fx.Node) or not isinstance(values, fx.Node):
        return None
    zeros, grad = base.meta.get("val"), values.meta.get("val")
    if not (isinstance(zeros, torch.Tensor) and isinstance(grad, torch.Tensor)):
        return None
    if zeros.dim() != 4 or grad.dim() != 4 or (zeros.dtype, zeros.device) != (grad.dtype, grad.device):
        return None
    if not all(type(size) is int for size in (*zeros.shape, *grad.shape)) or zeros.shape[:2] != grad.shape[:2]:
        return None
    if len(base.users) != 1 or not _is_zero_fill(base):
        return None
    if not isinstance(indices, (list, tuple)) or len(indices) != 4 or indices[0] is not None or indices[1] is not None:
        return None
    with real_kernels(), torch.no_grad():  # planning runs inside fake-tensor tracing
        scales = [_integer_scale(out, inp) for out, inp in zip(grad.shape[2:], zeros.shape[2:])]
        if None in scales or scales[0] * scales[1] > MAX_WINDOW:
            return None
        rows, cols = (_constant_value(index) for index in indices[2:])
        if rows is None or cols is None or not _are_nearest_indices(rows, cols, grad.shape[2:], scales):
            return None
    return list(grad.shape[2:]), list(zeros.shape)


def _integer_scale(output: int, input: int) -> int | None:
    """``k = output // input`` where ``output`` is that multiple of ``input`` and the
    kernels' float32 nearest index, ``floor(dst * (input / output))``, is ``dst // k``
    for every output index ``dst``; else None."""
    if input <= 0 or output % input:
        return None
    scale = output // input
    ratio = torch.tensor(input, dtype=torch.float32) / torch.tensor(output, dtype=torch.float32)
    destinations = torch.arange(output)
    sources = torch.floor(destinations.to(torch.float32) * ratio).to(torch.int64)
    return scale if torch.equal(sources, destinations // scale) else None


def _is_zero_fill(node: fx.Node) -> bool:
    if node.target is aten.full.default:
        return node.args[1] == 0
    return node.target in (aten.zeros.default, aten.new_zeros.default)


def _are_nearest_indices(rows: torch.Tensor, cols: torch.Tensor, size: torch.Size, scales: list[int]) -> bool:
    """Whether ``rows`` and ``cols`` broadcast to the ``size`` grid of nearest source
    indices ``(i // scales[0], j // scales[1])``."""
    if rows.dtype not in (torch.int64, torch.int32) or cols.dtype != rows.dtype:
        return False
    try:
        rows, cols = torch.broadcast_tensors(rows, cols)
    except RuntimeError:
        return False
    if rows.shape != size:
        return False
    grid = torch.meshgrid(torch.arange(size[0]), torch.arange(size[1]), indexing="ij")
    return torch.equal(rows.long(), grid[0] // scales[0]) and torch.equal(cols.long(), grid[1] // scales[1])


def _constant_value(node: object) -> torch.Tensor | None:
    """The value of ``node`` evaluated on the CPU (call under ``real_kernels``), where
    it is computed from constants alone by at most ``MAX_INDEX_OPS`` deterministic ATen
    ops; else None."""
    if not isinstance(node, fx.Node):
        return None
    order: list[fx.Node] = []
    if not _constant_ancestors(node, order, set()):
        return None
    values: dict[fx.Node, object] = {}
    for member in order:
        args, kwargs = fx.node.map_arg((member.args, member.kwargs), values.__getitem__)
        if "device" in kwargs:
            kwargs = {**kwargs, "device": torch.device("cpu")}
        values[member] = member.target(*args, **kwargs)
    value = values[node]
    return value if isinstance(value, torch.Tensor) else None


def _constant_ancestors(node: fx.Node, order: list[fx.Node], seen: set[fx.Node]) -> bool:
    """Append ``node`` and its ancestors to ``order``, inputs first; False where one is
    not a deterministic ATen op (a graph input, a random op) or the chain runs past
    ``MAX_INDEX_OPS``. The joint graph is functional: no op mutates its inputs."""
    if node in seen:
        return True
    seen.add(node)
    if len(seen) > MAX_INDEX_OPS or node.op != "call_function" or not is_op_overload(node.target):
        return False
    if torch.Tag.nondeterministic_seeded in node.target.tags:
        return False
    if not all(_constant_ancestors(parent, order, seen) for parent in node.all_input_nodes):
        return False
    order.append(node)
    return True


def _erase_if_unread(node: object, graph: fx.Graph) -> None:
    """Erase ``node`` if nothing reads it, and then its inputs that nothing else reads
    (an index computation that only the scatter read)."""
    if isinstance(node, fx.Node) and node.op == "call_function" and not node.users:
        inputs = node.all_input_nodes
        graph.erase_node(node)
        for parent in inputs:
            _erase_if_unread(parent, graph)
