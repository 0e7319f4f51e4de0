"""Memory an op allocates inside itself and frees before it returns.

The FX graph shows every tensor an op returns but not the scratch it needs on the way.
For most aten ops that scratch is negligible; for convolutions on the CPU it is not:
oneDNN reorders the input (and the output or gradients) to its blocked layouts, which
costs about as much again as the activations themselves. CPU flash attention holds
blocks of scores per thread (0.125 MiB in the backward of a 256-token sequence). The
convolution figures below were measured on this project's CPU machine (torch 2.13, one
and two threads; the high-water mark of one op in a fresh process, minus the bytes it
returns) and are documented per rule; the attention rules follow PyTorch's kernel and
a test holds them to the allocations the op makes. Where no rule is known the op
counts no scratch, which ``tests/test_memory.py`` and ``benchmarks/predict.py`` hold
to account against measured peaks.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from remat._torch_internals import size_hint
from remat.cost_models.sizes import contiguous_at_hints, packed_strides, tensor_size

aten = torch.ops.aten


def _bytes(value: object) -> int:
    return tensor_size(value).hint if isinstance(value, torch.Tensor) else 0


def _val(arg: object) -> object:
    return arg.meta.get("val") if isinstance(arg, fx.Node) else None


def _contiguous_copy(t: torch.Tensor) -> int:
    """oneDNN takes dense inputs: a strided one (a slice of a concatenation's
    gradient, say) is copied first."""
    return 0 if packed_strides(t) else _bytes(t)


def _uses_onednn(x: torch.Tensor, weight: torch.Tensor, stride: list[int], dilation: list[int], groups: int) -> bool:
    """PyTorch's CPU choice between oneDNN and its own kernels for a float32
    convolution (``ConvParams::use_mkldnn``): oneDNN unless the convolution is a 1x1,
    unstrided, undilated one on a batch under 16 run by one thread, or a tiny
    single-image one. The rules below were measured for float32 only."""
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled) or x.dtype != torch.float32:
        return False
    batch = size_hint(x.shape[0])
    kernel = [size_hint(k) for k in weight.shape[2:]]
    pointwise = all(k == 1 for k in kernel)
    plain = all(s == 1 for s in stride) and all(d == 1 for d in dilation)
    if pointwise and plain and batch < 16 and torch.get_num_threads() == 1:
        return False
    return groups > 1 or all(k > 3 for k in kernel) or batch > 1 or size_hint(x.numel()) > 20480


def _cpu_convolution(node: fx.Node, channels_last: bool) -> int:
    # convolution(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups)
    x, weight = _val(node.args[0]), _val(node.args[1])
    stride, dilation, transposed, groups = list(node.args[3]), list(node.args[5]), node.args[6], node.args[8]
    if transposed or not (isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor)):
        return 0  # transposed convolutions: not measured
    if not _uses_onednn(x, weight, stride, dilation, groups):
        return 0
    if channels_last:  # measured: nothing is reordered
        return _contiguous_copy(x)
    # measured: the larger of input and output is reordered, plus the weight
    return max(_bytes(x), _bytes(node.meta.get("val"))) + _bytes(weight) + _contiguous_copy(x)


def _cpu_convolution_backward(node: fx.Node, channels_last: bool) -> int:
    # convolution_backward(grad_output, input, weight, bias_sizes, stride, padding, dilation,
    #                      transposed, output_padding, groups, output_mask)
    grad_out, x, weight = (_val(a) for a in node.args[:3])
    stride, dilation, transposed, groups = list(node.args[4]), list(node.args[6]), node.args[7], node.args[9]
    if transposed or not all(isinstance(t, torch.Tensor) for t in (grad_out, x, weight)):
        return 0  # transposed convolutions: not measured
    if not _uses_onednn(x, weight, stride, dilation, groups):
        return 0
    if channels_last:  # measured: nothing is reordered, a strided grad_output is copied
        return _contiguous_copy(grad_out) + _contiguous_copy(x)
    # measured: input and grad_output reordered; with a stride, the grad_output is
    # brought to the input's resolution first, so twice the input
    second = _bytes(grad_out) if all(s == 1 for s in stride) else _bytes(x)
    return _bytes(x) + second + _bytes(weight) + _contiguous_copy(grad_out) + _contiguous_copy(x)


def _flash_blocks(query: torch.Tensor, key: torch.Tensor) -> tuple[int, int]:
    """The query and key block lengths of PyTorch's CPU flash attention
    (``FlashAttentionKernel.cpp``): queries in blocks of 256 from 768 on, of 64 from
    192 on, else of 32; keys in blocks of 512; neither longer than the sequence."""
    q_len, kv_len = size_hint(query.shape[-2]), size_hint(key.shape[-2])
    q_block = 256 if q_len >= 768 else 64 if q_len >= 192 else 32
    return min(q_block, q_len), min(512, kv_len)


def _accumulates_in(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _reduced_copy(dtype: torch.dtype) -> int:
    """Bytes per element of the copy in ``dtype`` that a block in half or bfloat16
    also gets; none where the kernel accumulates in ``dtype`` itself."""
    return dtype.itemsize if _accumulates_in(dtype) != dtype else 0


def _cpu_flash_attention(node: fx.Node, channels_last: bool) -> int:
    # _scaled_dot_product_flash_attention_for_cpu(query, key, value, ...): q, k, v are
    # (batch, heads, length, head size); per thread: a block of scores, its row maxima
    # and sums, and a block of the output (and the scores again in half or bfloat16).
    # Half with oneDNN packing (Intel AMX) pads and reorders more: not modelled.
    query, key = _val(node.args[0]), _val(node.args[1])
    if not (isinstance(query, torch.Tensor) and isinstance(key, torch.Tensor)):
        return 0
    q_block, kv_block = _flash_blocks(query, key)
    head = size_hint(query.shape[-1])
    accumulated = (q_block * kv_block + 2 * q_block + q_block * head) * _accumulates_in(query.dtype).itemsize
    return torch.get_num_threads() * (accumulated + q_block * kv_block * _reduced_copy(query.dtype))


def _cpu_flash_attention_backward(node: fx.Node, channels_last: bool) -> int:
    # _scaled_dot_product_flash_attention_for_cpu_backward(grad_out, query, key, value,
    # out, logsumexp, ...): per thread, a block of scores and one of their gradient
    # (again in half or bfloat16), and each thread that gets a (batch, head) pair a row
    # sum per query of its block; the kernel reads grad_out as (batch, length, heads,
    # head size), copying it where that view is not contiguous.
    grad_out, query, key = _val(node.args[0]), _val(node.args[1]), _val(node.args[2])
    if not all(isinstance(t, torch.Tensor) for t in (grad_out, query, key)):
        return 0
    q_block, kv_block = _flash_blocks(query, key)
    accumulate = _accumulates_in(query.dtype).itemsize
    threads = torch.get_num_threads()
    blocks = threads * 2 * q_block * kv_block * (accumulate + _reduced_copy(query.dtype))
    working = min(threads, size_hint(query.shape[0]) * size_hint(query.shape[1]))
    copy = 0 if contiguous_at_hints(grad_out, (0, 2, 1, 3)) else _bytes(grad_out)
    return blocks + working * q_block * accumulate + copy


_CPU_RULES = {
    aten.convolution.default: _cpu_convolution,
    aten.convolution_backward.default: _cpu_convolution_backward,
    aten._scaled_dot_product_flash_attention_for_cpu.default: _cpu_flash_attention,
    aten._scaled_dot_product_flash_attention_for_cpu_backward.default: _cpu_flash_attention_backward,
}


def workspace_bytes(node: fx.Node, *, channels_last: bool = False) -> int:
    """Scratch bytes ``node``'s op holds while it runs, beyond its inputs and outputs.

    ``channels_last``: convolutions run on channels-last tensors, as Inductor lays
    them out on the CPU; oneDNN then reorders nothing and only makes dense copies of
    strided inputs (measured under Inductor, one thread)."""
    rule = _CPU_RULES.get(node.target) if node.op == "call_function" else None
    if rule is None:
        return 0
    value = node.meta.get("val")
    outputs = value if isinstance(value, (tuple, list)) else [value]
    first = next((t for t in outputs if isinstance(t, torch.Tensor)), None)
    if first is None or first.device.type != "cpu":
        return 0
    return rule(node, channels_last)
