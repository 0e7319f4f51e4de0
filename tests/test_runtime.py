"""Runtime cost models: device profiles, the roofline and the profiling estimator.

Calibrations are written to a temporary REMAT_CACHE_DIR, never to the home directory.
Most tests use a fixed, made-up CPU profile so they do not depend on this machine's
speed; the tests of the calibration itself and of the profiling estimator measure.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import pickle

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch.fx.experimental.proxy_tensor import make_fx

from remat.cost_models import devices
from remat.cost_models.devices import A100, H100, H200, DeviceProfile, get_profile, profile_for_device, time_call
from remat.cost_models.runtime import (
    ProfilingEstimator,
    bytes_moved,
    graph_time,
    make_estimator,
    roofline_estimator,
    roofline_time,
)
from remat.passes.recompute_rules import is_view
from tests.checks import torch_threads

aten = torch.ops.aten
CPU = torch.device("cpu")

# A made-up CPU: 100 GFLOP/s matmuls, 10 GB/s, 5 us per op.
FIXED_CPU = DeviceProfile(
    name="cpu",
    matmul_flops={"float32": 100e9, "bfloat16": 5e9},
    vector_flops=20e9,
    memory_bandwidth=10e9,
    op_overhead_s=5e-6,
    view_overhead_s=2e-6,
    source="test",
)


@pytest.fixture(autouse=True)
def cache_dir(tmp_path_factory, monkeypatch):
    """Calibrations go to a temporary directory shared by the module's tests."""
    path = tmp_path_factory.getbasetemp() / "remat-cache"
    monkeypatch.setenv("REMAT_CACHE_DIR", str(path))
    return path


def trace(fn, *args, mode: str = "fake") -> fx.GraphModule:
    return make_fx(fn, tracing_mode=mode)(*args)


def nodes_of(gm: fx.GraphModule, op) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if getattr(n.target, "overloadpacket", None) is op]


def op_node(op, *args, **kwargs) -> fx.Node:
    """A one-op graph built by hand (faster than tracing, for the property tests):
    tensor arguments become placeholders; meta tensors stand in for fake ones."""
    graph = fx.Graph()
    placeholders = []
    for i, arg in enumerate(args):
        if isinstance(arg, torch.Tensor):
            placeholders.append(graph.placeholder(f"arg{i}"))
            placeholders[-1].meta["val"] = arg
        else:
            placeholders.append(arg)
    node = graph.call_function(op, tuple(placeholders), kwargs)
    node.meta["val"] = op(*args, **kwargs)
    graph.output(node)
    return node


def mm_node(m: int, k: int, n: int, dtype: torch.dtype = torch.float32) -> fx.Node:
    return op_node(aten.mm.default, torch.empty(m, k, dtype=dtype, device="meta"), torch.empty(k, n, dtype=dtype, device="meta"))


# --------------------------------------------------------------------------- profiles


@pytest.mark.parametrize("profile", [H100, H200, A100], ids=lambda p: p.name)
def test_spec_profiles_are_sane(profile):
    rates = profile.matmul_flops
    assert rates["float32"] < rates["tfloat32"] < rates["bfloat16"] == rates["float16"]
    assert 1e12 < profile.memory_bandwidth < 1e13
    assert 1e-6 <= profile.op_overhead_s <= 2e-5
    assert "datasheet" in profile.source
    assert profile.matmul_rate(torch.float32, tf32=True) == rates["tfloat32"]
    assert profile.matmul_rate(torch.float32) == rates["float32"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        profile.memory_bandwidth = 1.0
    with pytest.raises(TypeError):
        profile.matmul_flops["float32"] = 1.0
    hash(profile)
    assert pickle.loads(pickle.dumps(profile)) == profile == copy.deepcopy(profile)


def test_spec_figures_are_dense_and_ordered():
    assert H100.matmul_flops["bfloat16"] == pytest.approx(989.5e12)  # 1,979 sparse / 2
    assert A100.matmul_flops["bfloat16"] == pytest.approx(312e12)
    assert H200.matmul_flops == H100.matmul_flops
    assert A100.memory_bandwidth < H100.memory_bandwidth < H200.memory_bandwidth


def test_profile_names():
    assert get_profile("H100") is H100 and get_profile(" a100 ") is A100 and get_profile("h200") is H200
    with pytest.raises(ValueError, match="unknown device profile 'tpu'") as info:
        get_profile("tpu")
    for name in ("h100", "h200", "a100", "cpu"):
        assert name in str(info.value)


def test_unknown_dtype_gets_the_slowest_rate():
    assert FIXED_CPU.matmul_rate(torch.float64) == 5e9
    with pytest.raises(ValueError, match="positive"):
        dataclasses.replace(FIXED_CPU, memory_bandwidth=0.0)


def test_real_calibration_is_plausible():
    profile = devices.calibrated_profile(CPU, refresh=True)
    assert 1e9 < profile.matmul_flops["float32"] < 1e14
    assert 1e8 < profile.memory_bandwidth < 1e12
    assert 1e-8 < profile.op_overhead_s < 1e-3
    assert 0 <= profile.view_overhead_s <= profile.op_overhead_s
    assert 0.01 < profile.conv_efficiency < 10
    assert DeviceProfile.from_json(json.loads(json.dumps(profile.to_json()))) == profile
    assert f"{torch.get_num_threads()} threads" in profile.source
    assert set(profile.matmul_flops) >= {"float32", "bfloat16", "float16"}


class CountingCalibration:
    """Stands in for the micro-benchmark: fast, and counts how often it runs."""

    def __init__(self):
        self.calls = 0

    def __call__(self, device):
        self.calls += 1
        return dataclasses.replace(FIXED_CPU, op_overhead_s=self.calls * 1e-6)


@pytest.fixture
def counting(monkeypatch):
    counter = CountingCalibration()
    monkeypatch.setattr(devices, "calibrate", counter)
    monkeypatch.setattr(devices, "_memo", {})
    return counter


def test_calibration_is_cached_on_disk(tmp_path, monkeypatch, counting):
    monkeypatch.setenv("REMAT_CACHE_DIR", str(tmp_path))
    first = get_profile("cpu")
    assert counting.calls == 1
    entries = json.loads((tmp_path / devices.CACHE_FILE).read_text())
    (key,) = entries
    assert f"threads={torch.get_num_threads()}" in key and torch.__version__ in key
    monkeypatch.setattr(devices, "_memo", {})  # a new process: only the file remains
    assert get_profile("cpu") == first
    assert counting.calls == 1
    refreshed = get_profile("cpu", refresh=True)
    assert counting.calls == 2 and refreshed != first
    monkeypatch.setattr(devices, "_memo", {})
    assert get_profile("cpu") == refreshed  # the refresh replaced the cached entry


def test_calibration_key_includes_thread_count(tmp_path, monkeypatch, counting):
    monkeypatch.setenv("REMAT_CACHE_DIR", str(tmp_path))
    get_profile("cpu")
    with torch_threads(torch.get_num_threads() + 1):
        get_profile("cpu")
    assert counting.calls == 2
    assert len(json.loads((tmp_path / devices.CACHE_FILE).read_text())) == 2


def test_a_calibration_of_a_busy_machine_is_used_but_not_cached(tmp_path, monkeypatch, caplog):
    """Exp at 0.33 GFLOP/s and copies at 3.8 GB/s were once cached here (two threads
    on two busy cores) and priced every later plan: such a profile is not written."""
    monkeypatch.setenv("REMAT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(devices, "_memo", {})
    busy = dataclasses.replace(FIXED_CPU, vector_flops=3.3e8, memory_bandwidth=3.8e9)
    monkeypatch.setattr(devices, "calibrate", lambda device: busy)
    with caplog.at_level("WARNING", logger="remat"):
        assert get_profile("cpu") == busy
    assert "elementwise math at 0.33 GFLOP/s" in caplog.text and "not caching it" in caplog.text
    assert not (tmp_path / devices.CACHE_FILE).exists()
    assert devices.implausible(FIXED_CPU) is None


def test_unwritable_cache_dir_is_not_fatal(tmp_path, monkeypatch, counting):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("REMAT_CACHE_DIR", str(blocker / "cache"))
    first = get_profile("cpu")
    assert get_profile("cpu") == first and counting.calls == 1  # remembered in this process


def test_corrupt_cache_file_is_replaced(tmp_path, monkeypatch, counting):
    monkeypatch.setenv("REMAT_CACHE_DIR", str(tmp_path))
    (tmp_path / devices.CACHE_FILE).write_text("{not json")
    get_profile("cpu")
    assert counting.calls == 1
    assert len(json.loads((tmp_path / devices.CACHE_FILE).read_text())) == 1


def test_fixed_mmap_threshold_applies_to_cached_profile(monkeypatch, counting):
    monkeypatch.setattr(
        devices, "calibrate", lambda device: dataclasses.replace(FIXED_CPU, first_touch_bandwidth=1e9, first_touch_threshold=2**25)
    )
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert get_profile("cpu").first_touch_threshold == 131072
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    assert get_profile("cpu").first_touch_threshold == 2**25


@pytest.mark.parametrize(
    "gpu, expected",
    [("NVIDIA H100 80GB HBM3", H100), ("NVIDIA H200", H200), ("NVIDIA A100-SXM4-80GB", A100), ("NVIDIA H100 PCIe", H100)],
)
def test_profile_for_cuda_by_name(monkeypatch, gpu, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(devices, "device_model", lambda device: gpu)
    assert profile_for_device("cuda") is expected


def test_unknown_gpu_is_calibrated_with_a_warning(monkeypatch, counting, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(devices, "device_model", lambda device: "NVIDIA GeForce RTX 4090")
    with caplog.at_level(logging.WARNING, logger="remat"):
        profile = profile_for_device(torch.device("cuda", 0))
    assert counting.calls == 1 and profile.source == "test"
    assert "RTX 4090" in caplog.text and "calibrating" in caplog.text


def test_unknown_gpu_falls_back_to_a100_when_calibration_fails(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(devices, "device_model", lambda device: "Some GPU")
    monkeypatch.setattr(devices, "_memo", {})

    def broken(device):
        raise RuntimeError("no such device")

    monkeypatch.setattr(devices, "calibrate", broken)
    with caplog.at_level(logging.WARNING, logger="remat"):
        assert profile_for_device("cuda") is A100
    assert "A100" in caplog.text


def test_cuda_profile_without_cuda_names_the_alternative(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="get_profile"):
        profile_for_device("cuda")


# --------------------------------------------------------------------------- roofline


def mlp(x, w, b, y):
    h = torch.relu(x @ w + b)
    return (h.t().reshape(-1).view(h.shape[1], -1).permute(1, 0) * y).sum()


def mlp_args(n: int):
    return torch.randn(n, n), torch.randn(n, n), torch.randn(n), torch.randn(n, n)


def test_bigger_matmul_takes_longer():
    small, big = (nodes_of(trace(mlp, *mlp_args(n)), aten.mm)[0] for n in (64, 256))
    for profile in (FIXED_CPU, H100):
        assert roofline_time(big, profile) > roofline_time(small, profile)
    # compute-bound on this CPU: 64x the FLOPs, 64x the time (plus the overhead)
    assert roofline_time(big, FIXED_CPU) == pytest.approx(2 * 256**3 / 100e9 + 5e-6)


def test_views_and_graph_io_cost_nothing():
    gm = trace(mlp, *mlp_args(256))
    views = [n for n in gm.graph.nodes if is_view(n)] + nodes_of(gm, aten._unsafe_view)
    assert {aten.t, aten.view, aten.permute}.issubset({n.target.overloadpacket for n in views})
    for node in views:
        assert bytes_moved(node) == 0
        assert roofline_time(node, FIXED_CPU) == FIXED_CPU.view_overhead_s
        assert roofline_time(node, H100) == 0.0
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            assert bytes_moved(node) == 0 and roofline_time(node, FIXED_CPU) == 0.0
    (mm,) = nodes_of(gm, aten.mm)
    assert max(roofline_time(v, FIXED_CPU) for v in views) < roofline_time(mm, FIXED_CPU) / 10


def test_getitem_is_free():
    gm = trace(lambda x: torch.var_mean(x, dim=1)[0] * 2, torch.randn(8, 8))
    getitems = [n for n in gm.graph.nodes if n.op == "call_function" and not hasattr(n.target, "overloadpacket")]
    assert getitems
    for node in getitems:
        assert bytes_moved(node) == 0 and roofline_time(node, FIXED_CPU) == 0.0


def test_h100_matmul_is_much_faster_than_cpu():
    node = mm_node(2048, 2048, 2048)
    assert roofline_time(node, FIXED_CPU) > 100 * roofline_time(node, H100)
    bf16 = mm_node(2048, 2048, 2048, torch.bfloat16)
    assert roofline_time(bf16, H100) < roofline_time(node, H100) / 5
    # the spec-sheet rate, exactly: 2 n^3 FLOPs at 989.5 TFLOP/s plus the launch
    assert roofline_time(bf16, H100) == pytest.approx(2 * 2048**3 / 989.5e12 + H100.op_overhead_s)


def test_convolutions_run_at_the_conv_efficiency():
    gm = trace(lambda x, w: F.conv2d(x, w, padding=1), torch.empty(2, 16, 32, 32), torch.empty(32, 16, 3, 3))
    (conv,) = nodes_of(gm, aten.convolution)
    flops = 2 * 2 * 32 * 32 * 32 * 16 * 9
    half = dataclasses.replace(FIXED_CPU, conv_efficiency=0.5)
    assert roofline_time(conv, FIXED_CPU) == pytest.approx(flops / 100e9 + 5e-6)
    assert roofline_time(conv, half) == pytest.approx(flops / 50e9 + 5e-6)
    mm = mm_node(256, 256, 256)
    assert roofline_time(mm, half) == roofline_time(mm, FIXED_CPU)


def test_bytes_moved_counts_inputs_once_and_broadcasts_by_span():
    n = 32
    gm = trace(lambda x, b: (x * x) + b, torch.randn(n, n), torch.randn(n))
    mul, add = nodes_of(gm, aten.mul)[0], nodes_of(gm, aten.add)[0]
    assert bytes_moved(mul) == 2 * n * n * 4  # x read once, the product written
    assert bytes_moved(add) == (2 * n * n + n) * 4  # the bias is read once, not n times
    # memory-bound: the bytes over the bandwidth, plus the overhead
    assert roofline_time(mul, FIXED_CPU) == pytest.approx(2 * n * n * 4 / 10e9 + 5e-6)


def test_gathers_read_only_the_rows_they_pick():
    weight, idx = torch.randn(10_000, 64), torch.randint(0, 10_000, (8,))
    gm = trace(lambda i, w: F.embedding(i, w), idx, weight)
    (emb,) = nodes_of(gm, aten.embedding)
    assert bytes_moved(emb) == 8 * 64 * 4 * 2 + 8 * 8  # rows read, rows written, indices


def test_empty_moves_nothing_and_exp_is_compute_bound_on_cpu():
    gm = trace(lambda x: torch.exp(x) + torch.neg(x) + torch.empty_like(x), torch.randn(1024, 1024))
    (empty,) = [n for n in gm.graph.nodes if "empty" in str(n.target)]
    assert bytes_moved(empty) == 0
    (exp,) = nodes_of(gm, aten.exp)
    (neg,) = nodes_of(gm, aten.neg)
    assert bytes_moved(exp) == bytes_moved(neg)
    assert roofline_time(exp, FIXED_CPU) > 1.2 * roofline_time(neg, FIXED_CPU)
    assert roofline_time(exp, H100) == roofline_time(neg, H100)  # memory-bound there


def test_first_touch_costs_only_large_outputs():
    faulting = dataclasses.replace(FIXED_CPU, first_touch_bandwidth=1e9, first_touch_threshold=2**20)
    small = op_node(aten.neg.default, torch.empty(2**10, device="meta"))
    big = op_node(aten.neg.default, torch.empty(2**20, device="meta"))
    assert roofline_time(small, faulting) == roofline_time(small, FIXED_CPU)
    assert roofline_time(big, faulting) == pytest.approx(roofline_time(big, FIXED_CPU) + 2**22 / 1e9)


def test_symbolic_shapes_use_the_hints():
    args = mlp_args(48)
    static, symbolic = trace(mlp, *args), trace(mlp, *args, mode="symbolic")
    est = roofline_estimator(FIXED_CPU)
    assert graph_time(symbolic, est) == pytest.approx(graph_time(static, est))
    (mm,) = nodes_of(symbolic, aten.mm)
    assert isinstance(mm.meta["val"].shape[0], torch.SymInt)
    assert bytes_moved(mm) == 3 * 48 * 48 * 4


def test_graph_time_sums_nodes():
    gm = trace(mlp, *mlp_args(32))
    est = roofline_estimator(FIXED_CPU)
    total = sum(roofline_time(n, FIXED_CPU) for n in gm.graph.nodes)
    assert graph_time(gm, est) == graph_time(gm.graph, est) == graph_time(list(gm.graph.nodes), est)
    assert graph_time(gm, est) == pytest.approx(total) and total > 0
    assert graph_time([], est) == 0


@pytest.fixture
def fp32_precision():
    """Puts back the float32 precision settings a test changes."""
    levels = (torch.backends, torch.backends.cuda.matmul, torch.backends.cudnn, torch.backends.cudnn.conv)
    saved = [level.fp32_precision for level in levels]
    yield
    for level, value in zip(levels, saved, strict=True):
        level.fp32_precision = value


def test_roofline_reads_tf32_set_through_either_api(fp32_precision):
    """A program (or a library such as Lightning) may set the precision through the
    per-backend API after the legacy one; torch's legacy getter then raises, and the
    roofline, which prices every plan, must not. A GPU machine running the suite found it."""
    node = mm_node(2048, 2048, 2048)
    torch.set_float32_matmul_precision("highest")
    ieee = roofline_time(node, H100)
    torch.set_float32_matmul_precision("high")
    assert roofline_time(node, H100) < ieee
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    with pytest.raises(RuntimeError):  # the mixed state
        torch.get_float32_matmul_precision()
    assert roofline_time(node, H100) < ieee
    torch.backends.cuda.matmul.fp32_precision = "none"  # defers to the global setting
    torch.backends.fp32_precision = "ieee"
    assert roofline_time(node, H100) == ieee


@given(
    m=st.integers(1, 2048),
    k=st.integers(1, 2048),
    n=st.integers(1, 2048),
    grow=st.sampled_from(["m", "k", "n"]),
    by=st.integers(1, 2048),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_roofline_is_monotone_in_matrix_size(m, k, n, grow, by, dtype):
    sizes = {"m": m, "k": k, "n": n}
    bigger = {**sizes, grow: sizes[grow] + by}
    small, big = mm_node(**sizes, dtype=dtype), mm_node(**bigger, dtype=dtype)
    for profile in (FIXED_CPU, H100, A100):
        assert roofline_time(small, profile) <= roofline_time(big, profile)
        assert roofline_time(small, profile) >= profile.op_overhead_s


@given(numel=st.integers(1, 2**22), extra=st.integers(1, 2**22))
def test_roofline_is_monotone_in_elementwise_size(numel, extra):
    small = op_node(aten.sigmoid.default, torch.empty(numel, device="meta"))
    big = op_node(aten.sigmoid.default, torch.empty(numel + extra, device="meta"))
    for profile in (FIXED_CPU, H100):
        assert roofline_time(small, profile) <= roofline_time(big, profile)


# --------------------------------------------------------------------------- profiling


def test_make_estimator():
    assert make_estimator("roofline", "cpu", FIXED_CPU).profile is FIXED_CPU
    est = make_estimator("profile", "cpu", FIXED_CPU)
    assert isinstance(est, ProfilingEstimator) and est.fallback.profile is FIXED_CPU
    with pytest.raises(ValueError, match="'roofline', 'profile'") as info:
        make_estimator("magic", "cpu")
    assert "'magic'" in str(info.value)


def test_profiled_matmul_matches_a_direct_measurement():
    """On one thread: a matmul on two threads, one of them on a core something else
    is using, waits for the slower one, and the two timings (milliseconds each) then
    came out 4x apart both ways in a CI run on two cores."""
    n = 384
    node = mm_node(n, n, n)
    a, b = torch.randn(n, n), torch.randn(n, n)
    ratios = []
    with torch_threads(1):
        for _ in range(5):  # a shared machine's neighbours can upset one attempt
            # a fallback of 1 s would be far off: the figure must come from timing
            estimated = ProfilingEstimator(CPU, fallback=lambda node: 1.0)(node)
            measured = time_call(lambda: torch.mm(a, b), CPU)
            ratios.append(estimated / measured)
            if 1 / 3 < ratios[-1] < 3:
                break
    assert 1 / 3 < ratios[-1] < 3, ratios


def test_profiler_times_repeated_shapes_once(monkeypatch):
    from remat.cost_models import runtime

    calls = []

    def fake_time(fn, device, **kwargs):
        calls.append(fn)
        fn()
        return 1e-3

    monkeypatch.setattr(runtime, "time_call", fake_time)
    gm = trace(lambda x, w: torch.tanh(x @ w) @ w + torch.tanh(x @ w.t()) @ w, torch.randn(16, 16), torch.randn(16, 16))
    est = ProfilingEstimator(CPU, fallback=roofline_estimator(FIXED_CPU))
    mms = nodes_of(gm, aten.mm)
    assert len(mms) == 4
    assert [est(node) for node in mms] == [1e-3] * 4
    # x @ w and tanh(.) @ w share shapes and strides; x @ w.t() has other strides
    assert len(calls) == 2


def risky(tokens, weight, target, x):
    h = F.embedding(tokens, weight)  # integer indices into 50 rows
    h = F.dropout(h, 0.5, training=True)  # random
    h = h.add_(1.0)  # in place
    logits = h.sum(1) @ x
    idx = torch.nonzero(target >= 0).flatten()  # data-dependent size
    loss = F.cross_entropy(logits, target) + logits.gather(1, target[:, None]).sum()
    return loss + logits[idx].sum() + torch.randn(3).sum()


def risky_args():
    g = torch.Generator().manual_seed(0)
    return (
        torch.randint(0, 50, (4, 6), generator=g),
        torch.randn(50, 8, generator=g),
        torch.randint(0, 7, (4,), generator=g),
        torch.randn(8, 7, generator=g),
    )


def test_profiler_never_raises_and_skips_unsafe_ops():
    gm = make_fx(risky, tracing_mode="fake")(*risky_args())
    fallback = roofline_estimator(FIXED_CPU)
    est = ProfilingEstimator(CPU, fallback=fallback)
    times = {node: est(node) for node in gm.graph.nodes}
    assert all(math.isfinite(t) and t >= 0 for t in times.values())
    unsafe = [n for n in gm.graph.nodes if n.op == "call_function" and n.target.__name__.split(".")[0] in
              ("bernoulli_", "add_", "randn", "nonzero")]
    assert len(unsafe) >= 4
    for node in unsafe:  # random, in-place, data-dependent: the roofline figure
        assert times[node] == fallback(node)
    timed = [n for n in gm.graph.nodes if getattr(n.target, "overloadpacket", None) in (aten.embedding, aten.gather, aten.mm)]
    assert timed and all(times[n] != fallback(n) for n in timed)


def test_profiler_falls_back_when_the_op_fails():
    fallback = roofline_estimator(FIXED_CPU)
    est = ProfilingEstimator(CPU, fallback=fallback)
    node = mm_node(8, 8, 8)
    node.target = aten.cholesky.default  # raises on a random (not positive-definite) matrix
    node.args = (node.args[0],)
    assert est(node) == fallback(node)
    assert list(est.cache.values()) == [None]


def test_profiler_on_a_small_gpt_step():
    from tests.zoo import make_gpt

    case = make_gpt()
    params = dict(case.model.named_parameters())
    targets = torch.randint(0, 64, case.inputs[0].shape)

    def step(p, tokens, targets):
        logits = torch.func.functional_call(case.model, p, (tokens,))
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return torch.autograd.grad(loss, list(p.values()))

    gm = make_fx(step, tracing_mode="fake")({k: v.detach().requires_grad_() for k, v in params.items()}, case.inputs[0], targets)
    fallback = roofline_estimator(FIXED_CPU)
    estimator = ProfilingEstimator(CPU, fallback=fallback, repeats=1)
    profiled = graph_time(gm, estimator)
    assert math.isfinite(profiled) and profiled > 0
    assert graph_time(gm, fallback) > 0
    timed = [seconds for seconds in estimator.cache.values() if seconds is not None]
    assert len(timed) >= len(estimator.cache) // 2, "most ops of a GPT step should be timed, not estimated"


def test_calibration_from_inside_planning_times_real_kernels(tmp_path, monkeypatch):
    """remat calibrates lazily, while AOTAutograd traces with fake tensors, where every
    op returns at once: the profile must still come from real kernels."""
    import remat

    monkeypatch.setenv("REMAT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(devices, "_memo", {})
    plan = remat.plan(torch.nn.Linear(8, 8), torch.randn(4, 8), inner_compiler="eager")
    assert plan.estimated_time_s is not None
    assert devices._memo, "planning did not calibrate"
    planned = devices.calibrated_profile("cpu")  # the memo planning filled
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    direct = 2 * 512**3 / devices.time_call(lambda: torch.mm(a, b), torch.device("cpu"), repeats=5, best=True)
    assert direct / 5 < planned.matmul_rate(torch.float32) < direct * 5, (planned, direct)
