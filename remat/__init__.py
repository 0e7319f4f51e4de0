"""remat: train models that would not otherwise fit in memory, at the least cost in speed.

    model = torch.compile(model, backend="remat", options={"memory_budget": "6GB"})
    # or
    model = remat.compile(model, inner_compiler="eager")
    ...
    print(remat.explain(model))   # what was kept, what is recomputed, and why
    remat.plan(model, x)          # the same Plan, with the predicted peak, without a step

    h = remat.tag(h, "attn_out")  # in model code: name a value, then keep only named values
    torch.compile(model, backend="remat", options={"save_only": ["attn_out"]})

    model = torch.compile(model, backend="remat", options={"compress": {"method": "topk", "ratio": 100}})
    store = remat.GradientStore(model, optimizer)  # optimizer.step() rebuilds each gradient in turn

    gc = remat.GradCache(encoder, chunk_size=32, loss_fn=remat.InfoNCE())  # contrastive, huge batches
    loss = gc(queries, documents)                                            # forward, loss and backward

    @remat.optimize(memory_budget="6GB")  # every model the function builds trains under remat
    def train(config): ...

    # no options= (Hugging Face's Trainer): REMAT_OPTIONS='{"memory_budget": "6GB"}' or REMAT_CONFIG=remat.toml
"""

from typing import Any

from remat.backend import compile, remat_backend
from remat.compress.distributed import register_compression_hook
from remat.compress.settings import CompressOptions
from remat.compress.slots import RematCompressWarning
from remat.compress.store import GradientStore
from remat.gradcache import CLIPLoss, GradCache, InfoNCE, cached, cat_input_tensor
from remat.integrations import huggingface as _huggingface
from remat.optimize import optimize
from remat.options import RematOptions
from remat.partition import RematFallbackWarning, RematOffloadWarning
from remat.plan import Decision, MemoryPrediction, Plan
from remat.planning import plan
from remat.registry import explain, plans
from remat.solver import RematBudgetWarning
from remat.tags import tag

__version__ = "0.1.0"

_huggingface.register_backend_name()  # TrainingArguments(torch_compile_backend="remat") passes accelerate's check


def __getattr__(name: str) -> Any:
    """``remat.report`` draws with matplotlib: imported on first use, not with remat."""
    if name == "report":
        import importlib

        return importlib.import_module("remat.report")
    raise AttributeError(f"module 'remat' has no attribute {name!r}")


__all__ = [
    "CLIPLoss",
    "CompressOptions",
    "Decision",
    "GradCache",
    "GradientStore",
    "InfoNCE",
    "MemoryPrediction",
    "Plan",
    "RematBudgetWarning",
    "RematCompressWarning",
    "RematFallbackWarning",
    "RematOffloadWarning",
    "RematOptions",
    "cached",
    "cat_input_tensor",
    "compile",
    "explain",
    "optimize",
    "plan",
    "plans",
    "register_compression_hook",
    "remat_backend",
    "tag",
    "__version__",
]
