"""Options from REMAT_OPTIONS / REMAT_CONFIG, for frameworks that pass torch.compile none
(issue 9): they reach the Plan, options given in code win, and a mistake gets the same
error as through options=, plus where it came from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import remat
from remat import env_options
from remat.options import RematOptions

BUDGET = {"memory_budget": "1MiB", "inner_compiler": "eager"}


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REMAT_OPTIONS", raising=False)
    monkeypatch.delenv("REMAT_CONFIG", raising=False)


def _train_once(compiled: nn.Module) -> None:
    compiled(torch.randn(4, 8)).square().mean().backward()


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))


def test_remat_options_reach_the_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REMAT_OPTIONS", json.dumps(BUDGET))
    model = _model()
    _train_once(torch.compile(model, backend="remat"))  # no options=, as Hugging Face's Trainer calls it
    plan = remat.explain(model)
    assert plan.options["memory_budget"] == "1MiB" and plan.budget_bytes == 2**20
    assert plan.inner_compiler == "eager"


@pytest.mark.parametrize("suffix, text", [
    (".toml", 'memory_budget = "1MiB"\ninner_compiler = "eager"\ncompress = { method = "topk", ratio = 4 }\n'),
    (".json", json.dumps({**BUDGET, "compress": {"method": "topk", "ratio": 4}})),
])
def test_config_file_reaches_the_plan(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, suffix: str, text: str) -> None:
    path = tmp_path / f"remat{suffix}"
    path.write_text(text)
    monkeypatch.setenv("REMAT_CONFIG", str(path))
    options = env_options.resolve(None)
    assert options == RematOptions.from_mapping({**BUDGET, "compress": {"method": "topk", "ratio": 4}})
    model = _model()
    compiled = remat.compile(model)
    remat.GradientStore(model, torch.optim.SGD(model.parameters(), lr=0.1))
    _train_once(compiled)
    plan = remat.explain(model)
    assert plan.budget_bytes == 2**20 and plan.options["compress"]["ratio"] == 4


def test_options_in_code_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REMAT_OPTIONS", json.dumps({"not_an_option": 1}))
    model = _model()
    _train_once(torch.compile(model, backend="remat", options={"inner_compiler": "eager"}))
    plan = remat.explain(model)
    assert plan.budget_bytes is None and plan.inner_compiler == "eager"
    assert env_options.resolve({"policy": "full"}).policy == "full"


def test_without_environment_the_defaults() -> None:
    assert env_options.resolve(None) == env_options.resolve({}) == RematOptions()


def _explicit_error(options: dict) -> str:
    with pytest.raises(ValueError) as info:
        RematOptions.from_mapping(options)
    return str(info.value)


def test_unknown_option_in_environment_same_error_as_options(monkeypatch: pytest.MonkeyPatch) -> None:
    bad = {"memroy_budget": "1MiB"}
    want = _explicit_error(bad) + " (options from the environment variable REMAT_OPTIONS)"
    assert "unknown remat option 'memroy_budget'" in want and "Did you mean 'memory_budget'?" in want
    monkeypatch.setenv("REMAT_OPTIONS", json.dumps(bad))
    with pytest.raises(ValueError) as up_front:
        remat.compile(_model())
    assert str(up_front.value) == want
    with pytest.raises(ValueError) as decorated:
        remat.optimize(lambda: None)
    assert str(decorated.value) == want
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed) as info:
        _train_once(torch.compile(_model(), backend="remat"))
    inner = getattr(info.value, "inner_exception", info.value)
    assert isinstance(inner, ValueError) and str(inner) == want


@pytest.mark.parametrize("suffix, text", [(".toml", 'memroy_budget = "1MiB"\n'), (".json", '{"memroy_budget": "1MiB"}')])
def test_unknown_option_in_config_file_same_error_as_options(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, suffix: str, text: str
) -> None:
    path = tmp_path / f"remat{suffix}"
    path.write_text(text)
    monkeypatch.setenv("REMAT_CONFIG", str(path))
    with pytest.raises(ValueError) as info:
        remat.compile(_model())
    assert str(info.value) == _explicit_error({"memroy_budget": "1MiB"}) + f" (options from the file {str(path)!r} named by REMAT_CONFIG)"


def test_bad_value_in_environment_names_option_value_and_source(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REMAT_OPTIONS", '{"memory_budget": "lots"}')
    with pytest.raises(ValueError, match=r"'memory_budget' must be .*got 'lots' \(options from the environment variable REMAT_OPTIONS\)"):
        env_options.resolve(None)


@pytest.mark.parametrize("variable, value, match", [
    ("REMAT_OPTIONS", "memory_budget=1GB", r"REMAT_OPTIONS must hold a JSON object of remat options.*not JSON"),
    ("REMAT_OPTIONS", '["memory_budget"]', r"remat options must be a dict.*\(options from the environment variable REMAT_OPTIONS\)"),
    ("REMAT_CONFIG", "/nonexistent/remat.toml", r"cannot read the file '/nonexistent/remat.toml' named by REMAT_CONFIG"),
    ("REMAT_CONFIG", "remat.yaml", r"must be a \.json or a \.toml file.*'\.yaml'"),
])
def test_unreadable_environment_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, variable: str, value: str, match: str) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValueError, match=match):
        env_options.resolve(None)


def test_both_variables_set_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REMAT_OPTIONS", json.dumps(BUDGET))
    monkeypatch.setenv("REMAT_CONFIG", "remat.toml")
    with pytest.raises(ValueError, match="both REMAT_OPTIONS .* and REMAT_CONFIG .* are set"):
        env_options.resolve(None)
