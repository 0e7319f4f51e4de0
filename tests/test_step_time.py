"""The step-time model as Inductor runs a graph (``cost_models.step_time``), and the
recompute preferences that follow from it (``recompute_rules``)."""

from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from remat.cost_models.devices import DeviceProfile
from remat.cost_models.fusion import fuse
from remat.cost_models.runtime import roofline_estimator
from remat.cost_models.step_time import kernel_seconds, position_seconds
from remat.passes.recompute_rules import reduction_reason, stored_in_backward_reason

MIB = 2**20
PROFILE = DeviceProfile(
    name="cpu",
    matmul_flops={"float32": 1e11},
    vector_flops=1e10,
    memory_bandwidth=1e10,
    op_overhead_s=1e-6,
    view_overhead_s=1e-6,
    source="fixed for tests",
)
ESTIMATE = roofline_estimator(PROFILE)


def _graph(fn, *inputs: torch.Tensor) -> tuple[list[torch.fx.Node], list[torch.fx.Node]]:
    graph = make_fx(fn, tracing_mode="fake")(*inputs).graph
    nodes = [n for n in graph.nodes if n.op == "call_function"]
    (output,) = graph.find_nodes(op="output")
    return nodes, [v for v in output.args[0] if isinstance(v, torch.fx.Node)]


def test_a_fused_pointwise_chain_moves_its_input_and_output_once() -> None:
    """Op by op, each of three pointwise ops reads and writes 1 MiB; fused, one kernel
    reads the input and writes the result, and the inlined ops cost their arithmetic."""

    def f(x: torch.Tensor) -> tuple[torch.Tensor]:
        return (((x * 2) + 1).relu(),)

    nodes, outputs = _graph(f, torch.randn(256, 1024))
    fusion = fuse(nodes, outputs)
    fused = dict(zip(nodes, kernel_seconds(nodes, fusion, ESTIMATE, PROFILE)))
    mul, add, relu = nodes
    assert fused[mul] == fused[add] == pytest.approx(256 * 1024 / PROFILE.vector_flops)
    assert fused[relu] == pytest.approx(2 * MIB / PROFILE.memory_bandwidth + PROFILE.op_overhead_s)
    eager = position_seconds(nodes, [], ESTIMATE, None)
    assert eager == [ESTIMATE(n) for n in nodes]
    assert sum(fused.values()) < sum(eager) / 2


def test_extern_kernels_keep_their_estimate_and_a_kept_value_costs_a_store() -> None:
    """A matmul is priced as op by op. A pointwise value that the graph returns (as a
    forward returns what the backward keeps) is stored: keeping it costs its write (its
    reader is fused with it and reads it where it is made), less the arithmetic that
    the inlined version repeats inside its reader's kernel."""

    def kept(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = x @ w
        z = y.relu()
        return (z * 2, z)

    def inlined(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor]:
        return ((x @ w).relu() * 2,)

    x, w = torch.randn(256, 256), torch.randn(256, 1024)
    nodes, outputs = _graph(kept, x, w)
    seconds = kernel_seconds(nodes, fuse(nodes, outputs), ESTIMATE, PROFILE)
    assert seconds[0] == ESTIMATE(nodes[0])  # the matmul
    lean_nodes, lean_outputs = _graph(inlined, x, w)
    lean = kernel_seconds(lean_nodes, fuse(lean_nodes, lean_outputs), ESTIMATE, PROFILE)
    elements = 256 * 1024
    assert sum(seconds) - sum(lean) == pytest.approx(MIB / PROFILE.memory_bandwidth - elements / PROFILE.vector_flops)


def test_normalization_statistics_are_not_recomputed_but_a_sum_that_keeps_its_size_may_be() -> None:
    def f(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        var, mean = torch.var_mean(x, dim=1, keepdim=True)
        return ((x - mean) * var.rsqrt(), y.sum(dim=0))

    nodes, _ = _graph(f, torch.randn(64, 1024), torch.randn(2, 1024))
    by_name = {n.name: n for n in nodes}
    for name in ("var_mean", "getitem", "getitem_1"):
        assert "reduction that shrinks its input" in reduction_reason(by_name[name])
    assert reduction_reason(by_name["sum_1"]) is None  # 2x smaller only
    assert reduction_reason(by_name["rsqrt"]) is None


def test_a_value_an_extern_kernel_reads_in_the_backward_is_stored_there() -> None:
    """Pretend the second matmul is the backward's: the relu it reads (through a
    view) would be stored there if recomputed; the view itself is never kept."""

    def f(x: torch.Tensor, w: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = (x @ w).relu()
        return (h.t() @ g, h * 2)

    nodes, _ = _graph(f, torch.randn(32, 16), torch.randn(16, 8), torch.randn(32, 4))
    by_name = {n.name: n for n in nodes}
    backward = {by_name["mm_1"]}
    assert "in the backward" in stored_in_backward_reason(by_name["relu"], backward.__contains__)
    assert stored_in_backward_reason(by_name["t"], backward.__contains__) is None
    assert stored_in_backward_reason(by_name["relu"], lambda node: False) is None
    assert stored_in_backward_reason(by_name["mul"], backward.__contains__) is None
