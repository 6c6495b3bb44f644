"""Triton kernels for the GPU engine path (each module imports triton; import them lazily)."""
