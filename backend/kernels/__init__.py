"""Triton-language kernels for the CUDA decode step (imported only when triton is installed)."""
