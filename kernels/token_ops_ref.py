"""Plain-PyTorch references of the token ops and the helpers the kernels share: no Triton here, so the
CPU path imports them with a torch that has no Triton (its CPU-only builds; attention's reference is
factorized_attention.py for the same reason). The math and layouts are in each op's kernel file:
gather_tokens.py (gather, scatter), patchify_gather.py, shuffle_tokens.py.

`*_ref`: the exact oracles of tests and of the "reference" backend (sums in acc_dtype, rounded once).
`*_torch`: the composition a user would write in the input's dtype, the baseline of bench.token_ops.
"""
from __future__ import annotations

import torch

UINT8_SCALE = 1.0 / 255.0


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the token ops sum in (fp32 for half types and fp32, fp64 for fp64), and so the
    dtype of the shuffle's embedding grads and of patchify_gather's output (float32 for uint8
    and the half types, float64 for float64: gradcheck runs in double). The C++ twin is
    csrc/token_ops.h acc_type."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def gather_tokens_ref(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """out[b, j] = x[b, idx[b, j]] with torch.gather."""
    return torch.gather(x, 1, idx[:, :, None].expand(-1, -1, x.shape[2]))


def scatter_tokens_ref(src: torch.Tensor, idx: torch.Tensor, length: int) -> torch.Tensor:
    """out [B, length, D] zeros with out[b, idx[b, j]] += src[b, j] (fp32 accumulation for
    half types, rounded once)."""
    acc = acc_dtype(src.dtype)
    B, _, D = src.shape
    out = torch.zeros(B, length, D, dtype=acc, device=src.device)
    out.scatter_add_(1, idx[:, :, None].expand(-1, -1, D), src.to(acc))
    return out.to(src.dtype)


def scatter_tokens_torch(src: torch.Tensor, idx: torch.Tensor, length: int) -> torch.Tensor:
    """The torch composition a user would write (zeros + scatter_add in src's dtype: every add
    rounded, in an unspecified order on CUDA): plain PyTorch, the baseline of bench.token_ops
    and of the tests' error bounds. The gather's composition is gather_tokens_ref itself."""
    B, _, D = src.shape
    return src.new_zeros(B, length, D).scatter_add_(1, idx[:, :, None].expand(-1, -1, D), src)


def patch_grid(video: torch.Tensor, patch_size: int) -> torch.Tensor:
    """The official patchify's layout: [B, T, H, W, C] -> [B, T, (H/P)*(W/P), P*P*C], patches
    row-major, features (p, q, c); values and dtype unchanged (reshape/permute: a copy)."""
    B, T, H, W, C = video.shape
    P = patch_size
    x = video.reshape(B, T, H // P, P, W // P, P, C).permute(0, 1, 2, 4, 3, 5, 6)
    return x.reshape(B, T, (H // P) * (W // P), P * P * C)


def pixel_values(x: torch.Tensor) -> torch.Tensor:
    """s(v) of patchify_gather: uint8 -> fp32(v) * fp32(1/255) (one rounding, what every
    backend does), floats unchanged. Elementwise, so it commutes with the gather: the masked
    patchify (student) and the unmasked one (teacher, videoprism.encoder.patchify) agree bit
    for bit."""
    return x.float() * UINT8_SCALE if x.dtype == torch.uint8 else x


def patchify_gather_ref(video: torch.Tensor, pos: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Patchify every frame (reshape/permute, reads all pixels), then torch.gather, then scale."""
    x = patch_grid(video, patch_size)
    x = torch.gather(x, 2, pos[..., None].expand(-1, -1, -1, x.shape[3]))
    return pixel_values(x).to(acc_dtype(video.dtype))


def unpatchify(patches: torch.Tensor, grid: tuple[int, int], patch_size: int) -> torch.Tensor:
    """[B, T, h*w, P*P*3] (every patch, row-major) -> [B, T, h*P, w*P, 3]: the inverse of the
    official patchify (the video gradient of patchify_gather is the scattered patches
    unpatchified)."""
    B, T = patches.shape[:2]
    (h, w), P = grid, patch_size
    x = patches.reshape(B, T, h, w, P, P, 3).permute(0, 1, 2, 4, 3, 5, 6)
    return x.reshape(B, T, h * P, w * P, 3)


def shuffle_with_mask_tokens_ref(visible: torch.Tensor, perm: torch.Tensor, mask_emb: torch.Tensor,
                                 pos_emb: torch.Tensor) -> torch.Tensor:
    """Literal DESIGN 5: concat, gather by perm, add the slot embedding (in fp32 for half
    types, fp64 for fp64)."""
    B, m, D = visible.shape
    n = perm.shape[1]
    acc = acc_dtype(visible.dtype)
    c = torch.cat([visible.to(acc), mask_emb.to(acc).expand(B, n - m, D)], dim=1)
    x = torch.gather(c, 1, perm[:, :, None].expand(-1, -1, D)) + pos_emb.to(acc)
    return x.to(visible.dtype)


def shuffle_with_mask_tokens_torch(visible: torch.Tensor, perm: torch.Tensor, mask_emb: torch.Tensor,
                                   pos_emb: torch.Tensor) -> torch.Tensor:
    """The torch composition a user would write, in visible's dtype (cat, gather, add; the
    embeddings cast first, the sum rounded in that dtype): the plain-PyTorch baseline of
    bench.token_ops, its backward the autograd of these ops."""
    B, m, D = visible.shape
    n = perm.shape[1]
    c = torch.cat([visible, mask_emb.to(visible.dtype).expand(B, n - m, D)], dim=1)
    return torch.gather(c, 1, perm[:, :, None].expand(-1, -1, D)) + pos_emb.to(visible.dtype)


def shuffle_with_mask_tokens_bwd_ref(grad: torch.Tensor, perm: torch.Tensor, m: int):
    """Reference backward: unshuffle g with a scatter (c[b, perm[b, i]] = g[b, i]), split c
    into the visible rows and the mask rows, sum the slot grads over the batch. Returns
    (d visible in grad's dtype, d mask_emb, d pos_emb) with the embedding grads in fp32
    (fp64 for fp64)."""
    acc = acc_dtype(grad.dtype)
    g = grad.to(acc)
    c = torch.zeros_like(g).scatter_(1, perm[:, :, None].expand(-1, -1, g.shape[2]), g)
    return c[:, :m].to(grad.dtype).contiguous(), c[:, m:].sum((0, 1)), g.sum(0)
