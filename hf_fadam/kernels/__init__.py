"""Fused FAdam kernels: ``triton_fadam`` (the only module that imports triton) and ``cpu_fused`` (a C kernel)."""
