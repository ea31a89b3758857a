"""Video decoding for the training transform (16 x 288 x 288, random resized crop + flip), decoder by decoder.

    python -m bench.data                          # CPU: shared/media clips, a 720p long-GOP H.264 clip, synth clips
    python -m bench.data --device cuda            # adds DALI on the GPU (skipped with a message without DALI)
    python -m bench.data --write-clips DIR        # writes a clip set + DIR/clips.jsonl for machines without PyAV
    python -m bench.data --device cuda --clips DIR --out bench/results/data_gpu.json   # there: no PyAV needed

Rows: per-clip latency (median, p20/p80 ms) and clips/s of one clip at a time, for
* `videoprism-pyav`: the product's CPU path (decode.py: packet index + keyframe-aware seeking), index pass timed;
* `pyav-decode-all`: PyAV decoding every frame of the clip/window, then picking the sampled ones;
* `pyav-seek`: PyAV seeking to the keyframe before every sampled frame (no index, one seek per frame);
* `decord`: decord's VideoReader.get_batch (when decord is installed);
* `dali-cpu`: the DALI graph of dali_pipeline.py on the CPU (VP8/VP9/MJPEG only; decodes from frame 0);
* `dali-gpu xB`: the same graph on the GPU (NVDEC), a batch of B copies of the clip per run (B from --gpu-batches).
Baselines get their frame indices for free (computed before timing); every row then applies the same transform.
`ratio` = videoprism-pyav clips/s over the best CPU baseline of that clip (the target: >= 0.9).

`--clips DIR` times the clips of DIR/clips.jsonl (a clean manifest of `videoprism data index`: codec, frames, fps and
size per clip, so no demux pass is needed) instead of the shared and generated ones: the GPU machines have neither
PyAV nor FFmpeg nor ../shared, so `--write-clips` makes the set here (320x320 synthetic VP9 and H.264 clips of the
same scenes, 720p long-GOP H.264 and VP9 clips with a coarse texture so they stay small) and the call carries it
(bench/dali_wheel.sh). PyAV and decord rows run only where those are installed.

On CUDA the JSON's meta also holds what a stage-1 VideoPrism-B training step consumes: clips/s of the fastest
stage-1 `base` row at the same frame count in --train-step (bench.train_step's JSON), and each DALI GPU row gets
`x_stage1` = its clips/s over that (> 1: decoding keeps up with the step). JSON.
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import sys
import tempfile

import numpy as np
import torch

from bench.common import Report, arg_parser, comma_list, device_arg, out_json, positive_int, results_path, timeit
from videoprism.cli import run_command
from videoprism.data.dali_pipeline import error_reason
from videoprism.data.cores import usable_cores
from videoprism.data.transforms import Augment, apply_augment

try:
    import av
except ImportError:  # the GPU machines: only the DALI rows (with --clips)
    av = None

# The shared folder beside the checkout, or where VIDEOPRISM_SHARED points (as for the tests).
SHARED_MEDIA = os.path.join(os.environ.get("VIDEOPRISM_SHARED") or os.path.normpath(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared")), "media")
TRAIN_STEP_GPU = "bench/results/train_step_gpu.json"
# Encoder settings of make_720p per codec: H.264 as measured in data_cpu.json, VP9 for a small file.
ENCODERS = {"h264": ("libx264", "mp4", {"preset": "ultrafast", "crf": "28"}),
            "vp9": ("libvpx-vp9", "webm", {"deadline": "realtime", "cpu-used": "8", "crf": "50", "b": "0",
                                           "row-mt": "1"})}


def make_720p(path: str, seconds: int = 12, fps: int = 24, gop: int = 250, *, codec: str = "h264", block: int = 1,
              **options: str) -> None:
    """A 1280x720 clip with long GOPs (one keyframe per ~10 s), moving texture so frames differ.

    `block` > 1 makes the random texture coarser (block x block pixel squares): a file a few MB instead of tens of MB
    (`block=8, preset="veryfast"`: 1.8 MB in H.264), small enough to carry to a GPU machine. `options` override the
    encoder's."""
    rng = np.random.default_rng(0)
    hb, wb = -(-(720 + 64) // block), -(-(1280 + 64) // block)
    base = rng.integers(0, 255, (hb, wb, 3), dtype=np.uint8)
    base = np.repeat(np.repeat(base, block, 0), block, 1)[:720 + 64, :1280 + 64]
    encoder, fmt, defaults = ENCODERS[codec]
    opts = {**defaults, "g": str(gop), **({"keyint_min": str(gop)} if codec == "h264" else {}), **options}
    with av.open(path, "w", format=fmt) as out:
        s = out.add_stream(encoder, rate=fps, options=opts)
        s.width, s.height, s.pix_fmt = 1280, 720, "yuv420p"
        for t in range(seconds * fps):
            dy, dx = (t * 2) % 64, (t * 3) % 64
            out.mux(s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(base[dy:dy + 720, dx:dx + 1280]),
                                                        format="rgb24")))
        out.mux(s.encode())


def write_clips(out_dir: str, frames: int = 16, hd: bool = True) -> str:
    """The clip set for machines without PyAV (see the module docstring), without the 720p clips when not `hd`;
    returns the path of its clips.jsonl."""
    from videoprism.data.index import index_dataset
    from videoprism.data.synth import generate

    os.makedirs(out_dir, exist_ok=True)
    records = []
    for codec in ("vp9", "h264"):  # the same seed: the same rendered scenes in both codecs
        sub = f"synth_{codec}"
        generate(os.path.join(out_dir, sub), 2, seed=0, size=320, num_frames=3 * frames, codec=codec, workers=1)
        for split in ("train", "val"):  # both clips: generate puts the second of two in val
            for line in open(os.path.join(out_dir, sub, f"{split}.jsonl")):
                r = json.loads(line)
                records.append({**r, "path": os.path.join(sub, r["path"])})
    for codec, opts in (("h264", {"preset": "veryfast"}), ("vp9", {})) if hd else ():
        name = f"720p_longgop.{ENCODERS[codec][1]}"
        make_720p(os.path.join(out_dir, name), codec=codec, block=8, **opts)
        # A 4 s window in the middle of a GOP: 16 of its 96 frames.
        records.append({"path": name, "caption": f"coarse texture moving, 720p {codec}", "start": 4.0, "end": 8.0})
    raw = os.path.join(out_dir, "clips.raw.jsonl")
    with open(raw, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    out = os.path.join(out_dir, "clips.jsonl")
    r = index_dataset(raw, out, workers=1, min_frames=frames)
    if r["rejected"]:
        raise RuntimeError(f"{r['rejected']} generated clips were rejected: see {r['rejects']}")
    return out


def stage1_consumption(path: str, frames: int) -> tuple[dict | None, str | None]:
    """(what the fastest stage-1 VideoPrism-B step row at `frames` frames of bench.train_step's JSON consumes, None),
    or (None, why it is missing)."""
    if not os.path.isfile(path):
        return None, f"missing: {path} not found (python -m bench.train_step --device cuda writes it)"
    with open(path) as f:
        report = json.load(f)
    rows = [r for r in report.get("rows", []) if r.get("stage") == 1 and r.get("preset") == "base"
            and r.get("frames") == frames and r.get("clips_per_s")]
    if not rows:
        return None, f"missing: no stage-1 base {frames}-frame row in {path}"
    best = max(rows, key=lambda r: r["clips_per_s"])
    meta = report.get("meta", {})
    return {"clips_per_s": best["clips_per_s"], "mode": best.get("mode"), "batch": best.get("batch"),
            "frames": frames, "device": meta.get("device"), "commit": meta.get("commit"), "source": path}, None


def pyav_decode_all(path, indices, aug, res):
    want = set(indices)
    picked = {}
    with av.open(path) as c:
        s = c.streams.video[0]
        s.thread_type = "AUTO"
        for i, f in enumerate(c.decode(s)):
            if i in want:
                picked[i] = f.to_ndarray(format="rgb24")
            if i >= indices[-1]:
                break
    return apply_augment(torch.from_numpy(np.stack([picked[i] for i in indices])), aug, res)


def pyav_seek(path, pts_targets, aug, res):
    frames = []
    with av.open(path) as c:
        s = c.streams.video[0]
        s.thread_type = "AUTO"
        for t in pts_targets:
            c.seek(t, stream=s, backward=True, any_frame=False)
            for f in c.decode(s):
                if f.pts >= t:
                    frames.append(f.to_ndarray(format="rgb24"))
                    break
    return apply_augment(torch.from_numpy(np.stack(frames)), aug, res)


def default_clips(media: str, frames: int) -> list[tuple[str, float | None, float | None, object]]:
    """The shared clips (when present), a 720p long-GOP H.264 clip and a synthetic clip, generated in a temp folder."""
    from videoprism.data.synth import generate

    tmp = tempfile.mkdtemp(prefix="bench_data_")
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)  # ~50 MB of clips, every run
    clips = [(os.path.join(media, n), None, None, None) for n in ("water_bottle_drumming_vp9.webm",
                                                                   "water_bottle_drumming.mp4")]
    clips = [c for c in clips if os.path.isfile(c[0])]
    if not clips:
        print(f"note: no shared clips under {media}; timing generated clips only", file=sys.stderr)
    hd = os.path.join(tmp, "720p_longgop.mp4")
    make_720p(hd)
    clips.append((hd, 4.0, 8.0, None))  # a 4 s window in the middle of a GOP: 16 of its 96 frames
    generate(os.path.join(tmp, "synth"), 4, seed=0, size=96, num_frames=frames, workers=1)
    clips.append((os.path.join(tmp, "synth", "clips", "000000.webm"), None, None, None))
    return clips


def main(argv=None) -> int:
    """Bad arguments and inputs end the run with one `error: ...` line and exit status 2, not a traceback."""
    return run_command(_main, argv)


def _main(argv) -> None:
    p = arg_parser("bench.data", __doc__)
    p.add_argument("--device", type=device_arg, default="cpu",
                   help="cpu, or cuda to add the DALI GPU rows (default: %(default)s)")
    p.add_argument("--frames", type=positive_int, default=16, help="frames per clip (default: %(default)s)")
    p.add_argument("--resolution", type=positive_int, default=288,
                   help="square output frame size in pixels (default: %(default)s)")
    p.add_argument("--reps", type=positive_int, default=5, help="timed repeats per row (default: %(default)s)")
    p.add_argument("--media", default=SHARED_MEDIA, help="folder with the shared clips (default: %(default)s)")
    p.add_argument("--clips", default=None, help="time the clips of DIR/clips.jsonl instead (no PyAV needed)")
    p.add_argument("--write-clips", default=None, metavar="DIR", help="write the --clips set to DIR and exit")
    p.add_argument("--gpu-batches", type=comma_list(item=positive_int), default="1,8",
                   help="clips per DALI GPU run, comma-separated (default: %(default)s)")
    p.add_argument("--train-step", default=TRAIN_STEP_GPU,
                   help="bench.train_step JSON with the stage-1 rows (default: %(default)s)")
    p.add_argument("--out", default=None, type=out_json,
                   help="JSON path (default: bench/results/data_<cpu|gpu>.json)")
    args = p.parse_args(argv)
    device = args.device
    args.out = args.out or results_path("data", device)
    T, R = args.frames, args.resolution
    if args.write_clips:
        if av is None:
            raise ValueError("--write-clips needs PyAV (pip install av)")
        print(f"wrote {write_clips(args.write_clips, T)}")
        return
    if args.clips:
        from videoprism.data.manifest import read_source

        manifest = os.path.join(args.clips, "clips.jsonl")
        if not os.path.isfile(manifest):
            raise ValueError(f"--clips {args.clips}: no clips.jsonl there; pass a folder written by --write-clips DIR")
        samples, _ = read_source(manifest)
        clips = [(s.path, s.start, s.end, s) for s in samples]
    elif av is None:
        raise ValueError("PyAV is not installed: pass --clips DIR (a set written by --write-clips; "
                         "bench/dali_wheel.sh prepare writes .device/dali_clips)")
    else:
        clips = default_clips(args.media, T)
        shared = any(c[0].startswith(os.path.join(args.media, "")) for c in clips)
    if av is None:
        print("note: PyAV is not installed: no PyAV rows", file=sys.stderr)

    try:
        import decord
    except ImportError:
        decord = None
        print("note: decord is not installed: no decord rows", file=sys.stderr)
    try:
        from videoprism.data.dali_pipeline import DaliClips
        import nvidia.dali  # noqa: F401
    except ImportError:
        DaliClips = None
        print("note: NVIDIA DALI is not installed (pip install nvidia-dali-cuda130): no DALI rows, DALI GPU "
              "skipped", file=sys.stderr)
    dali_gpu = DaliClips is not None and device.type == "cuda"  # device_arg has checked that CUDA is there
    if DaliClips is not None and not dali_gpu:
        print("note: no CUDA device requested: DALI GPU rows skipped", file=sys.stderr)

    meta = {"frames": T, "resolution": R, "torch_threads": torch.get_num_threads(), "pyav": av is not None,
            "clips": args.clips or ("shared media + generated" if shared else "generated")}
    step = None
    if dali_gpu:
        step, why = stage1_consumption(args.train_step, T)
        meta["stage1_step"] = step or why
        print(f"stage-1 VideoPrism-B step ({T} frames): " + (f"{step['clips_per_s']} clips/s ({step['mode']}, batch "
                                                              f"{step['batch']})" if step else why))
    report = Report("data", "cpu" if not dali_gpu else device, meta=meta)
    aug = Augment.draw(np.random.default_rng(0))
    for path, start, end, sample in clips:
        if av is not None:
            from videoprism.data.decode import PyAVClip

            with PyAVClip(path) as c:
                idx = c.sample_indices(T, start, end)
                info = c.index
                codec, h, w, pts = info.codec, info.height, info.width, [info.pts[i] for i in idx]
        else:
            from videoprism.data.dali_pipeline import clip_plan

            codec, idx, h, w, _, _ = clip_plan(sample, T)  # the bench's clips are upright
        name = f"{os.path.basename(path)} {w}x{h} {codec}" + (f" [{start:g},{end:g})s" if start is not None else "")
        data = open(path, "rb").read()
        box = aug.box(h, w)
        methods = {}  # name -> (fn, clips per call)
        if av is not None:
            from videoprism.data.decode import decode_clip

            methods = {
                "videoprism-pyav": (lambda: decode_clip(path, T, R, aug, start=start, end=end), 1),
                "pyav-decode-all": (lambda: pyav_decode_all(path, idx, aug, R), 1),
                "pyav-seek": (lambda: pyav_seek(path, pts, aug, R), 1),
            }
        if decord is not None:
            methods["decord"] = (lambda: apply_augment(
                torch.from_numpy(decord.VideoReader(path, num_threads=0).get_batch(idx).asnumpy()), aug, R), 1)
        if DaliClips is not None and codec in ("vp8", "vp9", "mjpeg"):
            dc = DaliClips(batch_size=8, num_frames=T, resolution=R, device=torch.device("cpu"),
                           num_threads=usable_cores())
            methods["dali-cpu"] = (lambda: dc.run([data], [idx], [box], [aug.flip]), 1)
        if dali_gpu:
            dg = DaliClips(batch_size=max(args.gpu_batches), num_frames=T, resolution=R, device=device,
                           num_threads=usable_cores())
            for b in args.gpu_batches:
                methods[f"dali-gpu x{b}"] = (lambda b=b: dg.run([data] * b, [idx] * b, [box] * b, [aug.flip] * b), b)
        rows = {}
        for method, (fn, b) in methods.items():
            gpu = method.startswith("dali-gpu")
            try:  # DALI's run() ends in a host sync (it waits for its outputs): the host clock times the call whole
                t = timeit(fn, device if gpu else "cpu", warmup=1, reps=args.reps, host_clock=True)
            except Exception as e:  # noqa: BLE001 - a clip one method cannot decode is a row, not the end of the run
                report.add(clip=name, method=method, error=error_reason(e))
                print(f"{name}: {method} failed: {error_reason(e)}", file=sys.stderr)
                continue
            row = rows[method] = report.add(t, clip=name, method=method, clips_per_s=round(b * 1e3 / t.median_ms, 3))
            if gpu:
                row["ms_per_clip"] = round(t.median_ms / b, 3)
                if step:
                    row["x_stage1"] = round(row["clips_per_s"] / step["clips_per_s"], 2)
        cpu_others = [v["clips_per_s"] for k, v in rows.items()
                      if k != "videoprism-pyav" and not k.startswith("dali-gpu")]
        if "videoprism-pyav" in rows and cpu_others:  # ours against the best other CPU decoder
            best = max(cpu_others)
            rows["videoprism-pyav"]["ratio"] = round(rows["videoprism-pyav"]["clips_per_s"] / best, 3)
        report.save(args.out)  # after every clip: a time-boxed run keeps what it measured
    report.show()
    report.save(args.out)


if __name__ == "__main__":
    sys.exit(main())
