"""A Lightning callback that trains a LightningModule's networks under remat.

    trainer = L.Trainer(callbacks=[Remat(memory_budget="6GB")])

Lightning calls ``training_step``, not the module, so compiling the LightningModule
would compile nothing the step runs unless it calls ``self(x)``. The callback compiles
each of its top-level submodules with parameters (``self.net``) in place when fitting
starts, after ``configure_model`` has built them and the strategy has wrapped them:
the same objects, so optimizers, DDP and checkpoint keys (no ``_orig_mod.``) are
unchanged. Put the loss inside such a submodule and the Plan covers it too. When
fitting ends they run eagerly again; their Plans stay (``remat.explain(module.net)``).
For the ``lightning`` package (``lightning.pytorch``): the standalone ``pytorch_lightning``
package has its own ``Callback`` class, which this one does not derive from.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as L
import torch

from remat import _torch_internals as internals
from remat import env_options
from remat.backend import remat_backend


class Remat(L.Callback):
    """Compile the LightningModule's top-level networks with ``backend="remat"`` and ``options``
    (checked here; with none, those of the environment: ``remat.env_options``)."""

    def __init__(self, **options: Any) -> None:
        self.options = env_options.resolve(options).to_dict()
        self.compiled: list[torch.nn.Module] = []

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for child in pl_module.children():
            if internals.is_compiled(child) or not any(p.requires_grad for p in child.parameters()):
                continue
            internals.compile_in_place(child, backend=remat_backend, options=self.options)
            self.compiled.append(child)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for child in self.compiled:
            internals.uncompile_in_place(child)
        self.compiled.clear()
