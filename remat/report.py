"""Render a report from Plans: ``report.html`` and the PNG figures it shows.

Works on any Plan, so the live Plan of a compiled model gives the same report as the
CLI (``remat.report.write(remat.explain(model), "report/")``); the comparison with
nothing recomputed and the budget sweep appear when those Plans are given
(``remat.sweep.sweep`` makes them from one trace).
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from remat import plots
from remat.cost_models.sizes import human_bytes
from remat.plan import VIEW_REASON, Plan
from remat.sweep import budget_met

MAX_DECISION_ROWS = 40


def summary_row(plan: Plan) -> dict[str, Any]:
    """The numbers a person compares plans by (JSON-ready). ``peak_bytes``: above the
    parameters and inputs (``resident_bytes``), as the inner compiler runs the step."""
    memory = plan.step_memory
    return {
        "partitioner": plan.partitioner,
        "peak_bytes": None if memory is None else memory.peak_bytes,
        "resident_bytes": None if memory is None else memory.resident_bytes,
        "peak_at": None if memory is None else memory.peak_at,
        "estimated_time_s": plan.estimated_time_s,
        "saved_bytes": plan.saved_bytes,
        "kept": len(plan.kept),
        "recomputed": sum(1 for d in plan.recomputed if d.reason != VIEW_REASON),  # views cost nothing
        "budget_bytes": plan.budget_bytes,
        "budget_met": budget_met(plan),
    }


def labelled(chosen: Plan, before: Plan | None = None, points: Sequence[Plan] = ()) -> list[tuple[str, Plan]]:
    """The plans of a report with the label each row gets, the chosen one last."""
    rows = [] if before is None else [("nothing recomputed", before)]
    rows += [(f"budget {p.options.get('memory_budget')}", p) for p in points]
    return [*rows, ("chosen plan", chosen)]


def _cell(value: object) -> str:
    return f"<td>{html.escape(str(value))}</td>"


def _summary_table(rows: list[tuple[str, Plan]]) -> str:
    head = "".join(
        f"<th>{h}</th>"
        for h in ("plan", "predicted peak", "parameters and inputs", "estimated step time", "kept activations", "values recomputed (views aside)", "budget", "budget met")
    )
    body = []
    for label, plan in rows:
        row = summary_row(plan)
        peak = "-" if row["peak_bytes"] is None else human_bytes(row["peak_bytes"])
        resident = "-" if row["resident_bytes"] is None else human_bytes(row["resident_bytes"])
        seconds = "-" if row["estimated_time_s"] is None else f"{row['estimated_time_s'] * 1e3:.2f} ms"
        budget = "-" if row["budget_bytes"] is None else human_bytes(row["budget_bytes"])
        met = {None: "-", True: "yes", False: "no: lowest-memory plan"}[row["budget_met"]]
        cells = (label, peak, resident, seconds, human_bytes(row["saved_bytes"]), row["recomputed"], budget, met)
        body.append("<tr>" + "".join(map(_cell, cells)) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _decision_table(plan: Plan) -> str:
    ordered = sorted(plan.decisions, key=lambda d: -d.bytes)
    head = "".join(f"<th>{h}</th>" for h in ("action", "tensor", "module", "op", "shape", "bytes", "why"))
    body = [
        "<tr>" + "".join(map(_cell, (d.action, d.tensor, d.module or plots.TOP_LEVEL, d.op, "x".join(d.shape) or "scalar", human_bytes(d.bytes), d.reason))) + "</tr>"
        for d in ordered[:MAX_DECISION_ROWS]
    ]
    more = len(ordered) - MAX_DECISION_ROWS
    note = f"<p>{more} smaller decisions are in plan.json.</p>" if more > 0 else ""
    return f"<table><tr>{head}</tr>{''.join(body)}</table>{note}"


_STYLE = """
body { font-family: sans-serif; margin: 2em; max-width: 70em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0 1.5em; }
td, th { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f3f3f3; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
.note { color: #555; font-size: 0.9em; }
"""


def write(
    plan: Plan,
    out_dir: str | Path,
    *,
    before: Plan | None = None,
    points: Sequence[Plan] = (),
    title: str | None = None,
) -> dict[str, Path]:
    """Write ``report.html`` and its PNGs into ``out_dir`` (created if missing); return
    them by name. ``before``: the step with nothing recomputed; ``points``: plans over
    a sweep of budgets (the Pareto figure is drawn when there are some)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    figures = []
    if plan.step_memory is not None:
        files["timeline.png"] = plots.timeline(out / "timeline.png", plan, before)
        figures.append(("Memory over the step", "timeline.png"))
    if points:
        files["pareto.png"] = plots.pareto(out / "pareto.png", points, plan, before)
        figures.append(("Step time against peak memory, over the budget sweep", "pareto.png"))
    if plots.module_bytes(plan):
        files["modules.png"] = plots.heatmap(out / "modules.png", plan)
        figures.append(("Kept and recomputed bytes by module", "modules.png"))
    heading = html.escape(title or f"remat plan for {plan.graph}")
    options = html.escape(", ".join(f"{k}={v!r}" for k, v in plan.options.items()))
    memory_model = "Inductor's fused kernels" if plan.inner_compiler == "inductor" else "the graphs run op by op"
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{heading}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{heading}</h1>",
        f"<p>{html.escape(plan.partitioner)}, inner compiler {html.escape(plan.inner_compiler)}; options: {options}</p>",
        "<h2>Summary</h2>",
        _summary_table(labelled(plan, before, points)),
        f"<p class='note'>Peaks are predicted by remat's simulator for {memory_model}, above the parameters and "
        "inputs (which live through the step anyway); budgets include them. Step times are the cost model's "
        f"estimate ({html.escape(plan.time_estimator or 'none')}). Predictions, not measurements.</p>",
    ]
    if plan.fallback_reason:
        parts.append(f"<p><b>Fell back to PyTorch's partitioner:</b> {html.escape(plan.fallback_reason)}</p>")
    for caption, name in figures:
        parts.append(f"<h2>{caption}</h2><img src='{name}' alt='{caption}'>")
    parts += ["<h2>Decisions, largest first</h2>", _decision_table(plan), "</body></html>"]
    report = out / "report.html"
    report.write_text("\n".join(parts))
    files["report.html"] = report
    return files
