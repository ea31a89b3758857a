"""A run's model as a safetensors file: what a training stage writes at its end (OUT_DIR/model.safetensors), and
`videoprism export` of any of its checkpoints (a step_* folder) after the fact.

A stage exports one part of its training module (stage 1 the CLIP, without the temperature; stage 2 the student
encoder) as a `videoprism` model with its config in the file's metadata. What part, of which class and config, is
the stage's `export_spec`; every checkpoint keeps it (rank0.pt), so a checkpoint exports without its run's config,
tokenizer or teacher at hand.
"""
from __future__ import annotations

import os

import torch
from torch import nn

import videoprism
from videoprism.checkpoint import config_fields, model_from_config
from videoprism.train import checkpoint as ckpt
from videoprism.train.modeling import full_state_dict, sub_state_dict


def export_spec(model_class: str, config, prefix: str, clip: dict) -> dict:
    """The exported model: its class name, its config (JSON values, the fields of the class's own config), the
    prefix of its weights in the training module's state dict and the clip size it trains on (`clip`:
    {"num_frames", "resolution"}: what `embed` and `eval` default to)."""
    return {"class": model_class, "config": config_fields(model_class, config), "prefix": prefix, "clip": clip}


def _model(spec: dict, state: dict) -> nn.Module:
    model = model_from_config(spec["class"], spec["config"], where="the checkpoint's export spec")
    model.load_state_dict(sub_state_dict(state, spec["prefix"]), strict=True, assign=True)
    return model


def export_module(module: nn.Module, spec: dict, path: str, *, main: bool) -> None:
    """Write the part `spec` names of the training `module` (any parallel layout: collective under FSDP) to `path`
    on the main rank."""
    state = full_state_dict(module)
    if main:
        videoprism.save_safetensors(_model(spec, state), path, clip=spec.get("clip"))


def export_checkpoint(checkpoint: str, out: str | None = None) -> str:
    """The model of a training checkpoint (a run's out_dir: its latest; its checkpoints folder; a step_* folder)
    as safetensors at `out` (default: RUN/model.step_XXXXXXXX.safetensors); returns the path. One process, on the
    CPU, whatever number of ranks wrote it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from videoprism.train.run_folder import run_folder

    step = ckpt.find(checkpoint, required=True, option="export")
    ckpt.readable(step, use="export")  # a lost rank0.pt or .metadata (a save that did not finish): named, with the fix
    spec = ckpt.read_rank_state(step, 0, use="export").get("export")
    if spec is None:
        raise ValueError(f"{step} was written before checkpoints named their export; resume its run from it into a "
                         "new folder to export it (--resume STEP train.out_dir=NEW train.steps=STEP)")
    meta = ckpt.read_metadata(step, use="export").state_dict_metadata
    wanted = "model." + spec["prefix"]
    # The exported part only (not the optimizer's moments: 2x the model's memory for AdamW), allocated as saved.
    state = {k[len("model."):]: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items()
             if k.startswith(wanted) and isinstance(m, TensorStorageMetadata)}
    ckpt.quiet_single_process()
    loaded = {"model": state}
    try:
        dcp.load(loaded, checkpoint_id=step, no_dist=True, planner=DefaultLoadPlanner(allow_partial_load=True))
    except ckpt.LOAD_ERRORS as e:
        ckpt.interrupt(e)
        raise ckpt.damaged(step, "its .distcp files", e, use="export") from e
    out = out or os.path.join(run_folder(step), f"model.{os.path.basename(step.rstrip('/'))}.safetensors")
    videoprism.save_safetensors(_model(spec, loaded["model"]), out, clip=spec.get("clip"))  # older: none
    return out
