"""Compressing one gradient, and rebuilding it: top-k, PowerSGD, bf16, or dense.

Each encoder reads ``work`` (the gradient, or the gradient plus the error-feedback
residual) and, when ``in_place`` is set (error feedback on, ``work`` is the residual),
leaves in ``work`` exactly what it dropped: ``work_before == kept + work_after``. Every
tensor of a ``Compressed`` is freshly allocated: Inductor reuses a backward buffer once
its last reader (the store op) has run, so a reference into it would change under us.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch

Kind = Literal["topk", "lowrank", "bf16"]
INT32_MAX = 2**31 - 1
# torch.topk on the CPU sorts (value, int64 index) pairs of its whole input: 16 bytes per
# element, four times the gradient. Selecting within chunks of this many elements, then
# among their winners, bounds that (and the |g| temporary) by the chunk.
TOPK_CHUNK = 1 << 18


@dataclasses.dataclass(frozen=True)
class Compressed:
    """One compressed gradient: its tensors and what it is the compression of."""

    kind: Kind
    tensors: tuple[torch.Tensor, ...]
    shape: torch.Size

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)

    def to(self, device: torch.device) -> Compressed:
        """A copy on ``device``: pinned host memory when moving a GPU tensor to the CPU."""
        if all(t.device == device for t in self.tensors):
            return self
        pin = device.type == "cpu" and torch.cuda.is_available()
        moved = tuple(
            torch.empty(t.shape, dtype=t.dtype, device=device, pin_memory=pin).copy_(t) for t in self.tensors
        )
        return dataclasses.replace(self, tensors=moved)

    def add_to(self, dense: torch.Tensor) -> None:
        """``dense += decompressed``, without building the decompressed tensor when avoidable."""
        if tuple(dense.shape) != tuple(self.shape):
            raise ValueError(f"a compressed gradient of shape {tuple(self.shape)} cannot be added to shape {tuple(dense.shape)}")
        parts = [t.to(dense.device) for t in self.tensors]
        if self.kind == "topk":
            values, indices = parts
            dense.view(-1).index_add_(0, indices, values.to(dense.dtype))
        elif self.kind == "lowrank":
            p, q = parts
            dense.view(dense.shape[0], -1).addmm_(p.to(dense.dtype), q.to(dense.dtype).T)
        else:
            dense.add_(parts[0].to(dense.dtype))


def encode_topk(work: torch.Tensor, ratio: float, in_place: bool) -> Compressed:
    """The ``numel / ratio`` entries of largest magnitude, as values and int32 flat indices."""
    flat = work.reshape(-1)
    k = max(1, int(flat.numel() / ratio))
    indices = _largest_magnitudes(flat, k)
    values = flat[indices]
    if in_place:
        flat[indices] = 0
    return Compressed("topk", (values, indices.to(torch.int32)), work.shape)


def _largest_magnitudes(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` entries of largest |value| (ties broken arbitrarily): each
    chunk's top ``k`` holds every global winner in it, so the top ``k`` of the chunks'
    winners is the global top ``k``."""
    if flat.numel() <= TOPK_CHUNK:
        return flat.abs().topk(k, sorted=False).indices
    values, indices = [], []
    for start in range(0, flat.numel(), TOPK_CHUNK):
        chunk = flat[start : start + TOPK_CHUNK].abs()
        top = chunk.topk(min(k, chunk.numel()), sorted=False)
        values.append(top.values)
        indices.append(top.indices + start)
    winners = torch.cat(indices)
    return winners[torch.cat(values).topk(k, sorted=False).indices]


def encode_bf16(work: torch.Tensor, in_place: bool) -> Compressed:
    """A bfloat16 copy (half the bytes of fp32; the rounding error is what is dropped)."""
    values = work.to(torch.bfloat16, copy=True)
    if in_place:
        work.sub_(values.to(work.dtype))
    return Compressed("bf16", (values,), work.shape)


def encode_lowrank(work: torch.Tensor, q: torch.Tensor, in_place: bool) -> Compressed:
    """PowerSGD's rank-r approximation ``P Q^T`` of ``work`` viewed as a matrix: one power
    iteration from the last step's ``Q`` (updated in place: the warm start)."""
    matrix = work.reshape(work.shape[0], -1)
    p = torch.linalg.qr(matrix @ q.to(matrix.dtype)).Q
    q.copy_(matrix.T @ p)
    if in_place:
        matrix.sub_(p @ q.T.to(matrix.dtype))
    return Compressed("lowrank", (p, q.clone()), work.shape)


def lowrank_fits(shape: torch.Size, rank: int) -> bool:
    """True when a rank-``rank`` factorization is smaller than the tensor itself."""
    if len(shape) < 2:
        return False
    rows = shape[0]
    cols = 1
    for size in shape[1:]:
        cols *= size
    return rank * (rows + cols) < rows * cols
