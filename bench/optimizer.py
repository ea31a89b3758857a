"""Optimizer-step benchmark: fused AdamW, torch.optim.Adafactor and ours (train/adafactor.py),
side by side in one run over the trainable parameters of a video-text model.

    python -m bench.optimizer                                   # CPU, base LvT model
    python -m bench.optimizer --device cuda --out bench/results/optimizer_gpu.json

Each row times `optimizer.step()` on the model's parameters with fixed random gradients (state
already created by a first step). `host_syncs` counts the times one step makes the host wait
for the GPU (torch's sync debug mode; CUDA only): torch's Adafactor reads three scalars per
parameter back, ours none, so only there does the GPU's queue run dry inside the step.
`aten_ops` counts the ops one step dispatches (a TorchDispatchMode): the host's share of a step,
which on a GPU is about one launch each and can outlast the kernels of a small step.
Floor: the bytes a step must move over the measured copy bandwidth (AdamW: read p, g, m, v and
write p, m, v, 28 bytes per fp32 parameter; Adafactor: read g three times and p twice, write
p, 24 bytes per parameter, its factored state being O(rows + columns); with momentum and absolute
steps p is read once and M read and written, 28 bytes). On a CPU the copy
bandwidth is measured on one 64 MB copy, which a multi-threaded fused kernel can beat: a row
above 100% of its floor there says the floor is loose, not that the step beat memory.
"""
from __future__ import annotations

import sys
import warnings

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import videoprism
from bench.common import Report, arg_parser, device_arg, measure_peaks, out_json, timeit
from videoprism.cli import run_command
from videoprism.config import CONFIGS, CLIPConfig
from videoprism.train.adafactor import Adafactor

VIDEO_TEXT = [name for name, (cls, _) in CONFIGS.items() if cls is CLIPConfig]
# name -> (optimizer factory, bytes moved per parameter element by one step)
OPTIMIZERS = {
    "adamw (fused)": (lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True), 7),
    "torch.optim.Adafactor": (lambda ps: torch.optim.Adafactor(ps, lr=1e-4), 6),
    # Ours both ways (the device's default is stacked on a GPU, per parameter on the CPU): launches vs copies.
    "adafactor (ours, per parameter)": (lambda ps: Adafactor(ps, lr=1e-4, stack=False), 6),
    "adafactor (ours, stacked)": (lambda ps: Adafactor(ps, lr=1e-4, stack=True), 6),
    # The CoCa-style switches, the device's default layout: M read and written, p's norm not read.
    "adafactor (ours, momentum 0.9, absolute step)": (
        lambda ps: Adafactor(ps, lr=1e-4, momentum=0.9, relative_step=False), 7),
}


def host_syncs(fn, device: torch.device) -> int | None:
    """How many times one call of fn makes the host wait for the GPU (None on the CPU)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def aten_ops(fn) -> int:
    """How many aten ops one call of fn dispatches: the host's work per step, on any device (each one a
    dispatch, and on a GPU about one kernel launch)."""
    with _CountOps() as c:
        fn()
    return c.n


def main(argv: list[str] | None = None) -> int:
    """Bad arguments and inputs end the run with one `error: ...` line and exit status 2, not a traceback."""
    return run_command(_main, argv)


def _main(argv: list[str] | None) -> None:
    p = arg_parser("bench.optimizer", __doc__)
    p.add_argument("--device", type=device_arg, default="cpu", help="cpu or cuda (default: %(default)s)")
    p.add_argument("--model", default="videoprism_lvt_v1_base", choices=VIDEO_TEXT, metavar="NAME",
                   help=f"official video-text model name: {', '.join(VIDEO_TEXT)} (default: %(default)s)")
    p.add_argument("--out", default=None, type=out_json, help="JSON output path")
    args = p.parse_args(argv)
    device = args.device
    torch.manual_seed(0)
    params = [prm for prm in videoprism.from_official(args.model).to(device).parameters() if prm.requires_grad]
    numel = sum(prm.numel() for prm in params)
    peaks = measure_peaks(device)
    report = Report("optimizer step", str(device), meta={"model": args.model, "params_m": round(numel / 1e6, 1),
                                                         "tensors": len(params), "copy_gbps": peaks["copy_gbps"]})
    for name, (make, words) in OPTIMIZERS.items():
        for prm in params:
            prm.grad = torch.randn_like(prm) * 1e-3
        opt = make(params)
        opt.step()  # creates the state
        t = timeit(opt.step, device, warmup=1, reps=5, warmup_ms=50, rep_ms=500)
        floor_ms = words * 4 * numel / (peaks["copy_gbps"] * 1e9) * 1e3
        report.add(t, optimizer=name, host_syncs=host_syncs(opt.step, device), aten_ops=aten_ops(opt.step),
                   floor_ms=round(floor_ms, 3),
                   pct_of_floor=round(100 * floor_ms / t.median_ms, 1))
        del opt
        base = {r["optimizer"]: r["ms"] for r in report.rows}.get("torch.optim.Adafactor")
        for r in report.rows if base else ():
            r["speedup_vs_torch_adafactor"] = round(base / r["ms"], 2)
        if args.out:  # after every row: a run cut by its time box keeps what it measured
            report.save(args.out)
    report.show()


if __name__ == "__main__":
    sys.exit(main())
