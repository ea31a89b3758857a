"""Token ops side by side with the torch composition and the copy floor.

    python -m bench.token_ops --device cuda        # bf16 tokens, batch 32: triton, cuda, torch
    python -m bench.token_ops --device cpu         # fp32 tokens, batch 2: cpp, torch

Shapes (VideoPrism at 288x288: N = 16x16 patches, T = 16 frames, P = 18; D = 768 for
"base", 1408 for "giant"), per stage:
  stage1  tube 50%:  K = 128 visible per frame, m = T*K = 2048 of n = T*N = 4096 tokens
  stage2  BEVT 65%:  K = 90,  m = 1440 of n = 4096
Cases:
  patchify   uint8 video [B, T, 288, 288, 3] + pos -> [B, T, K, 972] fp32 (fwd; the video
             never needs a gradient)
  gather     [B, n, D] -> [B, m, D]  (bwd: scatter into [B, n, D])
  scatter    [B, m, D] -> [B, n, D]  (bwd: gather)
  shuffle    visible [B, m, D] + mask_emb + pos_emb[n, D] -> [B, n, D] (bwd: unshuffle + sums)
Also the time to draw each stage's mask for the batch on the device (tube_mask, bevt_mask), and on
a GPU BEVT's block rounds as PyTorch ops vs the one-launch kernel (kernels/bevt_blocks.py).
Implementations: the op's backends ("triton", "cuda" on GPU; "cpp" on the CPU) and
"torch", the composition a user would write (torch.gather / cat / zeros + scatter_add_,
the reshape-permute patchify) with autograd for the backward: gather_tokens_ref,
scatter_tokens_torch, shuffle_with_mask_tokens_torch and patchify_gather_ref of kernels/,
the same functions the tests check against.

Bytes (the least any implementation must move; E = element size, E_p = 4):
  patchify   B*T*K*972 * (1 + 4)
  gather     fwd 2*B*m*D*E              bwd B*m*D*E + B*n*D*E
  scatter    fwd B*m*D*E + B*n*D*E      bwd 2*B*m*D*E
  shuffle    fwd B*m*D*E + B*n*D*E + n*D*E_p     bwd B*n*D*E + B*m*D*E + n*D*E_p
  fwd+bwd = the sum. Index bytes are left out (under 1%). floor_ms = bytes / (device copy GB/s
  measured in this run, read + write, on 1 GiB on CUDA, 64 MiB on the CPU); GB/s = bytes / time;
  pct_copy = GB/s / copy GB/s = floor_ms / ms; copy_ms: a device copy of the same bytes (half read,
  half written) timed in this run, pct_same_copy = copy_ms / ms (a working set that fits a cache
  copies faster than the big copy: on the CPU pct_copy passes 100% where pct_same_copy does not);
  x_torch = torch time / this time (ms), dev_x_torch the same of dev_ms where both rows have one
  (x_torch of a call whose time is the host's says nothing of the kernel). Columns D, K, m, n: the
  case's shape (patchify reads K only: B*T*K patches of P*P*3 = 972 values).
Two times on CUDA: `ms` (do_bench of the eager call: includes the host side, the Python
custom-op and autograd dispatch, which at these 30-100 us sizes can exceed the kernels and
then is what gets measured) and `dev_ms` (the same call captured once in a CUDA graph and
replayed after an L2 flush: device time only, what a step whose host runs ahead of the GPU
sees); dev_gbps / dev_pct_copy from dev_ms, dev_p20_ms / dev_p80_ms / dev_spread its
quantiles. dev_ms is measured for fwd and fwd+bwd only: the backward alone cannot be
captured apart from its forward (autograd runs it on the forward's stream, not the
capture's), and the difference (fwd+bwd) - fwd is no measurement (it read 0.0385 ms for
scatter's backward, a gather of the same shape whose own fwd row measured 0.0421 ms: 87%
of copy against 80%). So bwd rows carry the eager `ms` only; the backward kernels' device
times are the adjoint op's fwd rows (gather's backward is the scatter kernel, scatter's the
gather kernel; the shuffle's backward shows only inside fwd+bwd).
"""
from __future__ import annotations

import sys

import torch

from bench.common import (Report, arg_parser, comma_list, device_arg, device_timing, measure_peaks, out_json,
                          positive_int, results_path, timeit)
from videoprism.cli import run_command
from videoprism.kernels.bevt_blocks import bevt_accept_blocks_triton
from videoprism.kernels.token_ops_ref import (gather_tokens_ref, patchify_gather_ref, scatter_tokens_torch,
                                              shuffle_with_mask_tokens_torch)
from videoprism.masking import accept_blocks_ref, bevt_mask, num_visible, propose_blocks, tube_mask
from videoprism.ops import gather_tokens, patchify_gather, scatter_tokens, shuffle_with_mask_tokens

MODELS = {"base": 768, "giant": 1408}
STAGES = {"stage1": (tube_mask, 0.5), "stage2": (bevt_mask, 0.65)}
T, GRID, P = 16, (16, 16), 18


# ----------------------------------------------------------------------------- cases
def make_case(model: str, stage: str, batch: int, dtype: torch.dtype, device: torch.device, gen: torch.Generator):
    D = MODELS[model]
    mask_fn, ratio = STAGES[stage]
    pos = mask_fn(batch, T, GRID, ratio, generator=gen)                         # [B, T, K]
    K = pos.shape[2]
    N = GRID[0] * GRID[1]
    n, m = T * N, T * K
    # Flat token index of every visible token (frame-major): what gather/scatter move.
    idx = (pos + torch.arange(T, device=device)[None, :, None] * N).reshape(batch, m)
    perm = torch.rand(batch, n, device=device, generator=gen).argsort(dim=1)
    E = torch.tensor([], dtype=dtype).element_size()
    return dict(D=D, K=K, n=n, m=m, pos=pos, idx=idx, perm=perm, E=E,
                video=torch.randint(0, 256, (batch, T, GRID[0] * P, GRID[1] * P, 3), device=device, generator=gen,
                                    dtype=torch.uint8),
                tokens=torch.randn(batch, n, D, device=device, generator=gen, dtype=dtype),
                visible=torch.randn(batch, m, D, device=device, generator=gen, dtype=dtype),
                mask_emb=torch.randn(D, device=device, generator=gen),
                pos_emb=torch.randn(n, D, device=device, generator=gen))


def op_specs(c: dict, batch: int):
    """(name, {impl name -> (forward fn(backend) -> (out, grad inputs)), bytes fwd, bytes bwd)."""
    B, D, m, n, E = batch, c["D"], c["m"], c["n"], c["E"]
    F = P * P * 3
    return [
        ("patchify", lambda be: (patchify_gather(c["video"], c["pos"], P, backend=be) if be != "torch"
                                 else patchify_gather_ref(c["video"], c["pos"], P), ()),
         B * T * c["K"] * F * 5, None),
        ("gather", lambda be: _with_grad(lambda x: gather_tokens(x, c["idx"], backend=be) if be != "torch"
                                         else gather_tokens_ref(x, c["idx"]), c["tokens"]),
         2 * B * m * D * E, B * m * D * E + B * n * D * E),
        ("scatter", lambda be: _with_grad(lambda s: scatter_tokens(s, c["idx"], n, backend=be) if be != "torch"
                                          else scatter_tokens_torch(s, c["idx"], n), c["visible"]),
         B * m * D * E + B * n * D * E, 2 * B * m * D * E),
        ("shuffle", lambda be: _with_grad(lambda v, me, pe: shuffle_with_mask_tokens(v, c["perm"], me, pe, backend=be)
                                          if be != "torch" else shuffle_with_mask_tokens_torch(v, c["perm"], me, pe),
                                          c["visible"], c["mask_emb"], c["pos_emb"]),
         B * m * D * E + B * n * D * E + n * D * 4, B * n * D * E + B * m * D * E + n * D * 4),
    ]


def torch_ratios(rows: list[dict]) -> None:
    """x_torch = the torch composition's ms / the row's ms (the eager calls, host dispatch included), and
    dev_x_torch the same of dev_ms where both rows have one: at these sizes an eager call can be the host's
    time, so x_torch alone can call a kernel slower than torch that is faster on the device (H200, base stage 1,
    scatter fwd+bwd triton: x_torch 0.70, device times 2.37x)."""
    torch_rows = {r["mode"]: r for r in rows if r["impl"] == "torch"}
    for row in rows:
        base = torch_rows[row["mode"]]
        row["x_torch"] = round(base["ms"] / row["ms"], 2)
        if row.get("dev_ms") and base.get("dev_ms"):
            row["dev_x_torch"] = round(base["dev_ms"] / row["dev_ms"], 2)


def same_bytes_copy(nbytes: int, device: torch.device):
    """A device copy that moves `nbytes` (fp32, half read and half written), as an op's row does."""
    src = torch.empty(max(1, nbytes // 8), device=device)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def _with_grad(fn, *inputs):
    leaves = tuple(t.detach().requires_grad_() for t in inputs)
    return fn(*leaves), leaves


def main(argv=None) -> int:
    """Bad arguments and inputs end the run with one `error: ...` line and exit status 2, not a traceback."""
    return run_command(_main, argv)


def _main(argv) -> None:
    p = arg_parser("bench.token_ops", __doc__)
    p.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda (default here: %(default)s; cuda wherever one is available)")
    p.add_argument("--batch", type=positive_int, default=None, help="clips per call (default 32 on CUDA, 2 on the CPU)")
    p.add_argument("--dtype", default=None, choices=("bfloat16", "float16", "float32"),
                   help="token dtype (default bfloat16 on CUDA, float32 on the CPU)")
    p.add_argument("--models", type=comma_list(MODELS), default="base,giant",
                   help=f"comma-separated from {list(MODELS)} (default: %(default)s)")
    p.add_argument("--stages", type=comma_list(STAGES), default="stage1,stage2",
                   help=f"comma-separated from {list(STAGES)} (default: %(default)s)")
    p.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph device times (dev_ms)")
    p.add_argument("--out", default=None, type=out_json,
                   help="JSON path (default bench/results/token_ops_<cpu|gpu>.json)")
    a = p.parse_args(argv)
    device = a.device
    cuda = device.type == "cuda"
    batch = a.batch or (32 if cuda else 2)
    dtype = getattr(torch, a.dtype or ("bfloat16" if cuda else "float32"))
    impls = ("triton", "cuda", "torch") if cuda else ("cpp", "torch")
    tkw = dict(warmup_ms=10, rep_ms=40) if cuda else dict(warmup=2, reps=10)
    peaks = measure_peaks(device)
    report = Report("token ops", str(device), meta={"dtype": str(dtype).replace("torch.", ""), "batch": batch,
                                                    "copy_gbps": round(peaks["copy_gbps"], 1),
                                                    "threads": torch.get_num_threads()})
    out_path = a.out or results_path("token_ops", device)
    gen = torch.Generator(device=device).manual_seed(0)
    copies = {}  # bytes moved -> median ms of a device copy moving as many

    def copy_ms(nbytes: int) -> float:
        if nbytes not in copies:
            copies[nbytes] = timeit(same_bytes_copy(nbytes, device), device, **tkw).median_ms
        return copies[nbytes]

    for stage, (mask_fn, ratio) in STAGES.items():    # mask generation per step (launch-bound on GPU)
        t = timeit(lambda: mask_fn(batch, T, GRID, ratio, generator=gen, device=device), device, **tkw)
        report.add(t, model="-", stage=stage, op=mask_fn.__name__, mode="fwd",
                   impl="torch + triton blocks" if cuda and mask_fn is bevt_mask else "torch")
    if cuda:   # BEVT's sequential block rounds: the PyTorch rounds vs the one-launch kernel
        budget = GRID[0] * GRID[1] - num_visible(GRID, STAGES["stage2"][1])
        geometry = propose_blocks(batch, T, GRID, budget, gen, device)
        for impl, accept in (("triton", bevt_accept_blocks_triton), ("torch", accept_blocks_ref)):
            t = timeit(lambda: accept(*geometry, T, GRID, budget), device, **tkw)
            report.add(t, model="-", stage="stage2", op="bevt_blocks", mode="fwd", impl=impl, rounds=geometry[0].shape[0])
    for model in a.models:
        for stage in a.stages:
            case = make_case(model, stage, batch, dtype, device, gen)
            for name, run, bytes_fwd, bytes_bwd in op_specs(case, batch):
                times = {}
                for impl in impls:
                    out, leaves = run(impl)
                    grad = torch.randn_like(out)
                    modes = {"fwd": (lambda: run(impl), bytes_fwd)}
                    if bytes_bwd is not None:
                        modes["bwd"] = (lambda: torch.autograd.grad(out, leaves, grad, retain_graph=True), bytes_bwd)
                        modes["fwd+bwd"] = (lambda: torch.autograd.grad(*run(impl), grad), bytes_fwd + bytes_bwd)
                    for mode, (fn, nbytes) in modes.items():
                        t = timeit(fn, device, **tkw)
                        times[(impl, mode)] = t.median_ms
                        gbps = nbytes / (t.median_ms * 1e-3) / 1e9
                        row = report.add(t, model=model, stage=stage, op=name, mode=mode, impl=impl, D=case["D"],
                                         K=case["K"], m=case["m"], n=case["n"], mbytes=round(nbytes / 1e6, 1),
                                         floor_ms=round(nbytes / (peaks["copy_gbps"] * 1e9) * 1e3, 4),
                                         gbps=round(gbps, 1), pct_copy=round(100 * gbps / peaks["copy_gbps"], 1),
                                         copy_ms=round(copy_ms(nbytes), 4),
                                         pct_same_copy=round(100 * copy_ms(nbytes) / t.median_ms, 1))
                        # Device times of what can be captured alone: fwd and fwd+bwd (module docstring).
                        if cuda and not a.no_graph and mode != "bwd":
                            dt = device_timing(fn, device=device)
                            if dt is not None and dt.median_ms > 0:
                                dev_gbps = nbytes / (dt.median_ms * 1e-3) / 1e9
                                row.update(dev_ms=round(dt.median_ms, 4), dev_p20_ms=round(dt.p20_ms, 4),
                                           dev_p80_ms=round(dt.p80_ms, 4), dev_spread=round(dt.spread, 3),
                                           dev_gbps=round(dev_gbps, 1),
                                           dev_pct_copy=round(100 * dev_gbps / peaks["copy_gbps"], 1))
                    del out, leaves, grad
                torch_ratios(report.rows[-len(times):])
            del case
            if cuda:
                torch.cuda.empty_cache()
            report.save(out_path)  # after every case: a run cut by its time box keeps what it measured
    report.show()


if __name__ == "__main__":
    sys.exit(main())
