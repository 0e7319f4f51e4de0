"""Rewrite a partition so that chosen saved values travel through host memory.

In the forward graph, ``remat::offload`` runs right after each chosen value is made
and the host copy is what the forward hands the backward. In the backward graph,
``remat::reload`` brings it back ahead of its first use, far enough ahead that the
compute in between covers the copy (``cost_models.transfers``), and
``remat::wait_reload`` runs right before the first use. The ops are in
``remat.host_copies``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

import torch.fx as fx

from remat import host_copies
from remat._torch_internals import fake_on_device
from remat.cost_models.sizes import node_tensor, storage_bytes
from remat.cost_models.transfers import Transfer, TransferSchedule, schedule_transfers

OFFLOAD = host_copies.offload._opoverload
RELOAD = host_copies.reload._opoverload
WAIT = host_copies.wait_reload._opoverload


@dataclass(frozen=True)
class Offloaded:
    """What the rewrite did: the bytes offloaded, and the transfer timing."""

    nbytes: int
    schedule: TransferSchedule


def _running(graph: fx.Graph) -> list[fx.Node]:
    return [n for n in graph.nodes if n.op not in ("placeholder", "output")]


def insert_offloads(
    fw: fx.GraphModule,
    bw: fx.GraphModule,
    num_fwd_outputs: int,
    names: Collection[str],
    seconds: Callable[[fx.Node], float],
    bandwidth: float,
) -> Offloaded:
    """Offload the saved values of ``fw`` named in ``names``; both graphs are
    rewritten in place and recompiled."""
    (fw_output,) = fw.graph.find_nodes(op="output")
    outputs = list(fw_output.args[0])
    placeholders = {n.name: n for n in bw.graph.find_nodes(op="placeholder")}
    fw_nodes, bw_nodes = _running(fw.graph), _running(bw.graph)
    backward_start = len(fw_nodes)
    position = {node: i for i, node in enumerate(fw_nodes)}
    position.update({node: backward_start + i for i, node in enumerate(bw_nodes)})

    chosen: dict[str, tuple[int, fx.Node, fx.Node]] = {}  # name -> (output index, forward value, backward input)
    first_use: dict[str, int] = {}  # name -> position of its first reader in the backward
    transfers = []
    for index in range(num_fwd_outputs, len(outputs)):
        value = outputs[index]
        if not isinstance(value, fx.Node) or value.name not in names or value.name in chosen:
            continue
        received = placeholders.get(value.name)
        readers = [position[u] for u in received.users if u in position] if received is not None else []
        tensor = node_tensor(value)
        if received is None or not readers or tensor is None or value not in position:
            raise ValueError(f"cannot offload {value.name}: the backward does not receive it as an input")
        chosen[value.name] = (index, value, received)
        first_use[value.name] = min(readers)
        transfers.append(Transfer(value.name, storage_bytes(tensor), position[value], first_use[value.name]))
    schedule = schedule_transfers([seconds(n) for n in (*fw_nodes, *bw_nodes)], backward_start, transfers, bandwidth)

    for name, (index, value, received) in chosen.items():
        device = node_tensor(value).device  # type: ignore[union-attr]
        with fw.graph.inserting_after(value):
            host = fw.graph.call_function(OFFLOAD, (value,))
        host.meta["val"] = fake_on_device(value.meta["val"], "cpu")
        outputs[index] = host

        first_reader = bw_nodes[first_use[name] - backward_start]
        with bw.graph.inserting_before(bw_nodes[schedule.windows[name].reload_at - backward_start]):
            reloaded = bw.graph.call_function(RELOAD, (received, device))
        reloaded.meta["val"] = received.meta["val"]
        received.replace_all_uses_with(reloaded, delete_user_cb=lambda user, r=reloaded: user is not r)
        received.meta["val"] = host.meta["val"]
        with bw.graph.inserting_before(first_reader):
            bw.graph.call_function(WAIT, (reloaded,))
    fw_output.args = (type(fw_output.args[0])(outputs),)
    for module in (fw, bw):
        module.graph.lint()
        module.recompile()
    return Offloaded(sum(t.nbytes for t in transfers), schedule)
