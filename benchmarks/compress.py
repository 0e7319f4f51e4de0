"""Gradient compression: convergence on a GPT-style model, and the peak memory of a step.

    python -m benchmarks.compress          (or `make compress-bench`)

Issue 6's acceptance 1 and 2, on the CPU, with the eager inner compiler (``--inner-compiler``):

- Convergence: the GPT-style model of ``tests.zoo`` learns a noisy successor task (each
  next token is a fixed random permutation of the current one with probability
  ``Task.p_follow``, else uniform), so the best loss is the task's entropy, not 0, and
  "within 3%" means something. AdamW for ``--steps`` steps, uncompressed, top-k
  ratio 100 with error feedback, and without it; the final loss is the mean loss on
  held-out batches.
- Memory: the peak of one training step (forward, backward, AdamW step) of a wide MLP
  whose gradients dominate, with and without top-k ratio 100 (each in a fresh process
  with ``MALLOC_MMAP_THRESHOLD_``, as DESIGN.md "Measuring" says), against the bytes of
  the dense gradients. AdamW runs with ``foreach=False``, so that its own temporaries
  are one parameter's in every row and the difference is the gradients'.

Writes benchmarks/results/compress.md and compress.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

import remat
from benchmarks.measure import MIB, WithLoss, _peak_bytes, fresh_process, machine, machine_summary
from benchmarks.predict import _NextTokenLoss
from tests.zoo import make_gpt, make_mlp

RESULTS = Path(__file__).resolve().parent / "results"
CONVERGENCE_BOUND = 0.03  # acceptance 1: |loss(top-k, EF) / loss(dense) - 1|
MEMORY_SHARE = 0.8  # acceptance 2: peak reduction / dense gradient bytes
RUNS = {
    "uncompressed": None,
    "top-k ratio 100, error feedback": {"method": "topk", "ratio": 100, "error_feedback": True},
    "top-k ratio 100, no error feedback": {"method": "topk", "ratio": 100, "error_feedback": False},
}


@dataclasses.dataclass(frozen=True)
class Task:
    """The noisy successor task and the model that learns it."""

    vocab: int = 64
    seq_len: int = 32
    batch: int = 16
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 2
    p_follow: float = 0.75
    lr: float = 3e-3
    eval_batches: int = 8

    def entropy(self) -> float:
        """The best possible loss: the entropy of the next token given the current one."""
        follow = self.p_follow + (1 - self.p_follow) / self.vocab
        other = (1 - self.p_follow) / self.vocab
        return -(follow * math.log(follow) + (self.vocab - 1) * other * math.log(other))

    def batch_of(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens and next-token targets."""
        successor = torch.randperm(self.vocab, generator=torch.Generator().manual_seed(1234))
        text = torch.empty(self.batch, self.seq_len + 1, dtype=torch.long)
        text[:, 0] = torch.randint(0, self.vocab, (self.batch,), generator=generator)
        for t in range(self.seq_len):
            follow = torch.rand(self.batch, generator=generator) < self.p_follow
            noise = torch.randint(0, self.vocab, (self.batch,), generator=generator)
            text[:, t + 1] = torch.where(follow, successor[text[:, t]], noise)
        return text[:, :-1], text[:, 1:]


def train(task: Task, compress: dict[str, Any] | None, steps: int, inner_compiler: str = "eager") -> dict[str, Any]:
    """Train from the same seed and batches; the final held-out loss and the curve."""
    torch.compiler.reset()
    case = make_gpt(
        n_layers=task.n_layers, d_model=task.d_model, n_heads=task.n_heads, seq_len=task.seq_len,
        vocab=task.vocab, batch=task.batch, dropout=0.0, seed=0,
    )
    step_module = _NextTokenLoss(case.model)
    options: dict[str, Any] = {"inner_compiler": inner_compiler}
    if compress is not None:
        options["compress"] = compress
    compiled = torch.compile(step_module, backend="remat", options=options)
    optimizer = torch.optim.AdamW(case.model.parameters(), lr=task.lr)
    store = remat.GradientStore(step_module, optimizer) if compress is not None else None
    generator = torch.Generator().manual_seed(0)
    losses = []
    started = time.perf_counter()
    for _ in range(steps):
        loss = compiled(*task.batch_of(generator))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    seconds = time.perf_counter() - started
    held_out = torch.Generator().manual_seed(10**6)
    with torch.no_grad():
        final = sum(step_module(*task.batch_of(held_out)).item() for _ in range(task.eval_batches)) / task.eval_batches
    result = {"final_loss": final, "losses": losses, "seconds": seconds}
    if store is not None:
        summary = store.summary()
        result["compression_ratio"] = summary.compression_ratio
    return result


@dataclasses.dataclass(frozen=True)
class WideMLP:
    """An MLP whose parameters (so gradients) dwarf its activations at this batch."""

    width: int = 1024
    layers: int = 8
    batch: int = 8

    def build(self) -> Any:
        return make_mlp(batch=self.batch, d_in=self.width, d_hidden=self.width, d_out=self.width, n_layers=self.layers)


def peak_worker(job: dict[str, Any]) -> dict[str, Any]:
    """One fresh process: the peak of one training step of the wide MLP."""
    torch.set_num_threads(job["threads"])
    case = WideMLP(**job["mlp"]).build()
    options: dict[str, Any] = {"inner_compiler": job["inner_compiler"]}
    if job["compress"] is not None:
        options["compress"] = job["compress"]
    step_module = WithLoss(case.model, case.loss_fn)
    compiled = torch.compile(step_module, backend="remat", options=options)
    optimizer = torch.optim.AdamW(case.model.parameters(), lr=1e-4, foreach=False)
    store = remat.GradientStore(step_module, optimizer) if job["compress"] is not None else None

    def step() -> float:
        loss = compiled(*case.inputs)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    step()
    step()  # warm-up: compiled, optimizer state and residuals allocated
    peak, baseline = _peak_bytes(step, torch.device("cpu"))
    dense = sum(p.numel() * p.element_size() for p in case.model.parameters())
    result = {"peak_bytes": peak, "baseline_bytes": baseline, "dense_gradient_bytes": dense}
    if store is not None:
        state = store.state_dict().values()
        result["residual_bytes"] = sum(t.numel() * t.element_size() for tensors in state for t in tensors.values())
        result["compression_ratio"] = store.summary().compression_ratio
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", metavar="JOB", help="internal: run one peak job (JSON) and print one JSON line")
    parser.add_argument("--steps", type=int, default=300, help="AdamW steps of each convergence run (default 300)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--inner-compiler", choices=["eager", "inductor"], default="eager")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(peak_worker(json.loads(args.worker))), flush=True)
        return
    torch.set_num_threads(args.threads)
    command = shlex.join(["python", "-m", "benchmarks.compress", *(sys.argv[1:] if argv is None else argv)])
    started = time.perf_counter()
    task, mlp = Task(), WideMLP()
    header = [
        "# Gradient compression: convergence and peak memory\n",
        f"command: `{command}`",
        f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"machine: {machine_summary(machine(), args.threads)}",
        f"inner compiler: {args.inner_compiler}\n",
    ]
    print("\n".join(header), flush=True)

    runs = {}
    for name, compress in RUNS.items():
        print(f"training: {name} ...", flush=True)
        runs[name] = train(task, compress, args.steps, args.inner_compiler)
    dense_loss = runs["uncompressed"]["final_loss"]
    gaps = {name: run["final_loss"] / dense_loss - 1 for name, run in runs.items()}
    ef_gap = gaps["top-k ratio 100, error feedback"]

    peaks = {}
    for name, compress in RUNS.items():
        print(f"measuring the peak: {name} ...", flush=True)
        job = {"threads": args.threads, "mlp": dataclasses.asdict(mlp), "inner_compiler": args.inner_compiler, "compress": compress}
        peaks[name] = fresh_process("benchmarks.compress", json.dumps(job), "peak", name)
    dense_bytes = peaks["uncompressed"]["dense_gradient_bytes"]
    saved = {name: (peaks["uncompressed"]["peak_bytes"] - p["peak_bytes"]) / dense_bytes for name, p in peaks.items()}
    ef_saved = saved["top-k ratio 100, error feedback"]
    plain_saved = saved["top-k ratio 100, no error feedback"]

    report = [
        *header,
        f"## Acceptance 1: convergence, {args.steps} AdamW steps (lr {task.lr})\n",
        f"task: {task} (GPT from tests.zoo, dropout 0); best possible loss "
        f"(the task's entropy): {task.entropy():.4f}\n",
        "| run | final held-out loss | vs uncompressed | train s |",
        "|---|---:|---:|---:|",
        *(f"| {name} | {run['final_loss']:.4f} | {gaps[name]:+.2%} | {run['seconds']:.1f} |" for name, run in runs.items()),
        "",
        f"top-k ratio 100 with error feedback: {ef_gap:+.2%} of the uncompressed loss "
        f"(acceptance: within {CONVERGENCE_BOUND:.0%}; {'met' if abs(ef_gap) <= CONVERGENCE_BOUND else 'NOT met'}); "
        f"without error feedback: {gaps['top-k ratio 100, no error feedback']:+.2%} (measured, no bound).\n",
        "## Acceptance 2: peak of a training step (forward, backward, AdamW step), wide MLP\n",
        f"model: {mlp}; dense gradient bytes {dense_bytes / MIB:.1f} MiB (all parameters, fp32)\n",
        "| run | peak MiB | peak reduction / dense gradient bytes |",
        "|---|---:|---:|",
        *(f"| {name} | {p['peak_bytes'] / MIB:.1f} | {saved[name]:.2f} |" for name, p in peaks.items()),
        "",
        f"top-k ratio 100 without error feedback: {plain_saved:.2f} of the dense gradient bytes "
        f"(acceptance: at least {MEMORY_SHARE}; {'met' if plain_saved >= MEMORY_SHARE else 'NOT met'}); "
        f"with error feedback {ef_saved:.2f}, but its residual "
        f"({peaks['top-k ratio 100, error feedback']['residual_bytes'] / MIB:.1f} MiB, one fp32 tensor per "
        "parameter) is persistent state like AdamW's moments: it is in the baseline memory before the step, "
        "which the peak (VmHWM - VmRSS across one step, after two warm-up steps) does not count.",
        f"\ntook {time.perf_counter() - started:.0f} s",
    ]
    text = "\n".join(report[len(header):])
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "compress.md").write_text("\n".join(report) + "\n")
    (RESULTS / "compress.json").write_text(json.dumps(
        {"command": command, "machine": machine(), "task": dataclasses.asdict(task), "mlp": dataclasses.asdict(mlp),
         "runs": runs, "gaps": gaps, "peaks": peaks, "peak_reduction_share": saved}, indent=2) + "\n")


if __name__ == "__main__":
    main()
