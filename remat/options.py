"""The typed, validated options of the remat backend.

Options are checked before any tracing or planning, so a typo costs nothing but an
error message. Every error names the option, the value given and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from typing import Any, Literal

INNER_COMPILERS = ("inductor", "eager")
ON_PLAN_FAILURE = ("warn", "raise")
TIME_ESTIMATORS = ("roofline", "profile")

# Options that later milestones implement. They are accepted by name so that a user
# sees "not implemented yet" instead of "unknown option", and never silently ignored.
NOT_IMPLEMENTED = {
    "memory_budget": "a peak-memory budget for the whole training step",
    "policy": "checkpoint policies (full, every_n, sqrt_n, heavy_ops, none)",
    "offload": "offloading saved activations to host memory",
    "compress": "gradient compression",
}


@dataclasses.dataclass(frozen=True)
class RematOptions:
    """Options of ``torch.compile(model, backend="remat", options={...})``.

    inner_compiler:
        ``"inductor"`` (default) compiles the forward and backward graphs with
        Inductor; ``"eager"`` runs them op by op (fast to compile, exact to debug).
    on_plan_failure:
        ``"warn"`` (default): if planning fails on a graph, fall back to PyTorch's
        default partition with one warning, so training goes on. ``"raise"``: raise.
    time_estimator:
        ``"roofline"`` (default): each op's time from its FLOPs and bytes on the
        device's profile (calibrated once on a CPU, cached; spec sheets for GPUs).
        ``"profile"``: time each distinct op on the device while planning (slower to
        plan, measured rather than modelled).
    """

    inner_compiler: Literal["inductor", "eager"] = "inductor"
    on_plan_failure: Literal["warn", "raise"] = "warn"
    time_estimator: Literal["roofline", "profile"] = "roofline"

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any] | None) -> RematOptions:
        """Validate a user's options mapping; raise ValueError naming what is wrong."""
        if options is None:
            return cls()
        if isinstance(options, RematOptions):
            return options
        if not isinstance(options, Mapping):
            raise ValueError(
                f"remat options must be a dict of option names to values; "
                f"got {type(options).__name__} {options!r}"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        for name in options:
            if not isinstance(name, str):
                raise ValueError(f"remat option names must be strings; got {name!r}")
            if name in NOT_IMPLEMENTED:
                raise NotImplementedError(
                    f"remat option {name!r} ({NOT_IMPLEMENTED[name]}) is not "
                    f"implemented yet; got {name}={options[name]!r}. Remove it: "
                    f"supported options are {sorted(known)}"
                )
            if name not in known:
                close = difflib.get_close_matches(name, sorted(known | set(NOT_IMPLEMENTED)), n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise ValueError(
                    f"unknown remat option {name!r} (value {options[name]!r}); "
                    f"allowed options are {sorted(known)}.{hint}"
                )
        values = dict(options)
        _check_choice("inner_compiler", values.get("inner_compiler", "inductor"), INNER_COMPILERS)
        _check_choice("on_plan_failure", values.get("on_plan_failure", "warn"), ON_PLAN_FAILURE)
        _check_choice("time_estimator", values.get("time_estimator", "roofline"), TIME_ESTIMATORS)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(
            f"remat option {name!r} must be one of {list(allowed)}; got {value!r}"
        )
