"""Kernels: Triton-language ones for the CUDA decode step (imported only when triton is installed), and the CPU
int4 GEMV (cpu_int4_gemv.cpp, built at first use by cpu_int4.py)."""
