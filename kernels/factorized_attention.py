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


def _attend(q, k, v, *, scale: float, softcap: float, keep=None, causal: bool = False, present=None):
    """softmax(cap(q k^T * scale) with masked keys) @ v. q [..., S, Dh], k/v [..., S', Dh]; keep [..., S, S']
    bool (broadcastable), False = a masked key (finite MASK_VALUE), as is a future key under `causal`;
    `present [..., S]` bool (the masked time axis's grid, S = S'): an absent key is no key at all (-inf), an
    absent query's row is 0 (dropped later)."""
    s = torch.matmul(q * scale, k.transpose(-1, -2))
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    if causal:
        c = torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril()
        keep = c if keep is None else keep & c
    if keep is not None:
        s = torch.where(keep, s, torch.full((), MASK_VALUE, dtype=s.dtype, device=s.device))
    if present is not None:
        query = present[..., :, None]
        s = s.masked_fill(~present[..., None, :] & query, float("-inf")).masked_fill(~query, 0.0)
    return torch.matmul(torch.softmax(s, dim=-1), v)


def factorized_attention_ref(
    qkv: torch.Tensor,
    *,
    axis: str,
    softcap: float = 0.0,
    pos: torch.Tensor | None = None,
    key_padding: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    num_locations: int | None = None,
) -> torch.Tensor:
    """Reference factorized attention. qkv [B, T, K, 3, H, Dh] -> [B, T, K, H, Dh].

    Computes in fp32 (softmax in fp32 as the official model does; fp64 inputs in fp64, which
    makes it the tests' high-precision oracle) and returns the input dtype. Differentiable
    through autograd. `num_locations` (masked time axis): the spatial grid's size N, above every
    index of pos; None reads it from pos (a host read, which a compiled caller must avoid).
    """
    if qkv.dim() != 6 or qkv.shape[3] != 3:
        raise ValueError(f"qkv must be [B, T, K, 3, H, Dh], got {tuple(qkv.shape)}")
    B, T, K, _, H, Dh = qkv.shape
    scale = Dh**-0.5 if scale is None else scale
    x = qkv if qkv.dtype == torch.float64 else qkv.float()
    q, k, v = x[:, :, :, 0], x[:, :, :, 1], x[:, :, :, 2]                  # [B, T, K, H, Dh]
    dev = qkv.device

    if axis == "space":
        q, k, v = (a.permute(0, 1, 3, 2, 4) for a in (q, k, v))           # [B, T, H, K, Dh]
        keep = None
        if key_padding is not None:
            keep = ~key_padding.bool()[:, :, None, None, :]                 # [B, T, 1, 1, K]
        o = _attend(q, k, v, scale=scale, softcap=softcap, keep=keep, causal=causal)  # [B, T, H, K, Dh]
        return o.permute(0, 1, 3, 2, 4).to(qkv.dtype)

    if axis != "time":
        raise ValueError(f"axis must be 'space' or 'time', got {axis!r}")

    if pos is None:
        # Identity map: the sequence of token (b, t, k) is column k over all frames.
        q, k, v = (a.permute(0, 2, 3, 1, 4) for a in (q, k, v))           # [B, K, H, T, Dh]
        keep = None
        if key_padding is not None:
            keep = ~key_padding.bool().permute(0, 2, 1)[:, :, None, None, :]  # [B, K, 1, 1, T]
        o = _attend(q, k, v, scale=scale, softcap=softcap, keep=keep, causal=causal)  # [B, K, H, T, Dh]
        return o.permute(0, 3, 1, 2, 4).to(qkv.dtype)

    # Masked time axis on the dense grid: every visible token scattered to its location n of the
    # [B, T, N] grid (each slot written once: the backward is a gather, not a scatter-add), the
    # time axis of every location attended as for an unmasked clip, the visible queries gathered
    # back. A frame where the location is hidden holds no key at all (-inf, weight exactly 0),
    # unlike a padded or future key (finite MASK_VALUE): a fully padded row is uniform over the
    # frames where its location is visible, never over unrelated tokens. A visible query's own
    # frame is visible, so its row max stays finite; hidden query rows (dropped) are set to 0.
    # Against gathering every query's T keys (up to 2d030c3), fwd+bwd on the CPU at B 2, T 16, K 90 of
    # N 256, 12x64 heads: eager 499 -> 193 ms, compiled 145 -> 84 ms (bench/RESULTS.md); its q/k/v grid
    # holds 3N rows a frame where the gathered keys and values held 2KT.
    N = int(pos.max()) + 1 if num_locations is None else num_locations
    pos = pos.long()

    def to_grid(a, fill):                                                   # [B, T, K, ...] -> [B, T, N, ...]
        idx = pos.reshape(B, T, K, *[1] * (a.dim() - 3)).expand(a.shape)
        return torch.full((B, T, N, *a.shape[3:]), fill, dtype=a.dtype, device=dev).scatter(2, idx, a)

    grid = to_grid(x, 0).permute(0, 2, 4, 3, 1, 5)                        # [B, N, H, 3, T, Dh]
    visible = to_grid(torch.ones_like(pos, dtype=torch.bool), False).permute(0, 2, 1)  # [B, N, T]
    keep = None
    if key_padding is not None:
        keep = ~to_grid(key_padding.bool(), True).permute(0, 2, 1)[:, :, None, None, :]  # [B, N, 1, 1, T']
    o = _attend(grid[:, :, :, 0], grid[:, :, :, 1], grid[:, :, :, 2], scale=scale, softcap=softcap, keep=keep,
                causal=causal, present=visible[:, :, None, :])             # [B, N, H, T, Dh]
    o = o.permute(0, 3, 1, 2, 4)                                            # [B, T, N, H, Dh]
    o = o.gather(2, pos[:, :, :, None, None].expand(B, T, K, H, Dh))
    return o.to(qkv.dtype)
