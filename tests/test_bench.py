"""The benchmark harness: job validation, the compiled unit (model with loss), the
per-block checkpoint baseline on every zoo model, the budget strategy's config, the
table with a failed strategy, and one real worker process.

All in-process and CPU-only except one worker subprocess on the tiny MLP (about 10 s).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmarks import bench, measure
from benchmarks.measure import (
    BUDGET_OPTION,
    STRATEGIES,
    Job,
    MeasurementError,
    ModelSpec,
    WithLoss,
    checkpoint_blocks,
    label,
    run_pair,
    run_worker,
    table,
    time_pair,
)
from tests.zoo import ZOO, ZooCase

SPEC = ModelSpec("mlp")


# --------------------------------------------------------------------------- Job validation


def test_unknown_strategy_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"unknown strategy 'nope'; allowed: .*'compile-budget'"):
        Job(SPEC, "nope", "peak")


@pytest.mark.parametrize("budget", [1.5, -0.1, math.nan, math.inf, True, "0.5", None])
def test_budget_out_of_range_or_not_a_number_is_rejected(budget: Any) -> None:
    with pytest.raises(ValueError, match=r"'activation_memory_budget' of strategy 'compile-budget' must be a number with 0.0 <= x <= 1.0; got"):
        Job(SPEC, "compile-budget", "peak", {BUDGET_OPTION: budget})


def test_budget_strategy_needs_exactly_its_option() -> None:
    with pytest.raises(ValueError, match=r"needs the option 'activation_memory_budget'"):
        Job(SPEC, "compile-budget", "peak")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['inner_compiler'\]"):
        Job(SPEC, "compile-budget", "peak", {BUDGET_OPTION: 0.5, "inner_compiler": "eager"})


@pytest.mark.parametrize("budget", [0, 0.0, 0.3, 1, 1.0])
def test_budget_in_range_is_accepted_and_round_trips(budget: float) -> None:
    job = Job(SPEC, "compile-budget", "time", {BUDGET_OPTION: budget})
    assert Job.from_json(job.to_json()) == job


@pytest.mark.parametrize("strategy", ["eager", "checkpoint", "compile-default"])
def test_options_for_a_strategy_that_takes_none_are_rejected(strategy: str) -> None:
    with pytest.raises(ValueError, match=rf"strategy '{strategy}' takes no options; got {{'x': 1}}"):
        Job(SPEC, strategy, "peak", {"x": 1})


def test_remat_options_are_checked_by_remat() -> None:
    with pytest.raises(ValueError, match="no_such_option"):
        Job(SPEC, "remat", "peak", {"no_such_option": 1})
    with pytest.raises(ValueError, match="no_such_option"):
        Job(SPEC, "remat-eager", "peak", {"no_such_option": 1})
    Job(SPEC, "remat", "peak", {"on_plan_failure": "raise"})


def test_every_strategy_has_a_label() -> None:
    assert set(measure.LABELS) == set(STRATEGIES)
    assert label("compile-budget", {BUDGET_OPTION: 0.5}) == "torch.compile (Inductor), activation_memory_budget=0.5"
    assert label("remat", {"on_plan_failure": "raise"}).endswith('{"on_plan_failure": "raise"}')


def test_bench_strategy_names() -> None:
    points = bench.parse_points(["eager", "compile-budget", "compile-budget=0.25", "remat"], budgets=(1.0, 0.0))
    assert [p.name for p in points] == [
        "eager", "compile-budget=1.0", "compile-budget=0.0", "compile-budget=0.25", "remat"
    ]
    assert points[1].options == {BUDGET_OPTION: 1.0}
    with pytest.raises(ValueError, match="unknown strategy 'fast'"):
        bench.parse_points(["fast"])
    with pytest.raises(ValueError, match="must be a number"):
        bench.parse_points(["compile-budget=half"])
    with pytest.raises(ValueError, match="unknown zoo model 'gtp'"):
        bench.parse_spec("gtp", None)
    assert bench.parse_spec("gpt", '{"n_layers": 1}') == ModelSpec("gpt", {"n_layers": 1})
    assert bench.parse_spec(None, '{"batch": 1}').kwargs["batch"] == 1  # merged over the demo's GPT


# --------------------------------------------------------------------------- the compiled unit


def _seeded(fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    torch.manual_seed(7)  # dropout in the GPT and the dynamic encoder
    return fn()


@pytest.mark.parametrize("name", list(ZOO))
def test_with_loss_is_the_loss_of_the_model(name: str) -> None:
    case = ZOO[name]()
    step = WithLoss(case.model, case.loss_fn)
    got = _seeded(lambda: step(*case.inputs))
    want = _seeded(lambda: case.loss_fn(case.model(*case.inputs)))
    assert got.dim() == 0
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # the model's own parameter objects, in the same order: plans, optimizers, grad checks
    assert [id(p) for p in step.parameters()] == [id(p) for p in case.model.parameters()]


# --------------------------------------------------------------------------- checkpoint


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_blocks_are_distinct_unnested_submodules(name: str) -> None:
    case = ZOO[name]()
    assert len(case.blocks) >= 2, f"{name}: no blocks listed"
    assert len(set(case.blocks)) == len(case.blocks)
    for block in case.blocks:
        case.model.get_submodule(block)
        assert not any(block.startswith(other + ".") for other in case.blocks), f"{block} is inside another block"


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("name", list(ZOO))
def test_checkpoint_wraps_every_block_and_matches_eager(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    case = ZOO[name]()
    reference = copy.deepcopy(case.model)
    want_loss = _seeded(lambda: WithLoss(reference, case.loss_fn)(*case.inputs))
    want_loss.backward()

    # Count each block's own forward: once in the forward pass and once more when the
    # backward recomputes it, if (and only if) the block really runs under checkpoint.
    runs = dict.fromkeys(case.blocks, 0)
    for block_name in case.blocks:
        block = case.model.get_submodule(block_name)
        original = block.forward

        def counted(*args: Any, _name: str = block_name, _original: Callable[..., Any] = original) -> Any:
            runs[_name] += 1
            return _original(*args)

        block.forward = counted
    calls = []
    real_checkpoint = torch.utils.checkpoint.checkpoint

    def counting_checkpoint(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs.get("use_reentrant"))
        return real_checkpoint(fn, *args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting_checkpoint)
    run = STRATEGIES["checkpoint"](WithLoss(case.model, case.loss_fn), case, {})
    loss = _seeded(lambda: run(*case.inputs))
    assert runs == dict.fromkeys(case.blocks, 1)
    assert calls == [False] * len(case.blocks), "every block through checkpoint(..., use_reentrant=False)"
    loss.backward()
    assert runs == dict.fromkeys(case.blocks, 2), "each block recomputed once in the backward"

    torch.testing.assert_close(loss, want_loss, rtol=0, atol=0)
    got, want = _grads(case.model), _grads(reference)
    assert got.keys() == want.keys()
    for param, grad in want.items():
        assert got[param] is not None, f"{name}: no gradient for {param}"
        torch.testing.assert_close(got[param], grad, rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: grad of {param}\n{m}")


def test_checkpoint_needs_blocks_that_exist() -> None:
    case = ZOO["mlp"]()
    with pytest.raises(ValueError, match="lists none"):
        checkpoint_blocks(case.model, ())
    with pytest.raises(ValueError, match=r"block 'net\.9' is not a submodule of MLP"):
        checkpoint_blocks(case.model, ("net.0", "net.9"))
    no_blocks = ZooCase("custom", case.model, case.inputs, case.loss_fn)
    with pytest.raises(ValueError, match="lists none"):
        STRATEGIES["checkpoint"](WithLoss(case.model, case.loss_fn), no_blocks, {})


# --------------------------------------------------------------------------- compile-budget


def test_compile_budget_sets_the_budget_while_compiling_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """The budget is in functorch's config while the compiled step runs (the partitioner
    reads it on the first call) and the process-wide value is untouched around it."""
    seen = []

    def fake_compile(module: torch.nn.Module, **kwargs: Any) -> Callable[..., torch.Tensor]:
        assert kwargs == {}, "compile-budget is torch.compile's defaults (Inductor)"

        def compiled(*inputs: Any) -> torch.Tensor:
            seen.append(torch._functorch.config.activation_memory_budget)
            return module(*inputs)

        return compiled

    monkeypatch.setattr(torch, "compile", fake_compile)
    case = ZOO["mlp"]()
    before = torch._functorch.config.activation_memory_budget
    run = STRATEGIES["compile-budget"](WithLoss(case.model, case.loss_fn), case, {BUDGET_OPTION: 0.3})
    run(*case.inputs).backward()
    assert seen == [0.3]
    assert torch._functorch.config.activation_memory_budget == before


# --------------------------------------------------------------------------- table and bench


def _result(strategy: str, peak_mib: float, step_s: float, **extra: Any) -> dict[str, Any]:
    return {"strategy": strategy, "options": {}, "peak_bytes": int(peak_mib * 2**20), "step_s": step_s, **extra}


def test_table_with_a_failed_strategy() -> None:
    results = [
        _result("eager", 100.0, 1.0),
        {
            "strategy": "compile-budget",
            "options": {BUDGET_OPTION: 0.3},
            "error": "MeasurementError: time worker ... exited with 1:\nTraceback (most recent call last):\n"
            "  File x\ntorch._dynamo.exc.BackendCompilerFailed: backend='inductor' raised: a | b\n\n"
            "Set TORCHDYNAMO_VERBOSE=1 for the internal stack trace",
        },
        _result("remat", 50.0, 1.5, grad_max_abs_err=2e-9, grad_max_rel_err=4e-7),
        _result("checkpoint", 60.0, 1.2),
    ]
    lines = table(results).splitlines()
    assert len(lines) == 2 + len(results)
    assert lines[2] == "| eager | 100.0 | 1.000 | 1.00 | 1.00 | reference |"
    assert lines[3] == (
        "| torch.compile (Inductor), activation_memory_budget=0.3 | failed: torch._dynamo.exc.BackendCompilerFailed: "
        "backend='inductor' raised: a \\| b | | | | |"
    )
    assert lines[4] == "| torch.compile(backend='remat') (Inductor) | 50.0 | 1.500 | 0.50 | 1.50 | 2.0e-09 (rel 4.0e-07) |"
    assert lines[5].endswith("| 0.60 | 1.20 | not checked |")
    assert all(len(re.findall(r"(?<!\\)\|", line)) == 7 for line in lines), "six cells in every row"


def test_table_without_eager_has_no_ratios() -> None:
    rows = table([{"strategy": "eager", "options": {}, "error": "boom"}, _result("remat", 50.0, 1.5)]).splitlines()
    assert rows[2] == "| eager | failed: boom | | | | |"
    assert "| n/a | n/a |" in rows[3]


def test_bench_records_a_failure_and_goes_on(tmp_path: Any, monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    measured = []

    def fake_measure(spec: ModelSpec, strategy: str, options: dict[str, Any], **settings: Any) -> dict[str, Any]:
        measured.append((strategy, options))
        if options.get(BUDGET_OPTION) == 0.5:
            raise MeasurementError("peak worker for strategy 'compile-budget' exited with 1:\nRuntimeError: inductor broke")
        peak = {"eager": 100.0, "checkpoint": 60.0}.get(strategy, 90.0 if options.get(BUDGET_OPTION) == 1.0 else 95.0)
        return {**_result(strategy, peak, 1.0, parameters=1000, warmup_s=0.1), "options": dict(options)}

    monkeypatch.setattr(bench, "measure", fake_measure)
    json_path, md_path = tmp_path / "out" / "bench.json", tmp_path / "bench.md"
    bench.main([
        "--model", "mlp", "--strategies", "eager", "checkpoint", "compile-budget",
        "--budgets", "1.0", "0.5", "0.1", "--json", str(json_path), "--md", str(md_path), "--steps", "1",
    ])
    assert [s for s, _ in measured] == ["eager", "checkpoint", *["compile-budget"] * 3]

    record = json.loads(json_path.read_text())
    assert record["model"] == {"factory": "mlp", "kwargs": {}}
    assert record["settings"]["steps"] == 1
    results = {r["name"]: r for r in record["results"]}
    assert list(results) == ["eager", "checkpoint", "compile-budget=1.0", "compile-budget=0.5", "compile-budget=0.1"]
    assert "RuntimeError: inductor broke" in results["compile-budget=0.5"]["error"]
    assert results["compile-budget=0.1"]["peak_bytes"] == 95 * 2**20  # measured after the failure

    report = md_path.read_text()
    assert report.startswith("# remat bench")
    for field in ("command: `", "date: ", "machine: ", "model: mlp()", "step: "):
        assert field in report
    assert "| torch.compile (Inductor), activation_memory_budget=0.5 | failed: RuntimeError: inductor broke |" in report
    # 0.1 (95 MiB) sits above 1.0 (90 MiB) with the failed 0.5 between: reported
    assert "activation_memory_budget=0.1: 95.0 MiB, above 1.0: 90.0 MiB" in report
    assert "failed: compile-budget=0.5" in report
    assert report.split("\n\n", 1)[0] in capsys.readouterr().out


def test_bench_rejects_bad_arguments_before_measuring(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench, "measure", lambda *a, **k: pytest.fail("measured despite bad arguments"))
    for argv in (["--strategies", "compile-budget=2"], ["--model", "nope"], ["--steps", "0"]):
        with pytest.raises(SystemExit):
            bench.main(argv)


# --------------------------------------------------------------------------- one real worker


def test_worker_end_to_end_checkpoint_on_the_tiny_mlp() -> None:
    result = run_worker(Job(SPEC, "checkpoint", "time", warmup=1, steps=2, threads=1), timeout_s=120)
    assert result["strategy"] == "checkpoint" and result["metric"] == "time"
    assert result["grad_max_abs_err"] <= 1e-7, result
    assert len(result["step_times_s"]) == 2 and result["step_s"] > 0
    assert math.isfinite(result["loss"])


def test_pair_worker_times_two_strategies_in_turn() -> None:
    """Both strategies run in one fresh process, their steps interleaved; each reports
    its own gradient check and times, and the ratio is of their medians."""
    first = Job(SPEC, "eager", "time", warmup=1, steps=3, threads=1)
    second = Job(SPEC, "checkpoint", "time", warmup=1, steps=3, threads=1)
    pair = time_pair(first, second, timeout_s=120)
    assert pair["first"]["strategy"] == "eager" and pair["second"]["strategy"] == "checkpoint"
    assert len(pair["first"]["step_times_s"]) == len(pair["second"]["step_times_s"]) == 3
    assert pair["second"]["grad_max_abs_err"] <= 1e-7, pair["second"]
    assert pair["ratio"] == pytest.approx(pair["second"]["step_s"] / pair["first"]["step_s"])
    with pytest.raises(ValueError, match="same number of steps"):
        run_pair(first, dataclasses.replace(second, steps=2))


def test_demo_prints_the_shared_table_and_writes_it(
    monkeypatch: pytest.MonkeyPatch, capsys: Any, tmp_path: Path
) -> None:
    from benchmarks import demo

    plan = {"graph": "graph_0", "partitioner": "remat-budget", "saved_bytes": 2**20, "kept": 3, "recomputed": 4,
            "fallback_reason": None, "predicted_fused_peak_bytes": 69 * 2**20}
    asked: dict[str, Any] = {}

    def fake_measure(spec: ModelSpec, strategy: str, options: Any = None, **settings: Any) -> dict[str, Any]:
        asked[strategy] = options
        extra = {"plans": [plan]} if strategy == "remat" else {"grad_max_abs_err": 0.0, "grad_max_rel_err": 0.0}
        return _result(strategy, {"eager": 160.0}.get(strategy, 70.0), 0.8, parameters=7_420_000, **extra)

    monkeypatch.setattr(demo, "measure", fake_measure)
    monkeypatch.setattr(demo, "resident_bytes", lambda spec: 30 * 2**20)
    monkeypatch.setattr(demo, "run_worker", lambda job: {"peak_bytes": 70 * 2**20})
    written = tmp_path / "results" / "demo.md"
    demo.main(["--out", str(written)])
    out = capsys.readouterr().out
    report = written.read_text()
    assert out == report + f"written to {written}\n"  # the whole report, as printed
    assert f"-m benchmarks.demo --out {written}`" in report  # the command that wrote it
    assert asked["remat"] == {"memory_budget": "110.0MiB"}  # 30 MiB resident + 0.5 x eager's 160 MiB
    assert "| eager | 160.0 | 0.800 | 1.00 | 1.00 | reference |" in out
    assert "| torch.compile(backend='remat') (Inductor) | 70.0 | 0.800 | 0.44 | 1.00 |" in out
    assert "remat plan graph_0 (remat-budget): 3 kept" in out
    assert "80.0 MiB above the parameters and inputs; remat's measured peak above them: 70.0 MiB (within" in out
    assert "simulated peak of graph_0 (what memory_budget bounds): 69.0 MiB above the parameters and inputs" in out
    assert "another fresh process: 70.0 MiB (within the budget; first 70.0 MiB, difference 0.00 MiB)" in out
    assert demo.verdict(81.3 * 2**20, 81.2 * 2**20) == "OVER the budget by 0.10 MiB, 0.1%"


def test_budget_sweep_checks_catch_each_failure() -> None:
    from benchmarks.budget_sweep import Row, checks

    def row(name: str, budget: float | None, peak: float, step: float | None, against: Row | None = None) -> Row:
        """A row; a remat row's time was taken together with ``against`` (``measure_pair``)."""
        found = Row(name, "remat", {}, budget and budget * 2**20, int(peak * 2**20), step)
        if against is not None:
            found.detail["timed_against"] = {"name": against.name, "step_s": against.step_s, "ratio": step / against.step_s}
        return found

    pytorch = [row("pytorch 1.0", None, 100, 1.0), row("pytorch 0.5", None, 70, 1.3)]
    first, floor = pytorch
    good = checks(
        pytorch, [row("a", 100, 90, 0.9, first), row("b", 70, 60, 1.2, floor)], [row("c", 80, 75, None)],
        row("low", None, 40, 1.2, floor),
    )
    assert all(line.endswith("yes") for line in good), good
    bad = checks(
        pytorch,
        [row("a", 100, 90, 1.1, first), row("b", 70, 95, 1.2, floor)],  # a too slow; b over its budget and above a
        [],
        row("low", None, 60, 1.4, floor),  # 0.86x PyTorch's lowest and slower
    )
    assert [line.split(":")[0] for line in bad if "NO" in line] == [
        "monotone over 3 budgets", "honored (peak <= 1.05 x budget, 2 feasible budgets)",
        "dominance (time <= 1.02 x PyTorch's at its measured peak)", "lowest plan",
    ], bad
    beyond = row("b", 70, 95, 1.2, floor)
    beyond.detail["infeasible"] = True  # a budget under remat's lowest simulated peak is not checked
    lines = checks(pytorch, [row("a", 100, 98, 0.9, first), beyond], [], row("low", None, 40, 1.2, floor))
    assert "honored (peak <= 1.05 x budget, 1 feasible budgets; below remat's lowest simulated peak, so not checked: b): yes" in lines


def test_budget_sweep_settles_a_peak_on_the_median_of_fresh_processes(monkeypatch, capsys) -> None:
    """The lowest-plan check is a ratio of two peaks: each is the median of several
    processes, and the report lists every value it came from."""
    from benchmarks import budget_sweep
    from benchmarks.budget_sweep import Row, checks, settle_peak

    asked: list[tuple[str, dict]] = []

    def run_worker(job):
        asked.append((job.metric, job.options))
        return {"peak_bytes": [41, 39][len(asked) - 1] * 2**20}

    monkeypatch.setattr(budget_sweep, "run_worker", run_worker)
    floor = Row("pytorch 0.1", "compile-budget", {"activation_memory_budget": 0.1}, None, 30 * 2**20, 1.0)
    settle_peak(None, floor, {"warmup": 2, "steps": 1, "optimizer": None, "threads": 1}, repeats=3)
    assert asked == [("peak", {"activation_memory_budget": 0.1})] * 2
    assert floor.peak_bytes == 39 * 2**20 and floor.detail["peaks_bytes"] == [30 * 2**20, 41 * 2**20, 39 * 2**20]
    assert capsys.readouterr().out == "  pytorch 0.1: 39.0 MiB (median of 30.00, 41.00, 39.00 MiB)\n"
    lowest = Row("remat lowest plan", "remat", {}, None, 27 * 2**20, 0.9)
    lowest.detail["timed_against"] = {"name": floor.name, "step_s": 1.0, "ratio": 0.9}
    line = checks([floor], [], [], lowest)[-1]
    assert line.startswith(
        "lowest plan: 27.0 MiB = 0.692x PyTorch's lowest (pytorch 0.1, 39.0 MiB (median of 30.00, 41.00, 39.00 MiB);"
    ), line
    assert line.endswith("step 0.900 s against 1.000 s (0.900x, timed together): yes"), line


def test_budget_sweep_writes_what_it_measured_before_it_ends(tmp_path, monkeypatch) -> None:
    """A sweep cut off (a device's time limit) leaves the points measured so far."""
    from benchmarks import budget_sweep

    class CutOff(Exception):
        pass

    measured: list[str] = []

    def measure_peak(spec, row, settings):
        if len(measured) == 3:
            raise CutOff
        measured.append(row.name)
        row.peak_bytes = (100 - len(measured)) * 2**20
        return row

    def measure_pair(spec, baseline, row, settings, pairs):
        row.step_s, baseline.step_s = 1.0, 1.0
        row.detail["timed_against"] = {"name": baseline.name, "step_s": 1.0, "ratio": 1.0}
        return 1.0

    monkeypatch.setattr(budget_sweep, "resident_bytes", lambda spec: 2**20)
    monkeypatch.setattr(budget_sweep, "measure_peak", measure_peak)
    monkeypatch.setattr(budget_sweep, "measure_pair", measure_pair)
    with pytest.raises(CutOff):
        budget_sweep.main(["--model", "unet", "--out", str(tmp_path)])
    report = (tmp_path / "budget_sweep_unet.md").read_text()
    assert "| pytorch 1.0 | - | 99.0 | 1.000 | - |" in report
    assert "| remat at pytorch 1.0's peak | 99.0 | 98.0 | 1.000 | - |" in report
    assert "| pytorch 0.7 | - | 97.0 | - | - |" in report  # measured, not yet timed
    assert "partial: 3 of 18 points measured so far" in report
    assert "monotone" not in report  # no checks on part of a sweep
    record = json.loads((tmp_path / "budget_sweep_unet.json").read_text())
    assert not record["complete"] and sorted(r["name"] for r in record["rows"]) == sorted(measured)


def test_allocation_timeline_follows_the_allocator_and_names_the_op() -> None:
    from benchmarks.allocations import MIB, allocation_timeline, around_peak

    size = 2**18  # float32: 1 MiB

    def step() -> None:
        a = torch.ones(size)
        b = a * 2
        del a
        c = b + 1
        del b, c

    timeline = [event for event in allocation_timeline(step) if abs(event.nbytes) >= MIB]
    assert [(e.nbytes // MIB, e.live // MIB) for e in timeline] == [(1, 1), (1, 2), (-1, 1), (1, 2), (-1, 1), (-1, 0)]
    assert timeline[0].where.startswith("aten::ones #1 >") and timeline[1].where.startswith("aten::mul #1")
    assert timeline[3].where.startswith("aten::add #1")
    assert around_peak(timeline, MIB, 2) == timeline[:2]  # the first time it reaches 2 MiB
    assert around_peak(timeline, MIB, 1) == timeline[1:2]
