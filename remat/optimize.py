"""``@remat.optimize(...)``: the models a training function builds train under remat.

    @remat.optimize(memory_budget="6GB")
    def train(config):
        model = build_model(config)    # compiled with backend="remat" and these options
        ...                            # the training loop, unchanged

One line for a function that is a pipeline's unit of work (a Metaflow step, a Ray task):
while it runs, each top-level module it builds, and each module passed to it as an
argument, is compiled in place (the same object, the same ``state_dict`` keys) with
``backend="remat"`` and the options. A module is seen being built through torch's global
registration hooks, when it registers a parameter or a submodule; once registered inside
another module it is left to that module's graph, so only top-level modules are
compiled. Modules compiled already are left alone. When the function returns or
raises, the hooks are removed and the modules it compiled run eagerly again; their
Plans stay (``remat.explain(model)``). The hooks are global: modules other threads
build meanwhile are compiled too.

The options are checked when the function is decorated (a mistake is a ``ValueError``
then, not in the middle of a run); with none, those of the environment
(``remat.env_options``). With ``compress``, the function still makes a
``remat.GradientStore(model, optimizer)``, as any loop must.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch.nn.modules import module as nn_module

from remat import _torch_internals as internals
from remat import env_options
from remat.backend import remat_backend

F = TypeVar("F", bound=Callable[..., Any])


def optimize(function: F | None = None, /, **options: Any) -> Any:
    """Decorate a training function: ``@remat.optimize(memory_budget=...)`` or ``@remat.optimize``."""
    if function is not None and not callable(function):
        raise TypeError(
            f"remat.optimize takes options as keywords (@remat.optimize(memory_budget='6GB')); "
            f"got the positional argument {function!r}"
        )
    checked = env_options.resolve(options).to_dict()

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            with _Session(checked) as session:
                for value in (*args, *kwargs.values()):
                    if isinstance(value, torch.nn.Module):
                        session.adopt(value)
                return fn(*args, **kwargs)

        return run  # type: ignore[return-value]

    return decorate if function is None else decorate(function)


_sessions: list[_Session] = []


class _Session:
    """One run of a decorated function: the modules it compiled, and the hooks that find them."""

    def __init__(self, options: dict[str, Any]) -> None:
        self.options = options
        self.compiled: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()
        self.inner: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()

    def __enter__(self) -> _Session:
        self.handles = [
            nn_module.register_module_parameter_registration_hook(self._on_parameter),
            nn_module.register_module_module_registration_hook(self._on_submodule),
        ]
        _sessions.append(self)
        return self

    def __exit__(self, *exc_info: object) -> None:
        _sessions.remove(self)
        for handle in self.handles:
            handle.remove()
        for module in list(self.compiled):
            internals.uncompile_in_place(module)

    def adopt(self, module: torch.nn.Module) -> None:
        """Compile ``module`` in place, unless it lies inside another or is compiled already."""
        if module in self.compiled or module in self.inner or internals.is_compiled(module):
            return
        internals.compile_in_place(module, backend=remat_backend, options=self.options)
        self.compiled.add(module)

    def _on_parameter(self, module: torch.nn.Module, name: str, parameter: torch.nn.Parameter | None) -> None:
        if _sessions[-1] is self:  # nested decorated functions: the innermost one's options
            self.adopt(module)

    def _on_submodule(self, module: torch.nn.Module, name: str, submodule: torch.nn.Module | None) -> None:
        if _sessions[-1] is not self:
            return
        if submodule is not None:
            self.inner.add(submodule)
            if submodule in self.compiled:
                self.compiled.discard(submodule)
                internals.uncompile_in_place(submodule)
        self.adopt(module)
