"""The training loop shared by both stages.

A stage supplies a `Task`: the trainable module, how a loader batch becomes model
inputs (device transfer, masks: done outside the compiled graph), the loss, the FLOPs
of a step, evaluation and export. The trainer owns everything else: parallel wrapping,
the optimizer and schedule, gradient accumulation, clipping, skipping non-finite steps,
metrics, checkpoints and resume.
"""
from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from videoprism.flops import matmul_peak_tflops
from videoprism.paths import echo
from videoprism.train import checkpoint as ckpt
from videoprism.train.config import (Config, ResumeFrom, TrainConfig, check_inputs, config_changes, run_config_path,
                                     save_config)
from videoprism.train.data import check_held_memory, parse_datasets
from videoprism.train.metrics import (VAL_REJECT, MetricsLogger, end_a_cut_line, peak_memory_gb, plot_curves,
                                      recorded_rejects)
from videoprism.train.optim import build_optimizer, lr_at, set_lr
from videoprism.train.parallel import (Dist, all_reduce_max, all_reduce_mean, gather_objects, grad_sync, hsdp_groups,
                                      on_main_rank, parallelize, shard_layout)
from videoprism.preemption import Preempted, PreemptionNotice, stopping
from videoprism.train.run_folder import check_out_dir, export_path, run_folder, same_folder


class Task(Protocol):
    stage: int  # 1 or 2: config.json says which, so that a run resumes only its own stage's (run_folder)
    module: nn.Module  # the trainable module (frozen parts such as a teacher live outside)
    export_spec: dict  # what `export` writes of it (export.export_spec); every checkpoint keeps it
    loss_keys: tuple[str, ...]  # extra scalars returned by `loss`, logged and plotted

    def prepare(self, batch: dict, step: int, micro: int) -> dict: ...
    def loss(self, module: nn.Module, inputs: dict) -> tuple[torch.Tensor, dict]: ...
    def flops(self, inputs: dict) -> float: ...
    def tokens(self, inputs: dict) -> int: ...
    def evaluate(self, module: nn.Module) -> dict: ...
    def export(self, module: nn.Module, path: str) -> None: ...
    # Optional: `after_step()`, run after each step's update, also a skipped one (so it must leave
    # parameters an update did not touch as they are: clamping a parameter);
    # `grad_cache = True` with `cached_backward(module, inputs_list, amp, sync) -> (loss, parts)`,
    # which runs the forward and backward of all micro-batches of a step itself (a loss over
    # the whole accumulated batch, such as the contrastive one).


class NonFiniteLossError(RuntimeError):
    pass


@dataclass(frozen=True)
class GoOn:
    """What a run's stop line (SIGTERM, SIGUSR1) names to go on: `resume` continues from its checkpoint, `restart`
    goes on when it took no step, `note` ends a `resume` clause. The defaults are the stage commands' own flags;
    train.pipeline takes neither (a rerun starts both stages over) and passes its own."""
    resume: str = "the same command with --resume"
    restart: str = "the same command with --auto-resume starts again from train.out_dir's latest checkpoint, if any"
    note: str = ""


@dataclass
class PendingStep:
    """A launched step's record before it is read: its device scalars (loss, loss parts, gradient
    norm, the skip flag) stacked into one tensor and copied to page-locked host memory behind the
    step (`done` marks the copy complete on CUDA), so that reading them waits for this step only."""
    step: int  # the trainer's step count after it (the number the metrics log it under)
    keys: list[str]
    values: torch.Tensor  # on the host (filled when `done` has passed)
    host: dict
    start: torch.cuda.Event | None  # CUDA: recorded before the step's work, and after it
    done: torch.cuda.Event | None
    wall: float  # seconds the host spent queueing the step (on the CPU: running it)
    ended: float  # when the host had queued it (time.perf_counter)


def accumulation(tc: TrainConfig, world: int) -> tuple[int, int]:
    """(clips per rank per forward, micro-steps per optimizer step) of train.global_batch and
    train.micro_batch on `world` ranks."""
    if tc.global_batch % world:
        raise ValueError(f"train.global_batch={tc.global_batch} is not divisible by the {world} ranks; set it to a "
                         f"multiple of {world}")
    per_rank = tc.global_batch // world
    micro = tc.micro_batch or per_rank
    if per_rank % micro:
        raise ValueError(f"train.micro_batch={micro} does not divide the per-rank batch {per_rank} (train.global_batch "
                         f"{tc.global_batch} / {world} ranks); set it to a divisor of {per_rank} (0 = no accumulation)")
    return micro, per_rank // micro


def preflight(cfg: Config, stage: int, resume: ResumeFrom | None, overwrite: bool = False) -> None:
    """What a run can check in a second before it builds the model and decodes data: the input files,
    the output folder (and whether another run's work is there: `overwrite`), the device, the batch split, and the
    checkpoint --resume names."""
    # Which run this is, first: a stage-1 run resumed by stage 2 is that, not a missing stage2.teacher.
    check_out_dir(cfg.train.out_dir, stage, resume=None if resume is None else resume.path, overwrite=overwrite,
                  teacher=cfg.stage2.teacher if stage == 2 else "")
    check_inputs(cfg, stage)
    check_held_memory(cfg)  # before the model is built and data.train (data.cache) or data.val decoded
    world = int(os.environ.get("WORLD_SIZE", "1"))
    micro, accum = accumulation(cfg.train, world)  # the Trainer's split, before data.cache decodes the whole manifest
    if stage == 1:
        _check_contrastive_batch(cfg, micro, accum, world)
    # data.train's entries (paths, weights, frames), before the model is built and data.cache decodes them.
    datasets = parse_datasets(cfg.data.train, cfg.model.num_frames) if cfg.data.source == "manifest" else []
    if stage == 2:
        for path, _, frames in datasets:
            if frames != cfg.model.num_frames:  # else the first step fails, after the teacher and the data are built
                raise ValueError(f"data.train: {path!r} is read as {frames}-frame clips (its FRAMES) and stage 2 "
                                 f"trains clips of model.num_frames={cfg.model.num_frames} (the decoder's position "
                                 "embedding has a slot per token of such a clip); drop its FRAMES (one-frame images "
                                 "are for stage 1)")
    if cfg.parallel.mode == "hsdp" and world > 1:  # one process runs unwrapped (parallelize)
        hsdp_groups(world, cfg.parallel.shard_size)
    if resume is not None and not resume.if_any:
        ckpt.find(resume.path, required=True)


def _check_contrastive_batch(cfg: Config, micro: int, accum: int, world: int) -> None:
    """Stage 1's loss scores each clip against the other clips of its batch (the global batch; with accumulation and
    without stage1.grad_cache, a micro-step's micro_batch x world clips): one clip alone scores a loss of 0 and no
    gradient, and such a run trained nothing, silently (loss 0.0, grad_norm 0.0 at every step)."""
    own = accum > 1 and not cfg.stage1.grad_cache
    if (micro * world if own else cfg.train.global_batch) >= 2:
        return
    if own:
        raise ValueError(f"train.micro_batch={micro} on {world} rank with stage1.grad_cache=false: each micro-step's "
                         "contrastive loss scores one clip alone, always 0 (nothing trains); set stage1.grad_cache="
                         "true or train.micro_batch >= 2")
    raise ValueError(f"train.global_batch={cfg.train.global_batch}: stage 1's contrastive loss scores a clip against "
                     "the other clips of its batch, and one alone always scores 0 (nothing trains); set "
                     "train.global_batch >= 2")


def check_every_rank_sees(path: str, target: str | None, own: str | None, dist_: Dist) -> None:
    """Every rank checks rank 0's pick `target` (under `path`, what --resume named) against its own view (`own`, its
    latest; None: not asked): rank 0 may be the node that lags (it would start at step 0, or load an older step, while
    the others see a newer checkpoint), or another node may not see it. Collective."""
    missing = target is not None and not os.path.isdir(target)
    newer = own is not None and (target is None or ckpt.step_of(own) > ckpt.step_of(target))
    missing, newer = all_reduce_max([int(missing), int(newer)], dist_)
    if missing or newer:
        picked = f"rank 0 resumes from {target}" if target is not None else "rank 0 sees no checkpoint"
        raise FileNotFoundError(f"--resume under {path!r}: {picked} and some ranks "
                                f"{'do not see it' if missing else 'see a newer one'}; train.out_dir must be "
                                "one folder that every node sees alike")


@contextlib.contextmanager
def stopping_before_training(cfg: Config, dist_: Dist, go_on: GoOn = GoOn()):
    """Startup (the teacher, the model, data.cache's decode of a whole manifest, the resume's load): a
    preemption notice ends the run at once with a line (naming `go_on.restart`) and status 128 + the signal;
    nothing of this run is lost, as it has taken no step."""
    try:
        with stopping(cfg.checkpoint.save_on_signal, lambda s: Preempted(s, None, None)):
            yield
    except Preempted as stop:
        if dist_.main:
            print(f"{signal.Signals(stop.signum).name} before the first step: stopped (no step taken, nothing "
                  f"lost); {go_on.restart}", file=sys.stderr, flush=True)
        raise
    except KeyboardInterrupt:  # Ctrl-C: the command's one line (cli.run_command) says this instead of a traceback
        raise KeyboardInterrupt("before the first step (no step taken, nothing lost); the same command starts "
                                "again") from None


class Trainer:
    TRAINER_KEYS = ["step", "nonfinite"]

    def __init__(self, cfg: Config, task: Task, data, dist_: Dist, *, name: str, go_on: GoOn = GoOn()):
        self.cfg, self.task, self.data, self.dist, self.name = cfg, task, data, dist_, name
        self.go_on = go_on
        tc = cfg.train
        self.micro, self.accum = accumulation(tc, dist_.world)
        self.autocast = tc.bf16(dist_.device.type)
        self.model = parallelize(task.module, mode=cfg.parallel.mode, dist_=dist_,
                                 compile=tc.compile_backend if tc.compile else None,
                                 mixed_precision=self.autocast, act_ckpt=tc.activation_checkpointing,
                                 shard_size=cfg.parallel.shard_size)
        self.optimizer = build_optimizer(list(task.module.named_parameters()), cfg.optim)
        self.step = 0
        self.nonfinite = 0
        self.ckpt_dir = os.path.join(tc.out_dir, "checkpoints")
        self.saver = ckpt.Saver(self.ckpt_dir, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)
        self.resumed_from: str | None = None
        self.resumed_step = 0
        # The config.json of the run that wrote the checkpoint resumed from, and how this run's config differs from
        # it (None: unreadable): the load's error names the differences, the run's log all of them.
        self.resumed_config: str | None = None
        self.resume_changes: list[str] | None = None
        self.val_rejects: list[tuple[str, str]] = []  # the validation split's skipped clips, reported as a step's
        self.rejects_unwritten = 0  # skipped samples not in the rejects file (it could not be written)
        self.rejects_path = os.path.join(tc.out_dir, f"rejects.rank{dist_.rank}.jsonl")

    # ---- state -----------------------------------------------------------------------
    def save(self, wait: bool = True) -> str:
        return self.saver.save(self.step, self.model, self.optimizer,
                               trainer_state={"step": self.step, "nonfinite": self.nonfinite},
                               rank_state={"rng": ckpt.rng_state(), "data": self.data.state_dict(),
                                           "export": self.task.export_spec}, wait=wait)

    def resume(self, path: str, *, if_any: bool = False) -> None:
        """`path`: a run's out_dir (its latest checkpoint) or a step_* folder. `if_any` (--auto-resume): start at
        step 0 when there is none yet, as every rank must: they decide together (a shared file system whose nodes
        see different folders would otherwise split the run); and go back past a damaged latest checkpoint
        (`_load_or_earlier`)."""
        # Rank 0 picks the checkpoint and every rank loads that one: ranks that each listed the folder could pick
        # different steps (a node whose view of a shared file system lags) and train on a mix of two checkpoints.
        own = ckpt.find(path, required=False)
        target = on_main_rank(lambda: own if own is not None or if_any else ckpt.find(path, required=True))
        check_every_rank_sees(path, target, own, self.dist)
        if target is None:
            return
        # A damaged checkpoint that --resume names (or finds the latest) stops every rank: its error names the fix.
        written = self._load_or_earlier(path, target) if if_any else self._load_agreed(target, go_back=False)[0]
        if self.dist.main:
            moved = f" (written by {written} ranks, resumed on {self.dist.world})" if written != self.dist.world else ""
            echo(f"resumed from {self.resumed_from} at step {self.step}{moved}")

    def _load_or_earlier(self, path: str, target: str) -> int:
        """--auto-resume (a requeued job, no one watching): `target`, or when its files are lost, cut or garbled
        (DamagedCheckpointError on any rank), the newest earlier checkpoint that loads; the damaged ones renamed out
        of the way (`retire`: the run saves their steps again, keep-latest-k does not count them) and said in one
        line. Another error (another config, other versions, permissions, memory) would stop every earlier
        checkpoint alike, or hide the user's mistake behind lost steps: it stops the run, as under --resume. Returns
        the number of ranks that wrote the one loaded."""
        root, damaged = os.path.dirname(target.rstrip("/")), []
        while True:
            # Every rank goes back when one found it damaged (its own rank file): the ranks that loaded it would go on
            # into training while that one loads an earlier checkpoint, and their collectives would cross.
            written, reasons = self._load_agreed(target, go_back=True)
            if not reasons:
                break
            damaged.append((target, reasons[0]))
            before = on_main_rank(lambda: [p for s, p in ckpt.step_dirs(root) if s < ckpt.step_of(target)])
            if not before:
                raise ckpt.CheckpointReadError(
                    f"--auto-resume: no checkpoint under {root} loads, each is damaged: {self._said(damaged)}; "
                    "restore the files, or start over with --overwrite instead of --auto-resume")
            target = before[-1]
            check_every_rank_sees(path, target, None, self.dist)
        if damaged:
            retired = ckpt.retire(root, self.step + 1)  # the damaged ones: rank 0 listed no other after `target`
            latest = ckpt.step_of(damaged[0][0])
            redo = f"step {latest} is" if latest == self.step + 1 else f"steps {self.step + 1}-{latest} are"
            if self.dist.main:
                which = "checkpoint {} does" if len(damaged) == 1 else "checkpoints {} do"
                echo(f"--auto-resume: the damaged {which.format(self._said(damaged))} not load: going back to "
                     f"{target}, the newest checkpoint that loads ({redo} trained again); renamed out of the way: "
                     f"{', '.join(retired)}", flush=True)
        return written

    def _load_agreed(self, target: str, *, go_back: bool) -> tuple[int, list[str]]:
        """`_load(target)` on every rank, which then agree on its outcome: each rank reads its own rank file alone,
        and one that stopped on its error left the others to go on into training and fail at their next collective
        (gloo's "Connection closed by peer" after a load they had said was done; NCCL waits out its timeout). Returns
        (the number of ranks that wrote it, the reason of each rank that found it damaged) where it is damaged and
        `go_back` (--auto-resume); raises on every rank the first failing rank's error otherwise: one line, the same
        on each. Gathered are the errors of the user's input (ValueError, OSError: a damaged file, another config, a
        permission denied); another (a bug, memory, a failed process group) is raised where it happened."""
        written, own = 0, None
        try:
            written = self._load(target)
        except (ValueError, OSError) as e:
            own = e
        failed = [(rank, e) for rank, e in enumerate(gather_objects(own, self.dist)) if e is not None]
        stop = [(rank, e) for rank, e in failed if not (go_back and isinstance(e, ckpt.DamagedCheckpointError))]
        if stop:
            rank, error = stop[0]
            raise own if rank == self.dist.rank else error  # this rank's own: with its cause, for a traceback
        return written, [e.reason for _, e in failed]

    @staticmethod
    def _said(damaged: list[tuple[str, str]]) -> str:
        """Damaged checkpoints and why, on one line."""
        return "; ".join(f"{path} ({reason})" for path, reason in damaged)

    def _load(self, target: str) -> int:
        """Load the checkpoint `target` into the model, the optimizer, the data and the RNGs; returns the number of
        ranks that wrote it. Collective."""
        self.resumed_config = run_config_path(target)
        try:
            with open(self.resumed_config, encoding="utf-8") as fh:
                self.resume_changes = config_changes(json.load(fh), self.cfg.to_dict())
        except (TypeError, OSError, ValueError, AttributeError):  # no config.json (TypeError: None), or not a config
            self.resume_changes = None
        state, written = ckpt.load(target, self.model, self.optimizer, trainer_keys=self.TRAINER_KEYS,
                                   differences=self._state_changes())
        d = self.dist
        if written == d.world:
            own = ckpt.read_rank_state(target, d.rank)
            self._check_data_state(own["data"], target)
            self.data.load_state_dict(own["data"])
        else:
            # Another number of ranks (a node lost, or added): DCP resharded the model and optimizer; the data
            # position is rebuilt from every old rank's (rank 0 reads their files, every rank gets them), so
            # that the epoch goes on without repeats or gaps.
            if not hasattr(self.data, "load_resharded"):
                raise ValueError(f"checkpoint {target} was written by {written} ranks and this run has {d.world}; "
                                 f"its data source ({type(self.data).__name__}) cannot move to another number of "
                                 f"ranks: resume with {written} processes")
            states = on_main_rank(lambda: [ckpt.read_rank_state(target, r)["data"] for r in range(written)])
            self._check_data_state(states[0], target)
            self.data.load_resharded(states)
            own = ckpt.read_rank_state(target, d.rank) if d.rank < written else None
        if own is not None:  # a rank new to the run keeps the run's seeded generators
            ckpt.restore_rng(target, d.rank, own["rng"])
        self.step, self.nonfinite = state["step"], state["nonfinite"]
        self.resumed_from, self.resumed_step = target, self.step
        return written

    def _check_data_state(self, saved: dict, target: str) -> None:
        """The checkpoint's data position is of this run's kind of source (a manifest's loaders, data.cache's decoded
        clips, random clips): a resume that changed data.source or data.cache failed in its load with a KeyError."""
        if set(saved) == set(self.data.state_dict()):
            return
        changed = [c for c in self.resume_changes or [] if c.startswith(("data.source", "data.cache"))]
        raise ValueError(f"checkpoint {target} holds the data position of another kind of data source than this "
                         f"run's ({'; '.join(changed) or 'data.source or data.cache changed'}): resume with the run's "
                         "data.source and data.cache (its config.json has them)")

    def _state_changes(self) -> list[str] | None:
        """The resume's config changes in the fields that shape the model and optimizer state (the model, the
        stages' heads, the optimizer, the tokenizer's vocabulary); None when the resumed run's config is unknown."""
        if self.resume_changes is None:
            return None
        return [c for c in self.resume_changes if c.split(".")[0] in ("model", "stage1", "stage2", "optim")
                or c.startswith("data.tokenizer")]

    # ---- one optimizer step --------------------------------------------------------------
    def launch_step(self) -> PendingStep:
        """Queue one optimizer step: accumulate `accum` micro-batches, clip, and apply the update
        unless the loss or the gradient is non-finite (then the step is skipped and counted, by
        `read_step`). The skip is decided on the device (the optimizer's `found_inf`, as GradScaler
        passes it), so nothing here waits for the GPU: the host queues the next step while this
        one runs."""
        cfg = self.cfg
        t_launch, start = time.perf_counter(), self._event()
        lr = lr_at(self.step, cfg.optim, cfg.train.steps)
        set_lr(self.optimizer, lr)
        cached = self.accum > 1 and getattr(self.task, "grad_cache", False)
        losses, extras, flops, tokens, data_wait, pending = [], {}, 0.0, 0, 0.0, []
        for a in range(self.accum):
            t0 = time.perf_counter()
            batch = self.data.next_batch(self.step)
            inputs = self.task.prepare(batch, self.step, a)
            data_wait += time.perf_counter() - t0
            flops += self.task.flops(inputs)
            tokens += self.task.tokens(inputs)
            if cached:
                pending.append(inputs)
                continue
            with grad_sync(self.model, a == self.accum - 1):
                with self._amp():
                    loss, parts = self.task.loss(self.model, inputs)
                (loss / self.accum).backward()
            losses.append(loss.detach().float())
            for k, v in parts.items():
                extras[k] = extras.get(k, 0.0) + v.detach().float() / self.accum
        if cached:
            loss, parts = self.task.cached_backward(self.model, pending, amp=self._amp,
                                                    sync=lambda last: grad_sync(self.model, last))
            losses.append(loss.detach().float())
            extras = {k: v.detach().float() for k, v in parts.items()}
        # The step's loss and the loss parts, averaged over the ranks in one collective.
        scalars = all_reduce_mean(torch.stack([v.reshape(()) for v in (torch.stack(losses).mean(), *extras.values())]))
        params = [p for p in self.task.module.parameters() if p.requires_grad]
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf
        gnorm = torch.nn.utils.clip_grad_norm_(params, clip)
        if hasattr(gnorm, "full_tensor"):  # FSDP2: a DTensor
            gnorm = gnorm.full_tensor()
        # Equal on every rank: the loss is averaged and the gradient norm is of the synchronised gradients.
        bad = ~(torch.isfinite(scalars[0]) & torch.isfinite(gnorm))
        self.optimizer.found_inf = bad.float()  # a flagged step leaves parameters and state as they were
        try:
            self.optimizer.step()
        finally:
            del self.optimizer.found_inf
        if hasattr(self.task, "after_step"):
            self.task.after_step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        values = {"loss": scalars[0], **dict(zip(extras, scalars[1:])), "grad_norm": gnorm, "skipped": bad}
        host = {"lr": lr, "_tokens": tokens * self.dist.world, "_data_wait": data_wait}
        # Stage 2 counts its FLOPs from the masks on the device: read back with the rest.
        (values if isinstance(flops, torch.Tensor) else host)["_flops"] = flops * self.dist.world
        stacked = torch.stack([v.reshape(()).double() for v in values.values()])
        if stacked.device.type == "cuda":
            # Not .tolist() later: a copy queued then waits behind every step queued after this one.
            stacked = torch.empty(stacked.shape, dtype=stacked.dtype, pin_memory=True).copy_(stacked, non_blocking=True)
        ended = time.perf_counter()
        return PendingStep(self.step, list(values), stacked, host, start, self._event(), ended - t_launch, ended)

    def _event(self) -> torch.cuda.Event | None:
        """A timing event recorded on the current stream (CUDA), or None (the CPU runs each op as it is called)."""
        if self.dist.device.type != "cuda":
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def read_step(self, pending: PendingStep) -> dict:
        """The record of a launched step, read back (waits for that step, not for later ones); counts
        a skipped step, and stops the run past `train.max_nonfinite` of them."""
        if pending.done is not None:
            pending.done.synchronize()
        rec = {**pending.host, **dict(zip(pending.keys, pending.values.tolist()))}
        rec["skipped"] = bool(rec["skipped"])
        if rec["skipped"]:
            self.nonfinite += 1
            if self.nonfinite > self.cfg.train.max_nonfinite:
                raise NonFiniteLossError(
                    f"{self.nonfinite} steps had a non-finite loss or gradient (limit train.max_nonfinite="
                    f"{self.cfg.train.max_nonfinite}), the last at step {pending.step}; lower optim.lr, check the "
                    "data, or raise the limit")
        rec["nonfinite"] = self.nonfinite
        return rec

    def train_step(self) -> dict:
        """One optimizer step and its record (waits for it)."""
        return self.read_step(self.launch_step())

    def _amp(self):
        return torch.autocast(self.dist.device.type, dtype=torch.bfloat16) if self.autocast else contextlib.nullcontext()

    # ---- the run --------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg, tc, d = self.cfg, self.cfg.train, self.dist
        # MFU's denominator: the matmul ceiling of the dtype the step computes in (train.precision=fp32 on a GPU, or
        # bf16 on the CPU, was measured against the other one's).
        peak = tc.peak_tflops or matmul_peak_tflops(d.device, dtype=torch.bfloat16 if self.autocast else torch.float32)
        if d.device.type == "cuda":  # the peak's 8192^2 operands (384 MB) are not the run's memory
            torch.cuda.reset_peak_memory_stats(d.device)
        # Before this run writes a record: the checkpoints of a run it replaces (a fresh start, or a resume from an
        # earlier step: the abandoned future; a resume of another folder's run: all of them) and, unless it goes on
        # with the folder's own run, that run's records, renamed out of the way.
        elsewhere = self.resumed_from is not None and not same_folder(run_folder(self.resumed_from), tc.out_dir)
        retired = ckpt.retire(self.ckpt_dir, 0 if elsewhere else self.step, keep=self.resumed_from)
        if self.step == 0 or elsewhere:
            retired += ckpt.retire_records(tc.out_dir)
        log = MetricsLogger(tc.out_dir, total_steps=tc.steps, start_step=self.step, enabled=d.main, desc=self.name)
        # From here the finally below closes the bar: an error in the setup (config.json on a full disk) was
        # printed on the bar's line.
        try:
            config_path = self._start(log, retired, peak)
            notice = PreemptionNotice()
            with notice.catching(cfg.checkpoint.save_on_signal):
                self._loop(log, peak, notice)
                path = self.save()  # a notice now is too late to act on, but must not cut this save
            # After the final checkpoint a notice (or one that came in the last step or the save, agreed by the
            # ranks) stops the run at once: the kill that follows would cut the evaluation or the export.
            try:
                with stopping(cfg.checkpoint.save_on_signal, lambda s: Preempted(s, self.step, path)):
                    signum, = all_reduce_max([notice.signum], d)
                    if signum:
                        raise Preempted(signum, self.step, path)
                    results = self._evaluate(log)
                    results["checkpoint"], results["config"] = path, config_path
                    if cfg.checkpoint.export:
                        results["export"] = self._export(path)
                    if d.main:
                        results["plot"] = self._plot(log)
            except Preempted as stop:
                log.message(f"[{self.name}] {signal.Signals(stop.signum).name} after the final checkpoint {path}: "
                            "stopped before the final evaluation, export and plot were done; "
                            f"{self.go_on.resume} does them (it trains nothing){self.go_on.note}")
                raise
        except KeyboardInterrupt:  # Ctrl-C: the command's one line (cli.run_command) says what is kept
            raise self._interrupted() from None
        finally:
            self.saver.drop()  # only after a failure is a write still in flight here
            log.close()
        results["nonfinite"] = self.nonfinite
        # Of the whole run (every start, every rank: the files hold them), not of this process since it started.
        results["skipped_samples"] = len(recorded_rejects(tc.out_dir)) + self.rejects_unwritten
        if results["skipped_samples"]:
            files = glob.glob(os.path.join(tc.out_dir, "rejects.rank*.jsonl"))
            results["rejects"] = files[0] if len(files) == 1 else os.path.join(tc.out_dir, "rejects.rank*.jsonl")
        return results

    def _start(self, log: MetricsLogger, retired: list[str], peak: float) -> str:
        """Before the first step of this start: what was set aside and changed said, config.json (its path
        returned) and the first record written, unfinished saves removed, rejects met so far reported."""
        cfg, tc, d = self.cfg, self.cfg.train, self.dist
        if retired:
            log.message(f"[{self.name}] {len(retired)} file(s) of an earlier run at or after step {self.step} renamed "
                        f"out of the way (kept, never resumed from): {', '.join(retired)}")
        config_path = os.path.join(tc.out_dir, "config.json")   # `--config` takes it back
        if d.main:
            # What this resume changed against the run that wrote the checkpoint (train.steps moves the schedule's
            # end, optim.lr its height): said once, and kept in metrics.jsonl; the run goes on with the new values.
            if cfg.optim.warmup_steps > tc.steps:  # e.g. --config base train.steps=1000: 5% of optim.lr at most
                log.message(f"[{self.name}] warning: optim.warmup_steps={cfg.optim.warmup_steps} > train.steps="
                            f"{tc.steps}: the learning rate stops at {lr_at(tc.steps - 1, cfg.optim, tc.steps):.3g}, "
                            f"below optim.lr={cfg.optim.lr:g}; lower optim.warmup_steps for a short run")
            changes = self.resume_changes or []
            if changes:
                log.message(f"[{self.name}] resumed with a config that differs from the run's {self.resumed_config}: "
                            + "; ".join(changes))
            save_config(cfg, config_path, stage=self.task.stage)
            layout = {"world": d.world, "sharding": shard_layout(self.task.module), "accum": self.accum}
            if self.step == 0:
                log.write({"config": cfg.to_dict(), **layout, "peak_tflops": peak})
            elif self.resumed_from:  # the layout may differ from the first record's (resumed on other ranks)
                log.write({"resumed_from": self.resumed_from, "at_step": self.step, **layout,
                           **({"config_changes": changes} if changes else {})})
        unfinished = ckpt.clear_unfinished(self.ckpt_dir)
        if unfinished:
            log.message(f"[{self.name}] {len(unfinished)} folder(s) of checkpoint saves that did not finish removed: "
                        + ", ".join(unfinished))
        self.task.module.train()
        self._report_rejects(log)  # those met before the first step (the validation split's, a manifest's lines)
        return config_path

    def _interrupted(self) -> KeyboardInterrupt:
        """Ctrl-C during the run: its latest complete checkpoint (a save cut short is not one) and how to go on."""
        kept = ckpt.latest(self.ckpt_dir)
        return KeyboardInterrupt(f"[{self.name}] at step {self.step}; " + (
            f"the latest checkpoint is {kept}: the same command with --auto-resume goes on from it" if kept else
            "no checkpoint yet: the same command starts again"))

    def _export(self, checkpoint: str) -> str:
        """The trained model as OUT_DIR/model.safetensors. Its failure (a full disk) comes after the final
        `checkpoint`, which holds the model: the message says so and how to write the export again (a resume of a
        finished run trains nothing and exports)."""
        export = export_path(self.cfg.train.out_dir)
        try:
            self.task.export(self.model, export)
        except OSError as e:
            raise OSError(f"{e}; the trained model is in {checkpoint}: then the same command with --resume "
                          "writes the export") from e
        return export

    def _plot(self, log: MetricsLogger) -> str | None:
        """The curves PNG. Its failure (a full disk, a broken matplotlib) is said, not raised: it comes after the
        final checkpoint, evaluation and export, and must not turn a finished run into a failed one."""
        png = os.path.join(self.cfg.train.out_dir, "curves.png")
        try:
            return plot_curves(log.path, png, keys=("loss", *self.task.loss_keys))
        except Exception as e:  # noqa: BLE001 - any failure of a plot leaves the run's results standing
            log.message(f"[{self.name}] could not plot {png} ({type(e).__name__}: {e}); the metrics are in "
                        f"{log.path}")
            return None

    def _loop(self, log: MetricsLogger, peak: float, notice: PreemptionNotice) -> None:
        """Steps up to train.steps, with the interval checkpoints and evaluations; on a
        preemption notice, a checkpoint at the step boundary (then the evaluation due there) and `Preempted`.

        Pipelined: the host queues step n+1 before it reads step n's record (which waits for step
        n only: launch_step copies it to the host behind the step), so the GPU does not idle
        between steps while the host logs, loads the next batch and agrees with the other ranks. A
        boundary that acts on the model (checkpoint, evaluation, the last step, a notice) reads its
        step first."""
        cfg, tc, d = self.cfg, self.cfg.train, self.dist
        unread, previous = None, None  # the last step queued, and the one before it when no boundary came between
        while self.step < tc.steps:
            launched = self.launch_step()
            if unread is not None:
                self._log_step(log, peak, unread, previous)
                previous = unread
            unread = launched
            self._report_rejects(log)
            if self.step == tc.steps:
                self._log_step(log, peak, unread, previous)
                return  # the final checkpoint follows at once
            # One collective a step, on the host: a notice on any rank, a background write on any rank.
            signum, writing = all_reduce_max([notice.signum, int(self.saver.writing)], d)
            if not writing:
                self.saver.finish()
            save = cfg.checkpoint.interval and self.step % cfg.checkpoint.interval == 0
            evaluate = tc.eval_every and self.step % tc.eval_every == 0
            if not (signum or save or evaluate):
                continue
            self._log_step(log, peak, unread, previous)  # first: the checkpoint holds its non-finite count
            unread = previous = None
            if signum:
                path = self.save()
                log.message(f"[{self.name}] {signal.Signals(signum).name}: stopped after step {self.step}; checkpoint "
                            f"{path}; {self.go_on.resume} continues from it{self.go_on.note}")
                if evaluate:  # the resume continues after this step and would never evaluate it; after the
                    self._evaluate(log)  # checkpoint, which a kill during the evaluation leaves complete
                raise Preempted(signum, self.step, path)
            if save:
                self.save(wait=False)
            if evaluate:
                self._evaluate(log)

    @staticmethod
    def step_seconds(pending: PendingStep, previous: PendingStep | None) -> float:
        """A step's share of the run's time: from the end of the step before it (queued back to back, so
        what the host did in between counts, and on a GPU a gap it left the GPU idle) or, after a
        boundary (checkpoint, evaluation), from its own start; to its end. On a GPU the ends are the
        device's (events that have passed: call after read_step); the CPU runs a step as it queues it."""
        if pending.done is None:
            return pending.ended - previous.ended if previous is not None else pending.wall
        return (previous.done if previous is not None else pending.start).elapsed_time(pending.done) / 1e3

    def _log_step(self, log: MetricsLogger, peak: float, pending: PendingStep, previous: PendingStep | None) -> None:
        """Read a launched step's record and log it with its throughput. `data_wait` is the host's time in
        next_batch + prepare over the step's time: on a GPU the host queues a step while the previous one
        runs, so loading that overlaps the GPU's work shows here too; the GPU starved for data only where
        the step time grows with it."""
        tc, d = self.cfg.train, self.dist
        rec = self.read_step(pending)
        dt = self.step_seconds(pending, previous)
        flops, tokens, wait = rec.pop("_flops"), rec.pop("_tokens"), rec.pop("_data_wait")
        rec.update(step_time=dt, clips_per_s=tc.global_batch / dt, tokens_per_s=tokens / dt,
                   mfu=flops / dt / (d.world * peak * 1e12), data_wait=wait / dt, peak_mem_gb=peak_memory_gb(d.device))
        log.step(pending.step, rec, show=pending.step % tc.log_every == 0 or pending.step == tc.steps)

    def _report_rejects(self, log: MetricsLogger) -> None:
        """Each sample or manifest line the data layer skipped since the last step: one line on the console
        (every rank: each reads its own shard) and one JSON line in `rejects.rank<r>.jsonl`."""
        drain = getattr(self.data, "drain_rejects", None)
        rejects = [(name + VAL_REJECT, why) for name, why in self.val_rejects] + (drain() if drain else [])
        self.val_rejects = []
        if not rejects:
            return
        say = log.message if self.dist.main else lambda text: echo(f"[rank {self.dist.rank}] {text}", file=sys.stderr)
        for name, reason in rejects:
            say(f"[{self.name}] step {self.step}: skipped {name}: {reason}")
        at_start = self.step == self.resumed_step
        if self.resumed_from is not None and (at_start or any(n.endswith(VAL_REJECT) for n, _ in rejects)):
            # A resume reads the validation split and the manifests again, and meets their bad ones again: on file
            # already (on any rank's file: the run may have had other ranks), they are said, not recorded twice.
            # After its start, only the validation split's (streamed, data.val_cache=false: met at its first
            # evaluation): a training sample skipped again in a later epoch is another skip.
            known = {(r["path"], r["reason"]) for r in recorded_rejects(self.cfg.train.out_dir)}
            rejects = [r for r in rejects if r not in known or not (at_start or r[0].endswith(VAL_REJECT))]
            if not rejects:
                return
        # A sample skipped twice within one step (an epoch that ends inside the step skips a bad file at its tail, and
        # the next epoch at its head) is two skips: the k-th repeat of a (path, reason) in the step's report carries
        # "n": k, so that recorded_rejects, which counts a (step, path, reason) once (a resume replays its steps),
        # does not merge them (a long run of 6000 steps here undercounted 3 of its 2641 skips).
        seen: dict[tuple[str, str], int] = {}
        lines = []
        for name, reason in rejects:
            n = seen[name, reason] = seen.get((name, reason), -1) + 1
            lines.append(json.dumps({"step": self.step, "path": name, "reason": reason, **({"n": n} if n else {})}))
        try:
            end_a_cut_line(self.rejects_path)  # a kill mid-append: the cut record is lost, not this report too
            with open(self.rejects_path, "a") as f:
                f.write("".join(line + "\n" for line in lines))
        except OSError as e:  # a full disk: said once, not raised (a run must not die of one bad sample's report)
            if not self.rejects_unwritten:
                say(f"[{self.name}] cannot write {self.rejects_path} ({e.strerror or e}): skipped samples are said "
                    f"on the console only until it can; free space or fix the permissions under "
                    f"{os.path.dirname(self.rejects_path)}")
            self.rejects_unwritten += len(rejects)

    def _evaluate(self, log: MetricsLogger) -> dict:
        self.task.module.eval()
        with torch.no_grad(), self._amp():  # as the training step: in fp32 the GPU kernels take their slow path
            metrics = self.task.evaluate(self.model)
        self.task.module.train()
        drain = getattr(getattr(self.task, "val", None), "drain_rejects", None)
        if drain is not None:  # data.val_cache=false: the clips its first evaluation's decode skipped
            self.val_rejects += drain()
            self._report_rejects(log)
        if metrics:
            log.write({"step": self.step, "eval": metrics})
            log.message(f"[{self.name}] step {self.step}: " + ", ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))
        return metrics
