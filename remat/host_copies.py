"""The ops that move offloaded values to host memory and back, registered with
``torch.library`` so that the eager inner compiler and Inductor both call them.

On CUDA every copy runs on one side stream per device, so compute goes on while it
moves:

- ``remat::offload(x)`` copies ``x`` into a pinned host tensor of the same strides,
  after the work queued so far (which made ``x``). ``x.record_stream`` keeps the
  caching allocator from handing ``x``'s memory out again before the copy is done.
  Pinned buffers come from PyTorch's caching host allocator, which reuses them from
  step to step and does not hand one out again while a copy into it is pending.
- ``remat::reload(host, device)`` allocates the device copy on the compute stream
  and fills it on the side stream after the work queued so far, recording an event.
  The pass places it ahead of the first use, so the copy overlaps compute.
- ``remat::wait_reload(x)`` makes the compute stream wait for that event. It is
  declared as writing ``x`` (the copy's result becomes visible there), so every
  reader of ``x`` is ordered after it, under Inductor too.

On the CPU the copies are real copies into separate buffers, made at once, and the
wait does nothing: the graphs have the same structure everywhere.
"""

from __future__ import annotations

import torch

_side_streams: dict[int, torch.cuda.Stream] = {}
_pending: dict[tuple[int, int], torch.cuda.Event] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _side_streams:
        _side_streams[index] = torch.cuda.Stream(index)
    return _side_streams[index]


def _empty_like_strided(x: torch.Tensor, device: torch.device | str, pin_memory: bool = False) -> torch.Tensor:
    return torch.empty_strided(x.size(), x.stride(), dtype=x.dtype, device=device, pin_memory=pin_memory)


@torch.library.custom_op("remat::offload", mutates_args=())
def offload(x: torch.Tensor) -> torch.Tensor:
    """A host copy of ``x`` (pinned, filled on the side stream, on CUDA)."""
    if x.device.type != "cuda":
        return _empty_like_strided(x, "cpu").copy_(x)
    host = _empty_like_strided(x, "cpu", pin_memory=True)
    side = _side_stream(x.device)
    side.wait_stream(torch.cuda.current_stream(x.device))
    with torch.cuda.stream(side):
        host.copy_(x, non_blocking=True)
    x.record_stream(side)
    return host


@offload.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return _empty_like_strided(x, "cpu")


@torch.library.custom_op("remat::reload", mutates_args=())
def reload(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A copy of ``host`` on ``device`` (filled on the side stream, on CUDA: wait with
    ``wait_reload`` before reading it)."""
    if device.type != "cuda":
        return _empty_like_strided(host, device).copy_(host)
    out = _empty_like_strided(host, device)
    side = _side_stream(out.device)
    side.wait_stream(torch.cuda.current_stream(out.device))
    with torch.cuda.stream(side):
        out.copy_(host, non_blocking=True)
        done = torch.cuda.Event()
        done.record(side)
    out.record_stream(side)
    _pending[out.device.index, out.data_ptr()] = done
    return out


@reload.register_fake
def _(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    return _empty_like_strided(host, device)


@torch.library.custom_op("remat::wait_reload", mutates_args=("x",))
def wait_reload(x: torch.Tensor) -> None:
    """Make the compute stream wait until the reload of ``x`` has landed."""
    if x.device.type != "cuda":
        return
    done = _pending.pop((x.device.index, x.data_ptr()), None)
    if done is not None:
        torch.cuda.current_stream(x.device).wait_event(done)


@wait_reload.register_fake
def _(x: torch.Tensor) -> None:
    return None
