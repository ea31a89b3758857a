"""Compile every Triton kernel of the project for a GPU target on a machine without a GPU.

The CPU test suite runs the kernels in Triton's interpreter, which executes their Python
and never runs the compiler: layout and lowering failures that only a GPU build meets
(Triton 3.6 rejected a scatter kernel that the interpreter ran correctly) would first show
on a lent GPU, where every minute is scarce. This tool closes that gap in two processes:

1. record (TRITON_INTERPRET=1): the public ops run on small CPU tensors at the shapes and
   flags in `_workloads` and every kernel launch is recorded (kernel, argument dtypes and
   values, constexprs, launch options) instead of executed;
2. compile: a second process, optionally another Python with another Triton (the GPU
   machines run 3.6), replays each launch with `kernel.warmup` against a stand-in driver
   that names the target (sm_90 by default). So Triton does its own argument
   specialisation (16-divisible ints and pointers, ints equal to 1), the autotuner prunes
   its candidates as on a GPU (`--coverage all`: every tile the search would try), and
   the whole pipeline runs down to a cubin with ptxas. Each kernel's registers, spilled
   bytes (cuobjdump on the cubin) and shared memory are printed (`--json` keeps them): a
   proxy for register pressure and occupancy that needs no GPU. So is the SASS of the
   kernel's main loop (its longest backward branch): instructions a thread issues per
   iteration, of which MUFU (exp2, tanh, rcp: 16 a clock per SM) and tensor-core MMAs. An
   attention loop whose MUFU or issue count outweighs its MMAs is bound by them, not by
   the tensor cores; comparing these counts before and after a change is how kernel
   arithmetic was tuned without a GPU.

    python -m tools.triton_compile_check                            # installed Triton, sm_90
    python -m tools.triton_compile_check --arch 80 --arch 90 --coverage all
    python -m tools.triton_compile_check --python /tmp/t36/bin/python   # Triton 3.6 in a venv
    (make one: python3 -m venv /tmp/t36 && /tmp/t36/bin/pip install triton==3.6.0)

Exit status 1 if any kernel fails to compile; each failure prints the kernel, its
specialisation and the compiler's last message.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import sysconfig
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------------------------
# record: run the ops in the interpreter, keep the launches
# --------------------------------------------------------------------------------------------
def _encode(v):
    import torch
    import triton.language as tl
    if isinstance(v, torch.Tensor):
        return {"tensor": str(v.dtype).removeprefix("torch.")}
    if isinstance(v, tl.dtype):
        return {"tl": v.name}
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise TypeError(f"triton_compile_check cannot record a kernel argument of type {type(v).__name__}; "
                    "teach _encode/_decode about it")


COVERAGE = ("smoke", "model", "all")


def _workloads(coverage: str):
    """The calls whose launches are recorded. "model": VideoPrism head dims (64: B/L, 88: g),
    stage-1 and stage-2 token counts, the logit cap, the text tower's padded causal attention,
    the masked time axis, each token op and BEVT's block rounds, in bf16 and fp32; "all" adds fp16 (and the
    compile step then tries every tile candidate); "smoke" (the CI test) compiles each kernel
    once, in bf16 with its richest flags, and the space kernels once more in fp16."""
    import torch

    from videoprism import ops
    from videoprism.masking import bevt_mask

    smoke = coverage == "smoke"
    dtypes = {"smoke": (torch.bfloat16,), "model": (torch.bfloat16, torch.float32),
              "all": (torch.bfloat16, torch.float16, torch.float32)}[coverage]
    space = [(64, {"softcap": 50.0, "key_padding": True, "causal": True})] if smoke else \
        [(256, {}), (90, {"softcap": 50.0}), (64, {"key_padding": True, "causal": True})]
    time_axis = [(16, True), (8, False)] if smoke else [(16, False), (16, True), (8, True)]
    g = torch.Generator().manual_seed(0)
    for dt in dtypes:
        for dh, heads in ((64, 2),) if smoke else ((64, 2), (88, 2)):
            for K, kw in space:
                qkv = torch.randn(2, 2, K, 3, heads, dh, dtype=dt, requires_grad=True)
                if kw.get("key_padding"):
                    kw = {**kw, "key_padding": torch.zeros(2, 2, K, dtype=torch.bool)}
                yield lambda qkv=qkv, kw=kw: ops.factorized_attention(qkv, axis="space", backend="triton", **kw)
            for T, masked in time_axis:
                K = 90 if masked else 16
                qkv = torch.randn(2, T, K, 3, heads, dh, dtype=dt, requires_grad=True)
                pos = bevt_mask(2, T, (16, 16), 1 - K / 256, generator=g) if masked else None
                yield lambda qkv=qkv, pos=pos: ops.factorized_attention(qkv, axis="time", pos=pos, backend="triton",
                                                                        softcap=50.0)
        D = 768
        x = torch.randn(2, 256, D, dtype=dt, requires_grad=True)
        idx = torch.randint(0, 256, (2, 90), generator=g)
        yield lambda x=x, idx=idx: ops.gather_tokens(x, idx, backend="triton")
        src = torch.randn(2, 90, D, dtype=dt, requires_grad=True)
        yield lambda src=src, idx=idx: ops.scatter_tokens(src, idx, 256, backend="triton")
        vis, perm = torch.randn(2, 90, D, dtype=dt, requires_grad=True), torch.argsort(torch.rand(2, 256, generator=g))
        emb, pe = torch.randn(D, dtype=dt, requires_grad=True), torch.randn(256, D, dtype=dt, requires_grad=True)
        yield lambda vis=vis, perm=perm, emb=emb, pe=pe: ops.shuffle_with_mask_tokens(vis, perm, emb, pe, backend="triton")
    if smoke:   # once more in fp16: the accurate tanh (bf16 takes the hardware one) and K = 90's column masks
        qkv = torch.randn(2, 2, 90, 3, 2, 64, dtype=torch.float16, requires_grad=True)
        yield lambda: ops.factorized_attention(qkv, axis="space", backend="triton", softcap=50.0)
    from videoprism.kernels.bevt_blocks import bevt_accept_blocks_triton
    from videoprism.masking import propose_blocks
    blocks = propose_blocks(2, 16, (16, 16), 166, g, "cpu")
    yield lambda: bevt_accept_blocks_triton(*blocks, 16, (16, 16), 166)
    pos = bevt_mask(2, 2, (16, 16), 0.65, generator=g)
    for video in (torch.randint(0, 255, (2, 2, 288, 288, 3), dtype=torch.uint8, generator=g),
                  torch.rand(2, 2, 288, 288, 3, requires_grad=True)):
        yield lambda video=video: ops.patchify_gather(video, pos, 18, backend="triton")


def record(path: str, coverage: str) -> None:
    """Run the workloads with every launch recorded (not executed) and write them as JSON."""
    from triton.runtime.interpreter import InterpretedFunction

    launches, seen = [], set()

    def run(self, *args, grid, warmup, **kwargs):
        rec = {"module": self.fn.__module__, "name": self.fn.__name__, "args": [_encode(a) for a in args],
               "kwargs": {k: _encode(v) for k, v in kwargs.items()}}
        key = json.dumps(rec, sort_keys=True)
        if key not in seen:
            seen.add(key)
            launches.append(rec)

    InterpretedFunction.run = run
    for call in _workloads(coverage):
        out = call()
        if out.requires_grad:
            out.float().sum().backward()
    with open(path, "w") as f:
        json.dump(launches, f)


# --------------------------------------------------------------------------------------------
# compile: replay the launches through kernel.warmup for a named target
# --------------------------------------------------------------------------------------------
class _TargetDriver:
    """Stand-in for Triton's CUDA driver: it names a device, a stream and the target, which
    is all `JITFunction.warmup` asks of a driver before it compiles."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        import torch
        return torch.device("cpu")

    def get_benchmarker(self):
        raise RuntimeError("triton_compile_check compiles only; it cannot time kernels")


def _decode(v):
    import torch
    import triton.language as tl
    if isinstance(v, dict) and "tensor" in v:
        return getattr(torch, v["tensor"])      # warmup wraps a dtype as an aligned mock tensor
    if isinstance(v, dict) and "tl" in v:
        return tl.dtype(v["tl"])
    return v


def _describe(rec: dict, kwargs: dict) -> str:
    consts = {k: v for k, v in kwargs.items() if not isinstance(v, dict)}
    dts = sorted({a["tensor"] for a in rec["args"] if isinstance(a, dict) and "tensor" in a})
    return f"{rec['name']} {'/'.join(dts)} {consts}"


_SASS_LINE = re.compile(r"/\*([0-9a-f]+)\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def loop_profile(sass: str) -> dict:
    """Instruction mix of the main loop (the longest backward branch) of one kernel's SASS:
    {"loop_instructions", "loop_mufu", "loop_mma"} per thread per iteration; zeros when the
    kernel has no loop (fully unrolled)."""
    ins = [(int(pc, 16), op, rest) for pc, op, rest in _SASS_LINE.findall(sass)]
    loops = []
    for pc, op, rest in ins:
        target = re.search(r"0x([0-9a-f]+)", rest)
        if op.startswith("BRA") and target and int(target.group(1), 16) < pc:
            loops.append((int(target.group(1), 16), pc))
    if not loops:
        return {"loop_instructions": 0, "loop_mufu": 0, "loop_mma": 0}
    lo, hi = max(loops, key=lambda r: r[1] - r[0])
    body = [op for pc, op, _ in ins if lo <= pc <= hi]
    return {"loop_instructions": len(body), "loop_mufu": sum(op.startswith("MUFU") for op in body),
            "loop_mma": sum(op.split(".")[0] in ("HMMA", "HGMMA", "IMMA", "IGMMA") for op in body)}


def _compiled(kernel) -> dict:
    """Tiles, launch options and resources of one compiled kernel: registers and local-memory
    bytes per thread (spills; from the cubin with the cuobjdump Triton ships), shared memory
    and the main loop's instruction mix (loop_profile)."""
    from tools.fatbin import triton_cuobjdump

    names = kernel.src.fn.arg_names
    tiles = {names[i[0]]: v for i, v in kernel.src.constants.items()
             if names[i[0]].startswith("BLOCK_") or names[i[0]] == "HEADS"}
    info = {"tiles": tiles, "warps": kernel.metadata.num_warps, "stages": kernel.metadata.num_stages,
            "shared_bytes": kernel.metadata.shared}
    tool = triton_cuobjdump()
    if tool:
        with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
            fh.write(kernel.asm["cubin"])
            fh.flush()
            usage = subprocess.run([tool, "--dump-resource-usage", fh.name], capture_output=True, text=True).stdout
            sass = subprocess.run([tool, "-sass", fh.name], capture_output=True, text=True).stdout
        fields = dict(item.split(":", 1) for line in usage.splitlines() if "REG:" in line for item in line.split())
        info["registers"] = int(fields["REG"])
        info["spill_bytes"] = int(fields["LOCAL"]) + int(fields["STACK"])
        info.update(loop_profile(sass))
    return info


def _resources(info: dict) -> str:
    regs = f"{info['registers']:3d} regs, {info['spill_bytes']} B spilled, " if "registers" in info else ""
    loop = (f"; loop {info['loop_instructions']} instr, {info['loop_mufu']} MUFU, {info['loop_mma']} MMA"
            if info.get("loop_instructions") else "")
    return f"{info['tiles']} w{info['warps']}s{info['stages']}: {regs}{info['shared_bytes']} B smem{loop}"


def compile_all(path: str, arch: int, report: str | None = None) -> int:
    """Compile every recorded launch for one target. One target per process: a JITFunction
    keeps its compiled kernels per device with the target it saw first, so a second target in
    the same process would be handed the first one's binaries (that is how an earlier version
    reported sm_80 code as sm_90)."""
    import importlib

    import triton
    from triton.runtime import driver
    from triton.runtime.autotuner import Autotuner

    with open(path) as f:
        launches = json.load(f)
    failures, rows = 0, []
    t_start = time.perf_counter()
    driver.set_active(_TargetDriver(arch))
    for rec in launches:
        args = [_decode(a) for a in rec["args"]]
        kwargs = {k: _decode(v) for k, v in rec["kwargs"].items()}
        t0 = time.perf_counter()
        try:
            kernel = getattr(importlib.import_module(rec["module"]), rec["name"])
            if isinstance(kernel, Autotuner):   # the search picks these: replay its candidates instead
                tuned = set().union(*(c.all_kwargs() for c in kernel.configs))
                kwargs = {k: v for k, v in kwargs.items() if k not in tuned}
            out = kernel.warmup(*args, grid=(1,), **kwargs)
            infos = [_compiled(k) for k in (out if isinstance(out, list) else [out])]
        except Exception as e:  # noqa: BLE001 - report every kernel, then fail
            failures += 1
            last = [line for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
            print(f"FAIL  sm_{arch} {_describe(rec, kwargs)}\n      {type(e).__name__}: {last[-1][:400]}", flush=True)
            continue
        print(f"ok    sm_{arch} {time.perf_counter() - t0:5.1f}s  {_describe(rec, kwargs)}", flush=True)
        for info in infos:
            print(f"        {_resources(info)}", flush=True)
            rows.append({"arch": arch, "kernel": rec["name"], "launch": _describe(rec, kwargs), **info})
    spilling = sum(1 for r in rows if r.get("spill_bytes"))
    print(f"triton {triton.__version__}: {len(rows)} kernels compiled for sm_{arch} from "
          f"{len(launches)} launches in {time.perf_counter() - t_start:.0f}s; {spilling} of them spill registers; "
          f"{failures} failed")
    if report:
        with open(report, "w") as fh:
            json.dump({"triton": triton.__version__, "failed": failures, "kernels": rows}, fh, indent=1)
    return 1 if failures else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, action="append", help="compute capability x10 (default 90; repeatable)")
    p.add_argument("--coverage", choices=COVERAGE, default="model",
                   help="smoke: each kernel once (bf16, richest flags; the CI test); model (default): the "
                        "VideoPrism shapes and flags in bf16 and fp32 at the tiles used without the search; "
                        "all: also fp16, and every tile candidate the search would try")
    p.add_argument("--python", default=sys.executable,
                   help="interpreter for the compile step, e.g. a venv with another Triton; torch and this "
                        "repo come from the current environment")
    p.add_argument("--json", metavar="PATH", help="also write every compiled kernel's tiles, registers, spills "
                                                   "and shared memory as JSON (compare before/after a change)")
    p.add_argument("--phase", choices=["record", "compile"], help=argparse.SUPPRESS)
    p.add_argument("--launches", help=argparse.SUPPRESS)
    p.add_argument("--site", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    arches = args.arch or [90]

    if args.phase == "record":
        record(args.launches, args.coverage)
        return 0
    if args.phase == "compile":
        if args.site:   # after this interpreter's own packages: its Triton wins over ours
            import site
            site.addsitedir(args.site)
        sys.path.insert(0, ROOT)
        if len(arches) != 1:
            p.error("--phase compile takes one --arch (compile_all says why)")
        return compile_all(args.launches, arches[0], args.json)

    with tempfile.TemporaryDirectory() as tmp:
        launches = os.path.join(tmp, "launches.json")
        base = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "VIDEOPRISM_TRITON_AUTOTUNE")}
        me = [sys.executable, "-m", "tools.triton_compile_check", "--launches", launches]
        subprocess.run(me + ["--phase", "record", "--coverage", args.coverage], cwd=ROOT, check=True,
                       env={**base, "TRITON_INTERPRET": "1", "VIDEOPRISM_TRITON_AUTOTUNE": "0"})
        env = {**base, "VIDEOPRISM_TRITON_AUTOTUNE": "1" if args.coverage == "all" else "0"}
        rc, reports = 0, []
        for arch in arches:         # one process per target (compile_all says why)
            cmd = [args.python, "-m", "tools.triton_compile_check", "--phase", "compile", "--launches", launches,
                   "--arch", str(arch)]
            if args.json:
                reports.append(os.path.join(tmp, f"sm_{arch}.json"))
                cmd += ["--json", reports[-1]]
            if os.path.abspath(args.python) != os.path.abspath(sys.executable):   # venvs share one real binary
                cmd += ["--site", sysconfig.get_paths()["purelib"]]
            rc |= subprocess.run(cmd, cwd=ROOT, env=env).returncode
        if args.json:
            parts = []
            for r in reports:
                if os.path.exists(r):
                    with open(r) as fh:
                        parts.append(json.load(fh))
            merged = {"triton": parts[0]["triton"] if parts else None, "failed": sum(d["failed"] for d in parts),
                      "kernels": [k for d in parts for k in d["kernels"]]}
            with open(args.json, "w") as fh:
                json.dump(merged, fh, indent=1)
            print(f"wrote {args.json}")
        return rc


if __name__ == "__main__":
    sys.exit(main())
