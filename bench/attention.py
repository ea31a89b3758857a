"""Factorized attention: every backend side by side at VideoPrism's shapes.

    python -m bench.attention --device cuda                 # bf16, B/L/g shapes, JSON + PNG
    python -m bench.attention --tiny                        # CPU smoke test (seconds)

Cases (per model: heads H and head dim Dh of VideoPrism B 12x64, L 16x64, g 16x88), for a
batch of B clips of T frames on an N = 16x16 patch grid:
  space  B*T sequences of K tokens: K = 256 (full frame), 128 and 90 (50% / 65% masked).
  time   B*N sequences of T = 16 and 8 frames (identity pos), B*128 of stage 1's tube mask
         (the same 128 visible locations in every frame), and the masked time axis
         (K = 90 visible tokens per frame, a random visible set per frame, so the sequences
         are the frames where each location is visible). A search the Triton kernels run
         here is kept on disk and reused by bench.train_step's rows (the keys: K, flags).
Backends: eager math ("reference", fp32 softmax), "sdpa" (cap 0; the time axis goes through
permuted views), "flex" (cap 50, compiled; on the masked time axis each call also builds its
block mask over the T*K tokens of a clip), "flash" and xformers (if installed; cap 50 / 0,
the time axis copied to sequence-major order), "triton" (cap 50). Modes: fwd, and fwd+bwd
(the qkv gradient). The JSON is rewritten after every case. Triton rows on a GPU also record
the tiles each kernel ran with ("tiles": the search's pick, or the fixed default with
--no-autotune), from which the fixed defaults are set.

Work and traffic, per call (E = B*T*K tokens, n_l = frames where location l is visible):
  FLOPs fwd  = 4 * H * Dh * sum over sequences of S_q * S_k  (QK^T and PV; softmax not counted)
               space: B*T * K^2;  time: B*N * T^2;  masked time: sum_l n_l^2
  FLOPs bwd  = 2 x fwd (dV, dP, dQ, dK), so fwd+bwd = 3 x fwd (recomputation not counted).
  bytes fwd  = 4 * E * H * Dh * elt   (read q, k, v; write o: the least any kernel can move)
  bytes bwd  = 8 * E * H * Dh * elt on the space axis (read q, k, v, o, do; write dq, dk, dv:
               delta = rowsum(o * do) needs o, as a key-tiled kernel cannot hold a whole row),
               7 * E * H * Dh * elt on the time axis (a sequence fits one tile, so delta =
               rowsum(p * dp) there and o is not read)
  specials   = (1 + cap) * sum of S_q * S_k * H  exp2 (+ tanh with the cap) per fwd; 2 x in
               fwd+bwd (the backward recomputes them once; ours, in two kernels, twice)
  floor      = max(FLOPs / matmul peak, bytes / copy peak, specials / exp2 peak), all measured
               in this run, the matmul peak in the run's dtype (bench/exp2_peak.py; on the CPU the
               last term is left out);
               pct_floor = floor / time (100% = at the roofline). At head dim 64 (H200, measured
               peaks) the capped exp2/tanh term is ~1.5x the matmul term in fwd (2 MUFU ops against
               4 * Dh FLOPs a score) and ~1x in fwd+bwd (4 against 12 * Dh); at base, K = 256 the
               bytes term is as large in fwd and 1.5x larger in fwd+bwd, and below K = 256 it
               dominates (bytes grow with K, the other two with K^2).
Two times on CUDA: `ms`, do_bench of the eager call (host dispatch included: the custom op,
the Triton launcher, flex's compiled wrapper), and `dev_ms`, the same call replayed from a
CUDA graph (bench/common.py `device_timing`; `--no-graph` skips it), the time a step whose host
runs ahead of the GPU sees. Where a kernel takes less than its call's host work, `ms` is
the host's: the H200 run of 1ab87c7 timed triton space fwd at K = 128 and K = 90 and flex
at K = 128 all at 0.196 ms, whatever their work. dev_tflops and dev_pct_floor are of
dev_ms; the printed speed-ups use dev_ms where both rows have it, else both rows' ms
(each ratio says which: "dev" or "call").
"""
from __future__ import annotations

import os
import sys
import time

import torch

from bench.common import (Report, arg_parser, comma_list, device_arg, device_timing, measure_peaks,
                          non_negative_seconds, out_json, positive_int, results_path, timeit)
from bench.exp2_peak import exp2_peak_gops
from videoprism.cli import run_command
from videoprism.flops import temporal_pairs
from videoprism.ops.attention import factorized_attention

MODELS = {"base": (12, 64), "large": (16, 64), "giant": (16, 88)}
BACKENDS = ("reference", "sdpa", "flex", "flash", "xformers", "triton")


def _xformers(qkv, *, axis, softcap, pos, **_):
    import xformers.ops as xops

    if softcap > 0 or pos is not None:
        raise ValueError("xformers has no soft-cap and no pos map")
    B, T, K, _, H, Dh = qkv.shape
    if axis == "space":
        q, k, v = qkv.flatten(0, 1).unbind(2)                              # [B*T, K, H, Dh] views
        return xops.memory_efficient_attention(q, k, v).view(B, T, K, H, Dh)
    q, k, v = qkv.transpose(1, 2).reshape(B * K, T, 3, H, Dh).unbind(2)    # copy to sequence-major
    return xops.memory_efficient_attention(q, k, v).view(B, K, T, H, Dh).transpose(1, 2)


def _available(name: str) -> bool:
    try:
        __import__({"flash": "flash_attn", "xformers": "xformers"}.get(name, "torch"))
        return True
    except ImportError:
        return False


def cases(batch: int, grid: int, frames: tuple[int, ...], visible: tuple[int, ...], gen: torch.Generator):
    """(axis, label, T, K, pos, sequences, sum of S_q*S_k over sequences), the cases of the
    issue's targets first (a time box may cut the tail)."""
    N = grid * grid
    T0 = frames[0]
    K = visible[-1]
    pos = torch.stack([torch.stack([torch.randperm(N, generator=gen)[:K].sort().values for _ in range(T0)])
                       for _ in range(batch)])
    pairs = round(float(temporal_pairs(pos, T0, K, N)) * batch)                          # sum of n_l^2
    seqs = sum(int(torch.unique(p).numel()) for p in pos)                                # locations seen
    out = [("space", f"K={N}", T0, N, None, batch * T0, batch * T0 * N * N),
           ("time", f"T={T0}", T0, N, None, batch * N, batch * N * T0 * T0),
           ("time", f"T={T0} K={K} masked", T0, K, pos, seqs, pairs)]
    out += [("space", f"K={k} masked", T0, k, None, batch * T0, batch * T0 * k * k) for k in visible[::-1]]
    # Stage 1's tube mask: the same visible columns in every frame, the identity time axis over them.
    k1 = visible[0]
    out += [("time", f"T={T0} K={k1} tube", T0, k1, None, batch * k1, batch * k1 * T0 * T0)]
    out += [("time", f"T={t}", t, N, None, batch * N, batch * N * t * t) for t in frames[1:]]
    return out


def main(argv=None) -> int:
    """Bad arguments and inputs end the run with one `error: ...` line and exit status 2, not a traceback."""
    return run_command(_main, argv)


def _main(argv) -> None:
    p = arg_parser("bench.attention", __doc__)
    p.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda (default here: %(default)s; cuda wherever one is available)")
    p.add_argument("--dtype", default=None, choices=("bfloat16", "float16", "float32"),
                   help="q, k, v dtype (default: bfloat16 on CUDA, float32 on the CPU)")
    p.add_argument("--models", type=comma_list(MODELS), default=None,
                   help=f"comma-separated from {list(MODELS)} (default: base,giant,large; not with --tiny)")
    p.add_argument("--batch", type=positive_int, default=None, help="clips per call (default: 16; not with --tiny)")
    p.add_argument("--backends", type=comma_list(BACKENDS), default=",".join(BACKENDS),
                   help="comma-separated attention backends; unavailable ones are skipped (default: %(default)s)")
    p.add_argument("--modes", type=comma_list(("fwd", "fwd+bwd")), default="fwd,fwd+bwd",
                   help="comma-separated: fwd, fwd+bwd (default: %(default)s)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: batch 1, 4x4 grid, 4 frames, 2 heads")
    p.add_argument("--budget-s", type=non_negative_seconds, default=110.0,
                   help="stop starting new cases after this many seconds; the GPU script has a time box "
                        "(default: %(default)s)")
    p.add_argument("--no-autotune", action="store_true",
                   help="use the Triton kernels' fixed default tile configs instead of the tile search (the "
                        "library's default on a GPU; VIDEOPRISM_TRITON_AUTOTUNE=0 turns it off there too)")
    p.add_argument("--no-graph", action="store_true",
                   help="skip the CUDA-graph device times (dev_ms): the eager call times only")
    p.add_argument("--out", default=None, type=out_json,
                   help="JSON path (default bench/results/attention_<cpu|gpu>.json)")
    p.add_argument("--png", default=None, help="chart path (default: the JSON path with .png)")
    args = p.parse_args(argv)
    if args.tiny and (args.models or args.batch):
        # --tiny fixes the model and the batch: an ignored --models or --batch would look honoured in the rows.
        p.error("--tiny times its own 2-head model at batch 1: leave out --models and --batch, or --tiny")

    if args.no_autotune:
        from videoprism.kernels import factorized_attention_space

        factorized_attention_space.AUTOTUNE = False
    device = args.device
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    out = args.out or results_path("attention", device, "_tiny" if args.tiny else "")
    models = {"tiny": (2, 16)} if args.tiny else {m: MODELS[m] for m in args.models or ("base", "giant", "large")}
    batch, grid, frames, visible = (1, 4, (4, 2), (8, 6)) if args.tiny else (args.batch or 16, 16, (16, 8), (128, 90))
    backends = [b for b in args.backends if b in ("reference", "sdpa", "flex", "triton") or _available(b)]
    t_start = time.perf_counter()
    peaks = {**measure_peaks(device, dtype), "exp2_gops": exp2_peak_gops(device)}
    elt = torch.finfo(dtype).bits // 8
    report = Report("factorized attention", str(device), meta={
        "dtype": str(dtype).replace("torch.", ""), "batch": batch, "grid": grid, "backends": backends,
        "triton_autotune": not args.no_autotune, **peaks})
    gen = torch.Generator().manual_seed(0)
    skipped = []
    for model, (H, Dh) in models.items():
        for axis, label, T, K, pos, n_seq, sq_sk in cases(batch, grid, frames, visible, gen):
            if time.perf_counter() - t_start > args.budget_s:
                skipped.append(f"{model} {axis} {label}")
                continue
            qkv = torch.randn(batch, T, K, 3, H, Dh, device=device, dtype=dtype)
            do = torch.randn(batch, T, K, H, Dh, device=device, dtype=dtype)
            pos_d = None if pos is None else pos.to(device)
            tokens = batch * T * K
            flops_fwd = 4 * H * Dh * sq_sk
            unit = tokens * H * Dh * elt          # one [E, H, Dh] tensor
            bwd_units = 8 if axis == "space" else 7
            for backend in backends:
                cap = 0.0 if backend in ("sdpa", "xformers") else 50.0
                kw = dict(axis=axis, softcap=cap, pos=pos_d)
                if backend == "xformers":
                    call = lambda x, kw=kw: _xformers(x, **kw)  # noqa: E731
                else:
                    call = lambda x, kw=kw, be=backend: factorized_attention(x, backend=be, **kw)  # noqa: E731
                for mode in args.modes:
                    row = dict(model=model, axis=axis, case=label, H=H, Dh=Dh, T=T, K=K, seqs=n_seq, backend=backend,
                               cap=cap, mode=mode)
                    bwd = mode == "fwd+bwd"
                    x = qkv.detach().requires_grad_(bwd)

                    def fn(x=x, bwd=bwd, call=call, do=do):
                        if not bwd:
                            with torch.no_grad():
                                return call(x)
                        return torch.autograd.grad(call(x), x, do)

                    try:
                        fn()                                   # compile / autotune outside the timing
                    except (ValueError, NotImplementedError, RuntimeError) as e:
                        report.add(**row, note=f"n/a: {str(e).splitlines()[0][:90]}")
                        continue
                    t = timeit(fn, device, warmup=1, reps=3 if device.type == "cpu" else 10)
                    flops = flops_fwd * (3 if bwd else 1)
                    nbytes = unit * (4 + bwd_units if bwd else 4)
                    s = t.median_ms * 1e-3
                    specials = (1 + (cap > 0)) * H * sq_sk * (2 if bwd else 1)
                    floor = max(flops / (peaks["matmul_tflops"] * 1e12), nbytes / (peaks["copy_gbps"] * 1e9),
                                specials / (peaks["exp2_gops"] * 1e9) if peaks["exp2_gops"] else 0.0)
                    tiles = {"tiles": _chosen_tiles(axis, bwd)} if backend == "triton" and device.type == "cuda" else {}
                    dev = {}
                    if device.type == "cuda" and not args.no_graph:
                        dt = device_timing(fn, reps=20, device=device)
                        d_ms = dt.median_ms if dt is not None else None
                        if d_ms:
                            dev = dict(dev_ms=round(d_ms, 4), dev_p20_ms=round(dt.p20_ms, 4),
                                       dev_p80_ms=round(dt.p80_ms, 4), dev_spread=round(dt.spread, 3),
                                       dev_tflops=round(flops / d_ms / 1e9, 3),
                                       dev_pct_floor=round(100 * floor * 1e3 / d_ms, 1))
                    report.add(t, **row, tflops=round(flops / s / 1e12, 3), gbps=round(nbytes / s / 1e9, 1),
                               pct_flops_peak=round(100 * flops / s / 1e12 / peaks["matmul_tflops"], 1),
                               pct_bw_peak=round(100 * nbytes / s / 1e9 / peaks["copy_gbps"], 1),
                               floor_ms=round(floor * 1e3, 4), pct_floor=round(100 * floor / s, 1), **dev, **tiles)
            del qkv, do
            report.save(out)                   # after every case: a killed run keeps its rows
    if skipped:
        report.meta["skipped_over_budget"] = skipped
    report.show()
    _speedups(report)
    report.save(out)
    _chart(report, args.png or os.path.splitext(out)[0] + ".png")


def _chosen_tiles(axis: str, bwd: bool) -> str:
    """The tiles the Triton kernels of this row ran with (the search's pick, or the fixed
    default with --no-autotune): what the fixed defaults, used where the search is off
    (bench.train_step on the GPU machines), should be set from."""
    from videoprism.kernels import factorized_attention_space as sp
    from videoprism.kernels import factorized_attention_time as tm

    kernels = {"space": [sp._space_fwd_kernel] + ([sp._space_bwd_dq_kernel, sp._space_bwd_dkdv_kernel] if bwd else []),
               "time": [tm._time_fwd_kernel] + ([tm._time_bwd_kernel] if bwd else [])}[axis]
    out = []
    for k in kernels:
        c = k.best_config               # the config of the kernel's latest launch (this row's)
        tile = "x".join(str(v) for v in c.kwargs.values())
        out.append(f"{k.base_fn.__name__.strip('_')} {tile} w{c.num_warps} s{c.num_stages}")
    return "; ".join(out)


def _speedups(report: Report) -> dict:
    """triton's speed-up over each other backend, fwd+bwd, per case (the issue's targets), printed and returned
    ({(model, axis, case): {backend: (ratio, "dev" | "call")}}): of the device times (dev_ms) where both rows
    have them, else of the call times (ms) of both. Never a call time against a device time: a backend whose
    call could not be captured in a CUDA graph has no dev_ms, and its call time (host dispatch included) over
    triton's device time would credit triton with the other backend's host work."""
    rows = {(r["model"], r["axis"], r["case"], r["backend"], r["mode"]): r for r in report.rows if "ms" in r}
    out = {}
    for (model, axis, case, backend, mode), r in sorted(rows.items()):
        if backend != "triton" or mode != "fwd+bwd":
            continue
        others = {}
        for (m, a, c, b, mo), o in rows.items():
            if (m, a, c, mo) != (model, axis, case, mode) or b == "triton":
                continue
            kind = "dev" if r.get("dev_ms") and o.get("dev_ms") else "call"
            key = "dev_ms" if kind == "dev" else "ms"
            others[b] = (o[key] / r[key], kind)
        out[(model, axis, case)] = others
        print(f"triton fwd+bwd speed-up, {model} {axis} {case}: " +
              ", ".join(f"{b} {x:.2f}x ({kind})" for b, (x, kind) in sorted(others.items())))
    return out


def _chart(report: Report, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no chart")
        return
    rows = [r for r in report.rows if "ms" in r and r["mode"] == "fwd+bwd"] or [r for r in report.rows if "ms" in r]
    if not rows:
        return
    groups = list(dict.fromkeys(f"{r['model']}\n{r['axis']} {r['case']}" for r in rows))
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(8, 1.4 * len(groups)), 4.5))
    w = 0.8 / len(backends)
    # A bar is the kernels' device time (CUDA-graph replay) where the row has one, else the eager call's time
    # (host dispatch included: a bar of ~0.2 ms is the host's), hatched: the two do not compare.
    for i, b in enumerate(backends):
        for j, g in enumerate(groups):
            r = [r for r in rows if r["backend"] == b and f"{r['model']}\n{r['axis']} {r['case']}" == g]
            if r:
                dev = r[0].get("dev_ms")
                ax.bar(j + i * w, dev or r[0]["ms"], w, color=f"C{i}", label=b, hatch=None if dev else "//")
    ax.set_xticks([j + 0.4 - w / 2 for j in range(len(groups))], groups, fontsize=7)
    ax.set_yscale("log")
    hatched = "; hatched: eager call time" if any(not r.get("dev_ms") for r in rows) else ""
    ax.set_ylabel(f"ms ({rows[0]['mode']}, log): device time{hatched}", fontsize=8)
    ax.set_title(f"factorized attention on {report.meta['device']} ({report.meta['dtype']})")
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles))                        # one legend entry per backend
    ax.legend(uniq.values(), uniq.keys(), fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
