"""The ``remat`` command line: plan a saved program and write what a person wants to see.

    remat plan model.pt2 --budget 0.6 --out report/    # plan.json, forward.py, backward.py, report.html
    remat compare model.pt2 --budgets 1.0,0.5,0.2       # remat against PyTorch's partitioner

PATH is a program saved with ``torch.export.save`` or ``module:factory`` (a function
returning ``(model, example_inputs)``). A mistake in the input (a missing file, a file
that is not a saved program, a program without example inputs, a factory that raises,
a budget no plan can meet, a wrong option) is one line on stderr and exit code 2; the
traceback only with ``--debug``.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from remat.cost_models.sizes import human_bytes
from remat.options import INNER_COMPILERS, ON_INFEASIBLE, POLICIES, RematOptions
from remat.passes.budget import InfeasibleBudget, budget_text
from remat.progress import Progress
from remat.programs import Program, ProgramError, load
from remat.sweep import DEFAULT_BUDGETS

USER_ERRORS = (ProgramError, ValueError)


def _budget(text: str) -> float | str:
    """``0.5`` and ``6e9`` as numbers, ``6GB`` as given: ``memory_budget`` reads both."""
    try:
        return float(text)
    except ValueError:
        return text


def _budget_list(text: str) -> list[float | str]:
    return [_budget(part) for part in text.split(",") if part.strip()]


def _offload(text: str) -> bool | str:
    choices = {"true": True, "auto": "auto"}
    if text.lower() not in choices:
        raise argparse.ArgumentTypeError(f"expected 'true' or 'auto'; got {text!r}")
    return choices[text.lower()]


def _fractions(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected fractions separated by commas (1.0,0.5,0.2); got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    from remat import __version__

    parser = argparse.ArgumentParser(
        prog="remat",
        description=(
            "remat: a torch.compile backend that fits training into less memory by "
            "choosing, for each saved activation, whether to keep or recompute it. "
            "In Python: torch.compile(model, backend='remat'). Here: plan a saved program."
        ),
    )
    parser.add_argument("--version", action="version", version=f"remat {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("path", metavar="PATH", help="a .pt2 file from torch.export.save, or module:factory returning (model, example_inputs)")
    common.add_argument("--inner-compiler", choices=INNER_COMPILERS, default="inductor", help="whose memory model to plan for (default: inductor)")
    common.add_argument("--json", action="store_true", help="print machine-readable JSON instead of a table")
    common.add_argument("--debug", action="store_true", help="show the traceback of an error")

    plan = commands.add_parser("plan", parents=[common], help="plan a program; write plan.json, forward.py, backward.py and report.html")
    plan.add_argument("--budget", type=_budget, help="memory_budget: bytes (6e9), '2GB', '512MiB', or a fraction of the peak with nothing recomputed (0.5)")
    plan.add_argument("--policy", choices=POLICIES, help="a fixed checkpointing scheme (see the README's options)")
    plan.add_argument("--every-n", type=int, help="group size of --policy every_n")
    plan.add_argument("--exclude", action="append", default=[], metavar="PATTERN", help="never recompute values of these modules (repeatable)")
    plan.add_argument("--offload", type=_offload, metavar="{true,auto}",
                      help="offload saved activations to host memory: every one that can be (true), or what --budget needs (auto)")
    plan.add_argument("--on-infeasible", choices=ON_INFEASIBLE, default="raise", help="when no plan meets --budget: fail (raise) or plan the lowest-memory step (closest)")
    plan.add_argument("--sweep", type=_budget_list, default=list(DEFAULT_BUDGETS), metavar="BUDGETS",
                      help=f"budgets of the Pareto figure, comma-separated (default {','.join(map(str, DEFAULT_BUDGETS))}; '' for none)")
    plan.add_argument("--out", required=True, type=Path, metavar="DIR", help="directory for the files (created if missing)")
    plan.set_defaults(run=_plan)

    compare = commands.add_parser("compare", parents=[common], help="predicted peak and step time per budget: remat against PyTorch's partitioner")
    compare.add_argument("--budgets", type=_fractions, default=[1.0, 0.5, 0.2], metavar="FRACTIONS", help="comma-separated fractions (default 1.0,0.5,0.2)")
    compare.set_defaults(run=_compare)
    return parser


# flags (argparse destinations) that set a remat option, and the option each sets
OPTION_FLAGS = {
    "inner_compiler": "inner_compiler",
    "budget": "memory_budget",
    "policy": "policy",
    "every_n": "every_n",
    "exclude": "exclude",
    "on_infeasible": "on_infeasible",
    "offload": "offload",
}


def _options(args: argparse.Namespace) -> dict[str, Any]:
    """The remat options the flags give, validated before any loading or tracing."""
    given = {option: getattr(args, flag, None) for flag, option in OPTION_FLAGS.items()}
    options = {option: value for option, value in given.items() if value not in (None, [])}
    RematOptions.from_mapping(options)
    return options


def _load(args: argparse.Namespace, progress: Progress) -> Program:
    progress.stage(f"loading {args.path}")
    program = load(args.path)
    progress.stage("tracing the step (joint forward and backward graph)")
    return program


def _planned(progress: Progress) -> Callable[[int], None]:
    def on_partitioned(index: int) -> None:
        progress.done(index)
        progress.stage("planning")

    return on_partitioned


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows])


def _time(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.2f} ms"


def _plan(args: argparse.Namespace) -> int:
    from remat import report
    from remat.graph_code import write_step
    from remat.sweep import sweep

    options = _options(args)
    progress = Progress(total=len(args.sweep) + 2)
    try:
        program = _load(args, progress)
        result = sweep(program.model, program.example_inputs, options, args.sweep, on_partitioned=_planned(progress))
        progress.stage("writing the report")
        args.out.mkdir(parents=True, exist_ok=True)
        plan_json = args.out / "plan.json"
        plan_json.write_text(result.chosen.to_json(indent=2))
        forward, backward = write_step(args.out, result.graphs)
        files = {"plan.json": plan_json, "forward.py": forward, "backward.py": backward}
        files.update(report.write(result.chosen, args.out, before=result.before, points=result.points, title=f"remat plan for {program.source}"))
    finally:
        progress.close()
    rows = report.labelled(result.chosen, result.before, result.points)
    if args.json:
        print(json.dumps({
            "source": program.source,
            "plans": [{"label": label, **report.summary_row(plan)} for label, plan in rows],
            "files": {name: str(path) for name, path in files.items()},
        }, indent=2))
        return 0
    memory = result.chosen.step_memory
    resident = f"; peaks above {human_bytes(memory.resident_bytes)} of parameters and inputs" if memory else ""
    print(f"remat plan for {program.source} (inner compiler {result.chosen.inner_compiler}{resident})")
    table = []
    for label, plan in rows:
        row = report.summary_row(plan)
        met = {None: "", True: " (met)", False: " (not met)"}[row["budget_met"]]
        table.append([
            label,
            "-" if row["peak_bytes"] is None else human_bytes(row["peak_bytes"]),
            _time(row["estimated_time_s"]),
            human_bytes(row["saved_bytes"]),
            str(row["recomputed"]),
            ("-" if row["budget_bytes"] is None else human_bytes(row["budget_bytes"])) + met,
        ])
    print(_table(["plan", "peak", "step time", "kept", "recomputed", "budget"], table))
    print(f"wrote {', '.join(str(p) for p in files.values())}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from remat.compare import compare

    options = _options(args)
    progress = Progress(total=2 * len(args.budgets))
    try:
        program = _load(args, progress)
        rows = compare(program.model, program.example_inputs, args.budgets, options, on_partitioned=_planned(progress))
    finally:
        progress.close()
    if args.json:
        print(json.dumps({"source": program.source, "rows": [r.to_dict() for r in rows]}, indent=2))
        return 0
    print(f"remat against PyTorch's partitioner on {program.source} (inner compiler {args.inner_compiler}; predicted, above parameters and inputs)")
    table = [
        [
            str(r.budget),
            human_bytes(r.remat_peak_bytes) + ("" if r.remat_budget_met else " (lowest)"),
            _time(r.remat_time_s),
            human_bytes(r.pytorch_peak_bytes),
            _time(r.pytorch_time_s),
            f"{r.remat_peak_bytes / max(r.pytorch_peak_bytes, 1):.2f}",
        ]
        for r in rows
    ]
    print(_table(["budget", "remat peak", "remat time", "PyTorch peak", "PyTorch time", "peak remat/PyTorch"], table))
    print(
        "remat's budget is a fraction of the peak with nothing recomputed ('(lowest)': not reachable, its leanest plan);\n"
        "PyTorch's activation_memory_budget a fraction of the bytes its default plan saves."
    )
    return 0


def _infeasible(error: BaseException) -> InfeasibleBudget | None:
    """The budget error behind ``error``: Dynamo wraps what a backend raises."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, InfeasibleBudget):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _message(error: BaseException) -> tuple[str, int]:
    """One line saying what is wrong and what to do, and the exit code."""
    infeasible = _infeasible(error)
    if infeasible is not None:
        lowest = infeasible.lowest
        return (
            f"memory budget {budget_text(infeasible.budget, infeasible.stated)} cannot be met: the lowest predicted peak of this program is "
            f"{human_bytes(lowest.peak)} ({human_bytes(lowest.timeline.resident_bytes)} of it parameters and inputs). "
            f"Raise --budget to at least {human_bytes(lowest.peak)}, or pass --on-infeasible closest to plan the "
            "lowest-memory step",
            2,
        )
    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, USER_ERRORS):
        return text, 2
    return f"planning failed ({type(error).__name__}: {text}); run with --debug for the traceback", 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.run(args)
    except Exception as error:
        if args.debug:
            traceback.print_exc()
        message, code = _message(error)
        print(f"remat {args.command}: error: {message}", file=sys.stderr)
        return code


if __name__ == "__main__":
    raise SystemExit(main())
