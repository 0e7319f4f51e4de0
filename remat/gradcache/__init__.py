"""Gradient caching for contrastive training: batches far larger than one forward fits,
in the memory of one chunk, with the gradients of the whole batch.

    gc = remat.GradCache(encoder, chunk_size=32, loss_fn=remat.InfoNCE(temperature=0.05))
    loss = gc(queries, documents)   # forward, loss and backward; then optimizer.step()
"""

from remat.gradcache.cache import GradCache
from remat.gradcache.functional import cached, cat_input_tensor
from remat.gradcache.losses import CLIPLoss, InfoNCE

__all__ = ["CLIPLoss", "GradCache", "InfoNCE", "cached", "cat_input_tensor"]
