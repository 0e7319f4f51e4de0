"""Write a forward or backward graph as a Python module a person can read and run.

The body is FX's readable printout (shapes as annotations, the model's source line
above each op); around it go the imports its code refers to and two tuples that say
what each argument and each result is, so the file runs on its own:

    from forward import Forward, INPUTS, OUTPUTS
    results = Forward()(*arguments)   # one tensor per name in INPUTS
"""

from __future__ import annotations

import math
import re
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch.fx as fx

from remat.planning import Partitioned


def _import_line(name: str, value: Any) -> str:
    """The line that binds ``name`` to ``value`` in a fresh module."""
    if isinstance(value, types.ModuleType):
        return f"import {value.__name__}" if value.__name__ == name else f"import {value.__name__} as {name}"
    if isinstance(value, float) and not math.isfinite(value):
        return f'{name} = float("{value}")'
    if value is type(None):
        return f"{name} = type(None)"
    module, qualname = getattr(value, "__module__", None), getattr(value, "__qualname__", "")
    if module and qualname and "." not in qualname and "<" not in qualname:
        return f"from {module} import {qualname}" + ("" if qualname == name else f" as {name}")
    raise ValueError(f"the graph's code refers to {name} = {value!r}, which cannot be imported by name")


def _tuple(name: str, values: Sequence[str | None]) -> str:
    return "\n".join([f"{name} = (", *(f"    {value!r}," for value in values), ")"])


def graph_source(
    gm: fx.GraphModule,
    class_name: str,
    doc: str,
    inputs: Sequence[str],
    outputs: Sequence[str | None],
) -> str:
    """The module text: ``doc`` as its docstring, ``INPUTS``/``OUTPUTS`` naming each
    argument and result of ``class_name().forward``."""
    body = gm.print_readable(print_output=False)
    body = re.sub(r"^class \w+\(torch\.nn\.Module\):", f"class {class_name}(torch.nn.Module):", body, count=1)
    used = gm.graph.python_code(root_module="self").globals
    imports = sorted({_import_line(name, value) for name, value in used.items() if re.search(rf"\b{name}\b", body)})
    return "\n".join(
        [
            f'"""{doc}"""',
            "",
            *imports,
            "",
            _tuple("INPUTS", inputs),
            _tuple("OUTPUTS", outputs),
            "",
            "",
            body.rstrip(),
            "",
        ]
    )


def _names(values: Sequence[Any]) -> list[str | None]:
    return [v.name if isinstance(v, fx.Node) else None if v is None else repr(v) for v in values]


def write_step(out_dir: Path, graphs: Partitioned) -> tuple[Path, Path]:
    """``forward.py`` and ``backward.py`` of one partitioned step, in ``out_dir``."""
    forward_outputs = _names(graphs.forward.graph.find_nodes(op="output")[0].args[0])
    user, saved = forward_outputs[: graphs.num_fwd_outputs], forward_outputs[graphs.num_fwd_outputs :]
    backward_inputs = [n.name for n in graphs.backward.graph.find_nodes(op="placeholder")]
    gradients = graphs.backward.graph.find_nodes(op="output")[0].args[0]
    backward_outputs = [
        None if grad is None else f"grad of {name}" for grad, name in zip(gradients, graphs.input_names, strict=True)
    ]
    forward = out_dir / "forward.py"
    forward.write_text(
        graph_source(
            graphs.forward,
            "Forward",
            "The forward graph remat planned: one training step's forward pass.\n\n"
            "INPUTS names each argument (a parameter or buffer of the model by its qualified name, or\n"
            f"example_inputs[i]); it returns OUTPUTS: the step's {len(user)} output(s), then the\n"
            f"{len(saved)} value(s) kept for the backward (backward.py takes them by these names).\n",
            graphs.input_names,
            forward_outputs,
        )
    )
    backward = out_dir / "backward.py"
    backward.write_text(
        graph_source(
            graphs.backward,
            "Backward",
            "The backward graph remat planned: it recomputes what the forward did not keep.\n\n"
            "INPUTS names each argument: values forward.py returns under the same names, then\n"
            "tangents_k, the gradient of the loss with respect to the forward's k-th output.\n"
            "It returns the gradient of each forward input (OUTPUTS; None where none is needed).\n",
            backward_inputs,
            backward_outputs,
        )
    )
    return forward, backward
