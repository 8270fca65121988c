"""Fused GPU kernels.  Each module imports its compiler (Triton) behind a guard, so importing never fails on a
machine without it; ask the module's ``is_usable(device)`` before calling a kernel."""
