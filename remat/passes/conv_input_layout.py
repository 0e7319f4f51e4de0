"""Make a backward's convolution inputs channels-last where they are made.

remat compiles a CPU backward without Inductor's layout optimization
(``fusion.lays_out_channels_last``), but the backward reads its forward's channels-last
weights, and Inductor's convolution lowerings then want their inputs channels-last
too. A value a generated kernel computes in another layout, such as a recomputed
upsampling (an indexing op, contiguous in its fake tensor), is stored in that layout
and copied to channels-last in the same kernel, once for each convolution that reads
it (``fusion._weight_layout_copies``). Where only convolutions read it, this pass puts
``clone(memory_format=torch.channels_last)`` between the value and them: Inductor
computes the value inside the clone's kernel and stores it once, channels-last, as
each convolution read it before. The values are the same and so are the
convolutions' inputs, so the gradients are bit-identical.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from remat.cost_models.memory import graph_fusion
from remat.passes.fake_values import derive_value

aten = torch.ops.aten


def make_conv_inputs_channels_last(forward: fx.Graph, backward: fx.Graph) -> int:
    """Give each value of ``backward`` that only convolutions read and copy
    (``Fusion.made_channels_last``) a channels-last clone for them; how many."""
    values = graph_fusion(backward, forward).made_channels_last
    for value in [node for node in backward.nodes if node in values]:
        with backward.inserting_after(value):
            clone = backward.call_function(aten.clone.default, (value,), {"memory_format": torch.channels_last})
        derive_value(clone)
        value.replace_all_uses_with(clone, delete_user_cb=lambda user: user is not clone)
    return len(values)
