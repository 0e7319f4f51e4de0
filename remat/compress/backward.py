"""The backend's side of gradient compression: after the partition, route each parameter
gradient of the backward graph into its slot (``remat.passes.compress``).

Which output is which parameter: AOTAutograd's backward returns one gradient per forward
input, in the order of Dynamo's example inputs, and Dynamo passes parameters as inputs.
When that does not hold for a graph (the count or a shape differs), nothing is
compressed and a warning says so: a dense gradient is never replaced by a guess.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx

from remat import _torch_internals as internals
from remat.compress import slots
from remat.compress.settings import CompressOptions, matching_pattern
from remat.compress.slots import RematCompressWarning
from remat.passes.compress import gradient_outputs, store_gradients
from remat.warning_site import user_stacklevel


class CompressingPartitioner:
    """A ``partition_fn`` that partitions with ``partition_fn``, then makes the backward
    hand every compressible parameter gradient to its slot."""

    def __init__(
        self,
        partition_fn: internals.PartitionFn,
        gm: fx.GraphModule,
        example_inputs: Sequence[Any],
        options: CompressOptions,
        graph_name: str,
    ) -> None:
        self.partition_fn = partition_fn
        self.inputs = list(example_inputs)
        self.names = internals.input_names(gm)
        self.options = options
        self.graph_name = graph_name

    def __call__(self, joint_module: fx.GraphModule, joint_inputs: Sequence[Any], **kwargs: Any) -> tuple[fx.GraphModule, fx.GraphModule]:
        fw, bw = self.partition_fn(joint_module, joint_inputs, **kwargs)
        keys = self._keys(gradient_outputs(bw.graph))
        if keys:
            store_gradients(bw.graph, keys, torch.ops.remat.store_gradient.default)
            bw.recompile()
        return fw, bw

    def _keys(self, grads: list[fx.Node | None]) -> dict[int, int]:
        """Backward output index -> slot key, for each gradient to compress."""
        if len(grads) != len(self.inputs) or len(self.names) != len(self.inputs):
            self._warn(f"its backward returns {len(grads)} gradients for {len(self.inputs)} inputs")
            return {}
        keys: dict[int, int] = {}
        matched: set[str] = set()
        for index, (value, grad, name) in enumerate(zip(self.inputs, grads, self.names, strict=True)):
            if not isinstance(value, torch.nn.Parameter) or grad is None:
                continue
            name = name or f"input {index}"
            pattern = matching_pattern(name, self.options.exclude)
            if pattern is not None:
                matched.add(pattern)
                continue
            fake = grad.meta.get("val")
            if not isinstance(fake, torch.Tensor) or tuple(fake.shape) != tuple(value.shape):
                self._warn(f"the gradient of {name!r} does not have the parameter's shape {tuple(value.shape)}")
                return {}
            why = slots.why_not_compressible(value, self.options)
            if why is not None:
                if self.options.method != "powersgd":  # PowerSGD leaves vectors dense by design
                    self._warn(f"{name!r} stays dense: {why}", whole_graph=False)
                continue
            keys[index] = slots.register(value, name, self.options).key
        for pattern in self.options.exclude:
            if pattern not in matched:
                warnings.warn(
                    f"remat option compress exclude={list(self.options.exclude)!r}: pattern {pattern!r} matches "
                    f"no parameter of graph {self.graph_name}", RematCompressWarning, stacklevel=user_stacklevel(),
                )
        return keys

    def _warn(self, reason: str, whole_graph: bool = True) -> None:
        what = f"gradients of graph {self.graph_name} stay dense" if whole_graph else f"in graph {self.graph_name}"
        warnings.warn(f"remat compress: {what}: {reason}", RematCompressWarning, stacklevel=user_stacklevel())
