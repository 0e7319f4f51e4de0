"""Inductor's buffer pool kept or turned off for the same remat plan, measured.

    python -m benchmarks.buffer_pool

remat keeps Inductor's pool of freed buffers only where the simulator finds that its
holds fit the budget (``partition.RematPartitioner._buffer_pool``). This measures the
two sides of that rule with the decision forced each way in the worker:

- peak: the GPT's lowest-memory plan (the budget sweep's model), with and without the
  pool, each in a fresh process;
- time: the U-Net plan at PyTorch 0.7's peak (the budget from the last
  ``benchmarks/results/budget_sweep_unet.json``), timed against PyTorch's 0.7 point
  step by step in turn, with and without the pool, in three process pairs each.

The report, with the command, goes to ``benchmarks/results/buffer_pool.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from typing import Any

from benchmarks.budget_sweep import LOWEST, MODELS
from benchmarks.measure import MIB, REPO_ROOT, Job, forced_jobs_payload, fresh_process, report_head, run_requested_jobs

SETTINGS = {"warmup": 2, "steps": 15, "optimizer": None, "threads": 1}
PAIRS = 3


def _force(pool: bool) -> None:
    """In this worker, every remat plan compiles with the pool ``pool``."""
    from remat.partition import RematPartitioner

    RematPartitioner._buffer_pool = lambda self, fw, bw, n, fused_memory, budget: (pool, fused_memory)


def _worker(payload: str) -> dict[str, Any]:
    request = json.loads(payload)
    _force(request["pool"])
    return run_requested_jobs(request)


def _run(pool: bool, *jobs: Job) -> dict[str, Any]:
    payload = forced_jobs_payload({"pool": pool}, jobs)
    return fresh_process("benchmarks.buffer_pool", payload, jobs[0].metric, f"pool={pool}")


def _unet_budget() -> int:
    rows = json.loads((REPO_ROOT / "benchmarks" / "results" / "budget_sweep_unet.json").read_text())["rows"]
    (row,) = [r for r in rows if r["name"] == "remat at pytorch 0.7's peak"]
    return row["options"]["memory_budget"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", metavar="REQUEST", help="internal: one forced-pool job or pair; one JSON line")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args.worker)), flush=True)
        return
    lines = [
        *report_head("Inductor's buffer pool kept or turned off for the same remat plan", "benchmarks.buffer_pool", SETTINGS["threads"]),
        "peak: VmHWM - VmRSS across one step in a fresh process (benchmarks.measure); time: median of "
        f"{SETTINGS['steps']} steps, each pair timed step by step in turn in one process, {PAIRS} processes per pool setting",
        "",
    ]
    gpt = MODELS["gpt"]
    for pool in (True, False):
        result = _run(pool, Job(gpt, "remat", "peak", dict(LOWEST), **SETTINGS))
        lines.append(f"- GPT lowest plan, pool {'kept' if pool else 'off'}: peak {result['peak_bytes'] / MIB:.2f} MiB")
    unet = MODELS["unet"]
    options = {"memory_budget": _unet_budget(), "on_infeasible": "closest"}
    for pool in (True, False):
        ratios = [
            _run(
                pool,
                Job(unet, "compile-budget", "time", {"activation_memory_budget": 0.7}, **SETTINGS),
                Job(unet, "remat", "time", options, **SETTINGS),
            )["ratio"]
            for _ in range(PAIRS)
        ]
        lines.append(
            f"- U-Net at PyTorch 0.7's peak, pool {'kept' if pool else 'off'}: remat / PyTorch 0.7 time "
            f"{statistics.median(ratios):.3f}x (median of {', '.join(f'{r:.3f}' for r in ratios)})"
        )
    report = "\n".join(lines) + "\n"
    print(report, flush=True)
    (REPO_ROOT / "benchmarks" / "results" / "buffer_pool.md").write_text(report)


if __name__ == "__main__":
    main()
