"""`FactorizedVideoClassifier`: encoder -> attention pooler (hidden D) -> linear head."""
from __future__ import annotations

from torch import nn

from videoprism.config import ClassifierConfig, resolve_config
from videoprism.encoder import FactorizedEncoder
from videoprism.layers import AttentionPooler


class FactorizedVideoClassifier(nn.Module):
    """forward(video, frame_paddings=None, return_intermediate=False) -> (logits [B, C], aux).

    aux (with return_intermediate): global_embeddings [B, D], spatiotemporal_features
    [B, T*N, D]. The pooler sees no padding (official semantics).
    """

    def __init__(self, config: ClassifierConfig | None = None, *, device=None, dtype=None, **overrides):
        super().__init__()
        config = resolve_config(ClassifierConfig, config, overrides)
        self.config = config
        kw = dict(device=device, dtype=dtype)
        D = config.model_dim
        self.encoder = FactorizedEncoder(config, **kw)
        self.atten_pooler = AttentionPooler(D, config.num_heads, D, **kw)
        self.projection = nn.Linear(D, config.num_classes, **kw)

    def forward(self, video, frame_paddings=None, return_intermediate: bool = False, *, pos=None):
        feats, aux = self.encoder(video, frame_paddings, return_intermediate, pos=pos)
        pooled = self.atten_pooler(feats)
        logits = self.projection(pooled)
        if return_intermediate:
            aux.update(global_embeddings=pooled, spatiotemporal_features=feats)
        return logits, aux
