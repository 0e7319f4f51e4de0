"""``remat.GradientStore``: where compressed gradients wait for the optimizer.

    model = torch.compile(model, backend="remat", options={"compress": {"method": "topk", "ratio": 100}})
    store = remat.GradientStore(model, optimizer)   # optimizer.step() now finds the gradients
    loss = model(x); loss.backward(); optimizer.step(); optimizer.zero_grad()

The compiled backward leaves ``.grad`` empty for compressed parameters and files each
compressed gradient in its parameter's slot (``remat.compress.slots``). ``attach``ed to
an optimizer, the store rebuilds one parameter's dense gradient at a time and steps the
optimizer on that parameter alone, so at most one dense gradient exists during the step.
That is exact for optimizers whose update of a parameter reads only that parameter's
gradient and state (SGD, Adam, AdamW, RMSprop, ...); step hooks then run once per
parameter. For anything that needs all gradients at once (gradient clipping, LBFGS),
call ``apply_gradients()`` first: it writes every dense ``.grad``. A closure passed to
``step`` is evaluated once, before the stored gradients are used (Lightning's automatic
optimization runs the training step in it); optimizers that re-evaluate it (LBFGS) are
not supported.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch

from remat.compress import slots
from remat.compress.slots import Slot


@dataclasses.dataclass(frozen=True)
class StoreSummary:
    """What the store holds now, and what the last backward compressed."""

    parameters: int
    compression_ratio: float
    bytes_kept: int
    bytes_saved: int
    residual_norms: dict[str, float]

    def __str__(self) -> str:
        return (
            f"GradientStore: {self.parameters} compressed parameters, ratio {self.compression_ratio:.1f}x, "
            f"{self.bytes_kept} bytes kept, {self.bytes_saved} bytes saved, "
            f"residual norm {sum(n * n for n in self.residual_norms.values()) ** 0.5:.4g}"
        )


class GradientStore:
    """The compressed gradients of ``model``'s parameters (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        module = getattr(model, "_orig_mod", model)  # the module given to torch.compile
        self.model = module
        self._names = {p: name for name, p in module.named_parameters()}
        self._loaded: dict[torch.Tensor, dict[str, torch.Tensor]] = {}
        for parameter in self._names:
            slots.set_owner(parameter, self)
        if optimizer is not None:
            self.attach(optimizer)

    def attach(self, optimizer: torch.optim.Optimizer) -> GradientStore:
        """Make ``optimizer.step()`` consume the stored gradients, one parameter at a time."""
        original = optimizer.step

        @functools.wraps(original)
        def step(closure: Callable[[], Any] | None = None) -> Any:
            return self._step(optimizer, original, closure)

        optimizer.step = step  # type: ignore[method-assign]
        return self

    def apply_gradients(self) -> int:
        """Write every stored gradient into ``.grad`` (added to what is there, as backward
        would); return how many parameters got one. For manual loops and clipping."""
        count = 0
        for parameter, slot in self._slots():
            dense = slot.take()
            if dense is not None:
                _accumulate(parameter, dense)
                count += 1
        return count

    def zero_grad(self) -> None:
        """Drop the stored gradients (the residuals stay: they are the optimizer's debt)."""
        for _, slot in self._slots():
            slot.pending.clear()

    def summary(self) -> StoreSummary:
        found = list(self._slots())
        dense = sum(s.last_dense_bytes for _, s in found)
        compressed = sum(s.last_compressed_bytes for _, s in found)
        kept = sum(c.nbytes for _, s in found for c in s.pending)
        return StoreSummary(
            parameters=len(found),
            compression_ratio=dense / compressed if compressed else 1.0,
            bytes_kept=kept,
            bytes_saved=sum(len(s.pending) * s.last_dense_bytes for _, s in found) - kept,
            residual_norms={s.name: s.residual.norm().item() for _, s in found if s.residual is not None},
        )

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        """The error-feedback residuals (and PowerSGD's warm-start ``Q``), by parameter name."""
        return {self._names[p]: slot.state() for p, slot in self._slots() if slot.state()}

    def load_state_dict(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        """Restore ``state_dict()``; parameters not compiled yet get it when they are."""
        by_name = {name: p for p, name in self._names.items()}
        unknown = sorted(set(state) - set(by_name))
        if unknown:
            raise ValueError(f"remat.GradientStore.load_state_dict: no parameter named {unknown} in {type(self.model).__name__}")
        for name, tensors in state.items():
            parameter = by_name[name]
            tensors = {key: t.detach().clone() for key, t in tensors.items()}
            slot = slots.slot_of(parameter)
            if slot is None:
                self._loaded[parameter] = tensors
            else:
                slot.load_state(tensors)

    def restore_into(self, parameter: torch.Tensor, slot: Slot) -> None:
        """Called when ``parameter`` gets a slot: hand it the state loaded before compiling."""
        loaded = self._loaded.pop(parameter, None)
        if loaded is not None:
            slot.load_state(loaded)

    def _slots(self) -> Iterator[tuple[torch.Tensor, Slot]]:
        found = [(p, slots.slot_of(p)) for p in self._names]
        found = [(p, s) for p, s in found if s is not None]
        if not found:
            raise RuntimeError(
                f"remat.GradientStore: no parameter of this {type(self.model).__name__} has compressed gradients. "
                "Compile the model with torch.compile(model, backend='remat', options={'compress': {...}}) "
                "(not distributed=True, not method='none') and run its backward before using the store"
            )
        return iter(found)

    def _step(self, optimizer: torch.optim.Optimizer, original: Callable[..., Any], closure: Callable[[], Any] | None) -> Any:
        """Step the parameters that have dense gradients together, then each stored one alone."""
        loss = None
        if closure is not None:  # evaluated once, first, as SGD/Adam/AdamW do (Lightning passes one)
            with torch.enable_grad():
                loss = closure()
        stored = [(p, s) for p, s in self._slots() if s.pending]
        if not stored:
            original()
            return loss
        in_step = {p for group in optimizer.param_groups for p in group["params"]}
        dense = {p: p.grad for p in in_step if p.grad is not None}
        for p, _ in stored:
            if p in dense:  # a dense part from outside the compiled graph joins the stored one
                p.grad = None
        original()
        for p in dense:
            p.grad = None
        try:
            for parameter, slot in stored:
                if parameter in in_step:
                    parameter.grad = dense.pop(parameter, None)
                    _accumulate(parameter, slot.take())
                    original()
                    parameter.grad = None
        finally:
            for p, grad in dense.items():
                p.grad = grad
        return loss


def _accumulate(parameter: torch.Tensor, dense: torch.Tensor) -> None:
    if parameter.grad is None:
        parameter.grad = dense
    else:
        parameter.grad.add_(dense)
