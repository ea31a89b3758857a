"""Embedded synthetic video-text data (DESIGN 7): coloured shapes moving in captioned directions.

Each clip shows a main shape (colour, shape) that moves left, right, up or down across a textured background.
Scenes:
* "pair" (default): a second shape grows, shrinks or stays still and the caption names both ("a red circle moves
  left while a blue square grows");
* "single": the main shape alone ("a red circle moves left"). With 18 appearances a training batch of a few dozen
  clips holds same-looking clips that differ only in direction, so a contrastive model must learn motion to tell
  their captions apart (with "pair", appearance alone almost always identifies the caption).
Retrieval and probes measure appearance and motion. Clips are real encoded files (VP9 in WebM
by default, H.264 in MP4 on request) written with PyAV, so they go through the same decoders as real data.

`generate(out_dir, num, seed=0, codec="vp9")` writes
    out_dir/clips/000000.webm ...
    out_dir/train.jsonl, out_dir/val.jsonl   (path, caption, dataset="synth", label={colour, shape, direction};
                                              every 10th clip goes to val, the last one when num < 10)
    out_dir/spm.model                        (SentencePiece trained on the canonical captions; pad 0, eos 1, unk 2,
                                              no BOS, like the official c4_en model)
    out_dir/prompts/<label>.txt              (zero-shot prompt templates per label: `prompt_templates`)
    out_dir/synth.json                       (class names per label, file names, settings)
Each file is written whole or not at all, and synth.json last, once the others are (a re-run removes it first): a
folder with synth.json is a complete one of its settings, which the pipeline reuses as it is.
Everything is a function of the seed: one generator per clip keyed by (seed, clip), single-threaded encoders.
"""
from __future__ import annotations

import contextlib
import glob
import json
import multiprocessing.connection
import os
import sys

import numpy as np

from ..paths import atomic_file, atomic_path, echo
from ..preemption import Preempted, stopped_line, stopping
from .cores import usable_cores
from .text import train_spm

COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 80, 230), "yellow": (235, 215, 40),
           "white": (240, 240, 240), "purple": (150, 60, 200)}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
ACTIONS = {"grows": 1.7, "shrinks": 0.5, "stays still": 1.0}  # final / initial size of the second shape
VERBS = ("moves", "slides", "travels")
CODECS = {"vp9": ("libvpx-vp9", "webm", {"deadline": "realtime", "cpu-used": "8", "crf": "32", "b": "0",
                                          "threads": "1", "row-mt": "0"}),
          "h264": ("libx264", "mp4", {"preset": "ultrafast", "crf": "23", "threads": "1"})}
VAL_EVERY = 10  # clip i goes to val when i % VAL_EVERY == VAL_EVERY - 1 (see _is_val)


def _mask(shape: str, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    if shape == "circle":
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    if shape == "square":
        return (np.abs(yy - cy) <= r) & (np.abs(xx - cx) <= r)
    # Upward triangle inscribed in the same box: half-width grows linearly from the apex.
    return (yy >= cy - r) & (yy <= cy + r) & (np.abs(xx - cx) <= (yy - (cy - r)) / 2)


SCENES = ("pair", "single")
DEFAULT_SCENE = "pair"  # generate()'s and `videoprism data synth --scene`'s


def _clip_spec(seed: int, i: int, scene: str = DEFAULT_SCENE) -> dict:
    # Both scenes draw the same numbers in the same order: a clip's main shape and motion do not depend on the scene.
    rng = np.random.default_rng([seed, i])
    c1, c2 = rng.choice(len(COLOURS), 2, replace=False)
    s1, s2 = rng.integers(len(SHAPES), size=2)
    return {"colour": int(c1), "shape": int(s1), "direction": int(rng.integers(len(DIRECTIONS))),
            "colour2": int(c2), "shape2": int(s2), "action": int(rng.integers(len(ACTIONS))),
            "verb": int(rng.integers(len(VERBS))), "scene": scene, "rng": rng}


def _main_clause(colour: str, shape: str, verb: str, direction: str) -> str:
    return f"a {colour} {shape} {verb} {direction}"


def caption_of(spec: dict) -> str:
    main = _main_clause(list(COLOURS)[spec["colour"]], SHAPES[spec["shape"]], VERBS[spec["verb"]],
                        list(DIRECTIONS)[spec["direction"]])
    if spec["scene"] == "single":
        return main
    return f"{main} while a {list(COLOURS)[spec['colour2']]} {SHAPES[spec['shape2']]} {list(ACTIONS)[spec['action']]}"


def class_names() -> dict[str, list[str]]:
    """Each label's class names in label-id order (synth.json's "classes")."""
    return {"colour": list(COLOURS), "shape": list(SHAPES), "direction": list(DIRECTIONS)}


def prompt_templates(label: str) -> list[str]:
    """Zero-shot prompts for `label` ("colour", "shape" or "direction"): the captions' main clause ("a red circle
    moves left") with `{}` for the label's word, once for every value of the other words (the prompt ensemble of
    `videoprism eval zeroshot`, train/zeroshot.py: a class's embedding averages them, so no colour, shape or verb
    is favoured)."""
    words = {"colour": list(COLOURS), "shape": list(SHAPES), "verb": list(VERBS), "direction": list(DIRECTIONS)}
    if label not in class_names():
        raise ValueError(f"synthetic labels are {', '.join(class_names())}, got {label!r}")
    words[label] = ["{}"]
    return [_main_clause(c, s, v, d) for c in words["colour"] for s in words["shape"] for v in words["verb"]
            for d in words["direction"]]


def render(spec: dict, size: int, num_frames: int) -> np.ndarray:
    """uint8 [num_frames, size, size, 3] frames of one clip."""
    rng = spec["rng"]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    base = rng.integers(20, 70, size=3)
    background = np.clip(base + rng.normal(0, 12, size=(size, size, 3)), 0, 255).astype(np.uint8)
    dx, dy = DIRECTIONS[list(DIRECTIONS)[spec["direction"]]]
    r1 = size * rng.uniform(0.10, 0.15)
    # The main shape travels 60% of the frame along its direction, centred on a random point of the other axis.
    other = rng.uniform(0.25, 0.75) * size
    path = np.linspace(0.2, 0.8, num_frames) * size
    if dx + dy < 0:
        path = path[::-1]
    r2_0 = size * rng.uniform(0.08, 0.12)
    grow = list(ACTIONS.values())[spec["action"]]
    c2y, c2x = rng.uniform(0.2, 0.8, size=2) * size
    col1, col2 = (np.array(list(COLOURS.values())[spec[k]], np.uint8) for k in ("colour", "colour2"))
    frames = np.empty((num_frames, size, size, 3), np.uint8)
    for t in range(num_frames):
        f = background.copy()
        r2 = r2_0 * grow ** (t / max(num_frames - 1, 1))
        if spec["scene"] == "pair":
            f[_mask(SHAPES[spec["shape2"]], yy, xx, c2y, c2x, r2)] = col2
        cy, cx = (other, path[t]) if dx else (path[t], other)
        f[_mask(SHAPES[spec["shape"]], yy, xx, cy, cx, r1)] = col1
        frames[t] = f
    return frames


def encode(frames: np.ndarray, path: str, codec: str, fps: int) -> None:
    """Write RGB frames as a real video file with PyAV (no ffmpeg binary needed)."""
    # Imported here, not at the top: the `videoprism` CLI reads SCENES from this module to build its parser.
    import av

    name, fmt, options = CODECS[codec]
    # bitexact: no random segment UID or library version strings, so a seed gives the same bytes.
    with av.open(path, "w", format=fmt, container_options={"fflags": "+bitexact"}) as out:
        stream = out.add_stream(name, rate=fps, options={**options, "flags": "+bitexact"})
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def _make_clip(args) -> dict:
    out_dir, i, seed, codec, size, num_frames, fps, scene = args
    spec = _clip_spec(seed, i, scene)
    rel = os.path.join("clips", f"{i:06d}.{CODECS[codec][1]}")
    with atomic_path(os.path.join(out_dir, rel)) as tmp:  # a kill mid-encode: no cut clip under its name
        encode(render(spec, size, num_frames), tmp, codec, fps)
    return {"path": rel, "caption": caption_of(spec), "dataset": "synth",
            "label": {k: spec[k] for k in ("colour", "shape", "direction")}}


def _encode(jobs: list, workers: int):
    """The clips' records in order, encoded by `workers` processes (in this one for 1). An error, Ctrl-C or a stop
    signal kills the processes (index.worker_pool: the pool's own shutdown waited for every clip queued) and removes
    the temporary files of the clips they were writing (atomic_path names them by the writer's pid)."""
    if workers == 1:
        yield from map(_make_clip, jobs)
        return
    from .index import submit, worker_pool

    procs: list = []
    try:
        with worker_pool(workers) as pool:
            try:
                futures = [submit(pool, _make_clip, job) for job in jobs]
                for f in futures:
                    yield f.result()
            except BaseException:
                procs = list((pool._processes or {}).values())  # private, as worker_pool's kill
                raise
    except BaseException:
        multiprocessing.connection.wait([p.sentinel for p in procs], timeout=10)  # killed: gone in an instant
        for p in procs:
            for tmp in glob.glob(os.path.join(glob.escape(jobs[0][0]), "clips", f"*.{p.pid}.tmp")):
                with contextlib.suppress(OSError):
                    os.remove(tmp)
        raise


def _stopped_after(num: int, out_dir: str) -> str:
    return f"{out_dir} is incomplete (no synth.json, not all {num} clips): the same command writes it again"


def _is_val(i: int, num: int) -> bool:
    """Clip i of num goes to val: every VAL_EVERY-th clip, or the last one when num < VAL_EVERY, so that every
    num >= 2 gives a non-empty val (sets of VAL_EVERY or more clips split as they always did)."""
    return i % VAL_EVERY == VAL_EVERY - 1 or (num < VAL_EVERY and i == num - 1)


def generate(out_dir: str, num: int, *, seed: int = 0, codec: str = "vp9", size: int = 96, num_frames: int = 16,
             fps: int = 8, scene: str = DEFAULT_SCENE, workers: int | None = None, progress: bool = False) -> dict:
    """Write `num` clips, train/val manifests and a SentencePiece model under `out_dir`; returns synth.json's dict.
    `progress`: a bar with clips/s on stderr while the clips are encoded."""
    from ..progress import progress_bar

    if codec not in CODECS:
        raise ValueError(f"codec must be one of {sorted(CODECS)}, got {codec!r}")
    if scene not in SCENES:
        raise ValueError(f"scene must be one of {SCENES}, got {scene!r}")
    for name, value, lo in (("num", num, 1), ("size", size, 16), ("num_frames", num_frames, 1), ("fps", fps, 1),
                            ("seed", seed, 0)):
        if not isinstance(value, int) or value < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")
    if num < 2:
        raise ValueError(f"num must be >= 2: train.jsonl and val.jsonl get at least one clip each, got {num}")
    if size % 2:
        raise ValueError(f"size must be even (4:2:0 chroma), got {size}")
    os.makedirs(os.path.join(out_dir, "clips"), exist_ok=True)
    # A re-run over a folder (other settings, or the same after a kill): the old synth.json said the folder was
    # complete, with its settings, while its clips and manifests were being replaced.
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(out_dir, "synth.json"))
    jobs = [(out_dir, i, seed, codec, size, num_frames, fps, scene) for i in range(num)]
    workers = min(len(jobs), workers or usable_cores())  # one per clip at most: the others would have none
    records: list[dict] = []
    try:
        # A scheduler's notice (SIGTERM, SLURM's SIGUSR1) stops it as Ctrl-C does, with a line, not silently.
        with stopping(True, lambda signum: Preempted(signum, None, None)), \
                progress_bar(total=num, unit="clip", desc="synth", disable=not progress, smoothing=0) as bar:
            for r in _encode(jobs, workers):
                records.append(r)
                bar.update()
    except KeyboardInterrupt:
        raise KeyboardInterrupt(_stopped_after(num, out_dir)) from None
    except Preempted as stop:
        echo(stopped_line(stop.signum, _stopped_after(num, out_dir)), file=sys.stderr, flush=True)
        raise
    splits = {"train": [r for i, r in enumerate(records) if not _is_val(i, num)],
              "val": [r for i, r in enumerate(records) if _is_val(i, num)]}
    for split, recs in splits.items():
        with atomic_file(os.path.join(out_dir, f"{split}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in recs)
    train_spm([r["caption"] for r in records], os.path.join(out_dir, "spm.model"))
    prompts = {label: os.path.join("prompts", f"{label}.txt") for label in class_names()}
    os.makedirs(os.path.join(out_dir, "prompts"), exist_ok=True)
    for label, rel in prompts.items():
        with atomic_file(os.path.join(out_dir, rel), "w") as f:
            f.writelines(t + "\n" for t in prompt_templates(label))
    meta = {"num": num, "seed": seed, "codec": codec, "size": size, "num_frames": num_frames, "fps": fps, "scene": scene,
            "train": "train.jsonl", "val": "val.jsonl", "spm_model": "spm.model",
            "num_train": len(splits["train"]), "num_val": len(splits["val"]),
            "classes": class_names(), "prompts": prompts}
    with atomic_file(os.path.join(out_dir, "synth.json"), "w") as f:
        json.dump(meta, f, indent=1)
    return meta
