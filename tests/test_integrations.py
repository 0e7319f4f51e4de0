"""Issue 9: remat where people already train. The README's examples are pieces of the
scripts in examples/, and these tests run the scripts: Hugging Face's Trainer with
``torch_compile_backend="remat"`` (options from REMAT_OPTIONS), Lightning with the
``Remat`` callback, and ``@remat.optimize``. Each trains to the weights eager training
reaches. transformers, accelerate and lightning are optional (``make test-integrations``
installs them); without them their tests are skipped, naming the missing package.
(DDP and FSDP2: tests/test_distributed.py.)"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import remat
from remat import _torch_internals as internals

ROOT = Path(__file__).resolve().parents[1]
INSTALL = "make test-integrations installs it"


def _needs(*packages: str) -> None:
    for package in packages:
        pytest.importorskip(package, reason=f"{package} is not installed ({INSTALL})")


def _assert_same_weights(got: torch.nn.Module, want: torch.nn.Module) -> None:
    for g, w in zip(got.parameters(), want.parameters(), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def _readme_examples() -> list[tuple[str, list[str]]]:
    """(script, code lines) of each Python block of the README's "Where you already train"."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Where you already train", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    found = []
    for block in blocks:
        first, *lines = block.splitlines()
        script = re.match(r"# from (examples/\S+\.py)", first)
        assert script, f"a README example must start with '# from examples/<script>.py': {first!r}"
        found.append((script.group(1), lines))
    return found


def _code(line: str) -> str:
    return line.split("  #", 1)[0].strip()


def test_readme_examples_are_in_the_scripts_the_tests_run() -> None:
    examples = _readme_examples()
    assert {script for script, _ in examples} == {
        "examples/hf_trainer.py", "examples/lightning_callback.py", "examples/train_function.py", "examples/distributed.py",
    }
    for script, lines in examples:
        in_script = {_code(line) for line in (ROOT / script).read_text().splitlines()}
        for line in lines:
            if _code(line) and not _code(line).startswith("#"):
                assert _code(line) in in_script, f"README line not in {script}: {line!r}"


def test_hugging_face_trainer(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _needs("transformers", "accelerate")
    from transformers import Trainer, TrainingArguments

    from examples import hf_trainer

    monkeypatch.setenv("REMAT_OPTIONS", json.dumps({"memory_budget": "8MiB", "inner_compiler": "eager"}))
    model = hf_trainer.main(str(tmp_path / "remat"))
    plans = remat.plans(model)
    assert plans and all(p.budget_bytes == 8 * 2**20 and p.inner_compiler == "eager" for p in plans)

    reference, data = hf_trainer.tiny_gpt2()
    Trainer(model=reference, args=TrainingArguments(str(tmp_path / "eager"), **hf_trainer.SMALL), train_dataset=data).train()
    untrained, _ = hf_trainer.tiny_gpt2()
    assert not torch.equal(reference.lm_head.weight, untrained.lm_head.weight)  # the steps did train
    _assert_same_weights(model, reference)


def test_hugging_face_trainer_unknown_option_in_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _needs("transformers", "accelerate")
    from examples import hf_trainer

    monkeypatch.setenv("REMAT_OPTIONS", '{"memroy_budget": "8MiB"}')
    with pytest.raises(Exception) as info:
        hf_trainer.main(str(tmp_path))
    error = getattr(info.value, "inner_exception", info.value)
    assert isinstance(error, ValueError), repr(info.value)
    assert str(error).startswith("unknown remat option 'memroy_budget'")
    assert str(error).endswith("(options from the environment variable REMAT_OPTIONS)")


def test_lightning_callback() -> None:
    _needs("lightning")
    import lightning.pytorch as L

    from examples import lightning_callback

    model = lightning_callback.main()
    (plan,) = remat.plans(model.net)
    assert plan.budget_bytes == 2**20 and plan.inner_compiler == "eager"
    assert not internals.is_compiled(model.net)  # eager again after fitting
    assert list(model.state_dict()) == ["net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"]

    reference = lightning_callback.Regression()
    L.Trainer(**lightning_callback.CPU_RUN).fit(reference, lightning_callback.data())
    assert not torch.equal(reference.net[0].weight, lightning_callback.Regression().net[0].weight)
    _assert_same_weights(model, reference)


def test_lightning_callback_bad_option_fails_when_made() -> None:
    _needs("lightning")
    from remat.integrations.lightning import Remat

    with pytest.raises(ValueError, match="unknown remat option 'memroy_budget'"):
        Remat(memroy_budget="1MiB")


def test_train_function_example() -> None:
    from examples import train_function

    model = train_function.train()
    (plan,) = remat.plans(model)
    assert plan.budget_bytes == 2**20
    assert not internals.is_compiled(model)
    reference = train_function.train.__wrapped__()  # the same function, undecorated: eager
    _assert_same_weights(model, reference)
