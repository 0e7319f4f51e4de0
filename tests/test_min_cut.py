"""The min-cut keeps the fewest bytes possible: checked against brute force on small graphs."""

from __future__ import annotations

import functools
import itertools

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

from remat import _torch_internals as internals
from remat.passes.recompute_rules import ban_reason, draws_random_numbers
from remat.passes.remat import _keep_bytes, solve_min_cut

aten = torch.ops.aten


def _available(node: fx.Node, kept: frozenset[fx.Node], banned: set[str], memo: dict) -> bool:
    """Can the backward have ``node`` if the forward hands it ``kept``?"""
    if node not in memo:
        if node in kept or _keep_bytes(node) == 0:
            memo[node] = True
        elif node.op != "call_function" or node.name in banned:
            memo[node] = False
        else:
            memo[node] = all(_available(a, kept, banned, memo) for a in node.all_input_nodes)
    return memo[node]


def brute_force_min_bytes(graph: fx.Graph, info: internals.JointInfo, banned: set[str]) -> int:
    """Cheapest set of forward values from which the backward can get all it reads."""
    needed = set()
    for node in info.required_bw:
        if node.op == "output":
            continue
        if node not in info.tangents_closure:
            needed.add(node)
        else:
            needed.update(a for a in node.all_input_nodes if a not in info.tangents_closure)
    ancestors: set[fx.Node] = set()
    stack = list(needed)
    while stack:
        node = stack.pop()
        if node not in ancestors:
            ancestors.add(node)
            stack.extend(node.all_input_nodes)
    free: dict = {}  # available with nothing kept: keeping them can only add bytes
    candidates = [
        n
        for n in ancestors
        if n not in info.tangents_closure and (_keep_bytes(n) or 0) > 0 and not _available(n, frozenset(), banned, free)
    ]
    assert len(candidates) <= 16, f"graph too large to brute-force: {len(candidates)} candidates"
    best = None
    for r in range(len(candidates) + 1):
        for subset in itertools.combinations(candidates, r):
            cost = sum(_keep_bytes(n) for n in subset)
            if best is not None and cost >= best:
                continue
            memo: dict = {}
            if all(_available(n, frozenset(subset), banned, memo) for n in needed):
                best = cost
    assert best is not None
    return best


MODELS = {
    "tanh_chain": lambda: nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Tanh(), nn.Linear(6, 3)),
    "relu_dropout": lambda: nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Dropout(0.3), nn.Linear(6, 2)),
    "norm_residual": lambda: _Residual(),
    "sigmoid_gate": lambda: _Gate(),
}


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(5), nn.Linear(5, 5)

    def forward(self, x):
        return x + torch.relu(self.fc(self.norm(x)))


class _Gate(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 8)

    def forward(self, x):
        h = self.fc(x)
        return (torch.sigmoid(h) * torch.exp(h)).sum(dim=1, keepdim=True)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_min_cut_matches_brute_force(name):
    checked = []

    def check(graph: fx.Graph, info: internals.JointInfo) -> list[fx.Node]:
        result = solve_min_cut(graph, info)
        kept_bytes = sum(_keep_bytes(n) for n in result.saved)
        assert kept_bytes == result.cut_bytes
        assert kept_bytes == brute_force_min_bytes(graph, info, set(result.banned))
        checked.append(kept_bytes)
        return result.saved

    backend = functools.partial(internals.compile_eager, partition_fn=functools.partial(internals.partition_with, check))
    model = torch.compile(MODELS[name](), backend=backend)
    model(torch.randn(3, _in_dim(name))).sum().backward()
    assert checked, "the solver never ran"


def _in_dim(name: str) -> int:
    return 5 if name == "norm_residual" else 4


@pytest.mark.parametrize(
    "op, args, kwargs, random",
    [
        (aten._scaled_dot_product_flash_attention_for_cpu.default, (0.0, True), {}, False),
        (aten._scaled_dot_product_flash_attention_for_cpu.default, (), {}, False),  # the default, 0
        (aten._scaled_dot_product_flash_attention.default, (0.1, True), {}, True),
        (aten._scaled_dot_product_efficient_attention.default, (None, True), {"dropout_p": 0.2}, True),
        (aten._scaled_dot_product_efficient_attention.default, (None, True), {"dropout_p": 0.0}, False),
        (aten.native_dropout.default, (0.0, True), {}, True),  # no dropout_p: always random
    ],
)
def test_attention_draws_random_numbers_only_with_dropout(op, args, kwargs, random) -> None:
    graph = fx.Graph()
    q = graph.placeholder("q")
    node = graph.call_function(op, (q, q, q, *args) if "attention" in op.name() else (q, *args), kwargs)
    assert draws_random_numbers(node) is random
    assert (ban_reason(node) is not None) is random


def test_random_and_heavy_ops_are_never_recomputed():
    def check(graph: fx.Graph, info: internals.JointInfo) -> list[fx.Node]:
        result = solve_min_cut(graph, info)
        reasons = set(result.banned.values())
        assert any("random op" in r for r in reasons)
        assert any("compute-heavy" in r for r in reasons)
        return result.saved

    backend = functools.partial(internals.compile_eager, partition_fn=functools.partial(internals.partition_with, check))
    model = torch.compile(MODELS["relu_dropout"](), backend=backend)
    model(torch.randn(3, 4)).sum().backward()
