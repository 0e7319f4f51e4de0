"""The ``compress`` option: which gradient compression, validated before any work.

    options={"compress": {"method": "topk", "ratio": 100, "error_feedback": True,
                          "to": "cpu", "exclude": ["embed", "lm_head"]}}

Every error names the field, the value given and what is allowed, like the other options.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections.abc import Mapping
from typing import Any, Literal

METHODS = ("topk", "powersgd", "bf16", "none")
DISTRIBUTED_METHODS = ("powersgd", "bf16", "none")  # what torch.distributed's comm hooks do
PLACES = ("cpu", "device")
_FIELDS = ("method", "ratio", "rank", "error_feedback", "to", "exclude", "distributed")


@dataclasses.dataclass(frozen=True)
class CompressOptions:
    """How parameter gradients are compressed as the backward produces them.

    method:
        ``"topk"`` keeps the ``numel / ratio`` largest |g| (values and int32 indices);
        ``"powersgd"`` keeps a rank-``rank`` factorization ``P Q^T`` of each matrix
        (one power iteration, warm-started from the last step's ``Q``); ``"bf16"`` keeps
        a bfloat16 copy; ``"none"`` turns compression off.
    ratio:
        top-k only: dense elements per kept element (>= 1).
    rank:
        powersgd only: the rank of the approximation (>= 1).
    error_feedback:
        Add what compression dropped to the next step's gradient (a dense fp32 residual
        per parameter, kept beside the parameter). Without it top-k and PowerSGD lose
        that part of the gradient for good and convergence suffers. Default: on, except
        for ``distributed`` bf16, whose torch hook has none.
    to:
        Where compressed gradients wait for the optimizer: ``"device"`` (beside the
        parameter) or ``"cpu"`` (pinned host memory when the parameter is on a GPU).
    exclude:
        Parameter or module name patterns (``fnmatch``, e.g. ``"lm_head"``,
        ``"blocks.0.*"``) whose gradients stay dense and uncompressed.
    distributed:
        Compress data-parallel communication instead: gradients stay dense in the
        backward, and ``remat.register_compression_hook(ddp_model, ...)`` registers
        torch.distributed's own DDP comm hook (PowerSGD with error feedback, or bf16).
    """

    method: Literal["topk", "powersgd", "bf16", "none"] = "topk"
    ratio: float = 100.0
    rank: int = 4
    error_feedback: bool = True
    to: Literal["cpu", "device"] = "device"
    exclude: tuple[str, ...] = ()
    distributed: bool = False

    @property
    def compresses_backward(self) -> bool:
        """True when the backward pass hands gradients to a GradientStore."""
        return self.method != "none" and not self.distributed

    @classmethod
    def from_value(cls, value: object) -> CompressOptions:
        """Validate the ``compress`` option (a dict, or a method name); ValueError naming what is wrong."""
        if isinstance(value, CompressOptions):
            return value
        if isinstance(value, str):
            value = {"method": value}
        if not isinstance(value, Mapping):
            raise ValueError(
                f"remat option 'compress' must be a dict with fields {list(_FIELDS)} (e.g. "
                f"{{'method': 'topk', 'ratio': 100}}) or a method name {list(METHODS)}; got {value!r}"
            )
        for name in value:
            if name not in _FIELDS:
                raise ValueError(f"unknown field {name!r} of remat option 'compress'; allowed fields are {list(_FIELDS)}")
        method = value.get("method", "topk")
        if not isinstance(method, str) or method not in METHODS:
            raise ValueError(f"remat option 'compress': 'method' must be one of {list(METHODS)}; got {method!r}")
        distributed = _flag(value, "distributed", False)
        _only_for(value, "ratio", method, "topk")
        _only_for(value, "rank", method, "powersgd")
        ratio = value.get("ratio", 100.0)
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or ratio < 1:
            raise ValueError(f"remat option 'compress': 'ratio' must be a number >= 1 (dense elements per kept one); got {ratio!r}")
        rank = value.get("rank", 4)
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"remat option 'compress': 'rank' must be an integer >= 1; got {rank!r}")
        to = value.get("to", "device")
        if not isinstance(to, str) or to not in PLACES:
            raise ValueError(f"remat option 'compress': 'to' must be one of {list(PLACES)}; got {to!r}")
        exclude = value.get("exclude", ())
        patterns = (exclude,) if isinstance(exclude, str) else exclude
        if not isinstance(patterns, (list, tuple)) or not all(isinstance(p, str) and p for p in patterns):
            raise ValueError(
                f"remat option 'compress': 'exclude' must be a parameter name pattern or a list of them "
                f"(e.g. ['embed', 'lm_head']); got {exclude!r}"
            )
        error_feedback = _flag(value, "error_feedback", not (distributed and method == "bf16"))
        if distributed:
            _check_distributed(value, method, error_feedback)
        return cls(method, float(ratio), rank, error_feedback, to, tuple(patterns), distributed)

    def to_dict(self) -> dict[str, Any]:
        """The fields a user would write; ``from_value`` reads them back unchanged."""
        values = dataclasses.asdict(self)
        values["exclude"] = list(self.exclude)
        if self.method != "topk":
            del values["ratio"]
        if self.method != "powersgd":
            del values["rank"]
        if self.distributed:
            del values["to"]
        return values


def matching_pattern(name: str, patterns: tuple[str, ...]) -> str | None:
    """The first pattern naming parameter ``name`` or a module it is in: ``"embed"``
    matches ``embed.weight`` and ``model.embed.weight``; ``"blocks.0.*"`` matches
    ``blocks.0.attn.weight`` (the module ``exclude`` option's rule, on parameters)."""
    parts = name.split(".")
    prefixes = [".".join(parts[:i]) for i in range(len(parts), 0, -1)]
    for pattern in patterns:
        if any(fnmatch.fnmatchcase(p, pattern) or fnmatch.fnmatchcase(p, "*." + pattern) for p in prefixes):
            return pattern
    return None


def _flag(value: Mapping[str, Any], name: str, default: bool) -> bool:
    flag = value.get(name, default)
    if not isinstance(flag, bool):
        raise ValueError(f"remat option 'compress': {name!r} must be True or False; got {flag!r}")
    return flag


def _only_for(value: Mapping[str, Any], name: str, method: str, owner: str) -> None:
    if name in value and method != owner:
        raise ValueError(
            f"remat option 'compress': {name!r} (got {value[name]!r}) only applies to method={owner!r}; got method={method!r}"
        )


def _check_distributed(value: Mapping[str, Any], method: str, error_feedback: bool) -> None:
    if method not in DISTRIBUTED_METHODS:
        raise ValueError(
            f"remat option 'compress': with distributed=True, 'method' must be one of {list(DISTRIBUTED_METHODS)} "
            f"(torch.distributed's DDP comm hooks); got {method!r}"
        )
    for name in ("to", "exclude"):
        if name in value:
            raise ValueError(
                f"remat option 'compress': {name!r} (got {value[name]!r}) does not apply with distributed=True: "
                "gradients stay dense and DDP's comm hook compresses each bucket it sends"
            )
    if method == "bf16" and error_feedback:
        raise ValueError(
            "remat option 'compress': error_feedback=True is not available with method='bf16' and distributed=True "
            "(torch's bf16_compress_hook has none); pass error_feedback=False or method='powersgd'"
        )
