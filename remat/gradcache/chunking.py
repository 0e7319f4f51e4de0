"""Split a batch into chunks, run an encoder on a chunk, and read its representation.

A batch is a tensor, a mapping of names to tensors (a tokenizer's output, passed as
keyword arguments) or a tuple/list (passed as positional arguments). Every tensor in it
is split along its first dimension; other values go to every chunk unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

import torch

from remat import _torch_internals as internals

Batch = Union[torch.Tensor, Mapping[str, Any], Sequence[Any]]
GetRep = Callable[[Any], torch.Tensor]


def tensors_of(batch: Batch) -> list[torch.Tensor]:
    """The tensors of a batch, in order."""
    if isinstance(batch, torch.Tensor):
        return [batch]
    values = batch.values() if isinstance(batch, Mapping) else batch
    return [v for v in values if isinstance(v, torch.Tensor)]


def batch_size(batch: Batch, name: str) -> int:
    """The common first dimension of the batch's tensors; a ValueError names any that differ."""
    if not isinstance(batch, (torch.Tensor, Mapping, list, tuple)):
        raise TypeError(
            f"{name} must be a tensor, a dict of tensors or a tuple/list of tensors; got {type(batch).__name__}"
        )
    tensors = tensors_of(batch)
    if not tensors or any(t.dim() == 0 for t in tensors):
        raise ValueError(f"{name} must hold at least one tensor, each with a batch dimension (dim 0)")
    sizes = {t.shape[0] for t in tensors}
    if len(sizes) > 1:
        shapes = [tuple(t.shape) for t in tensors]
        raise ValueError(f"the tensors of {name} disagree on the batch size (dim 0): shapes {shapes}")
    return sizes.pop()


def _map_tensors(batch: Batch, fn: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return {k: fn(v) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return type(batch)(fn(v) if isinstance(v, torch.Tensor) else v for v in batch)


def _rows(tensor: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    part = tensor[start:stop]
    internals.mark_batch_dynamic(part)  # a compiled encoder reuses its graph for the short last chunk
    return part


def split(batch: Batch, size: int, chunk_size: int) -> list[Batch]:
    """Chunks of ``chunk_size`` rows (the last may be shorter), as views of the batch,
    their batch dimension marked dynamic for ``torch.compile``."""
    return [_map_tensors(batch, lambda t, s=start: _rows(t, s, s + chunk_size)) for start in range(0, size, chunk_size)]


def encode(encoder: Callable[..., Any], chunk: Batch, get_rep: GetRep | None, rows: int, name: str) -> torch.Tensor:
    """The representation of a chunk of ``rows`` rows: ``get_rep(encoder(chunk))``, or the
    output itself when it is a tensor."""
    if isinstance(chunk, torch.Tensor):
        output = encoder(chunk)
    elif isinstance(chunk, Mapping):
        output = encoder(**chunk)
    else:
        output = encoder(*chunk)
    rep = output if get_rep is None else get_rep(output)
    if not isinstance(rep, torch.Tensor):
        if get_rep is None:
            raise TypeError(
                f"the encoder of {name} returned a {type(output).__name__}, not a tensor; pass "
                "get_rep=... to pick the representation out of it (e.g. lambda out: out.pooler_output)"
            )
        raise TypeError(f"get_rep returned a {type(rep).__name__} for {name}; it must return a tensor")
    if rep.dim() == 0 or rep.shape[0] != rows:
        raise ValueError(
            f"the representation of {name} has shape {tuple(rep.shape)}; it must have one row per "
            f"example ({rows} in this chunk) along dim 0"
        )
    return rep
