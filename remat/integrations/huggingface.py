"""``TrainingArguments(torch_compile_backend="remat")`` for Hugging Face's Trainer.

The Trainer compiles through accelerate, whose ``TorchDynamoPlugin`` takes a backend
only if its ``DynamoBackend`` enum lists the name, and that list is closed: "remat" is
refused (``'REMAT' is not a valid DynamoBackend``) before torch.compile could look it
up. ``import remat`` adds the name, as a member made the way ``enum`` makes its own;
accelerate then passes ``backend="remat"`` to torch.compile, which finds the backend
through its entry point. The Trainer passes no options: they come from ``REMAT_OPTIONS``
or ``REMAT_CONFIG`` (``remat.env_options``).
"""

from __future__ import annotations

NAME = "REMAT"  # accelerate upper-cases backend names and lower-cases them for torch.compile


def register_backend_name() -> None:
    """Make accelerate's ``DynamoBackend("REMAT")`` a member; nothing without accelerate."""
    try:
        from accelerate.utils import DynamoBackend
    except ImportError:  # no accelerate: no Trainer compiles through it
        return

    if NAME in DynamoBackend.__members__:
        return
    member = str.__new__(DynamoBackend, NAME)
    member._name_ = NAME
    member._value_ = NAME
    DynamoBackend._member_map_[NAME] = member
    DynamoBackend._value2member_map_[NAME] = member
    DynamoBackend._member_names_.append(NAME)
