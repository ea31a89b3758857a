"""Masked patch gather (DESIGN 3, 4, 6.2): Triton kernel (reference: token_ops_ref.py).

video [B, T, H, W, 3] (uint8 or float, channels last), pos [B, T, K] (visible patch
indices, row-major on the (H/P) x (W/P) grid) -> patches [B, T, K, P*P*3]:
    n = pos[b, t, k],  mh = n // (W/P),  nw = n % (W/P)
    out[b, t, k, (p*P + q)*3 + c] = s(video[b, t, mh*P + p, nw*P + q, c])
which is the official patchify ('(m p)(n q) c -> (m n)(p q c)') followed by a gather
of the visible patches, without reading the hidden pixels. s(v) = fp32(v) * fp32(1/255)
for uint8 (one rounding, bit-identical in every backend), v unchanged for floats.
Output dtype: float32 for uint8/fp16/bf16/fp32 input, float64 for float64 (acc_dtype).

Layout: one output row of F = P*P*3 values is P runs of 3P contiguous input elements
(row stride 3W). A Triton program covers [BLOCK_R patches, BLOCK_F features]: per-patch
and per-feature index math, and aligned 16-byte stores, because F is a compile-time
constant (from P) and a multiple of 4 for even P; the uint8 reads are 2-byte loads where
the run length and strides are even (P = 18: 54-byte runs). The CUDA kernel
(csrc/token_ops_cuda.cu) stages whole runs in shared memory and then writes a contiguous
range of the output with 16-byte stores.
Bytes moved: B*T*K*P*P*3 * (E_in + E_out) (+ 8*B*T*K index bytes), E_in = 1 for uint8.
Floor at VideoPrism-B stage 2 (B=32, T=16, K=90, P=18, uint8 -> fp32) on an H200 (copy
4218 GB/s read+write): 223.9 MB -> 53.1 us. (The 54-byte runs are not sector-aligned, so
DRAM reads are somewhat above the 44.8 MB of uint8 counted there.)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from videoprism.kernels.device_guard import on_tensor_device
from videoprism.kernels.token_ops_ref import UINT8_SCALE, acc_dtype


@triton.jit
def _patchify_gather_fwd_kernel(video_ptr, pos_ptr, out_ptr, n_rows, K, HW3, W3, NW, N,
                                P: tl.constexpr, IS_UINT8: tl.constexpr, SCALE: tl.constexpr,
                                BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr):
    """Program (patch block, feature block): rows r = (b*T + t)*K + k, features f = p*3P + u.
    F comes from the constant P: with F = 972 as a runtime int (not a multiple of 16) Triton
    could not prove the row starts aligned and stored 4 bytes per instruction. Index math
    per row and per column in int32, one int64 add per element."""
    F: tl.constexpr = 3 * P * P
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    r_ok = r < n_rows
    n = tl.load(pos_ptr + r, mask=r_ok, other=0)
    n_ok = (n >= 0) & (n < N)              # memory safety only: the op checks values on the CPU
    n = tl.where(n_ok, n, 0).to(tl.int32)
    patch = (r // K).to(tl.int64) * HW3 + (n // NW * P) * W3 + (n % NW) * (3 * P)   # the patch's first element
    p = f // (3 * P)
    col = p * W3 + (f - p * (3 * P))        # pixel row p, element u of its run of 3P
    ok = r_ok[:, None] & (f < F)[None, :]
    v = tl.load(video_ptr + patch[:, None] + col[None, :], mask=ok & n_ok[:, None], other=0)
    if IS_UINT8:
        x = v.to(tl.float32) * SCALE
    else:
        x = v.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + r.to(tl.int64)[:, None] * F + f[None, :], x, mask=ok)


def feature_block(F: int) -> int:
    """The power of two in [256, 1024] whose blocks cover F with the fewest masked lanes
    (ties: the larger): 972 (P = 18) -> 1024, 5% idle; 768 (P = 16) -> 256, none idle."""
    if F <= 256:
        return triton.next_power_of_2(F)
    return min((1024, 512, 256), key=lambda bf: triton.cdiv(F, bf) * bf - F)


@on_tensor_device
def patchify_gather_triton(video: torch.Tensor, pos: torch.Tensor, patch_size: int) -> torch.Tensor:
    """video [B, T, H, W, 3] and pos [B, T, K] int64 (made contiguous here: a copy only when they
    are not), indices in range."""
    video, pos = video.contiguous(), pos.contiguous()   # the kernel reads video as dense [B, T, H, W, 3]
    B, T, H, W, C = video.shape
    K = pos.shape[2]
    P = patch_size
    F = P * P * C
    # The kernel indexes within a frame and counts patch rows in int32 (frame offsets are int64).
    for what, v in (("values per frame (H*W*3)", H * W * C), ("visible patches (B*T*K)", B * T * K)):
        if v >= 2**31:
            raise ValueError(f"patchify_gather (triton): {what} = {v} is 2^31 or more; split the batch or use "
                             "backend='cuda'")
    out = torch.empty(B, T, K, F, dtype=acc_dtype(video.dtype), device=video.device)
    if out.numel() == 0:
        return out
    # 8192 elements per program (8 patches of 972 features at P = 18), 8 warps: a few
    # thousand programs, not one per patch.
    BLOCK_F = feature_block(F)
    BLOCK_R = max(1, 8192 // BLOCK_F)
    grid = (triton.cdiv(B * T * K, BLOCK_R), triton.cdiv(F, BLOCK_F))
    _patchify_gather_fwd_kernel[grid](video, pos, out, B * T * K, K, H * W * C, W * C, W // P, (H // P) * (W // P),
                                      P=P, IS_UINT8=video.dtype == torch.uint8, SCALE=UINT8_SCALE,
                                      BLOCK_R=BLOCK_R, BLOCK_F=BLOCK_F, num_warps=8)
    return out
