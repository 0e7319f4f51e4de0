"""A small zoo of training workloads: model, inputs and loss, deterministic from a seed.

Used by the tests (gradients against eager, saved bytes against PyTorch's partitioner)
and by the benchmarks, which call the same factories with larger sizes:

    case = make_gpt(n_layers=6, d_model=512, seq_len=512, vocab=8192)
    loss = case.loss_fn(case.model(*case.inputs))
    loss.backward()

Every factory takes keyword size arguments with small defaults (a forward and backward
in well under 0.1 s on a CPU), a ``seed`` (weights, inputs and targets are drawn from it
without touching the global random state) and a ``device``. Models are in training
mode; dropout draws from the global generator, so seed it before each step to compare
runs. Each case names its repeated blocks (``case.blocks``), the units a per-block
``torch.utils.checkpoint`` baseline wraps. This module imports no test framework.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "ZOO",
    "ZooCase",
    "make_dynamic",
    "make_gpt",
    "make_mlp",
    "make_resnet",
    "make_unet",
]


@dataclass(frozen=True)
class ZooCase:
    """One training workload: ``loss_fn(model(*inputs))`` is the scalar to differentiate.

    inputs_for: for models meant to run at several shapes (``make_dynamic``),
    ``inputs_for(batch, seq)`` returns a case with the same model and new inputs and
    targets of that shape; None for fixed-shape models.
    blocks: qualified names (``model.get_submodule(name)``) of the model's repeated
    blocks, in forward order, none inside another: what per-block activation
    checkpointing wraps (GPT: the transformer blocks; ResNet: the residual blocks; ...).
    Empty for a model without a block structure.
    """

    name: str
    model: nn.Module
    inputs: tuple[torch.Tensor, ...]
    loss_fn: Callable[[Any], torch.Tensor]
    inputs_for: Callable[[int, int], ZooCase] | None = None
    blocks: tuple[str, ...] = ()


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _build(seed: int, make: Callable[[], nn.Module], device: str | torch.device) -> nn.Module:
    """Construct a model with weights drawn from ``seed``, leaving the global RNG as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = make()
    return model.to(device).train()


def _names_of(model: nn.Module, block_type: type[nn.Module]) -> tuple[str, ...]:
    """Qualified names of ``model``'s submodules of ``block_type``, in registration order."""
    return tuple(name for name, module in model.named_modules() if isinstance(module, block_type))


# --------------------------------------------------------------------------- MLP


class MLP(nn.Module):
    """Linear -> GELU -> LayerNorm, repeated, then a linear head.

    Each Linear-GELU-LayerNorm group is one submodule (``net.0`` .. ``net.{n_layers-1}``),
    so it can be checkpointed as a block; modules are created in the same order as in a
    flat Sequential, so seeded weights do not depend on the grouping.
    """

    def __init__(self, d_in: int, d_hidden: int, d_out: int, n_layers: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = d_in
        for _ in range(n_layers):
            layers.append(nn.Sequential(nn.Linear(width, d_hidden), nn.GELU(), nn.LayerNorm(d_hidden)))
            width = d_hidden
        layers.append(nn.Linear(width, d_out))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def make_mlp(
    *,
    batch: int = 16,
    d_in: int = 32,
    d_hidden: int = 64,
    d_out: int = 10,
    n_layers: int = 3,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> ZooCase:
    """An MLP classifier with a cross-entropy loss."""
    model = _build(seed, lambda: MLP(d_in, d_hidden, d_out, n_layers), device)
    g = _generator(seed + 1)
    x = torch.randn(batch, d_in, generator=g).to(device)
    targets = torch.randint(0, d_out, (batch,), generator=g).to(device)
    blocks = tuple(f"net.{i}" for i in range(n_layers))
    return ZooCase("mlp", model, (x,), lambda logits: F.cross_entropy(logits, targets), blocks=blocks)


# --------------------------------------------------------------------------- ResNet


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus a (projected, if the shape changes) shortcut, then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """Stem, one residual stage per width (each after the first halves the resolution),
    global average pooling and a linear head."""

    def __init__(self, in_channels: int, widths: tuple[int, ...], blocks_per_stage: int, n_classes: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(),
        )
        stages: list[nn.Module] = []
        c_in = widths[0]
        for i, width in enumerate(widths):
            for j in range(blocks_per_stage):
                stages.append(BasicBlock(c_in, width, stride=2 if i > 0 and j == 0 else 1))
                c_in = width
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(c_in, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.head(torch.flatten(self.pool(x), 1))


def make_resnet(
    *,
    batch: int = 4,
    image_size: int = 16,
    in_channels: int = 3,
    widths: tuple[int, ...] = (8, 16),
    blocks_per_stage: int = 1,
    n_classes: int = 10,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> ZooCase:
    """A ResNet-style image classifier; BatchNorm in training mode updates its running stats."""
    model = _build(seed, lambda: ResNet(in_channels, widths, blocks_per_stage, n_classes), device)
    g = _generator(seed + 1)
    x = torch.randn(batch, in_channels, image_size, image_size, generator=g).to(device)
    targets = torch.randint(0, n_classes, (batch,), generator=g).to(device)
    return ZooCase(
        "resnet", model, (x,), lambda logits: F.cross_entropy(logits, targets), blocks=_names_of(model, BasicBlock)
    )


# --------------------------------------------------------------------------- GPT


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be a multiple of n_heads ({n_heads})")
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        q, k, v = (z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class GPTBlock(nn.Module):
    """Pre-LayerNorm transformer decoder block."""

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads, dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model),
            nn.GELU(),
            nn.Linear(4 * d_model, d_model),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab: int, seq_len: int, d_model: int, n_heads: int, n_layers: int, dropout: float) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, d_model)
        self.pos_emb = nn.Embedding(seq_len, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(GPTBlock(d_model, n_heads, dropout) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.drop(self.tok_emb(tokens) + self.pos_emb(positions))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def make_gpt(
    *,
    n_layers: int = 2,
    d_model: int = 32,
    n_heads: int = 4,
    seq_len: int = 16,
    vocab: int = 64,
    batch: int = 2,
    dropout: float = 0.1,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> ZooCase:
    """A GPT-style language model with a next-token cross-entropy loss."""
    model = _build(seed, lambda: GPT(vocab, seq_len, d_model, n_heads, n_layers, dropout), device)
    g = _generator(seed + 1)
    text = torch.randint(0, vocab, (batch, seq_len + 1), generator=g).to(device)
    tokens, targets = text[:, :-1].contiguous(), text[:, 1:].contiguous()

    def loss_fn(logits: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    return ZooCase("gpt", model, (tokens,), loss_fn, blocks=_names_of(model, GPTBlock))


# --------------------------------------------------------------------------- U-Net


class ConvBlock(nn.Module):
    """Two (conv 3x3, GroupNorm, SiLU) layers."""

    def __init__(self, c_in: int, c_out: int, groups: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, padding=1),
            nn.GroupNorm(groups, c_out),
            nn.SiLU(),
            nn.Conv2d(c_out, c_out, 3, padding=1),
            nn.GroupNorm(groups, c_out),
            nn.SiLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class UNet(nn.Module):
    """Encoder (conv blocks, strided-conv downsampling), bottleneck, decoder (nearest
    upsampling, concatenation with the encoder's skip, conv block), 1x1 output conv."""

    def __init__(self, channels: int, widths: tuple[int, ...], groups: int) -> None:
        super().__init__()
        self.inp = nn.Conv2d(channels, widths[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        self.downsample = nn.ModuleList()
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            self.down_blocks.append(ConvBlock(c_in, c_in, groups))
            self.downsample.append(nn.Conv2d(c_in, c_out, 3, stride=2, padding=1))
        self.mid = ConvBlock(widths[-1], widths[-1], groups)
        self.upsample = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        for c_skip, c_in in reversed(list(zip(widths[:-1], widths[1:]))):
            self.upsample.append(nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(c_in, c_skip, 3, padding=1)))
            self.up_blocks.append(ConvBlock(2 * c_skip, c_skip, groups))
        self.out = nn.Conv2d(widths[0], channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        skips = []
        for block, down in zip(self.down_blocks, self.downsample):
            h = block(h)
            skips.append(h)
            h = down(h)
        h = self.mid(h)
        for up, block in zip(self.upsample, self.up_blocks):
            h = block(torch.cat([up(h), skips.pop()], dim=1))
        return self.out(h)


def make_unet(
    *,
    batch: int = 2,
    channels: int = 3,
    image_size: int = 16,
    widths: tuple[int, ...] = (8, 16, 32),
    groups: int = 4,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> ZooCase:
    """A U-Net denoiser: predict the noise added to an image (mean squared error)."""
    levels = len(widths) - 1
    if image_size % (2**levels):
        raise ValueError(f"image_size ({image_size}) must be divisible by 2**{levels} for widths {widths}")
    model = _build(seed, lambda: UNet(channels, widths, groups), device)
    g = _generator(seed + 1)
    images = torch.randn(batch, channels, image_size, image_size, generator=g)
    noise = torch.randn(images.shape, generator=g)
    noisy, noise = (images + noise).to(device), noise.to(device)
    return ZooCase("unet", model, (noisy,), lambda pred: F.mse_loss(pred, noise), blocks=_names_of(model, ConvBlock))


class UpsamplingDecoder(nn.Module):
    """A U-Net decoder level on its own: convolution, sigmoid, nearest upsampling,
    convolution; the loss is the output's mean square, plus the upsampled value's with
    ``squared`` (then the backward reads that value besides the convolutions)."""

    def __init__(self, squared: bool = False) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(16, 32, 3, padding=1), nn.Conv2d(32, 16, 3, padding=1)
        self.squared = squared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(self.a(x).sigmoid(), scale_factor=2.0)
        loss = self.b(up).square().mean()
        return loss + up.square().mean() if self.squared else loss


# --------------------------------------------------------------------------- dynamic shapes


class EncoderLayer(nn.Module):
    """Pre-LayerNorm bidirectional self-attention (SDPA) and GELU MLP; any batch and length."""

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.dropout = dropout
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 2 * d_model), nn.GELU(), nn.Linear(2 * d_model, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).chunk(3, dim=-1)
        q, k, v = (z.reshape(b, t, self.n_heads, d // self.n_heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class DynamicEncoder(nn.Module):
    """A transformer encoder over (batch, seq, d_in) features, predicting d_in per position."""

    def __init__(self, d_in: int, d_model: int, n_heads: int, n_layers: int, dropout: float) -> None:
        super().__init__()
        self.inp = nn.Linear(d_in, d_model)
        self.layers = nn.ModuleList(EncoderLayer(d_model, n_heads, dropout) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.out = nn.Linear(d_model, d_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for layer in self.layers:
            h = layer(h)
        return self.out(self.ln_f(h))


def _dynamic_case(model: DynamicEncoder, d_in: int, seed: int, batch: int, seq: int) -> ZooCase:
    # inputs and targets depend on (seed, batch, seq) only, so each shape is reproducible
    g = _generator(seed * 1_000_003 + batch * 1009 + seq)
    device = next(model.parameters()).device
    x = torch.randn(batch, seq, d_in, generator=g).to(device)
    target = torch.randn(batch, seq, d_in, generator=g).to(device)

    def inputs_for(b: int, s: int) -> ZooCase:
        return _dynamic_case(model, d_in, seed, b, s)

    return ZooCase(
        "dynamic", model, (x,), lambda pred: F.mse_loss(pred, target), inputs_for, _names_of(model, EncoderLayer)
    )


def make_dynamic(
    *,
    batch: int = 2,
    seq: int = 8,
    d_in: int = 16,
    d_model: int = 32,
    n_heads: int = 4,
    n_layers: int = 2,
    dropout: float = 0.1,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> ZooCase:
    """A transformer encoder meant for ``torch.compile(..., dynamic=True)``: its weights do
    not depend on batch or sequence length; ``case.inputs_for(batch, seq)`` gives other shapes."""
    model = _build(seed, lambda: DynamicEncoder(d_in, d_model, n_heads, n_layers, dropout), device)
    return _dynamic_case(model, d_in, seed, batch, seq)


ZOO: dict[str, Callable[..., ZooCase]] = {
    "mlp": make_mlp,
    "resnet": make_resnet,
    "gpt": make_gpt,
    "unet": make_unet,
    "dynamic": make_dynamic,
}
