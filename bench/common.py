"""One benchmark runner for every benchmark in bench/.

* `timeit(fn)`: median and 20/80 % quantiles in ms. On CUDA it times with events
  through `triton.testing.do_bench` (warm-up and repeat in ms); on the CPU with
  `time.perf_counter` around whole calls after warm-up.
* `device_timing(fn)` (CUDA): the device time of fn alone (median, p20/p80), replayed from a CUDA graph: no host
  dispatch in it, for ops of tens of microseconds whose eager call `timeit` would measure.
* `measure_peaks(device)`: the two ceilings of the card measured in the same run
  (a large matmul for TFLOP/s, videoprism/flops.py, in the dtype asked for, by default the step's: bf16 on
  CUDA, fp32 on the CPU; a large device-to-device copy for GB/s,
  counting bytes read + written), so every row can say what share of the peak it got.
* `Report`: rows with the device name, torch/triton versions, commit and date,
  printed as a table and written as JSON.
* `arg_parser` and the argparse types of the options (`positive_int`, `non_negative_seconds`, `comma_list`,
  `device_arg`, `out_json`): a bad argument is argparse's one-line error naming the option, exit status 2, before
  anything is built or timed.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from videoprism.paths import write_json_atomic


def arg_parser(module: str, doc: str | None) -> argparse.ArgumentParser:
    """The parser every bench module starts from: `prog` says how it is run (`python -m bench.X`; argparse would
    show the file name) and the module docstring, laid out as written, is the description."""
    return argparse.ArgumentParser(prog=f"python -m {module}", description=doc,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def positive_int(value: str) -> int:
    """argparse `type` of a count (batch, reps, frames, ...): 0 or less would fail deep inside a run or time nothing."""
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def non_negative_seconds(value: str) -> float:
    """argparse `type` of a time budget: a finite number of seconds >= 0 (a negative one skipped every case)."""
    try:
        s = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds") from None
    if not 0 <= s < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds >= 0, got {value}")
    return s


def comma_list(choices: Iterable[str] | None = None, item: Callable[[str], object] = str) -> Callable[[str], list]:
    """argparse `type` of a comma-separated list: "eager,compile" -> ["eager", "compile"], each item one of
    `choices` (when given) and then converted by `item`. An unknown item is an error, not a row: the rows are
    labelled by what was asked, so a near miss ("compiled" for "compile") would time something else under its name."""
    def parse(value: str) -> list:
        out = []
        for text in value.split(","):
            if choices is not None and text not in choices:
                raise argparse.ArgumentTypeError(f"invalid choice: {text!r} "
                                                 f"(choose from {', '.join(map(repr, choices))})")
            out.append(item(text))
        return out

    return parse


def out_json(value: str) -> str:
    """argparse `type` of --out: a path the JSON can be written to (not a folder; its folder made), checked before
    anything is measured: a bad path failed at the first save, after the work, naming a temporary file."""
    from videoprism.paths import check_out_file

    try:
        check_out_file(value, value, "a .json file path")
    except (ValueError, OSError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def device_arg(value: str) -> torch.device:
    """argparse `type` of --device: cpu, cuda or cuda:N, and a CUDA device must be visible here, so that a missing
    GPU or a typo is found at once, not by a traceback once the model or the data is set up."""
    try:
        device = torch.device(value)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{value!r} is not a device; use cpu, cuda or cuda:N")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{value}: no such CUDA GPU here ({torch.cuda.device_count()} visible); "
                                         f"use --device cpu")
    return device


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float

    @classmethod
    def of(cls, ms: list[float]) -> "Timing":
        """Median and 20/80 % quantiles of repeated measurements in ms."""
        qs = statistics.quantiles(ms, n=10, method="inclusive") if len(ms) > 1 else [ms[0]] * 9
        return cls(statistics.median(ms), qs[1], qs[7])

    @property
    def spread(self) -> float:
        """(p80 - p20) / median: the relative spread of the repeats."""
        return (self.p80_ms - self.p20_ms) / self.median_ms if self.median_ms > 0 else 0.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn: Callable[[], object], device: torch.device | str = "cpu", *, warmup: int = 2, reps: int = 10,
           warmup_ms: float = 25, rep_ms: float = 100, host_clock: bool = False) -> Timing:
    """Median and p20/p80 of fn in ms. CUDA: triton's do_bench (events, L2 flushed, as many repeats as fit
    rep_ms), unless `host_clock`: `reps` calls on the host clock, the device synchronised after the warm-up and
    after each (for calls of hundreds of ms, of which do_bench would time one). do_bench records its events on
    the current device's stream: it runs with `device` current (cuda:1's work timed by events on cuda:0's idle
    stream would read the host's launch time)."""
    device = torch.device(device)
    if device.type == "cuda" and not host_clock:
        import triton.testing

        with torch.cuda.device(device):
            q = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        return Timing(*q)
    for _ in range(warmup):
        fn()
    _sync(device)  # the warm-up's queued work is not the first timed call's
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        ts.append((time.perf_counter() - t0) * 1e3)
    return Timing.of(ts)


def device_timing(fn: Callable[[], object], reps: int = 30, device: torch.device | str | None = None) -> Timing | None:
    """Device time of fn (CUDA; median and p20/p80 in ms): captured once in a CUDA graph (on a side stream,
    after two warm-up calls there: compiles and autotuning happen outside the capture), each
    replay timed by events after a 256 MB L2 flush. No host dispatch in it: what a training
    step whose host runs ahead of the GPU sees, where `timeit` of an eager call of a few tens
    of microseconds measures the Python dispatch instead. None (and a note) when fn cannot be
    captured (a host sync or a CPU tensor in it). Streams, graph and events are `device`'s (default: the
    current device), the device fn's work runs on."""
    with torch.cuda.device(device):
        return _device_timing(fn, reps)


def _device_timing(fn: Callable[[], object], reps: int) -> Timing | None:
    caller = torch.cuda.current_stream()
    stream = torch.cuda.Stream()
    stream.wait_stream(caller)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.stream(stream):
            fn()
            fn()
        caller.wait_stream(stream)
        with torch.cuda.graph(graph, stream=stream):
            fn()
    except Exception as e:  # noqa: BLE001 - capture fails in many ways (a sync, a CPU tensor, dynamo); the row keeps its eager time
        print(f"  (no CUDA graph: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})")
        # A capture that failed raises out of torch.cuda.graph before it restores the caller's stream.
        torch.cuda.set_stream(caller)
        torch.cuda.synchronize()
        return None
    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    events = []
    for _ in range(reps):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    t = Timing.of([a.elapsed_time(b) for a, b in events])
    del graph
    return t


def results_path(name: str, device: torch.device, suffix: str = "") -> str:
    """The default JSON of a benchmark: bench/results/<name>_<cpu|gpu><suffix>.json, the names of the
    committed results (a GPU run never overwrites the CPU ones)."""
    kind = "gpu" if device.type == "cuda" else device.type
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"{name}_{kind}{suffix}.json")


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def measure_peaks(device: torch.device | str, dtype: torch.dtype | None = None) -> dict:
    """Measured ceilings: matmul TFLOP/s in `dtype` (default bf16 on CUDA, fp32 on the CPU:
    the same measurement as the trainer's MFU denominator; a benchmark of fp32 kernels on a
    GPU passes float32, whose ceiling is ~15x lower) and copy GB/s (bytes read + written)."""
    from videoprism.flops import matmul_peak_tflops, peak_dtype

    device = torch.device(device)
    dtype = dtype or peak_dtype(device)
    nbytes = 1 << 30 if device.type == "cuda" else 1 << 26
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    t_cp = timeit(lambda: dst.copy_(src), device)
    return {
        "matmul_tflops": matmul_peak_tflops(device, dtype=dtype),
        "matmul_dtype": str(dtype).removeprefix("torch."),
        "copy_gbps": 2 * src.numel() * 4 / (t_cp.median_ms * 1e-3) / 1e9,
    }


def _commit() -> str:
    """VIDEOPRISM_COMMIT when set, else HEAD's short hash of this checkout, with "-dirty" when its files differ
    from HEAD (tracked changes or untracked files; bench/results, which the runs themselves rewrite, left out):
    the numbers of a run on uncommitted code are not that commit's."""
    if os.environ.get("VIDEOPRISM_COMMIT"):
        return os.environ["VIDEOPRISM_COMMIT"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=root).stdout.strip()
        if not head:
            return "unknown"
        status = subprocess.run(["git", "status", "--porcelain", "--", ".", ":(exclude)bench/results"],
                                capture_output=True, text=True, cwd=root)
        return head + ("-dirty" if status.returncode == 0 and status.stdout.strip() else "")
    except OSError:
        return "unknown"


def environment(device: torch.device | str) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "commit": _commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


@dataclass
class Report:
    """Rows of a benchmark; `show()` prints a table, `save(path)` writes JSON."""

    name: str
    device: str
    meta: dict = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)

    def __post_init__(self):
        self.meta = {**environment(self.device), **self.meta}

    def add(self, timing: Timing | None = None, **cols) -> dict:
        row = dict(cols)
        if timing is not None:
            row.update(ms=round(timing.median_ms, 4), p20_ms=round(timing.p20_ms, 4),
                       p80_ms=round(timing.p80_ms, 4), spread=round(timing.spread, 3))
        self.rows.append(row)
        return row

    def show(self) -> None:
        print(f"# {self.name} on {self.meta['device']} (torch {self.meta['torch']}, triton {self.meta['triton']}, "
              f"commit {self.meta['commit']}, {self.meta['date']})")
        # Nested details (per-row profiles, ...) are for the JSON, not the header line.
        extra = {k: v for k, v in self.meta.items()
                 if k not in ("device", "torch", "triton", "commit", "date") and not isinstance(v, dict)}
        if extra:
            print("# " + ", ".join(f"{k}={v}" for k, v in extra.items()))
        if not self.rows:
            return
        cols = list(dict.fromkeys(k for r in self.rows for k in r))
        fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
        widths = {c: max(len(c), *(len(fmt(r.get(c, ""))) for r in self.rows)) for c in cols}
        print("  ".join(c.rjust(widths[c]) for c in cols))
        for r in self.rows:
            print("  ".join(fmt(r.get(c, "")).rjust(widths[c]) for c in cols))

    def save(self, path: str) -> None:
        # Whole or not at all: a time box that kills the run mid-write must not leave a truncated file
        # in place of the rows saved before.
        write_json_atomic(path, {"name": self.name, "meta": self.meta, "rows": self.rows})
        print(f"wrote {path}")

