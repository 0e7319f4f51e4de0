"""A nearest upsampling's gradient as a scatter-add and as a window sum, measured.

    python -m benchmarks.upsample_gradient

``passes.upsample_gradients`` replaces the scatter-add that AOTAutograd's decomposition
leaves for a nearest upsampling's gradient (``index_put`` of the gradient into zeros at
the nearest source indices, accumulating) with ``aten.upsample_nearest2d_backward``.
This measures both sides on one CPU thread:

- kernels: each form compiled by Inductor on the U-Net's two upsampled gradients, in
  NCHW and channels-last (the layout of remat's CPU backward), medians of 30 calls, and
  whether the two give the same tensor;
- the step: the budget sweep's U-Net under its lowest-memory plan, with the pass and
  with it turned off, each timed against PyTorch's ``activation_memory_budget=0.3``
  point step by step in turn (3 processes each), and its peak in a fresh process.

The report, with the command, goes to ``benchmarks/results/upsample_gradient.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.budget_sweep import LOWEST, MODELS
from benchmarks.measure import MIB, REPO_ROOT, Job, forced_jobs_payload, fresh_process, report_head, run_requested_jobs

SETTINGS = {"warmup": 2, "steps": 15, "optimizer": None, "threads": 1}
PAIRS = 3
CALLS = 30
# The U-Net's (batch=8, widths 32/64/128, 64x64 images) upsampled gradients.
GRADIENT_SHAPES = ((8, 64, 64, 64), (8, 128, 32, 32))


def _scatter_add(grad: torch.Tensor) -> torch.Tensor:
    """The gradient as the joint graph has it: accumulated into zeros at nearest indices."""
    n, c, h, w = grad.shape
    rows = (torch.arange(h, dtype=torch.float32) * 0.5).to(torch.int64)
    cols = (torch.arange(w, dtype=torch.float32) * 0.5).to(torch.int64)
    zeros = grad.new_zeros(n, c, h // 2, w // 2)
    return torch.ops.aten.index_put(zeros, [None, None, rows[:, None], cols], grad, True)


def _window_sum(grad: torch.Tensor) -> torch.Tensor:
    n, c, h, w = grad.shape
    return torch.ops.aten.upsample_nearest2d_backward(grad, [h, w], [n, c, h // 2, w // 2], None, None)


def _median_ms(fn: Callable[[torch.Tensor], torch.Tensor], grad: torch.Tensor) -> float:
    for _ in range(3):
        fn(grad)
    times = []
    for _ in range(CALLS):
        start = time.perf_counter()
        fn(grad)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _kernel_lines() -> list[str]:
    torch.set_num_threads(SETTINGS["threads"])
    lines = [
        "| gradient | layout | scatter-add ms | window sum ms | ratio | same tensor |",
        "|---|---|---:|---:|---:|---|",
    ]
    for shape in GRADIENT_SHAPES:
        for layout in (torch.contiguous_format, torch.channels_last):
            grad = torch.randn(shape).contiguous(memory_format=layout)
            torch.compiler.reset()
            scatter = torch.compile(_scatter_add, dynamic=False)
            window = torch.compile(_window_sum, dynamic=False)
            same = torch.equal(scatter(grad), window(grad))
            scatter_ms, window_ms = _median_ms(scatter, grad), _median_ms(window, grad)
            name = "NCHW" if layout is torch.contiguous_format else "channels-last"
            lines.append(
                f"| {shape} | {name} | {scatter_ms:.2f} | {window_ms:.2f} | {scatter_ms / window_ms:.1f}x | {'yes' if same else 'no'} |"
            )
    return lines


def _worker(payload: str) -> dict[str, Any]:
    request = json.loads(payload)
    if not request["rewrite"]:
        import remat.partition

        remat.partition.nearest_upsample_gradients = lambda graph, any_layout: 0
    return run_requested_jobs(request)


def _run(rewrite: bool, *jobs: Job) -> dict[str, Any]:
    payload = forced_jobs_payload({"rewrite": rewrite}, jobs)
    return fresh_process("benchmarks.upsample_gradient", payload, jobs[0].metric, f"rewrite={rewrite}")


def _step_lines() -> list[str]:
    unet = MODELS["unet"]
    lines = []
    for rewrite in (True, False):
        peak = _run(rewrite, Job(unet, "remat", "peak", dict(LOWEST), **SETTINGS))["peak_bytes"]
        pairs = [
            _run(
                rewrite,
                Job(unet, "compile-budget", "time", {"activation_memory_budget": 0.3}, **SETTINGS),
                Job(unet, "remat", "time", dict(LOWEST), **SETTINGS),
            )
            for _ in range(PAIRS)
        ]
        ratios = [pair["ratio"] for pair in pairs]
        remat_s = statistics.median(pair["second"]["step_s"] for pair in pairs)
        pytorch_s = statistics.median(pair["first"]["step_s"] for pair in pairs)
        lines.append(
            f"- U-Net lowest plan, pass {'on' if rewrite else 'off'}: peak {peak / MIB:.1f} MiB; step {remat_s:.3f} s "
            f"against PyTorch 0.3's {pytorch_s:.3f} s: {statistics.median(ratios):.3f}x "
            f"(median of {', '.join(f'{r:.3f}' for r in ratios)})"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", metavar="REQUEST", help="internal: one job or pair, pass on or off; one JSON line")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args.worker)), flush=True)
        return
    lines = [
        *report_head("A nearest upsampling's gradient: scatter-add or window sum (passes.upsample_gradients)", "benchmarks.upsample_gradient", SETTINGS["threads"]),
        f"kernels: each form compiled by Inductor, median of {CALLS} calls",
        "",
        *_kernel_lines(),
        "",
        "step: peak VmHWM - VmRSS across one step in a fresh process (benchmarks.measure); time: median of "
        f"{SETTINGS['steps']} steps, remat and PyTorch timed step by step in turn in one process, {PAIRS} processes per setting",
        "",
        *_step_lines(),
    ]
    report = "\n".join(lines) + "\n"
    print(report, flush=True)
    (REPO_ROOT / "benchmarks" / "results" / "upsample_gradient.md").write_text(report)


if __name__ == "__main__":
    main()
