"""Hand parameter gradients to a store as the backward produces them.

A post-partition pass over the backward graph: for each chosen output (the gradient of
one forward input), call ``store(grad, key)`` right after the node that makes it, and
return None in its place, so the dense gradient dies after the call instead of living
until the backward ends and then in ``.grad`` until the optimizer step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch.fx as fx


def gradient_outputs(graph: fx.Graph) -> list[fx.Node | None]:
    """The backward graph's outputs: one gradient (or None) per forward input, in order."""
    (output,) = graph.find_nodes(op="output")
    return list(output.args[0])


def store_gradients(graph: fx.Graph, keys: Mapping[int, int], store: Callable[..., None]) -> None:
    """Replace each output ``i`` in ``keys`` by None, after a call ``store(grad_i, keys[i])``."""
    (output,) = graph.find_nodes(op="output")
    grads = list(output.args[0])
    placeholders = graph.find_nodes(op="placeholder")
    for index, key in keys.items():
        grad = grads[index]
        assert isinstance(grad, fx.Node), f"backward output {index} is {grad!r}, not a gradient"
        # A gradient that is a backward input (a tangent) is ready once all inputs are.
        after = placeholders[-1] if grad.op == "placeholder" else grad
        with graph.inserting_after(after):
            graph.call_function(store, (grad, key))
        grads[index] = None
    output.args = (type(output.args[0])(grads),)
    graph.lint()
