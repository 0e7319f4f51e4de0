"""Issue 9: torch.compile(model, backend="remat") under DDP and FSDP2, 2 processes on gloo (CPU).

Each rank runs the strategies of ``examples/distributed.py`` on its half of the batch;
the gradients must equal one process's on the whole batch. Every rank plans its own
step against the budget (per process): DDP's optimizer splits the graph at its buckets
(a plan per piece); under FSDP2 the graph's parameters are the all-gathered ones, so
the plan counts the full parameters that are live while it runs, not the local shards.
The README's torchrun line runs the same example.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

if not dist.is_available():
    pytest.skip("this torch build has no torch.distributed", allow_module_level=True)

from torch.distributed.fsdp import FSDPModule  # noqa: E402

import remat  # noqa: E402
from examples import distributed as example  # noqa: E402
from tests.checks import run_ranks  # noqa: E402

WORLD = 2
DEADLINE_S = 240
ROOT = Path(__file__).resolve().parents[1]


def _plans(model: torch.nn.Module) -> list[dict]:
    """The Plans of ``model``. FSDP2 swaps the sharded parameters back in after each step,
    and the Plans are filed under the all-gathered ones the graphs saw: unshard to look."""
    sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for module in sharded:
        module.unshard()
    found = [{"budget": p.budget_bytes, "resident": p.memory.resident_bytes, "partitioner": p.partitioner}
             for p in remat.plans(model)]
    for module in sharded:
        module.reshard()
    return found


def _worker(rank: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        x, y = example.batch(0, rank, WORLD)
        results = {"input_bytes": x.nbytes + y.nbytes}
        for name in ("ddp", "fsdp2", "fsdp2_per_block"):
            torch.manual_seed(0)
            model = example.Net()
            wrapped = getattr(example, name)(model)  # held: DDP all-reduces in the backward
            wrapped(x, y).backward()
            grads = [p.grad.full_tensor() if name != "ddp" else p.grad for p in model.parameters()]
            local = sum(p.to_local().nbytes if name != "ddp" else p.nbytes for p in model.parameters())
            results[name] = {"grads": grads, "plans": _plans(model), "local_parameter_bytes": local}
            torch.compiler.reset()
        torch.save(results, f"{out}/rank{rank}.pt")
        dist.barrier()  # no process tears gloo down while another still talks to it
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return run_ranks(_worker, tmp_path_factory.mktemp("distributed"), WORLD, DEADLINE_S)


def _reference() -> tuple[list[torch.Tensor], int]:
    """One process on the whole batch: its gradients, and the model's parameter bytes."""
    torch.manual_seed(0)
    model = example.Net()
    model(*example.batch(0, 0, 1)).backward()
    return [p.grad for p in model.parameters()], sum(p.nbytes for p in model.parameters())


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2", "fsdp2_per_block"])
def test_gradients_equal_one_process(ranks: list[dict], strategy: str) -> None:
    want, _ = _reference()
    for result in ranks:
        got = result[strategy]["grads"]
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_every_process_plans_against_the_budget(ranks: list[dict]) -> None:
    budget = remat.RematOptions.from_mapping(example.OPTIONS)
    assert budget.memory_budget == "8MiB"
    for result in ranks:
        # DDP's optimizer cut the graph at its first bucket (1 MiB by default): two plans
        assert len(result["ddp"]["plans"]) == 2
        assert len(result["fsdp2"]["plans"]) == 1
        # a graph per block, but blocks of the same code and shapes share one compiled graph
        # (Dynamo's cache), so one Plan: block 0, whose input needs no gradient, and the rest
        assert len(result["fsdp2_per_block"]["plans"]) == 2
        for strategy in ("ddp", "fsdp2", "fsdp2_per_block"):
            for plan in result[strategy]["plans"]:
                assert plan["budget"] == 8 * 2**20 and plan["partitioner"] == "remat-budget", plan


def test_fsdp2_plan_counts_the_gathered_parameters_and_the_local_batch(ranks: list[dict]) -> None:
    _, full_bytes = _reference()
    for result in ranks:
        (plan,) = result["fsdp2"]["plans"]
        assert result["fsdp2"]["local_parameter_bytes"] < 0.6 * full_bytes  # each rank holds about half
        # the graph runs on the all-gathered parameters and this rank's half of the batch
        assert full_bytes + result["input_bytes"] <= plan["resident"] <= full_bytes + 2 * result["input_bytes"]


@pytest.mark.slow  # 33 s; the FSDP2 step itself is tested above (``ranks``)
def test_readme_torchrun_line_runs(tmp_path: Path) -> None:
    """``torchrun --standalone --nproc_per_node=2 examples/distributed.py fsdp2``, as the README says."""
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--standalone", "--nproc_per_node=2", "examples/distributed.py", "fsdp2"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=DEADLINE_S,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.stdout.count("step 2 loss") == WORLD, result.stdout + result.stderr[-3000:]
    # Now and then a process aborts while the interpreter exits, after every rank's
    # destroy_process_group has returned: gloo's threads outlive it (pytorch/pytorch#179291,
    # 2 of about 75 runs here). The work is done by then; any other exit fails.
    finished = result.stdout.count("finished") == WORLD
    exit_abort = "terminate called without an active exception" in result.stderr
    assert result.returncode == 0 or (finished and exit_abort), result.stderr[-3000:]
