"""Build models from official configuration names."""
from __future__ import annotations

from torch import nn

from videoprism.classifier import FactorizedVideoClassifier
from videoprism.clip import FactorizedVideoCLIP
from videoprism.config import CLIPConfig, ClassifierConfig, EncoderConfig, official_config
from videoprism.encoder import FactorizedEncoder


def build_model(config: EncoderConfig, *, device=None, dtype=None) -> nn.Module:
    """The model class that goes with a config (CLIP, classifier or plain encoder)."""
    if isinstance(config, CLIPConfig):
        return FactorizedVideoCLIP(config, device=device, dtype=dtype)
    if isinstance(config, ClassifierConfig):
        return FactorizedVideoClassifier(config, device=device, dtype=dtype)
    return FactorizedEncoder(config, device=device, dtype=dtype)


def from_official(name: str, *, device=None, dtype=None, **overrides) -> nn.Module:
    """A randomly initialised model of an official configuration.

    name: videoprism_v1_{base,large,giant}, videoprism_lvt_v1_{...}, videoprism_vc_v1_{...}
    (pass num_classes), or a released name (videoprism_public_v1_base, ...). overrides: official
    config fields (patch_size, pos_emb_shape, model_dim, num_heads, ...) and ours
    (attention_backend). device="meta" builds without memory (parameter counts, then
    load a checkpoint with assign).
    """
    return build_model(official_config(name, **overrides), device=device, dtype=dtype)
