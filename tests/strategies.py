"""Hypothesis strategies: random small models (as readable specs) and valid remat options.

A model is drawn as a ``ModelSpec``: plain frozen dataclasses, so a failing example
prints something a person can read and rebuild, e.g.

    ModelSpec(input_shape=(2, 3, 5), layers=(Conv(out=3, kernel=3, bias=True, residual=True),
              Norm(kind='batch', groups=1, residual=False), Act(fn='gelu', residual=False)),
              head_out=2, dtype='bfloat16-autocast', input_grad=False, seed=0)

``build(spec)`` turns a spec into an ``nn.Module`` whose forward returns a scalar loss,
and ``make_input(spec)`` the input batch. The tensor flowing through the layers has
shape ``(batch, channels)``, ``(batch, channels, length)`` or ``(batch, channels,
height, width)``; linear layers act on the last dimension, convolutions (1d or 2d by
rank) and norms on the channel dimension (LayerNorm on the last one); a concatenation
joins a shape-keeping layer's output and its input on the channel dimension; a nearest
upsampling scales both sides of an image by 2 or 3 (its gradient's scatter-add becomes
a window sum, ``passes.upsample_gradients``). Not a sequence's length: Inductor's C++
scatter for that gradient fails to compile on two threads at length 1, under remat as
without it (torch 2.13).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import math
from typing import Any, Union

import torch
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

import remat
from remat.options import POLICIES

MAX_WIDTH = 32
MAX_BATCH = 8
MAX_LAYERS = 6
# Spatial sizes stay small so that 100 compiles fit the time budget; widths up to 32.
MAX_LENGTH = 8
MAX_SIDE = 4
# The fewest values a norm layer normalizes over (see layer_specs).
MIN_NORMALIZED = 4

DTYPES = ("float32", "bfloat16-autocast")


# --- the spec --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Linear:
    out: int
    bias: bool
    residual: bool = False


@dataclasses.dataclass(frozen=True)
class Conv:
    out: int
    kernel: int  # odd, padded to keep the spatial size
    bias: bool
    residual: bool = False


@dataclasses.dataclass(frozen=True)
class Norm:
    kind: str  # "layer" (last dim), "batch" (train mode, running stats), "group"
    groups: int = 1  # GroupNorm only
    residual: bool = False


@dataclasses.dataclass(frozen=True)
class Act:
    fn: str  # "relu", "gelu", "silu", "tanh"
    residual: bool = False


@dataclasses.dataclass(frozen=True)
class View:
    kind: str  # "flatten", "transpose", "unflatten": a round trip, same shape out
    residual: bool = False


@dataclasses.dataclass(frozen=True)
class Dropout:
    p: float
    residual: bool = False


@dataclasses.dataclass(frozen=True)
class Attention:
    causal: bool  # self-attention over the length of a (batch, channels, length) value
    residual: bool = False


@dataclasses.dataclass(frozen=True)
class Tag:
    name: str  # remat.tag(x, name): a value that save_only may name
    residual: bool = False


@dataclasses.dataclass(frozen=True)
class Upsample:
    scale: int  # nearest, on both sides of an image
    residual: bool = False  # never: the shape changes


TAG_NAMES = ("a", "b")

Layer = Union[Linear, Conv, Norm, Act, View, Dropout, Attention, Tag, Upsample, "Concat"]


@dataclasses.dataclass(frozen=True)
class Concat:
    inner: Layer  # keeps the shape; the output is cat([inner(x), x]) on the channels


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    input_shape: tuple[int, ...]
    layers: tuple[Layer, ...]
    head_out: int  # a final Linear, so every model has parameters to differentiate
    dtype: str  # "float32", or "bfloat16-autocast": fp32 weights, bf16 autocast forward
    input_grad: bool  # whether the input requires grad too
    seed: int  # parameters, input and dropout masks

    @property
    def every_layer(self) -> tuple[Layer, ...]:
        """The layers, and the layer inside each concatenation."""
        return tuple(inner for layer in self.layers for inner in ((layer, layer.inner) if isinstance(layer, Concat) else (layer,)))

    @property
    def has_dropout(self) -> bool:
        return any(isinstance(layer, Dropout) and layer.p > 0 for layer in self.every_layer)

    @property
    def has_batchnorm(self) -> bool:
        return any(isinstance(layer, Norm) and layer.kind == "batch" for layer in self.every_layer)


def output_shape(layer: Layer, shape: tuple[int, ...]) -> tuple[int, ...]:
    if isinstance(layer, Concat):
        return (shape[0], 2 * shape[1], *shape[2:])
    if isinstance(layer, Linear):
        return (*shape[:-1], layer.out)
    if isinstance(layer, Conv):
        return (shape[0], layer.out, *shape[2:])
    if isinstance(layer, Upsample):
        return (*shape[:2], *(side * layer.scale for side in shape[2:]))
    return shape


# --- strategies ------------------------------------------------------------------


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def layer_specs(draw: st.DrawFn, shape: tuple[int, ...], keep_shape: bool = False) -> Layer:
    """One layer that is valid for an input of ``shape`` (and keeps it, if asked). A
    concatenation (a U-Net's skip connection: its backward slices the gradient, and the
    skipped value's slice waits for the inner layer's backward) wraps one that keeps
    the shape."""
    kinds = ["linear", "norm", "act", "view", "dropout", "tag"]
    if len(shape) in (3, 4):
        kinds.append("conv")
    if len(shape) == 3:
        kinds.append("attention")
    if not keep_shape and len(shape) == 4 and max(shape[2:]) <= MAX_SIDE:
        kinds.append("upsample")
    if not keep_shape and shape[1] <= MAX_WIDTH:
        kinds.append("concat")
    kind = draw(st.sampled_from(kinds))
    if kind == "concat":
        return Concat(inner=draw(layer_specs(shape, keep_shape=True)))
    if kind == "linear":
        layer: Layer = Linear(out=shape[-1] if keep_shape else draw(st.integers(1, MAX_WIDTH)), bias=draw(st.booleans()))
    elif kind == "conv":
        layer = Conv(out=shape[1] if keep_shape else draw(st.integers(1, MAX_WIDTH)), kernel=draw(st.sampled_from([1, 3])), bias=draw(st.booleans()))
    elif kind == "norm":
        # Each norm normalizes at least MIN_NORMALIZED values. Over one value the
        # output is the bias (BatchNorm in training mode raises), over two it is
        # +-1 whatever the input: the gradients before such a norm are rounding noise,
        # and in bfloat16 a decomposed norm and ATen's fused kernel round differently
        # enough (6% of the largest gradient was seen) to hide a bug in the noise.
        batch, channels, spatial = shape[0], shape[1], math.prod(shape[2:])
        counts = {"layer": shape[-1], "batch": batch * spatial}
        norms = [name for name, count in counts.items() if count >= MIN_NORMALIZED]
        groups = [g for g in _divisors(channels) if channels // g * spatial >= MIN_NORMALIZED]
        if groups:
            norms.append("group")
        if not norms:
            return Act(fn=draw(st.sampled_from(["relu", "gelu", "silu", "tanh"])))
        norm = draw(st.sampled_from(norms))
        layer = Norm(kind=norm, groups=draw(st.sampled_from(groups)) if norm == "group" else 1)
    elif kind == "act":
        layer = Act(fn=draw(st.sampled_from(["relu", "gelu", "silu", "tanh"])))
    elif kind == "view":
        layer = View(kind=draw(st.sampled_from(["flatten", "transpose", "unflatten"])))
    elif kind == "tag":
        layer = Tag(name=draw(st.sampled_from(TAG_NAMES)))
    elif kind == "attention":
        layer = Attention(causal=draw(st.booleans()))
    elif kind == "upsample":
        return Upsample(scale=draw(st.sampled_from([2, 3])))
    else:
        layer = Dropout(p=draw(st.sampled_from([0.5, 0.1, 0.0])))
    if output_shape(layer, shape) == shape and draw(st.booleans()):
        layer = dataclasses.replace(layer, residual=True)
    return layer


@st.composite
def model_specs(draw: st.DrawFn, dtypes: tuple[str, ...] = DTYPES, concat_first: bool = False) -> ModelSpec:
    """A stack of 1-6 layers on a small random input, with a seed and a dtype; the
    first a concatenation, if asked."""
    batch = draw(st.integers(1, MAX_BATCH))
    channels = draw(st.integers(1, MAX_WIDTH))
    rank = draw(st.sampled_from(["flat", "sequence", "image"]))
    if rank == "flat":
        shape: tuple[int, ...] = (batch, channels)
    elif rank == "sequence":
        shape = (batch, channels, draw(st.integers(1, MAX_LENGTH)))
    else:
        shape = (batch, channels, draw(st.integers(1, MAX_SIDE)), draw(st.integers(1, MAX_SIDE)))
    input_shape = shape
    layers = []
    for index in range(draw(st.integers(1, MAX_LAYERS))):
        layer = Concat(inner=draw(layer_specs(shape, keep_shape=True))) if concat_first and index == 0 else draw(layer_specs(shape))
        layers.append(layer)
        shape = output_shape(layer, shape)
    return ModelSpec(
        input_shape=input_shape,
        layers=tuple(layers),
        head_out=draw(st.integers(1, 4)),
        dtype=draw(st.sampled_from(dtypes)),
        input_grad=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


@st.composite
def remat_options(
    draw: st.DrawFn, inner_compilers: tuple[str, ...] = ("eager", "eager", "eager", "inductor")
) -> dict[str, Any]:
    """Valid options for the remat backend. By default mostly the (fast) eager inner
    compiler; half the time a memory budget (a fraction, so it scales with the model;
    infeasible ones use the closest plan); a checkpoint policy or ``save_only`` (names
    that ``Tag`` layers may or may not carry); sometimes ``exclude``."""
    options: dict[str, Any] = {
        "inner_compiler": draw(st.sampled_from(inner_compilers)),
        "on_plan_failure": draw(st.sampled_from(["raise", "warn"])),
    }
    if draw(st.booleans()):
        options["memory_budget"] = draw(st.floats(0.05, 1.0))
        options["on_infeasible"] = "closest"
    policy = draw(st.sampled_from([None, None, *POLICIES]))
    if draw(st.integers(0, 3)) == 0:  # save_only excludes a policy
        options["save_only"] = draw(st.lists(st.sampled_from([*TAG_NAMES, "untagged"]), min_size=1, max_size=2, unique=True))
    elif policy is not None:
        options["policy"] = policy
        if policy == "every_n":
            options["every_n"] = draw(st.integers(1, 4))
    if draw(st.integers(0, 3)) == 0:
        options["exclude"] = [draw(st.sampled_from(["body.0", "head", "nothing"]))]
    offload = draw(st.sampled_from([None, None, True, "auto", "only"]))
    if offload == "auto" and "memory_budget" in options:
        options["offload"] = "auto"
    elif offload == "only":
        options["offload_only"] = [draw(st.sampled_from(TAG_NAMES))]
    elif offload is True:
        options["offload"] = True
    if "offload" in options or "offload_only" in options:
        options["offload_min_bytes"] = 0  # the drawn models are small: offload what can be
    return options


# --- the builder -----------------------------------------------------------------


class Tagged(nn.Module):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return remat.tag(x, self.name)


class Residual(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.inner(x)


class Concatenated(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.inner(x), x], dim=1)


class RoundTrip(nn.Module):
    """View ops that come back to the input's shape."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if self.kind == "flatten":
            return x.flatten(1).reshape(shape)
        if self.kind == "transpose":
            return x.transpose(0, -1).contiguous().transpose(0, -1)
        return x.flatten(0, 1).unflatten(0, (shape[0], shape[1]))


class SelfAttention(nn.Module):
    """One head of self-attention over the length of a (batch, channels, length) value,
    by ``F.scaled_dot_product_attention`` without dropout: an attention op that remat
    may recompute (its schema allows dropout, which makes it tagged as random)."""

    def __init__(self, causal: bool) -> None:
        super().__init__()
        self.causal = causal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sequence = x.transpose(1, 2).unsqueeze(1)
        y = F.scaled_dot_product_attention(sequence, sequence, sequence, is_causal=self.causal)
        return y.squeeze(1).transpose(1, 2)


class Model(nn.Module):
    def __init__(self, body: nn.Sequential, head: nn.Linear) -> None:
        super().__init__()
        self.body = body
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head(self.body(x))
        return out.float().square().mean()


_ACTS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


def _build_layer(layer: Layer, shape: tuple[int, ...]) -> nn.Module:
    if isinstance(layer, Concat):
        return Concatenated(_build_layer(layer.inner, shape))
    if isinstance(layer, Linear):
        module: nn.Module = nn.Linear(shape[-1], layer.out, bias=layer.bias)
    elif isinstance(layer, Conv):
        conv = nn.Conv1d if len(shape) == 3 else nn.Conv2d
        module = conv(shape[1], layer.out, layer.kernel, padding=layer.kernel // 2, bias=layer.bias)
    elif isinstance(layer, Norm):
        if layer.kind == "layer":
            module = nn.LayerNorm(shape[-1])
        elif layer.kind == "group":
            module = nn.GroupNorm(layer.groups, shape[1])
        else:
            module = (nn.BatchNorm2d if len(shape) == 4 else nn.BatchNorm1d)(shape[1])
    elif isinstance(layer, Act):
        module = _ACTS[layer.fn]()
    elif isinstance(layer, View):
        module = RoundTrip(layer.kind)
    elif isinstance(layer, Tag):
        module = Tagged(layer.name)
    elif isinstance(layer, Attention):
        module = SelfAttention(layer.causal)
    elif isinstance(layer, Upsample):
        module = nn.Upsample(scale_factor=float(layer.scale), mode="nearest")
    else:
        module = nn.Dropout(layer.p)
    return Residual(module) if layer.residual else module


def build(spec: ModelSpec) -> Model:
    """The model a spec describes, in train mode, parameters drawn from ``spec.seed``."""
    torch.manual_seed(spec.seed)
    shape = spec.input_shape
    modules = []
    for layer in spec.layers:
        modules.append(_build_layer(layer, shape))
        shape = output_shape(layer, shape)
    model = Model(nn.Sequential(*modules), nn.Linear(shape[-1], spec.head_out))
    # Random affine parameters in the norms, so their gradients are not all alike.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d)):
                module.weight.normal_(1.0, 0.5)
                module.bias.normal_(0.0, 0.5)
    return model.train()


def _batch_norm_by_formula(module: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """Training-mode BatchNorm from its definition, running statistics included.

    The float64 reference must not share a bug with the eager kernel it judges:
    ATen's CPU ``native_batch_norm_backward`` returns wrong weight and bias gradients
    when the incoming gradient is channels-last-strided and the input is not (seen on a
    (1, C, 1, W) activation behind a transpose round trip and a linear layer)."""
    dims = [0, *range(2, x.dim())]
    shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
    mean = x.mean(dims)
    var = x.var(dims, correction=0)
    count = x.numel() // x.shape[1]
    with torch.no_grad():
        momentum = module.momentum
        module.running_mean.mul_(1 - momentum).add_(momentum * mean)
        module.running_var.mul_(1 - momentum).add_(momentum * var * count / (count - 1))
        module.num_batches_tracked.add_(1)
    normalized = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + module.eps)
    return normalized * module.weight.view(shape) + module.bias.view(shape)


def float64_reference(model: Model) -> Model:
    """A float64 copy of ``model`` whose BatchNorms compute from the formula (see
    ``_batch_norm_by_formula``); every other layer runs ATen's float64 kernels."""
    reference = copy.deepcopy(model).double()
    for module in reference.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.forward = functools.partial(_batch_norm_by_formula, module)
    return reference


def make_input(spec: ModelSpec) -> torch.Tensor:
    generator = torch.Generator().manual_seed(spec.seed + 1)
    return torch.randn(spec.input_shape, generator=generator).requires_grad_(spec.input_grad)


def autocast(spec: ModelSpec) -> contextlib.AbstractContextManager[Any]:
    """The context the forward runs in: bf16 autocast, or nothing for fp32."""
    if spec.dtype == "bfloat16-autocast":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()
