"""How long each node of a graph takes: the time side of keep-versus-recompute.

An estimator is a callable ``node -> seconds``. The roofline estimator needs nothing but
the graph's fake tensors and a ``DeviceProfile``: an op is bound either by its math or
by the bytes it moves, plus a fixed per-op overhead. The profiling estimator runs each
op for real on random inputs of the traced shapes, for when a model should be measured
rather than assumed; ops it cannot run safely get the roofline figure instead.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.fx as fx
from torch.fx.node import map_aggregate, map_arg

from remat._torch_internals import is_builtin_op, is_op_overload, real_kernels, size_hint
from remat.cost_models.devices import TRANSCENDENTAL_FLOPS, DeviceProfile, profile_for_device, time_call
from remat.cost_models.flops import node_flops
from remat.cost_models.node_memo import per_node
from remat.cost_models.sizes import tensor_bytes, tensors_in, value_bytes
from remat.passes.recompute_rules import draws_random_numbers, is_view

log = logging.getLogger("remat")
aten = torch.ops.aten

Estimator = Callable[[fx.Node], float]
ESTIMATORS = ("roofline", "profile")

# Ops that only relabel memory: no kernel, nothing read or written.
_FREE_OPS = frozenset({aten._unsafe_view, aten.lift_fresh})
# Allocations without a kernel that touches the memory.
_ALLOCATIONS = frozenset({aten.empty, aten.empty_like, aten.empty_strided, aten.new_empty, aten.new_empty_strided})
# Ops that read only the rows their indices pick from their first input.
_GATHERS = frozenset({aten.embedding, aten.gather, aten.index, aten.index_select, aten._unsafe_index, aten._unsafe_masked_index})
# Elementwise functions evaluated by a polynomial or iteration, and variance (a division
# per element in Welford's update), count TRANSCENDENTAL_FLOPS per element; other
# elementwise ops and reductions 1.
_TRANSCENDENTAL = frozenset(
    getattr(aten, name)
    for name in (
        "exp", "exp2", "expm1", "log", "log1p", "log2", "log10", "erf", "erfc", "erfinv",
        "tanh", "sigmoid", "sin", "cos", "tan", "pow", "gelu", "gelu_backward", "silu",
        "silu_backward", "softplus", "_softmax", "_log_softmax", "logsumexp", "atan2", "var", "var_mean",
        "std", "std_mean",
    )
    if hasattr(aten, name)
)


def _packet(node: fx.Node) -> Any:
    return getattr(node.target, "overloadpacket", None)


@per_node
def is_free(node: fx.Node) -> bool:
    """Nodes that run no kernel: graph inputs/outputs, views, getitem, SymInt math
    (``sym_size`` included: ops whose value holds no tensor)."""
    if node.op != "call_function" or not is_op_overload(node.target) or is_view(node) or _packet(node) in _FREE_OPS:
        return True
    value = node.meta.get("val")
    return value is not None and not tensors_in(value)


def span_bytes(t: torch.Tensor) -> int:
    """Bytes a kernel reads from ``t``: its elements, or fewer when strides overlap
    (an expanded bias reads its base once)."""
    shape = [size_hint(s) for s in t.shape]
    if 0 in shape:
        return 0
    span = 1 + sum((n - 1) * abs(size_hint(s)) for n, s in zip(shape, t.stride()))
    return min(math.prod(shape), span) * t.element_size()


@per_node
def value_span_bytes(node: fx.Node) -> int:
    """``span_bytes`` of the tensors a node makes: what a kernel that reads it loads."""
    return sum(span_bytes(t) for t in tensors_in(node.meta.get("val")))


def bytes_moved(node: fx.Node) -> int:
    """Bytes a node's kernel reads (each tensor input once) plus the bytes it writes.

    Views, getitem and graph inputs/outputs move nothing; an allocation writes nothing;
    a gather reads no more of its table than it writes."""
    if is_free(node) or _packet(node) in _ALLOCATIONS:
        return 0
    written = value_bytes(node)
    read = 0
    for i, arg in enumerate(node.all_input_nodes):
        for t in tensors_in(arg.meta.get("val")):
            nbytes = span_bytes(t)
            read += min(nbytes, written) if i == 0 and _packet(node) in _GATHERS else nbytes
    return read + written


def _elements(node: fx.Node) -> int:
    """Elements an op computes on: its largest input or output (a reduction's input;
    a gather's output, since it reads only what it writes)."""
    values = tensors_in(node.meta.get("val"))
    if _packet(node) not in _GATHERS:
        values += [t for a in node.all_input_nodes for t in tensors_in(a.meta.get("val"))]
    return max((size_hint(t.numel()) for t in values), default=0)


@per_node
def vector_flops(node: fx.Node) -> int:
    """FLOPs of a non-matmul op by convention: 1 per element, TRANSCENDENTAL_FLOPS for
    exp/erf/tanh and the like."""
    if is_free(node) or _packet(node) in _ALLOCATIONS:
        return 0
    return _elements(node) * (TRANSCENDENTAL_FLOPS if _packet(node) in _TRANSCENDENTAL else 1)


def _first_touch_bytes(node: fx.Node, profile: DeviceProfile) -> int:
    """Output bytes that land in freshly mapped pages (large CPU allocations)."""
    threshold = profile.first_touch_threshold
    if threshold is None or is_free(node) or _packet(node) in _ALLOCATIONS:
        return 0
    return sum(s for s in tensor_bytes(node) if s >= threshold)


_CONVOLUTIONS = frozenset(
    getattr(aten, name)
    for name in ("convolution", "_convolution", "convolution_backward", "cudnn_convolution", "_slow_conv2d_forward",
                 "convolution_overrideable")
    if hasattr(aten, name)
)


def _uses_tf32(node: fx.Node) -> bool:
    """Whether a float32 matmul or convolution runs in TF32, read through the
    per-backend ``fp32_precision`` settings: the legacy ``get_float32_matmul_precision``
    raises once a program (or a library it uses) has set the precision through both
    APIs. An op's ``"none"`` defers to its backend's, then to the global setting; all
    ``"none"`` is IEEE."""
    backends = torch.backends
    if _packet(node) in _CONVOLUTIONS:
        chain = (backends.cudnn.conv, backends.cudnn, backends)
    else:
        chain = (backends.cuda.matmul, backends)
    precision = next((p for p in (level.fp32_precision for level in chain) if p != "none"), "ieee")
    return precision == "tf32"


def roofline_time(node: fx.Node, profile: DeviceProfile) -> float:
    """Seconds for one node: max(math time, memory time) + the per-op overhead.

    Matmul-like ops (those flop_counter has a formula for: matmul, convolution,
    attention) run at the profile's matmul rate for their input dtype (convolutions at
    its conv_efficiency of it), everything else at its vector rate. Views cost the profile's view overhead; graph inputs, outputs,
    getitem and SymInt arithmetic cost nothing."""
    if node.op != "call_function" or not is_op_overload(node.target):
        return 0.0
    if node.meta.get("val") is not None and not tensors_in(node.meta["val"]):
        return 0.0  # sym_size and friends: shape arithmetic, no tensor
    if is_free(node):
        return profile.view_overhead_s
    flops = node_flops(node)
    if flops:
        inputs = [t for a in node.all_input_nodes for t in tensors_in(a.meta.get("val"))]
        dtype = inputs[0].dtype if inputs else torch.float32
        rate = profile.matmul_rate(dtype, tf32=_uses_tf32(node))
        compute = flops / (rate * profile.conv_efficiency if _packet(node) in _CONVOLUTIONS else rate)
    else:
        compute = vector_flops(node) / profile.vector_flops
    memory = bytes_moved(node) / profile.memory_bandwidth
    return max(compute, memory) + first_touch_seconds(node, profile) + profile.op_overhead_s


def first_touch_seconds(node: fx.Node, profile: DeviceProfile) -> float:
    """Page faults on the node's freshly mapped outputs: they run in the kernel,
    serially with the op's own work."""
    if not profile.first_touch_bandwidth:
        return 0.0
    return _first_touch_bytes(node, profile) / profile.first_touch_bandwidth


def roofline_estimator(profile: DeviceProfile) -> Estimator:
    """An estimator that prices every node with ``roofline_time`` on ``profile``."""

    def estimate(node: fx.Node) -> float:
        return roofline_time(node, profile)

    estimate.profile = profile  # type: ignore[attr-defined]
    return estimate


# --------------------------------------------------------------------------- profiling

# Ops whose integer inputs are indices: op -> the bound (exclusive) from the arguments.
# Other ops' integer inputs stay below every dimension of their float inputs.
_INDEX_BOUNDS: dict[Any, Callable[[list[Any]], Any]] = {
    aten.embedding: lambda args: args[0].shape[0],
    aten.embedding_dense_backward: lambda args: args[2],
    aten.gather: lambda args: args[0].shape[args[1]],
    aten.index_select: lambda args: args[0].shape[args[1]],
    aten.scatter: lambda args: args[0].shape[args[1]],
    aten.scatter_add: lambda args: args[0].shape[args[1]],
    aten.scatter_reduce: lambda args: args[0].shape[args[1]],
    aten.index_add: lambda args: args[0].shape[args[1]],
    aten.index_copy: lambda args: args[0].shape[args[1]],
    aten.index_fill: lambda args: args[0].shape[args[1]],
    aten.nll_loss_forward: lambda args: args[0].shape[-1] if args[0].dim() == 1 else args[0].shape[1],
    aten.nll_loss_backward: lambda args: args[1].shape[-1] if args[1].dim() == 1 else args[1].shape[1],
    aten.nll_loss2d_forward: lambda args: args[0].shape[1],
    aten.nll_loss2d_backward: lambda args: args[1].shape[1],
}
# Ops taking a list of index tensors, one per leading dimension of their first input:
# indices below its smallest dimension are valid for every position.
_INDEX_LISTS = frozenset(
    {aten.index, aten._unsafe_index, aten.index_put, aten._unsafe_index_put, aten._unsafe_masked_index,
     aten._unsafe_masked_index_put_accumulate}
)


class _Skip(Exception):
    """This node cannot be timed safely: use the fallback estimate."""


def _hint(value: Any) -> Any:
    if isinstance(value, torch.SymInt):
        return size_hint(value)
    if isinstance(value, (torch.SymFloat, torch.SymBool)):
        raise _Skip("symbolic float or bool argument")
    return value


def _describe(value: Any) -> Any:
    """A hashable stand-in for an argument: tensors by shape, strides and dtype."""
    if isinstance(value, torch.Tensor):
        return ("T", tuple(map(_hint, value.shape)), tuple(map(_hint, value.stride())), str(value.dtype))
    return repr(_hint(value))


def _random_tensor(fake: torch.Tensor, device: torch.device, high: int) -> torch.Tensor:
    """A real tensor with ``fake``'s shape, strides and dtype; integers in [0, high)."""
    shape = [_hint(s) for s in fake.shape]
    stride = [_hint(s) for s in fake.stride()]
    numel = 0 if 0 in shape else 1 + sum((n - 1) * s for n, s in zip(shape, stride))
    dtype = fake.dtype
    if dtype == torch.bool:
        base = torch.rand(numel, device=device) < 0.5
    elif dtype.is_floating_point or dtype.is_complex:
        base = torch.randn(numel, device=device).to(dtype)
    else:
        base = torch.randint(0, max(high, 1), (numel,), device=device, dtype=dtype)
    return base.as_strided(shape, stride)


def _check_safe(node: fx.Node) -> None:
    op = node.target
    if not is_builtin_op(op):
        raise _Skip("not an aten/prims op (side effects unknown)")
    if op._schema.is_mutable or node.is_impure(impure_random=False):
        raise _Skip("mutates its inputs or has side effects")
    if draws_random_numbers(node) or {torch.Tag.dynamic_output_shape, torch.Tag.data_dependent_output} & set(op.tags):
        raise _Skip("random op, or output shape or value depends on the data")
    devices = {t.device.type for t in tensors_in(node.meta.get("val"))}
    devices |= {t.device.type for a in node.all_input_nodes for t in tensors_in(a.meta.get("val"))}
    if len(devices) > 1:
        raise _Skip("moves data between devices")


def _real_args(node: fx.Node, device: torch.device) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Random real arguments for ``node`` on ``device``; index tensors hold valid indices."""
    args, kwargs = map_aggregate(map_arg((node.args, node.kwargs), lambda a: a.meta.get("val")), _hint)
    kwargs = {k: device if isinstance(v, torch.device) else v for k, v in kwargs.items()}
    packet = _packet(node)
    dims = [_hint(s) for t in tensors_in((args, kwargs)) if t.dtype.is_floating_point for s in t.shape]
    generic = min(dims, default=1)

    def real(value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        high = generic
        if not (value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool):
            if packet in _INDEX_BOUNDS:
                high = _INDEX_BOUNDS[packet](args)
            elif packet in _INDEX_LISTS:
                high = min(args[0].shape, default=1)
            elif device.type != "cpu":  # a bad index is a device-side assert there
                raise _Skip("integer inputs of an op whose valid range is unknown")
        return _random_tensor(value, device, _hint(high))

    return map_aggregate(args, real), map_aggregate(kwargs, real)


class ProfilingEstimator:
    """Times each op for real: random inputs of the node's shapes, strides and dtypes
    (at the shape hints) on ``device``, median of a few runs. Results are cached by op
    and argument shapes, so the layers of a deep model are timed once. Ops that cannot
    be run safely (random, mutating, data-dependent, cross-device) or that fail get
    ``fallback``'s estimate (the device's roofline by default); it never raises."""

    def __init__(self, device: torch.device | str = "cpu", fallback: Estimator | None = None, repeats: int = 5) -> None:
        self.device = torch.device(device)
        self.fallback = fallback or roofline_estimator(profile_for_device(self.device))
        self.profile = getattr(self.fallback, "profile", None)  # prices the kernels Inductor generates
        self.repeats = repeats
        self.cache: dict[tuple[str, str], float | None] = {}

    def __call__(self, node: fx.Node) -> float:
        if node.op != "call_function" or not is_op_overload(node.target):
            return self.fallback(node)
        try:
            key = (str(node.target), repr(map_aggregate((node.args, node.kwargs), _describe_node_arg)))
        except Exception:  # unhashable or symbolic arguments: not worth a failure
            return self.fallback(node)
        if key not in self.cache:
            self.cache[key] = self._time(node)
        seconds = self.cache[key]
        return self.fallback(node) if seconds is None else seconds

    def _time(self, node: fx.Node) -> float | None:
        try:
            _check_safe(node)
            with real_kernels():  # planning runs inside fake-tensor tracing
                args, kwargs = _real_args(node, self.device)
                op = node.target
                return time_call(lambda: op(*args, **kwargs), self.device, repeats=self.repeats)
        except _Skip as e:
            log.debug("remat: not timing %s: %s", node.format_node(), e)
        except Exception as e:  # an op that fails on random data is estimated instead
            log.debug("remat: timing %s failed: %s: %s", node.format_node(), type(e).__name__, e)
        return None


def _describe_node_arg(value: Any) -> Any:
    return _describe(value.meta.get("val")) if isinstance(value, fx.Node) else _describe(value)


def make_estimator(name: str, device: torch.device | str = "cpu", profile: DeviceProfile | None = None) -> Estimator:
    """The estimator called ``name`` for ``device``: "roofline" (from the device's
    profile, or ``profile``) or "profile" (timed on the device, roofline fallback)."""
    if name not in ESTIMATORS:
        raise ValueError(f"unknown runtime estimator {name!r}; allowed: {', '.join(map(repr, ESTIMATORS))}")
    profile = profile or profile_for_device(device)
    if name == "roofline":
        return roofline_estimator(profile)
    return ProfilingEstimator(device, fallback=roofline_estimator(profile))


def graph_time(graph_or_nodes: fx.Graph | fx.GraphModule | Iterable[fx.Node], estimator: Estimator) -> float:
    """Seconds to run the nodes one after another: the sum of their estimates."""
    if isinstance(graph_or_nodes, fx.GraphModule):
        graph_or_nodes = graph_or_nodes.graph
    nodes = graph_or_nodes.nodes if isinstance(graph_or_nodes, fx.Graph) else graph_or_nodes
    return sum(estimator(node) for node in nodes)
