"""``remat.plan``: the Plan a model would get, without running a training step.

Dynamo captures the model as ``torch.compile`` would (whole, ``fullgraph=True``: a
plan is for one graph), AOTAutograd traces the joint graph and remat partitions it;
then the compiled function stops instead of running, so no forward or backward is
computed. The graphs are traced with Inductor's decompositions and partitioned for the
inner compiler of the options (its memory model: Inductor's fusion, or op by op), but
Inductor's own joint-graph passes are not run (they can change a few decisions); the
Plan's ``memory`` is the simulated timeline of a step run op by op, ``fused_memory``
that of the same graphs compiled by Inductor.

Dynamo files compiled code under the code object of the function it starts from.
Each plan starts from a function with a code object of its own, so its entries go
when it goes: planning never uses up the recompile limit of code that the user
compiles later (``nn.Module`` calls share one code object in Dynamo).
"""

from __future__ import annotations

import itertools
import re
import types
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import torch
import torch.fx as fx

from remat import tracer
from remat.options import RematOptions
from remat.partition import RematPartitioner
from remat.plan import Plan

_plan_ids = itertools.count()


class _Planned(Exception):
    """Raised by the stand-in for the compiled graph: planning is done, run nothing."""


def _stop(*args: Any) -> NoReturn:
    raise _Planned


def _entry_point(model: Callable[..., Any], name: str) -> Callable[..., Any]:
    """``model(*args)`` behind a code object made for this plan alone."""

    def call(*args: Any) -> Any:
        return model(*args)

    code = call.__code__.replace(co_name=name)
    return types.FunctionType(code, call.__globals__, name, call.__defaults__, call.__closure__)


def plan(
    model: torch.nn.Module | Callable[..., Any],
    *example_inputs: Any,
    dynamic: bool | None = None,
    **options: Any,
) -> Plan:
    """The Plan ``torch.compile(model, backend="remat", options=options)`` would make
    for ``model(*example_inputs)``: decisions, predicted memory timeline and peak,
    estimated step time.

    ``dynamic=True`` keeps shapes symbolic: ``Plan.symbols`` names the input dimension
    behind each symbol and ``Plan.evaluate`` gives the bytes at other sizes. Raises
    ``ValueError`` when nothing needs a gradient (there is no backward to plan).
    """
    if not callable(model):
        raise TypeError(f"remat.plan takes an nn.Module or a function; got {type(model).__name__}")
    opts = RematOptions.from_mapping(options)
    name = f"plan_{next(_plan_ids)}"
    made: list[Plan] = []

    def planning_backend(gm: fx.GraphModule, inputs: Sequence[Any]) -> Callable[..., NoReturn]:
        partitioner = RematPartitioner(opts, graph_name=name, on_plan=made.append)
        tracer.compile_joint(gm, inputs, partitioner, "eager")
        return _stop

    compiled = torch.compile(_entry_point(model, name), backend=planning_backend, fullgraph=True, dynamic=dynamic)
    try:
        with torch.enable_grad():
            compiled(*example_inputs)
    except _Planned:
        pass
    if not made:
        raise ValueError(
            f"remat.plan found nothing to plan for this {type(model).__name__}: no parameter "
            "or input requires a gradient, so a step has no backward pass"
        )
    found = made[-1]
    # Dynamo names sources after the entry point's locals: L['args'][0] is example_inputs[0]
    found.symbols = {k: re.sub(r"L\['args'\]\[(\d+)\]", r"example_inputs[\1]", v) for k, v in found.symbols.items()}
    return found
