"""The Plan: every keep/recompute decision for one compiled graph, and why.

The Plan is the contract between the planner and everything that reports on it
(``remat.explain``, the CLI, the tests). It is read off the forward and backward
graphs actually produced, so it describes what runs, and it round-trips through JSON.
"""

from __future__ import annotations

import dataclasses
import json
import operator
from typing import Any, Literal

import torch.fx as fx

from remat.cost_models.sizes import node_tensor, tensor_size, unique_storage_bytes
from remat.passes.recompute_rules import is_view

Action = Literal["keep", "recompute"]


@dataclasses.dataclass(frozen=True)
class Decision:
    """One forward tensor the backward needs: kept from the forward, or recomputed."""

    tensor: str
    op: str
    shape: list[str]
    dtype: str
    bytes: int
    bytes_expr: str
    action: Action
    reason: str


@dataclasses.dataclass
class Plan:
    """Decisions for one graph. ``saved_bytes`` counts each kept storage once,
    leaving out parameters and inputs (and views of them), which live anyway."""

    graph: str
    inner_compiler: str
    partitioner: Literal["remat-min-cut", "pytorch-default"]
    decisions: list[Decision]
    saved_bytes: int
    options: dict[str, Any]
    fallback_reason: str | None = None

    @property
    def kept(self) -> list[Decision]:
        return [d for d in self.decisions if d.action == "keep"]

    @property
    def recomputed(self) -> list[Decision]:
        return [d for d in self.decisions if d.action == "recompute"]

    def to_json(self, **dump_kwargs: Any) -> str:
        return json.dumps(dataclasses.asdict(self), **dump_kwargs)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        data = json.loads(text)
        data["decisions"] = [Decision(**d) for d in data["decisions"]]
        return cls(**data)

    def summary(self) -> str:
        """A table a person can read: one line per decision, largest first."""
        head = (
            f"remat plan for {self.graph} ({self.partitioner}, inner compiler {self.inner_compiler}): "
            f"{len(self.kept)} kept ({_human_bytes(self.saved_bytes)} of activations), "
            f"{len(self.recomputed)} recomputed"
        )
        if self.fallback_reason:
            head += f"\n  fell back to PyTorch's partitioner: {self.fallback_reason}"
        rows = [f"  {'action':<10}{'tensor':<24}{'op':<28}{'shape':<22}{'bytes':>12}  why"]
        for d in sorted(self.decisions, key=lambda d: -d.bytes):
            shape = "x".join(d.shape) or "scalar"
            rows.append(f"  {d.action:<10}{d.tensor:<24}{d.op:<28}{shape:<22}{d.bytes:>12}  {d.reason}")
        return "\n".join([head, *rows])

    __str__ = summary


def _human_bytes(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def forward_outputs(fw_module: fx.GraphModule) -> list[Any]:
    return list(fw_module.graph.find_nodes(op="output")[0].args[0])


def saved_values(fw_module: fx.GraphModule, num_fwd_outputs: int) -> list[fx.Node]:
    """The forward graph's outputs that exist only for the backward."""
    return [n for n in forward_outputs(fw_module)[num_fwd_outputs:] if isinstance(n, fx.Node)]


def saved_activation_bytes(fw_module: fx.GraphModule, num_fwd_outputs: int) -> int:
    """Bytes held from forward to backward beyond inputs and parameters."""
    inputs = list(fw_module.graph.find_nodes(op="placeholder"))
    return unique_storage_bytes(saved_values(fw_module, num_fwd_outputs), exclude=inputs)


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
    )


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
        if node.op == "placeholder":
            reason = "parameter or input: alive for the whole step, costs nothing extra"
        else:
            reason = keep_reasons.get(node.name, default_keep_reason)
        decisions.append(_decision(node, "keep", reason))
    forward_ops = {n.name for n in fw_module.graph.nodes if n.op == "call_function"}
    for node in bw_module.graph.nodes:
        if node.op == "call_function" and node.name in forward_ops:
            reason = "view: free to recompute" if is_view(node) else "recomputed in the backward from kept values"
            decisions.append(_decision(node, "recompute", reason))
    return [d for d in decisions if d is not None]
