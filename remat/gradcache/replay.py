"""Capture and replay the random and autocast state of one forward pass.

GradCache runs every chunk forward twice: once without a graph (for the representations
the loss needs) and once with one (to back-propagate the cached gradient). Both runs
must draw the same dropout masks and compute in the same precision, or the replay
back-propagates through a different function than the one whose output the loss saw.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from collections.abc import Iterator

import torch
from torch.utils.checkpoint import get_device_states, set_device_states

# Accelerator whose RNG is replayed when tensors sit on several kinds (as torch.utils.checkpoint does).
_PREFERRED_DEVICE_TYPE = "cuda"


@dataclasses.dataclass(frozen=True)
class ReplayState:
    """The CPU generator, the generators of the accelerators the tensors live on, and the
    autocast settings of the CPU and those accelerators, at the moment of ``capture``."""

    cpu_rng: torch.Tensor
    device_type: str
    device_ids: list[int]
    device_rngs: list[torch.Tensor]
    autocast: tuple[tuple[str, bool, torch.dtype], ...]

    @classmethod
    def capture(cls, *tensors: torch.Tensor) -> ReplayState:
        """Record the state a forward over ``tensors`` (inputs, and a parameter of the
        module, so a model that moves its inputs is covered) is about to run in."""
        one_per_device = list({t.device: t for t in tensors}.values())
        accelerators = {t.device.type for t in one_per_device} - {"cpu", "meta"}
        device_type = _PREFERRED_DEVICE_TYPE if _PREFERRED_DEVICE_TYPE in accelerators or not accelerators else min(accelerators)
        device_ids, device_rngs = get_device_states(*(t for t in one_per_device if t.device.type == device_type))
        autocast = tuple(
            (kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
            for kind in sorted({"cpu", *accelerators})
        )
        return cls(torch.get_rng_state(), device_type, device_ids, device_rngs, autocast)

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        """Run the body in the captured state; the generators are restored afterwards, so
        the replay draws nothing from the caller's random stream."""
        with torch.random.fork_rng(devices=self.device_ids, device_type=self.device_type), contextlib.ExitStack() as stack:
            torch.set_rng_state(self.cpu_rng)
            set_device_states(self.device_ids, self.device_rngs, device_type=self.device_type)
            for kind, enabled, dtype in self.autocast:
                stack.enter_context(torch.autocast(kind, dtype=dtype, enabled=enabled))
            yield


def first_parameter(module: torch.nn.Module) -> list[torch.Tensor]:
    """One parameter of the module (none if it has none): its device is where the forward
    draws random numbers even when the inputs arrive on the CPU."""
    return list(itertools.islice(module.parameters(), 1))
