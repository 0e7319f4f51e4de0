"""Cost models: how many bytes a tensor holds and how much work an op costs."""
