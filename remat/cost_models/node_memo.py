"""Facts about single nodes, memoized while one graph is held fixed.

The budgeted solver simulates a dozen plans of one joint graph (``passes.budget``),
and every simulation asks the fusion, memory and time models the same questions of
the same nodes: is it a view, what does it read, how many elements and bytes does it
make. The functions marked ``per_node`` remember their answers inside ``fixed_graph``
(in the store the caller passes, so they last across its simulations); anywhere
else they compute them each time, since a pass may change the graph between calls.
What it saves is measured in ``benchmarks/results/solve_time_xeon.md``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TypeVar

import torch.fx as fx

T = TypeVar("T")
Store = dict[Callable[..., object], dict[fx.Node, object]]

_store: ContextVar[Store | None] = ContextVar("remat_node_memo", default=None)


def per_node(function: Callable[[fx.Node], T]) -> Callable[[fx.Node], T]:
    """``function(node)``, remembered per node inside ``fixed_graph``. It must
    depend on nothing but the node, the graph around it and settings that a solve
    does not change (Inductor's ``fallback_random``, whether oneDNN is on)."""

    @functools.wraps(function)
    def remembered(node: fx.Node) -> T:
        store = _store.get()
        if store is None:
            return function(node)
        try:  # the common case first: a simulation asks about each node many times
            return store[function][node]  # type: ignore[return-value]
        except KeyError:
            answer = store.setdefault(function, {})[node] = function(node)
            return answer

    return remembered


@contextmanager
def fixed_graph(store: Store) -> Iterator[None]:
    """Memoize ``per_node`` functions into ``store`` while the graph does not change."""
    token = _store.set(store)
    try:
        yield
    finally:
        _store.reset(token)


@per_node
def input_nodes(node: fx.Node) -> tuple[fx.Node, ...]:
    """``node.all_input_nodes`` (a property that builds a new list each time)."""
    return tuple(node.all_input_nodes)
