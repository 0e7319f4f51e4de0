"""The per-node memo the budgeted solver's simulations share."""

from __future__ import annotations

import torch
import torch.fx as fx

from remat.cost_models.node_memo import fixed_graph, input_nodes, per_node


def test_per_node_remembers_answers_inside_fixed_graph_only() -> None:
    calls: list[fx.Node] = []

    @per_node
    def readers(node: fx.Node) -> int:
        calls.append(node)
        return len(node.users)

    graph = fx.Graph()
    x = graph.placeholder("x")
    graph.output(graph.call_function(torch.relu, (x,)))
    assert (readers(x), readers(x), len(calls)) == (1, 1, 2)  # outside: asked each time
    store: dict = {}
    with fixed_graph(store):
        assert readers(x) == 1
        negated = graph.call_function(torch.neg, (x,))  # a change the memo does not see
        assert readers(x) == 1
    assert len(calls) == 3
    with fixed_graph(store):  # the store lasts across calls: the caller decides how long
        assert readers(x) == 1
    assert len(calls) == 3
    assert readers(x) == 2 and readers(negated) == 0  # outside again: the graph as it is now
    with fixed_graph({}):
        assert input_nodes(negated) == (x,)
