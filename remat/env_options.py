"""remat's options from the environment, for frameworks that call torch.compile without options=.

Hugging Face's Trainer takes a backend name and nothing else, so its options come from
``REMAT_OPTIONS`` (a JSON object: ``'{"memory_budget": "6GB"}'``) or ``REMAT_CONFIG`` (the
path of a ``.json`` or ``.toml`` file holding the same). Options given in code
(``torch.compile(..., options=...)``, ``remat.compile``, ``remat.optimize``) win: the
environment is read only when none are given. Either way every option goes through
``RematOptions.from_mapping``, so a mistake gets the same error, plus where it came from.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from remat.options import RematOptions

OPTIONS_VARIABLE = "REMAT_OPTIONS"
CONFIG_VARIABLE = "REMAT_CONFIG"
_EXAMPLE = '\'{"memory_budget": "6GB", "inner_compiler": "eager"}\''


def resolve(options: Mapping[str, Any] | RematOptions | None) -> RematOptions:
    """The options given in code if any, else the environment's, else the defaults. An empty
    mapping counts as none, as it does for torch.compile, which passes no options={} on."""
    if options is None or (isinstance(options, Mapping) and not options):
        return from_environment()
    return RematOptions.from_mapping(options)


def from_environment(environ: Mapping[str, str] = os.environ) -> RematOptions:
    """The options ``REMAT_OPTIONS`` or the file ``REMAT_CONFIG`` names hold; defaults without either."""
    text = environ.get(OPTIONS_VARIABLE, "").strip()
    path = environ.get(CONFIG_VARIABLE, "").strip()
    if text and path:
        raise ValueError(
            f"both {OPTIONS_VARIABLE} ({text!r}) and {CONFIG_VARIABLE} ({path!r}) are set; "
            "remat reads its options from one of them: unset the other"
        )
    if text:
        source = f"the environment variable {OPTIONS_VARIABLE}"
        options = _parse_json(text, source)
    elif path:
        source = f"the file {path!r} named by {CONFIG_VARIABLE}"
        options = _read_file(Path(path), source)
    else:
        return RematOptions()
    try:
        return RematOptions.from_mapping(options)
    except ValueError as error:
        raise type(error)(f"{error} (options from {source})") from error


def _parse_json(text: str, source: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{source} must hold a JSON object of remat options, e.g. {_EXAMPLE}; "
            f"it is not JSON ({error}): got {text!r}"
        ) from None


def _read_file(path: Path, source: str) -> Any:
    if path.suffix not in (".json", ".toml"):
        raise ValueError(f"{source} must be a .json or a .toml file of remat options; got suffix {path.suffix!r}")
    try:
        text = path.read_text()
    except OSError as error:
        raise ValueError(f"cannot read {source}: {error.strerror}") from None
    if path.suffix == ".json":
        return _parse_json(text, source)
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"{source} is not TOML ({error})") from None
