"""Distributed checkpoints: `torch.distributed.checkpoint` (DCP), atomic, keep-latest-k.

Layout of `DIR/step_00000100/`: the DCP files of the sharded state (model, optimizer,
step counters; FSDP2 shards are written by their owners, no rank gathers the full
model), plus `rank<r>.pt` per rank with what differs between ranks (RNG states, data
position).

Atomicity: everything is written into `step_XXXXXXXX.tmp`, then rank 0 renames it to
`step_XXXXXXXX` (an atomic rename on POSIX) after a barrier. A crash at any moment
leaves either no new folder or a complete one; `latest()` never returns a `.tmp`.
A complete folder is never rewritten: when a run starts, `retire()` renames the
checkpoints at or after its first step (other than the one it resumed from) to
`step_XXXXXXXX.abandoned[N]`, which `latest()` ignores, so a later save never meets one
of another run's and a resume never jumps into an abandoned future.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import warnings
from contextlib import contextmanager

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

_STEP_DIR = re.compile(r"^step_(\d{8})$")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _barrier() -> None:
    if _distributed():
        dist.barrier()


@contextmanager
def _single_process_quiet():
    """DCP warns "torch.distributed is disabled ... assuming the intent is to save in a single
    process" on every call without a process group, even with `no_dist=True` asked for: in the
    middle of the progress bar of a one-process run it reads like a fault, so it is dropped."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is .*single process", category=UserWarning)
        yield


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def step_dirs(root: str) -> list[tuple[int, str]]:
    """Complete checkpoints under `root`, oldest first."""
    if not os.path.isdir(root):
        return []
    out = [(int(m.group(1)), os.path.join(root, n)) for n in os.listdir(root) if (m := _STEP_DIR.match(n))]
    return sorted(out)


def latest(root: str) -> str | None:
    dirs = step_dirs(root)
    return dirs[-1][1] if dirs else None


def retire(root: str, step: int, *, keep: str | None = None) -> list[str]:
    """Rename the complete checkpoints under `root` at step >= `step`, except `keep` (the one
    the run resumed from), to `<name>.abandoned[N]`: they belong to a run this one replaces.
    Collective; returns the new names (rank 0; [] elsewhere)."""
    moved = []
    if _rank() == 0:
        keep_real = os.path.realpath(keep) if keep else None
        for s, path in step_dirs(root):
            if s < step or os.path.realpath(path) == keep_real:
                continue
            target, n = path + ".abandoned", 1
            while os.path.exists(target):
                n += 1
                target = f"{path}.abandoned{n}"
            os.rename(path, target)
            moved.append(target)
    _barrier()
    return moved


def save(root: str, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *,
         trainer_state: dict, rank_state: dict, keep: int) -> str:
    """Write checkpoint `step` atomically; drop all but the latest `keep`. Collective.

    An existing `step` folder is the one this run resumed from (`retire()` moved any other
    aside) and the state has not moved since: it is kept as it is, never rewritten (a crash
    between removing and replacing it would leave nothing loadable)."""
    final = os.path.join(root, f"step_{step:08d}")
    if os.path.isdir(final):
        return final
    tmp = final + ".tmp"
    if _rank() == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a crashed save of the same step
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd,
             "trainer": {k: torch.tensor(v) for k, v in trainer_state.items()}}
    with _single_process_quiet():
        dcp.save(state, checkpoint_id=tmp, no_dist=not _distributed())
    torch.save(rank_state, os.path.join(tmp, f"rank{_rank()}.pt"))
    _barrier()
    if _rank() == 0:
        os.rename(tmp, final)
        for _, old in step_dirs(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *,
         trainer_keys: list[str]) -> tuple[dict, dict]:
    """Load `path` into model and optimizer (in place, any parallel layout); returns
    (trainer_state, this rank's rank_state)."""
    if not os.path.isdir(path) or not _STEP_DIR.match(os.path.basename(path.rstrip("/"))):
        raise FileNotFoundError(f"checkpoint {path!r} is not a complete step_XXXXXXXX folder; pass the "
                                "run's out_dir with --resume or one of its checkpoints/step_* folders")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd, "trainer": {k: torch.tensor(0) for k in trainer_keys}}
    with _single_process_quiet():
        dcp.load(state, checkpoint_id=path, no_dist=not _distributed())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(strict=True))
    rank_file = os.path.join(path, f"rank{_rank()}.pt")
    if not os.path.exists(rank_file):
        raise FileNotFoundError(f"{rank_file} is missing: the checkpoint was written with fewer ranks; resume "
                                "with the same number of processes")
    rank_state = torch.load(rank_file, weights_only=False)
    return {k: int(v) for k, v in state["trainer"].items()}, rank_state
