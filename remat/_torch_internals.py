"""The only module that touches private PyTorch APIs.

remat replaces one decision of PyTorch's partitioner (which forward values the
backward keeps) and reuses everything around it: AOTAutograd's joint tracing,
PyTorch's preparation of the joint graph (CSE, checkpoint tags, collectives and
effectful ops forced to be saved, mutated inputs), the extraction of the forward
and backward graphs, RNG functionalization and the backward reordering. Keeping all
of that in PyTorch's hands is what makes the rewrite safe; keeping every private
name in this file is what makes a PyTorch upgrade a one-file change.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

MIN_TORCH = (2, 11)

_version = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
if _version < MIN_TORCH:  # pragma: no cover - guarded by pyproject's torch>=2.11
    raise ImportError(
        f"remat needs torch>={MIN_TORCH[0]}.{MIN_TORCH[1]}; found torch {torch.__version__}"
    )

from torch._dynamo.backends.common import aot_autograd  # noqa: E402
from torch._functorch import partitioners as _partitioners  # noqa: E402
from torch._functorch._aot_autograd.utils import _is_primal, _is_tangent  # noqa: E402
from torch._inductor.custom_graph_pass import CustomGraphPass, CustomPartitionerFn  # noqa: E402
from torch._inductor.decomposition import select_decomp_table  # noqa: E402
from torch.utils.checkpoint import CheckpointPolicy  # noqa: E402

try:
    from torch.fx.graph import _BoxedCodeGen
except ImportError:  # pragma: no cover - older torch: inputs live to the end of each graph
    _BoxedCodeGen = None

try:
    from torch.fx.experimental.symbolic_shapes import optimization_hint as _optimization_hint
except ImportError:  # torch < 2.12
    _optimization_hint = None
    from torch.fx.experimental.symbolic_shapes import size_hint as _size_hint

PartitionFn = Callable[..., tuple[fx.GraphModule, fx.GraphModule]]


@dataclass(frozen=True)
class JointInfo:
    """What the partitioner knows about each node of the joint graph.

    required_fw: needed to compute the forward outputs.
    required_bw: needed in the backward (tangent-dependent nodes and the gradients).
    tangents_closure: nodes that depend on a tangent, so can only run in the backward.
    """

    required_fw: frozenset[fx.Node]
    required_bw: frozenset[fx.Node]
    tangents_closure: frozenset[fx.Node]


ChooseSavedValues = Callable[[fx.Graph, JointInfo], list[fx.Node]]

_patch_lock = threading.Lock()


@contextlib.contextmanager
def _choose_saved_values(choose: ChooseSavedValues) -> Iterator[None]:
    """Make PyTorch's min-cut partition ask ``choose`` which values to save."""

    def replacement(joint_graph: fx.Graph, node_info: Any, memory_budget: float = 1.0) -> list[fx.Node]:
        info = JointInfo(
            required_fw=frozenset(node_info.required_fw_nodes),
            required_bw=frozenset(node_info.required_bw_nodes),
            tangents_closure=frozenset(getattr(node_info, "tangents_closure", node_info.required_bw_nodes)),
        )
        return choose(joint_graph, info)

    with _patch_lock:
        original = _partitioners.choose_saved_values_set
        _partitioners.choose_saved_values_set = replacement
        try:
            yield
        finally:
            _partitioners.choose_saved_values_set = original


def partition_with(
    choose: ChooseSavedValues,
    joint_module: fx.GraphModule,
    joint_inputs: Sequence[Any],
    *,
    num_fwd_outputs: int,
    **kwargs: Any,
) -> tuple[fx.GraphModule, fx.GraphModule]:
    """Partition ``joint_module`` with PyTorch's machinery and ``choose``'s decision."""
    with _choose_saved_values(choose):
        return _partitioners.min_cut_rematerialization_partition(
            joint_module, joint_inputs, num_fwd_outputs=num_fwd_outputs, **kwargs
        )


def pytorch_default_partition(
    joint_module: fx.GraphModule,
    joint_inputs: Sequence[Any],
    *,
    num_fwd_outputs: int,
    **kwargs: Any,
) -> tuple[fx.GraphModule, fx.GraphModule]:
    """PyTorch's own min-cut partition, the one ``torch.compile`` uses by default."""
    return _partitioners.min_cut_rematerialization_partition(
        joint_module, joint_inputs, num_fwd_outputs=num_fwd_outputs, **kwargs
    )


def pytorch_budget_partitioner(budget: float) -> PartitionFn:
    """PyTorch's default partition under ``torch._functorch.config.activation_memory_budget``
    (a fraction of the bytes its own plan saves: 1.0 is the default plan, 0.0 recomputes
    all it can), as ``torch.compile`` makes it with that setting."""

    def partition(joint_module: fx.GraphModule, joint_inputs: Sequence[Any], **kwargs: Any) -> tuple[fx.GraphModule, fx.GraphModule]:
        with torch._functorch.config.patch(activation_memory_budget=budget):
            return pytorch_default_partition(joint_module, joint_inputs, **kwargs)

    return partition


def mark_batch_dynamic(tensor: torch.Tensor) -> None:
    """Ask Dynamo to compile ``tensor``'s first dimension as a symbol, so that batches of
    other sizes (a ragged last chunk) reuse the graph instead of recompiling. A hint:
    Dynamo still specializes where the model needs a fixed size (or the size is 0 or 1)."""
    torch._dynamo.maybe_mark_dynamic(tensor, 0)


def is_primal(node: fx.Node) -> bool:
    return _is_primal(node)


def is_tangent(node: fx.Node) -> bool:
    return _is_tangent(node)


def checkpoint_policy(node: fx.Node) -> str | None:
    """'must_save' / 'must_recompute' from torch.utils.checkpoint policies, if tagged."""
    policy = node.meta.get("recompute")
    if policy == CheckpointPolicy.MUST_SAVE:
        return "must_save"
    if policy in (CheckpointPolicy.MUST_RECOMPUTE, CheckpointPolicy.PREFER_RECOMPUTE):
        return "must_recompute"
    return None


def mark_must_recompute(node: fx.Node) -> None:
    """Tag ``node`` as a checkpoint policy's MUST_RECOMPUTE: never kept for the backward."""
    node.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE


LATE_COPY = "remat_late_copy"  # node.meta key; the partitioner copies meta to the graphs it makes


def mark_late_copy(node: fx.Node) -> None:
    """Tag ``node`` as a late backward copy (``passes.backward_copies``): it runs where
    it is. Skip-connection copies are not tagged: Inductor keeps them apart by distance,
    and their plans were measured so."""
    node.meta[LATE_COPY] = True


def is_late_copy(node: fx.Node) -> bool:
    return bool(node.meta.get(LATE_COPY))


# --- tags (remat.tag) -------------------------------------------------------------
#
# ``remat.tag(x, name)`` traces ``aten.alias(x)`` inside ``torch.fx.traceback.annotate``
# (torch >= 2.10; not backward compatible, hence here). Dynamo runs the annotation while
# it traces, so the alias node of its graph carries ``meta["custom"]``, which AOTAutograd
# copies to the aten nodes it makes from that node: the tag reaches the joint graph on
# an alias of the tagged value. The alias is a view: no copy at runtime, gradient
# unchanged. PyTorch's partitioner then merges it (CSE) with the alias that autograd
# saves of the same value, and Inductor's joint passes remove it (``remove_noop_ops``),
# so ``remat.tags.mark_tagged_values`` moves each tag onto the value itself first: as the
# first pass over the joint graph (``joint_pass`` of the two compile functions below).

TAG_KEY = "remat_tag"


def tag_scope(name: str) -> contextlib.AbstractContextManager[None]:
    """Annotate every node traced inside with the tag ``name``."""
    return torch.fx.traceback.annotate({TAG_KEY: name})


def tag_name(node: fx.Node) -> str | None:
    """The tag that ``tag_scope`` put on ``node``, if any."""
    custom = node.meta.get("custom")
    return custom.get(TAG_KEY) if isinstance(custom, dict) else None


def is_builtin_op(target: object) -> bool:
    """True for aten/prims ops, whose semantics (and side effects) PyTorch defines."""
    return isinstance(target, torch._ops.OpOverload) and target.namespace in ("aten", "prims")


def sym_expr(value: torch.SymInt) -> Any:
    """The sympy expression behind a SymInt."""
    return value.node.expr


def size_hint(value: int | torch.SymInt) -> int:
    """A SymInt's value at the shape hints (the sizes seen while tracing), without guarding."""
    if not isinstance(value, torch.SymInt):
        return int(value)
    if _optimization_hint is not None:  # torch >= 2.12
        return _optimization_hint(value)
    # a data-dependent size (nonzero's) has no hint: torch 2.11 raises without a
    # fallback, where 2.12's optimization_hint takes Inductor's, as here
    from torch._inductor import config as inductor_config

    return _size_hint(value, fallback=inductor_config.unbacked_symint_fallback)


@contextlib.contextmanager
def real_kernels() -> Iterator[None]:
    """Run real kernels on real tensors even when called from inside tracing.

    Planning runs inside AOTAutograd's fake-tensor mode, where every op returns at
    once without computing: a micro-benchmark or an op timed there would measure
    nothing. This suspends the active dispatch modes (fake tensors, proxies)."""
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes():
        yield


def storage_key(tensor: torch.Tensor) -> int:
    """Identifies the storage behind a (fake) tensor: views and in-place results share
    it. Cheaper than a ``StorageWeakRef``, which the simulator would build per node."""
    return tensor.untyped_storage()._cdata


def fake_on_device(value: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A fake tensor like the fake ``value`` (sizes, strides, dtype) on ``device``,
    from the same fake mode: the ``meta["val"]`` of a node a pass adds."""
    with value.fake_mode:  # type: ignore[attr-defined]
        return torch.empty_strided(value.size(), value.stride(), dtype=value.dtype, device=device)


def symbol_sources(graph: fx.Graph) -> dict[str, str]:
    """For each shape symbol of a graph, the input dimension Dynamo made it from
    (e.g. ``s0 -> L['x'].size()[0]``); empty for static shapes."""
    for node in graph.nodes:
        value = node.meta.get("val")
        mode = getattr(value, "fake_mode", None)
        if mode is not None and mode.shape_env is not None:
            sources = {}
            for symbol, found in mode.shape_env.var_to_sources.items():
                if found and symbol.is_integer:  # sizes, not float constants
                    name = found[0].name
                    sources[str(symbol)] = name() if callable(name) else name
            return sources
    return {}


def inductor_fallback_random() -> bool:
    """Inductor's ``config.fallback_random``: random ops called as in eager mode, rather
    than generated inside the kernels that read them."""
    from torch._inductor import config

    return bool(config.fallback_random)


@functools.cache
def inductor_lowers_convolution_backward() -> bool:
    """Whether Inductor lowers ``convolution_backward`` itself (``kernel/conv.py``,
    torch 2.13), asking its inputs for the weight gradient's stride order, rather than
    calling it as a fallback on its FX strides (torch 2.11), where the op copies an
    input laid out unlike its weight itself."""
    from torch._inductor.kernel import conv

    return hasattr(conv, "convolution_backward_lowering")


def decomposition_table() -> dict[Any, Callable[..., Any]]:
    """Inductor's decompositions, used for both inner compilers so plans agree.

    Not cached: the table depends on Inductor's config (``fallback_random``)."""
    return select_decomp_table()


def _boxed_nop(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
    """Run a graph op by op in AOTAutograd's boxed calling convention.

    With the boxed code generator the graph clears its argument list, so each input
    (a saved activation, in the backward) is freed after its last use rather than
    held to the end of the graph; the memory simulator assumes exactly that."""
    if _BoxedCodeGen is not None:
        gm.graph.set_codegen(_BoxedCodeGen())
        gm.recompile()
        return gm

    def run(args: list[Any]) -> Any:  # pragma: no cover - torch without _BoxedCodeGen
        return gm(*args)

    run._boxed_call = True  # type: ignore[attr-defined]
    return run


JointPass = Callable[[fx.Graph], None]


def compile_eager(
    gm: fx.GraphModule, example_inputs: Sequence[Any], partition_fn: PartitionFn, joint_pass: JointPass | None = None
) -> Callable[..., Any]:
    """Trace the joint graph with AOTAutograd, partition it, run both graphs eagerly.
    ``joint_pass`` runs on the joint graph first, before PyTorch's partitioner."""

    def partition(joint: fx.GraphModule, joint_inputs: Sequence[Any], **kwargs: Any) -> tuple[fx.GraphModule, fx.GraphModule]:
        if joint_pass is not None:
            joint_pass(joint.graph)
        return partition_fn(joint, joint_inputs, **kwargs)

    # Through Dynamo's aot_autograd wrapper, as Inductor goes, rather than calling
    # aot_module_simplified directly: DDP's optimizer (a graph split at each gradient
    # bucket) counts the AOTAutograd compiles the wrapper records to pair each bucket's
    # backward with its forward, and fails the first backward without them.
    return aot_autograd(
        fw_compiler=_boxed_nop,
        bw_compiler=_boxed_nop,
        partition_fn=partition,
        decompositions=decomposition_table(),
    )(gm, example_inputs)


# Set by remat's partitioner on the forward graph it returns: whether Inductor's wrapper
# may pool freed buffers for the two graphs (``config.allow_buffer_reuse``).
BUFFER_POOL_META = "remat_buffer_pool"


@dataclass
class _BufferPoolChoice:
    """What the partitioner decided about Inductor's buffer pool, for the compiles
    of the forward and backward graphs that follow it."""

    enabled: bool


class _InductorPartitioner(CustomPartitionerFn):
    """Adapter: Inductor's hook for a custom partitioner calls remat's, and passes its
    buffer-pool decision (``BUFFER_POOL_META``) on to the graphs' compiles."""

    def __init__(self, partition_fn: PartitionFn, buffer_pool: _BufferPoolChoice) -> None:
        self.partition_fn = partition_fn
        self.buffer_pool = buffer_pool

    def __call__(self, gm: fx.GraphModule, joint_inputs: Sequence[object], **kwargs: Any) -> tuple[fx.GraphModule, fx.GraphModule]:
        kwargs.pop("compiler", None)
        fw, bw = self.partition_fn(gm, joint_inputs, **kwargs)
        self.buffer_pool.enabled = fw.meta.get(BUFFER_POOL_META, self.buffer_pool.enabled)
        return fw, bw

    def uuid(self) -> str:
        # Keys Inductor's cache of compiled forward/backward graphs, which are fixed
        # once partitioned; the AOTAutograd cache, which would skip the partitioner
        # (and the Plan), is turned off in compile_inductor.
        return "remat-partitioner"

    def __reduce__(self) -> tuple[type, tuple[str]]:
        # Inductor pickles its config into cache keys; this object holds callbacks.
        return (str, (self.uuid(),))


class _JointPrePass(CustomGraphPass):
    """Runs ``joint_pass`` as Inductor's first joint-graph pass, then the pre-pass the
    user had configured (``torch._inductor.config.joint_custom_pre_pass``), if any."""

    def __init__(self, joint_pass: JointPass, previous: Any) -> None:
        self.joint_pass = joint_pass
        if previous is None:
            previous = ()
        self.previous = tuple(previous) if isinstance(previous, (list, tuple)) else (previous,)

    def __call__(self, graph: fx.Graph) -> None:
        self.joint_pass(graph)
        for chained in self.previous:
            chained(graph)

    def uuid(self) -> Any:
        # remat's pass only annotates nodes; a chained pass keeps its own caching rules
        # (a plain callable, or a uuid of None, turns Inductor's cache off as it would).
        ids = []
        for chained in self.previous:
            found = chained.uuid() if isinstance(chained, CustomGraphPass) else None
            if found is None:
                return None
            ids.append(found)
        return ("remat-joint-pre-pass", *ids)

    def __reduce__(self) -> tuple[type, tuple[str]]:
        return (str, (repr(self.uuid()),))


@functools.cache
def _no_extern_pull_choices() -> type:
    """Inductor's fusion heuristics, less the fusions that pull an extern kernel ahead
    or move a late backward copy across one.

    Two kernels fuse into one that runs where the earlier ran, and what the later one
    needs from in between runs before it (``Scheduler.topological_sort_schedule``): a
    recomputed GELU fused with its backward pulls the matmul that makes the backward's
    input ahead of the weight-gradient matmul that reads the GELU, and the three 4 MiB
    values of a GPT layer's MLP meet again (``passes.weight_gradients``). A late
    backward copy (``passes.backward_copies``) fused into the kernel that makes its
    input runs early again and holds what it was made to free. remat's compiles
    refuse such fusions (``cost_models.fusion`` models them so); the kernels then each
    read their inputs once more. ``uuid`` keys Inductor's graph cache. The class
    stands in for Inductor's default choices: a choices class the user set is not
    used in remat's compiles."""
    from torch._inductor.choices import InductorChoices
    from torch._inductor.scheduler import ExternKernelSchedulerNode

    class NoExternPull(InductorChoices):
        @staticmethod
        def uuid() -> str:
            return "remat-no-extern-pull-3"  # change it with the rule or tile2d_atomic_adds_fixed: it keys cached graphs

        @staticmethod
        def can_fuse(scheduler: Any, node1: Any, node2: Any, shared_data_score: int) -> bool:
            if not InductorChoices.can_fuse(scheduler, node1, node2, shared_data_score):
                return False
            place, extern_places, extern_names = NoExternPull._places(scheduler.nodes)
            members = node1.get_operation_names() | node2.get_operation_names()
            places = [place[name] for name in members if name in place]
            if not places:
                return True
            # what the fused kernel needs and runs between its parts would run before it
            between = range(bisect.bisect_right(extern_places, min(places)), bisect.bisect_left(extern_places, max(places)))
            if between and (NoExternPull._has_copy(node1) or NoExternPull._has_copy(node2)):
                return False
            return not any(
                name in node1.ancestors or name in node2.ancestors for i in between for name in extern_names[i]
            )

        @staticmethod
        def _has_copy(node: Any) -> bool:
            """Whether a scheduler node computes a late backward copy (its FX origins say)."""
            return any(
                is_late_copy(origin)
                for part in node.get_nodes()
                if part.node is not None
                for origin in part.node.get_origins()
            )

        @staticmethod
        def _places(nodes: list[Any]) -> tuple[dict[str, int], list[int], list[list[str]]]:
            """Where each op runs, and the places and op names of the extern kernels in
            order, over ``scheduler.nodes``: the list as it was before fusion, which
            stays through the rounds (a fused node runs at its first part's place), so
            one per graph, asked of for every pair."""
            last, size, found = NoExternPull._last
            if last is not nodes or size != len(nodes):
                place: dict[str, int] = {}
                extern_places: list[int] = []
                extern_names: list[list[str]] = []
                for i, node in enumerate(nodes):
                    names = node.get_operation_names()
                    place.update(dict.fromkeys(names, i))
                    if isinstance(node, ExternKernelSchedulerNode):
                        extern_places.append(i)
                        extern_names.append(list(names))
                found = (place, extern_places, extern_names)
                NoExternPull._last = (nodes, len(nodes), found)
            return found

        _last: tuple[Any, int, Any] = (None, 0, None)

    # torch 2.11 pickles the config into the graph cache's key (later versions ask
    # uuid), and a subprocess compile pickles the handler: a class pickles as its
    # module and name, found there by the module's __getattr__
    NoExternPull.__name__ = NoExternPull.__qualname__ = "NoExternPullChoices"
    NoExternPull.__module__ = __name__
    return NoExternPull


def __getattr__(name: str) -> Any:
    """``NoExternPullChoices``, made on first use (it imports Inductor), for unpickling."""
    if name == "NoExternPullChoices":
        return _no_extern_pull_choices()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@contextlib.contextmanager
def no_extern_pulls() -> Iterator[None]:
    """Inductor compiles in this context refuse fusions that pull an extern kernel
    ahead (``_no_extern_pull_choices``). The scheduler asks ``V.choices``; the config
    entry puts the choice in the graph cache's key. The AOTAutograd cache's key leaves
    it out (torch 2.13): an entry it saved here pointed a later default compile of the
    same function at this compile's graphs, so it is off in this context.

    The handler is set before the config is patched: setting it first makes the
    thread's default handler, which is then kept for good, from the config; made from
    the patched one, every later Inductor compile in the thread, remat's or not, would
    refuse these fusions."""
    from torch._inductor import config as inductor_config
    from torch._inductor.virtualized import V

    choices = _no_extern_pull_choices()
    try:
        with (
            V.set_choices_handler(choices()),
            inductor_config.patch(inductor_choices_class=choices),
            torch._functorch.config.patch(enable_autograd_cache=False),
        ):
            yield
    finally:
        choices._last = (None, 0, None)  # the scheduler's nodes go with the compile


def _doubles_tile2d_atomic_offset() -> bool:
    """Whether Inductor's C++ 2-d tiles offset a parallel ``atomic_add`` store twice
    (pytorch/pytorch#191837, torch 2.11 and 2.13): ``CppTile2DKernel.store`` shifts the
    index by the tile's inner loop variable, then ``CppVecKernel.store`` rebuilds it
    with ``ops.index_expr``, which the tile's overrides shift again. Read from
    Inductor's source, so only where ``_SharedStoreFix`` has not patched it."""
    import inspect

    from torch._inductor.codegen import cpp

    tile2d, vec = inspect.getsource(cpp.CppTile2DKernel.store), inspect.getsource(cpp.CppVecKernel.store)
    return "new_index = self.transform_indexing(index)" in tile2d and "ops.index_expr(index, torch.int64)" in vec


class _SharedStoreFix:
    """``CppTile2DKernel.store`` fixed while any remat compile runs. The method is a
    class attribute, shared by every thread: the first compile to enter puts the fix in
    place and the last to leave takes it out. Were each compile to save and restore
    what it found, two threads' overlapping compiles would take the fix out from under
    the one still running, or leave it in for good. Whether Inductor needs the fix is
    read once, under the lock, before any patch."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._compiles = 0
        self._needed: bool | None = None
        self._original: Callable[..., Any] | None = None

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        from torch._inductor.codegen import cpp

        with self._lock:
            if self._compiles == 0:
                if self._needed is None:
                    self._needed = _doubles_tile2d_atomic_offset()
                if self._needed:
                    self._original = original = cpp.CppTile2DKernel.store

                    def store_once(kernel: Any, name: str, index: Any, value: Any, mode: Any = None) -> Any:
                        parallel_atomic = mode == "atomic_add" and (cpp.config.cpp.dynamic_threads or kernel.num_threads != 1)
                        if parallel_atomic and not kernel.need_vec_transpose(kernel.rename_indexing(index)):
                            return cpp.CppVecKernel.store(kernel, name, index, value, mode)  # ops.index_expr shifts it
                        return original(kernel, name, index, value, mode)

                    cpp.CppTile2DKernel.store = store_once
            self._compiles += 1
        try:
            yield
        finally:
            with self._lock:
                self._compiles -= 1
                if self._compiles == 0 and self._original is not None:
                    cpp.CppTile2DKernel.store, self._original = self._original, None


_tile2d_store_fix = _SharedStoreFix()


def tile2d_atomic_adds_fixed() -> contextlib.AbstractContextManager[None]:
    """Inductor compiles in this context give a parallel ``atomic_add`` store in a 2-d
    tile (a nearest upsampling's backward, an ``index_put`` with ``accumulate``,
    reading a channels-last gradient into a contiguous result, as a backward remat
    compiles without layout optimization does) its index once. With the doubled
    offset, a decoder's backward on two threads wrote out of bounds and aborted the
    process (glibc: "malloc_consolidate(): invalid chunk size";
    ``tests/test_backend.py``). Where Inductor does not double the offset, nothing is
    changed. Compiles on several threads share the fix (``_SharedStoreFix``), and so
    does any Inductor compile that runs meanwhile, remat's or not."""
    return _tile2d_store_fix.applied()


def graph_code(gm: fx.GraphModule, inputs: Sequence[Any]) -> str:
    """The code Inductor generates for the aten graph ``gm`` compiled as remat compiles
    its forward and backward graphs (``no_extern_pulls``; tests read its kernels)."""
    from torch._inductor.compile_fx import compile_fx_inner
    from torch._inductor.utils import run_and_get_code

    with no_extern_pulls():
        _, codes = run_and_get_code(lambda: compile_fx_inner(gm, list(inputs)))
    return codes[0]


def generated_code(compiled: Callable[..., Any], *args: Any) -> str:
    """The code Inductor generates for ``compiled(*args)``, its first graph (tests read
    the order of its kernels)."""
    from torch._inductor.utils import run_and_get_code

    _, codes = run_and_get_code(compiled, *args)
    return codes[0]


def compile_inductor(
    gm: fx.GraphModule, example_inputs: Sequence[Any], partition_fn: PartitionFn, joint_pass: JointPass | None = None
) -> Callable[..., Any]:
    """Compile with Inductor, with remat's partitioner in place of the default one.
    ``joint_pass`` runs on the joint graph first, before Inductor's joint passes.

    Inductor's wrapper pools a freed buffer for a later one of the same size when its
    own peak estimate allows; that estimate is not the real timeline, and on a
    budgeted GPT the holds raised the measured peak by 2.9 MiB (34.0 against 31.1,
    ``benchmarks/buffer_pool.py``). The partitioner turns the pool off for the graphs
    where the simulator finds that its holds would break the budget
    (``BUFFER_POOL_META``); elsewhere it stays, as it saves allocator calls (a U-Net
    step ran 1.024x PyTorch's time without it and 1.000x with it, on the CPU).

    A backward on the CPU compiles without layout optimization: Inductor lays out a
    graph with an ``aten.convolution`` channels-last, and in a backward only a
    recomputed one is; without it the backward keeps the default layout, as one that
    recomputes no convolution does (``fusion.lays_out_channels_last``)."""
    from torch._inductor import config as inductor_config
    from torch._inductor.compile_fx import compile_fx, compile_fx_inner

    buffer_pool = _BufferPoolChoice(inductor_config.allow_buffer_reuse)
    patches: dict[str, Any] = {"custom_partitioner_fn": _InductorPartitioner(partition_fn, buffer_pool)}
    if joint_pass is not None:
        patches["joint_custom_pre_pass"] = _JointPrePass(joint_pass, inductor_config.joint_custom_pre_pass)

    def inner_compile(graph: fx.GraphModule, inputs: Sequence[Any], **kwargs: Any) -> Any:
        # runs after the partition, for the forward and the backward graph
        graph_patches: dict[str, Any] = {"allow_buffer_reuse": buffer_pool.enabled}
        if kwargs.get("is_backward") and all(t.device.type == "cpu" for t in inputs if isinstance(t, torch.Tensor)):
            graph_patches["layout_optimization"] = False  # fusion.lays_out_channels_last
        with inductor_config.patch(graph_patches), no_extern_pulls(), tile2d_atomic_adds_fixed():
            return compile_fx_inner(graph, inputs, **kwargs)

    with torch._functorch.config.patch(enable_autograd_cache=False):
        return compile_fx(gm, example_inputs, inner_compile=inner_compile, config_patches=patches)


def allocator_events(run: Callable[[], Any]) -> list[tuple[str, int, int, int]]:
    """Run ``run()`` once under ``torch.profiler`` with ``profile_memory=True``; every
    event it records, by start: (name, bytes, start ns, end ns), bytes allocated
    (negative: freed) for the allocator's ``"[memory]"`` events and 0 for ops. The
    public ``profile.events()`` drops most allocator events of a compiled step; the
    Kineto results keep them all."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as recorded:
        run()
    events = sorted(recorded.profiler.kineto_results.events(), key=lambda e: e.start_ns())
    return [(e.name(), e.nbytes() if e.name() == "[memory]" else 0, e.start_ns(), e.end_ns()) for e in events]


def is_op_overload(target: object) -> bool:
    """True for any registered operator overload (aten, prims or custom), whose
    schema says what it reads, writes and aliases."""
    return isinstance(target, torch._ops.OpOverload)


def input_names(gm: fx.GraphModule) -> list[str | None]:
    """For each input of a Dynamo graph, the attribute path it was read from relative to
    the compiled module (``net.0.weight`` for ``L['self']._modules['net']._modules['0']
    ._parameters['weight']``), or None when Dynamo recorded no source."""
    names: list[str | None] = []
    for node in gm.graph.find_nodes(op="placeholder"):
        source = getattr(node.meta.get("grapharg"), "source", None)
        name = getattr(source, "name", None)
        name = name() if callable(name) else name
        if not isinstance(name, str):
            names.append(None)
            continue
        path = re.sub(r"\._(modules|parameters|buffers)\b", "", name)
        path = re.sub(r"^L\[['\"][^'\"]+['\"]\]\.?", "", path)
        names.append(re.sub(r"\[['\"]?([^\]'\"]+)['\"]?\]", r".\1", path).strip("."))
    return names


def graph_break_reason(gm: fx.GraphModule) -> str | None:
    """Why Dynamo ended this graph where the model's code goes on (a graph break), or
    None where the graph runs to the frame's return (``OutputGraph`` files the reason
    on the module it hands the backend; pieces split off by DDP's optimizer have none)."""
    reason = getattr(gm, "compile_subgraph_reason", None)
    if reason is None or not getattr(reason, "graph_break", False):
        return None
    first = next((line.strip() for line in str(reason.reason).splitlines() if line.strip()), "")
    return first.split(" Explanation:")[0][:200]


def graph_parameters(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> list[torch.nn.Parameter]:
    """The model's parameters among the inputs of a Dynamo graph. Usually the inputs
    themselves; under DDP's optimizer (the graph split at each gradient bucket) each
    piece gets fake copies, and the real parameter is the one Dynamo recorded for the
    placeholder (``meta["grapharg"]``)."""
    found = []
    for node, value in zip(gm.graph.find_nodes(op="placeholder"), example_inputs, strict=False):
        if isinstance(value, torch._subclasses.fake_tensor.FakeTensor):
            grapharg = node.meta.get("grapharg")
            try:
                value = grapharg.example if grapharg is not None else None
            except (AssertionError, AttributeError):  # the recorded tensor is gone
                value = None
        if isinstance(value, torch.nn.Parameter):
            found.append(value)
    return found


def compile_in_place(module: torch.nn.Module, **compile_kwargs: Any) -> None:
    """Route ``module``'s calls through ``torch.compile(**compile_kwargs)``, keeping the object
    (and so its ``state_dict`` keys). Not ``module.compile()``: that compiles
    ``Module._call_impl``, a frame Dynamo skips, so a module whose ``forward`` is torch.nn's
    own (``nn.Sequential``) runs uncompiled without a word. Each module gets its own code
    object, hence its own Dynamo cache: they would otherwise share one, and the ninth
    module would hit the recompile limit and run eagerly."""
    call = module._call_impl

    def call_module(*args: Any, **kwargs: Any) -> Any:
        return call(*args, **kwargs)

    call_module.__code__ = call_module.__code__.replace()
    module._compiled_call_impl = torch.compile(call_module, **compile_kwargs)


def is_compiled(module: torch.nn.Module) -> bool:
    """True for what ``torch.compile(module)`` returns and for a module compiled in place."""
    return isinstance(module, torch._dynamo.eval_frame.OptimizedModule) or module._compiled_call_impl is not None


def uncompile_in_place(module: torch.nn.Module) -> None:
    """Undo ``compile_in_place``: calls run the module eagerly again."""
    module._compiled_call_impl = None
