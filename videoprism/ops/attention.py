"""`factorized_attention`: the one attention entry point of the model, with a backend switch.

Backends:
  "reference" plain PyTorch math (kernels/factorized_attention.py), the oracle; any input.
  "sdpa"      torch SDPA; only without the soft-cap (it has none).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from videoprism.kernels.factorized_attention import MASK_VALUE, factorized_attention_ref

BACKENDS = ("reference", "sdpa")


def default_backend(device: torch.device) -> str:
    return "reference"


def _sdpa(qkv, *, axis, softcap, pos, key_padding, causal, scale):
    if softcap > 0:
        raise ValueError(
            f"attention backend 'sdpa' has no logit soft-cap (softcap={softcap}); "
            "use 'reference' (or a fused backend that supports the cap)"
        )
    if axis == "time" and pos is not None:
        raise ValueError("attention backend 'sdpa' does not take a pos map (masked time axis); use 'reference'")
    B, T, K, _, H, Dh = qkv.shape
    q, k, v = qkv.unbind(3)                                   # [B, T, K, H, Dh]
    if axis == "space":
        perm, inv = (0, 1, 3, 2, 4), (0, 1, 3, 2, 4)          # -> [B, T, H, K, Dh]
        kp = None if key_padding is None else key_padding.bool()[:, :, None, None, :]
    else:
        perm, inv = (0, 2, 3, 1, 4), (0, 3, 1, 2, 4)          # -> [B, K, H, T, Dh]
        kp = None if key_padding is None else key_padding.bool().permute(0, 2, 1)[:, :, None, None, :]
    q, k, v = (a.permute(*perm) for a in (q, k, v))
    mask = None
    if kp is not None:
        # Additive finite mask: a fully padded row stays uniform, as in the official code.
        mask = torch.zeros(kp.shape, dtype=q.dtype, device=q.device).masked_fill(kp, MASK_VALUE)
        if causal:
            S = q.shape[-2]
            c = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
            mask = mask.masked_fill(~c, MASK_VALUE)
            causal = False
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)
    return o.permute(*inv)


def factorized_attention(
    qkv: torch.Tensor,
    *,
    axis: str,
    softcap: float = 0.0,
    pos: torch.Tensor | None = None,
    key_padding: torch.Tensor | None = None,
    causal: bool = False,
    backend: str | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention along one axis of `qkv [B, T, K, 3, H, Dh]` -> `[B, T, K, H, Dh]`.

    See kernels/factorized_attention.py for the exact math. `backend=None` picks the
    default for the device.
    """
    backend = backend or default_backend(qkv.device)
    kw = dict(axis=axis, softcap=softcap, pos=pos, key_padding=key_padding, causal=causal, scale=scale)
    if backend == "reference":
        return factorized_attention_ref(qkv, **kw)
    if backend == "sdpa":
        return _sdpa(qkv, **kw)
    raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
