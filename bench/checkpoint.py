"""Checkpoint benchmark: how long a training step stalls for an interval checkpoint,
synchronous vs asynchronous (`checkpoint.async_save`), side by side in one run.

    python -m bench.checkpoint                                  # CPU, base LvT model + AdamW state
    python -m bench.checkpoint --device cuda --out bench/results/checkpoint_gpu.json

Each repeat saves the same state (fp32 weights and the two AdamW moments of a video-text
model) through the trainer's `Saver` into a fresh folder. "stall" is what the training loop
waits: the whole write when synchronous, the copy of the state to host memory when
asynchronous; "total" runs until the checkpoint is renamed into place. The modes alternate,
so page-cache and disk effects fall on both alike. stall_gbps = state bytes (fp32 weights + both
moments, GB = 1e9 bytes) / stall. No floor is measured: compare stall_gbps with the host's copy
bandwidth (asynchronous) or the disk's write bandwidth (synchronous).
"""
from __future__ import annotations

import shutil
import statistics
import sys
import tempfile
import time

import torch

import videoprism
from bench.common import Report, Timing, arg_parser, device_arg, out_json, positive_int
from videoprism.cli import run_command
from videoprism.config import CONFIGS, CLIPConfig
from videoprism.paths import make_folder
from videoprism.train import checkpoint as ckpt

VIDEO_TEXT = [name for name, (cls, _) in CONFIGS.items() if cls is CLIPConfig]


def main(argv: list[str] | None = None) -> int:
    """Bad arguments and inputs end the run with one `error: ...` line and exit status 2, not a traceback."""
    return run_command(_main, argv)


def _main(argv: list[str] | None) -> None:
    p = arg_parser("bench.checkpoint", __doc__)
    p.add_argument("--device", type=device_arg, default="cpu",
                   help="where the state lives: cpu or cuda (default: %(default)s)")
    p.add_argument("--model", default="videoprism_lvt_v1_base", choices=VIDEO_TEXT, metavar="NAME",
                   help=f"official video-text model name: {', '.join(VIDEO_TEXT)} (default: %(default)s)")
    p.add_argument("--reps", type=positive_int, default=3,
                   help="saves per mode, after one warm-up each (default: %(default)s)")
    p.add_argument("--dir", default=None, help="where to write (default: a temporary folder, removed after)")
    p.add_argument("--out", default=None, type=out_json, help="JSON output path")
    args = p.parse_args(argv)
    if args.dir:  # now, not after the model and its optimizer state are built
        make_folder(args.dir, f"--dir {args.dir}")
    device = args.device
    torch.manual_seed(0)
    model = videoprism.from_official(args.model).to(device)
    opt = torch.optim.AdamW(model.parameters())
    for prm in model.parameters():
        prm.grad = torch.zeros_like(prm)
    opt.step()  # creates both moments
    numel = sum(prm.numel() for prm in model.parameters())
    state_gb = 3 * 4 * numel / 1e9
    root = args.dir or tempfile.mkdtemp(prefix="bench_checkpoint_")
    report = Report("checkpoint", str(device), meta={"model": args.model, "params_m": round(numel / 1e6, 1),
                                                     "state_gb": round(state_gb, 3), "dir": root})
    stalls: dict[str, list[float]] = {"sync": [], "async": []}
    totals: dict[str, list[float]] = {"sync": [], "async": []}
    try:
        for rep in range(args.reps + 1):
            for mode in ("sync", "async"):
                saver = ckpt.Saver(f"{root}/{mode}{rep}", keep=1, async_save=mode == "async")
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                saver.save(1, model, opt, trainer_state={"step": 1}, rank_state={}, wait=False)
                t1 = time.perf_counter()
                saver.finish()
                t2 = time.perf_counter()
                shutil.rmtree(f"{root}/{mode}{rep}", ignore_errors=True)
                if rep:  # the first round warms the allocator, the page cache and DCP's planner
                    stalls[mode].append(t1 - t0)
                    totals[mode].append(t2 - t0)
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    stall_s = {}
    for mode in ("sync", "async"):
        stall = Timing.of([t * 1e3 for t in stalls[mode]])
        stall_s[mode] = stall.median_ms / 1e3
        report.add(mode=mode, state_gb=round(state_gb, 3), stall_s=round(stall.median_ms / 1e3, 3),
                   stall_p20_s=round(stall.p20_ms / 1e3, 3), stall_p80_s=round(stall.p80_ms / 1e3, 3),
                   stall_gbps=round(state_gb / (stall.median_ms / 1e3), 2),
                   total_s=round(statistics.median(totals[mode]), 3))
    sync, async_ = stall_s["sync"], stall_s["async"]
    report.meta["async_stall_reduction"] = round(sync / async_, 2)
    report.show()
    print(f"# the step stalls {sync:.2f} s for a synchronous checkpoint, {async_:.2f} s for an asynchronous one "
          f"({sync / async_:.1f}x less)")
    if args.out:
        report.save(args.out)


if __name__ == "__main__":
    sys.exit(main())
