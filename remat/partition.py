"""Partition the joint graph into forward and backward graphs, and record the Plan.

remat's min-cut decides what the backward keeps; PyTorch's partitioner machinery
builds the two graphs from that decision. If planning fails, the graph falls back to
PyTorch's default partition with one warning (or raises, if the user asked), so a
training run never breaks because of the planner.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch.fx as fx

from remat import _torch_internals as internals
from remat.options import RematOptions
from remat.passes.budget import InfeasibleBudget
from remat.passes.conv_input_layout import make_conv_inputs_channels_last
from remat.passes.gradient_slices import copy_out_waiting_slices
from remat.passes.upsample_gradients import nearest_upsample_gradients
from remat.passes.weight_gradients import weight_gradients_first
from remat.passes.remat import MinCutResult, solve_min_cut
from remat.cost_models.fusion import Fusion
from remat.cost_models.memory import step_fusions
from remat.cost_models.runtime import make_estimator
from remat.cost_models.sizes import graph_device
from remat.passes.offload_graph import Offloaded, insert_offloads
from remat.offloading import OffloadChoice, choose_offloads, host_bandwidth
from remat.solver import BudgetedChoice, choose_saved, fused_model, uses_solver
from remat.plan import (
    MemoryPrediction,
    Plan,
    decisions_from_graphs,
    estimate_time,
    predict_fused_memory,
    predict_memory,
    saved_activation_size,
)
from remat.warning_site import user_stacklevel

log = logging.getLogger("remat")
POOL_TOLERANCE = 0.01


class RematFallbackWarning(UserWarning):
    """Planning failed on a graph; PyTorch's default partition was used instead."""


class RematOffloadWarning(UserWarning):
    """Offloading was asked for where it cannot lower the peak (a graph on the CPU)."""


class RematPartitioner:
    """A ``partition_fn`` for AOTAutograd that hands each graph's Plan to ``on_plan``."""

    def __init__(self, options: RematOptions, graph_name: str, on_plan: Callable[[Plan], None]) -> None:
        self.options = options
        self.graph_name = graph_name
        self.on_plan = on_plan

    def __call__(
        self,
        joint_module: fx.GraphModule,
        joint_inputs: Sequence[Any],
        *,
        num_fwd_outputs: int,
        **kwargs: Any,
    ) -> tuple[fx.GraphModule, fx.GraphModule]:
        results: list[MinCutResult | BudgetedChoice] = []
        offloads: list[OffloadChoice | None] = []

        def choose(graph: fx.Graph, info: internals.JointInfo) -> list[fx.Node]:
            if uses_solver(self.options):
                choice = choose_saved(graph, info, num_fwd_outputs, self.options, self.graph_name)
                results.append(choice)
                offloads.append(choice.offload)
            else:
                results.append(solve_min_cut(graph, info))
                offloads.append(choose_offloads(graph, results[-1].saved, num_fwd_outputs, self.options, fused_model(self.options)))
            return results[-1].saved

        try:
            rewritten = nearest_upsample_gradients(joint_module.graph, any_layout=self.options.inner_compiler == "inductor")
            reordered = weight_gradients_first(joint_module.graph)
            if copy_out_waiting_slices(joint_module.graph) or reordered or rewritten:
                joint_module.recompile()
            fw, bw = internals.partition_with(
                choose, joint_module, joint_inputs, num_fwd_outputs=num_fwd_outputs, **kwargs
            )
            offload = offloads[-1] if offloads else None
            moved = self._offload(fw, bw, num_fwd_outputs, offload) if offload and offload.offloaded else None
            plan = self._plan(fw, bw, num_fwd_outputs, results[-1] if results else None, offload=offload, moved=moved)
            # after the predictions: the fused model counts the value once either way
            # (Fusion.made_channels_last), and op by op the graphs are the solver's
            if fused_model(self.options) and make_conv_inputs_channels_last(fw.graph, bw.graph):
                bw.recompile()
        except Exception as error:
            if self.options.on_plan_failure == "raise" or isinstance(error, InfeasibleBudget):
                raise
            reason = f"{type(error).__name__}: {error}"
            warnings.warn(
                f"remat could not plan graph {self.graph_name} ({reason}); using PyTorch's "
                "default partition for it. Training goes on; pass "
                "options={'on_plan_failure': 'raise'} to see the error.",
                RematFallbackWarning,
                stacklevel=user_stacklevel(),
            )
            log.debug("remat planning failed on %s", self.graph_name, exc_info=True)
            fw, bw = internals.pytorch_default_partition(
                joint_module, joint_inputs, num_fwd_outputs=num_fwd_outputs, **kwargs
            )
            try:
                plan = self._plan(fw, bw, num_fwd_outputs, None, fallback_reason=reason)
            except Exception:  # describing the fallback must not stop training either
                log.debug("remat could not describe the fallback of %s", self.graph_name, exc_info=True)
                plan = Plan(
                    graph=self.graph_name,
                    inner_compiler=self.options.inner_compiler,
                    partitioner="pytorch-default",
                    decisions=[],
                    saved_bytes=0,
                    options=self.options.to_dict(),
                    fallback_reason=f"{reason} (the fallback's decisions could not be listed)",
                )
        self.on_plan(plan)
        return fw, bw

    def _offload(self, fw: fx.GraphModule, bw: fx.GraphModule, num_fwd_outputs: int, offload: OffloadChoice) -> Offloaded:
        device = graph_device(fw.graph)
        if device.type == "cpu":
            warnings.warn(
                f"remat offloads {len(offload.offloaded)} value(s) of graph {self.graph_name} to host memory as asked, "
                "but the graph runs on the CPU, whose memory is the host's: the copies free nothing and add to the "
                "peak and the step time. Offloading lowers the peak on CUDA devices; on a CPU leave 'offload' False "
                "(or 'auto', which offloads nothing there) and set a memory_budget.",
                RematOffloadWarning,
                stacklevel=user_stacklevel(),
            )
        estimator = make_estimator(self.options.time_estimator, device)
        return insert_offloads(
            fw, bw, num_fwd_outputs, set(offload.offloaded), estimator, host_bandwidth(self.options, device)
        )

    def _plan(
        self,
        fw: fx.GraphModule,
        bw: fx.GraphModule,
        num_fwd_outputs: int,
        cut: MinCutResult | BudgetedChoice | None,
        fallback_reason: str | None = None,
        offload: OffloadChoice | None = None,
        moved: Offloaded | None = None,
    ) -> Plan:
        budgeted = cut if isinstance(cut, BudgetedChoice) else None
        if fallback_reason is not None:
            keep_reasons, default = {}, "chosen by PyTorch's default partitioner (fallback)"
        elif cut is None:
            keep_reasons, default = {}, "no forward value feeds the backward: nothing to decide"
        elif budgeted is not None:
            keep_reasons = budgeted.reasons
            default = "needed by the backward and not recomputable from the other kept values"
        else:
            keep_reasons = {name: f"cannot be recomputed: {why}" for name, why in cut.banned.items()}
            default = "min-cut: part of the cheapest set of values to keep"
        if offload is not None:
            keep_reasons = {
                **keep_reasons,
                **{name: f"{keep_reasons.get(name, default)}; not offloaded: {why}" for name, why in offload.refused.items()},
                **offload.offloaded,
            }
        saved = saved_activation_size(fw, num_fwd_outputs)
        memory, fused_memory, time_s, estimator, fusions = self._estimates(fw, bw, num_fwd_outputs)
        buffer_pool, fused_memory = self._buffer_pool(
            fw, bw, num_fwd_outputs, fused_memory, fusions, budgeted.budget_bytes if budgeted else None
        )
        if buffer_pool is not None:
            fw.meta[internals.BUFFER_POOL_META] = buffer_pool
        plan = Plan(
            graph=self.graph_name,
            inner_compiler=self.options.inner_compiler,
            partitioner=_partitioner_name(fallback_reason, budgeted),
            decisions=decisions_from_graphs(fw, bw, num_fwd_outputs, keep_reasons, default),
            saved_bytes=saved.hint,
            options=self.options.to_dict(),
            memory=memory,
            fallback_reason=fallback_reason,
            saved_bytes_expr=str(saved.expr),
            symbols=internals.symbol_sources(fw.graph),
            estimated_time_s=time_s,
            time_estimator=estimator,
            budget_bytes=budgeted.budget_bytes if budgeted else None,
            segments=budgeted.groups if budgeted else [],
            solve_seconds=budgeted.solve_seconds if budgeted else None,
            fused_memory=fused_memory,
            offloaded_bytes=moved.nbytes if moved else 0,
            host_peak_bytes=offload.host_peak_bytes if moved and offload else 0,
            transfer_s=moved.schedule.transfer_s if moved else None,
            exposed_transfer_s=moved.schedule.exposed_s if moved else None,
            buffer_pool=buffer_pool,
        )
        log.info("%s", plan.summary())
        return plan

    def _estimates(self, fw: fx.GraphModule, bw: fx.GraphModule, num_fwd_outputs: int) -> tuple[
        MemoryPrediction | None, MemoryPrediction | None, float | None, str | None, list[Fusion] | None
    ]:
        """Predicted memory (op by op, and under Inductor's fusion) and time, and the
        fusion model's view of the two graphs that the fused ones share. They describe
        the partition, they do not make it: if the cost models fail, the Plan goes
        without them and the partition stands."""
        try:
            fusions = step_fusions(fw.graph, bw.graph)
            memory = predict_memory(fw, bw, num_fwd_outputs)
            fused_memory = predict_fused_memory(fw, bw, num_fwd_outputs, fusions)
            time_s, estimator = estimate_time(fw, bw, self.options.time_estimator, fused_model(self.options), fusions)
        except Exception as error:
            log.warning(
                "remat could not estimate the memory and time of graph %s (%s: %s); its Plan has no predictions",
                self.graph_name, type(error).__name__, error,
            )
            log.debug("remat cost model failure", exc_info=True)
            return None, None, None, None, None
        return memory, fused_memory, time_s, estimator, fusions

    def _buffer_pool(
        self,
        fw: fx.GraphModule,
        bw: fx.GraphModule,
        num_fwd_outputs: int,
        fused_memory: MemoryPrediction | None,
        fusions: list[Fusion] | None,
        budget_bytes: int | None,
    ) -> tuple[bool | None, MemoryPrediction | None]:
        """Whether Inductor's wrapper may pool freed buffers for these graphs, and the
        fused prediction of the step as it will then run. The pool's holds may raise a
        peak (the plan is made without them); they save allocator calls
        (``benchmarks/buffer_pool.py``: a U-Net plan ran 1.024x PyTorch's time without
        them and 1.000x with them on the CPU). So the pool stays where its simulated
        peak fits the memory budget, or is no higher than without it (a budget that no
        plan meets), or without a budget, where it raises the peak by at most
        ``POOL_TOLERANCE``. None: not compiled by Inductor, or not predicted (Inductor's
        default then stands)."""
        if self.options.inner_compiler != "inductor" or fused_memory is None:
            return None, fused_memory
        try:
            pooled = predict_memory(fw, bw, num_fwd_outputs, fused=True, buffer_pool=True, fusions=fusions)
        except Exception:  # a prediction, not a decision the partition needs
            log.debug("remat could not simulate Inductor's buffer pool on %s", self.graph_name, exc_info=True)
            return None, fused_memory
        if budget_bytes is not None:
            fits = pooled.peak_bytes + pooled.resident_bytes <= budget_bytes
            keep = fits or pooled.peak_bytes <= fused_memory.peak_bytes
        else:
            keep = pooled.peak_bytes <= fused_memory.peak_bytes * (1 + POOL_TOLERANCE)
        return keep, pooled if keep else fused_memory


def _partitioner_name(fallback_reason: str | None, budgeted: BudgetedChoice | None) -> str:
    if fallback_reason:
        return "pytorch-default"
    return "remat-budget" if budgeted is not None else "remat-min-cut"
