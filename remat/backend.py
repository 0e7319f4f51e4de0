"""The ``remat`` backend for torch.compile.

Registered through the ``torch_dynamo_backends`` entry point, so
``torch.compile(model, backend="remat", options={...})`` works without importing remat.
Without options (a framework that passes only the backend's name), the options come from
``REMAT_OPTIONS`` or ``REMAT_CONFIG`` (``remat.env_options``); options given in code win.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx

from remat import _torch_internals as internals
from remat import env_options, registry, tracer
from remat.compress.backward import CompressingPartitioner
from remat.options import RematOptions
from remat.partition import RematPartitioner
from remat.plan import Plan
from remat.solver import RematBudgetWarning
from remat.warning_site import user_stacklevel

_graph_ids = itertools.count()


def remat_backend(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    *,
    options: Mapping[str, Any] | RematOptions | None = None,
    mode: str | None = None,
) -> Callable[..., Any]:
    """Compile one Dynamo graph: joint trace, remat partition, inner compiler.

    ``options`` None or empty: those of the environment (``remat.env_options``)."""
    if mode not in (None, "default"):
        raise ValueError(
            f"the remat backend takes no torch.compile mode; got mode={mode!r}. "
            "Pass remat's settings as options={...} instead"
        )
    opts = env_options.resolve(options)
    parameters = internals.graph_parameters(gm, example_inputs)
    graph_name = f"graph_{next(_graph_ids)}"
    graph_break = internals.graph_break_reason(gm)

    def on_plan(plan: Plan) -> None:
        registry.record(parameters, plan)
        if graph_break is not None and opts.memory_budget is not None:
            _warn_budget_per_graph(graph_name, graph_break)

    partitioner: Callable[..., Any] = RematPartitioner(opts, graph_name=graph_name, on_plan=on_plan)
    if opts.compress is not None and opts.compress.compresses_backward:
        partitioner = CompressingPartitioner(partitioner, gm, example_inputs, opts.compress, graph_name)
    return tracer.compile_joint(gm, example_inputs, partitioner, opts.inner_compiler)


def _warn_budget_per_graph(graph_name: str, reason: str) -> None:
    """Each graph is planned on its own: where a graph break splits the step, what the
    graphs before it keep for their backward is live while the later ones run, on
    top of the budget each of them was planned for."""
    warnings.warn(
        f"remat's memory_budget bounds each graph it compiles, and graph {graph_name} ends at a graph break "
        f"({reason}): what it keeps for its backward stays in memory while the graphs after the break run, so "
        "the step's peak can pass the budget. Remove the graph break (torch.compile(..., fullgraph=True) "
        "raises where it is), or lower the budget to leave room for the other graphs",
        RematBudgetWarning,
        stacklevel=user_stacklevel(),
    )


def compile(  # noqa: A001 - mirrors torch.compile
    model: torch.nn.Module | Callable[..., Any],
    *,
    dynamic: bool | None = None,
    fullgraph: bool = False,
    **options: Any,
) -> Any:
    """``torch.compile(model, backend="remat", options=options)``, validated up front;
    without options, those of the environment (``remat.env_options``)."""
    opts = env_options.resolve(options)
    return torch.compile(
        model, backend=remat_backend, dynamic=dynamic, fullgraph=fullgraph, options=opts.to_dict()
    )
