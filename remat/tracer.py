"""Capture the joint forward+backward graph with AOTAutograd and hand it to a partitioner.

AOTAutograd traces Dynamo's graph with fake tensors (``node.meta["val"]``), applies
Inductor's decompositions (the same for both inner compilers, so a plan does not
depend on how the graphs run), calls the partitioner on the joint graph, and compiles
the resulting forward and backward graphs with the inner compiler. Before anything
else touches the joint graph, the values named with ``remat.tag`` are marked
(``tags.mark_tagged_values``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch.fx as fx

from remat import _torch_internals as internals
from remat.tags import mark_tagged_values

INNER_COMPILERS: dict[str, Callable[..., Callable[..., Any]]] = {
    "inductor": internals.compile_inductor,
    "eager": internals.compile_eager,
}


def compile_joint(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    partition_fn: internals.PartitionFn,
    inner_compiler: str,
) -> Callable[..., Any]:
    """Trace ``gm`` into a joint graph, partition it with ``partition_fn``, compile both halves."""
    return INNER_COMPILERS[inner_compiler](gm, example_inputs, partition_fn, joint_pass=mark_tagged_values)
