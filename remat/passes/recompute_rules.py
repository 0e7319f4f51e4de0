"""Which forward ops may be recomputed in the backward, and why not when they may not.

A rewrite that cannot be proven safe is not made: random ops (their replay would draw
new numbers), ops with side effects, collectives and ops outside aten/prims (whose
effects remat cannot see) are never recomputed. Compute-heavy ops (matmul,
convolution, attention) are kept rather than recomputed unless a memory budget asks
for it: recomputing them costs the most time per byte saved.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch
import torch.fx as fx

from remat._torch_internals import checkpoint_policy, is_builtin_op, is_op_overload, is_primal
from remat.cost_models.fusion import is_reduction, reads_stored
from remat.cost_models.sizes import value_bytes

aten = torch.ops.aten

HEAVY_OPS = frozenset(
    {
        aten.mm,
        aten.bmm,
        aten.addmm,
        aten.baddbmm,
        aten.convolution,
        aten._convolution,
        aten.convolution_backward,
        aten._scaled_dot_product_flash_attention,
        aten._scaled_dot_product_flash_attention_for_cpu,
        aten._scaled_dot_product_efficient_attention,
        aten._scaled_dot_product_cudnn_attention,
        aten._flash_attention_forward,
        aten._efficient_attention_forward,
    }
)


def is_view(node: fx.Node) -> bool:
    """Views cost nothing to recompute, so remat never saves one: it saves the base."""
    return is_op_overload(node.target) and node.target.is_view


def views_of(node: fx.Node) -> set[fx.Node]:
    """The views (of views) of ``node``."""
    found: set[fx.Node] = set()
    pending = list(node.users)
    while pending:
        user = pending.pop()
        if user.op == "call_function" and is_view(user) and user not in found:
            found.add(user)
            pending.extend(user.users)
    return found


def ban_reason(node: fx.Node) -> str | None:
    """Why ``node`` must not be recomputed in the backward, or None if it may be."""
    if node.op == "placeholder":
        return "graph input" if is_primal(node) else None
    if node.op != "call_function" or is_view(node):
        return None
    if checkpoint_policy(node) == "must_save":
        return "tagged MUST_SAVE by a checkpoint policy"
    target = node.target
    if not is_op_overload(target):
        return None if target.__module__ == "_operator" else f"non-aten callable {target}"
    if target.namespace == "_c10d_functional":
        return "collective"
    if not is_builtin_op(target):
        return f"custom op {target} (side effects unknown)"
    if draws_random_numbers(node):
        return "random op (a replay would draw different numbers)"
    if target._schema.is_mutable or node.is_impure(impure_random=False):
        return "mutates its inputs or has side effects"
    return None


def draws_random_numbers(node: fx.Node) -> bool:
    """Whether ``node``'s op draws from a random generator. The attention ops are tagged
    seeded because their schema allows dropout; with ``dropout_p`` a constant 0 they
    draw nothing (they do not touch the generator), so recomputing them, as
    ``torch.utils.checkpoint`` does, replays the same values."""
    target = node.target
    if not is_op_overload(target) or torch.Tag.nondeterministic_seeded not in target.tags:
        return False
    names = [argument.name for argument in target._schema.arguments]
    if "dropout_p" not in names:
        return True
    index = names.index("dropout_p")
    default = target._schema.arguments[index].default_value
    dropout = node.kwargs.get("dropout_p", node.args[index] if index < len(node.args) else default)
    return not (isinstance(dropout, (int, float)) and dropout == 0)


def source_op(node: fx.Node) -> fx.Node:
    """The op behind a getitem (a part of its tuple output), else the node itself: the
    parts of a tuple follow the rules of the op that makes them."""
    return node.args[0] if node.target is operator.getitem and isinstance(node.args[0], fx.Node) else node


def is_heavy(node: fx.Node) -> bool:
    """Matmul, convolution and attention (and the parts of their tuple outputs):
    recomputing them costs the most time per byte."""
    node = source_op(node)
    return is_op_overload(node.target) and node.target.overloadpacket in HEAVY_OPS


def reduction_reason(node: fx.Node) -> str | None:
    """Why not to recompute ``node``: a reduction that shrinks its input 4x or more
    (normalization statistics). Recomputing it reads its whole input again to save a
    few bytes, and Inductor's reductions cannot be inlined into their readers (on the
    CPU, GroupNorm's over a channels-last input ran 2-3x slower in the backward than
    keeping its statistics, issue 4). A preference, like ``heavy_reason``."""
    op = source_op(node)
    if is_reduction(op) and 4 * value_bytes(op) <= sum(value_bytes(a) for a in op.all_input_nodes):
        return "reduction that shrinks its input (recomputing it reads the input again)"
    return None


def stored_in_backward_reason(node: fx.Node, in_backward: Callable[[fx.Node], bool]) -> str | None:
    """Why recomputing ``node`` would not fuse into the backward's kernels under
    Inductor: an extern kernel of the backward (a convolution's or matmul's gradient)
    reads it, so the recomputed value is stored there anyway. A preference;
    ``in_backward`` tells the backward's nodes. A view is never kept (its base is)."""
    if is_view(node):
        return None
    pending, seen = [node], set()
    while pending:  # the value, its views and their readers
        value = pending.pop()
        for user in value.users:
            if user in seen:
                continue
            seen.add(user)
            if is_view(user) or user.target is operator.getitem:
                pending.append(user)
            elif in_backward(user) and reads_stored(user):
                return f"read by {user.target} in the backward (recomputed, it would be stored there)"
    return None


def heavy_reason(node: fx.Node) -> str | None:
    """Why the budget-free min-cut keeps ``node`` rather than recompute it: it is heavy.
    Unlike ``ban_reason`` this is a preference, which a memory budget may override."""
    return "compute-heavy op (matmul, convolution or attention)" if is_heavy(node) else None
