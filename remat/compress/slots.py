"""Per-parameter compression state, and the op the compiled backward calls.

The backward graph cannot take new inputs (AOTAutograd fixes its calling convention),
so each compressed gradient is handed over by key: ``remat::store_gradient(grad, key)``
looks up the parameter's ``Slot``, adds the error-feedback residual, compresses, and
keeps the compressed form until a ``GradientStore`` rebuilds the dense gradient for the
optimizer. The op is registered with ``torch.library`` so that Inductor calls it in
place (declared as mutating ``grad``, so no pass removes a call whose output nobody
reads; it does not write to it).

Slots are filed under their parameter (weakly: a slot goes with its model) and keys map
to slots weakly, like ``remat.registry`` files Plans.
"""

from __future__ import annotations

import itertools
import warnings
import weakref
from typing import Any

import torch
from torch.utils.weak import WeakIdKeyDictionary

from remat.compress import codecs
from remat.compress.settings import CompressOptions
from remat.warning_site import user_stacklevel

_keys = itertools.count()
_by_key: weakref.WeakValueDictionary[int, Slot] = weakref.WeakValueDictionary()
_slots: WeakIdKeyDictionary = WeakIdKeyDictionary()  # parameter -> Slot
_owners: WeakIdKeyDictionary = WeakIdKeyDictionary()  # parameter -> GradientStore (set by the store)


class RematCompressWarning(UserWarning):
    """A gradient could not be compressed safely and stays dense, or compression state was reset."""


class Slot:
    """What compression keeps for one parameter: its residual, its PowerSGD ``Q``, and the
    compressed gradients received since the optimizer last consumed them."""

    def __init__(self, parameter: torch.Tensor, name: str, options: CompressOptions) -> None:
        self.key = next(_keys)
        self.parameter = weakref.ref(parameter)
        self.name = name
        self.options = options
        self.shape = parameter.shape
        self.method = options.method
        self.residual: torch.Tensor | None = None
        self.q: torch.Tensor | None = None
        self.pending: list[codecs.Compressed] = []
        self.last_dense_bytes = 0
        self.last_compressed_bytes = 0

    def receive(self, grad: torch.Tensor) -> None:
        """Compress one gradient of this parameter (called from the compiled backward)."""
        parameter = self.parameter()
        if parameter is None or _owners.get(parameter) is None:
            raise RuntimeError(
                f"remat: the gradient of parameter {self.name!r} is compressed (option 'compress'), but no "
                "remat.GradientStore holds this model's gradients, so the optimizer would never see it. "
                "Create one before the backward: store = remat.GradientStore(model, optimizer)"
            )
        if grad.shape != self.shape:
            raise RuntimeError(
                f"remat: parameter {self.name!r} was compiled with shape {tuple(self.shape)} but its gradient "
                f"has shape {tuple(grad.shape)}; recompile the model (torch.compiler.reset())"
            )
        work, in_place = grad, self.options.error_feedback
        if in_place:
            if self.residual is None:
                self.residual = torch.zeros_like(grad, dtype=torch.promote_types(grad.dtype, torch.float32))
            work = self.residual.add_(grad)
        compressed = self._encode(work, in_place)
        place = torch.device("cpu") if self.options.to == "cpu" else grad.device
        self.pending.append(compressed.to(place))
        self.last_dense_bytes = grad.numel() * grad.element_size()
        self.last_compressed_bytes = compressed.nbytes

    def take(self) -> torch.Tensor | None:
        """The sum of the pending gradients, dense, in the parameter's dtype; empties the slot."""
        parameter = self.parameter()
        if not self.pending or parameter is None:
            return None
        if parameter.shape != self.shape:
            raise RuntimeError(
                f"remat: parameter {self.name!r} changed shape from {tuple(self.shape)} to "
                f"{tuple(parameter.shape)} after its gradient was compressed; the stored gradient "
                "does not fit it. Drop it with store.zero_grad() and recompile (torch.compiler.reset())"
            )
        dense = torch.zeros_like(parameter)
        for compressed in self.pending:
            compressed.add_to(dense)
        self.pending.clear()
        return dense

    def _encode(self, work: torch.Tensor, in_place: bool) -> codecs.Compressed:
        if self.method == "topk":
            return codecs.encode_topk(work, self.options.ratio, in_place)
        if self.method == "bf16":
            return codecs.encode_bf16(work, in_place)
        if self.q is None:
            generator = torch.Generator(device=work.device).manual_seed(0)
            self.q = torch.randn(self._q_shape(), generator=generator, device=work.device, dtype=work.dtype)
        return codecs.encode_lowrank(work, self.q, in_place)

    def state(self) -> dict[str, torch.Tensor]:
        return {name: t for name, t in (("residual", self.residual), ("q", self.q)) if t is not None}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Take ``state`` (tensors the caller owns: this may run while compiling, where no
        real tensor can be made)."""
        expected = {"residual": self.shape, "q": self._q_shape()}
        for name, tensor in state.items():
            if name not in expected or tensor.shape != expected[name]:
                raise ValueError(
                    f"remat.GradientStore.load_state_dict: {name!r} of parameter {self.name!r} has shape "
                    f"{tuple(tensor.shape)}; this parameter's compression state is {dict(expected)}"
                )
            setattr(self, name, tensor)

    def _q_shape(self) -> torch.Size:
        return torch.Size((self.shape.numel() // self.shape[0] if self.shape else 1, self.options.rank))


def why_not_compressible(parameter: torch.Tensor, options: CompressOptions) -> str | None:
    """Why ``options.method`` cannot compress this parameter's gradient, or None if it can."""
    if options.method == "topk" and parameter.numel() > codecs.INT32_MAX:
        return f"{parameter.numel()} elements do not fit top-k's int32 indices"
    if options.method == "powersgd" and not codecs.lowrank_fits(parameter.shape, options.rank):
        return f"a rank-{options.rank} factorization of shape {tuple(parameter.shape)} is no smaller than the tensor"
    return None


def register(parameter: torch.Tensor, name: str, options: CompressOptions) -> Slot:
    """The slot of ``parameter`` under ``options``: the existing one if it still fits (a
    recompile keeps its residual), else a new one."""
    slot = _slots.get(parameter)
    if slot is not None and slot.options == options and slot.shape == parameter.shape:
        return slot
    if slot is not None and slot.state():
        warnings.warn(
            f"remat: parameter {name!r} was recompiled with another shape or compress option; its "
            "error-feedback state is reset", RematCompressWarning, stacklevel=user_stacklevel(),
        )
    slot = Slot(parameter, name, options)
    _slots[parameter] = slot
    _by_key[slot.key] = slot
    owner = _owners.get(parameter)
    if owner is not None:
        owner.restore_into(parameter, slot)
    return slot


def slot_of(parameter: torch.Tensor) -> Slot | None:
    return _slots.get(parameter)


def set_owner(parameter: torch.Tensor, store: Any) -> None:
    _owners[parameter] = store


@torch.library.custom_op("remat::store_gradient", mutates_args=("grad",))
def store_gradient(grad: torch.Tensor, key: int) -> None:
    """Compress ``grad`` into the slot ``key`` (see the module docstring)."""
    slot = _by_key.get(key)
    if slot is None:
        raise RuntimeError(f"remat: the compressed gradient slot {key} is gone (its parameter was freed)")
    slot.receive(grad)


@store_gradient.register_fake
def _(grad: torch.Tensor, key: int) -> None:
    return None
