"""What a run's folder (train.out_dir) holds, and whether a run may write there.

A run writes its checkpoints, its export (model.safetensors), config.json and metrics.jsonl into train.out_dir.
Another run's checkpoints and export in that folder are work that a new run would replace: its checkpoints
renamed out of the way, its export overwritten at the end (a stage-1 export may be the teacher of a stage-2 run),
its records mixed with the new run's. So a run writes a folder that holds another run only when told to
(`--overwrite`): a fresh start there, or a resume from another folder's checkpoint into it. A run resumes only a
run of its own stage (config.json names it).
"""
from __future__ import annotations

import json
import os

from videoprism.train import checkpoint as ckpt
from videoprism.train.config import RUN_STAGE

EXPORT = "model.safetensors"


def export_path(out_dir: str) -> str:
    return os.path.join(out_dir, EXPORT)


def run_folder(path: str) -> str:
    """The out_dir of the run that `--resume PATH` names (PATH: an out_dir, its checkpoints folder or a step_*
    folder in it)."""
    path = os.path.abspath(path.rstrip("/") or "/")
    if ckpt.step_of(path) >= 0:
        path = os.path.dirname(path)
    return os.path.dirname(path) if os.path.basename(path) == "checkpoints" else path


def stage_of(folder: str) -> int | None:
    """The stage of the run in `folder`, as its config.json says (None: no such file, or written before it said)."""
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as fh:
            stage = json.load(fh).get(RUN_STAGE)
    except (OSError, ValueError, AttributeError):
        return None
    return stage if stage in (1, 2) else None


def holdings(folder: str) -> list[str]:
    """What a run in `folder` would lose to another one written there: its checkpoints and its export."""
    held = []
    steps = ckpt.step_dirs(os.path.join(folder, "checkpoints"))
    if steps:
        held.append(f"{len(steps)} checkpoint(s) up to step {steps[-1][0]}")
    if os.path.exists(export_path(folder)):
        held.append(f"its export {EXPORT}")
    return held


def same_folder(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def check_out_dir(out_dir: str, stage: int, *, resume: str | None, overwrite: bool, teacher: str = "") -> None:
    """ValueError, with the fix, when this run (stage `stage`, resuming from `resume` or starting fresh) must not
    write `out_dir`: it would overwrite its own teacher; it resumes another stage's run; or `out_dir` holds another
    run and `overwrite` is off."""
    if teacher and same_folder(teacher, export_path(out_dir)):
        raise ValueError(f"stage2.teacher={teacher} is this run's export path (train.out_dir/{EXPORT}): the stage-2 "
                         "export would overwrite its teacher; set train.out_dir to another folder")
    source = run_folder(resume) if resume is not None else None
    if source is not None:
        other = stage_of(source)
        if other is not None and other != stage:
            fix = (f"stage 2 starts from a stage-1 run's export: stage2.teacher={export_path(source)}, a new "
                   "train.out_dir and no --resume" if stage == 2 else
                   "stage 1 starts afresh (or from an export: model.init=PATH) in a folder of its own")
            raise ValueError(f"--resume {resume}: {source} holds a stage-{other} run, which stage {stage} cannot "
                             f"resume; {fix}")
        if same_folder(source, out_dir) and ckpt.step_dirs(os.path.join(out_dir, "checkpoints")):
            return  # the run goes on in its own folder
    held = holdings(out_dir)
    if not held or overwrite:
        return
    held_stage = stage_of(out_dir)
    what = f"a stage-{held_stage} run" if held_stage is not None else "another run"
    if source is not None and same_folder(source, out_dir):
        # --auto-resume's first start (no checkpoint here yet) in a folder that holds an export: a converted model
        # or a finished run's, which this run's export would replace at the end.
        fix = ("it has no checkpoint to continue; set train.out_dir to a folder of this run's own, or start over "
               "there with --overwrite instead of --auto-resume")
    elif source is None:
        fix = ("continue it with --resume (or --auto-resume), " if held_stage in (None, stage) else "") + (
            "set train.out_dir to a folder of this run's own, or add --overwrite to start over there")
    else:
        fix = f"set train.out_dir to a folder of this run's own to continue {source}'s run there, or add --overwrite"
    raise ValueError(f"train.out_dir={out_dir} holds {what} ({', '.join(held)}), which this run would replace; {fix} "
                     "(with --overwrite its checkpoints are kept as step_*.abandoned, its export is replaced at the "
                     "end)")
