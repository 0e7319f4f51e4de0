"""Shared test setup: hypothesis profiles and a clean Dynamo state per test."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# `make test`: 100 examples per property, unless it sets fewer; `make test-slow`: 2000.
# Compiling a model takes far longer than hypothesis' default deadline, hence no deadline.
for profile, examples in (("default", 100), ("slow", 2000)):
    settings.register_profile(
        profile,
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        print_blob=True,
    )
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(autouse=True, scope="session")
def private_calibration_cache(tmp_path_factory: pytest.TempPathFactory):
    """Calibrations made while the tests run (the machine busy with them) go to a
    directory of this session, never to the user's ``~/.cache/remat``, where they
    would price every later plan."""
    previous = os.environ.get("REMAT_CACHE_DIR")
    os.environ["REMAT_CACHE_DIR"] = str(tmp_path_factory.mktemp("remat-cache"))
    yield
    if previous is None:
        os.environ.pop("REMAT_CACHE_DIR", None)
    else:
        os.environ["REMAT_CACHE_DIR"] = previous


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: no cache entries or recompile limits carried over."""
    torch.compiler.reset()
    yield
    torch.compiler.reset()
