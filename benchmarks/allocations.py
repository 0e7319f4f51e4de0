"""Where one training step's CPU memory peaks, from the allocations it makes.

The budget sweep's peak (``VmHWM - VmRSS``) says how high a step goes, not where. This
records one step (after warm-up) with ``torch.profiler`` (``profile_memory=True``):
every allocation and free of the CPU allocator, in order. The running sum above the
step's start is the step's memory; its maximum is the allocation peak, and the ops
around it say where it is. For a remat plan it prints the simulator's prediction
beside it (``Plan.fused_memory`` under Inductor, ``Plan.memory`` op by op).

Inductor's generated kernels record no events of their own: their allocations come
after the last aten op before them. On the U-Net of the budget sweep this found a
kernel the fused model counted 4 MiB low (README, the U-Net of the budget sweep).

    python -m benchmarks.allocations --model unet --options '{"memory_budget": "1MiB", "on_infeasible": "closest"}'
"""

from __future__ import annotations

import argparse
import json
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from benchmarks.measure import MIB, OPTION_CHECKS, REMAT_STRATEGIES, STRATEGIES, TAKES_OPTIONS, ModelSpec, WithLoss, label
from remat._torch_internals import allocator_events


@dataclass(frozen=True)
class Allocation:
    """One allocator event: bytes (negative for a free), the step's bytes after it, and
    where: the ops running (outermost first), or the last op that ended before it."""

    nbytes: int
    live: int
    where: str


WRAPPERS = ("##", "autograd::", "CompiledFunction", "Torch-Compiled Region")  # calls around whole graphs


def allocation_timeline(step: Callable[[], Any]) -> list[Allocation]:
    """Run ``step()`` once under the profiler; its allocations and frees in order."""
    timeline: list[Allocation] = []
    running: list[tuple[str, int]] = []  # ops started and not ended: (name, end ns)
    calls: dict[str, int] = {}  # outermost ops are numbered: the third convolution_backward is "#3"
    live, ended = 0, "the step's start"
    for name, nbytes, start, end in allocator_events(step):
        while running and running[-1][1] <= start:
            ended = running.pop()[0]
        if name != "[memory]":
            if not name.startswith(WRAPPERS):
                if not running:
                    calls[name] = calls.get(name, 0) + 1
                    name = f"{name} #{calls[name]}"
                running.append((name, end))
        elif nbytes:
            live += nbytes
            where = " > ".join(op for op, _ in running) or f"after {ended}"
            timeline.append(Allocation(nbytes, live, where))
    return timeline


def around_peak(timeline: Sequence[Allocation], smallest: int, count: int) -> list[Allocation]:
    """The last ``count`` allocations of at least ``smallest`` bytes before the peak, and
    the one that reaches it."""
    peak = max(range(len(timeline)), key=lambda i: timeline[i].live)
    earlier = [a for a in timeline[:peak] if abs(a.nbytes) >= smallest]
    return [*earlier[max(len(earlier) - count + 1, 0) :], timeline[peak]]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="unet", help="a zoo model (tests.zoo.ZOO) or module:function")
    parser.add_argument("--kwargs", default="{}", help="JSON object of the model factory's keyword arguments")
    parser.add_argument("--strategy", default="remat", choices=sorted(STRATEGIES))
    parser.add_argument("--options", default="{}", help="JSON object of the strategy's options")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--smallest", default=0.5, type=float, help="MiB: smaller allocations are not listed")
    parser.add_argument("--count", default=30, type=int, help="allocations listed up to the peak")
    args = parser.parse_args(argv)
    options = json.loads(args.options)
    if args.strategy in TAKES_OPTIONS:
        OPTION_CHECKS[args.strategy](options)
    elif options:
        parser.error(f"strategy {args.strategy!r} takes no options; got {options}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    case = ModelSpec(args.model, json.loads(args.kwargs)).build(torch.device("cpu"))
    run = STRATEGIES[args.strategy](WithLoss(case.model, case.loss_fn), case, options)

    def step() -> None:
        run(*case.inputs).backward()
        case.model.zero_grad(set_to_none=True)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a budget no plan meets warns on the first call
        step()
        step()
    timeline = allocation_timeline(step)
    peak = max(a.live for a in timeline)
    print(f"{label(args.strategy, options)} on {args.model} {args.kwargs}, {torch.get_num_threads()} thread(s)")
    print(f"allocation peak above the step's start: {peak / MIB:.2f} MiB ({len(timeline)} allocator events)")
    if args.strategy in REMAT_STRATEGIES:
        import remat

        for plan in remat.plans(case.model):
            memory = plan.fused_memory if plan.inner_compiler == "inductor" else plan.memory
            if memory is not None:
                print(f"predicted for {plan.graph}: {memory.peak_bytes / MIB:.2f} MiB at {memory.peak_at}")
    print("\n| MiB allocated (+) or freed (-) | MiB live after | in (or after) the op |\n|---:|---:|---|")
    for event in around_peak(timeline, int(args.smallest * MIB), args.count):
        print(f"| {event.nbytes / MIB:+.2f} | {event.live / MIB:.2f} | {event.where} |")


if __name__ == "__main__":
    main()
