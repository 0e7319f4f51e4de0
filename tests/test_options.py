"""Options are validated before any work; every error names option, value and what is allowed."""

from __future__ import annotations

import pytest
import torch

import remat
from remat.options import RematOptions


def test_defaults():
    assert RematOptions.from_mapping(None) == RematOptions(inner_compiler="inductor", on_plan_failure="warn")
    assert RematOptions.from_mapping({}) == RematOptions()


def test_valid_options_round_trip():
    opts = RematOptions.from_mapping({"inner_compiler": "eager", "on_plan_failure": "raise"})
    assert RematOptions.from_mapping(opts.to_dict()) == opts


def test_unknown_option_names_it_and_suggests():
    with pytest.raises(ValueError) as info:
        RematOptions.from_mapping({"inner_compilr": "eager"})
    message = str(info.value)
    assert "'inner_compilr'" in message and "'eager'" in message
    assert "inner_compiler" in message and "on_plan_failure" in message
    assert "Did you mean 'inner_compiler'" in message


@pytest.mark.parametrize(
    "name, value",
    [
        ("inner_compiler", "tvm"), ("inner_compiler", 3), ("on_plan_failure", "ignore"), ("on_plan_failure", None),
        ("time_estimator", "guess"), ("time_estimator", 1),
    ],
)
def test_bad_value_names_option_value_and_choices(name, value):
    with pytest.raises(ValueError) as info:
        RematOptions.from_mapping({name: value})
    message = str(info.value)
    assert repr(name) in message and repr(value) in message and "must be one of" in message


@pytest.mark.parametrize("options", [["inner_compiler"], "eager", 3])
def test_options_must_be_a_mapping(options):
    with pytest.raises(ValueError, match="must be a dict"):
        RematOptions.from_mapping(options)


def test_save_only_takes_tag_names():
    opts = RematOptions.from_mapping({"save_only": ["attn_out", "mlp_in", "attn_out"], "memory_budget": "1GB"})
    assert opts.save_only == ("attn_out", "mlp_in")
    assert RematOptions.from_mapping({"save_only": "attn_out"}).save_only == ("attn_out",)
    assert RematOptions.from_mapping(opts.to_dict()) == opts
    assert "save_only" not in RematOptions().to_dict()
    assert RematOptions.from_mapping({"save_only": None}) == RematOptions()


@pytest.mark.parametrize("value", [[], [""], ["a", 2], 3, {"a"}])
def test_bad_save_only_names_the_option_and_the_form(value):
    with pytest.raises(ValueError) as info:
        RematOptions.from_mapping({"save_only": value})
    message = str(info.value)
    assert "'save_only' must be a non-empty list of names given with remat.tag(x, name)" in message
    assert f"got {value!r}" in message


def test_save_only_and_policy_are_exclusive():
    with pytest.raises(ValueError, match=r"'save_only' \(got \['a'\]\) and 'policy' \(got 'full'\) cannot be combined"):
        RematOptions.from_mapping({"save_only": ["a"], "policy": "full"})


def test_remat_compile_validates_before_any_work():
    calls = []

    class Spy(torch.nn.Module):
        def forward(self, x):
            calls.append(x)
            return x

    with pytest.raises(ValueError, match="unknown remat option 'budget'"):
        remat.compile(Spy(), budget="1GB")
    assert calls == []


def test_torch_compile_path_reports_the_same_error():
    model = torch.nn.Linear(4, 4)
    compiled = torch.compile(model, backend="remat", options={"inner_compiler": "tvm"})
    with pytest.raises(Exception) as info:
        compiled(torch.randn(2, 4))
    # Dynamo wraps backend errors in BackendCompilerFailed; the cause is remat's ValueError.
    inner = getattr(info.value, "inner_exception", info.value)
    assert isinstance(inner, ValueError)
    assert "'inner_compiler'" in str(inner) and "'tvm'" in str(inner)


def test_torch_compile_mode_is_rejected():
    model = torch.nn.Linear(4, 4)
    compiled = torch.compile(model, backend="remat", mode="max-autotune")
    with pytest.raises(Exception) as info:
        compiled(torch.randn(2, 4))
    inner = getattr(info.value, "inner_exception", info.value)
    assert isinstance(inner, ValueError) and "mode='max-autotune'" in str(inner)
