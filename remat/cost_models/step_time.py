"""How long each node of a training step takes where it runs: op by op, or as Inductor
compiles it.

Op by op (the eager inner compiler) a node costs its estimate (``runtime``). Inductor
generates kernels instead (``fusion``): a value it inlines is computed inside the
kernels that read it, never written to memory and never read back, and a generated
kernel moves only the stored values it loads and the value it stores. So under
Inductor recomputing a pointwise op costs about its arithmetic, while keeping a value
for the backward that would otherwise be inlined costs a write in the forward and a
read in the backward. Priced op by op it is the other way round: on the U-Net the
budgeted solver chose plans that recompute convolutions rather than GroupNorm's
arithmetic, and they measured 1.2x slower than PyTorch's (issue 4). Extern kernels
(matmul, convolution, attention, ops without a lowering) cost their estimate either way.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.fx as fx

from remat.cost_models.devices import DeviceProfile
from remat.cost_models.fusion import Fusion
from remat.cost_models.runtime import Estimator, first_touch_seconds, value_span_bytes, vector_flops
from remat.cost_models.sizes import value_bytes


def estimator_profile(seconds: Estimator) -> DeviceProfile | None:
    """The device profile behind an estimator (``runtime.make_estimator`` sets one),
    which prices the kernels Inductor generates; None for a bare callable."""
    return getattr(seconds, "profile", None)


def kernel_seconds(nodes: Sequence[fx.Node], fusion: Fusion, seconds: Estimator, profile: DeviceProfile) -> list[float]:
    """Seconds of each of one graph's ``nodes`` as Inductor compiles it (``fusion``).

    A generated kernel runs at the roofline of its own arithmetic and of the bytes it
    loads (stored values; those computed in the same fused kernel are not loaded) and
    stores (nothing, when its value stays inside its fused kernel), plus the per-op
    overhead once per fused kernel. An inlined value costs its arithmetic. Anything
    else (extern kernels, views) costs ``seconds``."""
    result = []
    for node in nodes:
        if node in fusion.loads:
            loaded = sum(value_span_bytes(value) for value in fusion.loads[node] if value not in fusion.inlined)
            stored = 0 if node in fusion.inlined else value_bytes(node)
            compute = vector_flops(node) / profile.vector_flops
            memory = (loaded + stored) / profile.memory_bandwidth
            faults = first_touch_seconds(node, profile) if stored else 0.0
            overhead = 0.0 if node in fusion.runs_with else profile.op_overhead_s
            result.append(max(compute, memory) + faults + overhead)
        elif node in fusion.inlined:
            result.append(vector_flops(node) / profile.vector_flops)
        else:
            result.append(seconds(node))
    return result


def position_seconds(
    forward: Sequence[fx.Node],
    backward: Sequence[fx.Node],
    seconds: Estimator,
    fusions: Sequence[Fusion] | None,
) -> list[float]:
    """Seconds of each position of a step's timeline (the forward's nodes, then the
    backward's): as Inductor compiles the two graphs where ``fusions`` (the forward's
    and the backward's) says how and the estimator has a device profile, else op by op."""
    profile = estimator_profile(seconds)
    if fusions is None or profile is None:
        return [seconds(n) for n in (*forward, *backward)]
    forward_fusion, backward_fusion = fusions
    return [
        *kernel_seconds(forward, forward_fusion, seconds, profile),
        *kernel_seconds(backward, backward_fusion, seconds, profile),
    ]
