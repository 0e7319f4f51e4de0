"""Compressed data-parallel communication through torch.distributed's own DDP comm hooks.

With ``compress={"method": ..., "distributed": True}`` the backward keeps gradients
dense (DDP's reducer needs them) and the bytes DDP sends are compressed instead, by the
hooks torch.distributed ships and tests: PowerSGD (low rank, error feedback, warm start)
or bf16. No protocol of remat's own, so it runs on whatever backend DDP runs on.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
from torch.nn.parallel import DistributedDataParallel

from remat.compress.settings import CompressOptions

# PowerSGD needs two plain all-reduce iterations before it can start (torch requires
# start_powerSGD_iter > 1 with error feedback or warm start); remat starts right after.
POWERSGD_START_ITER = 2


def register_compression_hook(model: DistributedDataParallel, compress: Mapping[str, Any] | CompressOptions) -> Any:
    """Register the DDP comm hook that ``compress`` (with ``distributed=True``) names on
    ``model``; return the hook's state (PowerSGD's, to checkpoint it), or None."""
    options = CompressOptions.from_value(compress)
    if not options.distributed:
        raise ValueError(
            "remat.register_compression_hook compresses DDP communication: pass a compress option with "
            f"distributed=True; got {options.to_dict()!r}"
        )
    if not isinstance(model, DistributedDataParallel):
        raise TypeError(
            f"remat.register_compression_hook takes a torch.nn.parallel.DistributedDataParallel model; got "
            f"{type(model).__name__}. Register the hook before torch.compile(ddp_model, ...)"
        )
    if options.method == "none":
        return None
    if options.method == "bf16":
        backend = str(dist.get_backend(model.process_group))
        if "nccl" not in backend and "xccl" not in backend:  # DDP itself checks only how torch was built
            raise ValueError(
                f"remat option compress={options.to_dict()!r}: torch.distributed's bf16 comm hook needs the NCCL "
                f"or XCCL backend, not {backend!r}; use method='powersgd', which runs on every backend"
            )
        try:
            model.register_comm_hook(None, default_hooks.bf16_compress_hook)
        except TypeError as error:  # a build without NCCL >= 2.10 or XCCL
            raise ValueError(
                f"remat option compress={options.to_dict()!r}: torch.distributed's bf16 comm hook is not available "
                f"here ({error}); use method='powersgd', which runs on every backend"
            ) from error
        return None
    if torch.cuda.is_available() and any(p.device.type == "cpu" for p in model.parameters()):
        raise ValueError(
            f"remat option compress={options.to_dict()!r}: torch.distributed's PowerSGD hook calls "
            "torch.cuda.synchronize(bucket device) whenever CUDA is available, which fails for a bucket on the CPU; "
            "train this DDP model on the GPU, or hide the GPUs from CPU training (CUDA_VISIBLE_DEVICES='')"
        )
    state = powerSGD_hook.PowerSGDState(
        process_group=None,
        matrix_approximation_rank=options.rank,
        start_powerSGD_iter=POWERSGD_START_ITER if options.error_feedback else 1,
        use_error_feedback=options.error_feedback,
        warm_start=options.error_feedback,
    )
    model.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
    return state
