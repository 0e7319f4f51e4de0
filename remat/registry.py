"""Where compiled models find their Plans.

Dynamo hands the backend the model's parameters as graph inputs, so each Plan is
filed under the parameters of the graph it was made for; ``explain(model)`` collects
the Plans of the model's parameters. Weak references: a Plan goes with its model.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import torch
from torch.utils.weak import WeakIdKeyDictionary

from remat.plan import Plan

_order = itertools.count()
_plans: WeakIdKeyDictionary = WeakIdKeyDictionary()


def record(parameters: Iterable[torch.Tensor], plan: Plan) -> None:
    entry = (next(_order), plan)
    for parameter in parameters:
        _plans.setdefault(parameter, []).append(entry)


def plans(model: torch.nn.Module) -> list[Plan]:
    """Every Plan made for ``model``'s graphs, oldest first (graph breaks, recompiles)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(
            f"remat.plans/explain take the nn.Module given to torch.compile (or the "
            f"compiled module); got {type(model).__name__}"
        )
    entries = {id(plan): (order, plan) for p in model.parameters() for order, plan in _plans.get(p, [])}
    return [plan for _, plan in sorted(entries.values(), key=lambda e: e[0])]


def explain(model: torch.nn.Module) -> Plan:
    """The Plan of the graph most recently compiled for ``model``."""
    found = plans(model)
    if not found:
        raise ValueError(
            f"no remat plan for this {type(model).__name__}: plans are made on the first "
            "training call (forward with gradients) of a model compiled with "
            "torch.compile(model, backend='remat') or remat.compile(model)"
        )
    return found[-1]
