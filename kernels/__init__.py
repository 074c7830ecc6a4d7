"""Rasterizers of the accumulated-sum splat render: Triton kernels and their PyTorch twins."""
