"""Building the models the stages train, from the config or from an exported file."""
from __future__ import annotations

import os
import sys

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

import videoprism
from videoprism.checkpoint import checkpoint_config, grid_fits, guessed_grid_note, load_checkpoint
from videoprism.config import CLIPConfig, official_config
from videoprism.paths import LONGEST_PATH, echo, shortened
from videoprism.train.config import ENCODER_SHAPE_FIELDS, ModelConfig

# The config fields that shape an LvT model's weights: the encoder's and the text tower's.
_CLIP_SHAPE_FIELDS = (*ENCODER_SHAPE_FIELDS, "num_unimodal_layers", "vocabulary_size")


def _backend(name: str) -> str | None:
    return None if name == "auto" else name


def build_clip(mc: ModelConfig, *, vocab: int | None, device: torch.device) -> videoprism.FactorizedVideoCLIP:
    """A `FactorizedVideoCLIP` of `mc.name` with the overrides of `mc`, initialised per `mc.init`.

    A randomly initialised model gets position embeddings of exactly the training clip
    size (no interpolation in every step) unless model.pos_emb_shape says otherwise; an
    official checkpoint keeps the shape of its arrays, our export the shape it was trained with
    (its metadata), either unless model.pos_emb_shape says otherwise."""
    # The kind is checked before the overrides, which an encoder config would reject as unknown fields.
    if not isinstance(official_config(mc.name), CLIPConfig):
        raise ValueError(f"model.name={mc.name!r} is not a video-text (LvT) model; use videoprism_lvt_v1_*")
    overrides = mc.overrides(vocab)
    base = official_config(mc.name, **overrides)
    if mc.resolution % base.patch_size:
        raise ValueError(f"model.resolution={mc.resolution} is not a multiple of the patch size {base.patch_size}")
    saved = None if mc.init == "random" else checkpoint_config(mc.init)  # (class, shape fields), read once
    if saved is None and not mc.pos_emb_shape:
        grid = mc.resolution // base.patch_size
        overrides["pos_emb_shape"] = (mc.num_frames, grid, grid)
    elif saved is not None and not mc.pos_emb_shape and saved[1].get("pos_emb_shape"):
        overrides["pos_emb_shape"] = tuple(saved[1]["pos_emb_shape"])
        note = guessed_grid_note(saved[1], f"model.init={shortened(mc.init, LONGEST_PATH)}")
        if note and os.environ.get("RANK", "0") == "0":
            echo(note, file=sys.stderr)
    if saved is not None:
        _check_init(mc.init, saved, official_config(mc.name, **overrides))
    model = videoprism.from_official(mc.name, attention_backend=_backend(mc.attention_backend), **overrides)
    if mc.init != "random":
        load_checkpoint(mc.init, model)
    return model.to(device)


def _check_init(path: str, init: tuple[str | None, dict], config: CLIPConfig) -> None:
    """model.init against the model this run builds (`config`), by `init` (checkpoint_config: the config our
    safetensors carries or the shapes of an official .npz's arrays tell): its load said only a tensor's two shapes
    (another width) or the first keys of another model (a stage-2 export), neither the field to set."""
    kind, saved = init
    if kind and kind != "FactorizedVideoCLIP":
        raise ValueError(f"model.init={path!r} holds a {kind}; stage 1 starts from a video-text model: a stage-1 "
                         "run's export or an official LvT .npz (a stage-2 export is a student encoder)")
    have = {k: getattr(config, k) for k in _CLIP_SHAPE_FIELDS}
    have["pos_emb_shape"] = list(have["pos_emb_shape"])
    differ = [k for k in _CLIP_SHAPE_FIELDS if k in saved
              and not (grid_fits(saved, have[k]) if k == "pos_emb_shape" else saved[k] == have[k])]
    if differ:
        def said(values: dict) -> str:
            return " ".join(f"model.{k}={','.join(map(str, values[k])) if k == 'pos_emb_shape' else values[k]}"
                            for k in differ)
        raise ValueError(f"model.init={path!r} holds a model of {said(saved)} and this run's config builds "
                         f"{said(have)}: set {said(saved)}")


def model_from_safetensors(path: str, *, expect: str, attention_backend: str = "auto",
                           device: torch.device | str = "cpu") -> nn.Module:
    """An exported model (`expect`: FactorizedVideoCLIP from stage 1, FactorizedEncoder from
    stage 2) rebuilt from the config in its metadata, with its weights."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r}: no such weights file (a training run writes OUT_DIR/model.safetensors)")
    return videoprism.model_from_safetensors(path, expect=expect,
                                             attention_backend=_backend(attention_backend)).to(device)


def full_state_dict(module: nn.Module) -> dict:
    """The whole state dict on the CPU from any parallel layout (collective under FSDP)."""
    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def sub_state_dict(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
