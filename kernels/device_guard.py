"""The device a Triton launcher runs on.

Triton launches on the current CUDA device, whatever device the tensors are on: a model on cuda:1 in a
process whose current device is 0 (`videoprism embed --device cuda:1`, a library user who never called
`torch.cuda.set_device`) would hand device-1 pointers to a device-0 launch, an illegal address. The CUDA
C++ kernels take a `CUDAGuard` for the same reason; the Triton launchers take `on_tensor_device`.
"""
from __future__ import annotations

import functools

import torch


def on_tensor_device(launcher):
    """Run `launcher` with the current CUDA device set to that of its first tensor argument (and the
    current device left as it was); a no-op for CPU tensors and when the device already matches."""

    @functools.wraps(launcher)
    def run(*args, **kwargs):
        t = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if t is None or t.device.type != "cuda" or t.device.index in (None, torch.cuda.current_device()):
            return launcher(*args, **kwargs)
        with torch.cuda.device(t.device):
            return launcher(*args, **kwargs)

    return run
