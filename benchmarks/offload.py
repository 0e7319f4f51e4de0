"""Offload against recompute on one GPT-style model, measured on a GPU.

    python -m benchmarks.offload                 (or `make offload-bench`; needs CUDA)

In one run, each line a fresh process (``benchmarks.measure``; on CUDA one process
gives both the step time and the caching allocator's peak):

1. the host link: pinned copies of 256 MiB each way, median of five;
2. remat without a budget, and the same partition with every saved activation of at
   least ``offload_min_bytes`` offloaded (``offload=True``): the difference in step
   time is what the transfers cost that compute did not hide (exposed);
3. for each share s of the first line's peak: ``memory_budget`` = parameters and
   inputs + s x that peak, recompute only, then with ``offload="auto"`` (the solver
   chooses keep, recompute or offload per value).

The report, with the command, goes to ``benchmarks/results/offload_<device>.md`` and
every field the workers report to the JSON file beside it. Figures are medians of the
timed steps; compare them as ratios within the run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import statistics
import sys
import time
from typing import Any

import torch

from benchmarks.measure import (
    MIB, REPO_ROOT, Job, ModelSpec, machine, machine_summary, measure, resident_bytes, run_worker, spec_summary,
)

SHARES = (0.6, 0.45, 0.3)
EXPOSED_LIMIT = 0.05


def link_bandwidth(nbytes: int = 256 * MIB, repeats: int = 5) -> dict[str, float]:
    """Measured bytes/s of pinned host <-> device copies (CUDA only)."""
    device = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    result = {}
    for name, dst, src in (("device_to_host", host, device), ("host_to_device", device, host)):
        times = []
        for _ in range(repeats + 1):
            torch.cuda.synchronize()
            start = time.perf_counter()
            dst.copy_(src, non_blocking=True)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        result[name] = nbytes / statistics.median(times[1:])
    return result


def _plan_summary(report: dict[str, Any]) -> dict[str, Any]:
    plans = report.get("plans") or []
    return {
        "offloaded_mib": sum(p.get("offloaded_bytes", 0) for p in plans) / MIB,
        "recomputed": sum(p["recomputed"] for p in plans),
        "predicted_exposed_ms": sum((p.get("exposed_transfer_s") or 0.0) for p in plans) * 1e3,
        "fallback": [p["fallback_reason"] for p in plans if p.get("fallback_reason")],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--shares", default=",".join(map(str, SHARES)), help="budget shares of the no-budget peak")
    parser.add_argument("--inner-compiler", choices=["eager", "inductor"], default="eager")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--min-bytes", type=int, default=None, help="offload_min_bytes (default remat's, 1 MiB)")
    parser.add_argument("--out", default=None, help="report path (default benchmarks/results/offload_<device>.md)")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    spec = ModelSpec("tests.zoo:make_gpt", {
        "n_layers": args.layers, "d_model": args.d_model, "n_heads": max(1, args.d_model // 64),
        "seq_len": args.seq_len, "vocab": args.vocab, "batch": args.batch, "dropout": 0.0,
    })
    base: dict[str, Any] = {"inner_compiler": args.inner_compiler}
    settings = {"warmup": 2, "steps": args.steps, "grad_check": False}
    resident = resident_bytes(spec)
    info = machine()
    lines = [
        "# Offload against recompute, measured\n",
        f"command: `{shlex.join([sys.executable, '-m', 'benchmarks.offload', *sys.argv[1:]])}`",
        f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"machine: {machine_summary(info, None)}; torch {torch.__version__}",
        f"model: {spec_summary(spec)}; parameters and inputs {resident / MIB:.1f} MiB",
        f"step: forward, loss, backward; {settings['warmup']} warm-up steps, median of {args.steps} timed; "
        f"inner compiler {args.inner_compiler}; peak from the caching allocator"
        + ("" if cuda else " (no CUDA here: a CPU run, where a host copy frees no memory)"),
    ]
    link = link_bandwidth() if cuda else {}
    if link:
        lines.append(
            f"host link (pinned, 256 MiB): device->host {link['device_to_host'] / 1e9:.1f} GB/s, "
            f"host->device {link['host_to_device'] / 1e9:.1f} GB/s"
        )
    print("\n".join(lines), flush=True)
    rows: list[dict[str, Any]] = []

    def run(name: str, options: dict[str, Any], budget: float | None = None) -> dict[str, Any]:
        if cuda:
            report = run_worker(Job(spec, "remat", "time", {**base, **options}, **settings))
        else:  # the CPU's peak needs a process of its own (DESIGN.md "Measuring")
            report = measure(spec, "remat", {**base, **options}, **settings)
        row = {"name": name, "options": options, "budget_bytes": budget, **_plan_summary(report), "report": report}
        rows.append(row)
        peak = report.get("peak_bytes")
        print(
            f"{name}: step {report['step_s'] * 1e3:.1f} ms, peak "
            + (f"{peak / MIB:.1f} MiB" if peak is not None else "n/a")
            + f", offloaded {row['offloaded_mib']:.1f} MiB, recomputed {row['recomputed']}",
            flush=True,
        )
        return row

    plain = run("remat, no budget", {})
    sized = {} if args.min_bytes is None else {"offload_min_bytes": args.min_bytes}
    offloaded = run("remat, no budget, offload=True", {"offload": True, **sized})
    reference_peak = plain["report"].get("peak_bytes")
    shares = [float(s) for s in args.shares.split(",") if s]
    for share in shares if reference_peak is not None else []:
        budget = resident + share * reference_peak
        options = {"memory_budget": int(budget), "on_infeasible": "closest"}
        run(f"budget {share:.2f}: recompute only", options, budget)
        run(f"budget {share:.2f}: offload='auto'", {**options, "offload": "auto", **sized}, budget)

    table = ["", "| configuration | budget above params (MiB) | peak (MiB) | peak / budget | step (ms) | step / recompute-only | offloaded (MiB) | recomputed ops | predicted exposed (ms) |", "|---|---|---|---|---|---|---|---|---|"]
    verdicts = []
    for i, row in enumerate(rows):
        report = row["report"]
        peak = report.get("peak_bytes")
        budget = row["budget_bytes"]
        above = budget - resident if budget is not None else None
        ratio = f"{peak / above:.3f}" if peak is not None and above else ""
        versus = ""
        if "offload='auto'" in row["name"]:
            recompute = rows[i - 1]["report"]
            versus = f"{report['step_s'] / recompute['step_s']:.3f}"
            if row["offloaded_mib"] > 0 and peak is not None:
                verdicts.append(
                    f"- {row['name']}: offload chosen ({row['offloaded_mib']:.0f} MiB); step "
                    f"{report['step_s'] * 1e3:.1f} ms vs {recompute['step_s'] * 1e3:.1f} ms recompute-only "
                    f"({'faster' if report['step_s'] < recompute['step_s'] else 'NOT faster'}); peak "
                    f"{peak / MIB:.1f} MiB vs {recompute['peak_bytes'] / MIB:.1f} MiB, budget {above / MIB:.1f} MiB "
                    f"({'within' if peak <= above * 1.05 else 'OVER'} 1.05x)"
                )
        table.append(
            f"| {row['name']} | {'' if above is None else f'{above / MIB:.1f}'} | "
            f"{'' if peak is None else f'{peak / MIB:.1f}'} | {ratio} | {report['step_s'] * 1e3:.1f} | {versus} | "
            f"{row['offloaded_mib']:.1f} | {row['recomputed']} | {row['predicted_exposed_ms']:.2f} |"
        )
    exposed = offloaded["report"]["step_s"] - plain["report"]["step_s"]
    summary = [
        "",
        f"Exposed transfer time, same partition with and without offload=True: {exposed * 1e3:.1f} ms of a "
        f"{plain['report']['step_s'] * 1e3:.1f} ms step ({exposed / plain['report']['step_s']:.1%}; "
        f"{offloaded['offloaded_mib']:.0f} MiB each way, predicted {offloaded['predicted_exposed_ms']:.2f} ms)",
        *verdicts,
    ]
    text = "\n".join([*lines, *table, *summary]) + "\n"
    print("\n".join(table + summary))
    device = "cuda" if cuda else "cpu"
    out = REPO_ROOT / (args.out or f"benchmarks/results/offload_{device}.md")
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"machine": info, "link": link, "rows": rows}, indent=1, default=str))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
