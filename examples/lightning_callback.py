"""Lightning with the remat callback: ``python examples/lightning_callback.py``."""

from __future__ import annotations

import lightning.pytorch as L
import torch
from torch import nn

from remat.integrations.lightning import Remat

CPU_RUN = {"max_epochs": 1, "accelerator": "cpu", "logger": False, "enable_checkpointing": False,
           "enable_progress_bar": False, "enable_model_summary": False}


class Regression(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 1))

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def data() -> torch.utils.data.DataLoader:
    """Four batches of 16 from a learnable regression."""
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=16)


def main() -> Regression:
    model = Regression()
    trainer = L.Trainer(callbacks=[Remat(memory_budget="1MiB", inner_compiler="eager")], **CPU_RUN)
    trainer.fit(model, data())
    return model


if __name__ == "__main__":
    import remat

    print(remat.explain(main().net))
