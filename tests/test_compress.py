"""Gradient compression (issue 6): the option, the backward pass, the GradientStore.

Exactness is checked where it must hold: with top-k ratio 1 (everything kept) training
equals uncompressed training, and with error feedback every step's kept part plus the
new residual is exactly the gradient plus the old residual.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import remat
from benchmarks.compress import Task, train
from remat.compress import codecs
from remat.compress.slots import slot_of


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4))


def _loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).square().mean()


def _compiled(model: nn.Module, compress: object, inner_compiler: str = "eager") -> nn.Module:
    return torch.compile(model, backend="remat", options={"inner_compiler": inner_compiler, "compress": compress})


# --- the option ----------------------------------------------------------------------


def test_compress_option_round_trips():
    opts = remat.RematOptions.from_mapping({"compress": {"method": "topk", "ratio": 100, "to": "cpu", "exclude": "lm_head"}})
    assert opts.compress == remat.CompressOptions(method="topk", ratio=100.0, to="cpu", exclude=("lm_head",))
    assert remat.RematOptions.from_mapping(opts.to_dict()) == opts
    assert remat.RematOptions.from_mapping({"compress": "bf16"}).compress.method == "bf16"
    distributed = remat.CompressOptions.from_value({"method": "bf16", "distributed": True})
    assert not distributed.error_feedback and not distributed.compresses_backward


@pytest.mark.parametrize(
    "value, message",
    [
        ({"method": "gzip"}, r"'method' must be one of \['topk', 'powersgd', 'bf16', 'none'\]; got 'gzip'"),
        ({"ratio": 0.5}, r"'ratio' must be a number >= 1 .*got 0.5"),
        ({"ratio": True}, r"'ratio' must be a number >= 1 .*got True"),
        ({"method": "powersgd", "rank": 0}, r"'rank' must be an integer >= 1; got 0"),
        ({"method": "bf16", "ratio": 10}, r"'ratio' \(got 10\) only applies to method='topk'"),
        ({"to": "disk"}, r"'to' must be one of \['cpu', 'device'\]; got 'disk'"),
        ({"error_feedback": "yes"}, r"'error_feedback' must be True or False; got 'yes'"),
        ({"exclude": [""]}, r"'exclude' must be a parameter name pattern"),
        ({"ratoi": 10}, r"unknown field 'ratoi'.*allowed fields"),
        ({"method": "topk", "distributed": True}, r"with distributed=True, 'method' must be one of"),
        ({"method": "bf16", "distributed": True, "error_feedback": True}, r"bf16_compress_hook has none"),
        ({"method": "powersgd", "distributed": True, "to": "cpu"}, r"'to' .* does not apply with distributed=True"),
        (3, r"'compress' must be a dict"),
    ],
)
def test_bad_compress_option_names_field_and_allowed(value, message):
    with pytest.raises(ValueError, match=message):
        remat.compile(_model(), compress=value)


# --- top-k bookkeeping -----------------------------------------------------------------


@pytest.mark.parametrize("numel", [1000, codecs.TOPK_CHUNK * 2 + 7])
def test_topk_with_error_feedback_keeps_exactly_what_it_drops(numel):
    generator = torch.Generator().manual_seed(0)
    grad = torch.randn(numel, generator=generator)
    residual = torch.randn(numel, generator=generator)
    total = residual + grad
    work = residual.add_(grad)
    compressed = codecs.encode_topk(work, ratio=50, in_place=True)
    values, indices = compressed.tensors
    assert indices.dtype == torch.int32 and values.numel() == numel // 50
    kept = torch.zeros(numel)
    compressed.add_to(kept)
    assert torch.equal(kept + work, total)  # kept + new residual == gradient + old residual
    smallest_kept = values.abs().min()
    assert bool((work.abs() <= smallest_kept).all())  # what stays behind is never larger


@pytest.mark.parametrize("method", [{"method": "bf16"}, {"method": "powersgd", "rank": 2}])
def test_error_feedback_of_other_methods_balances(method):
    model = _model()
    reference = copy.deepcopy(model)
    compiled = _compiled(model, method)
    store = remat.GradientStore(model)
    x = torch.randn(8, 16)
    _loss(compiled, x).backward()
    _loss(reference, x).backward()
    store.apply_gradients()
    for p, r in zip(model.parameters(), reference.parameters(), strict=True):
        slot = slot_of(p)
        rebuilt = p.grad + (slot.residual if slot is not None else 0)
        torch.testing.assert_close(rebuilt, r.grad, rtol=1e-5, atol=1e-6)
    assert store.summary().compression_ratio > 1


# --- the compiled backward and the store -------------------------------------------------


@pytest.mark.parametrize("inner_compiler", ["eager", "inductor"])
def test_ratio_one_trains_exactly_like_uncompressed(inner_compiler):
    """Everything kept: the per-parameter optimizer steps equal one plain AdamW step,
    over micro-batch accumulation too."""
    model = _model()
    reference = copy.deepcopy(model)
    compiled = _compiled(model, {"method": "topk", "ratio": 1}, inner_compiler)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    reference_optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    store = remat.GradientStore(compiled, optimizer)
    batches = torch.randn(3, 2, 8, 16)
    for micro_batches in batches:
        for x in micro_batches:
            _loss(compiled, x).backward()
            _loss(reference, x).backward()
        assert all(p.grad is None for p in model.parameters()), "dense gradients left in .grad"
        assert store.summary().bytes_kept > 0
        optimizer.step()
        reference_optimizer.step()
        optimizer.zero_grad()
        reference_optimizer.zero_grad()
    for p, r in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-6)


def test_exclude_keeps_dense_gradients_and_warns_on_unmatched_pattern():
    model = _model()
    with pytest.warns(remat.RematCompressWarning, match="pattern 'lm_head' matches no parameter"):
        compiled = _compiled(model, {"method": "topk", "ratio": 4, "exclude": ["2", "lm_head"]})
        remat.GradientStore(model)
        _loss(compiled, torch.randn(8, 16)).backward()
    assert [p.grad is not None for p in model.parameters()] == [False, False, True, True]


def test_state_dict_restores_residuals_before_compiling():
    x = torch.randn(8, 16)
    first = _model()
    store = remat.GradientStore(first)
    _loss(_compiled(first, {"method": "topk", "ratio": 8}), x).backward()
    state = store.state_dict()
    assert set(state) == {"0.weight", "0.bias", "2.weight", "2.bias"}

    second = _model()
    restored = remat.GradientStore(second)
    restored.load_state_dict(state)
    torch.compiler.reset()
    _loss(_compiled(second, {"method": "topk", "ratio": 8}), x).backward()
    assert slot_of(second[0].weight).residual is not None
    with pytest.raises(ValueError, match="no parameter named"):
        restored.load_state_dict({"missing.weight": {}})


def test_training_converges_close_to_uncompressed():
    """A CI-sized acceptance 1: the benchmark's task made small, 100 steps, top-k ratio 20
    with error feedback, within 5% of uncompressed training's final loss."""
    task = Task(vocab=16, d_model=32, n_layers=1, seq_len=16, batch=8, eval_batches=4, lr=1e-2)
    dense = train(task, None, steps=100)
    compressed = train(task, {"method": "topk", "ratio": 20}, steps=100)
    assert dense["final_loss"] < 0.5 * dense["losses"][0]  # the task was learned
    assert abs(compressed["final_loss"] / dense["final_loss"] - 1) <= 0.05


# --- bad input -----------------------------------------------------------------------------


def test_store_without_compiled_model_says_so():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    store = remat.GradientStore(model, optimizer)
    _loss(model, torch.randn(8, 16)).backward()
    with pytest.raises(RuntimeError, match="no parameter of this Sequential has compressed gradients"):
        optimizer.step()
    with pytest.raises(RuntimeError, match="compile the model|Compile the model"):
        store.apply_gradients()


def test_compiled_model_without_store_fails_loudly():
    compiled = _compiled(_model(), "topk")
    with pytest.raises(RuntimeError, match="no remat.GradientStore holds this model's gradients"):
        _loss(compiled, torch.randn(8, 16)).backward()


def test_parameter_shape_change_after_compile_is_an_error():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    remat.GradientStore(model, optimizer)
    _loss(_compiled(model, "topk"), torch.randn(8, 16)).backward()
    with torch.no_grad():
        model[2].weight.data = torch.zeros(4, 16)
    with pytest.raises(RuntimeError, match=r"'2.weight' changed shape from \(4, 32\) to \(4, 16\)"):
        optimizer.step()


def test_step_with_closure_runs_it_once_then_uses_its_gradients():
    """Lightning's automatic optimization: the forward and backward run inside the closure."""
    model = _model()
    reference = copy.deepcopy(model)
    compiled = _compiled(model, {"method": "topk", "ratio": 1})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    store = remat.GradientStore(model, optimizer)
    x = torch.randn(8, 16)
    calls = []

    def closure() -> torch.Tensor:
        calls.append(1)
        loss = _loss(compiled, x)
        loss.backward()
        return loss

    loss = optimizer.step(closure)
    assert calls == [1] and loss is not None
    _loss(reference, x).backward()
    torch.optim.SGD(reference.parameters(), lr=0.1).step()
    for p, r in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, r)
    _loss(compiled, x).backward()
    assert store.apply_gradients() == 4 and all(p.grad is not None for p in model.parameters())
