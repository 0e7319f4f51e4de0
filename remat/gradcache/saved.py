"""Bytes a forward pass keeps for its backward: what ``recompute="auto"`` weighs against the budget."""

from __future__ import annotations

from collections.abc import Iterable
from types import TracebackType

import torch
from torch.autograd.graph import saved_tensors_hooks


class SavedBytes:
    """Counts the storages autograd saves inside the ``with`` block, each once, leaving out
    those of ``resident`` tensors (parameters, inputs), which live whether or not the graph
    is kept. The tensors are saved unchanged."""

    def __init__(self, resident: Iterable[torch.Tensor]) -> None:
        self._seen = {t.untyped_storage().data_ptr() for t in resident}
        self.bytes = 0
        self._hooks = saved_tensors_hooks(self._pack, _unpack)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self._seen:
            self._seen.add(storage.data_ptr())
            self.bytes += storage.nbytes()
        return tensor

    def __enter__(self) -> SavedBytes:
        self._hooks.__enter__()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._hooks.__exit__(kind, error, traceback)


def _unpack(tensor: torch.Tensor) -> torch.Tensor:
    return tensor
