"""Which saved values go to host memory between the forward and the backward.

A saved value can be offloaded when moving it frees device memory and the copy can
be made exactly: it is a fresh tensor of its own storage (not a parameter, an input, a
view, or a value the caller receives), no other saved value shares its storage, its
strides cover its storage densely (an expanded tensor is refused), and it is at least
``offload_min_bytes``. ``refusal`` says why not, for the Plan.

``OffloadProblem`` simulates a step with some values offloaded: the memory timeline
(``cost_models.memory``) with each value's device windows from the copy-stream model
(``cost_models.transfers``), and the compute time the transfers leave exposed.
``choose`` offloads, largest first among the values live at the peak, until the
simulated peak fits a budget; ``lowest`` goes on while that lowers the peak.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx

from remat._torch_internals import is_primal, size_hint, storage_key
from remat.cost_models.memory import MemoryTimeline, order_fusions, simulate_order
from remat.cost_models.step_time import position_seconds
from remat.cost_models.sizes import human_bytes, node_tensor, packed_strides, storage_bytes
from remat.cost_models.transfers import Transfer, TransferSchedule, reload_position, copy_seconds, schedule_transfers
from remat.passes.recompute_rules import is_view
from remat.passes.schedule import StepOrder


def is_dense(tensor: torch.Tensor) -> bool:
    """Whether the elements cover the storage one to one, in some order of dimensions.
    Symbolic sizes are read at their hints: deciding must not add guards (a guard
    would specialize the compiled graph to the traced shapes)."""
    return (
        packed_strides(tensor)
        and size_hint(tensor.numel()) * tensor.element_size() == storage_bytes(tensor)
        and size_hint(tensor.storage_offset()) == 0
    )


def refusal(node: fx.Node, shared: set[int], user_outputs: set[fx.Node], min_bytes: int) -> str | None:
    """Why the saved value ``node`` may not be offloaded; None if it may. ``shared``:
    storages that more than one saved value uses."""
    tensor = node_tensor(node)
    if tensor is None:
        return "not a tensor"
    if node.op == "placeholder" or is_primal(node):
        return "a parameter or input: it stays on the device for the whole step"
    if is_view(node):
        return "a view: offloading it would not free its base"
    if node in user_outputs:
        return "a forward output: the caller holds it on the device"
    if storage_key(tensor) in shared:
        return "shares its storage with another saved value"
    nbytes = storage_bytes(tensor)
    if nbytes == 0:
        return "empty"
    if not is_dense(tensor):
        return "its strides do not cover its storage one to one (an expanded or sliced tensor)"
    if nbytes < min_bytes:
        return f"smaller ({human_bytes(nbytes)}) than offload_min_bytes ({human_bytes(min_bytes)})"
    return None


def shared_storages(saved: Iterable[fx.Node]) -> set[int]:
    """The storages more than one of ``saved`` uses: offloading one would free nothing."""
    seen: set[int] = set()
    shared: set[int] = set()
    for node in saved:
        tensor = node_tensor(node)
        if tensor is not None:
            key = storage_key(tensor)
            (shared if key in seen else seen).add(key)
    return shared


@dataclass
class OffloadOutcome:
    """A step with ``offloaded`` values on the host between the passes."""

    offloaded: list[fx.Node]
    timeline: MemoryTimeline
    schedule: TransferSchedule

    @property
    def peak(self) -> int:
        return self.timeline.peak_bytes + self.timeline.resident_bytes


class OffloadProblem:
    """One partition (``order``) and the saved values it may offload."""

    def __init__(
        self,
        order: StepOrder,
        seconds: Callable[[fx.Node], float],
        bandwidth: float,
        *,
        min_bytes: int,
        fused: bool,
        host_is_device: bool,
        only: Callable[[fx.Node], bool] | None = None,
    ) -> None:
        self.order = order
        self.bandwidth = bandwidth
        self.fused = fused
        self.host_is_device = host_is_device
        self.fusions = order_fusions(order) if fused else None
        self.seconds = position_seconds(order.forward, order.backward, seconds, self.fusions)
        self.backward_start = len(order.forward)
        shared = shared_storages(order.saved)
        users = set(order.user_outputs)
        self.refused: dict[fx.Node, str] = {}
        self.transfers: dict[fx.Node, Transfer] = {}
        produced = {node: i for i, node in enumerate(order.forward)}
        self.last_forward_read: dict[fx.Node, int] = {}
        for i, node in enumerate(order.forward):
            for arg in node.all_input_nodes:
                self.last_forward_read[arg] = i
        first_use: dict[fx.Node, int] = {}
        for i, node in enumerate(order.backward):
            for arg in node.all_input_nodes:
                first_use.setdefault(arg, self.backward_start + i)
        for node in order.saved:
            if only is not None and not only(node):
                continue
            why = refusal(node, shared, users, min_bytes)
            if why is None and (node not in produced or node not in first_use):
                why = "not made by the forward or not read by the backward"
            if why is not None:
                self.refused[node] = why
                continue
            tensor = node_tensor(node)
            assert tensor is not None
            self.transfers[node] = Transfer(node, storage_bytes(tensor), produced[node], first_use[node])

    @property
    def candidates(self) -> list[fx.Node]:
        return list(self.transfers)

    def evaluate(self, offloaded: Sequence[fx.Node]) -> OffloadOutcome:
        schedule = schedule_transfers(
            self.seconds, self.backward_start, [self.transfers[n] for n in offloaded], self.bandwidth
        )
        windows = {node: schedule.windows[node] for node in offloaded}
        timeline = simulate_order(
            self.order, fused=self.fused, offloads=windows, host_is_device=self.host_is_device, fusions=self.fusions
        )
        return OffloadOutcome(list(offloaded), timeline, schedule)

    def choose(self, budget: int) -> OffloadOutcome | None:
        """Offload until the simulated peak (resident bytes included) fits ``budget``:
        at each step the largest candidate that is on the host at the peak's position
        if offloaded. None when the candidates run out first."""
        outcome, met = self._greedy(budget)
        return outcome if met else None

    def lowest(self) -> OffloadOutcome:
        """The lowest simulated peak the same greedy order reaches."""
        return self._greedy(0)[0]

    def _greedy(self, budget: int) -> tuple[OffloadOutcome, bool]:
        """(the outcome that fits ``budget``, True), or (the lowest seen, False)."""
        chosen: list[fx.Node] = []
        outcome = best = self.evaluate(chosen)
        while outcome.peak > budget:
            at = outcome.timeline.live_bytes.index(outcome.timeline.peak_bytes)
            covering = [n for n in self.transfers if n not in chosen and self._away_at(n, at)]
            if not covering:
                return best, False
            chosen.append(max(covering, key=lambda n: self.transfers[n].nbytes))
            outcome = self.evaluate(chosen)
            if outcome.peak < best.peak:
                best = outcome
        return outcome, True

    def _away_at(self, node: fx.Node, position: int) -> bool:
        """Whether offloading ``node`` alone could take it off the device at ``position``."""
        transfer = self.transfers[node]
        duration = copy_seconds(transfer.nbytes, self.bandwidth)
        back = reload_position(self.seconds, transfer.first_use, self.backward_start, duration)
        on_device_until = max(transfer.produced, self.last_forward_read.get(node, transfer.produced))
        return on_device_until < position < back
