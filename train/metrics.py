"""Per-step training metrics (STYLE 9): progress bar, JSONL records, PNG curves.

Throughput numbers are per optimizer step over all ranks: clips/s, video tokens/s (the
visible tokens the encoder computes on), MFU = model FLOPs per second / (ranks x the
measured matmul ceiling), the share of the step spent waiting for data, and peak memory
(CUDA allocator peak on GPU, process peak RSS on the CPU): those two are rank 0's, which logs.
"""
from __future__ import annotations

import json
import os
import re
import resource
import sys

import torch

from videoprism.paths import atomic_path, echo, finite_or_null, printable


def metrics_path(out_dir: str) -> str:
    """Where MetricsLogger writes a run's per-step records (and print_outputs says they are)."""
    return os.path.join(out_dir, "metrics.jsonl")


VAL_REJECT = " (data.val)"  # how a validation clip's skip is named in the rejects files


def recorded_rejects(out_dir: str) -> list[dict]:
    """The run's skipped samples as its rejects.rank<r>.jsonl files record them (every rank's, of every start of the
    run), each once: a resume from an earlier step meets the same bad samples at the same steps again, and every
    start meets the validation split's (recorded with the step it started at), so those count once whatever the
    step. A line cut by a crash is left out."""
    seen: dict[tuple, dict] = {}
    for name in sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []:
        if not re.fullmatch(r"rejects\.rank\d+\.jsonl", name):
            continue
        with open(os.path.join(out_dir, name), encoding="utf-8", errors="replace") as fh:
            for line in fh:
                try:
                    rec = json.loads(line)
                    key = (rec["path"], rec["reason"])
                    val = key[0].endswith(VAL_REJECT)
                except (ValueError, KeyError, TypeError, AttributeError):
                    continue
                # "n": a repeat of the sample within one step (two epochs met it in that step), another skip.
                seen.setdefault(key if val else (rec.get("step"), *key, rec.get("n", 0)), rec)
    return list(seen.values())


def print_outputs(results: dict, out_dir: str, keys: tuple[str, ...] = ()) -> None:
    """The closing lines of a training stage (both stages end alike): the stage's own `keys` of `results`, the
    files written (checkpoint, export, plot, the resolved config), where the per-step metrics are and how many
    steps were skipped."""
    for key in (*keys, "checkpoint", "export", "plot", "config"):
        if results.get(key) is not None:  # a plot that failed was said when it did
            echo(f"{key}: {results[key]}")
    listed_in = f" (listed in {results['rejects']})" if "rejects" in results else ""
    echo(f"metrics: {metrics_path(out_dir)}; non-finite steps skipped: {results['nonfinite']}; bad samples "
         f"skipped: {results['skipped_samples']}{listed_in}")


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory in GB (1e9 bytes, as the field names say): the GPU's allocated tensors since the last
    reset, or on the CPU the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


class MetricsLogger:
    """Rank 0 writes `out_dir/metrics.jsonl` and drives a tqdm bar; other ranks only count."""

    def __init__(self, out_dir: str, *, total_steps: int, start_step: int, enabled: bool, desc: str):
        self.enabled = enabled
        self.path = metrics_path(out_dir)
        self.bar = None
        self.lost = 0  # records not written since the last one that was (see write)
        if enabled:
            os.makedirs(out_dir, exist_ok=True)
            end_a_cut_line(self.path)
            from videoprism.progress import progress_bar

            self.bar = progress_bar(total=total_steps, initial=start_step, desc=desc, dynamic_ncols=True,
                                    file=sys.stdout, mininterval=1.0)

    def step(self, step: int, record: dict, *, show: bool) -> None:
        if not self.enabled:
            return
        self.bar.update(1)
        if show:
            self.bar.set_postfix_str(
                f"loss {record['loss']:.4f} | {record['clips_per_s']:.1f} clips/s | "
                f"{record['tokens_per_s']:.3g} tok/s | MFU {100 * record['mfu']:.1f}% | "
                f"data {100 * record['data_wait']:.0f}% | mem {record['peak_mem_gb']:.2f} GB", refresh=False)
        self.write({"step": step, **record})

    def write(self, record: dict) -> None:
        """Append `record`. A record that cannot be written (a full or failing disk) is said, not raised: the
        records are what the run observed, its checkpoints what it keeps (a full disk stops the run at the next
        one, with its own message), and a run of hours must not end on a log line. Said once until a record is
        written again, which says how many were lost."""
        if not self.enabled:
            return
        try:
            if self.lost:
                end_a_cut_line(self.path)  # the failed write may have left half a record
            with open(self.path, "a") as fh:
                fh.write(json.dumps(finite_or_null(record), allow_nan=False) + "\n")
        except OSError as e:
            if not self.lost:
                self.message(f"cannot write {self.path} ({e.strerror or e}): training goes on without its "
                             f"records until it can; free space or fix the permissions under "
                             f"{os.path.dirname(self.path)}")
            self.lost += 1
            return
        if self.lost:
            self.message(f"{self.path} written again; {self.lost} record{'s' if self.lost > 1 else ''} lost")
            self.lost = 0

    def message(self, text: str) -> None:
        """`text` on the console, above the progress bar, its control characters escaped (printable): the run's
        messages name paths and samples (a skipped shard member named "x\\nerror: ..." forged a line)."""
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(printable(text))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def end_a_cut_line(path: str) -> None:
    """A run killed (or out of disk) in the middle of a record leaves a line with no newline: a resume's first
    record would be glued to it and both lost. Ending the cut line keeps the damage to that one record."""
    try:
        with open(path, "rb+") as fh:
            fh.seek(0, os.SEEK_END)
            if fh.tell() == 0:
                return
            fh.seek(-1, os.SEEK_END)
            if fh.read(1) != b"\n":
                fh.write(b"\n")
    except FileNotFoundError:
        pass


def read_jsonl(path: str) -> list[dict]:
    """The records of a metrics log; a line that is not a JSON object (a record cut by a kill) is left out."""
    out = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            try:
                record = json.loads(line) if line.strip() else None
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                out.append(record)
    return out


def run_steps(records: list[dict]) -> dict[int, dict]:
    """{step: record} of the run that wrote the last of a log's `records`: later records of a step win, so a
    resumed run counts once; a resume from an earlier step drops the steps after it (an abandoned future), and a
    fresh start's record every step before it."""
    by_step: dict[int, dict] = {}
    for r in records:
        if "config" in r or "resumed_from" in r:
            at = r.get("at_step", 0)
            by_step = {s: rec for s, rec in by_step.items() if s <= at}
        elif "step" in r and "loss" in r:
            by_step[r["step"]] = r
    return by_step


def plot_curves(jsonl: str, png: str, *, keys: tuple[str, ...] = ("loss",)) -> str:
    """Loss curves (one panel per key) and clips/s against the step, from the JSONL log (`run_steps`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_step = run_steps(read_jsonl(jsonl))
    steps = sorted(by_step)
    panels = [k for k in keys if any(k in by_step[s] for s in steps)] + ["clips_per_s"]
    # squeeze=False: one panel (a run that logged no loss, e.g. a resume of a finished run) is still a list.
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5), squeeze=False)
    for ax, key in zip(axes[0], panels):
        xs = [s for s in steps if key in by_step[s]]
        ax.plot(xs, [by_step[s][key] for s in xs])
        ax.set_xlabel("step")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        with atomic_path(png) as tmp:  # a kill or a full disk mid-write: the previous plot, not a cut PNG
            fig.savefig(tmp, dpi=100, format="png")
    finally:
        plt.close(fig)
    return png
