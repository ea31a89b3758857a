"""`FactorizedEncoder`: the VideoPrism video encoder (golden NOTES.md §3, DESIGN 3-4).

patchify (P x P, (p, q, c) order) -> linear -> + spatial pos emb -> spatial ViT over
each frame -> LN -> + temporal pos emb -> temporal ViT over each location -> LN.

Activations stay `[B, T, K, D]` from patch embedding to output: the spatial stack
attends along K, the temporal stack along T, with no transpose in between. With a
mask, only the K visible patches of each frame (`pos [B, T, K]`, sorted spatial
indices) are computed, so a masked run costs about K / N of a full one.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from videoprism import ops
from videoprism.config import EncoderConfig, resolve_config
from videoprism.checks import check_paddings, check_pos, check_video
from videoprism.kernels.token_ops_ref import patch_grid, pixel_values
from videoprism.layers import (
    TransformerStack,
    interpolate_spatial_pos_emb,
    interpolate_temporal_pos_emb,
    layer_norm,
)


def patchify(video: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[B, T, H, W, 3] -> [B, T, N, P*P*3]: row-major patches, (p, q, c) features, in [0, 1].
    The layout and the uint8 scaling (times fp32(1/255)) of the masked patch gather's reference
    (kernels/token_ops_ref.py patchify_gather_ref), without the gather: the teacher (unmasked) and the student
    (masked) must agree bit for bit. A float video keeps its dtype."""
    return pixel_values(patch_grid(video, patch_size))


class FactorizedEncoder(nn.Module):
    """Factorized space-time video encoder.

    forward(video [B, T, H, W, 3], frame_paddings [B, T] (1 = padded) or None,
    return_intermediate, *, pos [B, T, K] visible patch indices or None,
    crop_temporal_pos_emb=False)
    (pos may also be [B, 1, K]: a tube mask, the same visible set in every frame; the temporal
    stack then runs on plain columns, the same sequences without the masked time-axis search)
    -> (embeddings [B, T*K, D] frame-major, {"spatial_features": [B, T*K, D]} if asked).

    Clips of another length than the temporal position embedding interpolate it, as the
    official model does; `crop_temporal_pos_emb=True` takes its first T rows instead (how
    images, one-frame videos, are trained: DESIGN 5).
    """

    def __init__(self, config: EncoderConfig | None = None, *, device=None, dtype=None, **overrides):
        super().__init__()
        config = resolve_config(EncoderConfig, config, overrides)
        self.config = config
        kw = dict(device=device, dtype=dtype)
        D, P = config.model_dim, config.patch_size
        Tp, Hp, Wp = config.pos_emb_shape
        self.patch_projection = nn.Linear(P * P * 3, D, **kw)
        self.spatial_pos_emb = nn.Parameter(torch.empty(Hp * Wp, D, **kw))
        self.temporal_pos_emb = nn.Parameter(torch.empty(Tp, D, **kw))
        stack = dict(atten_logit_cap=config.atten_logit_cap, attention_backend=config.attention_backend, **kw)
        self.spatial_encoder = TransformerStack(config.num_spatial_layers, D, config.num_heads, config.mlp_dim,
                                                axis="space", **stack)
        self.spatial_ln = layer_norm(D, **kw)
        self.temporal_encoder = TransformerStack(config.num_temporal_layers, D, config.num_heads, config.mlp_dim,
                                                 axis="time", **stack)
        self.temporal_ln = layer_norm(D, **kw)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.spatial_pos_emb.is_meta:
            return
        nn.init.normal_(self.spatial_pos_emb, std=0.02)
        nn.init.normal_(self.temporal_pos_emb, std=0.02)

    def forward(self, video: torch.Tensor, frame_paddings: torch.Tensor | None = None,
                return_intermediate: bool = False, *, pos: torch.Tensor | None = None,
                crop_temporal_pos_emb: bool = False):
        cfg = self.config
        P = cfg.patch_size
        device = self.spatial_pos_emb.device
        check_video(video, P, device)
        B, T, H, W, _ = video.shape
        grid = (H // P, W // P)
        if frame_paddings is not None:
            check_paddings("frame_paddings", frame_paddings, (B, T), device)

        if pos is None:
            x = self.patch_projection(patchify(video, P).to(self.patch_projection.weight.dtype))
        else:
            if not isinstance(pos, torch.Tensor) or pos.dim() != 3 or pos.shape[0] != B or pos.shape[1] not in (1, T):
                got = tuple(pos.shape) if isinstance(pos, torch.Tensor) else type(pos).__name__
                raise ValueError(f"pos must be [B, T, K] = [{B}, {T}, K] visible patch indices (or [{B}, 1, K], a "
                                 f"tube mask), got {got}")
            check_pos(pos, grid[0] * grid[1], device)
            x = self.patch_projection(ops.patchify_gather(video, pos.expand(B, T, -1), P)
                                      .to(self.patch_projection.weight.dtype))
        K = x.shape[2]

        spatial = interpolate_spatial_pos_emb(self.spatial_pos_emb, cfg.pos_emb_shape[1:], grid)
        # embedding(), not spatial[pos]: its CPU backward sums the rows of repeated indices in a
        # fixed order; indexing's (index_put_ with accumulate) does not, so two CPU runs of one
        # seed drifted apart from the first steps.
        x = x + (spatial if pos is None else F.embedding(pos, spatial))

        padding = None
        if frame_paddings is not None:
            # Every token of a padded frame is padded, in both stacks (official semantics).
            padding = frame_paddings.to(x.dtype)[:, :, None].expand(B, T, K)

        x = self.spatial_ln(self.spatial_encoder(x, padding=padding))
        spatial_features = x
        if crop_temporal_pos_emb:
            if T > self.temporal_pos_emb.shape[0]:
                raise ValueError(f"crop_temporal_pos_emb: {T} frames but only {self.temporal_pos_emb.shape[0]} "
                                 f"temporal position embeddings; interpolate instead")
            temporal = self.temporal_pos_emb[:T]
        else:
            temporal = interpolate_temporal_pos_emb(self.temporal_pos_emb, T)
        x = x + temporal[None, :, None, :]
        # A tube mask keeps slot k at one location in every frame: the time axis is then the
        # column of each slot, as for an unmasked clip (pos=None), with no search for it.
        time_pos = None if pos is None or pos.shape[1] == 1 else pos
        x = self.temporal_ln(self.temporal_encoder(x, pos=time_pos, num_locations=grid[0] * grid[1],
                                                   padding=padding))

        aux = {}
        if return_intermediate:
            aux["spatial_features"] = spatial_features.reshape(B, T * K, -1)
        return x.reshape(B, T * K, -1), aux

