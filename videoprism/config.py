"""Typed model configurations and the official named configurations.

Field names are the official ones (videoprism/models.py CONFIGS) so that
`from_official(name, **overrides)` takes the official keys unchanged.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from videoprism.paths import shown, shown_each


@dataclass
class EncoderConfig:
    """Factorized space-time ViT (official `FactorizedEncoder`)."""

    patch_size: int = 18
    """Side of the square patches, in pixels."""
    pos_emb_shape: tuple[int, int, int] = (16, 16, 16)
    """(frames, patch rows, patch columns) of the learned position embeddings; other
    clip sizes interpolate them."""
    model_dim: int = 768
    """Width D of the tokens."""
    num_spatial_layers: int = 12
    """Blocks attending within each frame."""
    num_temporal_layers: int = 4
    """Blocks attending across frames at each spatial location."""
    num_heads: int = 12
    """Attention heads (head dim = model_dim // num_heads)."""
    mlp_dim: int = 3072
    """Hidden width of the feed-forward layers."""
    atten_logit_cap: float = 50.0
    """Soft cap c of the attention logits, c * tanh(s / c); 0 disables it."""
    attention_backend: str | None = None
    """"reference", "sdpa", "triton", "flex", "flash" or None (the device default)."""

    def __post_init__(self):
        """Each field has the type of its default (a wrong one, e.g. from `--set model_dim=abc`, failed deep
        inside a layer constructor); sizes are positive, layer counts and the cap non-negative."""
        if isinstance(self.pos_emb_shape, list):
            self.pos_emb_shape = tuple(self.pos_emb_shape)
        for f in dataclasses.fields(self):
            v, d = getattr(self, f.name), f.default
            if f.name == "pos_emb_shape":
                ok = isinstance(v, tuple) and len(v) == 3 and all(_is_int(x) and x > 0 for x in v)
                want = "3 positive ints (frames, rows, cols)"
            elif isinstance(d, bool):
                ok, want = isinstance(v, bool), "true or false"
            elif isinstance(d, int):
                lo = 0 if f.name.endswith("_layers") else 1
                ok, want = _is_int(v) and v >= lo, f"an int >= {lo}"
            elif isinstance(d, float):
                ok = isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < math.inf
                want = "a finite number >= 0"
            elif f.name == "attention_backend":
                from videoprism.ops.attention import BACKENDS

                ok, want = v in (None, "auto", *BACKENDS), f"one of {', '.join(BACKENDS)}, 'auto' or None"
            else:  # str, or str | None
                ok, want = isinstance(v, str) or (v is None and d is None), "a string"
            if not ok:
                raise ValueError(f"{type(self).__name__}.{f.name} must be {want}, got {shown(v)}")


@dataclass
class CLIPConfig(EncoderConfig):
    """Video-text model (official `FactorizedVideoCLIP`, "LvT")."""

    vocabulary_size: int = 32000
    """Text vocabulary (official: SentencePiece c4_en, 32k)."""
    num_unimodal_layers: int = 12
    """Blocks of the causal text encoder (FFN width 4 * model_dim, ReLU)."""
    num_auxiliary_layers: int = 2
    """Blocks over all video tokens between the encoder and the pooler."""
    enable_causal_atten: bool = True
    """Causal attention in the text encoder."""
    norm_policy: str = "pre"
    """Text encoder normalisation: "pre", or "primer_hybrid" (LvT giant)."""


@dataclass
class ClassifierConfig(EncoderConfig):
    """Encoder + attention pooler + linear head (official `FactorizedVideoClassifier`)."""

    num_classes: int = 400
    """Number of output logits."""


_ENCODERS = {
    "base": dict(pos_emb_shape=(16, 16, 16), model_dim=768, num_spatial_layers=12, num_heads=12, mlp_dim=3072),
    "large": dict(pos_emb_shape=(8, 16, 16), model_dim=1024, num_spatial_layers=24, num_heads=16, mlp_dim=4096),
    "giant": dict(pos_emb_shape=(8, 16, 16), model_dim=1408, num_spatial_layers=40, num_heads=16, mlp_dim=6144),
}
_TEXT = {
    "base": dict(num_unimodal_layers=12),
    "large": dict(num_unimodal_layers=12),
    "giant": dict(num_unimodal_layers=16, norm_policy="primer_hybrid"),
}

CONFIGS: dict[str, tuple[type, dict]] = {}
for _size in ("base", "large", "giant"):
    CONFIGS[f"videoprism_v1_{_size}"] = (EncoderConfig, _ENCODERS[_size])
    CONFIGS[f"videoprism_lvt_v1_{_size}"] = (CLIPConfig, {**_ENCODERS[_size], **_TEXT[_size]})
    CONFIGS[f"videoprism_vc_v1_{_size}"] = (ClassifierConfig, _ENCODERS[_size])
# Names of the released checkpoints (flax_base_f16r288_repeated.npz, ...).
for _size in ("base", "large"):
    CONFIGS[f"videoprism_public_v1_{_size}"] = CONFIGS[f"videoprism_v1_{_size}"]
    CONFIGS[f"videoprism_lvt_public_v1_{_size}"] = CONFIGS[f"videoprism_lvt_v1_{_size}"]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def narrow_config(config, cls):
    """The `cls` part of a config (a subclass instance): e.g. the EncoderConfig of a CLIP's vision tower."""
    return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)})


def resolve_config(cls, config, overrides: dict):
    """A model's config from its constructor's arguments: `config` with `overrides` applied (a field set
    both ways takes the override), or `cls(**overrides)` without a config."""
    if config is not None and not isinstance(config, cls):
        raise ValueError(f"this model takes a {cls.__name__}, got a {type(config).__name__} (build it with "
                         "videoprism.from_official(name) or the matching config class)")
    return dataclasses.replace(config, **overrides) if config is not None else cls(**overrides)


def official_config(name: str, **overrides):
    """The typed config of an official name, with field overrides."""
    if name not in CONFIGS:
        raise ValueError(f"unknown model name {shown(name)}; known: {', '.join(sorted(CONFIGS))}")
    cls, values = CONFIGS[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"{name}: unknown config field(s) {shown_each(unknown)}; {cls.__name__} has {sorted(fields)}")
    values = {**values, **overrides}  # each checked by the config (a list pos_emb_shape becomes a tuple there)
    if cls is ClassifierConfig and "num_classes" not in overrides:
        raise ValueError(f"{name} is a classifier: pass num_classes=N (videoprism convert --num-classes N, "
                         "videoprism embed --set num_classes=N)")
    return cls(**values)


__all__ = ["EncoderConfig", "CLIPConfig", "ClassifierConfig", "CONFIGS", "official_config"]
