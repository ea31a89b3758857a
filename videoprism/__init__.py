"""VideoPrism-fast: a PyTorch VideoPrism with exact official-checkpoint parity and fused kernels.

Public names: FactorizedEncoder, FactorizedVideoCLIP, FactorizedVideoClassifier,
from_official, load_flax_checkpoint, save_safetensors, load_safetensors, model_from_safetensors.
"""
from videoprism.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_flax_checkpoint,
    load_safetensors,
    model_from_safetensors,
    save_safetensors,
)
from videoprism.classifier import FactorizedVideoClassifier
from videoprism.clip import FactorizedVideoCLIP
from videoprism.config import CLIPConfig, ClassifierConfig, EncoderConfig
from videoprism.encoder import FactorizedEncoder
from videoprism.models import build_model, from_official

__all__ = [
    "FactorizedEncoder", "FactorizedVideoCLIP", "FactorizedVideoClassifier", "EncoderConfig", "CLIPConfig",
    "ClassifierConfig", "from_official", "build_model", "load_flax_checkpoint", "save_safetensors",
    "load_safetensors", "load_checkpoint", "model_from_safetensors", "CheckpointError",
]
