"""When offloaded values leave the device and come back: a model of the copy stream.

A step runs its nodes one after another on the compute stream, each taking its
estimated time. Copies run on one side stream, in the order they are issued:

- an offload is issued right after the node that makes its value, and starts once
  that node has run; the device copy can be reused only once the copy has finished
  (PyTorch's caching allocator waits for the side stream), so its storage lives
  until the first node that starts after the copy is done;
- a reload is issued ahead of its value's first use in the backward, so that the
  compute between the two covers the copy (prefetch); the first use waits for it,
  and any time the compute stream waits is exposed transfer time.

Positions are those of the memory timeline (``cost_models.memory``): the forward's
nodes, then the backward's. Only times move when the compute stream waits, never
positions, so the memory timeline is unchanged by the timing.
"""

from __future__ import annotations

import bisect
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

COPY_LATENCY_S = 10e-6  # issuing a copy and waiting on its event, per transfer


@dataclass(frozen=True)
class Transfer:
    """One offloaded value: ``nbytes``, made at position ``produced`` (forward), first
    read at position ``first_use`` (backward)."""

    key: Hashable
    nbytes: int
    produced: int
    first_use: int


@dataclass(frozen=True)
class Window:
    """Where an offloaded value is on the device: from its producer until position
    ``freed_after`` (the offload has finished), and again from ``reload_at`` (the reload
    allocates before the node there runs) to its last use."""

    freed_after: int
    reload_at: int


@dataclass(frozen=True)
class TransferSchedule:
    windows: dict[Hashable, Window]
    transfer_s: float  # time the side stream spends copying
    exposed_s: float  # time the compute stream waits for a reload


def copy_seconds(nbytes: int, bandwidth: float) -> float:
    return COPY_LATENCY_S + nbytes / bandwidth


def reload_position(seconds: Sequence[float], first_use: int, backward_start: int, duration: float) -> int:
    """The latest position at or after ``backward_start`` from which the compute up to
    ``first_use`` takes at least ``duration``: where a prefetch has time to finish."""
    covered, position = 0.0, first_use
    while position > backward_start and covered < duration:
        position -= 1
        covered += seconds[position]
    return position


def schedule_transfers(
    seconds: Sequence[float], backward_start: int, transfers: Sequence[Transfer], bandwidth: float
) -> TransferSchedule:
    """Place each transfer's reload and simulate both streams (see the module docstring).
    ``seconds[i]`` is the estimated time of the node at position ``i``."""
    count = len(seconds)
    duration = {t.key: copy_seconds(t.nbytes, bandwidth) for t in transfers}
    reload_at = {t.key: reload_position(seconds, t.first_use, backward_start, duration[t.key]) for t in transfers}
    offloads_after: dict[int, list[Transfer]] = {}
    reloads_before: dict[int, list[Transfer]] = {}
    waits_before: dict[int, list[Transfer]] = {}
    for t in sorted(transfers, key=lambda t: (t.produced, t.first_use)):
        offloads_after.setdefault(t.produced, []).append(t)
    for t in sorted(transfers, key=lambda t: (reload_at[t.key], t.first_use)):
        reloads_before.setdefault(reload_at[t.key], []).append(t)
        waits_before.setdefault(t.first_use, []).append(t)

    now = side_free = exposed = 0.0
    starts: list[float] = []
    offload_done: dict[Hashable, float] = {}
    reload_done: dict[Hashable, float] = {}
    for position in range(count):
        for t in reloads_before.get(position, ()):
            side_free = reload_done[t.key] = max(side_free, now) + duration[t.key]
        for t in waits_before.get(position, ()):
            if reload_done[t.key] > now:
                exposed += reload_done[t.key] - now
                now = reload_done[t.key]
        starts.append(now)
        now += seconds[position]
        for t in offloads_after.get(position, ()):
            side_free = offload_done[t.key] = max(side_free, now) + duration[t.key]
    windows = {}
    for t in transfers:
        # the first position that starts once the copy is done; the storage is free before it
        freed_after = bisect.bisect_left(starts, offload_done[t.key]) - 1
        windows[t.key] = Window(freed_after=min(max(freed_after, t.produced), count - 1), reload_at=reload_at[t.key])
    return TransferSchedule(windows, sum(duration.values()) * 2, exposed)

