"""The budgeted solver in simulation: a sweep of memory budgets and every policy.

    python -m benchmarks.solver_sweep

For each budget, ``remat.plan`` plans the GPT-style step (model and loss) for Inductor
and reports the Plan's simulated peak (with Inductor's fusion, parameters and inputs
included), its estimated step time and the solver's own time (segments, calibration,
dynamic program and the simulations that check it). Then the solver's time on the
joint graphs of GPT-style models of 12 and 48 layers at d_model=768, solved several
times from one trace (``DEEP_LAYERS``), with the median. Nothing here is
measured on a running step: ``benchmarks.budget_sweep`` measures.
"""

from __future__ import annotations

import datetime
import shlex
import statistics
import sys
from pathlib import Path

from benchmarks.measure import WithLoss, machine, machine_summary
from remat import plan
from remat.planning import plan_each
from tests.zoo import make_gpt

RESULTS = Path(__file__).resolve().parent / "results"
MIB = 2**20
MODEL = {"n_layers": 6, "d_model": 128, "n_heads": 4, "seq_len": 128, "vocab": 512, "batch": 4, "dropout": 0.1}
BUDGETS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.45, "30MiB")
POLICIES = ("none", "heavy_ops", "sqrt_n", "every_n", "full")
# Solve time: the graph's size, not its tensors', sets it; batch and sequence are small.
DEEP = {"d_model": 768, "n_heads": 12, "seq_len": 128, "vocab": 512, "batch": 8, "dropout": 0.1}
# Layers: solves. Each solve plans the same traced joint graph from scratch, in turn:
# the machine's speed drifts between runs (the 2-core Xeon's by 40%), so a median.
DEEP_LAYERS = {12: 7, 48: 3}
DEEP_BUDGET = 0.7


def main() -> None:
    case = make_gpt(**MODEL)
    model = WithLoss(case.model, case.loss_fn)
    rows = ["| options | budget MiB | simulated peak MiB | estimated step ms | solve s |", "|---|---:|---:|---:|---:|"]

    def row(label: str, found: object) -> None:
        memory = found.fused_memory
        peak = (memory.peak_bytes + memory.resident_bytes) / MIB
        budget = f"{found.budget_bytes / MIB:.1f}" if found.budget_bytes is not None else "-"
        solve = f"{found.solve_seconds:.2f}" if found.solve_seconds is not None else "-"
        rows.append(f"| {label} | {budget} | {peak:.1f} | {found.estimated_time_s * 1e3:.1f} | {solve} |")
        print(rows[-1], flush=True)

    row("(no options: min-cut)", plan(model, *case.inputs, on_plan_failure="raise"))
    for budget in BUDGETS:
        row(f"memory_budget={budget!r}", plan(model, *case.inputs, memory_budget=budget, on_plan_failure="raise"))
    for policy in POLICIES:
        row(f"policy={policy!r}", plan(model, *case.inputs, policy=policy, on_plan_failure="raise"))
    timing = ["| model | segments | median solve s | each solve s |", "|---|---:|---:|---|"]
    for layers, solves in DEEP_LAYERS.items():
        deep = make_gpt(n_layers=layers, **DEEP)
        options = {"memory_budget": DEEP_BUDGET, "on_plan_failure": "raise"}
        found = [p for p, _ in plan_each(WithLoss(deep.model, deep.loss_fn), deep.inputs, [options] * solves)]
        seconds = [p.solve_seconds for p in found]
        timing.append(
            f"| {layers} layers | {len(found[0].segments)} | {statistics.median(seconds):.2f} | "
            f"{', '.join(f'{s:.2f}' for s in seconds)} |"
        )
        print(timing[-1], flush=True)
    report = "\n".join(
        [
            "# remat solver sweep (simulated)",
            "",
            f"command: `{shlex.join([Path(sys.executable).name, '-m', 'benchmarks.solver_sweep'])}`",
            f"date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
            f"machine: {machine_summary(machine(), None)}",
            f"model: tests.zoo:make_gpt({', '.join(f'{k}={v}' for k, v in MODEL.items())}), with its loss",
            "peak and time are the Plan's predictions for the graphs compiled by Inductor, "
            "parameters and inputs included; a fraction is of the peak with nothing recomputed",
            "",
            *rows,
            "",
            f"## Solve time: GPT-style, {', '.join(f'{k}={v}' for k, v in DEEP.items())}, memory_budget={DEEP_BUDGET}",
            "",
            *timing,
            "",
        ]
    )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "solver_sweep.md").write_text(report)


if __name__ == "__main__":
    main()
