"""The backend end to end: registration, Plans, fallback on planner failure."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn as nn

import remat
import remat.cli
import remat.partition
from remat import _torch_internals
from remat.options import RematOptions
from remat.plan import MemoryPrediction, Plan
from tests.checks import torch_threads
from tests.zoo import UpsamplingDecoder


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.LayerNorm(32), nn.Linear(32, 4))


def _grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


def _step(model, x):
    loss = model(x).square().mean()
    loss.backward()
    return loss.detach()


def test_backend_registered_without_import():
    """torch.compile finds "remat" through the entry point, in an interpreter that never imports remat."""
    script = textwrap.dedent(
        """
        import sys, torch
        m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        out = torch.compile(m, backend="remat", options={"inner_compiler": "eager"})(torch.randn(3, 4))
        out.sum().backward()
        assert all(p.grad is not None for p in m.parameters())
        assert "remat" in sys.modules, "the backend did not run"
        print("ok")
        """
    )
    assert "import remat" not in script
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")


def test_explain_returns_the_plan_and_it_round_trips():
    model = _model()
    compiled = remat.compile(model, inner_compiler="eager")
    _step(compiled, torch.randn(4, 8))
    plan = remat.explain(compiled)
    assert plan is remat.explain(model)
    assert plan.partitioner == "remat-min-cut" and plan.fallback_reason is None
    assert {d.action for d in plan.decisions} == {"keep", "recompute"}
    assert all(d.reason for d in plan.decisions)
    assert Plan.from_json(plan.to_json()) == plan
    assert "remat plan for" in str(plan)
    # LayerNorm's statistics come from a multi-output op, named with the output index
    assert any(d.op.startswith("aten.var_mean.correction[") for d in plan.decisions)


def test_explain_before_training_call_is_a_clear_error():
    with pytest.raises(ValueError, match="no remat plan"):
        remat.explain(_model())
    with pytest.raises(TypeError, match="nn.Module"):
        remat.explain(lambda x: x)


def test_inference_runs_without_a_plan():
    model = _model()
    compiled = remat.compile(model, inner_compiler="eager")
    with torch.no_grad():
        out = compiled(torch.randn(2, 8))
    assert out.shape == (2, 4)
    assert remat.plans(model) == []


def test_planner_failure_falls_back_with_one_warning(monkeypatch):
    def broken_solver(*args, **kwargs):
        raise RuntimeError("injected planner failure")

    monkeypatch.setattr(remat.partition, "solve_min_cut", broken_solver)
    model, reference = _model(), _model()
    x = torch.randn(4, 8)
    compiled = remat.compile(model, inner_compiler="eager")
    with pytest.warns(remat.RematFallbackWarning, match="injected planner failure") as record:
        loss = _step(compiled, x)
    assert len([w for w in record if issubclass(w.category, remat.RematFallbackWarning)]) == 1
    torch.testing.assert_close(loss, _step(reference, x))
    for got, want in zip(_grads(model), _grads(reference)):
        torch.testing.assert_close(got, want)
    plan = remat.explain(model)
    assert plan.partitioner == "pytorch-default"
    assert "injected planner failure" in plan.fallback_reason


def test_planner_failure_raises_when_asked(monkeypatch):
    def broken_solver(*args, **kwargs):
        raise RuntimeError("injected planner failure")

    monkeypatch.setattr(remat.partition, "solve_min_cut", broken_solver)
    compiled = remat.compile(_model(), inner_compiler="eager", on_plan_failure="raise")
    with pytest.raises(Exception, match="injected planner failure"):
        _step(compiled, torch.randn(4, 8))


@pytest.mark.parametrize("inner_compiler", ["eager", "inductor"])
def test_gradients_equal_eager(inner_compiler):
    model = _model()
    reference = copy.deepcopy(model)
    x = torch.randn(4, 8)
    loss = _step(remat.compile(model, inner_compiler=inner_compiler), x)
    torch.testing.assert_close(loss, _step(reference, x))
    for got, want in zip(_grads(model), _grads(reference)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert remat.explain(model).inner_compiler == inner_compiler


def test_a_decoder_backward_on_two_threads_scatters_its_upsampling_gradient_in_bounds(monkeypatch):
    """Inductor's C++ 2-d tiles offset a parallel atomic_add store twice
    (pytorch/pytorch#191837): this decoder's backward, compiled without layout
    optimization as remat compiles a CPU backward, scatters the upsampling's
    channels-last gradient into a contiguous one, and on two threads wrote out of
    bounds and aborted the process. remat's compiles give the store its index once
    (``_torch_internals.tile2d_atomic_adds_fixed``). The scatter is kept here as it is
    where ``passes.upsample_gradients`` cannot prove a window sum the same."""
    monkeypatch.setattr(remat.partition, "nearest_upsample_gradients", lambda graph, any_layout: 0)
    with torch_threads(2):
        torch.manual_seed(0)
        model, x = UpsamplingDecoder(squared=True), torch.randn(8, 16, 32, 32)
        reference = copy.deepcopy(model)
        reference(x).backward()
        compiled = torch.compile(model, backend="remat")
        for _ in range(3):
            model.zero_grad(set_to_none=True)
            compiled(x).backward()
    for ours, eager in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(ours.grad, eager.grad, rtol=1e-4, atol=1e-6)


def test_the_tile2d_fix_stays_in_place_while_any_compile_runs(monkeypatch):
    """Compiles on two threads overlap and the first to start finishes first: the fix
    must stay until the second finishes too, then Inductor's own store comes back."""
    from torch._inductor.codegen import cpp

    if not _torch_internals._doubles_tile2d_atomic_offset():
        pytest.skip("this Inductor gives a 2-d tile's atomic_add store its index once")
    original = cpp.CppTile2DKernel.store
    monkeypatch.setattr(cpp.CppTile2DKernel, "store", original)  # back at teardown, whatever fails
    first, second = _torch_internals.tile2d_atomic_adds_fixed(), _torch_internals.tile2d_atomic_adds_fixed()
    inside = []
    try:
        first.__enter__()
        inside.append(first)
        fixed = cpp.CppTile2DKernel.store
        assert fixed is not original
        second.__enter__()
        inside.append(second)
        inside.remove(first)
        first.__exit__(None, None, None)  # the other thread's compile ends first
        assert cpp.CppTile2DKernel.store is fixed
        inside.remove(second)
        second.__exit__(None, None, None)
        assert cpp.CppTile2DKernel.store is original
    finally:
        for context in inside:
            context.__exit__(None, None, None)


@pytest.mark.parametrize("pool", [False, True])
def test_the_buffer_pool_decision_reaches_both_compiles(pool, monkeypatch):
    # Inductor's wrapper may hold a freed buffer for a later one of its size, which can
    # raise the peak above what the simulator (and the budget) count: the partitioner
    # decides per graph (Plan.buffer_pool), and both graphs compile with its decision
    from torch._inductor import config
    from torch._inductor.codegen import wrapper

    seen = []
    plan_reuse = wrapper.PythonWrapperCodegen.memory_plan_reuse

    def spy(self):
        seen.append(config.allow_buffer_reuse)
        return plan_reuse(self)

    monkeypatch.setattr(wrapper.PythonWrapperCodegen, "memory_plan_reuse", spy)
    monkeypatch.setattr(remat.partition.RematPartitioner, "_buffer_pool", lambda *args: (pool, args[4]))
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
    with config.patch(force_disable_caches=True):  # a cached graph generates no code
        remat.compile(model, on_plan_failure="raise")(torch.randn(4, 16)).sum().backward()
    assert seen == [pool, pool]  # the forward and the backward
    assert remat.explain(model).buffer_pool is pool
    assert config.allow_buffer_reuse  # Inductor's own setting is left as it was


def test_the_buffer_pool_stays_where_it_fits(monkeypatch):
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
    remat.compile(model, on_plan_failure="raise")(torch.randn(4, 16)).sum().backward()
    assert remat.explain(model).buffer_pool is True  # its holds raise no peak here
    assert remat.explain(_eager_planned()).buffer_pool is None  # not compiled by Inductor

    # the rule, on made-up predictions: within the budget, or no higher than without it
    # (a budget no plan meets), or without a budget within 1%
    def prediction(peak: int) -> MemoryPrediction:
        return MemoryPrediction(peak_bytes=peak, resident_bytes=100, peak_at="", positions=[], live_bytes=[])

    pooled = {"peak": 0}
    monkeypatch.setattr(remat.partition, "predict_memory", lambda *args, **kwargs: prediction(pooled["peak"]))
    partitioner = remat.partition.RematPartitioner(RematOptions(), "made-up", lambda plan: None)
    plain = prediction(1000)
    for peak, budget, keep in [(1000, None, True), (1010, None, True), (1011, None, False), (1400, 1500, True), (1401, 1500, False),
                               (990, 900, True), (1000, 900, True), (1001, 900, False)]:
        pooled["peak"] = peak
        decision, as_run = partitioner._buffer_pool(None, None, 1, plain, fusions=None, budget_bytes=budget)
        assert decision is keep, (peak, budget)
        assert as_run.peak_bytes == (peak if keep else 1000)


def _eager_planned() -> nn.Module:
    model = nn.Linear(8, 8)
    remat.compile(model, inner_compiler="eager")(torch.randn(2, 8)).sum().backward()
    return model


class TwoGraphs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        x = torch.tanh(self.a(x))
        torch._dynamo.graph_break()
        return torch.tanh(self.b(x))


def test_graph_breaks_give_one_plan_per_graph():
    model = TwoGraphs()
    with warnings.catch_warnings():
        warnings.simplefilter("error", remat.RematBudgetWarning)  # no budget, nothing to warn of
        _step(remat.compile(model, inner_compiler="eager"), torch.randn(2, 8))
    plans = remat.plans(model)
    assert len(plans) == 2 and plans[0].graph != plans[1].graph
    assert remat.explain(model) is plans[-1]


def test_a_budget_split_by_a_graph_break_is_named():
    """Each graph is planned against the whole budget: the graph before a break says
    so, with the break's reason; the last graph, which ends at the return, does not."""
    model = TwoGraphs()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _step(remat.compile(model, inner_compiler="eager", memory_budget="1GB"), torch.randn(2, 8))
    said = [str(w.message) for w in caught if issubclass(w.category, remat.RematBudgetWarning)]
    first, second = (plan.graph for plan in remat.plans(model))
    assert len(said) == 1, said
    assert f"graph {first} ends at a graph break (" in said[0] and "graph_break()" in said[0]
    assert second not in said[0]


def test_cli_version_and_help(capsys: pytest.CaptureFixture[str]):
    """``python -m remat.cli`` in a fresh interpreter once (a start takes seconds); ``--help`` in this one."""
    version = subprocess.run([sys.executable, "-m", "remat.cli", "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.strip() == f"remat {remat.__version__}"
    with pytest.raises(SystemExit) as exited:
        remat.cli.main(["--help"])
    assert exited.value.code == 0 and "torch.compile" in capsys.readouterr().out


class _InPlace(nn.Module):
    """In-place activations, an in-place op on an intermediate, and a mutated buffer."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)
        self.act = nn.ReLU(inplace=True)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        h = self.fc1(x) + 0.5
        h.mul_(2.0)
        h = self.act(h)
        self.calls.add_(1)
        return self.fc2(torch.sigmoid(h))


@pytest.mark.parametrize("inner_compiler", ["eager", "inductor"])
def test_in_place_ops_and_buffer_mutation(inner_compiler):
    torch.manual_seed(0)
    model = _InPlace()
    reference = copy.deepcopy(model)
    compiled = remat.compile(model, inner_compiler=inner_compiler)
    for _ in range(2):
        x = torch.randn(4, 8)
        torch.testing.assert_close(_step(compiled, x), _step(reference, x))
    for got, want in zip(_grads(model), _grads(reference)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert model.calls.item() == reference.calls.item() == 2
    assert remat.explain(model).partitioner == "remat-min-cut"
