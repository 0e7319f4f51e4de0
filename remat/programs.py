"""Load what the CLI plans: a program saved with ``torch.export.save``, or a factory.

A saved program carries its example inputs, which give the shapes to plan for; a
factory (``package.module:function``) returns ``(model, example_inputs)``. Every failure
is a ``ProgramError`` whose message says what is wrong and what to do, so the CLI can
print it as one line.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

_FACTORY = re.compile(r"([A-Za-z_][\w.]*):([A-Za-z_][\w.]*)")
_SAVE_HINT = "save one with torch.export.save(torch.export.export(model, example_inputs), 'model.pt2')"


class ProgramError(Exception):
    """The program cannot be loaded; the message says why and what to do."""


@dataclass(frozen=True)
class Program:
    """A model and the inputs of one step, and where they came from."""

    model: Callable[..., Any]
    example_inputs: tuple[Any, ...]
    source: str


def load(spec: str) -> Program:
    """``spec`` is a ``.pt2`` path, or ``module:factory`` when no such file exists."""
    if not os.path.exists(spec) and _FACTORY.fullmatch(spec):
        return _load_factory(spec)
    return _load_saved(spec)


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """``torch.export.load`` logs a traceback before raising on a foreign file; the
    error it raises is reported instead (with ``--debug``, with its traceback)."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def _load_saved(path: str) -> Program:
    if not os.path.exists(path):
        raise ProgramError(
            f"{path}: no such file. Give a program saved with torch.export.save (.pt2), "
            "or module:factory naming a function that returns (model, example_inputs)"
        )
    if os.path.isdir(path):
        raise ProgramError(f"{path} is a directory, not a program saved with torch.export.save; {_SAVE_HINT}")
    try:
        with _quiet("torch.export"):
            program = torch.export.load(path)
    except Exception as error:
        raise ProgramError(
            f"{path} is not a program saved with torch.export.save ({_first_line(error)}); {_SAVE_HINT}"
        ) from error
    if program.example_inputs is None:
        raise ProgramError(
            f"{path} was saved without example inputs, which give the shapes to plan for: export it with "
            "torch.export.export(model, example_inputs) and save that program, or pass module:factory "
            "returning (model, example_inputs)"
        )
    args, kwargs = program.example_inputs
    if kwargs:
        raise ProgramError(
            f"{path} takes keyword inputs ({', '.join(sorted(kwargs))}); remat plans positional inputs only: "
            "export with every input passed by position, or pass module:factory"
        )
    return Program(program.module(), tuple(args), path)


def _load_factory(spec: str) -> Program:
    module_name, attribute = spec.split(":", 1)
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` would: factories next to the user
    try:
        factory: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            factory = getattr(factory, part)
    except (ImportError, AttributeError) as error:
        raise ProgramError(
            f"cannot load {spec} ({_first_line(error)}): run remat where {module_name} can be imported "
            "(its directory, or on PYTHONPATH) and check the function's name"
        ) from error
    try:
        made = factory()
    except Exception as error:
        raise ProgramError(
            f"factory {spec} raised {_first_line(error)}; fix it so that it returns (model, example_inputs) "
            "(--debug shows the traceback)"
        ) from error
    if not (isinstance(made, (tuple, list)) and len(made) == 2 and callable(made[0])):
        raise ProgramError(
            f"factory {spec} returned {type(made).__name__}; it must return (model, example_inputs), "
            "example_inputs a tuple of the tensors of one call"
        )
    model, inputs = made
    inputs = (inputs,) if isinstance(inputs, torch.Tensor) else inputs
    if not isinstance(inputs, (tuple, list)):
        raise ProgramError(
            f"factory {spec} returned example inputs of type {type(inputs).__name__}; "
            "return a tuple of the tensors of one call"
        )
    return Program(model, tuple(inputs), spec)
