"""How well the cost models predict what is measured: peak memory, step-time order, speed.

    python -m benchmarks.predict            (or `make predict`)

1. Peak: for every zoo model (at sizes where a step allocates tens to hundreds of MiB)
   and the GPT-style model at two sizes, one fresh process compiles the step with
   ``backend="remat"`` and the eager inner compiler, measures the peak of one step
   (DESIGN.md "Measuring") and reports the peak its Plan predicted for that same graph.
   Then the same with Inductor, remat's default inner compiler: measured against the
   Plan's fusion-aware prediction (``Plan.fused_memory``) and its op-by-op one.
2. Time: on the GPT-style model, strategies that run op by op are timed (fresh
   processes, strategies in turn, medians) and their steps are predicted from the ops they run, traced
   with fake tensors, by the roofline estimator on this CPU's calibrated profile; the
   two orders are compared.
3. Simulator speed: a joint graph of more than 10,000 nodes (a deep GPT's forward and
   backward, traced with fake tensors) is simulated, best of three.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from torch.fx.experimental.proxy_tensor import make_fx

from benchmarks.measure import Job, ModelSpec, WithLoss, checkpoint_blocks, machine, run_worker

MIB = 2**20
RESULTS = Path(__file__).resolve().parent / "results"

# Sizes chosen so that a step's peak is 50-400 MiB: large enough that allocator noise
# (Python objects, small heap blocks) is under 1%, small enough to run in seconds.
PEAK_MODELS: dict[str, ModelSpec] = {
    "mlp": ModelSpec("mlp", {"batch": 4096, "d_in": 512, "d_hidden": 1024, "n_layers": 4}),
    "resnet": ModelSpec("resnet", {"batch": 32, "image_size": 64, "widths": [32, 64, 128], "blocks_per_stage": 2}),
    "unet": ModelSpec("unet", {"batch": 8, "image_size": 64, "widths": [32, 64, 128]}),
    "dynamic": ModelSpec("dynamic", {"batch": 16, "seq": 256, "d_in": 64, "d_model": 256, "n_layers": 4}),
    "gpt (demo size)": ModelSpec(
        "gpt", {"n_layers": 4, "d_model": 256, "n_heads": 4, "seq_len": 256, "vocab": 8192, "batch": 4, "dropout": 0.0}
    ),
    "gpt (larger)": ModelSpec(
        "gpt", {"n_layers": 6, "d_model": 384, "n_heads": 6, "seq_len": 256, "vocab": 8192, "batch": 8, "dropout": 0.0}
    ),
}


def _only_plan(label: str, result: dict[str, Any]) -> dict[str, Any]:
    plans = result["plans"]
    if len(plans) != 1:
        raise RuntimeError(f"{label}: expected one graph, got {len(plans)} plans: {plans}")
    return plans[0]


def peak_accuracy(threads: int) -> list[dict[str, Any]]:
    """Measured against predicted peak of the same remat plan, one fresh process each."""
    rows = []
    for label, spec in PEAK_MODELS.items():
        print(f"peak: {label} ...", flush=True)
        result = run_worker(Job(spec, "remat-eager", "peak", threads=threads, warmup=2))
        plans = [_only_plan(label, result)]
        predicted = plans[0]["predicted_peak_bytes"]
        rows.append(
            {
                "model": label,
                "spec": spec.kwargs,
                "measured_peak_bytes": result["peak_bytes"],
                "predicted_peak_bytes": predicted,
                "ratio": predicted / result["peak_bytes"],
                "predicted_peak_at": plans[0]["predicted_peak_at"],
                "partitioner": plans[0]["partitioner"],
            }
        )
    return rows


def _peak_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | measured peak MiB | predicted peak MiB | predicted / measured | predicted peak at |",
        "|---|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['measured_peak_bytes'] / MIB:.1f} | {r['predicted_peak_bytes'] / MIB:.1f} "
            f"| {r['ratio']:.3f} | `{r['predicted_peak_at']}` |"
        )
    return "\n".join(lines)


def inductor_peak_accuracy(threads: int) -> list[dict[str, Any]]:
    """The remat plan compiled by Inductor (strategy "remat"): its measured peak against
    the Plan's fusion-aware prediction and its op-by-op one, one fresh process each."""
    rows = []
    for label, spec in PEAK_MODELS.items():
        print(f"peak under Inductor: {label} ...", flush=True)
        result = run_worker(Job(spec, "remat", "peak", threads=threads, warmup=2))
        plan = _only_plan(label, result)
        measured = result["peak_bytes"]
        rows.append(
            {
                "model": label,
                "spec": spec.kwargs,
                "measured_peak_bytes": measured,
                "predicted_fused_peak_bytes": plan["predicted_fused_peak_bytes"],
                "predicted_op_by_op_peak_bytes": plan["predicted_peak_bytes"],
                "fused_ratio": plan["predicted_fused_peak_bytes"] / measured,
                "op_by_op_ratio": plan["predicted_peak_bytes"] / measured,
                "predicted_fused_peak_at": plan["predicted_fused_peak_at"],
                "partitioner": plan["partitioner"],
            }
        )
    return rows


def _inductor_peak_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | measured peak MiB | predicted, fused MiB | fused / measured | predicted, op by op MiB "
        "| op by op / measured | fused peak at |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['measured_peak_bytes'] / MIB:.1f} | {r['predicted_fused_peak_bytes'] / MIB:.1f} "
            f"| {r['fused_ratio']:.3f} | {r['predicted_op_by_op_peak_bytes'] / MIB:.1f} | {r['op_by_op_ratio']:.3f} "
            f"| `{r['predicted_fused_peak_at']}` |"
        )
    return "\n".join(lines)


TIME_MODEL = PEAK_MODELS["gpt (demo size)"]
# Strategies that run the step op by op, as the estimator models it. Inductor's fused
# kernels are not in the graphs remat plans, so compiled strategies are left out.
TIME_STRATEGIES = ("eager", "checkpoint", "remat-eager")


def predicted_step_time(spec: ModelSpec, strategy: str) -> float:
    """Seconds for one step of ``strategy``, from the ops it runs: remat's own estimate
    for remat's graphs; for eager strategies, the step traced op by op (the backward
    through autograd, checkpoint recomputation included) and summed by the same
    roofline estimator."""
    import remat
    from remat.cost_models.runtime import graph_time, make_estimator

    case = spec.build(torch.device("cpu"))
    step = WithLoss(case.model, case.loss_fn)
    if strategy == "remat-eager":
        plan = remat.plan(step, *case.inputs, inner_compiler="eager")
        if plan.estimated_time_s is None:
            raise RuntimeError(f"the plan has no time estimate: {plan.fallback_reason}")
        return plan.estimated_time_s
    if strategy == "checkpoint":
        checkpoint_blocks(step.model, case.blocks)
    return graph_time(traced_step(step, case.inputs), make_estimator("roofline", "cpu"))


def traced_step(step: torch.nn.Module, inputs: tuple[torch.Tensor, ...], tracing_mode: str = "real") -> torch.fx.Graph:
    """One graph of every op a step runs: ``step(*inputs)`` is the loss; the backward
    is traced through autograd (checkpoint recomputation included)."""
    params = dict(step.named_parameters())

    def forward_backward(params: dict[str, torch.Tensor], *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        loss = torch.func.functional_call(step, params, inputs)
        return torch.autograd.grad(loss, list(params.values()))

    return make_fx(forward_backward, tracing_mode=tracing_mode)(params, *inputs).graph


def time_ranking(threads: int, steps: int, rounds: int) -> list[dict[str, Any]]:
    """Measured and predicted step time per strategy. The measurement is the median of
    ``rounds`` fresh processes per strategy, run in turn (eager, checkpoint, remat-eager,
    eager, ...), so a slow spell on a shared machine hits every strategy alike."""
    samples: dict[str, list[float]] = {s: [] for s in TIME_STRATEGIES}
    for round_ in range(rounds):
        for strategy in TIME_STRATEGIES:
            print(f"time: {strategy} (round {round_ + 1} of {rounds}) ...", flush=True)
            job = Job(TIME_MODEL, strategy, "time", threads=threads, steps=steps, grad_check=False)
            samples[strategy].append(run_worker(job)["step_s"])
    return [
        {
            "strategy": strategy,
            "measured_step_s": statistics.median(samples[strategy]),
            "measured_rounds_s": samples[strategy],
            "predicted_step_s": predicted_step_time(TIME_MODEL, strategy),
        }
        for strategy in TIME_STRATEGIES
    ]


def _order(rows: list[dict[str, Any]], key: str) -> list[str]:
    return [r["strategy"] for r in sorted(rows, key=lambda r: r[key])]


def _time_table(rows: list[dict[str, Any]]) -> str:
    eager = next(r for r in rows if r["strategy"] == "eager")
    lines = [
        "| strategy | measured step s (each round) | measured / eager | predicted step s | predicted / eager |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['strategy']} | {r['measured_step_s']:.3f} ({', '.join(f'{t:.3f}' for t in r['measured_rounds_s'])}) "
            f"| {r['measured_step_s'] / eager['measured_step_s']:.2f} "
            f"| {r['predicted_step_s']:.3f} | {r['predicted_step_s'] / eager['predicted_step_s']:.2f} |"
        )
    return "\n".join(lines)


class _NextTokenLoss(torch.nn.Module):
    """A language model's cross-entropy, with the targets as an input."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.model(tokens)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())


LAYERS_FOR_10K_NODES = 90  # about 120 joint-graph nodes per GPT layer


def simulation_speed() -> dict[str, Any]:
    """Best-of-three time (wall and this process's CPU) to simulate a >10,000-node
    joint graph of a deep GPT."""
    from remat.cost_models.memory import simulate_step
    from tests.zoo import make_gpt

    case = make_gpt(n_layers=LAYERS_FOR_10K_NODES, d_model=64, n_heads=4, seq_len=64, vocab=512, batch=2, dropout=0.0)
    (tokens,) = case.inputs
    # fake tensors cannot meet the real targets inside case.loss_fn: pass them as an input
    graph = traced_step(_NextTokenLoss(case.model), (tokens, tokens.roll(-1, dims=1)), tracing_mode="fake")
    wall, cpu = [], []
    for _ in range(3):
        start, start_cpu = time.perf_counter(), time.process_time()
        simulate_step(graph)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return {"layers": LAYERS_FOR_10K_NODES, "nodes": len(graph.nodes), "best_of_3_wall_s": min(wall), "best_of_3_cpu_s": min(cpu)}


SECTIONS = ("peak", "inductor-peak", "time", "speed")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per process (their median is its time)")
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes per strategy, run in turn (median)")
    parser.add_argument(
        "--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
        help="what to run (default: all); with fewer, the report goes to predict-<sections>.md/.json",
    )
    parser.add_argument("--json", type=Path, help="where to write the raw numbers (default: beside the report)")
    args = parser.parse_args(argv)
    sections = [s for s in SECTIONS if s in args.sections]
    stem = "predict" if sections == list(SECTIONS) else "predict-" + "-".join(sections)
    started = time.perf_counter()
    torch.set_num_threads(args.threads)

    info = machine()
    command = shlex.join([sys.executable, "-m", "benchmarks.predict", *sys.argv[1:]])
    header = [
        "# remat cost models: predicted against measured",
        "",
        f"command: `{command}`",
        f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"machine: {info['cpu']} ({info['cpu_count']} CPUs), torch {info['torch']}, Python {info['python']}, "
        f"{args.threads} torch thread(s) per worker",
    ]
    print("\n".join(header), flush=True)

    raw: dict[str, Any] = {"machine": info, "command": command}
    report = [*header]
    if "peak" in sections:
        raw["peaks"] = peaks = peak_accuracy(args.threads)
        report += [
            "",
            "## Peak memory of one training step (remat plan, eager inner compiler)",
            "",
            "Measured: VmHWM - VmRSS across one step after two warm-up steps, in a fresh process with "
            "MALLOC_MMAP_THRESHOLD_=131072. Predicted: `Plan.memory.peak_bytes` of the same graph, made "
            "in the same process. Both exclude parameters and inputs, which exist before the step.",
            "",
            _peak_table(peaks),
            "",
            f"largest error: {max(abs(r['ratio'] - 1) for r in peaks):.1%}",
        ]
    if "inductor-peak" in sections:
        raw["inductor_peaks"] = fused = inductor_peak_accuracy(args.threads)
        report += [
            "",
            "## Peak memory of one training step (remat plan, Inductor inner compiler)",
            "",
            "Measured as above, with remat's default inner compiler, Inductor. Predicted, fused: "
            "`Plan.fused_memory.peak_bytes`, the simulator's fusion-aware mode "
            "(`simulate_step(..., fused=True)`, rules in `remat/cost_models/fusion.py`); op by op: "
            "`Plan.memory.peak_bytes`, the same graphs as if run eagerly.",
            "",
            _inductor_peak_table(fused),
            "",
            f"largest error, fused: {max(abs(r['fused_ratio'] - 1) for r in fused):.1%}; "
            f"op by op: {max(abs(r['op_by_op_ratio'] - 1) for r in fused):.1%}",
        ]
    if "time" in sections:
        raw["times"] = times = time_ranking(args.threads, args.steps, args.rounds)
        measured_order, predicted_order = _order(times, "measured_step_s"), _order(times, "predicted_step_s")
        report += [
            "",
            "## Step time: predicted order against measured order (GPT, demo size, no optimizer)",
            "",
            f"Measured: the median over {args.rounds} fresh processes per strategy, run in turn, of each "
            f"process's median of {args.steps} steps. Predicted: the roofline estimator on this CPU's "
            "calibrated profile, summed over the ops each strategy runs.",
            "",
            _time_table(times),
            "",
            f"measured order (fastest first): {', '.join(measured_order)}; predicted: {', '.join(predicted_order)}; "
            + ("same order" if measured_order == predicted_order else "ORDER DIFFERS"),
        ]
    if "speed" in sections:
        raw["simulation"] = speed = simulation_speed()
        report += [
            "",
            "## Simulator speed",
            "",
            f"joint graph of a {speed['layers']}-layer GPT (forward and backward traced with fake tensors): "
            f"{speed['nodes']} nodes, simulated in {speed['best_of_3_wall_s']:.3f} s wall, "
            f"{speed['best_of_3_cpu_s']:.3f} s CPU (best of 3)",
        ]
    report += ["", f"took {time.perf_counter() - started:.0f} s"]
    text = "\n".join(report)
    print("\n" + "\n".join(report[len(header):]))
    (RESULTS / f"{stem}.md").write_text(text + "\n")
    (args.json or RESULTS / f"{stem}.json").write_text(json.dumps(raw, indent=2) + "\n")


if __name__ == "__main__":
    main()
