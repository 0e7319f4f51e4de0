"""Measure one training step of a zoo model under a strategy, one fresh process per number.

Why fresh processes (DESIGN.md, "Measuring"): on the CPU the only honest peak is the
kernel's resident high-water mark, and it depends on everything the process did before.
So the peak is read in a process started with ``MALLOC_MMAP_THRESHOLD_=131072`` (every
tensor above 128 KiB gets its own mapping and is returned when freed, so the heap keeps
no history), after warm-up (where compilation happens), as ``VmHWM - VmRSS`` across one
step. That threshold makes steps slower (page faults on fresh mappings), so the step time
is measured in a second fresh process without it. On CUDA the caching allocator's own
counters are exact and are used instead.

remat prices page faults by the process's allocator setting (``devices._with_process_settings``),
so a peak worker that kept the variable would plan for a slower allocator than the time
worker and could measure another plan (it did, on the U-Net at a budget where two plans'
estimates lie 0.1% apart). glibc reads the variable once, at start: a peak worker drops
it from ``os.environ`` before anything plans (``_prepare``), and both workers plan alike.

The unit every strategy wraps (and torch.compile compiles) is the model together with its
loss, ``WithLoss(case.model, case.loss_fn)``: the whole differentiable step, the
cross-entropy over a large vocabulary included, is one graph.

    measure(ModelSpec("tests.zoo:make_gpt", {...}), "remat", {"inner_compiler": "eager"})
    measure(spec, "compile-budget", {"activation_memory_budget": 0.5})

runs both workers (``python -m benchmarks.measure --worker JOB``, each printing one JSON
line) and merges what they report. ``python -m benchmarks.measure STRATEGY`` does the
same from a shell.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import dataclasses
import datetime
import gc
import importlib
import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from numbers import Real
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.utils.checkpoint

if TYPE_CHECKING:
    from tests.zoo import ZooCase

REPO_ROOT = Path(__file__).resolve().parent.parent
MMAP_THRESHOLD = "131072"
Metric = Literal["peak", "time"]
BUDGET_OPTION = "activation_memory_budget"  # the one option of strategy "compile-budget"


class WithLoss(torch.nn.Module):
    """The compiled unit: ``forward(*inputs)`` is ``loss_fn(model(*inputs))``, a scalar.

    ``model`` is registered as a submodule, so the parameters are the model's own
    objects: optimizers, gradient checks and ``remat.plans(model)`` (which looks plans
    up by parameter) work on ``model`` itself.
    """

    def __init__(self, model: torch.nn.Module, loss_fn: Callable[[Any], torch.Tensor]) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, *inputs: Any) -> torch.Tensor:
        return self.loss_fn(self.model(*inputs))


def checkpoint_blocks(model: torch.nn.Module, blocks: Sequence[str]) -> None:
    """Run each named submodule of ``model`` under ``torch.utils.checkpoint.checkpoint``
    (non-reentrant): its activations are dropped after the forward and recomputed in the
    backward. Patches each block instance's ``forward``; the classes are untouched.

    The random state is restored for the recomputation (``preserve_rng_state``), so
    dropout masks and gradients equal eager's. BatchNorm in training mode updates its
    running statistics again when recomputed, as with any use of ``checkpoint``.
    """
    if not blocks:
        raise ValueError(
            f"checkpoint needs the model's blocks; this {type(model).__name__} lists none "
            "(ZooCase.blocks is empty)"
        )
    modules = []
    for name in blocks:
        try:
            modules.append(model.get_submodule(name))
        except AttributeError as error:
            raise ValueError(f"block {name!r} is not a submodule of {type(model).__name__}: {error}") from None
    for module in modules:
        forward = module.forward

        def checkpointed(*args: Any, _forward: Callable[..., Any] = forward, **kwargs: Any) -> Any:
            return torch.utils.checkpoint.checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        module.forward = checkpointed


def _eager(step: WithLoss, case: ZooCase, options: Mapping[str, Any]) -> Callable[..., torch.Tensor]:
    return step


def _checkpoint(step: WithLoss, case: ZooCase, options: Mapping[str, Any]) -> Callable[..., torch.Tensor]:
    checkpoint_blocks(step.model, case.blocks)
    return step


def _compile_default(step: WithLoss, case: ZooCase, options: Mapping[str, Any]) -> Callable[..., torch.Tensor]:
    return torch.compile(step)


def _compile_budget(step: WithLoss, case: ZooCase, options: Mapping[str, Any]) -> Callable[..., torch.Tensor]:
    compiled = torch.compile(step)
    budget = float(options[BUDGET_OPTION])

    def run(*inputs: Any) -> torch.Tensor:
        # The partitioner reads the budget while compiling (on the first call); setting
        # it per call keeps it out of the process-wide config.
        with torch._functorch.config.patch(activation_memory_budget=budget):
            return compiled(*inputs)

    return run


def _remat(step: WithLoss, case: ZooCase, options: Mapping[str, Any]) -> Callable[..., torch.Tensor]:
    return torch.compile(step, backend="remat", options=dict(options))


def _remat_eager(step: WithLoss, case: ZooCase, options: Mapping[str, Any]) -> Callable[..., torch.Tensor]:
    return torch.compile(step, backend="remat", options={**options, "inner_compiler": "eager"})


def _check_remat_options(options: Mapping[str, Any]) -> None:
    from remat import RematOptions

    RematOptions.from_mapping(options)


def _check_budget_options(options: Mapping[str, Any]) -> None:
    unknown = sorted(set(options) - {BUDGET_OPTION})
    if unknown:
        raise ValueError(
            f"strategy 'compile-budget': unknown option(s) {unknown}; the only option is {BUDGET_OPTION!r}"
        )
    if BUDGET_OPTION not in options:
        raise ValueError(
            f"strategy 'compile-budget' needs the option {BUDGET_OPTION!r} (a number, 0.0 <= x <= 1.0); "
            f"got {dict(options)!r}"
        )
    budget = options[BUDGET_OPTION]
    if isinstance(budget, bool) or not isinstance(budget, Real) or math.isnan(budget) or not 0.0 <= budget <= 1.0:
        raise ValueError(
            f"option {BUDGET_OPTION!r} of strategy 'compile-budget' must be a number with "
            f"0.0 <= x <= 1.0; got {budget!r}"
        )


Strategy = Callable[[WithLoss, "ZooCase", Mapping[str, Any]], Callable[..., torch.Tensor]]
# Strategy name -> how to wrap the step (model and loss) for training. Each gets the
# WithLoss module, the case (for its blocks) and its options.
STRATEGIES: dict[str, Strategy] = {
    "eager": _eager,
    "checkpoint": _checkpoint,
    "compile-default": _compile_default,
    "compile-budget": _compile_budget,
    "remat": _remat,
    "remat-eager": _remat_eager,
}
# Strategies that take options -> the check run on them before any work (a ValueError
# naming the option, the value and what is allowed). The others take none.
OPTION_CHECKS: dict[str, Callable[[Mapping[str, Any]], None]] = {
    "compile-budget": _check_budget_options,
    "remat": _check_remat_options,
    "remat-eager": _check_remat_options,
}
TAKES_OPTIONS = frozenset(OPTION_CHECKS)
REMAT_STRATEGIES = frozenset({"remat", "remat-eager"})  # these report remat's plans
# How tables name a strategy; options are appended by label().
LABELS = {
    "eager": "eager",
    "checkpoint": "eager + torch.utils.checkpoint per block",
    "compile-default": "torch.compile (Inductor, default partitioner)",
    "compile-budget": "torch.compile (Inductor), activation_memory_budget",
    "remat": "torch.compile(backend='remat') (Inductor)",
    "remat-eager": "torch.compile(backend='remat', inner_compiler='eager')",
}


def label(strategy: str, options: Mapping[str, Any] | None = None) -> str:
    """A strategy's name in tables, with its options: ``label("compile-budget",
    {"activation_memory_budget": 0.5})`` is "torch.compile (Inductor), activation_memory_budget=0.5"."""
    options = dict(options or {})
    if strategy == "compile-budget" and BUDGET_OPTION in options:
        return f"{LABELS[strategy]}={options.pop(BUDGET_OPTION)}" + "".join(f", {k}={v!r}" for k, v in options.items())
    text = LABELS.get(strategy, strategy)
    return text + (" " + json.dumps(options, sort_keys=True) if options else "")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """How a worker builds the model: ``factory`` (a name in ``tests.zoo.ZOO``, or
    "module:function" returning a ``ZooCase``) called with ``kwargs`` and ``device``.
    A spec, not a model, crosses the process boundary, so every worker builds the same
    model from the same seed."""

    factory: str
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)

    def build(self, device: torch.device) -> Any:
        module, _, name = self.factory.rpartition(":")
        if module:
            make = getattr(importlib.import_module(module), name)
        else:
            from tests.zoo import ZOO

            if name not in ZOO:
                raise ValueError(f"unknown zoo model {name!r}; the zoo has {sorted(ZOO)}")
            make = ZOO[name]
        return make(**self.kwargs, device=device)


@dataclasses.dataclass(frozen=True)
class Job:
    """Everything one worker process needs; it travels as JSON on the command line.

    strategy: a name in ``STRATEGIES``.
    options: the strategy's options, checked here by ``OPTION_CHECKS`` (remat's options
        for the remat strategies, ``{"activation_memory_budget": x}`` with
        0.0 <= x <= 1.0 for "compile-budget"); the other strategies take none.
    warmup: steps run before measuring (the first compiles).
    steps: timed steps (the median is reported); the peak is always one step.
    optimizer: None (forward, loss, backward only), "sgd" or "adam".
    fallback_random: Inductor draws random numbers as eager does, so dropout masks
        and the gradient check match eager (costs some speed).
    threads: torch.set_num_threads in the worker; None keeps torch's default. On a
        shared machine one thread avoids OpenMP oversubscription, which otherwise
        dominates the step time.
    grad_check: in the time worker, compare the first step's gradients with an eager
        copy of the model (same seed); skipped in the peak worker, where the copy would
        sit in memory.
    """

    spec: ModelSpec
    strategy: str
    metric: Metric
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    warmup: int = 2
    steps: int = 5
    optimizer: Literal["sgd", "adam"] | None = None
    fallback_random: bool = False
    threads: int | None = None
    grad_check: bool = True

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; allowed: {sorted(STRATEGIES)}")
        check = OPTION_CHECKS.get(self.strategy)
        if check is not None:
            check(self.options)  # fail here, not in a worker
        elif self.options:
            raise ValueError(
                f"strategy {self.strategy!r} takes no options; got {self.options!r} "
                f"(only {sorted(TAKES_OPTIONS)} do)"
            )
        if self.metric not in ("peak", "time"):
            raise ValueError(f"metric must be 'peak' or 'time'; got {self.metric!r}")
        if self.optimizer not in (None, "sgd", "adam"):
            raise ValueError(f"optimizer must be None, 'sgd' or 'adam'; got {self.optimizer!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be None or >= 1; got {self.threads!r}")
        if self.warmup < 1 or self.steps < 1:
            raise ValueError(
                f"warmup and steps must be >= 1 (compilation must happen before measuring); "
                f"got warmup={self.warmup}, steps={self.steps}"
            )

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Job:
        data = json.loads(text)
        data["spec"] = ModelSpec(**data["spec"])
        return cls(**data)


def resident_bytes(spec: ModelSpec) -> int:
    """Parameters, buffers and inputs: memory that exists before a step, which remat's
    ``memory_budget`` counts and the measured peak (above the memory in use before the
    step) does not."""
    case = spec.build(torch.device("cpu"))
    tensors = [*case.model.parameters(), *case.model.buffers(), *case.inputs]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


class MeasurementError(RuntimeError):
    """A worker process failed; the message carries the end of its stderr."""


# --- parent side -------------------------------------------------------------------


def run_worker(job: Job, timeout_s: float = 900.0) -> dict[str, Any]:
    """Run ``job`` in a fresh interpreter and return the JSON line it prints."""
    return fresh_process(
        "benchmarks.measure", job.to_json(), job.metric, f"strategy {job.strategy!r}", timeout_s
    )


def time_pair(first: Job, second: Job, timeout_s: float = 1800.0) -> dict[str, Any]:
    """``run_pair`` in a fresh interpreter: both jobs' time reports and their ratio."""
    payload = json.dumps([dataclasses.asdict(first), dataclasses.asdict(second)])
    return fresh_process(
        "benchmarks.measure", payload, "time", f"strategies {first.strategy!r} and {second.strategy!r}", timeout_s,
        flag="--pair-worker",
    )


def fresh_process(
    module: str, payload: str, metric: Metric, what: str, timeout_s: float = 900.0, flag: str = "--worker"
) -> dict[str, Any]:
    """Run ``python -m module <flag> payload`` in a fresh interpreter, with the allocator
    setting ``metric`` needs (DESIGN.md "Measuring"), and return the JSON line it prints.
    ``what`` names the worker in the error if it fails."""
    env = dict(os.environ)
    if metric == "peak":
        env["MALLOC_MMAP_THRESHOLD_"] = MMAP_THRESHOLD
    else:
        env.pop("MALLOC_MMAP_THRESHOLD_", None)
    command = [sys.executable, "-m", module, flag, payload]
    result = subprocess.run(
        command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout_s
    )
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        raise MeasurementError(
            f"{metric} worker for {what} exited with {result.returncode}:\n{result.stderr[-4000:]}"
        )
    return json.loads(lines[-1])


def measure(
    spec: ModelSpec,
    strategy: str,
    options: Mapping[str, Any] | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """Peak memory and step time of ``strategy`` on ``spec``, from two fresh processes.

    ``settings`` are the other ``Job`` fields (warmup, steps, optimizer, ...). The time
    worker's fields come at the top level with the peak worker's peak_bytes and
    baseline_bytes; the peak worker's whole report is under "peak_worker".
    """
    jobs = {
        metric: Job(spec, strategy, metric, dict(options or {}), **settings)
        for metric in ("peak", "time")
    }
    peak = run_worker(jobs["peak"])
    timing = run_worker(jobs["time"])
    return {
        "strategy": strategy,
        "options": dict(options or {}),
        **{k: v for k, v in timing.items() if k != "metric"},
        "peak_bytes": peak["peak_bytes"],
        "baseline_bytes": peak["baseline_bytes"],
        "peak_worker": {k: v for k, v in peak.items() if k != "metric"},
    }


def machine() -> dict[str, Any]:
    """What the numbers were measured on, to print beside them."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
    }


def machine_summary(info: Mapping[str, Any], threads: int | None) -> str:
    """One line for ``machine()``'s dict and the torch threads each worker used."""
    gpu = f", GPU {info['gpu']}" if info["gpu"] else ""
    per_worker = f"{threads} torch thread(s)" if threads is not None else "torch's default threads"
    return (
        f"{info['cpu']} ({info['cpu_count']} CPUs{gpu}), torch {info['torch']}, "
        f"Python {info['python']}, {per_worker} per worker"
    )


def report_head(title: str, module: str, threads: int | None, arguments: Sequence[str] = ()) -> list[str]:
    """A report's first lines: its title, the command that writes it (``python -m
    module arguments``), the date and the machine."""
    command = shlex.join([Path(sys.executable).name, "-m", module, *arguments])
    return [
        f"# {title}",
        "",
        f"command: `{command}`",
        f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"machine: {machine_summary(machine(), threads)}",
    ]


def spec_summary(spec: ModelSpec) -> str:
    """``factory(k=v, ...)``, as a table's header names the model."""
    return f"{spec.factory}({', '.join(f'{k}={v}' for k, v in spec.kwargs.items())})"


MIB = 2**20


def error_line(error: str, width: int = 160) -> str:
    """The line of a worker's error that says what went wrong (the exception's), for a table cell."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    exceptions = [line for line in lines if re.match(r"^[\w.]*(Error|Exception|Failed|Interrupt)(:|$)", line)]
    line = (exceptions or lines or ["(no message)"])[-1]
    if len(line) > width:
        line = line[: width - 3] + "..."
    return line.replace("|", "\\|")


def table(results: Sequence[Mapping[str, Any]]) -> str:
    """A markdown table of ``measure()`` results, in the order given: peak, median step
    time, both as ratios to eager's, and the largest gradient error against eager.

    A failed strategy is a mapping with "strategy", "options" and "error" (the message);
    its row says "failed" and why. Ratios are to the first successful eager result, and
    "n/a" without one.
    """
    eager = next((r for r in results if r["strategy"] == "eager" and "error" not in r), None)
    rows = [
        "| strategy | peak MiB | median step s | peak / eager | time / eager | max grad err vs eager |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        name = label(r["strategy"], r.get("options"))
        if "error" in r:
            rows.append(f"| {name} | failed: {error_line(r['error'])} | | | | |")
            continue
        peak, step = r["peak_bytes"], r["step_s"]
        if r is eager:
            err = "reference"
        elif "grad_max_abs_err" in r:
            err = f"{r['grad_max_abs_err']:.1e} (rel {r['grad_max_rel_err']:.1e})"
        else:
            err = "not checked"
        peak_ratio = f"{peak / eager['peak_bytes']:.2f}" if eager else "n/a"
        time_ratio = f"{step / eager['step_s']:.2f}" if eager else "n/a"
        rows.append(f"| {name} | {peak / MIB:.1f} | {step:.3f} | {peak_ratio} | {time_ratio} | {err} |")
    return "\n".join(rows)


# --- worker side -------------------------------------------------------------------


def _status_bytes(field: str) -> int:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise MeasurementError(f"/proc/self/status has no {field}")


def _peak_bytes(step: Callable[[], float], device: torch.device) -> tuple[int, int]:
    """(peak above baseline, baseline) of one step."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - baseline, baseline
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    baseline = _status_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
    step()
    return _status_bytes("VmHWM") - baseline, baseline


def _grad_errors(model: torch.nn.Module, reference: torch.nn.Module) -> dict[str, float]:
    """Largest absolute gradient difference, and that over the largest reference gradient."""
    err, scale = 0.0, 0.0
    for p, r in zip(model.parameters(), reference.parameters(), strict=True):
        if r.grad is None:
            continue
        err = max(err, (p.grad - r.grad).abs().max().item())
        scale = max(scale, r.grad.abs().max().item())
    return {"grad_max_abs_err": err, "grad_max_rel_err": err / scale if scale else 0.0}


def _plans(model: torch.nn.Module) -> list[dict[str, Any]]:
    import remat

    return [
        {
            "graph": plan.graph,
            "partitioner": plan.partitioner,
            "saved_bytes": plan.saved_bytes,
            "kept": len(plan.kept),
            "recomputed": len(plan.recomputed),
            "fallback_reason": plan.fallback_reason,
            "predicted_peak_bytes": plan.memory.peak_bytes if plan.memory else None,
            "predicted_resident_bytes": plan.memory.resident_bytes if plan.memory else None,
            "budget_bytes": plan.budget_bytes,
            "predicted_peak_at": plan.memory.peak_at if plan.memory else None,
            "predicted_fused_peak_bytes": plan.fused_memory.peak_bytes if plan.fused_memory else None,
            "predicted_fused_peak_at": plan.fused_memory.peak_at if plan.fused_memory else None,
            "offloaded": len(plan.offloaded),
            "offloaded_bytes": plan.offloaded_bytes,
            "exposed_transfer_s": plan.exposed_transfer_s,
            "solve_seconds": plan.solve_seconds,
        }
        for plan in remat.plans(model)
    ]


@dataclasses.dataclass
class _Prepared:
    """A worker's model under its strategy, compiled and warmed up: ``step`` runs one
    training step; ``result`` holds what was found on the way."""

    job: Job
    model: torch.nn.Module
    step: Callable[[], float]
    device: torch.device
    result: dict[str, Any]


def _prepare(job: Job) -> _Prepared:
    """Build the model, wrap it, check its gradients against eager, warm up."""
    if job.metric == "peak":
        os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)  # glibc has read it; plan as a time worker does
    if job.fallback_random:
        from torch._inductor import config as inductor_config

        inductor_config.fallback_random = True
    if job.threads is not None:
        torch.set_num_threads(job.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    case = job.spec.build(device)
    model, inputs = case.model, case.inputs

    def forward_backward(run: Callable[..., torch.Tensor]) -> float:
        loss = run(*inputs)
        loss.backward()
        return loss.item()

    result: dict[str, Any] = {
        "strategy": job.strategy,
        "metric": job.metric,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    if job.strategy == "checkpoint":
        result["checkpointed_blocks"] = list(case.blocks)
    reference = None
    if job.metric == "time" and job.grad_check and job.strategy != "eager":
        reference = copy.deepcopy(model)
        torch.manual_seed(1)
        forward_backward(WithLoss(reference, case.loss_fn))

    run = STRATEGIES[job.strategy](WithLoss(model, case.loss_fn), case, job.options)
    optimizer = None
    if job.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    elif job.optimizer == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step() -> float:
        """One training step; gradients are freed at its end, so every measured step
        starts from the same state and the peak includes allocating the gradients."""
        loss = forward_backward(run)
        if optimizer is not None:
            optimizer.step()
        model.zero_grad(set_to_none=True)
        return loss

    start = time.perf_counter()
    if reference is not None:
        torch.manual_seed(1)
        forward_backward(run)  # compiles; compared before any optimizer step
        result.update(_grad_errors(model, reference))
        model.zero_grad(set_to_none=True)
        del reference
    for _ in range(job.warmup):
        result["loss"] = step()
    _synchronize(device)
    result["warmup_s"] = time.perf_counter() - start
    return _Prepared(job, model, step, device, result)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(prepared: _Prepared) -> float:
    start = time.perf_counter()
    prepared.step()
    _synchronize(prepared.device)
    return time.perf_counter() - start


def _finish(prepared: _Prepared, times: list[float]) -> dict[str, Any]:
    """The worker's report: what ``_prepare`` found, the times, and remat's plans."""
    job, result = prepared.job, prepared.result
    if times:
        result["step_s"] = statistics.median(times)
        result["step_times_s"] = times
    if job.strategy in REMAT_STRATEGIES:
        result["plans"] = _plans(prepared.model)
    return result


def run_job(job: Job) -> dict[str, Any]:
    """Build the model, wrap it, warm up, measure; the worker's whole life."""
    prepared = _prepare(job)
    times: list[float] = []
    if job.metric == "peak":
        prepared.result["peak_bytes"], prepared.result["baseline_bytes"] = _peak_bytes(prepared.step, prepared.device)
    else:
        times = [_timed(prepared) for _ in range(job.steps)]
        if prepared.device.type == "cuda":  # the caching allocator's counters need no fresh process
            prepared.result["peak_bytes"], prepared.result["baseline_bytes"] = _peak_bytes(prepared.step, prepared.device)
    return _finish(prepared, times)


def forced_jobs_payload(setting: Mapping[str, Any], jobs: Sequence[Job]) -> str:
    """The request a benchmark's forcing worker reads: ``setting`` (what the worker forces
    before it measures, e.g. a pass turned off) and one job or a pair."""
    return json.dumps({**setting, "jobs": [json.loads(job.to_json()) for job in jobs]})


def run_requested_jobs(request: Mapping[str, Any]) -> dict[str, Any]:
    """Measure the job of a ``forced_jobs_payload`` request, or time its pair."""
    jobs = [Job.from_json(json.dumps(job)) for job in request["jobs"]]
    return run_job(jobs[0]) if len(jobs) == 1 else run_pair(*jobs)


def run_pair(first: Job, second: Job) -> dict[str, Any]:
    """Time two strategies in one process, step by step in turn (first-second, then
    second-first), so that both see the same moments of a noisy machine: their ratio is
    what a comparison should quote. Each gets ``steps`` timed steps."""
    if first.metric != "time" or second.metric != "time" or first.steps != second.steps:
        raise ValueError("a pair is timed: both jobs need metric 'time' and the same number of steps")
    prepared = [_prepare(first), _prepare(second)]
    times: list[list[float]] = [[], []]
    for index in range(first.steps):
        for which in ((0, 1) if index % 2 == 0 else (1, 0)):
            times[which].append(_timed(prepared[which]))
    reports = [_finish(p, t) for p, t in zip(prepared, times)]
    return {"first": reports[0], "second": reports[1], "ratio": reports[1]["step_s"] / reports[0]["step_s"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("strategy", nargs="?", choices=sorted(STRATEGIES))
    parser.add_argument("--worker", metavar="JOB", help="internal: run one Job (JSON) and print one JSON line")
    parser.add_argument("--pair-worker", metavar="JOBS", help="internal: time two Jobs (a JSON list) in turn; one JSON line")
    parser.add_argument("--spec", default='{"factory": "gpt"}', help="ModelSpec as JSON")
    parser.add_argument(
        "--options", default="{}",
        help='strategy options as JSON: remat options, or {"activation_memory_budget": x} for compile-budget',
    )
    parser.add_argument("--optimizer", choices=["sgd", "adam"])
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(run_job(Job.from_json(args.worker))), flush=True)
    elif args.pair_worker:
        first, second = (Job.from_json(json.dumps(job)) for job in json.loads(args.pair_worker))
        print(json.dumps(run_pair(first, second)), flush=True)
    elif args.strategy:
        spec = ModelSpec(**json.loads(args.spec))
        print(json.dumps(measure(spec, args.strategy, json.loads(args.options), optimizer=args.optimizer)))
    else:
        parser.error("give a strategy (or --worker JOB)")


if __name__ == "__main__":
    main()
