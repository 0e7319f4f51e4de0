"""What GradCache does differently under torch.distributed.

Every rank computes the loss over the representations of all ranks (all-gathered with
gradient, so the in-batch negatives are the global batch). The all-gather's backward
sums the gradient of every rank's (identical) loss, so each rank's parameter gradient
is world_size times its share of the full-batch gradient, and DDP's averaging
all-reduce turns that into exactly the full-batch gradient: no extra scaling.

DDP all-reduces on the backward of a forward that ran outside ``no_sync``; GradCache
runs every chunk but the last of each module under ``no_sync``, so a step makes one
round of all-reduces, not one per chunk.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn


def is_distributed() -> bool:
    """True when a process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather(rep: torch.Tensor) -> torch.Tensor:
    """The representations of all ranks, in rank order, differentiable with respect to this rank's."""
    if not is_distributed():
        return rep
    return torch.cat(dist_fn.all_gather(rep))


def syncs(module: torch.nn.Module) -> bool:
    """Whether the module reduces gradients across ranks on backward (DDP, FSDP: anything with ``no_sync``)."""
    return callable(getattr(module, "no_sync", None))


def no_sync(module: torch.nn.Module, enabled: bool) -> contextlib.AbstractContextManager[None]:
    """``module.no_sync()`` when enabled and the module has it; otherwise nothing."""
    return module.no_sync() if enabled and syncs(module) else contextlib.nullcontext()
