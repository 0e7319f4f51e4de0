"""The backward runs each weight-gradient matmul before its input-gradient sibling:
same values, activations freed sooner."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import remat
import remat.partition as partition
from remat.passes.recompute_rules import is_view
from remat.passes.weight_gradients import gradient_matmul_behind, move_behind_sibling
from benchmarks.measure import WithLoss
from tests.checks import assert_same_bits, spy_on_joint_pass
from tests.zoo import make_gpt, make_mlp

aten = torch.ops.aten


@pytest.fixture
def joint_before(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The joint graph module as it was before the pass, and the pass's count."""
    return spy_on_joint_pass(monkeypatch, partition, "weight_gradients_first")


def _base(node: fx.Node) -> fx.Node:
    while node.op == "call_function" and is_view(node):
        node = node.args[0]
    return node


def _tangent_readers(graph: fx.Graph) -> set[fx.Node]:
    """The backward, found here by the tangents' names, apart from the code under test."""
    found: set[fx.Node] = set()
    for node in graph.nodes:
        if node.name.startswith("tangents") or any(a in found for a in node.all_input_nodes):
            found.add(node)
    return found


def _weight_first_pairs(graph: fx.Graph) -> tuple[int, int]:
    """Of the backward's weight-gradient matmuls (returned, through views, as
    gradients) that share a base input with another of its matmuls: how many run
    first, and how many there are."""
    order = {node: i for i, node in enumerate(graph.nodes)}
    backward = _tangent_readers(graph)
    matmuls = [m for m in graph.find_nodes(op="call_function", target=aten.mm.default) if m in backward]
    returned = set(next(iter(graph.find_nodes(op="output"))).all_input_nodes)

    def is_gradient(node: fx.Node) -> bool:
        return node in returned or any(is_view(u) and is_gradient(u) for u in node.users)

    first = total = 0
    for grad in filter(is_gradient, matmuls):
        bases = {_base(a) for a in grad.all_input_nodes}
        siblings = [m for m in matmuls if m is not grad and bases & {_base(a) for a in m.all_input_nodes}]
        if siblings:
            total += 1
            first += all(order[grad] < order[m] for m in siblings)
    return first, total


def test_a_gpt_backward_runs_weight_gradients_first(joint_before: dict[str, Any]) -> None:
    case = make_gpt(n_layers=2, d_model=32, n_heads=2, seq_len=16, vocab=64, batch=2, dropout=0.0)
    remat.plan(WithLoss(case.model, case.loss_fn), *case.inputs, on_plan_failure="raise")
    before, total = _weight_first_pairs(joint_before["before"].graph)
    after, total_after = _weight_first_pairs(joint_before["after"].graph)
    # 2 layers x (q/k/v projection, attention output, two MLP matmuls) and the head
    assert total == total_after == 9
    assert before < total and after == total
    assert joint_before["result"] >= after - before


def test_the_reordered_joint_graph_computes_the_same_bits(joint_before: dict[str, Any]) -> None:
    case = make_mlp()
    remat.plan(WithLoss(case.model, case.loss_fn), *case.inputs, on_plan_failure="raise")
    before, after = joint_before["before"], joint_before["after"]
    assert_same_bits(before, after)
    assert [n.name for n in after.graph.nodes] != [n.name for n in before.graph.nodes]
    after.graph.lint()


def test_a_weight_gradient_moves_back_behind_its_sibling(joint_before: dict[str, Any]) -> None:
    """``move_behind_sibling`` (for a late copy of a widening matmul's input) undoes
    the pass for one matmul: it then runs right after the matmul that reads its ``dy``,
    the graph stays valid and computes the same bits; it stays where it is when a node
    that must follow it runs at or before that sibling."""
    case = make_mlp()
    remat.plan(WithLoss(case.model, case.loss_fn), *case.inputs, on_plan_failure="raise")
    after = joint_before["after"]
    graph = after.graph
    backward = _tangent_readers(graph)
    matmuls = [m for m in graph.find_nodes(op="call_function", target=aten.mm.default) if m in backward]
    gradients = [m for m in matmuls if gradient_matmul_behind(m) is m]
    order = {node: i for i, node in enumerate(graph.nodes)}
    matmul = gradients[0]
    sibling = min((m for m in matmuls if m is not matmul and order[m] > order[matmul]), key=order.__getitem__)
    # the sibling itself must follow: no move
    move_behind_sibling(matmul, graph, ahead_of=[sibling])
    assert list(graph.nodes) == list(order)
    move_behind_sibling(matmul, graph)
    nodes = list(graph.nodes)
    assert nodes.index(matmul) > nodes.index(sibling)
    graph.lint()
    after.recompile()
    assert_same_bits(joint_before["before"], after)


def test_weight_gradients_first_lowers_the_peak(monkeypatch: pytest.MonkeyPatch) -> None:
    """The lowest plan of a GPT under Inductor, with the backward as autograd orders it
    and with the weight gradients first: the recomputed GELU output is freed before
    the input gradient's matmul allocates its result."""
    case = make_gpt(n_layers=2, d_model=64, n_heads=2, seq_len=64, vocab=64, batch=4, dropout=0.0)
    model = WithLoss(case.model, case.loss_fn)

    def lowest() -> int:
        plan = remat.plan(model, *case.inputs, memory_budget="1KiB", on_infeasible="closest")
        return plan.step_memory.peak_bytes

    with pytest.warns(remat.RematBudgetWarning):
        first = lowest()
    monkeypatch.setattr(partition, "weight_gradients_first", lambda graph: 0)
    with pytest.warns(remat.RematBudgetWarning):
        autograd_order = lowest()
    assert first < autograd_order


class _AuxHead(nn.Module):
    """A 2-D head on an early feature, returned as it is (its loss outside the graph):
    its weight gradient reads a tangent straight away."""

    def __init__(self, d: int = 64, blocks: int = 3) -> None:
        super().__init__()
        self.early = nn.Linear(d, 8)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d)) for _ in range(blocks))
        self.head = nn.Linear(d, 8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        aux = self.early(x)
        for block in self.blocks:
            x = x + block(x)
        return aux, self.head(x)


def _before_backward(graph: fx.Graph) -> list[str]:
    """The nodes ahead of the first op that reads a tangent."""
    backward = _tangent_readers(graph)
    first = next(n for n in graph.nodes if n in backward and n.op != "placeholder")
    return [n.name for n in graph.nodes][: list(graph.nodes).index(first)]


def test_no_matmul_moves_ahead_of_the_backward(joint_before: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Found in review: a weight gradient read straight off a tangent was moved among
    the forward ops, and the backward then started there and recomputed every
    forward value at once (93 MiB predicted without the pass, 173 MiB with it)."""
    torch.manual_seed(0)
    model, x = _AuxHead(), torch.randn(512, 64)
    with_pass = remat.plan(model, x, policy="full", inner_compiler="eager", on_plan_failure="raise").step_memory.peak_bytes
    assert joint_before["result"] > 0
    assert _before_backward(joint_before["after"].graph) == _before_backward(joint_before["before"].graph)
    monkeypatch.setattr(partition, "weight_gradients_first", lambda graph: 0)
    without = remat.plan(model, x, policy="full", inner_compiler="eager", on_plan_failure="raise").step_memory.peak_bytes
    assert with_pass <= without
