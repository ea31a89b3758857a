"""Video decoding for the training transform (16 x 288 x 288, random resized crop + flip), decoder by decoder.

    python -m bench.data                          # CPU: shared/media clips, a 720p long-GOP H.264 clip, synth clips
    python -m bench.data --device cuda            # adds DALI on the GPU (skipped with a message without DALI)

Rows: per-clip latency (median, p20/p80 ms) and clips/s of one clip at a time, for
* `videoprism-pyav`: the product's CPU path (decode.py: packet index + keyframe-aware seeking), index pass timed;
* `pyav-decode-all`: PyAV decoding every frame of the clip/window, then picking the sampled ones;
* `pyav-seek`: PyAV seeking to the keyframe before every sampled frame (no index, one seek per frame);
* `decord`: decord's VideoReader.get_batch (when decord is installed);
* `dali-cpu`: the DALI graph of dali_pipeline.py on the CPU (VP8/VP9/MJPEG only; decodes from frame 0);
* `dali-gpu`: the same graph on the GPU (NVDEC), also as a batch of 8 clips.
Baselines get their frame indices for free (computed before timing); every row then applies the same transform.
`ratio` = videoprism-pyav clips/s over the best CPU baseline of that clip (issue 5 asks >= 0.9). JSON.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import av
import numpy as np
import torch

from bench.common import Report, timeit
from videoprism.data.decode import PyAVClip, decode_clip
from videoprism.data.synth import generate
from videoprism.data.transforms import Augment, apply_augment

SHARED_MEDIA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "media")


def make_720p(path: str, seconds: int = 12, fps: int = 24, gop: int = 250) -> None:
    """A 1280x720 H.264 clip with long GOPs (one keyframe per ~10 s), moving texture so frames differ."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (720 + 64, 1280 + 64, 3), dtype=np.uint8)
    with av.open(path, "w", format="mp4") as out:
        s = out.add_stream("libx264", rate=fps, options={"g": str(gop), "keyint_min": str(gop), "preset": "ultrafast",
                                                       "crf": "28"})
        s.width, s.height, s.pix_fmt = 1280, 720, "yuv420p"
        for t in range(seconds * fps):
            dy, dx = (t * 2) % 64, (t * 3) % 64
            out.mux(s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(base[dy:dy + 720, dx:dx + 1280]),
                                                        format="rgb24")))
        out.mux(s.encode())


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


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu, or cuda to add the DALI GPU rows")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--resolution", type=int, default=288)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--media", default=SHARED_MEDIA, help="folder with the shared clips")
    p.add_argument("--out", default="bench/results/data_cpu.json")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    T, R = args.frames, args.resolution
    tmp = tempfile.mkdtemp(prefix="bench_data_")
    clips = [(os.path.join(args.media, n), None, None) for n in ("water_bottle_drumming_vp9.webm",
                                                                  "water_bottle_drumming.mp4")]
    clips = [c for c in clips if os.path.isfile(c[0])]
    if not clips:
        print(f"note: no shared clips under {args.media}; timing generated clips only", file=sys.stderr)
    hd = os.path.join(tmp, "720p_longgop.mp4")
    make_720p(hd)
    clips.append((hd, 4.0, 8.0))  # a 4 s window in the middle of a GOP: 16 of its 96 frames
    generate(os.path.join(tmp, "synth"), 4, seed=0, size=96, num_frames=T, workers=1)
    clips.append((os.path.join(tmp, "synth", "clips", "000000.webm"), None, None))

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
    dali_gpu = DaliClips is not None and device.type == "cuda" and torch.cuda.is_available()
    if DaliClips is not None and not dali_gpu:
        print("note: no CUDA device requested/available: DALI GPU rows skipped", file=sys.stderr)

    report = Report("data", "cpu" if not dali_gpu else device, meta={"frames": T, "resolution": R,
                                                                      "torch_threads": torch.get_num_threads()})
    aug = Augment.draw(np.random.default_rng(0))
    for path, start, end in clips:
        with PyAVClip(path) as c:
            idx = c.sample_indices(T, start, end)
            info = c.index
            pts = [info.pts[i] for i in idx]
        name = f"{os.path.basename(path)} {info.width}x{info.height} {info.codec}" + (
            f" [{start:g},{end:g})s" if start is not None else "")
        data = open(path, "rb").read()
        box = aug.box(info.height, info.width)
        methods = {
            "videoprism-pyav": lambda: decode_clip(path, T, R, aug, start=start, end=end),
            "pyav-decode-all": lambda: pyav_decode_all(path, idx, aug, R),
            "pyav-seek": lambda: pyav_seek(path, pts, aug, R),
        }
        if decord is not None:
            methods["decord"] = lambda: apply_augment(
                torch.from_numpy(decord.VideoReader(path, num_threads=0).get_batch(idx).asnumpy()), aug, R)
        if DaliClips is not None and info.codec in ("vp8", "vp9", "mjpeg"):
            dc = DaliClips(batch_size=8, num_frames=T, resolution=R, device=torch.device("cpu"),
                           num_threads=os.cpu_count() or 1)
            methods["dali-cpu"] = lambda: dc.run([data], [idx], [box], [aug.flip])
        rows = {}
        for method, fn in methods.items():
            t = timeit(fn, "cpu", warmup=1, reps=args.reps)
            rows[method] = report.add(t, clip=name, method=method, clips_per_s=round(1e3 / t.median_ms, 3))
        if dali_gpu:
            dg = DaliClips(batch_size=8, num_frames=T, resolution=R, device=device, num_threads=os.cpu_count() or 1)
            for b in (1, 8):
                t = timeit(lambda: dg.run([data] * b, [idx] * b, [box] * b, [aug.flip] * b), device)
                report.add(t, clip=name, method=f"dali-gpu x{b}", clips_per_s=round(b * 1e3 / t.median_ms, 3))
        best = max(v["clips_per_s"] for k, v in rows.items() if k != "videoprism-pyav")
        rows["videoprism-pyav"]["ratio"] = round(rows["videoprism-pyav"]["clips_per_s"] / best, 3)
    report.show()
    report.save(args.out)


if __name__ == "__main__":
    main()
