"""`FactorizedVideoCLIP` ("LvT"): video tower + CoCa-style text tower (golden NOTES.md §4).

Video: FactorizedEncoder -> auxiliary ViT over all T*K tokens -> MAP pooler (hidden
4D) -> L2 normalise. Text: token embedding * sqrt(D) + sinusoid, a learned class
token * sqrt(D) appended at the end, causal unimodal ViT (ReLU FFN of width 4D),
LayerNorm, class-token output -> L2 normalise.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from videoprism.checks import check_paddings, check_text_ids
from videoprism.config import CLIPConfig, resolve_config
from videoprism.encoder import FactorizedEncoder
from videoprism.layers import AttentionPooler, TransformerStack, l2_normalize, layer_norm


def sinusoid_position_embedding(length: int, dim: int, *, device=None) -> torch.Tensor:
    """[length, dim] = [sin(pos * inv) | cos(pos * inv)] halves (not interleaved),
    inv = exp(-arange(dim // 2) * log(1e4) / max(dim // 2 - 1, 1)); zero column if dim is odd."""
    half = dim // 2
    inc = math.log(10000.0) / max(half - 1, 1)
    inv = torch.exp(torch.arange(half, device=device, dtype=torch.float32) * -inc)
    ang = torch.arange(length, device=device, dtype=torch.float32)[:, None] * inv[None, :]
    emb = torch.cat([torch.sin(ang), torch.cos(ang)], dim=-1)
    return torch.nn.functional.pad(emb, (0, dim % 2))


class TextEncoder(nn.Module):
    """CoCa-style unimodal text encoder; forward(ids [B, L], paddings [B, L]) -> [B, L + 1, D]."""

    def __init__(self, config: CLIPConfig, *, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        D = config.model_dim
        self.model_dim = D
        self.token_emb = nn.Embedding(config.vocabulary_size, D, **kw)
        self.cls_emb = nn.Parameter(torch.empty(1, 1, D, **kw))
        self.unimodal_transformer = TransformerStack(
            config.num_unimodal_layers, D, config.num_heads, 4 * D, axis="space",
            causal=config.enable_causal_atten, atten_logit_cap=config.atten_logit_cap, activation="relu",
            norm_policy=config.norm_policy, attention_backend=config.attention_backend, **kw)
        self.unimodal_ln = layer_norm(D, **kw)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.cls_emb.is_meta:
            return
        nn.init.normal_(self.token_emb.weight, std=self.model_dim**-0.5)
        nn.init.normal_(self.cls_emb, std=self.model_dim**-0.5)

    def forward(self, ids: torch.Tensor, paddings: torch.Tensor) -> torch.Tensor:
        """[B, L] ids and paddings (1 = padded) -> [B, L + 1, D], the class token last (the text
        embedding). The states of real positions and of the class token equal the official model's;
        those of padded positions do not: padding masks keys only here, while the official causal
        mask also masks a padded query's whole row (it then attends uniformly). No output reads them."""
        device = self.cls_emb.device
        check_text_ids(ids, self.token_emb.num_embeddings, device)
        check_paddings("text_paddings", paddings, tuple(ids.shape), device)
        B, L = ids.shape
        D = self.model_dim
        scale = math.sqrt(D)
        x = self.token_emb(ids.long()) * scale
        x = x + sinusoid_position_embedding(L, D, device=x.device).to(x.dtype)
        x = torch.cat([x, (self.cls_emb * scale).expand(B, 1, D).to(x.dtype)], dim=1)
        # The class token is never padded; padding comes from `paddings`, never from id 0.
        pad = torch.cat([paddings.to(x.dtype), paddings.new_zeros(B, 1).to(x.dtype)], dim=1)
        x = self.unimodal_transformer(x[:, None], padding=pad[:, None])[:, 0]
        return self.unimodal_ln(x)


class FactorizedVideoCLIP(nn.Module):
    """Video-text dual encoder.

    forward(video, text_ids, text_paddings, *, frame_paddings=None, pos=None,
    normalize=True, return_intermediate=False, crop_temporal_pos_emb=False) -> (video_emb [B, D] | None,
    text_emb [Bt, D] | None, aux). Either tower's input may be None.
    aux (with return_intermediate): spatial_features, spatiotemporal_features,
    frame_embeddings [B, T, D].
    """

    def __init__(self, config: CLIPConfig | None = None, *, device=None, dtype=None, **overrides):
        super().__init__()
        config = resolve_config(CLIPConfig, config, overrides)
        self.config = config
        kw = dict(device=device, dtype=dtype)
        D = config.model_dim
        self.vision_encoder = FactorizedEncoder(config, **kw)
        self.auxiliary_encoder = TransformerStack(
            config.num_auxiliary_layers, D, config.num_heads, config.mlp_dim, axis="space",
            atten_logit_cap=config.atten_logit_cap, attention_backend=config.attention_backend, **kw)
        self.contrastive_vision_pooler = AttentionPooler(D, config.num_heads, 4 * D, **kw)
        self.text_encoder = TextEncoder(config, **kw)

    def encode_video(self, video, *, frame_paddings=None, pos=None, normalize=True, return_intermediate=False,
                     crop_temporal_pos_emb=False):
        feats, aux = self.vision_encoder(video, frame_paddings, return_intermediate, pos=pos,
                                         crop_temporal_pos_emb=crop_temporal_pos_emb)
        if return_intermediate:
            aux["spatiotemporal_features"] = feats
        # The auxiliary encoder and the pooler see no padding (official semantics).
        feats = self.auxiliary_encoder(feats[:, None])[:, 0]
        emb = self.contrastive_vision_pooler(feats)
        if return_intermediate:
            B, T = video.shape[:2]
            frames = self.contrastive_vision_pooler(feats.reshape(B * T, -1, feats.shape[-1])).reshape(B, T, -1)
            aux["frame_embeddings"] = l2_normalize(frames) if normalize else frames
        return (l2_normalize(emb) if normalize else emb), aux

    def encode_text(self, text_ids, text_paddings, *, normalize=True):
        emb = self.text_encoder(text_ids, text_paddings)[:, -1]
        return l2_normalize(emb) if normalize else emb

    def forward(self, video=None, text_ids=None, text_paddings=None, *, frame_paddings=None, pos=None,
                normalize: bool = True, return_intermediate: bool = False, crop_temporal_pos_emb: bool = False):
        video_emb = text_emb = None
        aux = {}
        if video is not None:
            video_emb, aux = self.encode_video(video, frame_paddings=frame_paddings, pos=pos, normalize=normalize,
                                               return_intermediate=return_intermediate,
                                               crop_temporal_pos_emb=crop_temporal_pos_emb)
        if text_ids is not None:
            if text_paddings is None:
                raise ValueError("text_paddings are required with text_ids ([B, L], 1.0 = padded)")
            text_emb = self.encode_text(text_ids, text_paddings, normalize=normalize)
        return video_emb, text_emb, aux
