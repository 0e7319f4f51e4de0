"""The typed, validated options of the remat backend.

Options are checked before any tracing or planning, so a typo costs nothing but an
error message. Every error names the option, the value given and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from collections.abc import Mapping
from typing import Any, Literal

from remat.compress.settings import CompressOptions

INNER_COMPILERS = ("inductor", "eager")
ON_PLAN_FAILURE = ("warn", "raise")
ON_INFEASIBLE = ("raise", "closest")
TIME_ESTIMATORS = ("roofline", "profile")
POLICIES = ("full", "every_n", "sqrt_n", "heavy_ops", "none")
OFFLOAD_CHOICES = (False, True, "auto")
DEFAULT_OFFLOAD_MIN_BYTES = 2**20

_UNITS = {
    "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}
_BUDGET_HELP = (
    "a number of bytes (6e9), a string with a unit ('6GB', '512MiB'), a fraction 0 < x <= 1 "
    "of the peak without rematerialization (0.5), or 'auto'"
)


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
    memory_budget:
        The most memory a training step may use: parameters, inputs, gradients, saved
        and transient activations, as the simulator predicts them for the inner compiler
        (Inductor's fused kernels, or op by op). Bytes (``6e9``,
        ``"6GB"``, ``"512MiB"``), a fraction of the peak without rematerialization
        (``0.5``), or ``"auto"`` (what the device has free, less 10%). remat then
        recomputes the least work that brings the simulated peak under the budget.
    on_infeasible:
        What to do when no plan meets ``memory_budget``: ``"raise"`` (default) a
        ``ValueError`` that says the lowest peak reachable; ``"closest"``: warn and use
        the lowest-memory plan.
    policy:
        A fixed checkpointing scheme over the forward's segments (layer boundaries
        found in the graph): ``"full"`` recomputes every segment from its input,
        ``"every_n"`` recomputes groups of ``every_n`` segments from the group's input,
        ``"sqrt_n"`` groups of about sqrt(#segments), ``"heavy_ops"`` keeps matmul,
        convolution and attention outputs and recomputes the rest, ``"none"`` keeps
        everything the backward reads. With a ``memory_budget``, the policy constrains
        and the budget decides the rest (which groups to recompute).
    every_n:
        The group size of ``policy="every_n"``.
    exclude:
        Module names (``fnmatch`` patterns on the qualified name, e.g. ``"lm_head"``,
        ``"blocks.0.*"``) whose values are never recomputed.
    save_only:
        Names given to values in the model with ``remat.tag(x, "name")`` (like JAX's
        ``checkpoint_name`` and ``save_only_these_names``): the backward keeps only the
        values tagged with one of these names (those it needs, directly or to
        recompute something), plus what can never be recomputed (parameters and
        inputs, random ops, ops with side effects, values of ``exclude``'d modules),
        and recomputes everything else from them, matmuls included. A list of names or
        one name; a name that tags no value of a graph warns. With a
        ``memory_budget``, the plan's simulated peak is checked against the budget
        (``on_infeasible`` says what happens when it does not fit: this is the only
        plan the names allow). Cannot be combined with ``policy``: both say what to
        keep.
    offload:
        Move saved activations to host memory between the forward and the backward.
        ``False`` (default): never. ``True``: every saved activation that can be
        offloaded (at least ``offload_min_bytes``; not a parameter, input, view or
        forward output), with a ``memory_budget`` deciding what to recompute besides.
        ``"auto"``: the solver chooses per value between keeping, recomputing and
        offloading under the ``memory_budget`` (required), by simulated peak and
        estimated time, transfer time not hidden by compute included. Offloads run on a
        side stream and reloads are issued ahead of their first use (prefetch). On a
        CPU, whose memory is the host's, a host copy frees nothing: ``"auto"``
        offloads nothing there, and ``True`` offloads as asked and warns
        (``RematOffloadWarning``).
    offload_min_bytes:
        The smallest value offloaded (bytes, or a string with a unit: ``"1MiB"``);
        smaller transfers cost more in latency than they save. Default 1 MiB.
    offload_only:
        Names given with ``remat.tag(x, name)``: offload exactly the values tagged with
        one of them (they are kept, never recomputed), and nothing else.
    host_bandwidth:
        Bytes per second between device and pinned host memory, one direction
        (``25e9`` or ``"25GB/s"``); default: the device profile's (PCIe 5 for
        H100/H200, PCIe 4 for A100, the copy bandwidth of a CPU).
    compress:
        Gradient compression (``remat.compress.settings.CompressOptions``): a dict
        such as ``{"method": "topk", "ratio": 100}`` or a method name. Each parameter's
        gradient is compressed as the backward produces it and handed to a
        ``remat.GradientStore``; with ``distributed=True``, DDP's comm hook compresses
        communication instead.
    """

    inner_compiler: Literal["inductor", "eager"] = "inductor"
    on_plan_failure: Literal["warn", "raise"] = "warn"
    time_estimator: Literal["roofline", "profile"] = "roofline"
    memory_budget: int | float | str | None = None
    on_infeasible: Literal["raise", "closest"] = "raise"
    policy: Literal["full", "every_n", "sqrt_n", "heavy_ops", "none"] | None = None
    every_n: int = 2
    exclude: tuple[str, ...] = ()
    save_only: tuple[str, ...] = ()
    compress: CompressOptions | None = None
    offload: bool | Literal["auto"] = False
    offload_min_bytes: int = DEFAULT_OFFLOAD_MIN_BYTES
    offload_only: tuple[str, ...] = ()
    host_bandwidth: float | None = None

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
            if name not in known:
                close = difflib.get_close_matches(name, sorted(known), n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise ValueError(
                    f"unknown remat option {name!r} (value {options[name]!r}); "
                    f"allowed options are {sorted(known)}.{hint}"
                )
        values = dict(options)
        _check_choice("inner_compiler", values.get("inner_compiler", "inductor"), INNER_COMPILERS)
        _check_choice("on_plan_failure", values.get("on_plan_failure", "warn"), ON_PLAN_FAILURE)
        _check_choice("time_estimator", values.get("time_estimator", "roofline"), TIME_ESTIMATORS)
        _check_choice("on_infeasible", values.get("on_infeasible", "raise"), ON_INFEASIBLE)
        if values.get("policy") is not None:
            _check_choice("policy", values["policy"], POLICIES)
        if "memory_budget" in values and values["memory_budget"] is not None:
            parse_budget(values["memory_budget"])
        every_n = values.get("every_n", 2)
        if isinstance(every_n, bool) or not isinstance(every_n, int) or every_n < 1:
            raise ValueError(f"remat option 'every_n' must be an integer >= 1; got {every_n!r}")
        if "every_n" in values and values.get("policy") != "every_n":
            raise ValueError(
                f"remat option 'every_n' (got {every_n!r}) only applies to policy='every_n'; "
                f"got policy={values.get('policy')!r}"
            )
        values["exclude"] = _check_exclude(values.get("exclude", ()))
        save_only = values.get("save_only")
        values["save_only"] = () if save_only is None else _check_save_only(save_only)
        if values["save_only"] and values.get("policy") is not None:
            raise ValueError(
                f"remat options 'save_only' (got {list(values['save_only'])!r}) and 'policy' (got "
                f"{values['policy']!r}) cannot be combined: both say which values the backward keeps. "
                "Pass one of them"
            )
        if values.get("compress") is not None:
            values["compress"] = CompressOptions.from_value(values["compress"])
        _check_offload(values)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["exclude"] = list(self.exclude)
        if self.save_only:
            values["save_only"] = list(self.save_only)
        else:
            del values["save_only"]  # off (an explicit empty list is refused)
        if self.compress is None:
            del values["compress"]
        else:
            values["compress"] = self.compress.to_dict()
        if self.offload_only:
            values["offload_only"] = list(self.offload_only)
        else:
            del values["offload_only"]
        if self.policy != "every_n":
            del values["every_n"]  # only meaningful (and only accepted) with that policy
        return values


def parse_budget(value: object) -> tuple[Literal["bytes", "fraction", "auto"], float]:
    """Read a ``memory_budget``: ("bytes", n), ("fraction", x) or ("auto", 0)."""
    if isinstance(value, str):
        text = value.strip()
        if text.lower() == "auto":
            return "auto", 0.0
        amount = _bytes_in(text)
        if amount is None or amount <= 0:
            raise ValueError(f"remat option 'memory_budget' must be {_BUDGET_HELP}; got {value!r}")
        return "bytes", amount
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
        if value <= 1:
            return "fraction", float(value)
        if float(value).is_integer():
            return "bytes", float(value)
        raise ValueError(
            f"remat option 'memory_budget' must be {_BUDGET_HELP}; got {value!r}, which is above 1, so bytes, "
            "but not a whole number of them"
        )
    raise ValueError(f"remat option 'memory_budget' must be {_BUDGET_HELP}; got {value!r}")


def _check_offload(values: dict[str, Any]) -> None:
    """Validate the offload options in place (sizes and bandwidths to numbers)."""
    offload = values.get("offload", False)
    if not any(offload is choice or (isinstance(choice, str) and offload == choice) for choice in OFFLOAD_CHOICES):
        raise ValueError(f"remat option 'offload' must be one of {list(OFFLOAD_CHOICES)}; got {offload!r}")
    if offload == "auto" and values.get("memory_budget") is None:
        raise ValueError(
            "remat option offload='auto' chooses what to offload to meet a memory_budget; pass one "
            "(e.g. memory_budget=0.5), or offload=True to offload every eligible saved activation"
        )
    if "offload_min_bytes" in values:
        values["offload_min_bytes"] = _parse_amount(
            "offload_min_bytes", values["offload_min_bytes"], "a number of bytes >= 0 (1048576) or a string with a unit ('1MiB')",
            allow_zero=True,
        )
    only = values.get("offload_only")
    if only is None or only == ():
        values["offload_only"] = ()
    else:
        names = (only,) if isinstance(only, str) else only
        if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) and n for n in names):
            raise ValueError(
                "remat option 'offload_only' must be a non-empty list of names given with remat.tag(x, name) "
                f"(e.g. ['attn_out']); got {only!r}"
            )
        if offload is False and "offload" in values:
            raise ValueError(
                f"remat options offload=False and offload_only={list(names)!r} contradict each other; "
                "drop offload=False to offload the tagged values"
            )
        if offload == "auto":
            raise ValueError(
                f"remat options offload='auto' and offload_only={list(names)!r} cannot be combined: both say "
                "what to offload. Pass one of them"
            )
        values["offload_only"] = tuple(dict.fromkeys(names))
        values["offload"] = True
    if values.get("host_bandwidth") is not None:
        values["host_bandwidth"] = float(_parse_amount(
            "host_bandwidth", values["host_bandwidth"], "bytes per second > 0 (25e9) or a string such as '25GB/s'",
            per_second=True,
        ))


def _bytes_in(text: str) -> float | None:
    """The bytes a number with a unit stands for (``"6GB"``, ``"512 MiB"``); None if
    ``text`` is not one."""
    match = re.fullmatch(r"([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)", text)
    if match is None or match.group(2).upper() not in _UNITS:
        return None
    return float(match.group(1)) * _UNITS[match.group(2).upper()]


def _parse_amount(name: str, value: object, allowed: str, *, allow_zero: bool = False, per_second: bool = False) -> float:
    """A byte count (or bytes per second): a number, or a string with a unit."""
    number: float | None = None
    if isinstance(value, str):
        number = _bytes_in(re.sub(r"\s*/\s*s$", "", value.strip()) if per_second else value.strip())
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        number = float(value)
    if number is None or number < 0 or (number == 0 and not allow_zero):
        raise ValueError(f"remat option {name!r} must be {allowed}; got {value!r}")
    return int(number) if not per_second else number


def _check_exclude(value: object) -> tuple[str, ...]:
    patterns = (value,) if isinstance(value, str) else value
    if not isinstance(patterns, (list, tuple)) or not all(isinstance(p, str) and p for p in patterns):
        raise ValueError(
            f"remat option 'exclude' must be a module name pattern or a list of them "
            f"(e.g. ['embed', 'lm_head']); got {value!r}"
        )
    return tuple(patterns)


def _check_save_only(value: object) -> tuple[str, ...]:
    names = (value,) if isinstance(value, str) else value
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(
            f"remat option 'save_only' must be a non-empty list of names given with "
            f"remat.tag(x, name) (e.g. ['attn_out', 'mlp_in']; to recompute "
            f"the most, use policy='full'); got {value!r}"
        )
    return tuple(dict.fromkeys(names))


def _check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(
            f"remat option {name!r} must be one of {list(allowed)}; got {value!r}"
        )
