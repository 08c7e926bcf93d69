"""Around the conversion, not in it: benchmarks, FLOPs, plots, synthetic checkpoints, ``inspect``."""
