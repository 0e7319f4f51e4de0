"""The ``remat`` CLI on saved programs, and the report (issue 8).

Programs are saved with ``torch.export.save`` in a temporary directory; the CLI runs
in-process through ``remat.cli.main`` (one test runs the installed console script).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import re
import shutil
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import matplotlib.image
import pytest
import torch

import remat
from remat.cli import main
from remat.progress import Progress
from tests.zoo import make_gpt, make_mlp, make_unet

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# the written graphs run op by op, decomposed: fp32 rounding of reordered reductions
# (tests/test_zoo.py measures the same graphs against eager within 1e-5 / 1e-6)
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}
# budgets each small model can meet (a tiny model's parameters are most of its peak)
CASES = {
    "gpt": (lambda: make_gpt(dropout=0.0), "0.95"),
    "unet": (lambda: make_unet(), "0.7"),
}


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def comparable(plan_json: str) -> dict:
    """A plan's JSON without what differs between two plannings of the same graph."""
    data = json.loads(plan_json)
    del data["graph"], data["solve_seconds"]
    return data


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("programs")
    paths = {}
    for name, (make, _) in CASES.items():
        case = make()
        paths[name] = root / f"{name}.pt2"
        torch.export.save(torch.export.export(case.model, case.inputs), paths[name])
    return paths


@pytest.fixture(scope="module")
def planned(saved: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict]]:
    """``remat plan --json`` on each saved program: its output directory and JSON."""
    found = {}
    for name, path in saved.items():
        out = tmp_path_factory.mktemp(f"plan-{name}")
        code, stdout, stderr = run("plan", str(path), "--budget", CASES[name][1], "--sweep", "0.5", "--out", str(out), "--json")
        assert code == 0, stderr
        found[name] = (out, json.loads(stdout))
    return found


@pytest.fixture
def factories(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A module of factories, importable by name; returns its name."""
    (tmp_path / "cli_factories.py").write_text(textwrap.dedent("""
        from tests.zoo import make_mlp

        def mlp():
            case = make_mlp()
            return case.model, case.inputs

        def broken():
            raise RuntimeError("no weights in /nowhere")

        def wrong():
            return 42
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "cli_factories", raising=False)
    return "cli_factories"


@pytest.mark.parametrize("name", CASES)
def test_plan_json_is_the_plan_remat_makes_in_python(name: str, saved: dict[str, Path], planned: dict) -> None:
    out, printed = planned[name]
    program = torch.export.load(saved[name])
    expected = remat.plan(program.module(), *program.example_inputs[0], memory_budget=float(CASES[name][1]))
    written = remat.Plan.from_json((out / "plan.json").read_text())
    assert comparable(written.to_json()) == comparable(expected.to_json())
    assert written.partitioner == "remat-budget" and written.recomputed
    # the saved program's module names reach the decisions (the heat map's rows)
    modules = {d.module.split(".")[0] for d in written.decisions if d.module}
    assert modules and modules <= {child for child, _ in CASES[name][0]().model.named_children()}
    chosen = printed["plans"][-1]
    assert chosen["label"] == "chosen plan" and chosen["budget_met"] is True
    assert chosen["peak_bytes"] == expected.fused_memory.peak_bytes
    assert [p["label"] for p in printed["plans"]] == ["nothing recomputed", "budget 0.5", "chosen plan"]
    assert printed["plans"][0]["peak_bytes"] >= chosen["peak_bytes"]
    assert {Path(p).name for p in printed["files"].values()} == {
        "plan.json", "forward.py", "backward.py", "report.html", "timeline.png", "pareto.png", "modules.png"
    }


def load_module(path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(f"written_{path.parent.name}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", CASES)
def test_written_graphs_run_and_give_eager_gradients(name: str, saved: dict[str, Path], planned: dict) -> None:
    out, _ = planned[name]
    forward, backward = load_module(out / "forward.py"), load_module(out / "backward.py")
    program = torch.export.load(saved[name])
    model, inputs = program.module(), program.example_inputs[0]
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    arguments = [
        inputs[int(n.removeprefix("example_inputs[").rstrip("]"))] if n.startswith("example_inputs[") else state[n].detach()
        for n in forward.INPUTS
    ]
    with torch.no_grad():
        results = dict(zip(forward.OUTPUTS, forward.Forward()(*arguments), strict=True))
    expected_output = model(*inputs)
    # the gradient of a mean-reduced loss, so gradients have a loss's scale
    tangent = torch.randn(expected_output.shape, generator=torch.Generator().manual_seed(0)) / expected_output.numel()
    names = [n for n, p in model.named_parameters()]
    expected = dict(zip(names, torch.autograd.grad(expected_output, list(model.parameters()), tangent), strict=True))

    torch.testing.assert_close(results[forward.OUTPUTS[0]], expected_output.detach())
    results["tangents_1"] = tangent
    with torch.no_grad():
        gradients = backward.Backward()(*[results[n] for n in backward.INPUTS])
    checked = 0
    for label, gradient in zip(backward.OUTPUTS, gradients, strict=True):
        if label is not None:
            torch.testing.assert_close(gradient, expected[label.removeprefix("grad of ")], **TOLERANCE)
            checked += 1
    assert checked == len(names)


@pytest.mark.parametrize("name", CASES)
def test_report_images_are_real_pngs(name: str, planned: dict) -> None:
    out, _ = planned[name]
    report = (out / "report.html").read_text()
    for image in ("timeline.png", "pareto.png", "modules.png"):
        data = (out / image).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 5_000, image
        height, width, channels = matplotlib.image.imread(out / image).shape
        assert height > 150 and width > 300 and channels in (3, 4), image
        assert f"src='{image}'" in report
    assert "<table>" in report and "chosen plan" in report


def test_table_on_the_terminal_for_a_factory(factories: str, tmp_path: Path) -> None:
    code, stdout, stderr = run("plan", f"{factories}:mlp", "--sweep", "", "--out", str(tmp_path))
    assert code == 0, stderr
    lines = stdout.splitlines()
    assert lines[0].startswith(f"remat plan for {factories}:mlp (inner compiler inductor; peaks above ")
    assert lines[1].split() == ["plan", "peak", "step", "time", "kept", "recomputed", "budget"]
    assert lines[2].startswith("nothing recomputed") and lines[3].startswith("chosen plan")
    assert "wrote" in lines[-1] and not (tmp_path / "pareto.png").exists()  # no sweep, no Pareto figure


def test_report_from_the_live_plan_of_a_compiled_model(tmp_path: Path) -> None:
    case = make_mlp()
    compiled = torch.compile(case.model, backend="remat", options={"inner_compiler": "eager"})
    case.loss_fn(compiled(*case.inputs)).backward()
    plan = remat.explain(case.model)
    files = remat.report.write(plan, tmp_path)
    assert sorted(files) == ["modules.png", "report.html", "timeline.png"]
    assert (tmp_path / "timeline.png").read_bytes().startswith(PNG_SIGNATURE)
    assert "net.0" in (tmp_path / "report.html").read_text()  # decisions name their modules
    assert {d.module.split(".")[0] for d in plan.decisions if d.op != "placeholder"} == {"net"}
    swept = remat.report.write(plan, tmp_path / "swept", points=[plan])  # a sweep without "before"
    assert (tmp_path / "swept" / "pareto.png").read_bytes().startswith(PNG_SIGNATURE) and "pareto.png" in swept


def test_compare_against_pytorch_on_a_factory(factories: str) -> None:
    code, stdout, stderr = run("compare", f"{factories}:mlp", "--budgets", "1.0,0.5,0.0", "--json")
    assert code == 0, stderr
    rows = json.loads(stdout)["rows"]
    assert [r["budget"] for r in rows] == [1.0, 0.5, 0.0]
    for row in rows:
        assert row["remat_peak_bytes"] > 0 and row["pytorch_peak_bytes"] > 0
        assert row["remat_time_s"] > 0 and row["pytorch_time_s"] > 0
    peaks = [r["remat_peak_bytes"] for r in rows]
    assert peaks == sorted(peaks, reverse=True)  # a lower budget never raises remat's peak

    code, stdout, stderr = run("compare", f"{factories}:mlp", "--budgets", "1.0,1.5")
    assert (code, stdout) == (2, "")
    assert stderr == "remat compare: error: budgets must be fractions 0 <= x <= 1 (one at least); got [1.0, 1.5]\n"


def test_progress_bar_only_on_a_terminal() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    for stream, drawn in ((Terminal(), True), (io.StringIO(), False)):
        progress = Progress(total=4, stream=stream)
        progress.stage("tracing")
        progress.done(1)
        progress.close()
        assert ("\r\033[K[############............] 2/4 tracing" in stream.getvalue()) is drawn
        assert bool(stream.getvalue()) is drawn


def no_example_inputs(tmp_path: Path) -> str:
    case = make_mlp()
    program = torch.export.export(case.model, case.inputs)
    program.example_inputs = None
    torch.export.save(program, tmp_path / "bare.pt2")
    return str(tmp_path / "bare.pt2")


def not_a_program(tmp_path: Path) -> str:
    (tmp_path / "notes.pt2").write_text("not a program")
    return str(tmp_path / "notes.pt2")


@pytest.mark.parametrize(
    ("make_path", "extra", "message"),
    [
        (lambda tmp, f: str(tmp / "missing.pt2"), [], r"missing.pt2: no such file. Give a program saved with torch.export.save"),
        (lambda tmp, f: not_a_program(tmp), [], r"notes.pt2 is not a program saved with torch.export.save \(BadZipFile"),
        (lambda tmp, f: no_example_inputs(tmp), [], r"bare.pt2 was saved without example inputs, which give the shapes"),
        (lambda tmp, f: f"{f}:broken", [], r"factory cli_factories:broken raised RuntimeError: no weights in /nowhere; fix it"),
        (lambda tmp, f: f"{f}:wrong", [], r"factory cli_factories:wrong returned int; it must return \(model, example_inputs\)"),
        (lambda tmp, f: f"{f}:mlp", ["--budget", "0.05"], r"memory budget .* cannot be met: the lowest predicted peak .* Raise --budget to at least .*--on-infeasible closest"),
        (lambda tmp, f: f"{f}:mlp", ["--budget", "lots"], r"remat option 'memory_budget' must be .*; got 'lots'"),
        (lambda tmp, f: f"{f}:mlp", ["--offload", "auto"], r"remat option offload='auto' chooses what to offload to meet a memory_budget; pass one"),
    ],
    ids=["missing", "not-a-program", "no-example-inputs", "factory-raises", "factory-returns-wrong", "infeasible", "bad-budget", "offload-auto-without-budget"],
)
def test_errors_are_one_line_with_exit_code_2(make_path, extra, message, tmp_path: Path, factories: str) -> None:
    code, stdout, stderr = run("plan", make_path(tmp_path, factories), *extra, "--sweep", "", "--out", str(tmp_path / "out"))
    assert code == 2
    assert stdout == ""
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert stderr.startswith("remat plan: error: ")
    assert re.search(message, stderr), stderr


def test_debug_shows_the_traceback(factories: str, tmp_path: Path) -> None:
    code, _, stderr = run("plan", f"{factories}:broken", "--out", str(tmp_path), "--debug")
    assert code == 2
    assert "Traceback (most recent call last)" in stderr and 'raise RuntimeError("no weights in /nowhere")' in stderr
    assert stderr.strip().splitlines()[-1].startswith("remat plan: error: factory cli_factories:broken raised")


def test_console_script(tmp_path: Path) -> None:
    script = shutil.which("remat", path=str(Path(sys.executable).parent))
    assert script is not None, "the remat console script is not installed next to this Python (pip install -e .)"
    done = subprocess.run([script, "plan", str(tmp_path / "missing.pt2"), "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"remat plan: error: {tmp_path / 'missing.pt2'}: no such file. Give a program saved with torch.export.save "
        "(.pt2), or module:factory naming a function that returns (model, example_inputs)"
    )
