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

import copy
import dataclasses
import itertools
import re
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn

import torch
import torch.fx as fx

from remat import _torch_internals as internals
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


@dataclasses.dataclass(frozen=True)
class Partitioned:
    """The forward and backward graphs of one partition of a traced step.

    Copies taken as the partitioner returned them, before an inner compiler changes
    their calling convention, so they print and run as plain graphs. ``input_names``
    says what each forward input is: a parameter or buffer of the model by its
    qualified name, or ``example_inputs[i]``."""

    forward: fx.GraphModule
    backward: fx.GraphModule
    num_fwd_outputs: int
    input_names: tuple[str, ...]


def _input_names(model: Callable[..., Any], example_inputs: Sequence[Any], graph_inputs: Sequence[Any]) -> tuple[str, ...]:
    """Names for the graph's inputs, matched by identity: Dynamo passes the model's own
    parameters and the caller's tensors."""
    names: dict[int, str] = {}
    if isinstance(model, torch.nn.Module):
        for name, value in itertools.chain(model.named_parameters(), model.named_buffers()):
            names.setdefault(id(value), name)
    for i, value in enumerate(example_inputs):
        names.setdefault(id(value), f"example_inputs[{i}]")
    return tuple(names.get(id(value), f"graph input {i}") for i, value in enumerate(graph_inputs))


def _copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy with nodes of its own (their ``meta`` too) and FX's plain calling convention."""
    graph = fx.Graph()
    copied = graph.graph_copy(gm.graph, {}, return_output_node=True)
    if copied is not None:
        value, output = copied  # type: ignore[misc]
        graph.output(value, type_expr=output.type).meta = copy.copy(output.meta)
    return fx.GraphModule(gm, graph)


def partition_step(
    model: torch.nn.Module | Callable[..., Any],
    example_inputs: Sequence[Any],
    partitioners: Sequence[internals.PartitionFn],
    *,
    dynamic: bool | None = None,
    on_partitioned: Callable[[int], None] | None = None,
    name: str | None = None,
) -> list[Partitioned]:
    """Trace one step of ``model(*example_inputs)`` once and partition its joint graph
    with each of ``partitioners``: a sweep over options costs one trace. Each but the
    last gets a copy of the joint graph (partitioning rewrites it). ``on_partitioned(i)``
    is called as partition ``i`` is done (for progress); ``name`` labels the trace.
    Returns nothing for a step with no backward (nothing requires a gradient)."""
    if not callable(model):
        raise TypeError(f"remat.plan takes an nn.Module or a function; got {type(model).__name__}")
    if not partitioners:
        raise ValueError("partition_step needs at least one partitioner")
    name = name or f"plan_{next(_plan_ids)}"
    done: list[Partitioned] = []

    def planning_backend(gm: fx.GraphModule, inputs: Sequence[Any]) -> Callable[..., NoReturn]:
        input_names = _input_names(model, example_inputs, inputs)

        def partition_each(joint: fx.GraphModule, joint_inputs: Sequence[Any], **kwargs: Any) -> tuple[fx.GraphModule, fx.GraphModule]:
            for i, partitioner in enumerate(partitioners):
                last = i == len(partitioners) - 1
                fw, bw = partitioner(joint if last else _copy(joint), joint_inputs, **kwargs)
                done.append(Partitioned(_copy(fw), _copy(bw), kwargs["num_fwd_outputs"], input_names))
                if on_partitioned is not None:
                    on_partitioned(i)
            return fw, bw

        tracer.compile_joint(gm, inputs, partition_each, "eager")
        return _stop

    compiled = torch.compile(_entry_point(model, name), backend=planning_backend, fullgraph=True, dynamic=dynamic)
    try:
        with torch.enable_grad():
            compiled(*example_inputs)
    except _Planned:
        pass
    return done


def plan_each(
    model: torch.nn.Module | Callable[..., Any],
    example_inputs: Sequence[Any],
    options: Sequence[Mapping[str, Any] | RematOptions],
    *,
    dynamic: bool | None = None,
    on_partitioned: Callable[[int], None] | None = None,
) -> list[tuple[Plan, Partitioned]]:
    """The Plan (and graphs) for each of ``options``, from one trace of the step.
    Options are validated before any tracing."""
    checked = [RematOptions.from_mapping(o) for o in options]
    name = f"plan_{next(_plan_ids)}"
    made: list[Plan] = []
    partitioners = [RematPartitioner(opts, graph_name=name, on_plan=made.append) for opts in checked]
    graphs = partition_step(
        model, example_inputs, partitioners, dynamic=dynamic, on_partitioned=on_partitioned, name=name
    )
    if not made:
        raise ValueError(
            f"remat.plan found nothing to plan for this {type(model).__name__}: no parameter "
            "or input requires a gradient, so a step has no backward pass"
        )
    for found in made:
        # Dynamo names sources after the entry point's locals: L['args'][0] is example_inputs[0]
        found.symbols = {k: re.sub(r"L\['args'\]\[(\d+)\]", r"example_inputs[\1]", v) for k, v in found.symbols.items()}
    return list(zip(made, graphs, strict=True))


def plan(
    model: torch.nn.Module | Callable[..., Any],
    *example_inputs: Any,
    dynamic: bool | None = None,
    **options: Any,
) -> Plan:
    """The Plan ``torch.compile(model, backend="remat", options=options)`` would make
    for ``model(*example_inputs)``: decisions, predicted memory timeline and peak,
    estimated step time.

    The step is traced as the eager inner compiler traces it, not through Inductor's
    compile. Under ``inner_compiler="inductor"`` the joint graph that the compile
    partitions can differ a little, and so can its Plan: on the demo's GPT this one
    keeps 70 values where the compile keeps 91. ``remat.explain(model)`` after a
    training call shows the Plan the compile made.

    ``dynamic=True`` keeps shapes symbolic: ``Plan.symbols`` names the input dimension
    behind each symbol and ``Plan.evaluate`` gives the bytes at other sizes. Raises
    ``ValueError`` when nothing needs a gradient (there is no backward to plan).
    """
    return plan_each(model, example_inputs, [options], dynamic=dynamic)[0][0]
