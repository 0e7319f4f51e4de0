"""Offloading saved activations to host memory: the copy-stream model, the choice, the
graph rewrite (offload after the producer, reload ahead of the first use, a wait right
before it) and gradients equal to eager's. The CUDA tests skip without a GPU."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn

import remat
from remat.cost_models.transfers import COPY_LATENCY_S, Transfer, reload_position, schedule_transfers
from remat.passes.offload import is_dense
from remat.passes.offload_graph import OFFLOAD, RELOAD, WAIT
from remat.planning import plan_each
from tests.checks import assert_planned_by_remat

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
MIB = 2**20


# --- the copy-stream model --------------------------------------------------------------


def test_reload_is_placed_where_the_compute_before_the_first_use_covers_the_copy():
    seconds = [1.0] * 10
    assert reload_position(seconds, first_use=8, backward_start=5, duration=1.5) == 6
    assert reload_position(seconds, first_use=8, backward_start=5, duration=0.5) == 7
    # not before the backward starts: the prefetch gets what the backward has
    assert reload_position(seconds, first_use=8, backward_start=5, duration=10.0) == 5


def test_transfers_hidden_by_compute_expose_nothing_and_a_slow_link_is_exposed():
    seconds = [1.0] * 10  # positions 0-4 forward, 5-9 backward
    fast = schedule_transfers(seconds, 5, [Transfer("a", 100, produced=0, first_use=8)], bandwidth=100.0)
    assert fast.exposed_s == 0.0
    window = fast.windows["a"]
    assert window.reload_at == 6  # a copy of 1 s + latency: two positions of compute before position 8
    # the offload starts when position 0 ends (t=1) and ends at 2 s + latency: position 3
    # is the first to start after it, so the storage is live through position 2
    assert window.freed_after == 2
    slow = schedule_transfers(seconds, 5, [Transfer("a", 1000, produced=0, first_use=8)], bandwidth=100.0)
    # 10 s copies: the reload is issued at the backward's start (t=5) but the side stream
    # is busy with the offload until 11 s; it lands at 21 s, and position 8 (t=8) waits
    assert slow.windows["a"].reload_at == 5
    assert slow.exposed_s == pytest.approx(13.0 + 2 * COPY_LATENCY_S)


def test_copies_share_one_side_stream():
    seconds = [1.0] * 6
    transfers = [Transfer(k, 200, produced=0, first_use=5) for k in ("a", "b")]
    schedule = schedule_transfers(seconds, 3, transfers, bandwidth=100.0)
    # both offloads queue after position 0 (2 s each), both reloads are issued at the
    # backward start (t=3) once the side stream is free (t=5), finishing at 7 and 9:
    # position 5 would start at 5 and waits until 9
    assert schedule.exposed_s == pytest.approx(4.0 + 4 * COPY_LATENCY_S, abs=1e-4)
    assert schedule.transfer_s == pytest.approx(4 * (2.0 + COPY_LATENCY_S))


def test_dense_strides():
    assert is_dense(torch.empty(3, 4))
    assert is_dense(torch.empty(3, 4).t())
    assert is_dense(torch.empty(2, 3, 4, 5).to(memory_format=torch.channels_last))
    assert not is_dense(torch.empty(3, 1).expand(3, 4))
    assert not is_dense(torch.empty(3, 8)[:, ::2])


# --- choice and rewrite ---------------------------------------------------------------------


def _mlp() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 8))
    return model, torch.randn(2048, 64)


def _graphs(options: dict) -> tuple[remat.Plan, torch.fx.GraphModule, torch.fx.GraphModule]:
    model, x = _mlp()
    (plan, graphs), = plan_each(model, (x,), [{"inner_compiler": "eager", "on_plan_failure": "raise", **options}])
    return plan, graphs.forward, graphs.backward


def test_offload_true_moves_every_large_saved_activation_and_says_why_others_stay():
    plan, fw, bw = _graphs({"offload": True, "offload_min_bytes": "1MiB"})
    offloaded = {d.tensor for d in plan.offloaded}
    assert offloaded, plan
    assert all(d.bytes >= MIB for d in plan.offloaded)
    assert plan.offloaded_bytes == sum(d.bytes for d in plan.offloaded)
    assert all(d.reason == "offloaded (offload=True)" for d in plan.offloaded)
    strict, *_ = _graphs({"offload": True, "offload_min_bytes": "4MiB"})
    assert not strict.offloaded
    small = [d for d in strict.kept if "; not offloaded: smaller" in d.reason]
    assert {d.tensor for d in small} >= offloaded and all(d.bytes < 4 * MIB for d in small)
    # the saved activations on the device no longer include the offloaded ones
    assert plan.saved_bytes == sum(d.bytes for d in plan.kept if d.op != "placeholder")
    assert "offloaded to host memory" in plan.summary()


def test_offload_runs_after_its_producer_and_the_wait_precedes_the_first_use():
    plan, fw, bw = _graphs({"offload": True})
    fw_nodes = list(fw.graph.nodes)
    offloads = [n for n in fw_nodes if n.target is OFFLOAD]
    assert {n.args[0].name for n in offloads} == {d.tensor for d in plan.offloaded}
    (output,) = fw.graph.find_nodes(op="output")
    for node in offloads:
        assert node.prev is node.args[0], "the offload must start right after its value is made"
        assert node in output.args[0], "the host copy is what the forward saves"
        assert node.args[0] not in output.args[0], "the device copy is not saved too"
        assert node.meta["val"].device.type == "cpu"

    order = {node: i for i, node in enumerate(bw.graph.nodes)}
    reloads = [n for n in bw.graph.nodes if n.target is RELOAD]
    assert len(reloads) == len(offloads)
    for reload in reloads:
        (host,) = [a for a in reload.args if isinstance(a, torch.fx.Node)]
        assert host.op == "placeholder" and list(host.users) == [reload], "only the reload reads the host copy"
        waits = [u for u in reload.users if u.target is WAIT]
        assert len(waits) == 1
        others = [u for u in reload.users if u.target is not WAIT]
        assert others, "the reloaded value is read"
        assert order[reload] < order[waits[0]] < min(order[u] for u in others)


def test_offload_only_moves_the_tagged_values_and_keeps_them():
    class Tagged(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(64, 256), nn.Linear(256, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = remat.tag(torch.tanh(self.a(x)), "h")
            return self.b(torch.relu(h))

    torch.manual_seed(0)
    model, x = Tagged(), torch.randn(512, 64)
    (plan, _), = plan_each(model, (x,), [{"inner_compiler": "eager", "on_plan_failure": "raise", "offload_only": ["h"]}])
    assert [d.op for d in plan.offloaded] == ["aten.tanh.default"]
    assert plan.offloaded[0].reason == "tagged 'h' (offload_only)"


def test_auto_offloads_nothing_on_the_cpu_where_the_host_is_the_device():
    plan, fw, _ = _graphs({"offload": "auto", "memory_budget": 0.9})
    assert not plan.offloaded
    assert not [n for n in fw.graph.nodes if n.target is OFFLOAD]
    assert any("the device is the host" in d.reason for d in plan.kept), plan


def test_on_the_cpu_host_copies_count_as_memory_and_offloading_warns():
    with warnings.catch_warnings():
        warnings.simplefilter("error", remat.RematOffloadWarning)
        plain, *_ = _graphs({})
    with pytest.warns(remat.RematOffloadWarning, match=r"offloads \d+ value\(s\) .* runs on the CPU.*free nothing"):
        moved, *_ = _graphs({"offload": True})
    assert moved.offloaded
    # the host copy and the reloaded copy are both in the same memory: no saving
    assert moved.memory.peak_bytes >= plain.memory.peak_bytes


@pytest.mark.parametrize("inner_compiler", ["eager", "inductor"])
@pytest.mark.parametrize("options", [{"offload": True}, {"offload": True, "memory_budget": 0.7, "on_infeasible": "closest"}])
def test_gradients_equal_eager_with_offload(inner_compiler: str, options: dict):
    model, x = _mlp()
    compiled_model = copy.deepcopy(model)
    model(x).square().mean().backward()
    compiled = torch.compile(compiled_model, backend="remat", options={"inner_compiler": inner_compiler, **options})
    compiled(x).square().mean().backward()
    (plan,) = assert_planned_by_remat(compiled_model)
    assert plan.offloaded
    for (name, p), q in zip(model.named_parameters(), compiled_model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_offload_keeps_shapes_symbolic():
    """Deciding what to offload reads sizes at their hints: no guard, so one graph
    serves every batch size, with eager's gradients."""
    model, _ = _mlp()
    reference = copy.deepcopy(model)
    compiled = torch.compile(model, backend="remat", dynamic=True, options={"inner_compiler": "eager", "offload": True})
    for batch in (2048, 4096, 1500):
        x = torch.randn(batch, 64)
        model.zero_grad(set_to_none=True)
        reference.zero_grad(set_to_none=True)
        compiled(x).square().mean().backward()
        reference(x).square().mean().backward()
        for p, q in zip(reference.parameters(), model.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6)
    (plan,) = assert_planned_by_remat(model)
    assert plan.offloaded and plan.symbols


@pytest.mark.parametrize(
    "options, message",
    [
        ({"offload": "yes"}, r"'offload' must be one of \[False, True, 'auto'\]; got 'yes'"),
        ({"offload": "auto"}, r"offload='auto' chooses what to offload to meet a memory_budget; pass one"),
        ({"offload": True, "offload_min_bytes": -1}, r"'offload_min_bytes' must be a number of bytes >= 0"),
        ({"offload": True, "offload_min_bytes": "lots"}, r"'offload_min_bytes' must be .*got 'lots'"),
        ({"offload_only": []}, r"'offload_only' must be a non-empty list of names"),
        ({"offload": False, "offload_only": ["h"]}, r"offload=False and offload_only=\['h'\] contradict"),
        ({"offload": "auto", "memory_budget": 0.5, "offload_only": ["h"]}, r"cannot be combined"),
        ({"offload": True, "host_bandwidth": 0}, r"'host_bandwidth' must be bytes per second > 0"),
        ({"offload": True, "host_bandwidth": "fast"}, r"'host_bandwidth' must be .*got 'fast'"),
    ],
)
def test_bad_offload_options_are_refused_with_what_is_allowed(options: dict, message: str):
    with pytest.raises(ValueError, match=message):
        remat.RematOptions.from_mapping(options)


def test_offload_options_read_units():
    options = remat.RematOptions.from_mapping({"offload": True, "offload_min_bytes": "2MiB", "host_bandwidth": "25GB/s"})
    assert options.offload_min_bytes == 2 * MIB and options.host_bandwidth == 25e9
    assert remat.RematOptions.from_mapping({"offload_only": "h"}).offload is True


# --- CUDA --------------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("inner_compiler", ["eager", "inductor"])
def test_cuda_gradients_equal_eager_and_host_copies_are_pinned(inner_compiler: str):
    model, x = _mlp()
    model, x = model.cuda(), x.cuda()
    compiled_model = copy.deepcopy(model)
    model(x).square().mean().backward()
    compiled = torch.compile(compiled_model, backend="remat", options={"inner_compiler": inner_compiler, "offload": True})
    for _ in range(2):  # the second step reuses pinned buffers
        compiled_model.zero_grad(set_to_none=True)
        compiled(x).square().mean().backward()
    torch.cuda.synchronize()
    (plan,) = assert_planned_by_remat(compiled_model)
    assert plan.offloaded
    for (name, p), q in zip(model.named_parameters(), compiled_model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)
    from remat import host_copies

    host = host_copies.offload(torch.randn(4, 4, device="cuda"))
    assert host.is_pinned() and host.device.type == "cpu"


@needs_cuda
def test_cuda_offload_lowers_the_measured_peak():
    torch.manual_seed(0)
    # deep enough that the first layers' activations are on the host while the last
    # layers' backward runs, where the peak of the plain step is
    model = nn.Sequential(*[nn.Sequential(nn.Linear(1024, 1024), nn.Tanh()) for _ in range(8)]).cuda()
    x = torch.randn(8192, 1024, device="cuda")

    def peak(options: dict) -> int:
        torch._dynamo.reset()
        step_model = copy.deepcopy(model)
        compiled = torch.compile(step_model, backend="remat", options={"inner_compiler": "eager", **options})
        for _ in range(2):
            compiled(x).square().mean().backward()
            step_model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        compiled(x).square().mean().backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    assert peak({"offload": True}) < peak({})
