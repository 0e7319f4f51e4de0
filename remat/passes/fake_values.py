"""Fake values for nodes a pass adds or re-points.

The simulators tell storages apart by the fake tensors in ``meta["val"]``: a view's
value shares its base's storage. A pass that adds a node gives it the value its op
makes from its inputs' values; a pass that points a reader at another value (a copy)
re-derives the readers that are views, which would otherwise still alias the old
value's storage and keep it alive in the simulation, and their views in turn.
"""

from __future__ import annotations

import torch.fx as fx

from remat.cost_models.sizes import tensors_in
from remat.passes.recompute_rules import is_view


def derive_value(node: fx.Node) -> None:
    """Set ``node``'s fake value to what its op makes from its inputs' fake values."""
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda arg: arg.meta["val"])
    values = [t for arg in node.all_input_nodes for t in tensors_in(arg.meta["val"])] or tensors_in(node.meta.get("val"))
    with values[0].fake_mode:
        node.meta["val"] = node.target(*args, **kwargs)


def rederive_views(readers: list[fx.Node]) -> None:
    """Re-derive the fake values of the views among ``readers``, and of their views."""
    pending = [reader for reader in readers if is_view(reader)]
    while pending:
        view = pending.pop()
        derive_value(view)
        pending.extend(user for user in view.users if is_view(user))
