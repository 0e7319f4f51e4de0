"""Memory an op allocates inside itself and frees before it returns.

The FX graph shows every tensor an op returns but not the scratch it needs on the way.
For most aten ops that scratch is negligible; for convolutions on the CPU it is not:
oneDNN reorders the input (and the output or gradients) to its blocked layouts, which
costs about as much again as the activations themselves. The figures below were
measured on this project's CPU machine (torch 2.13, one and two threads; the high-water
mark of one op in a fresh process, minus the bytes it returns) and are documented per
rule. Where no rule is known the op counts no scratch, which ``tests/test_memory.py``
and ``benchmarks/predict.py`` hold to account against measured peaks.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from remat._torch_internals import size_hint
from remat.cost_models.sizes import packed_strides, tensor_size

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


_CPU_RULES = {
    aten.convolution.default: _cpu_convolution,
    aten.convolution_backward.default: _cpu_convolution_backward,
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
