"""Manifest startup benchmark: what reading a training manifest costs each rank, parsed from JSON vs mapped from
its pack (`videoprism data pack`, videoprism/data/pack.py), side by side in one run; and mapped from the pack of a
copy of the manifest (`pack_copied`: another file of the same content, as on another machine or after `cp -a`),
which a reader uses once it has checked the manifest's content against the pack's hash of it.

    python -m bench.manifest                              # 1M synthetic lines
    python -m bench.manifest --lines 200000 --out bench/results/manifest_cpu.json

Every rank reads the whole manifest before its first step. Each repeat reads it in a fresh process (as a rank
starts) and reports: `read_s`, the time `read_manifest` takes; `private_mb`, the memory that process owns after it
(RssAnon growth: what 8 ranks of a node pay 8 times; a pack's pages are file-backed and shared); `worker_mb`,
what a forked DataLoader worker copies of it while it touches every sample (Private_Dirty growth); `sample_us`,
what that worker's read of one sample costs (`samples[i]`, before any decode), beside `sample_pickle_us`, the same
reads with pickle.loads as the records' decoder (the one before, which called whatever a record named). The lines are
varied as real ones are (windows, int and dict labels, probe and extra fields). Floors: a pack's read is a header
read and a map, ~0 s; its bytes are read from disk or page cache as samples are touched.
"""
from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time

from bench.common import Report, Timing, arg_parser, out_json, positive_int
from videoprism.cli import run_command

MODES = ("parse", "pack", "pack_copied")


def write_manifest(path: str, lines: int) -> None:
    """`lines` varied manifest lines (relative paths; windows, labels, probe and extra fields on some)."""
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(lines):
            rec = {"path": f"clips/{i // 1000:05d}/clip_{i:08d}.mp4", "caption": f"a person does thing {i % 977}"}
            if i % 3 == 0:
                rec.update(start=1.5, end=4.0 + i % 7, dataset="webvid")
            if i % 4 == 1:
                rec["label"] = {"colour": i % 3, "shape": i % 5}
            if i % 5 == 2:
                rec.update(codec="h264", frames=240, fps=30.0, width=640, height=360, duration=8.0)
                rec["source_id"] = f"yt:{i:011d}"
            fh.write(json.dumps(rec) + "\n")


def _kb(field: str, path: str = "/proc/self/status") -> int:
    with open(path) as fh:
        return sum(int(line.split()[1]) for line in fh if line.startswith(field))


def measure(manifest: str, mode: str) -> dict:
    """In a fresh process: read the manifest as a rank does, then fork a worker that touches every sample."""
    from videoprism.data.manifest import read_manifest

    before = _kb("RssAnon")
    t0 = time.perf_counter()
    samples, _ = read_manifest(manifest, use_pack=mode != "parse")
    read_s = time.perf_counter() - t0
    private_mb = (_kb("RssAnon") - before) * 1024 / 1e6  # /proc's kB are KiB; MB as file_mb
    if mode != "parse" and samples.buffers()[0].__class__ is not memoryview:
        raise RuntimeError(f"{manifest} was parsed, not mapped: its pack does not match it")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the worker: every sample built once, as an epoch's __getitem__ calls do
        start = _kb("Private_Dirty", "/proc/self/smaps_rollup")
        for i in range(len(samples)):
            samples[i]
        dirty_kb = _kb("Private_Dirty", "/proc/self/smaps_rollup") - start
        os.write(w, json.dumps(dict(sample_times(samples), dirty_kb=dirty_kb)).encode())
        os._exit(0)
    os.close(w)
    worker = json.loads(os.read(r, 4096))
    os.waitpid(pid, 0)
    return {"read_s": read_s, "private_mb": private_mb, "worker_mb": worker.pop("dirty_kb") * 1024 / 1e6,
            "samples": len(samples), **worker}


def sample_times(samples, count: int = 100_000) -> dict:
    """Microseconds a sample's read takes over the first `count` samples, best of 3 passes (its pages already
    touched): with the records' decoder (`sample_us`) and with pickle.loads in its place (`sample_pickle_us`),
    passes alternating so that the machine's load falls on both."""
    from videoprism.data import manifest

    decoders = {"sample_us": manifest.plain_values, "sample_pickle_us": pickle.loads}
    count, best = min(count, len(samples)), dict.fromkeys(decoders, math.inf)
    try:
        for _ in range(3):
            for key, decode in decoders.items():
                manifest.plain_values = decode
                t0 = time.perf_counter()
                for i in range(count):
                    samples[i]
                best[key] = min(best[key], (time.perf_counter() - t0) / count * 1e6)
    finally:
        manifest.plain_values = decoders["sample_us"]
    return best


def _in_fresh_process(manifest: str, mode: str) -> dict:
    code = f"import json, bench.manifest as m; print(json.dumps(m.measure({manifest!r}, {mode!r})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    """Bad arguments end the run with one `error: ...` line and exit status 2, not a traceback."""
    return run_command(_main, argv)


def _main(argv: list[str] | None) -> None:
    from videoprism.data.pack import write_pack

    p = arg_parser("bench.manifest", __doc__)
    p.add_argument("--lines", type=positive_int, default=1_000_000, help="manifest lines (default: %(default)s)")
    p.add_argument("--reps", type=positive_int, default=3, help="fresh-process reads per mode (default: %(default)s)")
    p.add_argument("--out", default=None, type=out_json, help="JSON output path")
    args = p.parse_args(argv)
    if not os.path.exists("/proc/self/smaps_rollup"):
        raise RuntimeError("bench.manifest measures memory with Linux /proc accounting; run it on Linux")
    root = tempfile.mkdtemp(prefix="bench_manifest_")
    try:
        manifest = os.path.join(root, "m.jsonl")
        write_manifest(manifest, args.lines)
        t0 = time.perf_counter()
        packed = write_pack(manifest)
        pack_s = time.perf_counter() - t0
        # The copy: the same content in the same folder (its relative paths resolve alike), another file.
        copied = os.path.join(root, "copy.jsonl")
        shutil.copy2(manifest, copied)
        shutil.copy2(packed["pack"], copied + ".pack")
        paths = {"parse": manifest, "pack": manifest, "pack_copied": copied}
        sizes = {"parse": os.path.getsize(manifest) / 1e6, "pack": os.path.getsize(packed["pack"]) / 1e6}
        sizes["pack_copied"] = sizes["pack"]
        report = Report("manifest", "cpu", meta={"lines": args.lines, "pack_write_s": round(pack_s, 2),
                                                 "reps": args.reps})
        runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
        for _ in range(args.reps):
            for mode in MODES:  # alternating: page-cache effects fall on both alike
                runs[mode].append(_in_fresh_process(paths[mode], mode))
        medians = {}
        for mode in MODES:
            t = Timing.of([r["read_s"] * 1e3 for r in runs[mode]])
            medians[mode] = t.median_ms
            report.add(mode=mode, file_mb=round(sizes[mode], 1), read_s=round(t.median_ms / 1e3, 6),
                       read_p20_s=round(t.p20_ms / 1e3, 6), read_p80_s=round(t.p80_ms / 1e3, 6),
                       private_mb=round(sorted(r["private_mb"] for r in runs[mode])[len(runs[mode]) // 2], 1),
                       worker_mb=round(sorted(r["worker_mb"] for r in runs[mode])[len(runs[mode]) // 2], 1),
                       **{key: round(min(r[key] for r in runs[mode]), 2) for key in ("sample_us", "sample_pickle_us")})
    finally:
        shutil.rmtree(root, ignore_errors=True)
    parse, pack, copied = report.rows
    report.meta["startup_ratio"] = round(medians["parse"] / medians["pack"], 1)
    report.meta["sample_ratio"] = round(pack["sample_us"] / pack["sample_pickle_us"], 2)
    report.show()
    print(f"# a rank's manifest read: {parse['read_s']:.2f} s and {parse['private_mb']:.0f} MB of its own parsed, "
          f"{pack['read_s'] * 1e3:.1f} ms and {pack['private_mb']:.0f} MB mapped from the pack "
          f"({pack['file_mb']:.0f} MB, shared by the processes of a machine); {copied['read_s'] * 1e3:.0f} ms from "
          "the pack of a copy of the manifest (its content checked)")
    print(f"# a sample's read from the pack: {pack['sample_us']:.2f} us, {pack['sample_pickle_us']:.2f} us with "
          f"pickle.loads as its decoder ({pack['sample_us'] / pack['sample_pickle_us']:.2f}x)")
    if args.out:
        report.save(args.out)


if __name__ == "__main__":
    sys.exit(main())
