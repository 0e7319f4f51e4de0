"""``remat.tag`` and the ``save_only`` option: tags reach the joint graph, only tagged
values (and what can never be recomputed) are kept, gradients equal eager's."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import remat
import remat.partition as partition
from remat.passes.budget import InfeasibleBudget
from remat.passes.recompute_rules import is_view
from remat.tags import tagged_values
from tests.checks import assert_planned_by_remat
from tests.zoo import GPTBlock, make_gpt


class Tagged(nn.Module):
    """Names the hidden activation of an MLP and its layer-normed output (tagged
    through a view); the last linear layer and the loss are not named."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(16, 32), nn.Linear(32, 16), nn.Linear(16, 16)
        self.norm = nn.LayerNorm(16)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = remat.tag(F.gelu(self.fc1(x)), "hidden")
        normed = remat.tag(self.norm(self.fc2(self.drop(hidden))).flatten(), "normed")
        return torch.tanh(self.fc3(normed.view_as(x))).square().mean()


def _model(dropout: float = 0.0) -> Tagged:
    torch.manual_seed(0)
    return Tagged(dropout)


def _input() -> torch.Tensor:
    return torch.randn(8, 16, generator=torch.Generator().manual_seed(1))


def _kept_activations(plan: remat.Plan) -> dict[str, str]:
    """Kept values that are not parameters or inputs, with the reason."""
    return {d.tensor: d.reason for d in plan.kept if d.op != "placeholder"}


def test_tag_outside_compile_is_the_identity() -> None:
    x = torch.randn(3, requires_grad=True)
    assert remat.tag(x, "a") is x
    remat.tag(x * 2, "b").sum().backward()
    torch.testing.assert_close(x.grad, torch.full((3,), 2.0))


@pytest.mark.parametrize("name", ["", 3, None])
def test_tag_needs_a_name(name: Any) -> None:
    with pytest.raises(ValueError, match="remat.tag needs a non-empty string name"):
        remat.tag(torch.ones(1), name)


def test_tag_names_a_tensor() -> None:
    with pytest.raises(TypeError, match="remat.tag names a tensor; got list"):
        remat.tag([1.0], "a")


class _Seen(Exception):
    pass


@pytest.mark.parametrize("inner_compiler", ["eager", "inductor"])
def test_tags_reach_the_joint_graph(inner_compiler: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each tag lands on the value it names (not on a view of it) in the joint graph
    the partitioner sees: after PyTorch's CSE and, under Inductor, its joint passes
    (which remove the tag's alias node). The partitioner stops there: nothing more
    of the step is needed."""

    found: dict[torch.fx.Node, frozenset[str]] = {}

    def spy(graph: torch.fx.Graph, info: Any, *args: Any) -> Any:
        found.update(tagged_values(graph))
        raise _Seen

    monkeypatch.setattr(partition, "solve_min_cut", spy)
    compiled = remat.compile(_model(), inner_compiler=inner_compiler, on_plan_failure="raise")
    with pytest.raises(Exception, match="_Seen"):
        compiled(_input()).backward()
    by_tag = {names: node for node, names in found.items()}
    assert set(by_tag) == {frozenset({"hidden"}), frozenset({"normed"})}, found
    assert tuple(by_tag[frozenset({"hidden"})].meta["val"].shape) == (8, 32)
    assert tuple(by_tag[frozenset({"normed"})].meta["val"].shape) == (8, 16)
    for node in found:
        assert node.op == "call_function" and not is_view(node), node


def test_save_only_keeps_exactly_the_tagged_values() -> None:
    model, x = _model(), _input()
    default = remat.plan(model, x)
    both = remat.plan(model, x, save_only=["hidden", "normed"], on_plan_failure="raise")
    assert sorted(_kept_activations(both).values()) == ["tagged 'hidden' (save_only)", "tagged 'normed' (save_only)"]
    assert both.partitioner == "remat-budget" and both.fallback_reason is None
    # matmuls are recomputed too (remat's default keeps them)
    assert any(d.op == "aten.addmm.default" for d in both.recomputed)
    assert any(d.op == "aten.addmm.default" for d in default.kept)

    hidden = remat.plan(model, x, save_only="hidden", on_plan_failure="raise")
    assert list(_kept_activations(hidden).values()) == ["tagged 'hidden' (save_only)"]
    assert hidden.saved_bytes == 8 * 32 * 4
    assert hidden.options["save_only"] == ["hidden"] and "save_only" not in default.options


class _WithLoss(nn.Module):
    def __init__(self, model: nn.Module, loss_fn: Any) -> None:
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(self.model(*inputs))


def test_save_only_checkpoints_the_zoo_gpt_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """Per-block checkpointing by name: every block's output is kept and the rest of
    the block recomputed from it, matmuls included (attention's outputs are kept too:
    its op takes a dropout seed, and remat never recomputes a random op)."""

    def forward(self: GPTBlock, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return remat.tag(x + self.mlp(self.ln2(x)), "block_out")

    monkeypatch.setattr(GPTBlock, "forward", forward)
    case = make_gpt(n_layers=3, d_model=32, n_heads=4, seq_len=16, vocab=64, batch=2, dropout=0.0)
    model = _WithLoss(case.model, case.loss_fn)
    default = remat.plan(model, *case.inputs)
    plan = remat.plan(model, *case.inputs, save_only=["block_out"], on_plan_failure="raise")
    reasons = list(_kept_activations(plan).values())
    assert reasons.count("tagged 'block_out' (save_only)") == 3, plan.summary()
    assert all(r == "tagged 'block_out' (save_only)" or r.startswith("cannot be recomputed: random op") for r in reasons), reasons
    assert any(d.op == "aten.addmm.default" for d in plan.recomputed)
    assert plan.saved_bytes < default.saved_bytes


def test_save_only_also_keeps_what_cannot_be_recomputed() -> None:
    """Random ops (dropout's mask) and excluded modules' values are kept besides the tags."""
    plan = remat.plan(_model(dropout=0.5), _input(), save_only=["normed"], exclude=["fc1"], on_plan_failure="raise")
    reasons = sorted(_kept_activations(plan).values())
    assert "tagged 'normed' (save_only)" in reasons
    assert any(r.startswith("cannot be recomputed: random op") for r in reasons), reasons
    assert any(r.startswith("cannot be recomputed: in excluded module 'fc1'") for r in reasons), reasons
    assert all(r.startswith(("tagged", "cannot be recomputed")) for r in reasons), reasons


def test_save_only_with_symbolic_shapes() -> None:
    plan = remat.plan(_model(), _input(), dynamic=True, save_only=["hidden"], on_plan_failure="raise")
    assert list(_kept_activations(plan).values()) == ["tagged 'hidden' (save_only)"]
    assert plan.symbols


@pytest.mark.parametrize("inner_compiler", ["eager", "inductor"])
def test_save_only_gradients_equal_eager(inner_compiler: str) -> None:
    model = _model()
    reference = copy.deepcopy(model)
    x = _input()
    compiled = remat.compile(model, inner_compiler=inner_compiler, save_only=["hidden", "normed"], on_plan_failure="raise")
    with warnings.catch_warnings():
        warnings.simplefilter("error", remat.RematBudgetWarning)
        loss = compiled(x)
        loss.backward()
    want = reference(x)
    want.backward()
    torch.testing.assert_close(loss, want)
    for (name, a), (_, b) in zip(reference.named_parameters(), model.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=name)
    (plan,) = assert_planned_by_remat(model, inner_compiler)
    assert sorted(_kept_activations(plan).values()) == ["tagged 'hidden' (save_only)", "tagged 'normed' (save_only)"]


def test_a_name_that_tags_nothing_warns() -> None:
    with pytest.warns(remat.RematBudgetWarning, match=r"no value of graph plan_\d+ is tagged 'nope'"):
        plan = remat.plan(_model(), _input(), save_only=["hidden", "nope"], on_plan_failure="raise")
    assert list(_kept_activations(plan).values()) == ["tagged 'hidden' (save_only)"]


def test_save_only_under_a_memory_budget() -> None:
    model, x = _model(), _input()
    with warnings.catch_warnings():
        warnings.simplefilter("error", remat.RematBudgetWarning)
        roomy = remat.plan(model, x, save_only=["hidden"], memory_budget="1GB", on_plan_failure="raise")
    assert roomy.budget_bytes == 10**9
    assert list(_kept_activations(roomy).values()) == ["tagged 'hidden' (save_only)"]

    with pytest.raises(Exception, match=r"memory_budget 1000 B cannot be met with save_only=\['hidden'\]") as info:
        remat.plan(model, x, save_only=["hidden"], memory_budget="1KB", on_plan_failure="warn")
    assert isinstance(getattr(info.value, "inner_exception", info.value), InfeasibleBudget)

    with pytest.warns(remat.RematBudgetWarning, match="on_infeasible='closest'"):
        tight = remat.plan(model, x, save_only=["hidden"], memory_budget="1KB", on_infeasible="closest")
    assert tight.budget_bytes == 1000
    assert list(_kept_activations(tight).values()) == ["tagged 'hidden' (save_only)"]
