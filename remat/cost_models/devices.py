"""What a device can do per second: the figures the runtime cost model divides by.

GPU profiles come from the vendors' specification sheets (dense tensor-core figures;
the sheets print the 2:4-sparse ones, twice as high). The CPU profile is measured
here by a short micro-benchmark, since CPUs differ too much for a table, and cached as
JSON (``$REMAT_CACHE_DIR`` or ``~/.cache/remat/``) so each machine pays for it once.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from remat._torch_internals import real_kernels

log = logging.getLogger("remat")

CACHE_FORMAT = 3  # bump when the calibration changes, so old cache entries are ignored
CACHE_FILE = "device_profiles.json"
# glibc serves allocations at or above this size with fresh mmap'd pages (the dynamic
# threshold never rises past 32 MiB on 64-bit), so writing them page-faults every time.
GLIBC_MMAP_THRESHOLD_MAX = 32 * 2**20
# FLOPs counted per element of exp, erf, tanh and the like (a vectorised polynomial
# approximation takes 10-30 instructions); the runtime model counts other elementwise
# ops as 1 per element, and the CPU calibration times exp at this figure.
TRANSCENDENTAL_FLOPS = 20


@dataclass(frozen=True)
class DeviceProfile:
    """Peak rates of one device, and where the figures come from.

    matmul_flops: FLOP/s of matmul-like work (matmul, convolution, attention) by dtype
        name ("float32", "bfloat16", ...; "tfloat32" for float32 on tensor cores).
    vector_flops: FLOP/s of everything else (elementwise math, reductions).
    memory_bandwidth: bytes/s between the compute units and main memory.
    op_overhead_s: fixed cost of every op that runs a kernel (launch on a GPU;
        dispatch and Python when a graph runs op by op on a CPU).
    view_overhead_s: cost of an op that only makes a view (no kernel, dispatch only).
    conv_efficiency: the fraction of the matmul rate convolutions reach (on a CPU,
        convolutions of a few dozen channels run at half the GEMM rate or less).
    first_touch_bandwidth, first_touch_threshold: outputs of at least the threshold
        bytes land in freshly mapped pages (glibc's mmap) and are written at this
        slower rate, page faults included; None where an allocator caches memory.
    host_bandwidth: bytes/s of a copy between the device and pinned host memory, one
        direction; None: a copy within main memory (a CPU), ``memory_bandwidth / 2``
        (the copy reads and writes).
    """

    name: str
    matmul_flops: Mapping[str, float] = field(hash=False)
    vector_flops: float
    memory_bandwidth: float
    op_overhead_s: float
    source: str
    view_overhead_s: float = 0.0
    conv_efficiency: float = 1.0
    first_touch_bandwidth: float | None = None
    first_touch_threshold: int | None = None
    host_bandwidth: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "matmul_flops", MappingProxyType(dict(self.matmul_flops)))
        rates = [*self.matmul_flops.values(), self.vector_flops, self.memory_bandwidth, self.conv_efficiency]
        if not self.matmul_flops or min(rates) <= 0 or self.op_overhead_s < 0:
            raise ValueError(f"device profile {self.name!r}: rates must be positive, got {self}")

    def matmul_rate(self, dtype: torch.dtype, tf32: bool = False) -> float:
        """FLOP/s of a matmul in ``dtype``; float32 runs on tensor cores when ``tf32``.

        A dtype the profile does not list gets the slowest listed rate (a guess that
        does not flatter recomputation)."""
        name = str(dtype).removeprefix("torch.")
        if name == "float32" and tf32 and "tfloat32" in self.matmul_flops:
            name = "tfloat32"
        return self.matmul_flops.get(name, min(self.matmul_flops.values()))

    def host_copy_rate(self) -> float:
        """Bytes/s of an offload or a reload (see ``host_bandwidth``)."""
        return self.host_bandwidth if self.host_bandwidth is not None else self.memory_bandwidth / 2

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["matmul_flops"] = dict(self.matmul_flops)
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DeviceProfile:
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})

    def __reduce__(self) -> tuple[Any, ...]:
        # the read-only mapping does not pickle; the JSON form does (copy uses it too)
        return (DeviceProfile.from_json, (self.to_json(),))


# --------------------------------------------------------------------------- GPUs
# Per-op overhead on GPUs: a kernel launch plus PyTorch's dispatch, about 4 us for an
# eager op (not a spec-sheet figure; CUDA graphs lower it).
_GPU_OVERHEAD_S = 4e-6

# Host links, per direction: PCIe 5.0 x16 (H100, H200) 64 GB/s, PCIe 4.0 x16 (A100)
# 32 GB/s, from the PCI-SIG specifications; pinned copies reach about 80% of it.
_PCIE5_X16 = 0.8 * 64e9
_PCIE4_X16 = 0.8 * 32e9

# NVIDIA H100 Tensor Core GPU datasheet, H100 SXM column: FP64 34 TFLOPS, FP64 Tensor
# Core 67, FP32 67, TF32 Tensor Core 989*, BF16/FP16 Tensor Core 1,979*, FP8 3,958*,
# INT8 3,958 TOPS* (* with sparsity: halved here), GPU memory bandwidth 3.35 TB/s.
H100 = DeviceProfile(
    name="h100",
    matmul_flops={
        "float64": 67e12,
        "float32": 67e12,
        "tfloat32": 494.5e12,
        "bfloat16": 989.5e12,
        "float16": 989.5e12,
        "float8_e4m3fn": 1979e12,
        "float8_e5m2": 1979e12,
        "int8": 1979e12,
    },
    vector_flops=67e12,
    memory_bandwidth=3.35e12,
    op_overhead_s=_GPU_OVERHEAD_S,
    host_bandwidth=_PCIE5_X16,
    source="NVIDIA H100 Tensor Core GPU datasheet (H100 SXM, dense = sparse / 2)",
)

# NVIDIA H200 Tensor Core GPU datasheet, H200 SXM column: the same compute as H100 SXM
# (FP64 34, FP64 TC 67, FP32 67, TF32 TC 989*, BF16/FP16 TC 1,979*, FP8 3,958*, INT8
# 3,958 TOPS*; * with sparsity), 141 GB HBM3e at 4.8 TB/s.
H200 = replace(
    H100,
    name="h200",
    memory_bandwidth=4.8e12,
    source="NVIDIA H200 Tensor Core GPU datasheet (H200 SXM, dense = sparse / 2)",
)

# NVIDIA A100 Tensor Core GPU datasheet, A100 80GB SXM column: FP64 9.7 TFLOPS, FP64
# Tensor Core 19.5, FP32 19.5, TF32 Tensor Core 156 (312*), BF16/FP16 Tensor Core 312
# (624*), INT8 624 TOPS (1,248*); GPU memory bandwidth 2,039 GB/s.
A100 = DeviceProfile(
    name="a100",
    matmul_flops={
        "float64": 19.5e12,
        "float32": 19.5e12,
        "tfloat32": 156e12,
        "bfloat16": 312e12,
        "float16": 312e12,
        "int8": 624e12,
    },
    vector_flops=19.5e12,
    memory_bandwidth=2.039e12,
    op_overhead_s=_GPU_OVERHEAD_S,
    host_bandwidth=_PCIE4_X16,
    source="NVIDIA A100 Tensor Core GPU datasheet (A100 80GB SXM, dense)",
)

SPEC_PROFILES: dict[str, DeviceProfile] = {p.name: p for p in (H100, H200, A100)}
KNOWN_PROFILES = (*SPEC_PROFILES, "cpu")


# --------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (nothing to wait for on a CPU)."""
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


def time_call(
    fn: Callable[[], object], device: torch.device, *, repeats: int = 5, sample_s: float = 2e-3, best: bool = False
) -> float:
    """Seconds per call of ``fn``: after a warm-up call, each of ``repeats`` samples
    loops ``fn`` long enough (about ``sample_s``) for the clock to resolve it. The
    median sample, or with ``best`` the fastest (what the device can do when nothing
    else competes for it: calibrations on a shared machine want that)."""
    fn()
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    once = time.perf_counter() - start
    inner = max(1, min(1000, int(sample_s / max(once, 1e-7))))
    samples = []
    for _ in range(repeats if once < 0.25 else 1):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        synchronize(device)
        samples.append((time.perf_counter() - start) / inner)
    return min(samples) if best else statistics.median(samples)


# --------------------------------------------------------------------------- calibration


def _benchmarks(device: torch.device) -> dict[str, tuple[float, Callable[[], object]]]:
    """What the calibration times: name -> (work per call, the call). The work is FLOPs
    for the matmuls, the convolution and exp, bytes for the memory ops, else 1."""
    aten, cpu = torch.ops.aten, device.type == "cpu"
    if cpu:
        # Low-precision matmuls have no fast path on many CPUs (100x slower than
        # float32): small sizes keep the calibration short.
        m = 512 if torch.get_num_threads() <= 4 else 1024
        sizes = {torch.float32: m, torch.float64: m // 2, torch.bfloat16: 128, torch.float16: 128}
    else:
        sizes = {torch.float32: 4096, torch.float64: 2048, torch.bfloat16: 4096, torch.float16: 4096}
    out: dict[str, tuple[float, Callable[[], object]]] = {}
    for dtype, m in sizes.items():
        a, b = (torch.randn(m, m, device=device).to(dtype) for _ in range(2))
        out[str(dtype).removeprefix("torch.")] = (2 * m**3, lambda a=a, b=b: torch.mm(a, b))
    # a 3x3 convolution, 64 channels, 32x32 (x4 on a GPU): a mid-sized convnet layer
    n, c = (8, 64) if cpu else (32, 256)
    image, weight = torch.randn(n, c, 32, 32, device=device), torch.randn(c, c, 3, 3, device=device)
    conv = torch.nn.functional.conv2d
    out["conv"] = (2 * n * c * 32 * 32 * c * 9, lambda: conv(image, weight, padding=1))
    one = torch.ones(1, device=device)
    out["overhead"] = (1, lambda: aten.add.Tensor(one, one))
    out["view"] = (1, lambda: aten.view.default(one, [1]))
    x, y = (torch.randn(2**21 if cpu else 2**26, device=device) for _ in range(2))
    out["add"] = (3 * x.nbytes, lambda: torch.add(x, y))  # reads 2 tensors, writes 1
    # exp on a cache-sized tensor: bound by its math where that is slower than memory
    z = x[: 2**16].clone()
    out["exp"] = (TRANSCENDENTAL_FLOPS * z.numel(), lambda: torch.exp(z))
    if cpu and sys.platform.startswith("linux"):
        big = torch.empty(GLIBC_MMAP_THRESHOLD_MAX // 4 + 1024, device=device)
        out["fill"] = (big.nbytes, lambda: big.fill_(1.0))
        out["fresh"] = (big.nbytes, lambda: torch.full_like(big, 1.0))  # page faults too
    return out


def calibrate(device: torch.device | str = "cpu", rounds: int = 3) -> DeviceProfile:
    """Measure a profile on ``device`` (about 1 s on a 2-core CPU), at the current
    ``torch.get_num_threads()``. Sizes are those of a mid-sized layer: a 512-square
    float32 matmul (larger with many threads or on a GPU), a 64-channel convolution,
    elementwise ops on 8 MiB tensors, 1-element ops for the overhead.

    Each figure is the fastest of ``rounds`` interleaved rounds of a few runs: on a
    shared machine the median is what the neighbours leave over, and interleaving lets
    every figure (and the ratios between them) see the same quiet moments."""
    device = torch.device(device)
    seconds: dict[str, float] = {}
    with real_kernels():  # planning calls this from inside fake-tensor tracing
        benchmarks = _benchmarks(device)
        seconds = dict.fromkeys(benchmarks, math.inf)
        for _ in range(rounds):
            for name, (_, fn) in benchmarks.items():
                sample = 5e-3 if name in ("overhead", "view") else 2e-3
                seconds[name] = min(seconds[name], time_call(fn, device, repeats=3, sample_s=sample, best=True))
    overhead = seconds["overhead"]
    matmul = {name: benchmarks[name][0] / seconds[name] for name in ("float32", "float64", "bfloat16", "float16")}

    first_touch_bw = first_touch_threshold = None
    if "fresh" in seconds:
        first_touch_bw = benchmarks["fresh"][0] / max(seconds["fresh"] - seconds["fill"], 1e-9)
        first_touch_threshold = GLIBC_MMAP_THRESHOLD_MAX
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    return DeviceProfile(
        name=device.type,
        matmul_flops=matmul,
        vector_flops=benchmarks["exp"][0] / max(seconds["exp"] - overhead, 1e-9),
        memory_bandwidth=benchmarks["add"][0] / max(seconds["add"] - overhead, 1e-9),
        op_overhead_s=overhead,
        view_overhead_s=min(seconds["view"], overhead),
        conv_efficiency=benchmarks["conv"][0] / seconds["conv"] / matmul["float32"],
        first_touch_bandwidth=first_touch_bw,
        first_touch_threshold=first_touch_threshold,
        source=f"calibrated on {device_model(device)}{threads}, torch {torch.__version__}",
    )


# Rates no current CPU or GPU measures below, even on one core: a calibration under
# them timed a busy machine (seen here: exp at 0.33 GFLOP/s and copies at 3.8 GB/s, 60x
# and 40x below the same machine idle, with two threads on two busy cores).
PLAUSIBLE_FLOPS = 1e9
PLAUSIBLE_BANDWIDTH = 1e9


def implausible(profile: DeviceProfile) -> str | None:
    """What in a calibrated profile is too slow to be true, or None."""
    found = []
    if profile.vector_flops < PLAUSIBLE_FLOPS:
        found.append(f"elementwise math at {profile.vector_flops / 1e9:.2f} GFLOP/s")
    if profile.memory_bandwidth < PLAUSIBLE_BANDWIDTH:
        found.append(f"memory at {profile.memory_bandwidth / 1e9:.2f} GB/s")
    if profile.matmul_flops.get("float32", math.inf) < PLAUSIBLE_FLOPS:
        found.append(f"float32 matmuls at {profile.matmul_flops['float32'] / 1e9:.2f} GFLOP/s")
    return ", ".join(found) or None


def device_model(device: torch.device) -> str:
    """A readable name of the hardware: the CPU model, or the accelerator's name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type != "cpu":
        return device.type
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


# --------------------------------------------------------------------------- cache


def cache_dir() -> Path:
    """Where calibrations are kept: ``$REMAT_CACHE_DIR``, else ``~/.cache/remat``."""
    return Path(os.environ.get("REMAT_CACHE_DIR") or Path.home() / ".cache" / "remat")


def _cache_key(device: torch.device) -> str:
    threads = torch.get_num_threads() if device.type == "cpu" else 0
    return f"v{CACHE_FORMAT}|{device_model(device)}|threads={threads}|torch={torch.__version__}"


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(path: Path, key: str, profile: DeviceProfile) -> None:
    """Add one entry, atomically; a cache that cannot be written is skipped, not fatal."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read_cache(path)
        data[key] = profile.to_json()
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as f:
            tmp = Path(f.name)
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as e:
        log.info("remat: could not cache the device calibration in %s (%s); not caching", path, e)
        if tmp is not None:
            tmp.unlink(missing_ok=True)


_memo: dict[str, DeviceProfile] = {}  # this process's calibrations, cached or not


def _with_process_settings(profile: DeviceProfile) -> DeviceProfile:
    """The first-touch threshold belongs to the process: a fixed MALLOC_MMAP_THRESHOLD_
    (as when measuring peak memory) sends smaller allocations to fresh pages too."""
    if profile.first_touch_threshold is None:
        return profile
    fixed = os.environ.get("MALLOC_MMAP_THRESHOLD_", "")
    return replace(profile, first_touch_threshold=int(fixed)) if fixed.isdigit() else profile


def calibrated_profile(device: torch.device | str = "cpu", *, refresh: bool = False) -> DeviceProfile:
    """The calibrated profile of ``device``: from this process's memo, else the JSON
    cache, else measured now (and cached). ``refresh`` measures again."""
    device = torch.device(device)
    key = _cache_key(device)
    path = cache_dir() / CACHE_FILE
    if not refresh and key in _memo:
        return _with_process_settings(_memo[key])
    profile = None
    if not refresh and key in (cached := _read_cache(path)):
        try:
            profile = DeviceProfile.from_json(cached[key])
        except (TypeError, ValueError, KeyError) as e:
            log.info("remat: ignoring a malformed cached calibration in %s (%s)", path, e)
    if profile is None:
        start = time.perf_counter()
        profile = calibrate(device)
        log.info("remat: calibrated %s in %.2f s: %s", device, time.perf_counter() - start, profile)
        doubt = implausible(profile)
        if doubt is None:
            _write_cache(path, key, profile)
        else:
            log.warning(
                "remat: the %s calibration measured %s, far below any current hardware (was the machine busy, "
                "or its cores oversubscribed?); using it in this process only, not caching it", device, doubt,
            )
    _memo[key] = profile
    return _with_process_settings(profile)


# --------------------------------------------------------------------------- lookup


def get_profile(name: str, *, refresh: bool = False) -> DeviceProfile:
    """A profile by name: "h100", "h200", "a100" (spec sheets) or "cpu" (calibrated)."""
    key = name.strip().lower()
    if key == "cpu":
        return calibrated_profile("cpu", refresh=refresh)
    if key not in SPEC_PROFILES:
        raise ValueError(f"unknown device profile {name!r}; known profiles: {', '.join(KNOWN_PROFILES)}")
    return SPEC_PROFILES[key]


def profile_for_device(device: torch.device | str, *, refresh: bool = False) -> DeviceProfile:
    """The profile that describes ``device``.

    CPU: calibrated. CUDA: by the GPU's name (H200, H100, A100; other variants of
    those families, such as PCIe cards, get the SXM figures, an overestimate). Any
    other GPU or accelerator: calibrated on the device, with a warning; should that
    fail, the A100's figures, with a warning."""
    device = torch.device(device)
    if device.type == "cpu":
        return calibrated_profile(device, refresh=refresh)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {device} is not available here; for a plan made elsewhere, name its "
            f"profile with get_profile (known: {', '.join(KNOWN_PROFILES)})"
        )
    model = device_model(device)
    if device.type == "cuda":
        for family in ("H200", "H100", "A100"):
            if family in model.upper():
                if "PCIE" in model.upper():
                    log.warning("remat: %s: using the %s SXM figures (faster than a PCIe card)", model, family)
                return SPEC_PROFILES[family.lower()]
    log.warning(
        "remat: no spec-sheet profile for %s (%s; known: %s); calibrating it with a micro-benchmark",
        device, model, ", ".join(SPEC_PROFILES),
    )
    try:
        return calibrated_profile(device, refresh=refresh)
    except Exception as e:  # an exotic device must not break planning
        log.warning("remat: calibrating %s failed (%s); using the A100 figures instead", device, e)
        return A100


def available_memory(device: torch.device | str) -> int:
    """Bytes still free on ``device``: what the driver reports free on CUDA (PyTorch's
    cached blocks count as used), the kernel's ``MemAvailable`` on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
    return int(fields["MemAvailable"].split()[0]) * 1024
