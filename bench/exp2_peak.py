"""The special-function unit's measured rate: a third ceiling for attention.

Softmax attention spends one exponential per score (two with the logit cap's tanh) against
4 * Dh matmul FLOPs per score. Hopper's MUFU unit does 16 exp2 / tanh / rcp a clock per SM
and its tensor cores about 4096 bf16 FLOPs, so at head dim 64 the exponentials alone take
as long as the two matmuls and a capped kernel is bound by MUFU, not by the tensor cores.
bench/attention.py adds this floor to its roofline.

    python -m bench.exp2_peak        # prints G exp2/s of this GPU
"""
from __future__ import annotations

import sys

import torch
import triton
import triton.language as tl

from bench.common import arg_parser, device_name, timeit
from videoprism.cli import run_command
from videoprism.kernels.factorized_attention_space import _exp2


@triton.jit
def _exp2_chain_kernel(x_ptr, STEPS: tl.constexpr, BLOCK: tl.constexpr):
    """STEPS dependent x <- exp2(x) - 1.5 per element: one MUFU.EX2 (the attention kernels'
    own _exp2) and one FADD a step; the many independent elements per SM hide the latency.
    x stays in [-1.5, -0.09]. Ops: numel * STEPS exp2; bytes: 8 * numel (negligible)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)
    for _ in range(STEPS):
        x = _exp2(x) - 1.5
    tl.store(x_ptr + offs, x)


def exp2_peak_gops(device: torch.device | str) -> float | None:
    """Measured exp2 rate in G ops/s on CUDA over 2^22 elements x 1024 steps; None elsewhere
    (the CPU benchmarks have no such unit to bound them)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    x = torch.zeros(1 << 22, device=device)
    steps, block = 1024, 1024
    t = timeit(lambda: _exp2_chain_kernel[(x.numel() // block,)](x, STEPS=steps, BLOCK=block), device)
    return x.numel() * steps / (t.median_ms * 1e-3) / 1e9


def main(argv=None) -> int:
    """No GPU ends the run with one `error: ...` line and exit status 2, as in the other bench scripts."""
    return run_command(_main, argv)


def _main(argv) -> None:
    arg_parser("bench.exp2_peak", __doc__).parse_args(argv)
    if not torch.cuda.is_available():
        raise ValueError("bench.exp2_peak needs a CUDA GPU (it measures the GPU's special-function unit)")
    print(f"{device_name('cuda')}: {exp2_peak_gops('cuda'):.0f} G exp2/s")


if __name__ == "__main__":
    sys.exit(main())
