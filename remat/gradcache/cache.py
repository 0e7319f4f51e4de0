"""GradCache: a contrastive loss over a batch too large for one forward, with exact gradients.

Per step: (1) every chunk runs forward without a graph and its representation is kept
(with its random state); (2) the loss over all representations is back-propagated as far
as the representations, whose gradients are the cache; (3) every chunk runs forward
again, with its random state replayed, and is back-propagated with its cached gradient.
Memory holds one chunk's activations and the representations of the whole batch; the
gradients equal those of one backward through the whole batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import torch

from remat.gradcache import distributed
from remat.gradcache.chunking import Batch, GetRep, batch_size, encode, split, tensors_of
from remat.gradcache.replay import ReplayState, first_parameter
from remat.gradcache.saved import SavedBytes
from remat.options import parse_budget

Recompute = Literal[True, "auto"]


@dataclasses.dataclass
class _Chunk:
    """One chunk of one input: where its rows go, and how to run it again."""

    tower: int
    encoder: torch.nn.Module
    inputs: Batch
    rows: int
    sync: bool  # the backward that all-reduces this encoder's gradients (DDP)
    state: ReplayState | None = None
    kept: torch.Tensor | None = None  # the representation with its graph, when not recomputed


class GradCache:
    """Runs forward, loss and backward over a whole batch, one chunk at a time; returns the loss.

    encoders: one module shared by every input, or one per input (query and document towers).
    chunk_size: rows per forward (>= 1); the last chunk of an input may be shorter.
    loss_fn: ``loss_fn(*reps, **loss_kwargs)``, a scalar, one representation tensor per input
        (all ranks' rows under torch.distributed).
    get_rep: picks the representation tensor out of an encoder's output (e.g.
        ``lambda out: out.pooler_output``); needed when the output is not a tensor.
    recompute: ``True`` replays every chunk; ``"auto"`` keeps the graphs of chunks while the
        bytes they save for the backward fit ``memory_budget`` and replays only the rest.
    memory_budget: bytes (``6e9``, ``"512MiB"``) of saved activations ``"auto"`` may keep,
        on top of the one chunk a replay needs anyway.
    scaler: a ``torch.amp.GradScaler``: the loss is scaled before its backward, so every
        gradient is scaled; call ``scaler.step`` and ``scaler.update`` as usual.
    paired: inputs must have equal batch sizes (row i of each is one example); ``False``
        allows others, e.g. documents with hard negatives, k per query.

    Gradients accumulate into ``.grad`` (call it several times before the optimizer step
    to accumulate; ``sync=False`` skips DDP's all-reduce on all but the last call). The
    random state after the call is that after the first pass: the replay draws nothing.
    """

    def __init__(
        self,
        encoders: torch.nn.Module | Sequence[torch.nn.Module],
        chunk_size: int,
        loss_fn: Callable[..., torch.Tensor],
        get_rep: GetRep | None = None,
        *,
        recompute: Recompute = True,
        memory_budget: int | float | str | None = None,
        scaler: torch.amp.GradScaler | None = None,
        paired: bool = True,
    ) -> None:
        modules = [encoders] if isinstance(encoders, torch.nn.Module) else encoders
        if not isinstance(modules, Sequence) or not modules or not all(isinstance(m, torch.nn.Module) for m in modules):
            raise TypeError(
                f"GradCache encoders must be an nn.Module or a non-empty sequence of them; got {encoders!r}"
            )
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"GradCache chunk_size must be an integer >= 1; got {chunk_size!r}")
        if not callable(loss_fn):
            raise TypeError(f"GradCache loss_fn must be callable; got {loss_fn!r}")
        if get_rep is not None and not callable(get_rep):
            raise TypeError(f"GradCache get_rep must be callable or None; got {get_rep!r}")
        if recompute not in (True, "auto"):
            raise ValueError(f"GradCache recompute must be True or 'auto'; got {recompute!r}")
        if (recompute == "auto") != (memory_budget is not None):
            raise ValueError(
                "GradCache memory_budget goes with recompute='auto' and only with it; got "
                f"recompute={recompute!r}, memory_budget={memory_budget!r}"
            )
        self.shared = isinstance(encoders, torch.nn.Module)
        self.encoders = list(modules)
        self.chunk_size = chunk_size
        self.loss_fn = loss_fn
        self.get_rep = get_rep
        self.recompute = recompute
        self.budget_bytes = None if memory_budget is None else _budget_bytes(memory_budget)
        self.scaler = scaler
        self.paired = paired
        # Largest saved bytes per row seen so far: "auto" skips keeping a chunk it predicts
        # would not fit instead of running it with a graph first.
        self._bytes_per_row = 0.0

    def __call__(self, *inputs: Batch, sync: bool = True, **loss_kwargs: Any) -> torch.Tensor:
        """Forward, loss and backward over ``inputs`` (one batch per input); the loss, detached."""
        chunks = self._chunks(inputs, sync)
        reps = self._first_pass(chunks, len(inputs))
        leaves = [torch.cat(r).detach().requires_grad_() for r in reps]
        loss = self.loss_fn(*(distributed.gather(leaf) for leaf in leaves), **loss_kwargs)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise TypeError(f"GradCache loss_fn must return a scalar tensor; got {_describe(loss)}")
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        grads = []
        for tower, leaf in enumerate(leaves):
            if leaf.grad is None:
                raise ValueError(f"loss_fn does not depend on the representations of input {tower}")
            grads.append(iter(leaf.grad.split(self.chunk_size)))
        self._second_pass(chunks, grads)
        return loss.detach()

    def _chunks(self, inputs: Sequence[Batch], sync: bool) -> list[_Chunk]:
        if not inputs:
            raise ValueError("GradCache needs at least one input batch")
        encoders = self.encoders * len(inputs) if self.shared else self.encoders
        if len(encoders) != len(inputs):
            raise ValueError(
                f"GradCache has {len(encoders)} encoders but got {len(inputs)} inputs; pass one input "
                "per encoder, or a single (shared) encoder"
            )
        sizes = [batch_size(batch, f"input {i}") for i, batch in enumerate(inputs)]
        if self.paired and len(set(sizes)) > 1:
            raise ValueError(
                f"GradCache inputs have batch sizes {sizes}; with paired=True (row i of every input is "
                "one example) they must be equal. Pass paired=False for inputs of different sizes"
            )
        chunks = [
            _Chunk(tower, encoder, part, min(self.chunk_size, size - start), sync=False)
            for tower, (encoder, batch, size) in enumerate(zip(encoders, inputs, sizes))
            for start, part in zip(range(0, size, self.chunk_size), split(batch, size, self.chunk_size))
        ]
        if sync:
            last = {id(chunk.encoder): chunk for chunk in chunks if distributed.syncs(chunk.encoder)}
            for chunk in last.values():
                chunk.sync = True
        return chunks

    def _encode(self, chunk: _Chunk) -> torch.Tensor:
        return encode(chunk.encoder, chunk.inputs, self.get_rep, chunk.rows, f"input {chunk.tower}")

    def _first_pass(self, chunks: list[_Chunk], towers: int) -> list[list[torch.Tensor]]:
        """Every chunk's representation (detached), keeping graphs as ``recompute`` allows."""
        reps: list[list[torch.Tensor]] = [[] for _ in range(towers)]
        kept_bytes = 0
        for chunk in chunks:
            chunk.state = ReplayState.capture(*tensors_of(chunk.inputs), *first_parameter(chunk.encoder))
            if self._may_keep(chunk, kept_bytes):
                resident = [*chunk.encoder.parameters(), *chunk.encoder.buffers(), *tensors_of(chunk.inputs)]
                with distributed.no_sync(chunk.encoder, True), SavedBytes(resident) as saved:
                    rep = self._encode(chunk)
                self._bytes_per_row = max(self._bytes_per_row, saved.bytes / chunk.rows)
                if kept_bytes + saved.bytes <= self.budget_bytes:
                    chunk.kept = rep
                    kept_bytes += saved.bytes
                rep = rep.detach()
            else:
                with torch.no_grad():
                    rep = self._encode(chunk)
            reps[chunk.tower].append(rep)
        return reps

    def _may_keep(self, chunk: _Chunk, kept_bytes: int) -> bool:
        # The backward that all-reduces must follow a forward outside no_sync that runs after
        # every other chunk's backward, so that chunk is always replayed.
        return (
            self.recompute == "auto"
            and not chunk.sync
            and kept_bytes + self._bytes_per_row * chunk.rows <= self.budget_bytes
        )

    def _second_pass(self, chunks: list[_Chunk], grads: list[Iterator[torch.Tensor]]) -> None:
        """Back-propagate each chunk's cached gradient, replaying the chunks not kept."""
        for chunk in chunks:
            grad = next(grads[chunk.tower])
            with distributed.no_sync(chunk.encoder, not chunk.sync):
                if chunk.kept is not None:
                    rep, chunk.kept = chunk.kept, None
                else:
                    assert chunk.state is not None
                    with chunk.state.replay():
                        rep = self._encode(chunk)
                rep.backward(grad)


def _budget_bytes(value: int | float | str) -> float:
    try:
        kind, amount = parse_budget(value)
    except ValueError:
        kind, amount = "invalid", 0.0
    if kind != "bytes":
        raise ValueError(
            "GradCache memory_budget must be a number of bytes greater than 1 (6e9) or a string "
            f"with a unit ('6GB', '512MiB'); got {value!r}"
        )
    return amount


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"
