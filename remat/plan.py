"""The Plan: every keep/recompute decision for one compiled graph, and why.

The Plan is the contract between the planner and everything that reports on it
(``remat.explain``, the CLI, the tests). It is read off the forward and backward
graphs actually produced, so it describes what runs, and it round-trips through JSON.
"""

from __future__ import annotations

import dataclasses
import json
import operator
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import sympy
import torch.fx as fx

from remat.cost_models.fusion import Fusion
from remat.cost_models.memory import running_nodes, simulate_step, step_fusions
from remat.cost_models.runtime import make_estimator
from remat.cost_models.sizes import Size, graph_device, human_bytes, node_tensor, tensor_size, unique_storage_size
from remat.cost_models.step_time import position_seconds
from remat.passes.offload_graph import OFFLOAD
from remat.passes.recompute_rules import is_view
from remat.solver import module_path

Action = Literal["keep", "recompute", "offload"]


@dataclasses.dataclass(frozen=True)
class Decision:
    """One forward tensor the backward needs: kept on the device from the forward,
    recomputed in the backward, or offloaded to host memory in between."""

    tensor: str
    op: str
    shape: list[str]
    dtype: str
    bytes: int
    bytes_expr: str
    action: Action
    reason: str
    module: str = ""  # innermost module that made it (``blocks.0.attn``), "" for the top level


VIEW_REASON = "view: free to recompute"


@dataclasses.dataclass(frozen=True)
class MemoryPrediction:
    """The simulated memory of one step of this graph (``cost_models.memory``).

    peak_bytes: the most bytes live at once above ``resident_bytes`` (parameters,
        buffers and inputs, which exist before the step): what a step adds, as measured.
    peak_at: the node running at the peak, "forward:<node>" or "backward:<node>".
    positions, live_bytes: the whole timeline, one entry per node that runs.
    """

    peak_bytes: int
    resident_bytes: int
    peak_at: str
    positions: list[str]
    live_bytes: list[int]


@dataclasses.dataclass
class Plan:
    """Decisions for one graph. ``saved_bytes`` counts each kept storage once,
    leaving out parameters and inputs (and views of them), which live anyway.
    ``memory`` predicts a step run op by op (the eager inner compiler); under
    Inductor, fusion removes intermediates and kernels, so it overestimates.
    ``fused_memory`` predicts the memory of the same two graphs compiled by Inductor,
    whose fused kernels store fewer intermediates (``cost_models.fusion``), whichever
    inner compiler this plan was made for. ``estimated_time_s`` is the step time as
    this plan's inner compiler runs it: op by op, or as Inductor fuses it
    (``cost_models.step_time``); ``time_estimator`` says which.

    With offloading: ``offloaded_bytes`` moved to host memory (``host_peak_bytes`` of
    host copies at once), ``transfer_s`` of copies in both directions, of which
    ``exposed_transfer_s`` the compute does not hide (estimates). ``memory`` frees an
    offloaded value after its last forward use; the device also waits for the copy to
    finish, which the solver's simulation accounts for.

    ``buffer_pool``: whether Inductor's wrapper may hold a freed buffer for a later
    one of its size; False where the simulator finds that its holds would raise the
    fused peak past the memory budget (and above the peak without them, where no plan
    meets the budget; without a budget, by more than 1%); ``fused_memory`` is the step
    with or without the pool, as it runs."""

    graph: str
    inner_compiler: str
    partitioner: Literal["remat-min-cut", "remat-budget", "pytorch-default"]
    decisions: list[Decision]
    saved_bytes: int
    options: dict[str, Any]
    memory: MemoryPrediction | None = None
    fallback_reason: str | None = None
    saved_bytes_expr: str = "0"
    symbols: dict[str, str] = dataclasses.field(default_factory=dict)
    estimated_time_s: float | None = None
    time_estimator: str | None = None
    budget_bytes: int | None = None
    segments: list[str] = dataclasses.field(default_factory=list)
    solve_seconds: float | None = None
    fused_memory: MemoryPrediction | None = None
    offloaded_bytes: int = 0
    host_peak_bytes: int = 0
    transfer_s: float | None = None
    exposed_transfer_s: float | None = None
    buffer_pool: bool | None = None

    def evaluate(self, expr: str, sizes: Mapping[str, int]) -> int:
        """A byte expression of this plan (``saved_bytes_expr``, a decision's
        ``bytes_expr``) at other input sizes. ``symbols`` says which input dimension
        each symbol stands for; ``sizes`` gives every symbol in ``expr`` a value."""
        parsed = sympy.sympify(expr, locals={name: sympy.Symbol(name) for name in self.symbols})
        missing = sorted(str(s) for s in parsed.free_symbols if str(s) not in sizes)
        if missing:
            raise ValueError(
                f"no value for {missing} in {expr!r}; give every symbol a size: "
                + ", ".join(f"{name} ({source})" for name, source in self.symbols.items())
            )
        return int(parsed.subs({sympy.Symbol(k): int(v) for k, v in sizes.items()}))

    @property
    def step_memory(self) -> MemoryPrediction | None:
        """The prediction a ``memory_budget`` is checked against: the two graphs as the
        inner compiler runs them (Inductor's fused kernels, or op by op)."""
        return self.fused_memory if self.inner_compiler == "inductor" else self.memory

    @property
    def kept(self) -> list[Decision]:
        return [d for d in self.decisions if d.action == "keep"]

    @property
    def recomputed(self) -> list[Decision]:
        return [d for d in self.decisions if d.action == "recompute"]

    @property
    def offloaded(self) -> list[Decision]:
        return [d for d in self.decisions if d.action == "offload"]

    def to_json(self, **dump_kwargs: Any) -> str:
        return json.dumps(dataclasses.asdict(self), **dump_kwargs)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        data = json.loads(text)
        data["decisions"] = [Decision(**d) for d in data["decisions"]]
        for key in ("memory", "fused_memory"):
            if data.get(key) is not None:
                data[key] = MemoryPrediction(**data[key])
        return cls(**data)

    def summary(self) -> str:
        """A table a person can read: one line per decision, largest first."""
        head = (
            f"remat plan for {self.graph} ({self.partitioner}, inner compiler {self.inner_compiler}): "
            f"{len(self.kept)} kept ({human_bytes(self.saved_bytes)} of activations), "
            f"{len(self.recomputed)} recomputed"
        )
        if self.offloaded:
            head += (
                f", {len(self.offloaded)} offloaded to host memory ({human_bytes(self.offloaded_bytes)}; "
                f"copies {(self.transfer_s or 0) * 1e3:.2f} ms, of which {(self.exposed_transfer_s or 0) * 1e3:.2f} ms "
                "estimated not hidden by compute)"
            )
        if self.memory is not None:
            head += (
                f"\n  predicted peak {human_bytes(self.memory.peak_bytes)} above "
                f"{human_bytes(self.memory.resident_bytes)} of parameters and inputs, at {self.memory.peak_at}"
            )
        if self.fused_memory is not None and self.inner_compiler == "inductor":
            head += f" (op by op; {human_bytes(self.fused_memory.peak_bytes)} with Inductor's fusion)"
            if self.buffer_pool is False:
                head += "\n  Inductor's buffer pool turned off: its holds of freed buffers would raise that peak"
        if self.estimated_time_s is not None:
            head += f"\n  estimated step time {self.estimated_time_s * 1e3:.2f} ms ({self.time_estimator})"
        if self.budget_bytes is not None:
            head += f"\n  memory budget {human_bytes(self.budget_bytes)} (parameters and inputs included)"
        if self.segments:
            head += f"\n  segments: {'; '.join(self.segments)}"
        if self.fallback_reason:
            head += f"\n  fell back to PyTorch's partitioner: {self.fallback_reason}"
        rows = [f"  {'action':<10}{'tensor':<24}{'op':<28}{'shape':<22}{'bytes':>12}  why"]
        for d in sorted(self.decisions, key=lambda d: -d.bytes):
            shape = "x".join(d.shape) or "scalar"
            rows.append(f"  {d.action:<10}{d.tensor:<24}{d.op:<28}{shape:<22}{d.bytes:>12}  {d.reason}")
        return "\n".join([head, *rows])

    __str__ = summary


def predict_memory(
    fw_module: fx.GraphModule,
    bw_module: fx.GraphModule,
    num_fwd_outputs: int,
    *,
    fused: bool = False,
    buffer_pool: bool = False,
    fusions: Sequence[Fusion] | None = None,
) -> MemoryPrediction:
    """Simulate a step of the two graphs (``fused``: as Inductor compiles them, whose
    ``step_fusions`` the caller may have already; ``buffer_pool``: with its default
    buffer pool, which remat keeps only where its holds fit the budget); keep what a
    Plan reports."""
    timeline = simulate_step(
        fw_module.graph,
        bw_module.graph,
        num_user_outputs=num_fwd_outputs,
        fused=fused,
        buffer_pool=buffer_pool,
        fusions=fusions,
    )
    return MemoryPrediction(
        peak_bytes=timeline.peak_bytes,
        resident_bytes=timeline.resident_bytes,
        peak_at=timeline.peak_at,
        positions=timeline.positions,
        live_bytes=timeline.live_bytes,
    )


def predict_fused_memory(
    fw_module: fx.GraphModule,
    bw_module: fx.GraphModule,
    num_fwd_outputs: int,
    fusions: Sequence[Fusion] | None = None,
) -> MemoryPrediction:
    """``predict_memory`` of the two graphs compiled by Inductor."""
    return predict_memory(fw_module, bw_module, num_fwd_outputs, fused=True, fusions=fusions)


def estimate_time(
    fw_module: fx.GraphModule,
    bw_module: fx.GraphModule,
    estimator_name: str,
    fused: bool = False,
    fusions: Sequence[Fusion] | None = None,
) -> tuple[float, str]:
    """Seconds for a step of the two graphs (``fused``: as Inductor compiles them, else
    run op by op; ``fusions``: their ``step_fusions``, where the caller has it), and how
    that was estimated."""
    estimator = make_estimator(estimator_name, graph_device(fw_module.graph))
    forward, backward = running_nodes(fw_module.graph), running_nodes(bw_module.graph)
    if not fused:
        fusions = None
    elif fusions is None:
        fusions = step_fusions(fw_module.graph, bw_module.graph)
    label = f"{estimator_name}, {'as Inductor fuses it' if fused else 'op by op'}"
    if estimator_name == "roofline":
        label += f", {estimator.profile.name} profile"  # type: ignore[attr-defined]
    return sum(position_seconds(forward, backward, estimator, fusions)), label


def forward_outputs(fw_module: fx.GraphModule) -> list[Any]:
    return list(fw_module.graph.find_nodes(op="output")[0].args[0])


def saved_values(fw_module: fx.GraphModule, num_fwd_outputs: int) -> list[fx.Node]:
    """The forward graph's outputs that exist only for the backward (for an offloaded
    value, its host copy)."""
    return [n for n in forward_outputs(fw_module)[num_fwd_outputs:] if isinstance(n, fx.Node)]


def saved_activation_size(fw_module: fx.GraphModule, num_fwd_outputs: int) -> Size:
    """Bytes held on the device from forward to backward beyond inputs and parameters."""
    inputs = list(fw_module.graph.find_nodes(op="placeholder"))
    kept = [n for n in saved_values(fw_module, num_fwd_outputs) if n.target is not OFFLOAD]
    return unique_storage_size(kept, exclude=inputs)


def _op_name(node: fx.Node) -> str:
    """The op that made a tensor; for one part of a multi-output op, "op[index]"."""
    if node.op != "call_function":
        return node.op
    if node.target is operator.getitem and isinstance(node.args[0], fx.Node):
        return f"{_op_name(node.args[0])}[{node.args[1]}]"
    return str(node.target)


def _decision(node: fx.Node, action: Action, reason: str) -> Decision | None:
    value = node_tensor(node)
    if value is None:
        return None
    size = tensor_size(value)
    return Decision(
        tensor=node.name,
        op=_op_name(node),
        shape=[str(s) for s in value.shape],
        dtype=str(value.dtype).removeprefix("torch."),
        bytes=size.hint,
        bytes_expr=str(size.expr),
        action=action,
        reason=reason,
        module=_module(node),
    )


def _module(node: fx.Node) -> str:
    """The qualified name of the innermost module whose forward made ``node``."""
    stack = node.meta.get("nn_module_stack") or {}
    return module_path(next(reversed(stack.values()))[0]) if stack else ""


def decisions_from_graphs(
    fw_module: fx.GraphModule,
    bw_module: fx.GraphModule,
    num_fwd_outputs: int,
    keep_reasons: dict[str, str],
    default_keep_reason: str,
) -> list[Decision]:
    """Read the decisions off the graphs that run: what the forward hands the
    backward is kept; forward ops that the backward runs again are recomputed."""
    decisions = []
    for node in saved_values(fw_module, num_fwd_outputs):
        if node.target is OFFLOAD:
            value = node.args[0]
            assert isinstance(value, fx.Node)
            decisions.append(_decision(value, "offload", keep_reasons.get(value.name, "offloaded to host memory")))
            continue
        if node.op == "placeholder":
            reason = "parameter or input: alive for the whole step, costs nothing extra"
        else:
            reason = keep_reasons.get(node.name, default_keep_reason)
        decisions.append(_decision(node, "keep", reason))
    forward_ops = {n.name for n in fw_module.graph.nodes if n.op == "call_function"}
    for node in bw_module.graph.nodes:
        if node.op == "call_function" and node.name in forward_ops:
            reason = VIEW_REASON if is_view(node) else "recomputed in the backward from kept values"
            decisions.append(_decision(node, "recompute", reason))
    return [d for d in decisions if d is not None]
