"""remat's warnings name the user's line, not a frame inside torch.compile."""

from __future__ import annotations

import sys
import warnings

import torch
import torch.nn as nn

import remat
from remat.warning_site import user_stacklevel


def test_planning_warnings_name_the_line_that_ran_the_model() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8))
    options = {"inner_compiler": "eager", "exclude": ["nothing"], "memory_budget": 2, "on_infeasible": "closest"}
    compiled = torch.compile(model, backend="remat", options=options)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = sys._getframe().f_lineno + 1
        compiled(torch.randn(4, 8)).sum().backward()
    ours = [w for w in caught if issubclass(w.category, remat.RematBudgetWarning)]
    messages = " | ".join(str(w.message) for w in ours)
    assert "matches no module" in messages and "lowest-memory plan" in messages, messages
    assert {(w.filename, w.lineno) for w in ours} == {(__file__, line)}


def test_a_warning_raised_in_user_code_names_its_own_line() -> None:
    def warn_here() -> None:
        warnings.warn("here", UserWarning, stacklevel=user_stacklevel())

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_here()
    assert [(w.filename, w.lineno) for w in caught] == [(__file__, warn_here.__code__.co_firstlineno + 1)]
