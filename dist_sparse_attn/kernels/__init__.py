"""Attention backends over the sorted layout: Triton kernels and a tiled PyTorch backend."""
