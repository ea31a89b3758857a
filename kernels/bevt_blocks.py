"""BEVT block acceptance (DESIGN 4): the sequential part of `videoprism.masking.bevt_mask`
as one Triton kernel. Its plain-PyTorch reference, `accept_blocks_ref`, lives in
videoprism/masking.py, which must import on torch builds without Triton.

Rounds r = 0..R-1 each propose one rectangle per sample b, rows [top, top + bh) x columns
[left, left + bw) of the h x w patch grid, over the frames [start, start + length). Per
frame t of that run, with mask[b, t] the patches masked so far and count[b, t] = |mask|:
    new    = |rect \\ mask[b, t]|
    accept = start <= t < start + length  and  count + new <= budget
    if accept: mask[b, t] |= rect, count += new
Rounds must run in order (each acceptance depends on the earlier ones); frames and samples
are independent. On the GPU the reference is launch-bound: R (up to 96) rounds of ~8 tiny
ops, ~5 ms per stage-2 batch on an H200 (bench/results/token_ops_gpu.json, bevt_mask) for
microseconds of work. The kernel runs the same rounds as one launch: one program per (b, t)
holds that frame's mask in registers and walks the rounds.

Layout: geometry top, left, bh, bw, start, length [R, B] int64 (contiguous); out [B, T, h*w]
bool. Work: R * B * T * h*w integer compares and reductions (B=32, T=16, 16x16 grid, R=96:
12.6 M lane-ops); bytes: 6*R*B*8 of geometry (147 KB, each row read by the T programs of its
sample, from cache) and B*T*h*w written (131 KB): microseconds on any GPU, one launch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _bevt_accept_kernel(top_ptr, left_ptr, bh_ptr, bw_ptr, start_ptr, length_ptr, out_ptr,
                        B, T, R, W, N, budget, BLOCK_N: tl.constexpr):
    """Program (b, t): the frame's mask as BLOCK_N lanes (patch i = row * W + col), the
    rounds in order."""
    pid = tl.program_id(0)
    b = pid // T
    t = pid % T
    i = tl.arange(0, BLOCK_N)
    valid = i < N
    row = i // W
    col = i % W
    mask = tl.zeros((BLOCK_N,), dtype=tl.int32)
    count = 0
    for r in range(R):
        o = r * B + b
        top = tl.load(top_ptr + o)
        left = tl.load(left_ptr + o)
        rect = valid & (row >= top) & (row < top + tl.load(bh_ptr + o)) \
            & (col >= left) & (col < left + tl.load(bw_ptr + o))
        new = tl.sum((rect & (mask == 0)).to(tl.int32), axis=0)
        first = tl.load(start_ptr + o)
        ok = (t >= first) & (t < first + tl.load(length_ptr + o)) & (count + new <= budget)
        mask = tl.where(rect & ok, 1, mask)
        count += tl.where(ok, new, 0)
    tl.store(out_ptr + pid.to(tl.int64) * N + i, mask != 0, mask=valid)


def bevt_accept_blocks_triton(top, left, bh, bw, start, length, frames: int, grid: tuple[int, int],
                              budget: int) -> torch.Tensor:
    """The rounds in one launch (same result as the reference, bit for bit: integer logic)."""
    R, B = top.shape
    h, w = grid
    out = torch.empty(B, frames, h * w, dtype=torch.bool, device=top.device)
    geometry = [g.contiguous() for g in (top, left, bh, bw, start, length)]
    _bevt_accept_kernel[(B * frames,)](*geometry, out, B, frames, R, w, h * w, budget,
                                       BLOCK_N=triton.next_power_of_2(h * w), num_warps=4)
    return out
