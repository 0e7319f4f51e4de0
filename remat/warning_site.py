"""Where remat's warnings point: at the user's line, not at torch.compile's internals.

remat plans while ``torch.compile`` traces the model, a few dozen frames below the
line that ran it; a fixed ``stacklevel`` names a frame inside torch (Dynamo, AOTAutograd,
Inductor), which tells the user nothing.
"""

from __future__ import annotations

import os
import sys
import sysconfig

import torch

_INTERNAL = tuple(
    os.path.join(os.path.realpath(directory), "")
    for directory in (os.path.dirname(torch.__file__), os.path.dirname(__file__), sysconfig.get_paths()["stdlib"])
)


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes a ``warnings.warn`` in the caller of this function
    name the first frame outside torch, remat, the standard library and generated code
    (FX's ``<eval_with_key>``): the user's line that ran or compiled the model."""
    frame = sys._getframe(1)
    level = 1
    while frame.f_back is not None and _internal(frame.f_code.co_filename):
        frame = frame.f_back
        level += 1
    return level


def _internal(filename: str) -> bool:
    return filename.startswith("<") or os.path.realpath(filename).startswith(_INTERNAL)
