"""Kernel sources: Numba CUDA kernels (.py) and CuPy RawKernel sources (.cu/.cuh)."""
