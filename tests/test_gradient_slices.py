"""A concatenation's gradient whose skip-connection slice waits for the encoder is
copied out into its slices where it is made, so the whole is freed at once: same bits,
less held."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
from hypothesis import given, settings

import remat
import remat.partition as partition
from remat._torch_internals import storage_key
from remat.passes.gradient_slices import COPY_OUT
from remat.passes.recompute_rules import is_view
from benchmarks.measure import WithLoss
from tests.checks import assert_same_bits, spy_on_joint_pass
from tests.strategies import Act, Concat, Linear, ModelSpec, build, make_input, model_specs
from tests.zoo import make_unet

aten = torch.ops.aten


@pytest.fixture
def joint(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The joint graph module before the pass and after it, and the pass's count."""
    return spy_on_joint_pass(monkeypatch, partition, "copy_out_waiting_slices")


def test_a_unet_copies_each_concatenation_gradient_out_into_its_slices(joint: dict[str, Any]) -> None:
    case = make_unet()
    remat.plan(WithLoss(case.model, case.loss_fn), *case.inputs, on_plan_failure="raise")
    graph = joint["after"].graph
    nodes = list(graph.nodes)
    copies = list(graph.find_nodes(op="call_function", target=COPY_OUT))
    assert joint["result"] == len(copies) == 4  # two slices per decoder level
    bases = {made.args[0].args[0] for made in copies}
    assert len(bases) == 2
    for base in bases:
        slices = list(base.users)
        assert len(slices) == 2 and all(s.target is aten.slice.Tensor for s in slices)
        made = [next(iter(s.users)) for s in slices]
        assert all(len(s.users) == 1 and m.target is COPY_OUT for s, m in zip(slices, made))
        first = min(nodes.index(m) for m in made)
        assert sorted(nodes.index(m) for m in made) == [first, first + 1]  # made together
        assert nodes[first - 1] in slices  # right after the slices
        readers = sorted((r for m in made for r in m.users), key=nodes.index)
        assert readers[0].target is aten.convolution_backward.default  # the upsampling convolution's
        assert nodes.index(readers[-1]) > nodes.index(readers[0]) + 100  # the skip's, in the encoder's backward
    graph.lint()


def test_the_copied_out_graph_computes_the_same_bits_and_frees_the_gradient_sooner(joint: dict[str, Any]) -> None:
    case = make_unet()
    remat.plan(WithLoss(case.model, case.loss_fn), *case.inputs, on_plan_failure="raise")
    before, after = joint["before"], joint["after"]
    assert_same_bits(before, after)

    def last_reading(module: fx.GraphModule, name: str) -> int:
        """Where the last op that reads ``name`` (through views) runs."""
        nodes = list(module.graph.nodes)
        pending, last = [next(n for n in nodes if n.name == name)], 0
        while pending:
            for user in pending.pop().users:
                if user.target is aten.slice.Tensor:
                    pending.append(user)
                else:
                    last = max(last, nodes.index(user))
        return last

    nodes = list(after.graph.nodes)
    copies = list(after.graph.find_nodes(op="call_function", target=COPY_OUT))
    assert copies
    for made in copies:
        base = made.args[0].args[0].name
        assert last_reading(after, base) <= nodes.index(made) + 1  # the copies are its last readers
        assert last_reading(before, base) > nodes.index(made) + 100  # the encoder's backward, far later


class _Doubled(nn.Module):
    """A value concatenated with itself: both slices of the gradient meet in one add."""

    def __init__(self) -> None:
        super().__init__()
        self.inner, self.head = nn.Linear(8, 8), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inner(x))
        return self.head(torch.cat([h, h], dim=-1)).sum()


def test_slices_read_by_one_op_are_not_copied(joint: dict[str, Any]) -> None:
    remat.plan(_Doubled(), torch.randn(4, 8), on_plan_failure="raise")
    slices = joint["before"].graph.find_nodes(op="call_function", target=aten.slice.Tensor)
    assert len(slices) == 2 and len({u for s in slices for u in s.users}) == 1
    assert joint["result"] == 0
    assert not joint["after"].graph.find_nodes(op="call_function", target=COPY_OUT)


class _DenseHead(nn.Module):
    """A concatenation before a linear head, whose backward makes the concatenation's
    gradient from a small gradient and the weight, and frees neither."""

    def __init__(self, width: int = 256) -> None:
        super().__init__()
        self.inner, self.head = nn.Linear(width, width), nn.Linear(2 * width, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([torch.relu(self.inner(x)), x], dim=1)).square().mean()


def test_no_copies_where_the_op_making_the_gradient_frees_less_than_it(joint: dict[str, Any]) -> None:
    plan = remat.plan(_DenseHead(), torch.randn(4096, 256, requires_grad=True), on_plan_failure="raise")
    slices = joint["before"].graph.find_nodes(op="call_function", target=aten.slice.Tensor)
    assert len(slices) == 2  # the input's slice waits for the inner layer's backward
    assert joint["result"] == 0
    assert plan.memory is not None and plan.memory.peak_at != "backward:copy_out_default_1"


def _peak_bytes(spec: ModelSpec) -> int:
    torch.compiler.reset()
    plan = remat.plan(build(spec), make_input(spec), inner_compiler="eager", on_plan_failure="raise")
    assert plan.memory is not None, plan.fallback_reason
    return plan.memory.peak_bytes


@settings(max_examples=20, deadline=None)
@given(spec=model_specs(dtypes=("float32",), concat_first=True))
def test_the_copies_never_raise_the_simulated_peak(spec: ModelSpec) -> None:
    with pytest.MonkeyPatch.context() as patch:
        counted = spy_on_joint_pass(patch, partition, "copy_out_waiting_slices")
        with_copies = _peak_bytes(spec)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(partition, "copy_out_waiting_slices", lambda graph: 0)
        without = _peak_bytes(spec)
    assert with_copies <= without, f"{counted['result']} slices copied out: {with_copies} bytes, {without} without"


def test_views_of_a_copy_share_the_copy_s_storage(joint: dict[str, Any]) -> None:
    """A linear layer's backward reads its slice through a transpose: that view must
    carry the copy's storage, not the gradient's, or the simulator keeps the gradient
    alive as long as the view (it raised this model's simulated peak, 40 bytes against
    38 without copies)."""
    spec = ModelSpec(
        input_shape=(1, 1), layers=(Concat(inner=Linear(out=1, bias=False)), Act(fn="relu")),
        head_out=1, dtype="float32", input_grad=True, seed=0,
    )
    remat.plan(build(spec), make_input(spec), on_plan_failure="raise")
    graph = joint["after"].graph
    copies = list(graph.find_nodes(op="call_function", target=COPY_OUT))
    views = [user for made in copies for user in made.users if is_view(user)]
    assert joint["result"] == len(copies) == 2 and views
    for view in views:
        assert storage_key(view.meta["val"]) == storage_key(view.args[0].meta["val"]), view.format_node()
