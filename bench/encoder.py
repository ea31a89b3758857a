"""Encoder forward throughput: eager vs torch.compile, per attention backend.

    python -m bench.encoder                         # CPU: base, [1, 16, 288, 288, 3] fp32
    python -m bench.encoder --device cuda --dtype bfloat16 --batch 8 --backends sdpa,triton,flex

Prints device, shapes, dtype, median and spread (p20-p80) per row, the FLOPs of one
forward (videoprism/flops.py, the formula the trainer's MFU uses), its floor (FLOPs over the
card's measured matmul peak: floor_ms) and the achieved share of that peak; writes JSON.
"""
from __future__ import annotations

import sys

import torch

import videoprism as vp
from bench.common import (Report, arg_parser, comma_list, device_arg, measure_peaks, out_json, positive_int,
                          results_path, timeit)
from videoprism.cli import run_command
from videoprism.config import CONFIGS, EncoderConfig, official_config
from videoprism.flops import encoder_flops
from videoprism.ops.attention import BACKENDS

ENCODERS = [name for name, (cls, _) in CONFIGS.items() if cls is EncoderConfig]


def main(argv=None) -> int:
    """Bad arguments and inputs end the run with one `error: ...` line and exit status 2, not a traceback."""
    return run_command(_main, argv)


def _main(argv) -> None:
    p = arg_parser("bench.encoder", __doc__)
    p.add_argument("--model", default="videoprism_v1_base", choices=ENCODERS, metavar="NAME",
                   help=f"official encoder name: {', '.join(ENCODERS)} (default: %(default)s)")
    p.add_argument("--device", type=device_arg, default="cpu", help="cpu or cuda (default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="model and input dtype (default: %(default)s)")
    p.add_argument("--batch", type=positive_int, default=1, help="clips per forward (default: %(default)s)")
    p.add_argument("--frames", type=positive_int, default=16, help="frames per clip (default: %(default)s)")
    p.add_argument("--resolution", type=positive_int, default=288,
                   help="square frame size in pixels (default: %(default)s)")
    p.add_argument("--backends", type=comma_list(BACKENDS), default="reference",
                   help=f"comma-separated attention backends from {', '.join(BACKENDS)} (default: %(default)s)")
    p.add_argument("--modes", type=comma_list(("eager", "compile")), default="eager,compile",
                   help="comma-separated: eager, compile (default: %(default)s)")
    p.add_argument("--reps", type=positive_int, default=5,
                   help="timed repeats on the CPU; the GPU uses do_bench (default: %(default)s)")
    p.add_argument("--out", default=None, type=out_json,
                   help="JSON path (default: bench/results/encoder_<cpu|gpu>.json)")
    args = p.parse_args(argv)
    patch = official_config(args.model).patch_size
    if args.resolution % patch:  # else the first forward fails, after the peaks are measured and the model built
        p.error(f"--resolution {args.resolution}: must be a multiple of the patch size {patch}, "
                f"e.g. {max(1, args.resolution // patch) * patch}")

    device = args.device
    args.out = args.out or results_path("encoder", device)
    dtype = getattr(torch, args.dtype)
    shape = (args.batch, args.frames, args.resolution, args.resolution, 3)
    torch.manual_seed(0)
    video = torch.rand(shape, device=device)
    peaks = measure_peaks(device, dtype)
    report = Report("encoder forward", str(device), meta={"model": args.model, "shape": list(shape),
                                                          "dtype": args.dtype, **peaks})
    for backend in args.backends:
        # SDPA has no soft-cap: it runs the same shapes with the cap off (a speed reference only).
        cap = {"atten_logit_cap": 0.0} if backend == "sdpa" else {}
        model = vp.from_official(args.model, attention_backend=backend, device=device, dtype=dtype, **cap).eval()
        cfg = model.config
        n = (args.resolution // cfg.patch_size) ** 2
        flops = encoder_flops(cfg, args.batch, args.frames, n)
        for mode in args.modes:
            fn = torch.compile(model) if mode == "compile" else model
            with torch.no_grad():
                t = timeit(lambda: fn(video.to(dtype)), device, warmup=2, reps=args.reps)
            tflops = flops / (t.median_ms * 1e-3) / 1e12
            report.add(t, backend=backend, mode=mode, cap=model.config.atten_logit_cap, gflop=round(flops / 1e9, 1),
                       floor_ms=round(flops / (peaks["matmul_tflops"] * 1e12) * 1e3, 3),
                       tflops=round(tflops, 3), pct_peak=round(100 * tflops / peaks["matmul_tflops"], 1),
                       clips_per_s=round(args.batch / (t.median_ms * 1e-3), 3))
    report.show()
    rows = {(r["backend"], r["mode"]): r["ms"] for r in report.rows}
    for backend in args.backends:
        if (backend, "eager") in rows and (backend, "compile") in rows:
            print(f"{backend}: compile speed-up over eager {rows[(backend, 'eager')] / rows[(backend, 'compile')]:.2f}x")
    report.save(args.out)


if __name__ == "__main__":
    sys.exit(main())
