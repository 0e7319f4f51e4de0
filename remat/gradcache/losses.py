"""Contrastive losses over in-batch negatives, for ``GradCache(loss_fn=...)``.

Both score every query against every document of the batch (all ranks' under
torch.distributed), so the negatives grow with the batch: the reason to cache gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check_temperature(temperature: float | torch.Tensor) -> None:
    if isinstance(temperature, torch.Tensor):
        if temperature.numel() != 1:
            raise ValueError(f"temperature must be a number or a one-element tensor; got shape {tuple(temperature.shape)}")
    elif isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a number > 0 (or a one-element tensor to learn it); got {temperature!r}")


class _Contrastive(torch.nn.Module):
    """Similarities of two sets of representations, over a temperature."""

    def __init__(self, temperature: float | torch.Tensor, normalize: bool) -> None:
        super().__init__()
        _check_temperature(temperature)
        self.temperature = temperature
        self.normalize = normalize

    def logits(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
            raise ValueError(
                f"contrastive losses take two (rows, dim) representations of the same dim; got shapes "
                f"{tuple(a.shape)} and {tuple(b.shape)}"
            )
        if self.normalize:
            a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
        return a @ b.T / self.temperature


class InfoNCE(_Contrastive):
    """InfoNCE with in-batch negatives: query i's positive is document ``i * k`` (``k`` =
    documents per query: 1, or 1 positive followed by k - 1 hard negatives), and every
    other document of the batch is a negative. Mean cross-entropy over the queries.

    temperature: divides the similarities (a number > 0, or a one-element tensor, e.g. a
        learnable parameter). normalize: cosine similarity (default) instead of dot product.
    """

    def __init__(self, temperature: float | torch.Tensor = 0.05, normalize: bool = True) -> None:
        super().__init__(temperature, normalize)

    def forward(self, queries: torch.Tensor, documents: torch.Tensor) -> torch.Tensor:
        if queries.shape[0] == 0 or documents.shape[0] % queries.shape[0]:
            raise ValueError(
                f"InfoNCE needs k >= 1 documents per query (documents = k * queries); got "
                f"{queries.shape[0]} queries and {documents.shape[0]} documents"
            )
        per_query = documents.shape[0] // queries.shape[0]
        logits = self.logits(queries, documents)
        targets = torch.arange(queries.shape[0], device=logits.device) * per_query
        return F.cross_entropy(logits, targets)


class CLIPLoss(_Contrastive):
    """Symmetric CLIP loss: the mean of the cross-entropies of matching each ``a`` row to the
    ``b`` rows and each ``b`` row to the ``a`` rows; row i of ``a`` and of ``b`` are a pair.

    temperature: as for ``InfoNCE`` (CLIP learns it: pass a parameter). normalize: cosine
    similarity (default) instead of dot product.
    """

    def __init__(self, temperature: float | torch.Tensor = 0.07, normalize: bool = True) -> None:
        super().__init__(temperature, normalize)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.shape[0] != b.shape[0]:
            raise ValueError(f"CLIPLoss pairs row i of a with row i of b; got {a.shape[0]} and {b.shape[0]} rows")
        logits = self.logits(a, b)
        targets = torch.arange(a.shape[0], device=logits.device)
        return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
