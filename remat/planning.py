"""``remat.plan``: the Plan a model would get, without running a training step.

Dynamo captures the model as ``torch.compile`` would (whole, ``fullgraph=True``: a
plan is for one graph), AOTAutograd traces the joint graph and remat partitions it;
then the compiled function stops instead of running, so no forward or backward is
computed. The graphs are traced with Inductor's decompositions and partitioned as
with the eager inner compiler; the Plan's ``memory`` is the simulated timeline of a
step run op by op.
"""

from __future__ import annotations

import itertools
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


def plan(
    model: torch.nn.Module | Callable[..., Any],
    *example_inputs: Any,
    dynamic: bool | None = None,
    **options: Any,
) -> Plan:
    """The Plan ``torch.compile(model, backend="remat", options=options)`` would make
    for ``model(*example_inputs)``: decisions, predicted memory timeline and peak.

    ``dynamic=True`` keeps shapes symbolic: ``Plan.symbols`` names the input dimension
    behind each symbol and ``Plan.evaluate`` gives the bytes at other sizes. Raises
    ``ValueError`` when nothing needs a gradient (there is no backward to plan).
    """
    if not callable(model):
        raise TypeError(f"remat.plan takes an nn.Module or a function; got {type(model).__name__}")
    opts = RematOptions.from_mapping(options)
    made: list[Plan] = []

    def planning_backend(gm: fx.GraphModule, inputs: Sequence[Any]) -> Callable[..., NoReturn]:
        partitioner = RematPartitioner(opts, graph_name=f"plan_{next(_plan_ids)}", on_plan=made.append)
        tracer.compile_joint(gm, inputs, partitioner, "eager")
        return _stop

    compiled = torch.compile(model, backend=planning_backend, fullgraph=True, dynamic=dynamic)
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
    return made[-1]
