"""Shared test setup: hypothesis profiles and a clean Dynamo state per test."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# `make test`: 100 examples per property; `make test-slow`: 2000. Compiling a model
# takes far longer than hypothesis' default deadline, hence no deadline.
for profile, examples in (("default", 100), ("slow", 2000)):
    settings.register_profile(
        profile,
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        print_blob=True,
    )
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: no cache entries or recompile limits carried over."""
    torch.compiler.reset()
    yield
    torch.compiler.reset()
