"""BEVT block acceptance (DESIGN 4): the sequential part of `videoprism.masking.bevt_mask`
as one Triton kernel. Its plain-PyTorch reference, `accept_blocks_ref`, lives in
videoprism/masking.py, which must import on torch builds without Triton.

Rounds r = 0..R-1 each propose one rectangle per sample b, rows [top, top + bh) x columns
[left, left + bw) of the h x w patch grid, over the frames [start, start + length). With
mask[b, t] the patches of frame t masked so far and count[b, t] = |mask[b, t]|:
    new[t]  = |rect \\ mask[b, t]|
    run[t]  = start <= t < start + length
    accept  = for every t in the run: count[t] + new[t] <= budget   (the whole cube or nothing)
    if accept: mask[b, t] |= rect and count[t] += new[t] for t in the run
Rounds must run in order (each acceptance depends on the earlier ones); samples are
independent. On the GPU the reference is launch-bound: R (up to 192) rounds of ~10 tiny
ops, ~5 ms per stage-2 batch on an H200 (bench/results/token_ops_gpu.json, bevt_mask) for
microseconds of work. The kernel runs the same rounds as one launch: one program per sample
holds its T x h*w mask in registers and walks the rounds.

Layout: geometry top, left, bh, bw, start, length [R, B] int64 (contiguous); out [B, T, h*w]
bool. Work: R * B * T * h*w integer compares and reductions (B=32, T=16, 16x16 grid, R=176:
23 M lane-ops); bytes: 6*R*B*8 of geometry (270 KB) and B*T*h*w written (131 KB). Its
bandwidth floor is ~0.4 MB / 4.2 TB/s ~ 0.1 us on an H200, far under one launch (a few us):
the kernel is launch- and latency-bound (B programs, one per sample, each walking its R
rounds serially, a few dependent reductions per round), never bandwidth-bound, and the
floor that matters is one launch, against R * ~10 launches of the reference. A program's
tile is next_pow2(T) x next_pow2(h*w) int32 (16 x 256 = 16 KB at stage 2: 32 registers a
thread at 4 warps).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from videoprism.kernels.device_guard import on_tensor_device


@triton.jit
def _bevt_accept_kernel(top_ptr, left_ptr, bh_ptr, bw_ptr, start_ptr, length_ptr, out_ptr,
                        B, T, R, W, N, budget, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program b: the sample's masks as a BLOCK_T x BLOCK_N tile (frame t, patch i = row * W + col),
    the rounds in order."""
    b = tl.program_id(0)
    t = tl.arange(0, BLOCK_T)
    i = tl.arange(0, BLOCK_N)
    t_ok = t < T
    valid = t_ok[:, None] & (i < N)[None, :]
    row = i // W
    col = i % W
    mask = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.int32)
    count = tl.zeros((BLOCK_T,), dtype=tl.int32)
    for r in range(R):
        o = r * B + b
        top = tl.load(top_ptr + o)
        left = tl.load(left_ptr + o)
        rect = ((row >= top) & (row < top + tl.load(bh_ptr + o))
                & (col >= left) & (col < left + tl.load(bw_ptr + o)))[None, :] & valid
        new = tl.sum((rect & (mask == 0)).to(tl.int32), axis=1)
        first = tl.load(start_ptr + o)
        run = t_ok & (t >= first) & (t < first + tl.load(length_ptr + o))
        fits = ((count + new <= budget) | ~run).to(tl.int32)
        ok = run & (tl.min(fits, axis=0) > 0)
        mask = tl.where(rect & ok[:, None], 1, mask)
        count += tl.where(ok, new, 0)
    offs = b.to(tl.int64) * T * N + t[:, None] * N + i[None, :]
    tl.store(out_ptr + offs, mask != 0, mask=valid)


@on_tensor_device
def bevt_accept_blocks_triton(top, left, bh, bw, start, length, frames: int, grid: tuple[int, int],
                              budget: int) -> torch.Tensor:
    """The rounds in one launch (same result as the reference, bit for bit: integer logic)."""
    R, B = top.shape
    h, w = grid
    out = torch.empty(B, frames, h * w, dtype=torch.bool, device=top.device)
    geometry = [g.contiguous() for g in (top, left, bh, bw, start, length)]
    block_t, block_n = triton.next_power_of_2(frames), triton.next_power_of_2(h * w)
    _bevt_accept_kernel[(B,)](*geometry, out, B, frames, R, w, h * w, budget, BLOCK_T=block_t, BLOCK_N=block_n,
                              num_warps=4 if block_t * block_n <= 8192 else 8)
    return out
