"""Runnable scripts of the README's "Where you already train"; tests/ imports and runs them."""
