"""Building blocks of VideoPrism, matching the official Flax layers (golden NOTES.md §2).

Tokens are kept as `[B, T, K, D]` everywhere (frames x tokens per frame): a block
runs attention along one axis of that grid ("space": within a frame, "time":
across frames at the same spatial location) without transposing the activations.
A plain token sequence `[B, L, D]` (text, auxiliary encoder) is `[B, 1, L, D]`
with axis="space".
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from videoprism.ops.attention import factorized_attention


def layer_norm(dim: int, *, device=None, dtype=None) -> nn.LayerNorm:
    """LayerNorm of the official code: eps 1e-6, biased variance; its stored `scale`
    is gamma - 1, which the checkpoint loader converts (weight = 1 + scale)."""
    return nn.LayerNorm(dim, eps=1e-6, device=device, dtype=dtype)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection and a logit soft-cap.

    `qkv` output features are ordered (which, head, dim) so that the projection
    output viewed as `[B, T, K, 3, H, Dh]` feeds the fused kernels through strides.
    """

    def __init__(self, dim: int, num_heads: int, *, atten_logit_cap: float = 0.0,
                 attention_backend: str | None = None, device=None, dtype=None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"model_dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.atten_logit_cap = atten_logit_cap
        self.attention_backend = attention_backend
        self.qkv = nn.Linear(dim, 3 * dim, device=device, dtype=dtype)
        self.post = nn.Linear(dim, dim, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, *, axis: str, pos=None, num_locations=None, key_padding=None,
                causal: bool = False):
        B, T, K, _ = x.shape
        qkv = self.qkv(x).view(B, T, K, 3, self.num_heads, self.head_dim)
        o = factorized_attention(qkv, axis=axis, softcap=self.atten_logit_cap, pos=pos, num_locations=num_locations,
                                 key_padding=key_padding, causal=causal, backend=self.attention_backend)
        return self.post(o.reshape(B, T, K, -1))


class FeedForward(nn.Module):
    """Two linears with an activation; padded tokens contribute nothing (official
    paddings zero the hidden activations and the output)."""

    def __init__(self, dim: int, hidden: int, *, activation: str = "gelu", device=None, dtype=None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, device=device, dtype=dtype)
        self.fc2 = nn.Linear(hidden, dim, device=device, dtype=dtype)
        if activation not in ("gelu", "relu"):
            raise ValueError(f"activation must be 'gelu' or 'relu', got {activation!r}")
        self.activation = activation

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        h = self.fc1(x)
        # Exact (erf) GELU as jax.nn.gelu(approximate=False); ReLU in the text encoder.
        h = F.gelu(h) if self.activation == "gelu" else F.relu(h)
        if keep is not None:
            h = h * keep
        h = self.fc2(h)
        return h if keep is None else h * keep


class TransformerBlock(nn.Module):
    """Pre-LN block: x + Attn(LN(x)); x + FFN(LN(x)).

    norm_policy "primer_hybrid" (the unreleased LvT-giant text encoder) adds a
    LayerNorm after each sub-layer as well: x + LN_post(f(LN_pre(x))).
    """

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, *, atten_logit_cap: float = 0.0,
                 activation: str = "gelu", norm_policy: str = "pre", attention_backend: str | None = None,
                 device=None, dtype=None):
        super().__init__()
        if norm_policy not in ("pre", "primer_hybrid"):
            raise ValueError(f"norm_policy must be 'pre' or 'primer_hybrid', got {norm_policy!r}")
        kw = dict(device=device, dtype=dtype)
        self.ln_attn = layer_norm(dim, **kw)
        self.attn = Attention(dim, num_heads, atten_logit_cap=atten_logit_cap,
                              attention_backend=attention_backend, **kw)
        self.ln_ffn = layer_norm(dim, **kw)
        self.ffn = FeedForward(dim, mlp_dim, activation=activation, **kw)
        hybrid = norm_policy == "primer_hybrid"
        self.post_ln_attn = layer_norm(dim, **kw) if hybrid else nn.Identity()
        self.post_ln_ffn = layer_norm(dim, **kw) if hybrid else nn.Identity()

    def forward(self, x, *, axis: str, pos=None, num_locations=None, padding=None, causal: bool = False):
        keep = None if padding is None else (1.0 - padding.to(x.dtype))[..., None]
        key_padding = None if padding is None else padding > 0
        x = x + self.post_ln_attn(self.attn(self.ln_attn(x), axis=axis, pos=pos, num_locations=num_locations,
                                            key_padding=key_padding, causal=causal))
        return x + self.post_ln_ffn(self.ffn(self.ln_ffn(x), keep))


class TransformerStack(nn.Module):
    """`num_layers` blocks along one axis of the token grid `[B, T, K, D]`."""

    def __init__(self, num_layers: int, dim: int, num_heads: int, mlp_dim: int, *, axis: str = "space",
                 causal: bool = False, atten_logit_cap: float = 0.0, activation: str = "gelu",
                 norm_policy: str = "pre", attention_backend: str | None = None, device=None, dtype=None):
        super().__init__()
        self.axis, self.causal = axis, causal
        self.layers = nn.ModuleList(
            TransformerBlock(dim, num_heads, mlp_dim, atten_logit_cap=atten_logit_cap, activation=activation,
                             norm_policy=norm_policy, attention_backend=attention_backend,
                             device=device, dtype=dtype)
            for _ in range(num_layers)
        )

    def forward(self, x: torch.Tensor, *, pos=None, num_locations=None, padding=None) -> torch.Tensor:
        """x [B, T, K, D]; pos [B, T, K] (time axis, masked video) on a grid of `num_locations` patches;
        padding [B, T, K] (1 = padded)."""
        for layer in self.layers:
            x = layer(x, axis=self.axis, pos=pos, num_locations=num_locations, padding=padding, causal=self.causal)
        return x


class AttentionPooler(nn.Module):
    """Multi-head attention pooling with one learned query (official AttenTokenPoolingLayer).

    No input LayerNorm, no FFN, no residual, no logit cap; queries scaled by
    PerDimScale: q * (1.442695041 / sqrt(Dh)) * softplus(per_dim_scale) (1.442695041 =
    1 / softplus(0), so zeros give 1/sqrt(Dh)); LayerNorm on the output.
    """

    def __init__(self, dim: int, num_heads: int, hidden_dim: int, *, device=None, dtype=None):
        super().__init__()
        if hidden_dim % num_heads:
            raise ValueError(f"pooler hidden_dim {hidden_dim} must be divisible by num_heads {num_heads}")
        kw = dict(device=device, dtype=dtype)
        self.num_heads, self.head_dim = num_heads, hidden_dim // num_heads
        self.query = nn.Parameter(torch.empty(1, dim, **kw))
        self.q = nn.Linear(dim, hidden_dim, **kw)
        self.k = nn.Linear(dim, hidden_dim, **kw)
        self.v = nn.Linear(dim, hidden_dim, **kw)
        self.per_dim_scale = nn.Parameter(torch.empty(self.head_dim, **kw))
        self.post = nn.Linear(hidden_dim, dim, **kw)
        self.ln = layer_norm(dim, **kw)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.query.is_meta:
            return
        nn.init.normal_(self.query, std=self.query.shape[-1] ** -0.5)
        nn.init.zeros_(self.per_dim_scale)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, L, D] -> [B, D]."""
        B, L, _ = tokens.shape
        H, Dh = self.num_heads, self.head_dim
        q = self.q(self.query).view(1, H, 1, Dh)
        r_softplus_0 = 1.442695041
        q = q * (r_softplus_0 / math.sqrt(Dh)) * F.softplus(self.per_dim_scale)
        k = self.k(tokens).view(B, L, H, Dh).transpose(1, 2)
        v = self.v(tokens).view(B, L, H, Dh).transpose(1, 2)
        o = F.scaled_dot_product_attention(q.expand(B, -1, -1, -1).to(k.dtype), k, v, scale=1.0)
        return self.ln(self.post(o.reshape(B, H * Dh)))


def interpolate_spatial_pos_emb(emb: torch.Tensor, src: tuple[int, int], dst: tuple[int, int]) -> torch.Tensor:
    """[Hp*Wp, D] -> [h*w, D]: bilinear with antialias and half-pixel centres, the
    PyTorch equivalent of jax.image.resize(..., 'bilinear') (golden NOTES §5)."""
    if tuple(src) == tuple(dst):
        return emb
    (hp, wp), (h, w) = src, dst
    x = emb.reshape(hp, wp, -1).permute(2, 0, 1)[None]
    y = F.interpolate(x.float(), size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    return y[0].permute(1, 2, 0).reshape(h * w, -1).to(emb.dtype)


def interpolate_temporal_pos_emb(emb: torch.Tensor, t: int) -> torch.Tensor:
    """[Tp, D] -> [t, D], linear with antialias (4-D input: 'linear' has no antialias)."""
    if emb.shape[0] == t:
        return emb
    y = F.interpolate(emb.T[None, :, None, :].float(), size=(1, t), mode="bilinear",
                      align_corners=False, antialias=True)
    return y[0, :, 0, :].T.to(emb.dtype)


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """x / sqrt(sum(x^2) + 1e-12), the official epsilon-inside-sqrt form."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + 1e-12)
