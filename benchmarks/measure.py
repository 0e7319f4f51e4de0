"""Measure one training step of a zoo model under a strategy, one fresh process per number.

Why fresh processes (DESIGN.md, "Measuring"): on the CPU the only honest peak is the
kernel's resident high-water mark, and it depends on everything the process did before.
So the peak is read in a process started with ``MALLOC_MMAP_THRESHOLD_=131072`` (every
tensor above 128 KiB gets its own mapping and is returned when freed, so the heap keeps
no history), after warm-up (where compilation happens), as ``VmHWM - VmRSS`` across one
step. That threshold makes steps slower (page faults on fresh mappings), so the step time
is measured in a second fresh process without it. On CUDA the caching allocator's own
counters are exact and are used instead.

    measure(ModelSpec("tests.zoo:make_gpt", {...}), "remat", {"inner_compiler": "eager"})

runs both workers (``python -m benchmarks.measure --worker JOB``, each printing one JSON
line) and merges what they report. ``python -m benchmarks.measure STRATEGY`` does the
same from a shell.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import dataclasses
import gc
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
MMAP_THRESHOLD = "131072"
Metric = Literal["peak", "time"]


def _eager(model: torch.nn.Module, options: Mapping[str, Any]) -> Callable[..., Any]:
    return model


def _compile_default(model: torch.nn.Module, options: Mapping[str, Any]) -> Callable[..., Any]:
    return torch.compile(model)


def _remat(model: torch.nn.Module, options: Mapping[str, Any]) -> Callable[..., Any]:
    return torch.compile(model, backend="remat", options=dict(options))


def _remat_eager(model: torch.nn.Module, options: Mapping[str, Any]) -> Callable[..., Any]:
    return torch.compile(model, backend="remat", options={**options, "inner_compiler": "eager"})


# Strategy name -> how to wrap the model. Only the remat strategies take options; a
# later issue adds torch.utils.checkpoint and activation_memory_budget sweeps here.
STRATEGIES: dict[str, Callable[[torch.nn.Module, Mapping[str, Any]], Callable[..., Any]]] = {
    "eager": _eager,
    "compile-default": _compile_default,
    "remat": _remat,
    "remat-eager": _remat_eager,
}
TAKES_OPTIONS = frozenset({"remat", "remat-eager"})


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
        if self.options and self.strategy not in TAKES_OPTIONS:
            raise ValueError(
                f"strategy {self.strategy!r} takes no options; got {self.options!r} "
                f"(only {sorted(TAKES_OPTIONS)} do)"
            )
        if self.strategy in TAKES_OPTIONS:
            from remat import RematOptions

            RematOptions.from_mapping(self.options)  # fail here, not in a worker
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


class MeasurementError(RuntimeError):
    """A worker process failed; the message carries the end of its stderr."""


# --- parent side -------------------------------------------------------------------


def run_worker(job: Job, timeout_s: float = 900.0) -> dict[str, Any]:
    """Run ``job`` in a fresh interpreter and return the JSON line it prints."""
    env = dict(os.environ)
    if job.metric == "peak":
        env["MALLOC_MMAP_THRESHOLD_"] = MMAP_THRESHOLD
    else:
        env.pop("MALLOC_MMAP_THRESHOLD_", None)
    command = [sys.executable, "-m", "benchmarks.measure", "--worker", job.to_json()]
    result = subprocess.run(
        command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout_s
    )
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        raise MeasurementError(
            f"{job.metric} worker for strategy {job.strategy!r} exited with {result.returncode}:\n"
            f"{result.stderr[-4000:]}"
        )
    return json.loads(lines[-1])


def measure(
    spec: ModelSpec,
    strategy: str,
    options: Mapping[str, Any] | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """Peak memory and step time of ``strategy`` on ``spec``, from two fresh processes.

    ``settings`` are the other ``Job`` fields (warmup, steps, optimizer, ...).
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
        }
        for plan in remat.plans(model)
    ]


def run_job(job: Job) -> dict[str, Any]:
    """Build the model, wrap it, warm up, measure; the worker's whole life."""
    if job.fallback_random:
        from torch._inductor import config as inductor_config

        inductor_config.fallback_random = True
    if job.threads is not None:
        torch.set_num_threads(job.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    case = job.spec.build(device)
    model, inputs = case.model, case.inputs

    def forward_backward(run: Callable[..., Any]) -> float:
        loss = case.loss_fn(run(*inputs))
        loss.backward()
        return loss.item()

    result: dict[str, Any] = {
        "strategy": job.strategy,
        "metric": job.metric,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    reference = None
    if job.metric == "time" and job.grad_check and job.strategy != "eager":
        reference = copy.deepcopy(model)
        torch.manual_seed(1)
        forward_backward(reference)

    run = STRATEGIES[job.strategy](model, job.options)
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
    if device.type == "cuda":
        torch.cuda.synchronize()
    result["warmup_s"] = time.perf_counter() - start

    if job.metric == "peak":
        result["peak_bytes"], result["baseline_bytes"] = _peak_bytes(step, device)
    else:
        times = []
        for _ in range(job.steps):
            start = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        result["step_s"] = statistics.median(times)
        result["step_times_s"] = times
    if job.strategy in TAKES_OPTIONS:
        result["plans"] = _plans(model)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("strategy", nargs="?", choices=sorted(STRATEGIES))
    parser.add_argument("--worker", metavar="JOB", help="internal: run one Job (JSON) and print one JSON line")
    parser.add_argument("--spec", default='{"factory": "gpt"}', help="ModelSpec as JSON")
    parser.add_argument("--options", default="{}", help="remat options as JSON")
    parser.add_argument("--optimizer", choices=["sgd", "adam"])
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(run_job(Job.from_json(args.worker))), flush=True)
    elif args.strategy:
        spec = ModelSpec(**json.loads(args.spec))
        print(json.dumps(measure(spec, args.strategy, json.loads(args.options), optimizer=args.optimizer)))
    else:
        parser.error("give a strategy (or --worker JOB)")


if __name__ == "__main__":
    main()
