"""GradCache on a small transformer encoder: peak memory against batch size, and step-time overhead.

    python -m benchmarks.gradcache          (or `make gradcache-bench`)

Issue 7's acceptance 2 and 3, measured as DESIGN.md "Measuring" says, with
``benchmarks.measure``'s workers: the peak of one step (forward, InfoNCE loss over
queries and documents through one shared encoder, backward) in a fresh process with
``MALLOC_MMAP_THRESHOLD_``; step times in another fresh process without it.

- Memory: the peak at batch 1024 with chunk 32 against the peak at batch 64 with chunk 32.
- Overhead: at a batch that fits without caching, the plain step (one forward and
  backward of the whole batch), GradCache with ``recompute="auto"`` and a budget every
  chunk fits, and GradCache with full replay. The three run in turn in one process,
  round after round, and each gets the median of its rounds: ratios within one run.

Writes benchmarks/results/gradcache.md and gradcache.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import remat
from benchmarks.measure import MIB, _peak_bytes, fresh_process, machine, machine_summary

RESULTS = Path(__file__).resolve().parent / "results"
CHUNK = 32
MEMORY_BATCHES = (64, 1024)
TIME_BATCH = 128
# A budget far above what every chunk of TIME_BATCH saves: "auto" keeps every graph.
FITTING_BUDGET = "4GiB"
MEMORY_BOUND = 1.2  # acceptance 2: peak(1024) / peak(64)
TIME_BOUNDS = {"auto": 1.1, "replay": 1.6}  # acceptance 3: step time / plain step time


@dataclasses.dataclass(frozen=True)
class Encoder:
    """A small BERT-style encoder: token embeddings, a pre-norm transformer, mean pooling."""

    vocab: int = 1000
    seq_len: int = 32
    d_model: int = 128
    heads: int = 4
    layers: int = 2
    ff: int = 512
    dropout: float = 0.1

    def build(self) -> nn.Module:
        return _MeanPooled(self)

    def tokens(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(0, self.vocab, (batch, self.seq_len), generator=generator)


class _MeanPooled(nn.Module):
    def __init__(self, spec: Encoder) -> None:
        super().__init__()
        self.embed = nn.Embedding(spec.vocab, spec.d_model)
        layer = nn.TransformerEncoderLayer(
            spec.d_model, spec.heads, spec.ff, spec.dropout, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, spec.layers, enable_nested_tensor=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.embed(tokens)).mean(dim=1)


STRATEGIES = ("plain", "auto", "replay")


def make_step(strategy: str, encoder: nn.Module, batch: int) -> Callable[[], float]:
    """One training step of ``strategy`` on fixed random queries and documents."""
    generator = torch.Generator().manual_seed(0)
    spec = Encoder()
    queries, documents = spec.tokens(batch, generator), spec.tokens(batch, generator)
    loss_fn = remat.InfoNCE(temperature=0.05)
    if strategy == "plain":
        def run() -> torch.Tensor:
            loss = loss_fn(encoder(queries), encoder(documents))
            loss.backward()
            return loss
    else:
        options: dict[str, Any] = {"recompute": "auto", "memory_budget": FITTING_BUDGET} if strategy == "auto" else {}
        gc = remat.GradCache(encoder, CHUNK, loss_fn, **options)

        def run() -> torch.Tensor:
            return gc(queries, documents)

    def step() -> float:
        loss = run().item()
        encoder.zero_grad(set_to_none=True)  # every measured step allocates its gradients
        return loss

    return step


def run_worker_job(job: dict[str, Any]) -> dict[str, Any]:
    """The worker's whole life: a peak (one strategy, one batch) or interleaved timings."""
    torch.set_num_threads(job["threads"])
    torch.manual_seed(0)
    encoder = Encoder().build()
    if job["metric"] == "peak":
        step = make_step(job["strategy"], encoder, job["batch"])
        step()  # warm-up
        peak, baseline = _peak_bytes(step, torch.device("cpu"))
        return {"peak_bytes": peak, "baseline_bytes": baseline}
    steps = {name: make_step(name, encoder, job["batch"]) for name in STRATEGIES}
    for step in steps.values():
        step()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in STRATEGIES}
    for _ in range(job["rounds"]):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {"step_times_s": times, "step_s": {name: statistics.median(t) for name, t in times.items()}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", metavar="JOB", help="internal: run one job (JSON) and print one JSON line")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds of the three strategies (default 7)")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker_job(json.loads(args.worker))), flush=True)
        return

    command = shlex.join(["python", "-m", "benchmarks.gradcache", *(sys.argv[1:] if argv is None else argv)])
    started = time.perf_counter()
    lines = [
        "# GradCache: peak memory against batch size, and step-time overhead\n",
        f"command: `{command}`",
        f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"machine: {machine_summary(machine(), args.threads)}",
        f"encoder: {Encoder()} (mean-pooled; queries and documents through the same encoder), InfoNCE loss",
        "peak: VmHWM - VmRSS across one step after one warm-up step, in a fresh process with "
        "MALLOC_MMAP_THRESHOLD_=131072 per row; time: median step in a fresh process without it\n",
    ]
    print("\n".join(lines), flush=True)

    def worker(job: dict[str, Any], what: str) -> dict[str, Any]:
        print(f"measuring {what} ...", flush=True)
        return fresh_process("benchmarks.gradcache", json.dumps({**job, "threads": args.threads}), job["metric"], what)

    peaks = {
        batch: worker({"metric": "peak", "strategy": "replay", "batch": batch}, f"the peak at batch {batch}")
        for batch in MEMORY_BATCHES
    }
    plain_peak = worker(
        {"metric": "peak", "strategy": "plain", "batch": MEMORY_BATCHES[1]},
        f"the plain step's peak at batch {MEMORY_BATCHES[1]} (for comparison)",
    )
    timing = worker({"metric": "time", "batch": TIME_BATCH, "rounds": args.rounds}, f"step times at batch {TIME_BATCH}")

    small, large = (peaks[b]["peak_bytes"] for b in MEMORY_BATCHES)
    memory_ratio = large / small
    step_s = timing["step_s"]
    ratios = {name: step_s[name] / step_s["plain"] for name in TIME_BOUNDS}
    report = [
        *lines,
        f"## Memory: GradCache (full replay), chunk {CHUNK}\n",
        "| batch | peak MiB |",
        "|---:|---:|",
        *(f"| {batch} | {peaks[batch]['peak_bytes'] / MIB:.1f} |" for batch in MEMORY_BATCHES),
        "",
        f"For comparison, the plain step (no caching) at batch {MEMORY_BATCHES[1]}: "
        f"{plain_peak['peak_bytes'] / MIB:.1f} MiB.\n",
        f"peak at batch {MEMORY_BATCHES[1]} / peak at batch {MEMORY_BATCHES[0]}: **{memory_ratio:.3f}** "
        f"(acceptance 2: at most {MEMORY_BOUND}; {'met' if memory_ratio <= MEMORY_BOUND else 'NOT met'})\n",
        f"## Overhead at batch {TIME_BATCH} (fits without caching), chunk {CHUNK}, {args.rounds} rounds\n",
        "| strategy | median step s | time / plain | bound |",
        "|---|---:|---:|---:|",
        f"| plain step (one forward and backward of the whole batch) | {step_s['plain']:.3f} | 1.00 | |",
        f"| GradCache recompute=\"auto\", memory_budget=\"{FITTING_BUDGET}\" (every chunk kept) "
        f"| {step_s['auto']:.3f} | {ratios['auto']:.2f} | {TIME_BOUNDS['auto']} |",
        f"| GradCache recompute=True (every chunk replayed) | {step_s['replay']:.3f} | {ratios['replay']:.2f} "
        f"| {TIME_BOUNDS['replay']} |",
        "",
        "acceptance 3: " + ", ".join(
            f"{name} {'met' if ratios[name] <= bound else 'NOT met'}" for name, bound in TIME_BOUNDS.items()
        ),
        f"\ntook {time.perf_counter() - started:.0f} s",
    ]
    text = "\n".join(report[len(lines):])
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "gradcache.md").write_text("\n".join(report) + "\n")
    (RESULTS / "gradcache.json").write_text(json.dumps(
        {"command": command, "machine": machine(), "encoder": dataclasses.asdict(Encoder()), "chunk": CHUNK,
         "peaks": {str(b): p for b, p in peaks.items()}, "plain_peak": plain_peak, "memory_ratio": memory_ratio,
         "timing": timing, "time_ratios": ratios}, indent=2) + "\n")


if __name__ == "__main__":
    main()
