"""Where a step's time goes: torch.profiler over a few calls, kernel time split by kind.

A benchmark row says how fast a step is; when it misses its target the next question is which
part: the matmuls (cuBLAS, near the card's peak at these shapes), our attention or token-op
kernels, Inductor's fused elementwise/norm kernels, the optimizer, or the GPU waiting for
the host (launch-bound). `profile_calls(fn, device)` answers it in one pass:

* on CUDA: every kernel's device time (the profiler's device events, self time, so nothing
  is counted twice), grouped by `CATEGORIES`, and `busy` = time with a kernel running / wall
  time of the profiled calls (well under 100% means the host or a sync leaves the GPU idle; the
  profiler's own host overhead makes it read a little low, never high);
* on the CPU: the self time of each aten op, grouped the same way, the ops the optimizer
  runs counted as optimizer (Inductor's compiled regions are not split further there).
"""
from __future__ import annotations

import re
import time
from typing import Callable

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

# First match wins: attention before matmul (flash and memory-efficient SDPA kernels carry "cutlass" in their
# template arguments), collectives and copies before the token ops ("ncclDevKernel_AllGather"), Inductor's matmul
# templates before its other kernels ("triton_" names); our kernels by their function names (kernels/*.py,
# csrc/*.cu start with these words).
CATEGORIES = [
    ("attention", r"^_?(space|time)_(fwd|bwd)|flash|fmha|attention|sdpa"),
    ("comm", r"^nccl|^c10d::|^gloo|all_?reduce|all_?gather|reduce_?scatter"),
    ("memcpy", r"^mem(cpy|set)"),
    ("matmul", r"^triton_tem_|gemm|xmma|nvjet|cutlass|cublas|^aten::(mm|addmm|bmm|baddbmm|linear)$"),
    ("fused", r"^triton_"),
    ("token_ops", r"gather|scatter|shuffle|patchify|bevt"),
    ("optimizer", r"adam|adafactor|lpnorm"),  # lpnorm: the gradient clipping's foreach norm
]


def category(name: str) -> str:
    for cat, pattern in CATEGORIES:
        if re.search(pattern, name, re.IGNORECASE):
            return cat
    return "other"


def _event_category(e) -> str:
    """An op run by the optimizer (AdamW's sqrt, div, ... on the CPU, where it is a loop of aten
    ops) counts as optimizer whatever its own name; everything else by its name."""
    parent = getattr(e, "cpu_parent", None)
    while parent is not None:
        if parent.name.startswith(("Optimizer.step", "Optimizer.zero_grad")):
            return "optimizer"
        parent = parent.cpu_parent
    return category(e.name)


def profile_calls(fn: Callable[[], object], device: torch.device, *, calls: int = 2, top: int = 12) -> dict:
    """Profile `calls` calls of `fn` (already warm) on `device`. Returns
    {"ms_per_call", "busy_pct" (CUDA only), "split_pct": {category: % of kernel time},
     "top": [[name, ms per call, % of kernel time, category], ...]}."""
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize(device)
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        if cuda:
            torch.cuda.synchronize(device)
        wall_ms = (time.perf_counter() - t0) * 1e3 / calls
    return {"ms_per_call": round(wall_ms, 3), **split_events(prof.events(), cuda=cuda, calls=calls,
                                                            wall_ms=wall_ms, top=top)}


def split_events(events, *, cuda: bool, calls: int, wall_ms: float, top: int = 12) -> dict:
    """The profiler's events of `calls` calls -> {"split_pct", "top", "busy_pct" (CUDA)} of `profile_calls`."""
    # Self times (nothing counted twice), summed per (name, category). On a GPU the profiler also records
    # each record_function span that launched kernels ("## Call CompiledFxGraph ##", "Optimizer.step") as
    # a device event over its kernels: not a kernel, left out.
    by_key: dict[tuple[str, str], float] = {}
    spans = []
    for e in events:
        if cuda != (e.device_type == DeviceType.CUDA) or getattr(e, "is_user_annotation", False):
            continue
        us = e.self_device_time_total if cuda else e.self_cpu_time_total
        if us > 0:
            key = (e.name, _event_category(e))
            by_key[key] = by_key.get(key, 0.0) + us / 1e3 / calls
            spans.append((e.time_range.start, e.time_range.end))
    ranked = sorted(by_key.items(), key=lambda kv: -kv[1])
    total = sum(by_key.values()) or 1.0
    split: dict[str, float] = {}
    for (_, cat), ms in ranked:
        split[cat] = split.get(cat, 0.0) + ms
    out = {"split_pct": {c: round(100 * ms / total, 1) for c, ms in sorted(split.items(), key=lambda kv: -kv[1])},
           "top": [[name[:120], round(ms, 4), round(100 * ms / total, 1), cat] for (name, cat), ms in ranked[:top]]}
    if cuda:
        # Time with at least one kernel running (kernels overlapping on other streams, NCCL's, count once).
        out["busy_pct"] = round(100 * busy_ms(spans) / calls / wall_ms, 1)
    return out


def busy_ms(spans: list[tuple[float, float]]) -> float:
    """Length of the union of the (start, end) intervals in microseconds, in ms."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b > end:
            total += b - max(a, end)
            end = b
    return total / 1e3


def summary(p: dict) -> str:
    """One line: 'matmul 61%, fused 18%, ..., busy 92%'."""
    parts = [f"{c} {pct:.0f}%" for c, pct in p["split_pct"].items()]
    if "busy_pct" in p:
        parts.append(f"busy {p['busy_pct']:.0f}%")
    return ", ".join(parts)
