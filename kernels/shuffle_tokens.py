"""Token shuffle with mask tokens and slot position embedding (DESIGN 5, 6.4): Triton
kernels (references: token_ops_ref.py).

Forward, visible [B, m, D], perm [B, n] (a permutation of [0, n) per sample),
mask_emb [D], pos_emb [n, D] -> out [B, n, D] in visible's dtype:
    c[b, j]   = visible[b, j]   for j < m,   mask_emb   for m <= j < n
    out[b, i] = c[b, perm[b, i]] + pos_emb[i]          (added in fp32, rounded once)
Backward, from g = dL/dout [B, n, D]:
    d visible[b, perm[b, i]] = g[b, i]                    for perm[b, i] < m (the unshuffle)
    d mask_emb               = sum_{b, i : perm[b, i] >= m} g[b, i]
    d pos_emb[i]             = sum_b g[b, i]
(A perm value outside [0, n), which no permutation has, goes into neither d visible nor
d mask_emb in the Triton and CUDA kernels; the CPU op raises.)
The concatenated sequence `c` is never materialised. The forward walks its rows in
slot-major order (i, b), so the programs (and CUDA blocks) reading one pos_emb row are
neighbours and the row comes from cache, not B times through L2. The backward reads g
once: one program owns a block of slots and walks the batch, so the reductions over the
batch need no atomics; the mask-embedding sum leaves one partial row per slot block,
summed on the host side (n / BLOCK_I rows: negligible). Deterministic.

Bytes moved, E = element size of visible, Ep of the embeddings:
    forward:  B*m*D*E + (n*D + D)*Ep read (each pos_emb row once from L2, then L1 hits),
              B*n*D*E written (+ 8*B*n index bytes)
    backward: B*n*D*E read, B*m*D*E + n*D*4 written (+ 8*B*n index bytes)
Floor at VideoPrism-B stage 2 (B=32, m=1440, n=4096, D=768, bf16) on an H200 (copy
4218 GB/s read+write): 284.7 MB each way -> 67.5 us forward, 67.5 us backward.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from videoprism.kernels.device_guard import on_tensor_device
from videoprism.kernels.gather_tokens import NUM_WARPS, row_tile, tl_acc_type
from videoprism.kernels.token_ops_ref import acc_dtype


@triton.jit
def _shuffle_tokens_fwd_kernel(vis_ptr, perm_ptr, mask_ptr, pos_ptr, out_ptr, B, m, n, D,
                               ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (row block, column block) over rows t = i*B + b in slot-major order, output
    row b*n + i: the rows of a program share one or a few slots, so its pos_emb reads hit
    the cache (in b-major order every row read its own fp32 pos_emb row: B times the
    [n, D] table through L2, 403 MB at stage 2 against 285 MB moved)."""
    t = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    t_ok = t < B * n
    d_ok = d < D
    i = t // B
    b = (t - i * B).to(tl.int64)
    r = b * n + i
    p = tl.load(perm_ptr + r, mask=t_ok, other=0)
    vis = (p >= 0) & (p < m)               # p < 0 is invalid: kept in bounds, not read
    v = tl.load(vis_ptr + (b * m + p)[:, None] * D + d[None, :], mask=(t_ok & vis)[:, None] & d_ok[None, :],
                other=0.0)
    me = tl.load(mask_ptr + d, mask=d_ok, other=0.0)
    pe = tl.load(pos_ptr + i.to(tl.int64)[:, None] * D + d[None, :], mask=t_ok[:, None] & d_ok[None, :], other=0.0)
    x = tl.where(vis[:, None], v.to(ACC), me.to(ACC)[None, :]) + pe.to(ACC)
    tl.store(out_ptr + r[:, None] * D + d[None, :], x.to(out_ptr.dtype.element_ty),
             mask=t_ok[:, None] & d_ok[None, :])


@triton.jit
def _shuffle_tokens_bwd_kernel(g_ptr, perm_ptr, gvis_ptr, gpos_ptr, gmask_part_ptr, B, m, n, D,
                               ACC: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_D: tl.constexpr,
                               STAGES: tl.constexpr):
    """Program (slot block, column block): walk the batch, unshuffle rows into d visible,
    sum d pos_emb over the batch and the mask rows into one partial row. The batch loop is
    software-pipelined (the next samples' rows load while this one is processed: a loop
    that waited for each sample's loads was latency-bound), and the mask rows are folded
    into the partial row every sample, which keeps one [BLOCK_I, BLOCK_D] accumulator
    instead of two (fewer registers, more programs resident)."""
    pid_i = tl.program_id(0)
    i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    i_ok = i < n
    ok = i_ok[:, None] & (d < D)[None, :]
    acc_pos = tl.zeros((BLOCK_I, BLOCK_D), dtype=ACC)
    acc_mask = tl.zeros((BLOCK_D,), dtype=ACC)
    row = i.to(tl.int64)                      # b*n + i, int64: B*n*D may pass 2^31
    vis_base = tl.zeros((BLOCK_I,), dtype=tl.int64)  # b*m
    for _ in tl.range(0, B, num_stages=STAGES):
        g = tl.load(g_ptr + row[:, None] * D + d[None, :], mask=ok, other=0.0)
        p = tl.load(perm_ptr + row, mask=i_ok, other=0)
        vis = (p >= 0) & (p < m)
        hid = (p >= m) & (p < n)          # a mask slot; p outside [0, n) is invalid: in neither sum (as CUDA)
        acc_pos += g.to(ACC)
        acc_mask += tl.sum(tl.where(hid[:, None], g.to(ACC), 0.0), axis=0)
        tl.store(gvis_ptr + (vis_base + p)[:, None] * D + d[None, :], g, mask=ok & vis[:, None])
        row += n
        vis_base += m
    tl.store(gpos_ptr + i.to(tl.int64)[:, None] * D + d[None, :], acc_pos, mask=ok)
    tl.store(gmask_part_ptr + pid_i * D + d, acc_mask, mask=d < D)


@on_tensor_device
def shuffle_with_mask_tokens_fwd_triton(visible, perm, mask_emb, pos_emb) -> torch.Tensor:
    """perm int64 a permutation per sample (checked by the caller). The inputs are made
    contiguous here (a copy only when they are not) and the embeddings brought to the
    accumulation dtype (free for fp32 parameters)."""
    acc = acc_dtype(visible.dtype)
    visible, perm = visible.contiguous(), perm.contiguous()
    mask_emb, pos_emb = mask_emb.to(acc).contiguous(), pos_emb.to(acc).contiguous()
    B, m, D = visible.shape
    n = perm.shape[1]
    out = torch.empty(B, n, D, dtype=visible.dtype, device=visible.device)
    if out.numel() == 0:
        return out
    BLOCK_R, BLOCK_D = row_tile(D)
    grid = (triton.cdiv(B * n, BLOCK_R), triton.cdiv(D, BLOCK_D))
    _shuffle_tokens_fwd_kernel[grid](visible, perm, mask_emb, pos_emb, out, B, m, n, D,
                                     ACC=tl_acc_type(visible.dtype), BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D,
                                     num_warps=NUM_WARPS)
    return out


@on_tensor_device
def shuffle_with_mask_tokens_bwd_triton(grad, perm, m: int):
    """-> (d visible [B, m, D] in grad's dtype, d mask_emb [D], d pos_emb [n, D]), the two
    embedding grads in the accumulation dtype (fp32, fp64 for fp64). grad and perm are made
    contiguous here."""
    grad, perm = grad.contiguous(), perm.contiguous()
    B, n, D = grad.shape
    acc = acc_dtype(grad.dtype)
    gvis = torch.empty(B, m, D, dtype=grad.dtype, device=grad.device)
    gpos = torch.empty(n, D, dtype=acc, device=grad.device)
    BLOCK_D = row_tile(D)[1]
    BLOCK_I = max(1, min(16, 4096 // BLOCK_D))
    n_blocks = triton.cdiv(n, BLOCK_I)
    part = torch.empty(n_blocks, D, dtype=acc, device=grad.device)
    if n * D > 0:
        _shuffle_tokens_bwd_kernel[(n_blocks, triton.cdiv(D, BLOCK_D))](
            grad, perm, gvis, gpos, part, B, m, n, D, ACC=tl_acc_type(grad.dtype), BLOCK_I=BLOCK_I, BLOCK_D=BLOCK_D,
            STAGES=3)
    return gvis, part.sum(0), gpos


