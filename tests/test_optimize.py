"""``@remat.optimize``: the models a training function builds (or is given) train under
remat with its options, with eager's gradients; nothing is left behind (issue 9)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

import remat
from remat import _torch_internals as internals

OPTIONS = {"memory_budget": "1MiB", "inner_compiler": "eager"}


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(16, 16)
        self.norm = nn.LayerNorm(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.norm(self.linear(x)))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(3))
        self.head = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(8, 16, generator=generator) for _ in range(3)]


def _train(model: nn.Module, steps: int = 3) -> nn.Module:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for x in _batches()[:steps]:
        model(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


def _build_and_train(make: type[nn.Module] = Net) -> tuple[nn.Module, list[str]]:
    torch.manual_seed(0)
    model = make()
    compiled = [name for name, module in model.named_modules() if internals.is_compiled(module)]
    return _train(model), compiled


def test_models_built_inside_train_under_remat_with_eagers_weights() -> None:
    model, compiled_during = remat.optimize(**OPTIONS)(_build_and_train)()
    assert compiled_during == [""]  # the top-level module only: blocks are part of its graph
    assert not any(internals.is_compiled(m) for m in model.modules())  # eager again after return
    (plan,) = remat.plans(model)  # one graph for the whole model
    assert plan.partitioner == "remat-budget" and plan.budget_bytes == 2**20
    assert plan.options["memory_budget"] == "1MiB"
    reference, _ = _build_and_train()
    for got, want in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_torch_nn_containers_are_compiled_too() -> None:
    """``nn.Module.compile()`` would leave an nn.Sequential eager (Dynamo skips torch.nn frames)."""

    def make() -> nn.Module:
        return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 1))

    model, compiled_during = remat.optimize(**OPTIONS)(_build_and_train)(make)
    assert compiled_during == [""]
    assert len(remat.plans(model)) == 1


def test_modules_passed_in_are_compiled_and_released() -> None:
    torch.manual_seed(0)
    model = Net()

    @remat.optimize(inner_compiler="eager", policy="full")
    def train(net: nn.Module) -> None:
        assert internals.is_compiled(net)
        _train(net, steps=1)

    train(model)
    assert not internals.is_compiled(model)
    assert remat.explain(model).options["policy"] == "full"


def test_state_restored_when_the_function_raises() -> None:
    built: list[nn.Module] = []

    @remat.optimize(**OPTIONS)
    def fails() -> None:
        built.append(nn.Linear(2, 2))
        assert internals.is_compiled(built[0])
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fails()
    assert not internals.is_compiled(built[0])
    assert not internals.is_compiled(nn.Linear(2, 2))  # the registration hooks are gone


def test_nested_functions_use_the_innermost_options() -> None:
    @remat.optimize(inner_compiler="eager", policy="full")
    def inner() -> nn.Module:
        return _build_and_train()[0]

    @remat.optimize(**OPTIONS)
    def outer() -> tuple[nn.Module, nn.Module]:
        return _build_and_train()[0], inner()

    built_outside, built_inside = outer()
    assert remat.explain(built_outside).budget_bytes == 2**20
    assert remat.explain(built_inside).options["policy"] == "full"
    assert remat.explain(built_inside).budget_bytes is None


def test_compress_through_the_decorator() -> None:
    """top-k with ratio 1 keeps every element: the step equals eager's, through the GradientStore."""

    @remat.optimize(inner_compiler="eager", compress={"method": "topk", "ratio": 1})
    def train() -> nn.Module:
        torch.manual_seed(0)
        model = Net()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        remat.GradientStore(model, optimizer)
        model(_batches()[0]).square().mean().backward()
        assert all(p.grad is None for p in model.parameters())  # compressed into the store
        optimizer.step()
        return model

    model = train()
    assert remat.explain(model).options["compress"]["method"] == "topk"
    torch.manual_seed(0)
    reference = _train(Net(), steps=1)
    for got, want in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_bad_options_fail_at_decoration() -> None:
    with pytest.raises(ValueError, match="unknown remat option 'memroy_budget'.*Did you mean 'memory_budget'"):
        remat.optimize(memroy_budget="6GB")
    with pytest.raises(ValueError, match="'policy' must be one of"):
        remat.optimize(policy="sometimes")
    with pytest.raises(TypeError, match="takes options as keywords"):
        remat.optimize("6GB")


def test_bare_decorator_takes_the_environments_options(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REMAT_OPTIONS", json.dumps(OPTIONS))

    @remat.optimize
    def train() -> nn.Module:
        return _build_and_train()[0]

    assert train.__name__ == "train"
    assert remat.explain(train()).budget_bytes == 2**20
