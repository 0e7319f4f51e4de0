"""Gradient compression: the ``compress`` option, the store, the DDP comm hooks."""
