"""Factorized (space / time) soft-capped attention: the plain-PyTorch reference.

Layout (DESIGN 4, 6.1): the encoder keeps tokens in `[B, T, K, ...]` order from
patch embedding to output. The fused qkv projection is viewed as
`qkv [B, T, K, 3, H, Dh]`; the output is `[B, T, K, H, Dh]`.

* axis="space": each frame `(b, t)` is one sequence over its K tokens.
* axis="time":  token `(b, t, k)` attends to the tokens `(b, t', k')` with
  `pos[b, t', k'] == pos[b, t, k]`, i.e. to the frames in which the same spatial
  location is visible. `pos [B, T, K]` holds sorted spatial indices per frame;
  `pos=None` is the identity (unmasked video, K = N): sequence = column k.

Math (per sequence, per head), matching the official Flax code:
    s = (q * Dh^-0.5) @ k^T
    s = c * tanh(s / c)                  if c = softcap > 0
    s = where(masked, -0.7 * FLT_MAX, s) finite, so a fully masked row is uniform
    p = softmax(s) in fp32 ;  o = p @ v
Masked keys are key-padded keys and future keys under `causal` (along the axis); they
get the finite MASK_VALUE. On the masked time axis the frames where the query's location
is not visible are no keys at all (-inf): the sequence of a location is the frames where
it is visible (with the identity map, every frame).

This file is the oracle for the tests and the benchmarks and the model's
"reference" backend. The fused Triton kernels live beside it, in
factorized_attention_space.py and factorized_attention_time.py (apart, so that the
reference imports on torch builds without Triton).
"""
from __future__ import annotations

import torch

# The official code replaces masked logits with this finite value (not -inf): a
# fully masked row must give a uniform softmax, not NaN (golden NOTES 2, 6).
MASK_VALUE = -0.7 * torch.finfo(torch.float32).max


def time_gather_index(pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For every token (b, t, k) and frame t', the slot k' of frame t' holding the same
    spatial location, and whether that location is visible in t'.

    pos: [B, T, K] int, sorted within each frame. Returns (idx [B, T, K, T'] int64,
    valid [B, T, K, T'] bool); idx is clamped into range where invalid.
    """
    B, T, K = pos.shape
    pos = pos.long()
    # searchsorted over each frame t' for every query location (b, t, k).
    values = pos.reshape(B, 1, T * K).expand(B, T, T * K).contiguous()   # [B, T', T*K]
    idx = torch.searchsorted(pos.contiguous(), values).clamp_(max=K - 1)   # [B, T', T*K]
    valid = torch.gather(pos, 2, idx) == values
    idx = idx.reshape(B, T, T, K).permute(0, 2, 3, 1)                      # [B, T, K, T']
    valid = valid.reshape(B, T, T, K).permute(0, 2, 3, 1)
    return idx, valid


def _softcapped_softmax_av(q, k, v, keep, softcap: float):
    """q [..., S, Dh], k/v [..., S', Dh], keep [..., S, S'] bool (broadcastable)."""
    s = torch.matmul(q, k.transpose(-1, -2))
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    if keep is not None:
        s = torch.where(keep, s, torch.full((), MASK_VALUE, dtype=s.dtype, device=s.device))
    p = torch.softmax(s, dim=-1)
    return torch.matmul(p, v)


def factorized_attention_ref(
    qkv: torch.Tensor,
    *,
    axis: str,
    softcap: float = 0.0,
    pos: torch.Tensor | None = None,
    key_padding: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """Reference factorized attention. qkv [B, T, K, 3, H, Dh] -> [B, T, K, H, Dh].

    Computes in fp32 (softmax in fp32 as the official model does; fp64 inputs in fp64, which
    makes it the tests' high-precision oracle) and returns the input dtype. Differentiable
    through autograd.
    """
    if qkv.dim() != 6 or qkv.shape[3] != 3:
        raise ValueError(f"qkv must be [B, T, K, 3, H, Dh], got {tuple(qkv.shape)}")
    B, T, K, _, H, Dh = qkv.shape
    scale = Dh**-0.5 if scale is None else scale
    x = qkv if qkv.dtype == torch.float64 else qkv.float()
    q, k, v = x[:, :, :, 0] * scale, x[:, :, :, 1], x[:, :, :, 2]          # [B, T, K, H, Dh]
    dev = qkv.device

    if axis == "space":
        q, k, v = (a.permute(0, 1, 3, 2, 4) for a in (q, k, v))           # [B, T, H, K, Dh]
        keep = None
        if key_padding is not None:
            keep = ~key_padding.bool()[:, :, None, None, :]                 # [B, T, 1, 1, K]
        if causal:
            c = torch.ones(K, K, dtype=torch.bool, device=dev).tril()
            keep = c if keep is None else keep & c
        o = _softcapped_softmax_av(q, k, v, keep, softcap)                  # [B, T, H, K, Dh]
        return o.permute(0, 1, 3, 2, 4).to(qkv.dtype)

    if axis != "time":
        raise ValueError(f"axis must be 'space' or 'time', got {axis!r}")

    if pos is None:
        # Identity map: the sequence of token (b, t, k) is column k over all frames.
        q, k, v = (a.permute(0, 2, 3, 1, 4) for a in (q, k, v))           # [B, K, H, T, Dh]
        keep = None
        if key_padding is not None:
            keep = ~key_padding.bool().permute(0, 2, 1)[:, :, None, None, :]  # [B, K, 1, 1, T]
        if causal:
            c = torch.ones(T, T, dtype=torch.bool, device=dev).tril()
            keep = c if keep is None else keep & c
        o = _softcapped_softmax_av(q, k, v, keep, softcap)                  # [B, K, H, T, Dh]
        return o.permute(0, 3, 1, 2, 4).to(qkv.dtype)

    # Masked time axis: gather, for every query token, the key/value of each frame t'
    # at the same spatial location (invalid where that location is hidden in t').
    idx, valid = time_gather_index(pos)                                     # [B, T, K, T']
    bi = torch.arange(B, device=dev)[:, None, None, None]
    ti = torch.arange(T, device=dev)[None, None, None, :]
    kg, vg = k[bi, ti, idx], v[bi, ti, idx]                                 # [B, T, K, T', H, Dh]
    keep = torch.ones_like(valid)
    if key_padding is not None:
        keep = keep & ~key_padding.bool()[bi, ti, idx]
    if causal:
        keep = keep & (ti <= torch.arange(T, device=dev)[None, :, None, None])
    # Each query has its own T' keys: a product and a sum over Dh, not an einsum (which would
    # run as B*T*K*H matmuls of one row each): on the CPU 1.2-1.6x faster eager, 1.9-2.4x compiled.
    s = (q[:, :, :, None] * kg).sum(-1)                                     # [B, T, K, T', H]
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    s = torch.where(keep[..., None], s, torch.full((), MASK_VALUE, dtype=s.dtype, device=dev))
    # A frame where the location is hidden holds no key at all (-inf, weight exactly 0), unlike
    # a padded or future key (finite MASK_VALUE): a fully padded row is uniform over the frames
    # where its location is visible, never over unrelated tokens of the other frames. The
    # query's own frame is always visible, so the row max stays finite.
    s = s.masked_fill(~valid[..., None], float("-inf"))
    p = torch.softmax(s, dim=3)
    o = (p[..., None] * vg).sum(3)                                          # [B, T, K, H, Dh]
    return o.to(qkv.dtype)
