"""Stage-1 training loop in process: non-finite steps, compiled step without graph breaks,
bad samples skipped, export loads into `from_official`. (Runs under torchrun and SIGKILL +
--resume: test_train_distributed.py.)"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import shutil
import signal
import sys
import time

import pytest
import torch

import videoprism
from videoprism.train.config import build_config
from videoprism.train.data import RandomClips
from videoprism.train.metrics import read_jsonl
from videoprism.train.modeling import build_clip
from videoprism.train.parallel import Dist
from videoprism.preemption import Preempted
from videoprism.train.stage1 import Stage1Task
from videoprism.train.trainer import NonFiniteLossError, Trainer

from .test_train_distributed import losses as run_losses

# A model small enough for a few CPU steps per second: 4 frames of 16x16, 4x4 patches.
TINY = ["model.model_dim=16", "model.num_heads=2", "model.mlp_dim=32", "model.num_spatial_layers=1",
        "model.num_temporal_layers=1", "model.num_unimodal_layers=1", "model.patch_size=4",
        "model.num_frames=4", "model.resolution=16", "data.source=random", "train.global_batch=4",
        "optim.warmup_steps=0", "optim.lr=3e-3", "checkpoint.export=false", "train.log_every=1"]


# The random clips of every test here: one micro-batch of 4 clips of TINY's size.
CLIPS = dict(micro_batch=4, rank=0, world=1, frames=4, resolution=16, vocab=50, seed=0)


def make_trainer(tmp_path, *overrides, data=None, vocab=50):
    cfg = build_config("tiny", [*TINY, f"train.out_dir={tmp_path}", *overrides], 1)
    d = Dist(0, 1, torch.device("cpu"))
    torch.manual_seed(0)
    clip = build_clip(cfg.model, vocab=vocab, device=d.device)
    data = data or RandomClips(**CLIPS)
    return Trainer(cfg, Stage1Task(cfg, d, clip, None), data, d, name="test")


class NaNOnce(RandomClips):
    """Random clips as float video; the batch of step `bad_step` holds a NaN."""

    def __init__(self, bad_steps):
        super().__init__(**CLIPS)
        self.bad_steps = bad_steps

    def next_batch(self, step):
        batch = super().next_batch(step)
        batch["video"] = batch["video"].float() / 255
        if step in self.bad_steps:
            batch["video"][0] = float("nan")
        return batch


@pytest.mark.parametrize("optim", ["adamw", "adafactor"])  # both skip on the device (found_inf)
def test_nonfinite_loss_is_skipped_and_counted(tmp_path, optim):
    trainer = make_trainer(tmp_path, "train.compile=false", f"optim.name={optim}", data=NaNOnce({1}))
    trainer.train_step()
    before = {k: v.clone() for k, v in trainer.task.module.state_dict().items()}
    opt_before = {k: v.clone() for k, v in trainer.optimizer.state_dict()["state"][0].items()}
    rec = trainer.train_step()
    assert rec["skipped"] and trainer.nonfinite == 1 and trainer.step == 2
    for k, v in trainer.task.module.state_dict().items():
        assert torch.equal(v, before[k]), k  # no update from the bad step
    for k, v in trainer.optimizer.state_dict()["state"][0].items():
        assert torch.equal(v, opt_before[k]), k
    rec = trainer.train_step()
    assert not rec["skipped"] and trainer.nonfinite == 1

    trainer = make_trainer(tmp_path, "train.compile=false", f"optim.name={optim}", "train.max_nonfinite=1",
                           data=NaNOnce({0, 1}))
    trainer.train_step()
    with pytest.raises(NonFiniteLossError, match="train.max_nonfinite=1"):
        trainer.train_step()


@pytest.mark.parametrize("what", ["loss", "gradient"])
def test_a_step_with_only_its_loss_or_only_its_gradient_non_finite_is_skipped(tmp_path, monkeypatch, what):
    """Either one alone skips the step (the NaN batch above makes both non-finite): a NaN added to the loss as a
    constant leaves the gradient finite; a gradient norm of inf (clip_grad_norm_'s answer to an inf gradient)
    comes with a finite loss. The skipped step changes no parameter and counts once."""
    trainer = make_trainer(tmp_path, "train.compile=false")
    trainer.train_step()
    loss_fn, clip_fn = trainer.task.loss, torch.nn.utils.clip_grad_norm_

    def nan_loss(*args):
        loss, parts = loss_fn(*args)
        return loss + float("nan"), parts

    if what == "loss":
        monkeypatch.setattr(trainer.task, "loss", nan_loss)
    else:
        monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: clip_fn(*a, **k) * float("inf"))
    before = {k: v.clone() for k, v in trainer.task.module.state_dict().items()}
    rec = trainer.train_step()
    assert rec["skipped"] and trainer.nonfinite == 1
    assert math.isfinite(rec["grad_norm"]) if what == "loss" else math.isfinite(rec["loss"])
    for k, v in trainer.task.module.state_dict().items():
        assert torch.equal(v, before[k]), k
    monkeypatch.undo()
    assert not trainer.train_step()["skipped"]


def _strict_json(text: str):
    """JSON as the standard has it (JavaScript's JSON.parse, serde_json): NaN and Infinity are refused."""
    def refuse(name):
        raise ValueError(f"{name} is no JSON")
    return json.loads(text, parse_constant=refuse)


def test_a_skipped_steps_record_is_standard_json_and_plots(tmp_path):
    """A skipped step's loss and gradient norm are NaN: metrics.jsonl held `"loss": NaN, "grad_norm": NaN`, which
    JSON has not (JSON.parse, serde_json and Go refuse the line). They are null, the step marked skipped, and the
    curves are drawn over the gap."""
    from videoprism.train.metrics import plot_curves

    make_trainer(tmp_path, "train.compile=false", "train.steps=3", "checkpoint.interval=0",
                 data=NaNOnce({1})).fit()
    records = [_strict_json(line) for line in open(tmp_path / "metrics.jsonl")]
    steps = {r["step"]: r for r in records if "loss" in r}
    assert sorted(steps) == [1, 2, 3] and steps[2]["skipped"] and steps[2]["loss"] is None
    assert steps[2]["grad_norm"] is None and all(math.isfinite(steps[s]["loss"]) for s in (1, 3))
    assert os.path.getsize(plot_curves(str(tmp_path / "metrics.jsonl"), str(tmp_path / "c.png"))) > 1000


def test_each_step_runs_at_the_schedules_lr_of_its_index(tmp_path):
    """Step i (0-based) updates with lr_at(i): the warm-up's first step at lr / warmup_steps, by hand here
    (warm-up 4, lr 3e-3: 0.75e-3, 1.5e-3, 2.25e-3, 3e-3), then the cosine decay to min_lr at train.steps."""
    trainer = make_trainer(tmp_path, "train.compile=false", "optim.warmup_steps=4", "optim.decay=cosine",
                           "optim.min_lr=0", "train.steps=6")
    seen, step = [], trainer.optimizer.step

    def recording_step(*args, **kwargs):
        seen.append([g["lr"] for g in trainer.optimizer.param_groups])
        return step(*args, **kwargs)

    trainer.optimizer.step = recording_step
    logged = [trainer.train_step()["lr"] for _ in range(6)]
    want = [0.75e-3, 1.5e-3, 2.25e-3, 3e-3, 3e-3, 3e-3 * 0.5 * (1 + math.cos(math.pi / 2))]
    assert logged == pytest.approx(want) and [g[0] for g in seen] == pytest.approx(want)
    assert all(len(set(g)) == 1 for g in seen)  # every parameter group


def test_the_optimizer_gets_gradients_clipped_to_optim_grad_clip(tmp_path):
    """optim.grad_clip clips the global gradient norm: the optimizer steps with gradients of norm
    min(norm, clip) (the logged grad_norm is the norm before clipping); 0 turns clipping off."""
    seen = []
    for clip in (1e-3, 0.0):
        trainer = make_trainer(tmp_path / str(clip), "train.compile=false", "train.steps=1", f"optim.grad_clip={clip}",
                               "checkpoint.interval=0")
        params = [p for p in trainer.task.module.parameters() if p.requires_grad]
        step = trainer.optimizer.step

        def recording_step(*args, _step=step, _params=params, **kwargs):
            grads = [p.grad.norm() for p in _params if p.grad is not None]
            seen.append(float(torch.linalg.vector_norm(torch.stack(grads))))
            return _step(*args, **kwargs)

        trainer.optimizer.step = recording_step
        trainer.fit()
        logged = [r["grad_norm"] for r in read_jsonl(str(tmp_path / str(clip) / "metrics.jsonl")) if "grad_norm" in r]
        assert len(logged) == 1 and logged[0] > 1e-2              # clipping 1e-3 has work to do
        for norm, raw in zip(seen[-1:], logged):
            assert norm == pytest.approx(min(raw, clip) if clip else raw, rel=1e-4)


def test_a_plot_that_fails_leaves_the_finished_run_and_a_cut_record_its_line(tmp_path, monkeypatch, capsys):
    """The curves come last: a plot that raised (a full disk, matplotlib) failed the finished run after its
    checkpoint and export. And a metrics.jsonl cut in the middle of a record (a kill, a full disk) glued the
    resume's first record to it and broke the plot and every reader of the log."""
    from videoprism.train import trainer as trainer_mod

    make_trainer(tmp_path, "train.compile=false", "train.steps=1", "train.eval_every=0").fit()
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 1, "lo')  # cut
    trainer = make_trainer(tmp_path, "train.compile=false", "train.steps=2", "train.eval_every=0",
                           "checkpoint.export=true")
    trainer.resume(str(tmp_path))

    def broken_plot(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(trainer_mod, "plot_curves", broken_plot)
    results = trainer.fit()
    assert results["plot"] is None and os.path.isfile(results["export"]) and os.path.isdir(results["checkpoint"])
    assert f"could not plot {tmp_path / 'curves.png'} (OSError" in capsys.readouterr().out
    records = read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))
    assert [r["step"] for r in records if "loss" in r] == [1, 2] and "resumed_from" in records[-2]
    monkeypatch.undo()
    assert os.path.getsize(trainer_mod.plot_curves(os.path.join(tmp_path, "metrics.jsonl"),
                                                   str(tmp_path / "c.png"))) > 1000


class _FullDisk:
    """A file opened to append whose writes fail half-way, as on a full disk: half the text lands, then ENOSPC."""

    def __init__(self, path):
        import builtins

        self.fh = builtins.open(path, "a")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.fh.close()

    def write(self, text):
        import errno

        self.fh.write(text[:len(text) // 2])
        self.fh.flush()
        raise OSError(errno.ENOSPC, "No space left on device")


def test_metrics_that_cannot_be_written_are_said_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    """metrics.jsonl records are what the run observed, its checkpoints what it keeps: a full disk (or a failing
    one) when a record was appended ended a run of hours with "[Errno 28] No space left on device", naming no
    file, and dropped the checkpoint being written in the background. Now the first failed record is said with
    the file and the fix, the run goes on, and when writing works again the count of records lost is said and
    the records go on whole (the cut one ended, not glued to the next)."""
    import builtins

    from videoprism.train import checkpoint as ckpt
    from videoprism.train import metrics as metrics_mod

    appends = []

    def fake_open(path, mode="r", *a, **k):
        if mode == "a" and str(path).endswith("metrics.jsonl"):
            appends.append(path)
            if len(appends) in (3, 4):  # the records of steps 2 and 3 (the first is the config's)
                return _FullDisk(path)
        return builtins.open(path, mode, *a, **k)

    monkeypatch.setattr(metrics_mod, "open", fake_open, raising=False)
    trainer = make_trainer(tmp_path, "train.compile=false", "train.steps=5", "checkpoint.interval=2",
                           "checkpoint.keep=5", "checkpoint.async_save=true")
    results = trainer.fit()
    out = capsys.readouterr().out
    assert out.count("cannot write") == 1 and "metrics.jsonl (No space left on device)" in out
    assert "2 records lost" in out
    assert results["checkpoint"] == ckpt.latest(str(tmp_path / "checkpoints"))
    assert [s for s, _ in ckpt.step_dirs(str(tmp_path / "checkpoints"))] == [2, 4, 5]
    records = read_jsonl(str(tmp_path / "metrics.jsonl"))
    assert [r["step"] for r in records if "loss" in r] == [1, 4, 5]


class RejectAt(RandomClips):
    """Random clips; after the batch of step `at` the data layer reports one skipped sample."""

    def __init__(self, at: int, name: str = "clip_7.mp4"):
        super().__init__(**CLIPS)
        self.at, self.name, self.rejects = at, name, []

    def next_batch(self, step):
        if step == self.at:
            self.rejects.append((self.name, "moov atom not found"))
        return super().next_batch(step)

    def drain_rejects(self):
        out, self.rejects = self.rejects, []
        return out


def test_a_bad_sample_whose_report_cannot_be_written_does_not_end_the_run(tmp_path, monkeypatch, capsys):
    """A bad sample is skipped and listed in rejects.rank<r>.jsonl: that file failing to take the line (a full
    disk) ended the run with "[Errno 28] No space left on device", a long run dying of one bad sample. The
    sample is said on the console, the failure once with the file and the fix, and the run goes on."""
    import builtins

    from videoprism.train import trainer as trainer_mod

    def fake_open(path, mode="r", *a, **k):
        if str(path).endswith("rejects.rank0.jsonl"):
            return builtins.open("/dev/full", "w")
        return builtins.open(path, mode, *a, **k)

    monkeypatch.setattr(trainer_mod, "open", fake_open, raising=False)
    results = make_trainer(tmp_path, "train.compile=false", "train.steps=3", data=RejectAt(1)).fit()
    out = capsys.readouterr().out
    assert results["skipped_samples"] == 1 and os.path.isdir(results["checkpoint"])
    assert "skipped clip_7.mp4: moov atom not found" in out
    assert f"cannot write {tmp_path / 'rejects.rank0.jsonl'} (No space left on device)" in out


def test_a_skipped_samples_name_is_said_escaped(tmp_path, capsys):
    """A shard member named "x\\nerror: forged\\x1b[31m.webm" was said raw in the run's skip note: a forged
    `error: forged` line, in red. Its control characters are escaped, the note one line; the report keeps the name."""
    name = "x\nerror: forged\x1b[31m.webm"
    make_trainer(tmp_path, "train.compile=false", "train.steps=2", data=RejectAt(1, name)).fit()
    out = capsys.readouterr().out
    assert "skipped x\\nerror: forged\\x1b[31m.webm: moov atom not found" in out, out
    assert "\x1b" not in out and not any(line.startswith("error") for line in out.splitlines())
    assert [r["path"] for r in read_jsonl(str(tmp_path / "rejects.rank0.jsonl"))] == [name]


def test_an_export_that_cannot_be_written_is_one_line_and_resume_writes_it_again(tmp_path, monkeypatch, capsys):
    """The export follows the final checkpoint: a full disk there ended a finished run with a SafetensorError
    traceback (not an OSError: run_command took it for a bug). It is one line naming the file, the checkpoint
    that holds the trained model and the fix; the same command with --resume writes the export."""
    import safetensors.torch
    from safetensors import SafetensorError

    from videoprism.cli import run_command

    def full(*a, **k):  # what safetensors raises on ENOSPC
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    args = ("train.compile=false", "train.steps=2", "checkpoint.export=true")
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    assert run_command(make_trainer(tmp_path, *args).fit) == 2
    err = capsys.readouterr().err.strip()
    final = tmp_path / "checkpoints" / "step_00000002"
    assert "\n" not in err and err.startswith(f"error: writing {tmp_path / 'model.safetensors'} failed (")
    assert "No space left on device" in err and f"the trained model is in {final}" in err and "--resume" in err
    assert not [n for n in os.listdir(tmp_path) if "safetensors" in n]
    monkeypatch.undo()
    trainer = make_trainer(tmp_path, *args)
    trainer.resume(str(tmp_path))
    results = trainer.fit()
    assert results["export"] == str(tmp_path / "model.safetensors")
    videoprism.model_from_safetensors(results["export"])


def test_a_setup_error_ends_the_progress_bar_before_the_command_prints_it(tmp_path, monkeypatch):
    """config.json on a full disk fails after the bar is drawn: the bar is closed (its line ended) before the
    command's one-line error, which a terminal showed glued to the bar's line."""
    from videoprism.cli import run_command
    from videoprism.train import trainer as trainer_module

    def full(*a, **k):
        raise OSError("writing the run's config failed (No space left on device)")

    monkeypatch.setattr(trainer_module, "save_config", full)
    trainer = make_trainer(tmp_path, "train.compile=false", "train.steps=2")
    terminal = io.StringIO()  # stdout (the bar's) and stderr in one stream, as a terminal shows them
    monkeypatch.setattr(sys, "stdout", terminal)
    monkeypatch.setattr(sys, "stderr", terminal)
    assert run_command(trainer.fit) == 2
    shown = terminal.getvalue()
    assert "0/2" in shown and shown.endswith("\nerror: writing the run's config failed (No space left on device)\n")


def test_the_loop_reads_each_step_after_queueing_the_next(tmp_path):
    """The host queues step n+1 before it reads step n's record (the GPU never waits for the logging);
    a checkpoint or an evaluation reads its step first, and the last step is read before the final save."""
    trainer = make_trainer(tmp_path, "train.compile=false", "train.steps=6", "checkpoint.interval=3",
                           "train.eval_every=0")
    calls = []
    launch, read, save = trainer.launch_step, trainer.read_step, trainer.save

    def launch_step():
        calls.append(f"launch {trainer.step + 1}")
        return launch()

    def read_step(pending):
        calls.append(f"read {pending.step}")
        return read(pending)

    def save_(*a, **k):
        calls.append(f"save {trainer.step}")
        return save(*a, **k)

    trainer.launch_step, trainer.read_step, trainer.save = launch_step, read_step, save_
    trainer.fit()
    assert calls == ["launch 1", "launch 2", "read 1", "launch 3", "read 2", "read 3", "save 3",
                     "launch 4", "launch 5", "read 4", "launch 6", "read 5", "read 6", "save 6"]
    records = [r for r in read_jsonl(os.path.join(tmp_path, "metrics.jsonl")) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(r["loss"]) for r in records)
    # A step read right after the one before it (at a checkpoint, the last step) is still timed as a step,
    # not as the moment between two reads.
    times = sorted(r["step_time"] for r in records)
    assert times[0] > 0.1 * times[len(times) // 2], times


def test_temperature_is_clamped_after_the_update_and_can_come_back(tmp_path):
    """CLIP's clamp of 1/temperature: the update may cross the limit, the parameter is then
    clamped to it, and its gradient stays live there, so a loss that wants a higher
    temperature moves it back down (a clamp inside the forward would pin it at the limit)."""
    trainer = make_trainer(tmp_path, "train.compile=false", "stage1.max_logit_scale=20", "optim.name=adamw",
                           "optim.lr=0.5")
    scale = trainer.task.module.logit_scale
    limit = math.log(20)
    with torch.no_grad():
        scale.fill_(limit + 0.3)  # as if the last update had crossed the limit
    trainer.task.after_step()
    assert scale.item() == pytest.approx(limit)
    inputs = trainer.task.prepare(trainer.data.next_batch(0), 0, 0)
    loss, _ = trainer.task.loss(trainer.model, inputs)
    loss.backward()
    assert scale.grad is not None and scale.grad.abs().item() > 0
    trainer.optimizer.zero_grad()
    for _ in range(3):
        trainer.train_step()
        assert scale.item() <= limit + 1e-6


def test_checkpoints_of_a_replaced_run_are_retired_not_resumed(tmp_path):
    """Resuming from an older checkpoint (or starting afresh in a used out_dir) renames the
    checkpoints at or after the start step aside, so `--resume out_dir` after a crash never
    lands in the abandoned run; a finished run resumed again leaves its checkpoint untouched."""
    from videoprism.train import checkpoint as ckpt

    args = ("train.compile=false", "checkpoint.interval=1", "checkpoint.keep=5")
    make_trainer(tmp_path, *args, "train.steps=3").fit()
    root = str(tmp_path / "checkpoints")
    steps = lambda: [s for s, _ in ckpt.step_dirs(root)]  # noqa: E731
    assert steps() == [1, 2, 3]
    trainer = make_trainer(tmp_path, *args, "train.steps=2")
    trainer.resume(os.path.join(root, "step_00000001"))
    trainer.fit()
    assert steps() == [1, 2]
    assert sorted(n for n in os.listdir(root) if "abandoned" in n) == ["step_00000002.abandoned",
                                                                      "step_00000003.abandoned"]
    assert ckpt.latest(root) == os.path.join(root, "step_00000002")
    stamp = os.stat(os.path.join(root, "step_00000002", "rank0.pt")).st_mtime_ns
    trainer = make_trainer(tmp_path, *args, "train.steps=2")
    trainer.resume(str(tmp_path))
    trainer.fit()  # nothing left to train: the checkpoint it came from stays as it is
    assert steps() == [1, 2] and os.stat(os.path.join(root, "step_00000002", "rank0.pt")).st_mtime_ns == stamp
    make_trainer(tmp_path, *args, "train.steps=1").fit()  # a fresh run in the same out_dir
    assert steps() == [1]
    assert {"step_00000001.abandoned", "step_00000002.abandoned2"} <= set(os.listdir(root))
    # Its records too: this run's metrics.jsonl (and curves) hold its own steps only, the replaced run's are kept.
    from videoprism.train.metrics import read_jsonl

    assert [r["step"] for r in read_jsonl(str(tmp_path / "metrics.jsonl")) if "loss" in r] == [1]
    assert [r["step"] for r in read_jsonl(str(tmp_path / "metrics.jsonl.abandoned")) if "loss" in r] == [1, 2, 3, 2]


def test_a_resume_of_another_folders_run_replaces_the_folders_own_whole(tmp_path):
    """--resume A's step 4 into B (--overwrite): B's own checkpoints (earlier ones too, which a later --resume of
    B would have mixed in) and records are set aside, so B's folder holds A's run going on."""
    from videoprism.train import checkpoint as ckpt
    from videoprism.train.metrics import read_jsonl, run_steps

    args = ("train.compile=false", "checkpoint.interval=2", "checkpoint.keep=5", "train.eval_every=0")
    for name in ("a", "b"):
        make_trainer(tmp_path / name, *args, "train.steps=4").fit()
    trainer = make_trainer(tmp_path / "b", *args, "train.steps=6")
    trainer.resume(str(tmp_path / "a" / "checkpoints" / "step_00000004"))
    trainer.fit()
    root = tmp_path / "b" / "checkpoints"
    assert [s for s, _ in ckpt.step_dirs(str(root))] == [6]
    assert {"step_00000002.abandoned", "step_00000004.abandoned"} <= set(os.listdir(root))
    assert sorted(run_steps(read_jsonl(str(tmp_path / "b" / "metrics.jsonl")))) == [5, 6]
    assert (tmp_path / "b" / "metrics.jsonl.abandoned").is_file()


def test_a_second_live_run_on_one_out_dir_stops_and_the_next_after_a_kill_resumes(tmp_path):
    """Two real runs on one train.out_dir, the second (--auto-resume, a requeued job) started while the first runs:
    it ran to its end beside the first (both exit 0, 35 of 150 steps logged twice in one metrics.jsonl, each one's
    checkpoints renamed .abandoned by the other); two fresh runs started together failed a save with "No such file
    or directory" (one removed the other's step_N.tmp). Now it stops with the holder's line and writes nothing; once
    the holder is killed (SIGKILL), the same command goes on from its latest checkpoint."""
    import subprocess

    from videoprism.train import checkpoint as ckpt

    from .test_train_distributed import ROOT, command

    out = str(tmp_path)
    args = ["train.steps=100000", "checkpoint.interval=5", "checkpoint.keep=2", "checkpoint.export=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VIDEOPRISM_TRACEBACK": ""}
    first = subprocess.Popen(command(1, out, args), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env=env)
    try:
        deadline = time.time() + 300
        while not (tmp_path / "checkpoints" / "step_00000005").is_dir() and first.poll() is None:
            assert time.time() < deadline
            time.sleep(0.05)
        second = subprocess.run(command(1, out, [*args, "--auto-resume"]), cwd=ROOT, capture_output=True, text=True,
                                timeout=300, env=env)
        assert first.poll() is None, "the first run ended before the second one tried its folder"
    finally:
        first.kill()
        first.wait()
    line = second.stderr.strip().splitlines()[-1]
    assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
    assert line.startswith(f"error: train.out_dir={out} is written by another run that is still running (pid "
                           f"{first.pid} on host ") and line.endswith(
        "wait for it to end or stop it, or set train.out_dir to another folder (--overwrite replaces a finished run's "
        "folder, never a live one's)"), line
    records = read_jsonl(os.path.join(out, "metrics.jsonl"))
    assert not [r for r in records if "resumed_from" in r]
    steps = [r["step"] for r in records if "loss" in r]
    assert len(steps) == len(set(steps))
    assert not [n for n in os.listdir(os.path.join(out, "checkpoints")) if "abandoned" in n]
    latest = ckpt.step_of(ckpt.latest(os.path.join(out, "checkpoints")))
    after = subprocess.run(command(1, out, [*args[1:], f"train.steps={latest + 1}", "--auto-resume"]), cwd=ROOT,
                           capture_output=True, text=True, timeout=300, env=env)
    assert after.returncode == 0, after.stderr[-2000:]
    assert f"resumed from {out}/checkpoints/step_{latest:08d} at step {latest}" in after.stdout


def test_a_run_removes_the_folders_of_saves_that_did_not_finish(tmp_path, capsys):
    """A save that did not finish (a kill; a failed write removes its own) left its step_N.tmp folder, a
    checkpoint's size, which only a later save of the same step removed: resumed with another interval (or
    train.steps), a run never saved that step again and kept it for ever. A run removes every such folder as it
    starts, says so on one line, and leaves the complete checkpoints and every other name as they were."""
    from videoprism.train import checkpoint as ckpt

    args = ("train.compile=false", "checkpoint.keep=5")
    make_trainer(tmp_path, *args, "train.steps=2").fit()
    root = tmp_path / "checkpoints"
    left = root / "step_00000003.tmp"
    shutil.copytree(root / "step_00000002", left)  # what a save killed before its rename leaves: its files
    (left / ".metadata").unlink()
    (root / "notes.tmp").write_text("not a checkpoint")
    capsys.readouterr()
    trainer = make_trainer(tmp_path, *args, "train.steps=4", "checkpoint.interval=0")  # saves step 4 only
    trainer.resume(str(tmp_path))
    trainer.fit()
    assert sorted(os.listdir(root)) == ["notes.tmp", "step_00000002", "step_00000004"]
    removed = [line for line in capsys.readouterr().out.splitlines() if "did not finish" in line]
    assert removed == [f"[test] 1 folder(s) of checkpoint saves that did not finish removed: {left}"]
    assert ckpt.read_rank_state(ckpt.latest(str(root)), 0)["data"] == trainer.data.state_dict()


# A checkpoint's files, lost (the rank file, DCP's metadata) or cut short (those, or the tensors).
DAMAGES = ["rank_file", "metadata", "metadata_cut", "rank_file_cut", "tensors_cut"]


def damage_file(folder, damage: str) -> None:
    """Damage a checkpoint written by one rank: one of DAMAGES."""
    name = {"rank_file": "rank0.pt", "metadata": ".metadata", "tensors": "__0_0.distcp"}[damage.removesuffix("_cut")]
    if damage.endswith("_cut"):
        with open(folder / name, "r+b") as fh:
            fh.truncate(100)
    else:
        os.remove(folder / name)


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_latest_checkpoint_is_refused_naming_the_one_before_it(tmp_path, damage, caplog):
    """A latest checkpoint damaged after it was written (a file lost) stops --resume with one line
    naming the complete checkpoint before it: the fix said "resume from the run's out_dir (its latest complete
    checkpoint)", the damaged one again (a requeued job failed the same way each time), or "an earlier
    checkpoints/step_* folder" without naming one. Resumed from it, the damaged one is renamed out of the way
    and keep=2 deletes no good one. A lost or cut .metadata came after two warnings of DCP's with a traceback each
    (on the root logger: the console) and blamed a config change first; it is named as the damaged file.
    (--auto-resume goes back itself: test_auto_resume_goes_back_past_a_damaged_latest_checkpoint.)"""
    from videoprism.train import checkpoint as ckpt

    args = ("train.compile=false", "checkpoint.interval=1", "checkpoint.keep=2", "train.steps=3")
    make_trainer(tmp_path, *args).fit()
    root = tmp_path / "checkpoints"
    damage_file(root / "step_00000003", damage)
    previous = str(root / "step_00000002")
    for named in (tmp_path, root / "step_00000003"):  # --resume OUT_DIR (its latest), --resume STEP
        with pytest.raises(ckpt.CheckpointReadError) as err:  # a ValueError: one line, exit status 2
            make_trainer(tmp_path, *args).resume(str(named))
        msg = str(err.value)
        assert "\n" not in msg and str(root / "step_00000003") in msg and msg.endswith(f"--resume {previous}")
        assert not [r for r in caplog.records if r.exc_info] and ("metadata" not in damage or "(.metadata: " in msg)
    trainer = make_trainer(tmp_path, *args)
    trainer.resume(previous)
    trainer.fit()
    assert [s for s, _ in ckpt.step_dirs(str(root))] == [2, 3] and (root / "step_00000003.abandoned").is_dir()
    trainer = make_trainer(tmp_path, *args)
    trainer.resume(str(tmp_path), if_any=True)  # the next requeue goes on from the new step 3
    assert trainer.step == 3


@pytest.mark.parametrize("damage", DAMAGES)
def test_auto_resume_goes_back_past_a_damaged_latest_checkpoint(tmp_path, damage, capsys):
    """--auto-resume (a requeued job, no one watching) of a run whose latest checkpoint is damaged failed on every
    requeue with the line naming the one before it. It goes back to that one, says so in one line, renames the
    damaged one out of the way and saves that step again, with the losses of the uninterrupted run."""
    from videoprism.train import checkpoint as ckpt

    args = ("train.compile=false", "checkpoint.interval=1", "checkpoint.keep=2", "train.steps=5", "optim.decay=cosine")
    make_trainer(tmp_path / "ref", *args).fit()
    run = tmp_path / "run"
    root, damaged, previous = run / "checkpoints", run / "checkpoints" / "step_00000003", \
        run / "checkpoints" / "step_00000002"
    with pytest.raises(Preempted):  # a notice in step 3: checkpoints 2 and 3 kept
        make_trainer(run, *args, data=SignalAt(2, signal.SIGTERM)).fit()
    damage_file(damaged, damage)
    capsys.readouterr()
    trainer = make_trainer(run, *args, data=SignalAt(2, signal.SIGTERM))
    trainer.resume(str(run), if_any=True)
    out = capsys.readouterr().out.splitlines()
    assert trainer.step == 2 and trainer.resumed_from == str(previous)
    assert len(out) == 2 and out[0].startswith(f"--auto-resume: the damaged checkpoint {damaged} ("), out
    assert out[0].endswith(f") does not load: going back to {previous}, the newest checkpoint that loads (step 3 is "
                           f"trained again); renamed out of the way: {damaged}.abandoned")
    assert out[1] == f"resumed from {previous} at step 2"
    assert sorted(os.listdir(root)) == ["step_00000002", "step_00000003.abandoned"]
    with pytest.raises(Preempted):  # stopped again after step 3: its checkpoint written anew
        trainer.fit()
    assert [s for s, _ in ckpt.step_dirs(str(root))] == [2, 3]
    resumed_equals_uninterrupted(make_trainer(run, *args), tmp_path / "ref", run, auto=True)


@pytest.mark.parametrize("cause", ["config", "code", "versions", "rng", "permissions", "memory"])
def test_auto_resume_does_not_go_back_past_a_checkpoint_that_is_not_damaged(tmp_path, monkeypatch, cause):
    """A latest checkpoint that does not load for a cause its earlier ones share, or the user's to fix (another model
    config, a torch that wrote formats this one does not read, a permission denied, memory), stops --auto-resume with
    its one line as under --resume: going back would fail alike, or lose steps to a typo. Nothing is renamed.
    "code": the same config builds another model (the code changed since: here a parameter more), whose missing key
    DCP's load raised as any other error of a checkpoint of the writer's config and versions, taken for damaged files:
    every earlier checkpoint failed alike, and the line said to start over with --overwrite."""
    import torch.distributed.checkpoint.filesystem as fs

    from videoprism.train import checkpoint as ckpt

    args = ("train.compile=false", "checkpoint.interval=1", "checkpoint.keep=2", "train.steps=3")
    make_trainer(tmp_path, *args).fit()
    root = tmp_path / "checkpoints"
    if cause in ("versions", "rng"):
        written_by_other_versions(root / "step_00000003", "metadata" if cause == "versions" else "rng")
    elif cause in ("permissions", "memory"):
        def fail(*a, **k):
            raise PermissionError(13, "Permission denied") if cause == "permissions" else torch.OutOfMemoryError()

        monkeypatch.setattr(fs.FileSystemReader, "read_data", fail)
    trainer = make_trainer(tmp_path, *args, *(["model.mlp_dim=48"] if cause == "config" else []))
    if cause == "code":
        trainer.model.register_parameter("added", torch.nn.Parameter(torch.zeros(2)))
    with pytest.raises(ckpt.CheckpointReadError) as err:
        trainer.resume(str(tmp_path), if_any=True)
    msg = str(err.value)
    assert not isinstance(err.value, ckpt.DamagedCheckpointError) and "\n" not in msg
    assert msg.startswith(f"checkpoint {root / 'step_00000003'}")
    assert cause != "code" or "Missing key in checkpoint state_dict: model.added" in msg
    assert sorted(os.listdir(root)) == ["step_00000002", "step_00000003"]


def test_auto_resume_with_no_checkpoint_that_loads_says_so(tmp_path):
    """Every checkpoint damaged: --auto-resume stops with one line naming each and why, and renames none (the next
    requeue must not start afresh over them)."""
    from videoprism.train import checkpoint as ckpt

    args = ("train.compile=false", "checkpoint.interval=1", "checkpoint.keep=2", "train.steps=2")
    make_trainer(tmp_path, *args).fit()
    root = tmp_path / "checkpoints"
    damage_file(root / "step_00000002", "tensors_cut")
    damage_file(root / "step_00000001", "metadata")
    with pytest.raises(ckpt.CheckpointReadError) as err:
        make_trainer(tmp_path, *args).resume(str(tmp_path), if_any=True)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"--auto-resume: no checkpoint under {root} loads, each is damaged: "
                                              f"{root / 'step_00000002'} (its .distcp files: rank 0: EOFError")
    assert f"; {root / 'step_00000001'} (.metadata: rank 0: FileNotFoundError" in msg
    assert msg.endswith("restore the files, or start over with --overwrite instead of --auto-resume")
    assert sorted(os.listdir(root)) == ["step_00000001", "step_00000002"]


@pytest.mark.parametrize("cut", ["save", "load"])
def test_ctrl_c_in_a_checkpoint_save_or_load_is_an_interrupt_not_a_damaged_checkpoint(tmp_path, monkeypatch, cut):
    """DCP wraps each rank's exception in a CheckpointException, Ctrl-C's KeyboardInterrupt too: a Ctrl-C during a
    save said "writing checkpoint ... failed" (exit status 2), and during a resume's load (minutes at scale) that the
    checkpoint might be damaged, to resume from the one before it (losing its steps). Both are a KeyboardInterrupt
    (the command's line "interrupted", exit status 130), and the checkpoint resumes."""
    import torch.distributed.checkpoint.filesystem as fs

    args = ("train.compile=false", "checkpoint.interval=2", "train.steps=3")
    if cut == "load":
        make_trainer(tmp_path, *args).fit()

    def ctrl_c(*a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        if cut == "save":
            m.setattr(fs, "_write_item", ctrl_c)
        else:
            m.setattr(fs.FileSystemReader, "read_data", ctrl_c)
        trainer = make_trainer(tmp_path, *args)
        with pytest.raises(KeyboardInterrupt):
            trainer.fit() if cut == "save" else trainer.resume(str(tmp_path))
    trainer = make_trainer(tmp_path, *args)
    trainer.resume(str(tmp_path), if_any=True)
    assert trainer.step == (0 if cut == "save" else 3)


class CachedLike(RandomClips):
    """Random clips whose data position is data.cache's kind (CachedClips: epoch and position)."""

    def state_dict(self):
        return {"epoch": 0, "position": 0}


def test_a_resume_that_changed_the_kind_of_data_source_names_the_change(tmp_path):
    """A resume with another data.cache (or data.source) than the run's, e.g. --auto-resume with --config tiny
    (data.cache=true) of a run that streamed its manifest (data.cache=false), failed with a KeyError traceback
    ('epoch') in the data's load_state_dict: it is one line naming the change and the fix."""
    args = ("train.compile=false", "checkpoint.interval=1", "train.steps=1")
    make_trainer(tmp_path, *args).fit()
    trainer = make_trainer(tmp_path, *args, "data.cache=false", data=CachedLike(**CLIPS))
    with pytest.raises(ValueError) as err:
        trainer.resume(str(tmp_path))
    assert str(err.value) == (f"checkpoint {tmp_path / 'checkpoints' / 'step_00000001'} holds the data position of "
                              "another kind of data source than this run's (data.cache: True -> False): resume with "
                              "the run's data.source and data.cache (its config.json has them)")


class SignalAt(RandomClips):
    """Random clips; fetching the batch of step `at` sends `signum` to this process, as a
    scheduler's notice arriving in the middle of a step. Records the handler it finds."""

    def __init__(self, at: int, signum: int):
        super().__init__(**CLIPS)
        self.at, self.signum, self.handler = at, signum, None

    def next_batch(self, step):
        if step == self.at:
            self.handler = signal.getsignal(self.signum)
            if callable(self.handler):  # a default handler would end pytest itself
                os.kill(os.getpid(), self.signum)
        return super().next_batch(step)


def _slow_disk(monkeypatch, seconds: float) -> None:
    """Every tensor DCP writes takes `seconds` longer: a checkpoint write spans several steps."""
    import time

    import torch.distributed.checkpoint.filesystem as fs

    write = fs._write_item

    def slow_write(*a, **k):
        time.sleep(seconds)
        return write(*a, **k)

    monkeypatch.setattr(fs, "_write_item", slow_write)


def resumed_equals_uninterrupted(trainer: Trainer, ref, run, auto: bool = False) -> None:
    """`trainer` resumed from `run`'s latest checkpoint (`auto`: as --auto-resume) and trained to the end gives the 5
    steps' losses of the uninterrupted run `ref`."""
    trainer.resume(str(run), if_any=auto)
    trainer.fit()
    want, got = run_losses(ref), run_losses(run)
    assert sorted(got) == [1, 2, 3, 4, 5]
    for step in got:
        assert got[step] == pytest.approx(want[step], abs=1e-6), step


@pytest.mark.parametrize("signum, async_save", [(signal.SIGTERM, False), (signal.SIGUSR1, True)])
def test_preemption_notice_saves_at_the_step_boundary_and_resume_continues_exactly(tmp_path, signum, async_save):
    """With async_save, the notice comes while the step-2 interval checkpoint may still be
    written: it is finished first, then the notice's own."""
    from videoprism.train import checkpoint as ckpt

    args = ("train.compile=false", f"checkpoint.interval={2 if async_save else 0}", "train.steps=5",
            "optim.decay=cosine", f"checkpoint.async_save={async_save}")
    make_trainer(tmp_path / "ref", *args).fit()
    before = signal.getsignal(signum)
    data = SignalAt(2, signum)
    with pytest.raises(Preempted) as stop:
        make_trainer(tmp_path / "run", *args, data=data).fit()
    # The step the signal arrived in (batch index 2 = step 3) completes, then the checkpoint.
    assert stop.value.code == 128 + signum and stop.value.step == 3
    root = str(tmp_path / "run" / "checkpoints")
    assert [s for s, _ in ckpt.step_dirs(root)] == ([2, 3] if async_save else [3])
    assert stop.value.checkpoint == ckpt.latest(root)
    assert signal.getsignal(signum) == before  # the trainer's handler is gone again
    resumed_equals_uninterrupted(make_trainer(tmp_path / "run", *args), tmp_path / "ref", tmp_path / "run")


class GlobalRngClips(SignalAt):
    """SignalAt's clips with noise drawn from the global generators of torch, numpy and Python, as an
    augmentation or dropout drawing from them would: only a resume that restores all three (DESIGN 8: RNG
    is part of the checkpoint) continues their streams where the checkpoint left them."""

    def next_batch(self, step):
        import random

        import numpy as np

        batch = super().next_batch(step)
        scale = 1.0 + 0.1 * float(np.random.rand()) + 0.1 * random.random()
        batch["video"] = batch["video"].float() / 255 * scale + 0.1 * torch.rand(batch["video"].shape)
        return batch


def test_resume_continues_the_global_random_streams(tmp_path):
    """Oracle: the uninterrupted run. Stopped after step 3 and resumed, a run whose batches draw from the
    global generators gives the uninterrupted run's losses (a resume that kept the freshly seeded
    generators would draw step 4's noise from where step 1's came from)."""
    from videoprism.train.seeds import seed_process

    args = ("train.compile=false", "checkpoint.interval=0", "train.steps=5", "optim.decay=cosine")

    def trainer(out, signal_at=-1):  # seeded as the entry points (train/stage1.py) seed a process
        seed_process(0)
        return make_trainer(out, *args, data=GlobalRngClips(signal_at, signal.SIGTERM))

    trainer(tmp_path / "ref").fit()
    with pytest.raises(Preempted):
        trainer(tmp_path / "run", signal_at=2).fit()
    resumed_equals_uninterrupted(trainer(tmp_path / "run"), tmp_path / "ref", tmp_path / "run")


def test_a_notice_at_an_evaluation_step_still_evaluates_it(tmp_path):
    """The notice's step is a train.eval_every step: the resume continues after it, so the run evaluates it
    after the checkpoint and before exiting; the evaluations of the stopped and resumed run are the
    uninterrupted run's (the notice skipped this one for good)."""
    args = ("train.compile=false", "train.steps=5", "train.eval_every=3", "checkpoint.interval=0")

    def evaluations(out, data=None, resume=False):
        trainer = make_trainer(out, *args, data=data)
        trainer.task.evaluate = lambda module: {"at_step": trainer.step}
        if resume:
            trainer.resume(str(out))
        trainer.fit()

    evaluations(tmp_path / "ref")
    with pytest.raises(Preempted) as stop:
        evaluations(tmp_path / "run", data=SignalAt(2, signal.SIGTERM))  # batch index 2: step 3
    assert stop.value.step == 3
    evaluations(tmp_path / "run", resume=True)
    ref, got = ([r["eval"] for r in read_jsonl(str(out / "metrics.jsonl")) if "eval" in r]
                for out in (tmp_path / "ref", tmp_path / "run"))
    assert got == ref == [{"at_step": 3}, {"at_step": 5}]


def test_a_notice_in_the_last_step_stops_after_the_final_checkpoint_and_resume_finishes(tmp_path, capsys):
    """The last step's notice: the final checkpoint is written, then the run stops at once (the kill that
    follows would cut the evaluation or the export) with status 128 + signal; the same command with --resume
    trains nothing and does the evaluation and the export."""
    args = ("train.compile=false", "train.steps=3", "checkpoint.interval=0", "checkpoint.export=true")

    def trainer_at(data=None):
        trainer = make_trainer(tmp_path, *args, data=data)
        trainer.task.evaluate = lambda module: {"at_step": trainer.step}
        return trainer

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Preempted) as stop:
        trainer_at(SignalAt(2, signal.SIGTERM)).fit()  # batch index 2: the last step
    assert stop.value.code == 128 + signal.SIGTERM and stop.value.step == 3
    assert stop.value.checkpoint.endswith("step_00000003")
    assert "SIGTERM after the final checkpoint" in capsys.readouterr().out
    assert not (tmp_path / "model.safetensors").exists()
    assert not any("eval" in r for r in read_jsonl(str(tmp_path / "metrics.jsonl")))
    assert signal.getsignal(signal.SIGTERM) == before
    trainer = trainer_at()
    trainer.resume(str(tmp_path))
    results = trainer.fit()
    assert results["at_step"] == 3 and os.path.isfile(results["export"])


def test_a_notice_during_the_final_evaluation_stops_it_at_once(tmp_path, capsys):
    """A notice while the final evaluation runs (minutes at scale) ends it: the checkpoint is complete, and
    without the handler the signal's default action ended the process with no word."""
    trainer = make_trainer(tmp_path, "train.compile=false", "train.steps=2", "checkpoint.interval=0",
                           "checkpoint.export=true")
    evaluated = []

    def evaluate(module):
        os.kill(os.getpid(), signal.SIGUSR1)
        evaluated.append(trainer.step)  # reached only if the handler let the evaluation go on
        return {}

    trainer.task.evaluate = evaluate
    with pytest.raises(Preempted) as stop:
        trainer.fit()
    assert stop.value.code == 128 + signal.SIGUSR1 and stop.value.step == 2 and not evaluated
    assert "SIGUSR1 after the final checkpoint" in capsys.readouterr().out
    assert not (tmp_path / "model.safetensors").exists()


def test_a_notice_during_startup_stops_the_run_at_once(tmp_path, monkeypatch, capsys):
    """Startup (the model, data.cache's decode of a manifest, the resume's load: minutes at scale) has no
    step to finish: a notice ends the run there with a line and status 128 + signal, not silently."""
    from videoprism.train import stage1

    built = []

    def data_then_notice(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        built.append(1)  # reached only if the handler let the startup go on
        return RandomClips(**CLIPS)

    monkeypatch.setattr(stage1, "build_train_data", data_then_notice)
    cfg = build_config("tiny", [*TINY, f"train.out_dir={tmp_path}", "train.steps=1", "data.source=random"], 1)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Preempted) as stop:
        stage1.run(cfg)
    assert stop.value.code == 128 + signal.SIGTERM and not built
    assert "SIGTERM before the first step" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) == before
    assert not (tmp_path / "checkpoints").exists() or not os.listdir(tmp_path / "checkpoints")


class InterruptAt(RandomClips):
    """Random clips; fetching the batch of step `at` is cut by Ctrl-C, as a terminal's SIGINT to the main thread
    waiting on its DataLoader."""

    def __init__(self, at: int):
        super().__init__(**CLIPS)
        self.at = at

    def next_batch(self, step):
        if step == self.at:
            raise KeyboardInterrupt
        return super().next_batch(step)


@pytest.mark.parametrize("at", [None, 3])  # None: in the startup (data.cache's decode of a manifest)
def test_ctrl_c_is_one_line_naming_the_latest_checkpoint_and_status_130(tmp_path, monkeypatch, capsys, at):
    """Ctrl-C ended a run with a traceback of wherever the main thread was (a DataLoader's queue, a decoder) and
    nothing on what was kept: it is one line, `interrupted: ...`, with the latest complete checkpoint and the
    command that goes on from it, exit status 130 (128 + SIGINT); the checkpoint resumes."""
    from videoprism.train import stage1

    def data(*a, **k):
        if at is None:
            raise KeyboardInterrupt
        return InterruptAt(at)

    monkeypatch.setattr(stage1, "build_train_data", data)
    monkeypatch.delenv("VIDEOPRISM_TRACEBACK", raising=False)
    args = [*TINY, f"train.out_dir={tmp_path}", "train.steps=5", "checkpoint.interval=2"]
    assert stage1.main(["--config", "tiny", *args]) == 130
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    root = tmp_path / "checkpoints"
    if at is None:
        assert err == ["interrupted: before the first step (no step taken, nothing lost); the same command starts "
                       "again"]
        return
    assert err[-1] == (f"interrupted: [stage1] at step 3; the latest checkpoint is {root / 'step_00000002'}: the same "
                       "command with --auto-resume goes on from it")
    assert "Traceback" not in "\n".join(err)
    monkeypatch.setattr(stage1, "build_train_data", lambda *a, **k: RandomClips(**CLIPS))
    assert stage1.main(["--config", "tiny", *args, "--auto-resume"]) == 0
    assert f"resumed from {root / 'step_00000002'} at step 2" in capsys.readouterr().out


def test_without_save_on_signal_the_signals_keep_their_handlers(tmp_path):
    data = SignalAt(0, signal.SIGTERM)
    make_trainer(tmp_path, "train.compile=false", "train.steps=1", "checkpoint.save_on_signal=false",
                 data=data).fit()
    assert data.handler == signal.getsignal(signal.SIGTERM) and not callable(data.handler)


def test_auto_resume_starts_afresh_without_a_checkpoint_and_resumes_with_one(tmp_path):
    args = ("train.compile=false", "train.steps=2")
    trainer = make_trainer(tmp_path, *args)
    os.makedirs(tmp_path / "checkpoints" / "step_00000004.tmp")  # an unfinished save does not count
    trainer.resume(str(tmp_path), if_any=True)
    assert trainer.step == 0 and trainer.resumed_from is None
    trainer.fit()
    trainer = make_trainer(tmp_path, *args)
    trainer.resume(str(tmp_path), if_any=True)
    assert trainer.step == 2 and trainer.resumed_from == str(tmp_path / "checkpoints" / "step_00000002")
    with pytest.raises(FileNotFoundError, match="empty. does not exist; pass the run.s out_dir"):
        make_trainer(tmp_path / "empty", *args).resume(str(tmp_path / "empty"))
    # A step folder mistyped (the folders have eight digits): the error lists the ones there.
    with pytest.raises(FileNotFoundError, match="step_2. does not exist; its folder holds step_00000002$"):
        make_trainer(tmp_path, *args).resume(str(tmp_path / "checkpoints" / "step_2"))


def test_resume_reports_what_the_config_changed(tmp_path, capsys):
    """A resume with other values (a longer schedule, another lr) goes on with them and says so, on the console and
    in metrics.jsonl; the same config says nothing."""
    make_trainer(tmp_path, "train.compile=false", "train.steps=2").fit()
    trainer = make_trainer(tmp_path, "train.compile=false", "train.steps=2")
    trainer.resume(str(tmp_path))
    capsys.readouterr()
    trainer.fit()
    assert "differs" not in capsys.readouterr().out
    trainer = make_trainer(tmp_path, "train.compile=false", "train.steps=3", "optim.lr=1e-3")
    trainer.resume(str(tmp_path))
    trainer.fit()
    assert "optim.lr: 0.003 -> 0.001; train.steps: 2 -> 3" in capsys.readouterr().out
    records = [r for r in read_jsonl(str(tmp_path / "metrics.jsonl")) if "resumed_from" in r]
    assert "config_changes" not in records[0]
    assert records[-1]["config_changes"] == ["optim.lr: 0.003 -> 0.001", "train.steps: 2 -> 3"]
    assert json.load(open(tmp_path / "config.json"))["train"]["steps"] == 3
    (tmp_path / "config.json").write_text("[]")  # not a config (edited by hand): nothing to compare, no crash
    trainer = make_trainer(tmp_path, "train.compile=false", "train.steps=3")
    trainer.resume(str(tmp_path))
    trainer.fit()
    assert "differs" not in capsys.readouterr().out


class Watch(RandomClips):
    """Random clips that note, per step, whether `path` exists when the step's batch is fetched."""

    def __init__(self, path):
        super().__init__(**CLIPS)
        self.path, self.seen = path, {}

    def next_batch(self, step):
        self.seen[step] = os.path.isdir(self.path)
        return super().next_batch(step)


def test_async_checkpoints_hold_the_state_of_their_step(tmp_path, monkeypatch):
    """checkpoint.async_save with a slow disk: the steps after a save run while it is written
    (its folder appears only once the write is done), and what it holds is the state of its
    own step, equal to a synchronous run's, not of the updates made meanwhile."""
    from videoprism.train import checkpoint as ckpt

    args = ("train.compile=false", "checkpoint.interval=2", "checkpoint.keep=5", "train.steps=5")
    make_trainer(tmp_path / "sync", *args).fit()
    _slow_disk(monkeypatch, 0.005)
    watch = Watch(str(tmp_path / "async" / "checkpoints" / "step_00000002"))
    make_trainer(tmp_path / "async", *args, "checkpoint.async_save=true", data=watch).fit()
    assert watch.seen[2] is False and watch.seen[4] is True  # written behind step 3, in place by step 5
    for step in (2, 4, 5):
        loaded = []
        for run in ("sync", "async"):
            trainer = make_trainer(tmp_path / "load", *args)
            trainer.resume(str(tmp_path / run / "checkpoints" / f"step_{step:08d}"))
            loaded.append((trainer.task.module.state_dict(), trainer.optimizer.state_dict()["state"]))
        (m1, o1), (m2, o2) = loaded
        assert all(torch.equal(m1[k], m2[k]) for k in m1), step
        assert all(torch.equal(o1[i][k], o2[i][k]) for i in o1 for k in o1[i]), step
    assert [s for s, _ in ckpt.step_dirs(str(tmp_path / "async" / "checkpoints"))] == [2, 4, 5]


def test_a_failed_run_waits_for_its_async_write_and_leaves_it_unpublished(tmp_path, monkeypatch):
    """The run stops (too many non-finite steps) while the step-2 checkpoint is still being
    written: fit() waits for the writer (which would otherwise outlive the process group it
    uses) and does not rename its folder into place; in one process, where no other rank writes in it, the
    unfinished folder is removed (it stayed until the folder's next run started)."""
    import threading

    from videoprism.train import checkpoint as ckpt

    _slow_disk(monkeypatch, 0.01)
    trainer = make_trainer(tmp_path, "train.compile=false", "checkpoint.interval=2", "checkpoint.async_save=true",
                           "train.max_nonfinite=0", "train.steps=5", data=NaNOnce({2}))
    before = set(threading.enumerate())
    with pytest.raises(NonFiniteLossError):
        trainer.fit()
    assert trainer.saver.pending is None
    assert not [t for t in threading.enumerate() if t not in before and t.is_alive() and "ThreadPool" in t.name]
    root = str(tmp_path / "checkpoints")
    assert ckpt.step_dirs(root) == [] and os.listdir(root) == []


def test_grad_cache_accumulation_gives_the_whole_batch_gradient(tmp_path):
    """Two micro-batches of 2 with stage1.grad_cache give the gradient of the contrastive loss
    over all 4 clips (one micro-batch of 4: the oracle); accumulating per-micro-step losses
    does not (fewer negatives). Masks as configured: a clip's mask is keyed by its index in the step's
    global batch (train/step_masks.py), so both see the same tokens."""
    from videoprism.train.parallel import grad_sync

    def grads(trainer):
        return {n: p.grad.clone() for n, p in trainer.task.module.named_parameters() if p.grad is not None}

    whole = make_trainer(tmp_path, "train.compile=false")
    assert whole.cfg.train.mask_ratio == 0.5
    loss, _ = whole.task.loss(whole.model, whole.task.prepare(whole.data.next_batch(0), 0, 0))
    loss.backward()
    want = grads(whole)
    for cache in (True, False):
        two = RandomClips(micro_batch=2, rank=0, world=1, frames=4, resolution=16, vocab=50, seed=0)
        acc = make_trainer(tmp_path, "train.compile=false", "train.micro_batch=2",
                           f"stage1.grad_cache={str(cache).lower()}", data=two)
        assert acc.accum == 2
        micro = [acc.task.prepare(acc.data.next_batch(0), 0, a) for a in range(2)]
        if cache:
            got_loss, _ = acc.task.cached_backward(acc.model, micro, amp=acc._amp,
                                                   sync=lambda last: grad_sync(acc.model, last))
            torch.testing.assert_close(got_loss, loss.detach(), rtol=1e-5, atol=1e-6)
        else:
            for x in micro:
                (acc.task.loss(acc.model, x)[0] / 2).backward()
        got = grads(acc)
        assert got.keys() == want.keys()
        # Relative to the largest gradient entry: the pooler's key bias has an exactly zero
        # gradient (softmax ignores a shift shared by all keys), so its own scale is noise.
        scale = max(float(g.abs().max()) for g in want.values())
        err = max(float((got[k] - want[k]).abs().max()) for k in want) / scale
        assert (err < 1e-4) if cache else (err > 1e-3), (cache, err)
    acc.task.grad_cache = True  # and through the trainer's step
    acc.optimizer.zero_grad()
    rec = acc.train_step()
    assert not rec["skipped"] and math.isfinite(rec["loss"])


def test_compiled_train_step_has_no_graph_break(tmp_path):
    """The training forward (ContrastiveModel with masked video and text) traces as one graph, its blocks
    (which the trainer compiles) and what lies between them; the backward follows through AOTAutograd."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    trainer = make_trainer(tmp_path, "train.compile=false")
    task = trainer.task
    compiled = torch.compile(task.module, backend="eager", fullgraph=True)
    inputs = task.prepare(trainer.data.next_batch(0), 0, 0)
    loss, _ = task.loss(compiled, inputs)
    loss.backward()
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] >= 1
    eager_loss, _ = task.loss(task.module, inputs)
    assert torch.allclose(loss, eager_loss, atol=1e-6)
    # GradCache's passes (a no-grad forward, then forward + backward) trace whole too.
    cached_loss, _ = task.cached_backward(compiled, [inputs, inputs], amp=trainer._amp,
                                          sync=lambda last: contextlib.nullcontext())
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert torch.isfinite(cached_loss)


def test_compiled_blocks_with_activation_checkpointing_train_as_plain_eager_blocks(tmp_path):
    """train.activation_checkpointing wraps each block's forward in a checkpoint, and train.compile then compiles
    that (aot_eager: AOTAutograd's handling of the recomputation, without Inductor's rounding): the plain eager
    run's losses, no graph break."""
    from torch._dynamo.utils import counters

    losses, graphs = {}, {}
    for name, over in (("plain", ["train.compile=false"]),
                       ("compiled+ckpt", ["train.compile=true", "train.compile_backend=aot_eager",
                                          "train.activation_checkpointing=true"])):
        torch._dynamo.reset()
        counters.clear()
        trainer = make_trainer(tmp_path / name, *over)
        losses[name] = [trainer.train_step()["loss"] for _ in range(3)]
        graphs[name] = counters["stats"]["unique_graphs"]
        assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    torch._dynamo.reset()
    assert graphs["plain"] == 0 and graphs["compiled+ckpt"] >= 3, graphs  # spatial, temporal, text blocks
    assert losses["compiled+ckpt"] == pytest.approx(losses["plain"], abs=1e-5), losses


class Frames(RandomClips):
    """Random clips whose frame count cycles with the step: datasets of other clip lengths and images
    (one-frame videos) alternating, as data.train=a.jsonl,b.jsonl:1:2,... draws them."""

    def __init__(self, cycle):
        super().__init__(**CLIPS)
        self.cycle = cycle

    def next_batch(self, step):
        self.frames = self.cycle[step % len(self.cycle)]
        return super().next_batch(step)


def compiled_graphs_per_step(tmp_path, cycle, steps, *overrides, val=()):
    """The graphs dynamo compiles at each step of a compiled stage-1 run (train.compile_backend=eager) on clips
    of the `cycle` frame counts, with an evaluation on validation batches of the `val` sizes after every cycle.
    (The trainer raises dynamo's recompile limit, train.parallel._allow_graphs_per_pass: the counts are the check.)"""
    from torch._dynamo.utils import counters

    from videoprism.train.metrics import MetricsLogger

    torch._dynamo.reset()
    counters.clear()
    source = RandomClips(**{**CLIPS, "seed": 9}).next_batch(0)
    log = MetricsLogger(str(tmp_path), total_steps=steps, start_step=0, enabled=False, desc="test")
    per_step = []
    try:
        trainer = make_trainer(tmp_path, "train.compile=true", "train.compile_backend=eager", *overrides,
                               data=Frames(cycle))
        trainer.task.val = [{**{k: v[:b] for k, v in source.items()}, "index": torch.arange(b)} for b in val]
        for _ in range(steps):
            before = counters["stats"]["unique_graphs"]
            trainer.train_step()
            if val and trainer.step % len(cycle) == 0:
                trainer._evaluate(log)
            per_step.append(counters["stats"]["unique_graphs"] - before)
    finally:
        torch._dynamo.reset()
    return per_step


def test_compiled_run_on_videos_and_images_with_grad_cache_and_evaluation_compiles_each_graph_once(tmp_path):
    """Every block's forward is one code object to dynamo (train.parallel.compile_blocks), with a graph per kind of
    block (spatial, temporal, text), pass (the step, GradCache's no-grad one, the evaluation on full clips, its last
    smaller batch) and shape (the first frame count and caption length, then dynamic ones, images): more than 8,
    dynamo's default limit per code object, past which fullgraph fails the run (as a whole-model compile's 9th
    graph once did at the first evaluation; the trainer raises the limit to 64). The same steps and evaluation
    again compile nothing."""
    per_step = compiled_graphs_per_step(tmp_path, (4, 2, 1), 6, "train.global_batch=8", "train.micro_batch=4",
                                        "stage1.grad_cache=true", val=(4, 3))
    assert per_step[3:] == [0, 0, 0], per_step
    assert 8 < sum(per_step) <= 32, per_step


def test_compiled_steps_compile_nothing_once_every_kind_of_step_has_run(tmp_path):
    """Videos and images alternating: each kind of block (spatial, temporal, text) compiles at the first step and
    again at the second (the frame count and the trimmed captions' length now dynamic), nothing after."""
    per_step = compiled_graphs_per_step(tmp_path, (4, 1), 8)
    assert per_step == [3, 3, 0, 0, 0, 0, 0, 0], per_step


def test_bf16_precision_trains_like_fp32(tmp_path):
    """train.precision=bf16 (what 'auto' does on a GPU), run here on the CPU: the compiled step
    (aot_eager traces the custom ops' fake impls under autocast) with GradCache accumulation,
    fp32 master weights, losses near the eager fp32 run's."""
    losses = {}
    for prec in ("fp32", "bf16"):
        torch._dynamo.reset()
        trainer = make_trainer(tmp_path / prec, f"train.precision={prec}", f"train.compile={prec == 'bf16'}",
                               "train.compile_backend=aot_eager", "train.micro_batch=2")
        assert trainer.autocast == (prec == "bf16") and trainer.accum == 2
        losses[prec] = [trainer.train_step()["loss"] for _ in range(3)]
        assert {p.dtype for p in trainer.task.module.parameters()} == {torch.float32}
        autocast_in_eval = []  # evaluation runs in the step's precision (on a GPU fp32 is the kernels' slow path)
        trainer.task.evaluate = lambda module: autocast_in_eval.append(torch.is_autocast_enabled("cpu")) or {}
        trainer._evaluate(log=None)
        assert autocast_in_eval == [prec == "bf16"]
    assert losses["bf16"] != losses["fp32"]  # the autocast is in effect
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=3e-2)


def test_mfu_is_measured_against_the_peak_of_the_steps_dtype(tmp_path, monkeypatch):
    """The matmul ceiling of MFU is measured in the dtype the step computes in: the device's default (bf16 on a
    GPU) stood for train.precision=fp32 on a GPU and for bf16 on the CPU."""
    import videoprism.train.trainer as trainer_module

    asked = []
    monkeypatch.setattr(trainer_module, "matmul_peak_tflops", lambda device, dtype=None: asked.append(dtype) or 1.0)
    for prec in ("fp32", "bf16"):
        make_trainer(tmp_path / prec, f"train.precision={prec}", "train.steps=1", "train.compile=false").fit()
    assert asked == [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("cache,val_cache", [(False, True), (True, True), (False, False)],
                         ids=["stream", "cache", "stream-val"])
def test_bad_sample_is_skipped_and_run_goes_on(tmp_path, cache, val_cache):
    """A manifest with a missing and a corrupt clip: the loader (or the decode of a cached set) skips
    them, training finishes, and each skip is reported with its path and reason (console and
    rejects.rank0.jsonl), the validation split's too (they were said on the console only, and not counted);
    streamed (data.val_cache=false), by its first evaluation, and a resume's evaluation records them no more."""
    from videoprism.data.synth import generate

    root = tmp_path / "data"
    generate(str(root), 20, size=16, num_frames=4, workers=1)
    lines = open(root / "train.jsonl").read().splitlines()
    (root / "clips" / "broken.webm").write_bytes(b"not a video")
    lines[3] = json.dumps({"path": "clips/broken.webm", "caption": "broken"})
    lines[5] = json.dumps({"path": "clips/missing.webm", "caption": "missing"})
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    from videoprism.train.data import build_train_data, build_val_batches, tokenizer_for

    overrides = ["train.compile=false", "data.source=manifest", f"data.cache={str(cache).lower()}",
                 f"data.train={root}/train.jsonl", f"data.val={root}/train.jsonl", "data.workers=0",
                 f"data.val_cache={str(val_cache).lower()}", "data.max_bad_share=0.5", "train.steps=5",
                 "checkpoint.interval=0"]
    tok = tokenizer_for(build_config("tiny", [*TINY, *overrides], 1))
    trainer = make_trainer(tmp_path / "run", *overrides, vocab=tok.vocab_size)
    trainer.data = build_train_data(trainer.cfg, trainer.dist, tok, micro_batch=4, vocab=tok.vocab_size)
    trainer.task.val, trainer.val_rejects = build_val_batches(trainer.cfg, tok, batch_size=4, dist_=trainer.dist)
    results = trainer.fit()  # 16 good clips: 4 batches per epoch, the 5th step starts epoch 2
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "run" / "metrics.jsonl") if '"loss"' in line]
    assert len(losses) == 5 and all(math.isfinite(x) for x in losses)
    reported = [json.loads(line) for line in open(results["rejects"])]
    names = {os.path.basename(r["path"]) for r in reported}
    assert names == {"broken.webm", "missing.webm", "broken.webm (data.val)", "missing.webm (data.val)"}
    assert all(r["reason"] for r in reported) and results["skipped_samples"] == len(reported) >= 4
    # A resume decodes the validation split again: its bad clips are said, not recorded (nor counted) twice; the
    # count is the run's (it was this process's since it started).
    again = make_trainer(tmp_path / "run", *overrides[:-2], "train.steps=6", "checkpoint.interval=0",
                         vocab=tok.vocab_size)
    again.data = build_train_data(again.cfg, again.dist, tok, micro_batch=4, vocab=tok.vocab_size)
    again.task.val, again.val_rejects = build_val_batches(again.cfg, tok, batch_size=4, dist_=again.dist)
    again.resume(str(tmp_path / "run"))
    more = again.fit()
    assert [json.loads(line) for line in open(more["rejects"])] == reported  # all met again at step 5
    assert more["skipped_samples"] == len(reported)


def test_export_loads_into_from_official(tmp_path):
    trainer = make_trainer(tmp_path, "train.compile=false")
    trainer.train_step()
    path = str(tmp_path / "model.safetensors")
    trainer.task.export(trainer.model, path)
    # Every official field of the trained model, as a user rebuilding it would pass them.
    fresh = videoprism.from_official("videoprism_lvt_v1_base", **dataclasses.asdict(trainer.task.model_config))
    videoprism.load_safetensors(path, fresh)
    for k, v in trainer.task.module.clip.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


def test_lit_mode_trains_text_tower_and_pooler_only(tmp_path):
    trainer = make_trainer(tmp_path, "train.compile=false", "stage1.lit=true")
    clip = trainer.task.module.clip
    before = {k: v.clone() for k, v in clip.state_dict().items()}
    trainer.train_step()
    after = clip.state_dict()
    for k, v in after.items():
        moved = not torch.equal(v, before[k])
        if k.startswith("vision_encoder."):
            assert not moved, k
        elif k.startswith(("text_encoder.token_emb", "contrastive_vision_pooler.q.")):
            assert moved, k


def test_init_from_official_npz_and_from_export(tmp_path, golden_dir):
    """model.init takes an official Flax checkpoint (the golden CLIP, official key layout) and
    our safetensors export; both load strictly."""
    golden = os.path.join(golden_dir, "params_clip.npz")
    cfg = json.load(open(os.path.join(os.path.dirname(golden), "config.json")))["clip"]
    over = [f"model.{k}={cfg[k]}" for k in ("model_dim", "num_heads", "mlp_dim", "num_spatial_layers",
                                             "num_temporal_layers", "num_auxiliary_layers", "num_unimodal_layers",
                                             "vocabulary_size", "patch_size")]
    over += [f"model.pos_emb_shape={','.join(map(str, cfg['pos_emb_shape']))}", "model.resolution=36",
             "model.attention_backend=reference"]
    from videoprism.checkpoint import load_flax_checkpoint

    mc = build_config("tiny", [*over, f"model.init={golden}"], 1).model
    clip = build_clip(mc, vocab=None, device=torch.device("cpu"))
    ref = videoprism.from_official("videoprism_lvt_v1_base", **dataclasses.asdict(clip.config))
    load_flax_checkpoint(golden, ref)
    for k, v in ref.state_dict().items():
        assert torch.equal(clip.state_dict()[k], v), k
    path = str(tmp_path / "clip.safetensors")
    videoprism.save_safetensors(clip, path)
    again = build_clip(build_config("tiny", [*over, f"model.init={path}"], 1).model, vocab=None,
                       device=torch.device("cpu"))
    for k, v in again.state_dict().items():
        assert torch.equal(clip.state_dict()[k], v), k


def test_an_official_npz_init_of_another_shape_is_refused_naming_the_fields_to_set(golden_dir, golden_config):
    """model.init=<the golden LvT .npz> under the tiny preset's shape: refused before the load with the model.*
    values the file's arrays tell (the load named 16 unexpected keys of the auxiliary stack, or one key of another
    shape, never the field); with them set it loads, its position grid read from the file as an export's is."""
    golden = os.path.join(golden_dir, "params_clip.npz")
    over = ["model.resolution=72", f"model.init={golden}"]  # a multiple of both patch sizes, 8 and 18
    mc = build_config("tiny", over, 1).model
    fix = ("model.model_dim=32 model.mlp_dim=64 model.num_auxiliary_layers=1 model.patch_size=18 "
           "model.vocabulary_size=128")
    with pytest.raises(ValueError, match=rf"^model.init=.*params_clip.npz' holds a model of {fix} and this run's "
                                         rf"config builds .*: set {fix}$"):
        build_clip(mc, vocab=None, device=torch.device("cpu"))
    fixed = build_config("tiny", [*over, *fix.split()], 1).model
    clip = build_clip(fixed, vocab=None, device=torch.device("cpu"))
    assert clip.config.pos_emb_shape == tuple(golden_config["clip"]["pos_emb_shape"])


def test_an_npz_of_a_non_square_grid_loads_with_the_grid_set_in_both_stages(tmp_path, golden_dir, golden_config,
                                                                            capsys):
    """An official-layout .npz of an 8x32 position grid: its table holds 256 rows, the count of a 16x16 grid too.
    model.pos_emb_shape=4,8,32 was refused for model.init (stage 1) and for stage2.teacher (stage 2), each advising
    the 16x16 the count was guessed as; now it loads, and the model computes what one built with the 8x32 grid
    does (not what a 16x16 one does). Without the field the grid is taken as square, said once."""
    import numpy as np

    from videoprism.checkpoint import load_flax_checkpoint
    from videoprism.train import stage2
    from videoprism.train.distill import Teacher

    from .conftest import golden_overrides

    with np.load(os.path.join(golden_dir, "params_clip.npz")) as f:
        arrays = {k: f[k] for k in f.files}
    key = "params/vision_encoder/spatial_pos_emb/emb_var"
    arrays[key] = np.random.default_rng(0).normal(size=(8 * 32, arrays[key].shape[1])).astype(np.float32)
    path = str(tmp_path / "grid_8x32.npz")
    np.savez(path, **arrays)
    with np.load(os.path.join(golden_dir, "inputs.npz")) as f:
        video = torch.from_numpy(f["video"])  # 72x72: a 4x4 grid, interpolated from the table's

    def official(grid):
        clip = videoprism.from_official("videoprism_lvt_v1_base", **{**golden_overrides(golden_config["clip"]),
                                        "pos_emb_shape": grid, "attention_backend": "reference"})
        return Teacher(load_flax_checkpoint(path, clip))(video)

    right, wrong = official((4, 8, 32)), official((4, 16, 16))
    assert not torch.allclose(right[0], wrong[0])  # the layout shows in the embeddings
    cfg = golden_config["clip"]
    shape = [f"model.{k}={cfg[k]}" for k in ("model_dim", "num_heads", "mlp_dim", "num_spatial_layers",
                                              "num_temporal_layers", "num_auxiliary_layers", "num_unimodal_layers",
                                              "vocabulary_size", "patch_size")]
    stage1 = [*shape, "model.resolution=36", "model.attention_backend=reference", f"model.init={path}"]
    teacher = ["model.num_frames=4", "model.resolution=36", f"stage2.teacher={path}"]
    capsys.readouterr()
    clip = build_clip(build_config("tiny", [*stage1, "model.pos_emb_shape=4,8,32"], 1).model, vocab=None,
                      device=torch.device("cpu"))
    s2 = build_config("tiny", [*teacher, "model.pos_emb_shape=4,8,32"], 2)
    assert s2.model.pos_emb_shape == "4,8,32"
    for got in (Teacher(clip)(video), stage2.build_teacher(s2, torch.device("cpu"))(video)):
        for a, b in zip(got, right):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert "note:" not in capsys.readouterr().err  # a grid set is no guess

    square = build_clip(build_config("tiny", stage1, 1).model, vocab=None, device=torch.device("cpu"))
    assert square.config.pos_emb_shape == (4, 16, 16)
    assert build_config("tiny", teacher, 2).model.pos_emb_shape == "4,16,16"
    notes = capsys.readouterr().err.splitlines()
    assert len(notes) == 2, notes  # once per stage
    for note, option in zip(notes, ("model.init", "stage2.teacher")):
        assert note == (f"note: {option}={path}: an .npz holds 256 positions per frame, not the grid's rows and "
                        "columns; taken as a square 16x16 grid, as the official ones are: for another set "
                        "model.pos_emb_shape=4,H,W with H*W=256")


def test_init_from_an_export_keeps_its_position_embedding_shape(tmp_path):
    """A random-init run sizes its position embeddings to its clips (here 4 x 4 x 4, not the
    official 16 x 16 x 16); a later run initialised from its export takes that shape from the
    file's metadata instead of failing on it."""
    trainer = make_trainer(tmp_path, "train.compile=false")
    path = str(tmp_path / "model.safetensors")
    trainer.task.export(trainer.model, path)
    assert trainer.task.model_config.pos_emb_shape == (4, 4, 4)
    mc = build_config("tiny", [*TINY, f"model.init={path}"], 1).model
    again = build_clip(mc, vocab=50, device=torch.device("cpu"))
    assert again.config.pos_emb_shape == (4, 4, 4)
    for k, v in trainer.task.module.clip.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


def test_an_init_of_another_shape_or_kind_is_refused_naming_the_fields_to_set(tmp_path):
    """model.init of an export of another width or vocabulary, or of a stage-2 student, is refused before the load
    with the model.* values that fit the file (its load said only one tensor's two shapes, or a few keys)."""
    trainer = make_trainer(tmp_path, "train.compile=false")
    path = str(tmp_path / "model.safetensors")
    trainer.task.export(trainer.model, path)
    cpu = torch.device("cpu")
    wide = build_config("tiny", [*TINY, "model.model_dim=32", f"model.init={path}"], 1).model
    with pytest.raises(ValueError, match=r"^model.init=.* holds a model of model.model_dim=16 and this run's config "
                                         r"builds model.model_dim=32: set model.model_dim=16$"):
        build_clip(wide, vocab=50, device=cpu)
    same = build_config("tiny", [*TINY, f"model.init={path}"], 1).model
    with pytest.raises(ValueError, match=r"model.vocabulary_size=50 .* builds model.vocabulary_size=60: set "):
        build_clip(same, vocab=60, device=cpu)  # another tokenizer's
    student = str(tmp_path / "student.safetensors")
    videoprism.save_safetensors(trainer.task.module.clip.vision_encoder, student)
    with pytest.raises(ValueError, match=r"holds a FactorizedEncoder; stage 1 starts from a video-text model"):
        build_clip(dataclasses.replace(same, init=student), vocab=50, device=cpu)
    build_clip(dataclasses.replace(wide, model_dim=16), vocab=50, device=cpu)  # the fix said loads


def launch_without_sync(trainer: Trainer, steps: int = 2) -> list[dict]:
    """Queue `steps` steps of a warm trainer on CUDA under torch's sync debug mode ("error": any host wait for
    the GPU raises, naming the op), then read them: the loop's pipelining rests on launch_step never waiting."""
    trainer.train_step()  # first calls: optimizer state, kernel compiles and tile searches may wait; not per step
    trainer.train_step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        pending = [trainer.launch_step() for _ in range(steps)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    recs = [trainer.read_step(p) for p in pending]
    # Reading a step's record waits for that step, not for the work queued after it (~1 s of GPU sleep here).
    first = trainer.launch_step()
    torch.cuda._sleep(2_000_000_000)
    t0 = time.perf_counter()
    trainer.read_step(first)
    waited = time.perf_counter() - t0
    behind = torch.cuda.Event()
    behind.record()
    assert not behind.query() and waited < 0.5, (waited, "read_step waited for work queued after its step")
    torch.cuda.synchronize()
    return recs


@pytest.mark.gpu
@pytest.mark.parametrize("optim", ["adamw", "adafactor"])
def test_gpu_stage1_step_is_queued_without_a_host_sync(tmp_path, optim):
    """bf16 autocast, the Triton attention kernels and token ops, both optimizers skipping on the device."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    dev = torch.device("cuda")
    cfg = build_config("tiny", [*TINY, "model.model_dim=32", "model.mlp_dim=64", f"train.out_dir={tmp_path}",
                                "train.device=cuda", "train.compile=false", "model.attention_backend=triton",
                                f"optim.name={optim}"], 1)
    torch.manual_seed(0)
    d = Dist(0, 1, dev)
    trainer = Trainer(cfg, Stage1Task(cfg, d, build_clip(cfg.model, vocab=50, device=dev), None), RandomClips(**CLIPS),
                      d, name="sync")
    recs = launch_without_sync(trainer)
    assert all(math.isfinite(r["loss"]) and not r["skipped"] for r in recs)


@pytest.mark.gpu
def test_gpu_compiled_triton_step_matches_eager(tmp_path):
    """On CUDA: the trainer's compiled step with the Triton attention kernels gives the losses
    of the eager plain-PyTorch step (fp32, 3 steps), with no graph break."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from torch._dynamo.utils import counters

    dev = torch.device("cuda")
    runs = {}
    for name, over in (("eager", ["model.attention_backend=reference", "train.compile=false"]),
                       ("compiled", ["model.attention_backend=triton", "train.compile=true"])):
        torch._dynamo.reset()
        counters.clear()
        # Head dim 16: the smallest the Triton kernels tile.
        cfg = build_config("tiny", [*TINY, "model.model_dim=32", "model.mlp_dim=64", f"train.out_dir={tmp_path}/{name}",
                                    "train.precision=fp32",
                                    "train.device=cuda", *over], 1)
        d = Dist(0, 1, dev)
        torch.manual_seed(0)
        clip = build_clip(cfg.model, vocab=50, device=dev)
        data = RandomClips(**CLIPS)
        trainer = Trainer(cfg, Stage1Task(cfg, d, clip, None), data, d, name=name)
        runs[name] = [trainer.train_step()["loss"] for _ in range(3)]
        assert sum(counters["graph_break"].values()) == 0
    assert runs["compiled"] == pytest.approx(runs["eager"], abs=2e-4)


@pytest.mark.parametrize("lit", [True, False])
def test_lit_on_a_random_video_encoder_is_said(tmp_path, capsys, lit):
    from videoprism.train import stage1

    cfg = build_config("tiny", [*TINY, f"train.out_dir={tmp_path}", "train.steps=1", "train.compile=false",
                                f"stage1.lit={str(lit).lower()}"], 1)
    stage1.run(cfg)
    said = "stage1.lit=true with model.init=random freezes a randomly initialised video encoder" in capsys.readouterr().out
    assert said == lit


def test_a_checkpoint_exports_as_its_run_exports_at_its_end(tmp_path, capsys):
    """`videoprism export`: the latest checkpoint's model is the run's own export, byte for byte; an earlier
    checkpoint's is the CLIP a resume from it loads (the oracle: ckpt.load into a fresh trainer). A run folder given
    to --checkpoint of embed/eval says to export it."""
    import videoprism
    from videoprism.cli import main
    from videoprism.train import checkpoint as ckpt

    results = make_trainer(tmp_path, "train.compile=false", "train.steps=2", "checkpoint.interval=1",
                           "checkpoint.keep=5", "train.eval_every=0", "checkpoint.export=true").fit()
    assert main(["export", str(tmp_path)]) == 0
    latest = tmp_path / "model.step_00000002.safetensors"
    assert f"wrote {latest}" in capsys.readouterr().out
    assert latest.read_bytes() == open(results["export"], "rb").read()
    first = str(tmp_path / "first.safetensors")
    assert main(["export", str(tmp_path / "checkpoints" / "step_00000001"), "--out", first]) == 0
    resumed = make_trainer(tmp_path / "elsewhere", "train.compile=false", "train.steps=2")
    ckpt.load(str(tmp_path / "checkpoints" / "step_00000001"), resumed.model, resumed.optimizer, trainer_keys=["step"])
    got = videoprism.model_from_safetensors(first).state_dict()
    want = resumed.task.module.clip.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert not all(torch.equal(got[k], videoprism.model_from_safetensors(str(latest)).state_dict()[k]) for k in got)
    step1 = tmp_path / "checkpoints" / "step_00000001"
    for given, folder in ((step1, step1), (tmp_path / "checkpoints", tmp_path / "checkpoints"),
                          (step1 / "rank0.pt", step1)):  # the last two said "is a folder" and "unknown type"
        with pytest.raises(videoprism.CheckpointError, match=f"videoprism export {folder}`"):
            videoprism.load_checkpoint(str(given), resumed.task.module.clip)
    # The export does not hold how it ran (the tiny preset's reference attention): the loader's device picks.
    assert videoprism.model_from_safetensors(str(latest)).config.attention_backend is None
    # README: torch's own converter turns a step folder into one torch.save file of plain tensors, the model's the
    # export's under the stage's prefix.
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(tmp_path / "checkpoints" / "step_00000002"), str(tmp_path / "step.pt"))
    state = torch.load(str(tmp_path / "step.pt"), weights_only=True)
    exported = videoprism.model_from_safetensors(str(latest)).state_dict()
    assert {"model", "optim", "trainer"} <= set(state)
    assert all(torch.equal(state["model"][f"clip.{k}"], v) for k, v in exported.items())


@pytest.mark.parametrize("damage", ["rank_file_cut", "metadata_cut", "tensors_cut"])
def test_a_damaged_checkpoint_exports_as_one_line_naming_the_one_before_it(tmp_path, capsys, damage):
    """`videoprism export` of a damaged checkpoint ended in a traceback (an UnpicklingError of the cut metadata, DCP's
    CheckpointException of a cut .distcp file); it is one line naming the file and the checkpoint before it to
    export, exit status 2, and writes nothing."""
    from videoprism.cli import main

    make_trainer(tmp_path, "train.compile=false", "train.steps=2", "checkpoint.interval=1").fit()
    step2 = tmp_path / "checkpoints" / "step_00000002"
    damage_file(step2, damage)
    capsys.readouterr()
    assert main(["export", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"error: checkpoint {step2} does not load (")
    assert err.endswith(f"a damaged file; export the checkpoint before it, videoprism export {step2.parent}/"
                        "step_00000001")
    assert not (tmp_path / "model.step_00000002.safetensors").exists()


def test_an_incomplete_checkpoint_folder_exports_as_one_line_naming_a_complete_one(tmp_path, capsys):
    """`videoprism export` of a save that did not finish (a step_*.tmp folder without its rank0.pt) or of a step
    folder whose rank0.pt is lost said only "[Errno 2] No such file or directory: '.../rank0.pt'". It names what the
    folder lacks and the complete checkpoint to export instead; for the .tmp, also the run folder whose export
    takes that one (its latest complete checkpoint)."""
    from videoprism.cli import main

    make_trainer(tmp_path, "train.compile=false", "train.steps=2", "checkpoint.interval=1", "checkpoint.keep=5").fit()
    root = tmp_path / "checkpoints"
    unfinished = root / "step_00000003.tmp"
    shutil.copytree(root / "step_00000002", unfinished)
    os.remove(unfinished / "rank0.pt")
    damage_file(root / "step_00000001", "rank_file")  # the first: nothing before it
    capsys.readouterr()
    for folder, said in ((unfinished, f"is incomplete: a save that did not finish (no rank0.pt): export the "
                                      f"checkpoint before it, videoprism export {root / 'step_00000002'} (the run's "
                                      f"latest complete checkpoint, which `videoprism export {tmp_path}` takes)"),
                         (root / "step_00000001", "is incomplete: rank0.pt lost: no complete checkpoint before it: "
                                                  "restore the file")):
        assert main(["export", str(folder)]) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"error: checkpoint {str(folder)!r} {said}", err
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "m.safetensors")]) == 0  # step 2: complete


def test_a_rank_file_of_another_structure_is_one_line_naming_it(tmp_path, capsys):
    """A rank0.pt that loads but does not hold what the trainer writes (hand-made, another program's; fuzzing found
    them) raised AttributeError (not a dict), TypeError (a 'world' of text), MemoryError (a 'world' of 10**12: that
    many rank files listed as lost), KeyError (versions without numpy) from the code reading it, as tracebacks. Each
    is a checkpoint that does not load, naming the file and the checkpoint before it."""
    from videoprism.cli import main

    make_trainer(tmp_path, "train.compile=false", "train.steps=2", "checkpoint.interval=1", "checkpoint.keep=5").fit()
    step2 = tmp_path / "checkpoints" / "step_00000002"
    good = torch.load(step2 / "rank0.pt", weights_only=False)
    capsys.readouterr()
    for bad, said in (([1, 2], "holds a list, not a rank's state"),
                      ({**good, "world": "2"}, "'world' is 2, not a number of ranks"),
                      ({**good, "world": 10 ** 12}, "'world' is 1000000000000, not a number of ranks"),
                      ({**good, "world": torch.tensor(1)}, "not a number of ranks"),
                      ({**good, "export": [1]}, "'export' is a list, not a dict"),
                      ({**good, "export": {}}, "'export' names no prefix"),
                      ({**good, "world": "x", "versions": {"torch": "1.0"}}, "it was written under torch 1.0 and "
                                                                             "numpy None")):
        torch.save(bad, step2 / "rank0.pt")
        assert main(["export", str(step2)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: checkpoint {step2} does not load (rank0.pt: ") and said in err, err
        assert "\n" not in err and f"videoprism export {step2.parent / 'step_00000001'}" in err, err


def test_ddp_on_one_process_runs_unwrapped_and_a_warmup_past_the_end_is_said(tmp_path, capsys):
    """parallel.mode=ddp in one process failed after the data was decoded ("Default process group has not been
    initialized"); it runs unwrapped, as fsdp and hsdp do. A warm-up longer than the run (the tiny preset's 30
    steps in a 3-step run; --config base train.steps=1000) never reaches optim.lr: the run says so."""
    from videoprism.train.optim import lr_at

    trainer = make_trainer(tmp_path, "train.compile=false", "train.steps=3", "parallel.mode=ddp",
                           "optim.warmup_steps=30")
    assert trainer.model is trainer.task.module
    trainer.fit()
    top = lr_at(2, trainer.cfg.optim, 3)
    assert f"warning: optim.warmup_steps=30 > train.steps=3: the learning rate stops at {top:.3g}" in \
        capsys.readouterr().out


def _save_with_numpy_module(state: dict, path, core: str) -> None:
    """torch.save of `state` with its numpy arrays pickled under `numpy.<core>.multiarray` (numpy 1.x writes
    `core`, numpy 2 `_core`), whichever numpy runs the test: the rank file another numpy wrote."""
    import io
    import pickle
    import types

    names = [b"numpy._core.multiarray", b"numpy.core.multiarray"]

    class Pickler(pickle.Pickler):
        def __init__(self, out, protocol=2, **kw):
            self.out, self.buf = out, io.BytesIO()
            super().__init__(self.buf, protocol=protocol, **kw)

        def dump(self, obj):
            super().dump(obj)
            data = self.buf.getvalue()
            for name in names:
                data = data.replace(name, b"@@")
            assert data.count(b"@@") == 1  # the one array: numpy's MT19937 key
            self.out.write(data.replace(b"@@", f"numpy.{core}.multiarray".encode()))

    torch.save(state, path, pickle_module=types.SimpleNamespace(Pickler=Pickler, __name__="pickle"))


@pytest.mark.parametrize("core", ["core", "_core"])
def test_a_rank_file_another_numpy_wrote_resumes_and_exports(tmp_path, capsys, core):
    """The rank files held numpy's RNG state as np.random.get_state()'s ndarray, which numpy 1.x pickles as
    numpy.core.multiarray._reconstruct and numpy 2 as numpy._core.multiarray._reconstruct (pyproject allows both):
    weights_only torch.load allowed this numpy's name only, so under the other one a --resume and `videoprism export`
    called the checkpoint damaged ("restore the file"). Such files load under either numpy, and the rank files
    written now hold no numpy object at all (they load with no global allowed), plus the versions that wrote them."""
    import numpy as np

    from videoprism.cli import main
    from videoprism.train import checkpoint as ckpt

    args = ("train.compile=false", "train.steps=2", "checkpoint.interval=1")
    make_trainer(tmp_path, *args).fit()
    step1 = tmp_path / "checkpoints" / "step_00000001"
    state = torch.load(step1 / "rank0.pt", weights_only=True)  # no numpy global in a new rank file
    assert state["versions"] == ckpt.versions() and isinstance(state["rng"]["numpy"][1], torch.Tensor)
    np.random.seed(3)
    legacy = {k: v for k, v in state.items() if k != "versions"}  # as the rank files were written before
    legacy["rng"] = dict(state["rng"], numpy=np.random.get_state())
    want = np.random.random_sample(4)
    _save_with_numpy_module(legacy, step1 / "rank0.pt", core)
    np.random.seed(0)
    trainer = make_trainer(tmp_path, *args)
    trainer.resume(str(step1))
    assert trainer.step == 1 and np.array_equal(np.random.random_sample(4), want)
    capsys.readouterr()
    assert main(["export", str(step1), "--out", str(tmp_path / "m.safetensors")]) == 0, capsys.readouterr().err


def written_by_other_versions(folder, part: str) -> None:
    """The checkpoint `folder` (one rank's) as torch 9.9.0 wrote it, in a format this torch does not read: its RNG
    states (`part` "rng") or its DCP metadata ("metadata")."""
    state = torch.load(folder / "rank0.pt", weights_only=True)
    state["versions"] = dict(state["versions"], torch="9.9.0")
    if part == "rng":
        state["rng"]["torch"] = state["rng"]["torch"][:100].clone()
    else:
        damage_file(folder, "metadata_cut")
    torch.save(state, folder / "rank0.pt")


@pytest.mark.parametrize("part", ["rng", "metadata"])
def test_a_checkpoint_of_other_versions_that_does_not_load_names_them_and_the_fix(tmp_path, part):
    """A checkpoint that torch or numpy of another version wrote in a format this one does not read: an RNG state
    torch.set_rng_state refuses ended the resume in a traceback; DCP metadata that does not unpickle was called a
    damaged file ("restore the file"). Each is one line naming the checkpoint, the versions that wrote it and this
    process's, and the fix: those versions, or its model exported under them as model.init of a new run."""
    from videoprism.train import checkpoint as ckpt

    args = ("train.compile=false", "train.steps=1", "checkpoint.interval=1")
    make_trainer(tmp_path, *args).fit()
    step1 = tmp_path / "checkpoints" / "step_00000001"
    written_by_other_versions(step1, part)
    with pytest.raises(ckpt.CheckpointReadError) as err:  # a ValueError: one line, exit status 2
        make_trainer(tmp_path, *args).resume(str(step1))
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"checkpoint {step1}")
    where = "(its weights load here; only the RNG states do not)" if part == "rng" else "under those versions"
    assert (f"it was written under torch 9.9.0, this is torch {torch.__version__}: resume it with the versions that "
            f"wrote it, or carry its model over: `videoprism export {step1}` {where}, then a new run here with "
            "model.init=THAT.safetensors") in msg
    assert ("the RNG states of rank0.pt do not restore" if part == "rng" else "if not that, a damaged file") in msg
