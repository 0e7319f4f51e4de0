"""Names for values: ``remat.tag(x, "name")``, read by the ``save_only`` option.

Like JAX's ``checkpoint_name``, a tag names a value in model code::

    h = remat.tag(self.attn(x), "attn_out")

and ``options={"save_only": ["attn_out"]}`` keeps only the values so named (and what
can never be recomputed) for the backward, recomputing everything else from them.

Outside ``torch.compile`` a tag returns ``x`` itself. Under ``torch.compile`` it traces
a view of ``x`` (``aten.alias``: no copy, the gradient passes through unchanged) that
carries the name (see ``_torch_internals.tag_scope``). ``mark_tagged_values`` runs on
the joint graph before any other pass and moves each name onto the value it tags (the
alias's base), in ``node.meta["remat_tags"]``: the alias itself does not survive
PyTorch's CSE and Inductor's no-op removal, the value does.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from remat import _torch_internals as internals
from remat.passes.recompute_rules import is_view
from remat.passes.schedule import backward_nodes

TAGS = "remat_tags"


def tag(x: torch.Tensor, name: str) -> torch.Tensor:
    """Name the value ``x`` for ``save_only``; returns ``x`` (under ``torch.compile``,
    a view of it). Free at runtime and transparent to autograd."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"remat.tag needs a non-empty string name; got {name!r}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"remat.tag names a tensor; got {type(x).__name__} for tag {name!r}")
    if not torch.compiler.is_compiling():
        return x
    with internals.tag_scope(name):
        return torch.ops.aten.alias(x)


def mark_tagged_values(graph: fx.Graph) -> None:
    """Record each forward tag on the value it names: the base of the tagged view.
    (Tags copied onto backward nodes, which depend on a tangent, are left alone.)"""
    backward = backward_nodes(graph)
    for node in graph.nodes:
        if node in backward:
            continue
        name = internals.tag_name(node)
        if name is None:
            continue
        value = node
        while is_view(value) and value.args and isinstance(value.args[0], fx.Node):
            value = value.args[0]
        value.meta[TAGS] = value.meta.get(TAGS, frozenset()) | {name}


def tagged_values(graph: fx.Graph) -> dict[fx.Node, frozenset[str]]:
    """The values of ``graph`` that tags name, with their names."""
    return {node: node.meta[TAGS] for node in graph.nodes if node.meta.get(TAGS)}
