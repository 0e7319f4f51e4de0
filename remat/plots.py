"""The report's figures, drawn from Plans with matplotlib.

Figures are made without pyplot (``Figure`` renders with Agg on its own), so drawing a
report neither needs a display nor changes the matplotlib backend of the user's process.

Each function writes one PNG and returns its path. Memory is the prediction a
budget is checked against (``Plan.step_memory``), counted above the parameters and
inputs, as a step's peak is measured.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure

from remat.plan import VIEW_REASON, MemoryPrediction, Plan

DPI = 80
MAX_MODULE_ROWS = 24
TOP_LEVEL = "(top level)"


def _unit(largest: float) -> tuple[float, str]:
    for scale, name in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if largest >= scale:
            return float(scale), name
    return 1.0, "B"


def _save(figure: Figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    return path


def _step_axis(positions: Sequence[str]) -> list[float]:
    """The forward's ops spread over [0, 1), the backward's over [1, 2]: plans with
    different numbers of ops line up at the start of the backward."""
    forward = sum(1 for p in positions if p.startswith("forward:"))
    backward = len(positions) - forward
    return [i / max(forward, 1) if i < forward else 1 + (i - forward) / max(backward - 1, 1) for i in range(len(positions))]


def timeline(path: Path, after: Plan, before: Plan | None = None) -> Path:
    """Live bytes over the step: with nothing recomputed (``before``) and with the plan."""
    lines: list[tuple[str, MemoryPrediction]] = []
    if before is not None and before.step_memory is not None:
        lines.append(("nothing recomputed", before.step_memory))
    if after.step_memory is None:
        raise ValueError(f"plan {after.graph} has no memory prediction to draw")
    lines.append(("remat plan", after.step_memory))
    resident = after.step_memory.resident_bytes
    budget = None if after.budget_bytes is None else after.budget_bytes - resident
    scale, unit = _unit(max([m.peak_bytes for _, m in lines] + [budget or 0]))
    figure = Figure(figsize=(8, 3.6))
    axes = figure.subplots()
    for label, memory in lines:
        x = _step_axis(memory.positions)
        axes.plot(x, [b / scale for b in memory.live_bytes], label=f"{label} (peak {memory.peak_bytes / scale:.1f} {unit})", lw=1.2)
    if budget is not None:
        axes.axhline(budget / scale, color="crimson", ls="--", lw=1, label=f"budget less parameters and inputs ({budget / scale:.1f} {unit})")
    axes.axvline(1.0, color="grey", lw=0.8, ls=":")
    axes.set_xticks([0, 0.5, 1, 1.5, 2], ["forward", "", "backward", "", "end"])
    axes.set_ylabel(f"live {unit} above parameters and inputs")
    axes.set_title("Predicted memory over one training step")
    axes.legend(fontsize=8, loc="upper left")
    return _save(figure, path)


def _peak_and_time(plan: Plan) -> tuple[int, float] | None:
    if plan.step_memory is None or plan.estimated_time_s is None:
        return None
    return plan.step_memory.peak_bytes, plan.estimated_time_s


def pareto(path: Path, points: Sequence[Plan], chosen: Plan, before: Plan | None = None) -> Path:
    """Estimated step time against predicted peak over a sweep of budgets, the
    lowest-time plans at each peak joined, the chosen plan marked."""
    swept = sorted({pt for pt in map(_peak_and_time, points) if pt is not None})
    marks = [
        (label, point, style)
        for label, plan, style in (
            ("nothing recomputed", before, {"marker": "s", "color": "grey", "s": 50}),
            ("chosen plan", chosen, {"marker": "*", "color": "crimson", "s": 160}),
        )
        if plan is not None and (point := _peak_and_time(plan)) is not None
    ]
    everything = swept + [point for _, point, _ in marks]
    if not everything:
        raise ValueError("no plan of the sweep has a memory and time prediction to draw")
    scale, unit = _unit(max(peak for peak, _ in everything))
    frontier, best = [], float("inf")
    for peak, seconds in swept:  # by rising peak: keep each plan faster than all leaner ones
        if seconds < best:
            frontier.append((peak, seconds))
            best = seconds
    figure = Figure(figsize=(6, 4))
    axes = figure.subplots()
    axes.scatter([p / scale for p, _ in swept], [s * 1e3 for _, s in swept], color="steelblue", s=18, label="budget sweep")
    axes.plot([p / scale for p, _ in frontier], [s * 1e3 for _, s in frontier], color="steelblue", lw=1)
    for label, (peak, seconds), style in marks:
        axes.scatter([peak / scale], [seconds * 1e3], label=label, zorder=3, **style)
    axes.set_xlabel(f"predicted peak ({unit} above parameters and inputs)")
    axes.set_ylabel("estimated step time (ms)")
    axes.set_title("Step time against peak memory")
    axes.legend(fontsize=8)
    return _save(figure, path)


ACTIONS = ("keep", "recompute", "offload")
ACTION_LABELS = {"keep": "kept", "recompute": "recomputed", "offload": "offloaded"}


def module_bytes(plan: Plan) -> dict[str, dict[str, int]]:
    """Bytes of the values the backward reads, by the module that made them and by
    action. Parameters and inputs (they live anyway) and views (they share their base's
    storage) are left out. Module names are cut to the deepest level with at most
    ``MAX_MODULE_ROWS`` names."""
    counted = [d for d in plan.decisions if d.op != "placeholder" and d.reason != VIEW_REASON]
    depth = max((d.module.count(".") + 1 for d in counted if d.module), default=0)
    while depth > 1 and len({".".join(d.module.split(".")[:depth]) for d in counted}) > MAX_MODULE_ROWS:
        depth -= 1
    table: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(ACTIONS, 0))
    for d in counted:
        table[".".join(d.module.split(".")[:depth]) or TOP_LEVEL][d.action] += d.bytes
    return dict(table)


def _natural(name: str) -> tuple[bool, list[tuple[int, int | str]]]:
    """``blocks.2`` before ``blocks.10``; the top level first."""
    return name != TOP_LEVEL, [(0, int(part)) if part.isdigit() else (1, part) for part in name.split(".")]


def heatmap(path: Path, plan: Plan) -> Path:
    """Per module: bytes kept for the backward, recomputed in it and (where any were)
    offloaded to host memory."""
    table = module_bytes(plan)
    if not table:
        raise ValueError(f"plan {plan.graph} has no activation the backward reads: nothing to draw")
    modules = sorted(table, key=_natural)
    actions = ACTIONS if any(row["offload"] for row in table.values()) else ACTIONS[:2]
    values = [[table[m][a] for a in actions] for m in modules]
    largest = max(max(row) for row in values)
    scale, unit = _unit(largest)
    figure = Figure(figsize=(5.5, 1.2 + 0.28 * len(modules)))
    axes = figure.subplots()
    image = axes.imshow([[v / scale for v in row] for row in values], aspect="auto", cmap="viridis")
    axes.set_xticks(range(len(actions)), [ACTION_LABELS[a] for a in actions])
    axes.set_yticks(range(len(modules)), modules, fontsize=8)
    for i, row in enumerate(values):
        for j, value in enumerate(row):
            axes.text(j, i, f"{value / scale:.1f}", ha="center", va="center", fontsize=7, color="white" if value < largest / 2 else "black")
    figure.colorbar(image, ax=axes, label=unit)
    axes.set_title(f"Activation bytes by module ({unit})", fontsize=10)
    return _save(figure, path)
