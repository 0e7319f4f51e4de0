"""Every baseline side by side: one training step under eager, per-block
``torch.utils.checkpoint``, ``torch.compile`` (default partitioner, then with
``activation_memory_budget`` swept from 1.0 to 0.0) and remat (Inductor and eager).

    python -m benchmarks.bench                 (or `make bench`)
    python -m benchmarks.bench --model resnet --kwargs '{"batch": 32}' \\
        --strategies eager checkpoint compile-budget=0.5 remat

Every number comes from ``benchmarks.measure`` (two fresh processes per strategy,
DESIGN.md "Measuring"); the compiled unit is the model with its loss. The table goes to
stdout and, with the command, date, machine, model and settings above it, to
``benchmarks/results/bench.md``; every field the workers report goes to the JSON file
(rewritten after each strategy, so an interrupted run keeps what it measured). A
strategy that fails (an Inductor error, say) is recorded as failed, and the run goes on.

Strategy names for ``--strategies``: eager, checkpoint, compile-default, remat,
remat-eager, ``compile-budget=X`` for one budget point, and ``compile-budget`` for the
whole sweep (``--budgets``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.demo import GPT
from benchmarks.measure import (
    BUDGET_OPTION,
    MIB,
    REPO_ROOT,
    STRATEGIES,
    Job,
    ModelSpec,
    error_line,
    label,
    machine,
    machine_summary,
    measure,
    spec_summary,
    table,
)

BUDGETS = (1.0, 0.7, 0.5, 0.3, 0.1, 0.0)
DEFAULT_STRATEGIES = ("eager", "checkpoint", "compile-default", "compile-budget", "remat", "remat-eager")
# Measured peaks of one configuration repeat within about 1 MB (DESIGN.md "Measuring");
# a lower budget whose peak is higher by more than this is reported.
PEAK_NOISE_BYTES = 1 * MIB


@dataclasses.dataclass(frozen=True)
class Point:
    """One row of the bench: a strategy and its options."""

    strategy: str
    options: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def name(self) -> str:
        if self.strategy == "compile-budget":
            return f"compile-budget={self.options[BUDGET_OPTION]}"
        return self.strategy


def parse_points(names: Sequence[str], budgets: Sequence[float] = BUDGETS) -> list[Point]:
    """Strategy names (see the module doc) -> the points to measure, in order."""
    points: list[Point] = []
    for name in names:
        strategy, sep, value = name.partition("=")
        if strategy == "compile-budget" and not sep:
            points += [Point("compile-budget", {BUDGET_OPTION: float(b)}) for b in budgets]
        elif strategy == "compile-budget":
            try:
                budget = float(value)
            except ValueError:
                raise ValueError(f"strategy {name!r}: the budget must be a number in [0.0, 1.0]; got {value!r}") from None
            points.append(Point("compile-budget", {BUDGET_OPTION: budget}))
        elif strategy in STRATEGIES and not sep:
            points.append(Point(strategy))
        else:
            allowed = sorted({*STRATEGIES, "compile-budget=X"})
            raise ValueError(f"unknown strategy {name!r}; allowed: {allowed}")
    return points


def parse_spec(model: str | None, kwargs: str | None) -> ModelSpec:
    """--model (a zoo name, "module:function", or a ModelSpec as JSON; default the demo's
    GPT) with --kwargs (JSON) merged over its keyword arguments."""
    if model is None:
        spec = GPT
    elif model.lstrip().startswith("{"):
        spec = ModelSpec(**json.loads(model))
    else:
        spec = ModelSpec(model)
    if ":" not in spec.factory:
        from tests.zoo import ZOO

        if spec.factory not in ZOO:
            raise ValueError(f"unknown zoo model {spec.factory!r}; the zoo has {sorted(ZOO)} (or give module:function)")
    if kwargs:
        extra = json.loads(kwargs)
        if not isinstance(extra, dict):
            raise ValueError(f"--kwargs must be a JSON object; got {kwargs!r}")
        spec = ModelSpec(spec.factory, {**spec.kwargs, **extra})
    return spec


def budget_inversions(results: Sequence[dict[str, Any]]) -> list[str]:
    """Budget points whose measured peak is above that of the next higher budget
    (by more than the measurement noise): lowering the budget raised the peak."""
    points = sorted(
        (r for r in results if r["strategy"] == "compile-budget" and "error" not in r),
        key=lambda r: -r["options"][BUDGET_OPTION],
    )
    return [
        f"activation_memory_budget={low['options'][BUDGET_OPTION]}: {low['peak_bytes'] / MIB:.1f} MiB, "
        f"above {high['options'][BUDGET_OPTION]}: {high['peak_bytes'] / MIB:.1f} MiB"
        for high, low in zip(points, points[1:])
        if low["peak_bytes"] > high["peak_bytes"] + PEAK_NOISE_BYTES
    ]


def _notes(results: Sequence[dict[str, Any]]) -> list[str]:
    notes = []
    inversions = budget_inversions(results)
    if inversions:
        notes.append("lowering activation_memory_budget raised the measured peak: " + "; ".join(inversions))
    for r in results:
        for plan in r.get("plans", []):
            notes.append(
                f"{label(r['strategy'], r['options'])}: plan {plan['graph']} ({plan['partitioner']}): "
                f"{plan['kept']} kept ({plan['saved_bytes'] / MIB:.1f} MiB of saved activations), "
                f"{plan['recomputed']} recomputed"
                + (f"; fell back: {plan['fallback_reason']}" if plan["fallback_reason"] else "")
            )
    failed = [r["name"] for r in results if "error" in r]
    if failed:
        notes.append(f"failed: {', '.join(failed)} (the error of each is in the JSON file)")
    return notes


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="zoo name, module:function, or a ModelSpec as JSON (default: the demo's GPT)")
    parser.add_argument("--kwargs", help="JSON object of the model factory's keyword arguments, merged over the model's")
    parser.add_argument(
        "--strategies", nargs="+", default=list(DEFAULT_STRATEGIES), metavar="NAME",
        help=f"what to measure, in order (default: {' '.join(DEFAULT_STRATEGIES)})",
    )
    parser.add_argument(
        "--budgets", type=float, nargs="+", default=list(BUDGETS), metavar="X",
        help=f"activation_memory_budget points of 'compile-budget' (default: {' '.join(map(str, BUDGETS))})",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up steps before measuring (default 2)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps; the median is reported (default 5)")
    parser.add_argument(
        "--optimizer", choices=["none", "sgd", "adam"], default="adam", help="optimizer step in each step (default adam)"
    )
    parser.add_argument("--json", type=Path, default=REPO_ROOT / "benchmarks/results/bench.json", help="raw numbers")
    parser.add_argument("--md", type=Path, default=REPO_ROOT / "benchmarks/results/bench.md", help="the report")
    args = parser.parse_args(argv)
    try:
        spec = parse_spec(args.model, args.kwargs)
        points = parse_points(args.strategies, args.budgets)
        settings = {
            "warmup": args.warmup,
            "steps": args.steps,
            "optimizer": None if args.optimizer == "none" else args.optimizer,
            "threads": args.threads,
        }
        for point in points:  # every option and setting checked before the first worker
            Job(spec, point.strategy, "peak", point.options, **settings)
    except ValueError as error:
        parser.error(str(error))
    started = time.perf_counter()

    command = shlex.join([sys.executable, "-m", "benchmarks.bench", *(sys.argv[1:] if argv is None else argv)])
    date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    info = machine()
    step = ", ".join(["forward", "loss", "backward", *([f"{args.optimizer} step"] if settings["optimizer"] else [])])
    header = [
        "# remat bench: one training step under every baseline",
        "",
        f"command: `{command}`",
        f"date: {date}",
        f"machine: {machine_summary(info, args.threads)}",
        f"model: {spec_summary(spec)}",
        f"step: {step}, compiled as one unit (model and loss); {args.warmup} warm-up step(s) "
        "(compilation happens there) before measuring",
        "peak: VmHWM - VmRSS across one step, in a fresh process with MALLOC_MMAP_THRESHOLD_=131072; "
        f"time: median of {args.steps} step(s) in a second fresh process without it; "
        "gradient error: the first step against an eager copy of the model, in the time process",
    ]
    print("\n".join(header) + "\n", flush=True)

    record: dict[str, Any] = {
        "command": command,
        "date": date,
        "machine": info,
        "model": dataclasses.asdict(spec),
        "settings": settings,
        "results": [],
    }
    results: list[dict[str, Any]] = record["results"]
    for point in points:
        print(f"measuring {point.name} ...", flush=True)
        point_started = time.perf_counter()
        try:
            result = measure(spec, point.strategy, point.options, **settings)
        except Exception as error:  # a failed strategy is a result too; go on with the rest
            result = {"strategy": point.strategy, "options": point.options, "error": f"{type(error).__name__}: {error}"}
            print(f"  failed: {error_line(result['error'])}", flush=True)
        result = {"name": point.name, **result, "wall_s": time.perf_counter() - point_started}
        results.append(result)
        record["wall_s"] = time.perf_counter() - started
        _write(args.json, json.dumps(record, indent=1, default=str) + "\n")

    params = next((r["parameters"] for r in results if "parameters" in r), None)
    body = [table(results)]
    if params is not None:
        body.insert(0, f"{params / 1e6:.2f} M parameters\n")
    notes = _notes(results)
    if notes:
        body.append("\n" + "\n".join(f"- {note}" for note in notes))
    body.append(f"\nbench took {time.perf_counter() - started:.0f} s")
    print("\n" + "\n".join(body), flush=True)
    _write(args.md, "\n".join(header) + "\n\n" + "\n".join(body) + "\n")
    record["wall_s"] = time.perf_counter() - started
    _write(args.json, json.dumps(record, indent=1, default=str) + "\n")
    print(f"\nwrote {args.md} and {args.json}")


if __name__ == "__main__":
    main()
