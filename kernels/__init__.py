"""Triton kernels and their plain-PyTorch references (installed as `videoprism.kernels`).

One op per file: the Triton kernels, their host launchers and the `<op>_ref`
reference that tests and benchmarks share.
"""
