"""GradCache as two decorators, for training loops that chunk the batch themselves.

    @cached
    def encode(model, batch):
        return model(**batch).pooler_output

    @cat_input_tensor
    def loss_fn(queries, documents):
        return remat.InfoNCE()(queries, documents)

    reps, replays = [], []
    for chunk in chunks:                       # no graph is kept: one chunk's memory
        rep, replay = encode(model, chunk)
        reps.append(rep); replays.append(replay)
    loss = loss_fn(reps, doc_reps)             # lists of chunk outputs are concatenated
    loss.backward()                            # gradients stop at the cached representations
    for replay in replays:
        replay()                               # forward again (same dropout), backward the cached gradient
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch

from remat.gradcache.chunking import tensors_of
from remat.gradcache.replay import ReplayState, first_parameter

Reps = TypeVar("Reps", torch.Tensor, tuple[torch.Tensor, ...])


def cached(fn: Callable[..., Reps]) -> Callable[..., tuple[Reps, Callable[[], None]]]:
    """``fn(*args, **kwargs)`` (a tensor or a tuple of tensors) run without a graph; returns
    the output as leaves that require grad, and ``replay()``, which runs ``fn`` again in the
    same random and autocast state and back-propagates the leaves' ``.grad`` through it.
    Call ``replay()`` after the loss's backward."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> tuple[Reps, Callable[[], None]]:
        state = ReplayState.capture(*_tensors(*args, *kwargs.values()))
        with torch.no_grad():
            output = fn(*args, **kwargs)
        outputs = _as_tuple(output, fn)
        leaves = tuple(t.detach().requires_grad_() for t in outputs)

        def replay() -> None:
            missing = [i for i, leaf in enumerate(leaves) if leaf.grad is None]
            if missing:
                raise RuntimeError(
                    f"replay() of {fn.__name__}: output(s) {missing} have no gradient; run the loss's "
                    "backward first, with the cached outputs as its inputs"
                )
            with state.replay():
                again = _as_tuple(fn(*args, **kwargs), fn)
            torch.autograd.backward(again, [leaf.grad for leaf in leaves])

        return (leaves[0] if isinstance(output, torch.Tensor) else leaves), replay  # type: ignore[return-value]

    return run


def cat_input_tensor(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Call ``fn`` with every argument (positional or keyword) that is a list or tuple of
    tensors concatenated along dim 0: the chunk outputs of ``cached`` become one batch."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        return fn(*map(_cat, args), **{name: _cat(value) for name, value in kwargs.items()})

    return run


def _tensors(*values: Any) -> list[torch.Tensor]:
    """The tensors among the arguments (inside dicts, lists and tuples too), and a
    parameter of each module argument: whose devices' random state to replay."""
    found: list[torch.Tensor] = []
    for value in values:
        if isinstance(value, torch.nn.Module):
            found += first_parameter(value)
        elif isinstance(value, (torch.Tensor, Mapping, list, tuple)):
            found += tensors_of(value)
    return found


def _cat(value: Any) -> Any:
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) for v in value):
        return torch.cat(list(value))
    return value


def _as_tuple(output: object, fn: Callable[..., Any]) -> tuple[torch.Tensor, ...]:
    outputs = (output,) if isinstance(output, torch.Tensor) else output
    if not isinstance(outputs, tuple) or not outputs or not all(isinstance(t, torch.Tensor) for t in outputs):
        raise TypeError(
            f"a function decorated with cached must return a tensor or a tuple of tensors; "
            f"{fn.__name__} returned {type(output).__name__}"
        )
    return outputs
