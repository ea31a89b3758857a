"""Triton kernels and their plain-PyTorch references (installed as `videoprism.kernels`).

One op per file: the Triton kernels and their host launchers. The plain-PyTorch references that
tests, benchmarks and the CPU path share need no Triton and live apart: factorized_attention.py
(attention), token_ops_ref.py (the token ops).
"""
