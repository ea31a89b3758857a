"""Training-step benchmark of both stages: eager vs compiled vs compiled + Triton attention.

    python -m bench.train_step --device cuda --out bench/results/train_step_gpu.json
    python -m bench.train_step                      # CPU: tiny config, eager vs compiled

Each row times one optimizer step of the real trainer (`Trainer.launch_step`: masks, forward,
loss, backward, clipping, AdamW, queued without waiting for the GPU as the training loop runs
it) on a fixed random batch already on the device, so the
data path is out of the picture (the trainer reports data-wait separately). Modes:
  eager           attention "reference" (plain PyTorch math), no compile
  compiled        the same model with each transformer block under torch.compile(fullgraph=True) (the
                  trainer's train.compile), Inductor fusing the math
  compiled+triton torch.compile with the fused Triton attention kernels (attention "triton")
The token ops (patch gather, shuffle) use their device default in every mode (Triton on
CUDA, C++ on the CPU). bf16 autocast on GPU. Stage 2 rows time the teacher forward on every
token plus the student step (token + global decoders); they also time the teacher's forward
alone (teacher_ms, its share of the step and its own MFU), to tell which half misses a target.

MFU = step FLOPs (videoprism/flops.py, the formula of the trainer's MFU: visible tokens
only, teacher 1x, trained parts 3x) / step time / the card's measured matmul peak in the step's dtype
(bf16 on a GPU, fp32 on the CPU: the JSON's matmul_dtype); floor_ms = step FLOPs / that peak (the step at 100% MFU).
Rows run in order of importance; a row that would end past --budget-s (by the time the last row of
its stage and mode took, a stage-2 row before any: stage 1's) is skipped and listed in the
JSON, which is saved whole after every row. `--profile` adds where each row's time goes
(bench/step_profile.py): kernel time by kind, the top kernels and, on a GPU, the share of the
step the GPU is busy.
"""
from __future__ import annotations

import os
import sys
import time
import traceback

import torch

from bench.common import (Report, arg_parser, comma_list, device_arg, measure_peaks, non_negative_seconds, out_json,
                          positive_int, results_path, timeit)
from bench.step_profile import profile_calls, summary
from videoprism.cli import run_command
from videoprism.flops import video_tower_flops
from videoprism.train.config import PRESETS, build_config
from videoprism.train.data import RandomClips
from videoprism.train.distill import Teacher
from videoprism.train.metrics import peak_memory_gb
from videoprism.train.modeling import build_clip
from videoprism.train.parallel import Dist
from videoprism.train.stage1 import Stage1Task
from videoprism.train.stage2 import Stage2Task
from videoprism.train.trainer import Trainer

MODES = {"eager": ("reference", False), "compiled": ("reference", True), "compiled+triton": ("triton", True)}


class FixedBatch:
    """The same batch every step, no decoding: the video already on the device (as DALI hands it
    over), the tokenized text on the host (as the loader gives it; `prepare` trims and copies it,
    and trimming a device tensor would make the host wait for the GPU every step)."""

    def __init__(self, batch: dict):
        self.batch = batch

    def next_batch(self, step: int) -> dict:
        return self.batch

    def state_dict(self) -> dict:
        return {}


def make_trainer(stage: int, preset: str, *, frames: int, batch: int, mode: str, device: torch.device) -> Trainer:
    backend, compile_ = MODES[mode]
    cfg = build_config(preset, [f"model.num_frames={frames}", f"model.attention_backend={backend}",
                                f"train.compile={compile_}", f"train.global_batch={batch}", "optim.name=adamw",
                                "optim.warmup_steps=0", "train.out_dir=/tmp/bench_train_step"], stage)
    d = Dist(0, 1, device)
    torch.manual_seed(0)
    clip = build_clip(cfg.model, vocab=None, device=device)
    src = RandomClips(micro_batch=batch, rank=0, world=1, frames=frames, resolution=cfg.model.resolution,
                      vocab=clip.config.vocabulary_size, seed=0, text_length=64)
    data = FixedBatch({k: v.to(device) if k == "video" else v for k, v in src.next_batch(0).items()})
    if stage == 1:
        task = Stage1Task(cfg, d, clip, None)
    else:
        task = Stage2Task(cfg, d, Teacher(clip), None)
    return Trainer(cfg, task, data, d, name=f"stage{stage}")


def bench_row(stage, preset, frames, batch, mode, device, peak, reps, profile):
    trainer = make_trainer(stage, preset, frames=frames, batch=batch, mode=mode, device=device)
    t0 = time.perf_counter()
    trainer.train_step()  # compiles, if it will
    trainer.train_step()
    warm_s = time.perf_counter() - t0
    inputs = trainer.task.prepare(trainer.data.next_batch(0), 0, 0)
    flops, tokens = float(trainer.task.flops(inputs)), trainer.task.tokens(inputs)
    # launch_step, as the training loop runs it: nothing in it waits for the GPU, so the host queues the
    # next step while this one runs (the loop reads each step's record one step later).
    t = timeit(trainer.launch_step, device, warmup=1, reps=reps, warmup_ms=1, rep_ms=reps * 400)
    mem = None
    if device.type == "cuda":  # two plain steps: do_bench's 256 MB L2-flush buffer is not the step's memory
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        trainer.launch_step()
        trainer.launch_step()
        torch.cuda.synchronize(device)
        mem = peak_memory_gb(device)
    s = t.median_ms * 1e-3
    row = dict(stage=stage, preset=preset, frames=frames, batch=batch, mode=mode,
               # 4 significant digits: 3 decimals showed a tiny CPU step (0.54 GFLOP) as 0.001 TFLOP.
               tflop_per_step=float(f"{flops / 1e12:.4g}"),
               clips_per_s=round(batch / s, 2), tokens_per_s=round(tokens / s),
               floor_ms=round(flops / (peak * 1e12) * 1e3, 3), mfu_pct=round(100 * flops / s / (peak * 1e12), 1),
               peak_mem_gb=None if mem is None else round(mem, 2), warmup_s=round(warm_s, 1))
    if stage == 2:
        # Where a stage-2 step goes: the frozen teacher's forward alone on the same clips (the
        # rest is the student, its decoders and the optimizer), with its own MFU.
        video, teacher = inputs["video"], trainer.task.teacher
        with trainer._amp():
            tt = timeit(lambda: teacher(video), device, warmup=1, reps=reps, warmup_ms=1, rep_ms=reps * 200)
        tf = video_tower_flops(trainer.task.model_config, batch, frames, trainer.task.num_patches)
        row.update(teacher_ms=round(tt.median_ms, 2), teacher_pct_of_step=round(100 * tt.median_ms / t.median_ms, 1),
                   teacher_mfu_pct=round(100 * tf / (tt.median_ms * 1e-3) / (peak * 1e12), 1))
    # After the timing (the profiler's own overhead stays out of the numbers above).
    prof = profile_calls(trainer.launch_step, device) if profile else None
    del trainer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return t, row, prof


def main(argv=None) -> int:
    """Bad arguments and inputs end the run with one `error: ...` line and exit status 2, not a traceback."""
    return run_command(_main, argv)


def _main(argv) -> None:
    p = arg_parser("bench.train_step", __doc__)
    p.add_argument("--device", type=device_arg, default="cpu", help="cpu or cuda (default: %(default)s)")
    p.add_argument("--preset", default=None, choices=PRESETS,
                   help="config preset (default: base on CUDA, tiny on the CPU)")
    p.add_argument("--frames", type=comma_list(item=positive_int), default=None,
                   help="comma-separated frame counts (default: 16,8 on CUDA, 8 on CPU)")
    p.add_argument("--batch", type=positive_int, default=None, help="clips per step (default: 16 on CUDA, 8 on CPU)")
    p.add_argument("--modes", type=comma_list(MODES), default=None,
                   help=f"comma-separated from {', '.join(MODES)} (default: all on CUDA, eager,compiled on CPU)")
    p.add_argument("--stages", type=comma_list(("1", "2"), int), default="1,2",
                   help="comma-separated training stages, 1 and/or 2 (default: %(default)s)")
    p.add_argument("--reps", type=positive_int, default=5,
                   help="timed steps per row on the CPU; the GPU uses do_bench (default: %(default)s)")
    p.add_argument("--profile", action="store_true",
                   help="after timing each row, profile 2 steps: its kernel time by kind (attention, matmul, "
                        "Inductor-fused, token ops, optimizer, comm, memcpy, other; bench/step_profile.py), the top "
                        "kernels, and on a GPU the share of the step the GPU is busy; in the JSON and a time_split "
                        "column")
    p.add_argument("--budget-s", type=non_negative_seconds, default=540,
                   help="start no row that would end after this many seconds, by the time the last row of "
                        "its stage and mode took (stage 2 before any: stage 1's) (default: %(default)s)")
    p.add_argument("--out", default=None, type=out_json,
                   help="JSON path (default: bench/results/train_step_<cpu|gpu>.json)")
    args = p.parse_args(argv)

    device = args.device
    args.out = args.out or results_path("train_step", device)
    cuda = device.type == "cuda"
    preset = args.preset or ("base" if cuda else "tiny")
    frames = args.frames or ([16, 8] if cuda else [8])
    batch = args.batch or (16 if cuda else 8)
    modes = args.modes or (["eager", "compiled", "compiled+triton"] if cuda else ["eager", "compiled"])
    peaks = measure_peaks(device)
    report = Report("train step", str(device), meta={"preset": preset, "batch": batch, **peaks,
                                                       "mixed_precision": "bf16 autocast" if cuda else "fp32",
                                                       "triton_tile_search": os.environ.get("VIDEOPRISM_TRITON_AUTOTUNE",
                                                                                            "1") == "1"})
    # Most important first: the stage-1 and stage-2 targets at the largest frame count.
    plan = [(s, f, m) for f in frames for s in args.stages for m in (modes if s == 1 else reversed(modes))]
    start, skipped = time.perf_counter(), []
    took: dict[tuple[int, str], float] = {}  # (stage, mode) -> seconds its last row took (compile, timing, profile)

    def estimate(stage: int, mode: str) -> float:
        # A stage-2 row before any of its own: stage 1's. A row's time is mostly its compile, not its FLOPs,
        # and a row skipped here returns no more than one the caller's time box cuts: guessing high (it was
        # 2x) skipped stage 2's compiled row, the one its two targets need, to run its eager row instead.
        return took.get((stage, mode), took.get((1, mode), 0.0) if stage == 2 else 0.0)

    def save():  # after every row, complete: a run cut by its time box keeps what it measured
        _ratios(report)
        report.meta["skipped"] = skipped
        report.save(args.out)

    for stage, f, mode in plan:
        elapsed = time.perf_counter() - start
        if elapsed + estimate(stage, mode) > args.budget_s:
            skipped.append(f"stage{stage} {f} frames {mode}: over --budget-s {args.budget_s:g} "
                           f"({elapsed:.0f} s spent, the row would take ~{estimate(stage, mode):.0f} s)")
            save()
            continue
        # Each row compiles as a fresh process would: Dynamo remembers the shapes of earlier rows
        # (per code object) and would compile a row with other frames or text length for dynamic
        # shapes (checked: the second frame count got symbolic T).
        torch._dynamo.reset()
        try:
            t, row, prof = bench_row(stage, preset, f, batch, mode, device, peaks["matmul_tflops"], args.reps,
                                     args.profile)
        except Exception as e:  # noqa: BLE001 - one failing row (a compile error on a new card) must not cost the others
            first = str(e).splitlines()[0] if str(e) else ""
            if isinstance(e, torch.OutOfMemoryError):
                why = f"out of memory ({first})"
            else:
                traceback.print_exc()
                why = f"failed: {type(e).__name__}: {first[:200]}"
            skipped.append(f"stage{stage} {f} frames {mode}: {why}")
            save()
            if cuda:
                torch.cuda.empty_cache()
            continue
        took[(stage, mode)] = time.perf_counter() - start - elapsed
        if prof:
            row["time_split"] = summary(prof)
            report.meta.setdefault("profiles", {})[f"stage{stage} {f} frames {mode}"] = prof
        report.add(t, **row)
        save()
    report.show()
    for label, prof in report.meta.get("profiles", {}).items():
        print(f"# {label}: top kernels ({'device' if cuda else 'CPU self'} ms per step, share, kind)")
        for name, ms, pct, kind in prof["top"][:6]:
            print(f"#   {ms:9.3f}  {pct:5.1f}%  {kind:9s}  {name[:90]}")


def _ratios(report: Report) -> None:
    """Speed-ups against eager and the stage-2 / stage-1 step-time ratio, per frame count."""
    ms = {(r["stage"], r["frames"], r["mode"]): r["ms"] for r in report.rows}
    for r in report.rows:
        eager = ms.get((r["stage"], r["frames"], "eager"))
        if eager:
            r["speedup_vs_eager"] = round(eager / r["ms"], 2)
        if r["stage"] == 2 and (1, r["frames"], r["mode"]) in ms:
            r["stage2_over_stage1"] = round(r["ms"] / ms[(1, r["frames"], r["mode"])], 2)


if __name__ == "__main__":
    sys.exit(main())
