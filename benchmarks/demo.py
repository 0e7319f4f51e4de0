"""Before and after: one GPT-style training step under eager, torch.compile and remat.

    python -m benchmarks.demo          (or `make demo`)

It prints its report as it goes and writes it whole to ``benchmarks/results/demo.md``.
The model does not fit its budget: eager's measured peak is first, and remat gets
``memory_budget`` = the parameters and inputs plus ``BUDGET_SHARE`` of that peak. Every
number comes from ``benchmarks.measure`` (fresh processes, DESIGN.md "Measuring"), so
the table is reproducible from the command line it prints.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from benchmarks.measure import (
    MIB, REPO_ROOT, Job, ModelSpec, measure, report_head, resident_bytes, run_worker, spec_summary, table,
)

# Sized so that a step takes about a second on one core of a shared CPU, the peak is
# a couple of hundred MiB, and the whole demo (Inductor compiles included) takes a few
# minutes. No dropout, so gradients can be compared with eager without fallback_random.
GPT = ModelSpec(
    "tests.zoo:make_gpt",
    {"n_layers": 4, "d_model": 256, "n_heads": 4, "seq_len": 256, "vocab": 8192, "batch": 4, "dropout": 0.0},
)
# The step's memory above the parameters that remat may use, as a share of eager's.
BUDGET_SHARE = 0.5


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads per worker (default 1: steady timings on a shared machine)",
    )
    parser.add_argument(
        "--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "demo.md",
        help="where the report is written (default: benchmarks/results/demo.md)",
    )
    args = parser.parse_args(argv)
    # SGD updates the parameters in place: the step's peak is that of the forward and
    # backward, which is what memory_budget bounds (Adam's update would add its own
    # temporaries after the backward, outside the compiled graph).
    settings = {"warmup": 2, "steps": 5, "optimizer": "sgd", "threads": args.threads}
    started = time.perf_counter()

    report: list[str] = []

    def say(text: str = "") -> None:
        """Print a line of the report now (a run takes minutes) and keep it for the file."""
        print(text, flush=True)
        report.append(text)

    title = "remat demo: one GPT-style training step, before and after"
    for line in report_head(title, "benchmarks.demo", args.threads, sys.argv[1:] if argv is None else argv):
        say(line)
    say(f"model: {spec_summary(GPT)}")
    say(
        f"step: forward, cross-entropy loss, backward, SGD step; {settings['warmup']} warm-up steps "
        "(compilation happens there) before measuring"
    )
    say(
        "peak: VmHWM - VmRSS across one step, in a fresh process with MALLOC_MMAP_THRESHOLD_=131072; "
        f"time: median of {settings['steps']} steps in a second fresh process without it"
    )
    say()

    results = {}
    for strategy in ("eager", "compile-default"):
        say(f"measuring {strategy} ...")
        results[strategy] = measure(GPT, strategy, **settings)
    resident = resident_bytes(GPT)
    allowed = BUDGET_SHARE * results["eager"]["peak_bytes"]
    budget = {"memory_budget": f"{(resident + allowed) / MIB:.1f}MiB"}
    say(
        f"measuring remat with {budget} (parameters and inputs {resident / MIB:.1f} MiB + "
        f"{BUDGET_SHARE} x eager's peak of {results['eager']['peak_bytes'] / MIB:.1f} MiB) ..."
    )
    results["remat"] = measure(GPT, "remat", budget, **settings)
    params = results["eager"]["parameters"]
    say()
    say(f"{params / 1e6:.2f} M parameters")
    say()
    say(table(list(results.values())))
    say()
    for plan in results["remat"]["plans"]:
        say(
            f"remat plan {plan['graph']} ({plan['partitioner']}): {plan['kept']} kept "
            f"({plan['saved_bytes'] / MIB:.1f} MiB of saved activations), {plan['recomputed']} recomputed"
            + (f"; fell back: {plan['fallback_reason']}" if plan["fallback_reason"] else "")
        )
    peak = results["remat"]["peak_bytes"]
    say(
        f"budget: {budget['memory_budget']} for the step, of which {allowed / MIB:.1f} MiB above the "
        f"parameters and inputs; remat's measured peak above them: {peak / MIB:.1f} MiB ({verdict(peak, allowed)}; "
        f"eager {results['eager']['peak_bytes'] / MIB:.1f} MiB, torch.compile "
        f"{results['compile-default']['peak_bytes'] / MIB:.1f} MiB)"
    )
    for plan in results["remat"]["plans"]:
        if plan["predicted_fused_peak_bytes"] is not None:
            say(
                f"simulated peak of {plan['graph']} (what memory_budget bounds): "
                f"{plan['predicted_fused_peak_bytes'] / MIB:.1f} MiB above the parameters and inputs"
            )
    again = run_worker(Job(GPT, "remat", "peak", budget, **settings))["peak_bytes"]
    say(
        f"repeat: remat's peak measured again in another fresh process: {again / MIB:.1f} MiB "
        f"({verdict(again, allowed)}; first {peak / MIB:.1f} MiB, difference {abs(again - peak) / MIB:.2f} MiB)"
    )
    say()
    say(f"demo took {time.perf_counter() - started:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(report) + "\n")
    print(f"written to {args.out}")


def verdict(peak: float, allowed: float) -> str:
    """Whether the measured peak kept to the budget, and by how much it did not:
    ``memory_budget`` bounds the simulated peak, and the measured one may pass it by
    what the simulator leaves out (allocator rounding, kernels' scratch buffers)."""
    if peak <= allowed:
        return "within the budget"
    over = peak - allowed
    return f"OVER the budget by {over / MIB:.2f} MiB, {100 * over / allowed:.1f}%"


if __name__ == "__main__":
    main()
