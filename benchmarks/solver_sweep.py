"""The budgeted solver in simulation: a sweep of memory budgets and every policy.

    python -m benchmarks.solver_sweep

For each budget, ``remat.plan`` plans the GPT-style step (model and loss) and reports
the Plan's simulated peak (op by op, parameters and inputs included), its estimated
step time and the solver's own time. Nothing here is measured on a running step: the
measured sweep against PyTorch's ``activation_memory_budget`` is still to be done.
"""

from __future__ import annotations

import datetime
import shlex
import sys
from pathlib import Path

from benchmarks.measure import WithLoss, machine, machine_summary
from remat import plan
from tests.zoo import make_gpt

RESULTS = Path(__file__).resolve().parent / "results"
MIB = 2**20
MODEL = {"n_layers": 6, "d_model": 128, "n_heads": 4, "seq_len": 128, "vocab": 512, "batch": 4, "dropout": 0.1}
BUDGETS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.45, "30MiB")
POLICIES = ("none", "heavy_ops", "sqrt_n", "every_n", "full")


def main() -> None:
    case = make_gpt(**MODEL)
    model = WithLoss(case.model, case.loss_fn)
    rows = ["| options | budget MiB | simulated peak MiB | estimated step ms | solve s |", "|---|---:|---:|---:|---:|"]

    def row(label: str, found: object) -> None:
        peak = (found.memory.peak_bytes + found.memory.resident_bytes) / MIB
        budget = f"{found.budget_bytes / MIB:.1f}" if found.budget_bytes is not None else "-"
        solve = f"{found.solve_seconds:.2f}" if found.solve_seconds is not None else "-"
        rows.append(f"| {label} | {budget} | {peak:.1f} | {found.estimated_time_s * 1e3:.1f} | {solve} |")
        print(rows[-1], flush=True)

    row("(no options: min-cut)", plan(model, *case.inputs, on_plan_failure="raise"))
    for budget in BUDGETS:
        row(f"memory_budget={budget!r}", plan(model, *case.inputs, memory_budget=budget, on_plan_failure="raise"))
    for policy in POLICIES:
        row(f"policy={policy!r}", plan(model, *case.inputs, policy=policy, on_plan_failure="raise"))
    report = "\n".join(
        [
            "# remat solver sweep (simulated)",
            "",
            f"command: `{shlex.join([Path(sys.executable).name, '-m', 'benchmarks.solver_sweep'])}`",
            f"date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
            f"machine: {machine_summary(machine(), None)}",
            f"model: tests.zoo:make_gpt({', '.join(f'{k}={v}' for k, v in MODEL.items())}), with its loss",
            "peak and time are the Plan's predictions for op-by-op execution (eager inner compiler), "
            "parameters and inputs included; a fraction is of the peak with nothing recomputed",
            "",
            *rows,
            "",
        ]
    )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "solver_sweep.md").write_text(report)


if __name__ == "__main__":
    main()
