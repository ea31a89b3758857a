"""The DALI graph: encoded bytes -> uniformly sampled frames -> crop box resize -> colour -> flip, on the GPU or CPU.

    external_source(encoded uint8 [bytes], frames int32 [T], roi_start/roi_end float [2] (y, x), colour float [3, 3],
                    flip int32 [])
      -> fn.decoders.video(frames=...)   # "mixed": NVDEC on the GPU; "cpu": libavcodec (VP8/VP9/MJPEG only)
      -> fn.resize(roi=box, size=[R, R], linear, antialias)  -> float
      -> fn.coord_transform(M=colour)    # BT.601 RGB -> the stream's matrix's (transforms.matrix_fix)
      -> fn.cast(uint8)
      -> fn.flip(horizontal=flip)        -> uint8 [B, T, R, R, 3]

The loader computes the frame indices and crop boxes (transforms.py), so this graph and the PyAV path give the
same frames; on a CPU-only machine the same graph runs with device="cpu", which is how tests cover its logic.
GPU outputs reach torch through DLPack and are copied on the device (DALI reuses its output buffers on the next
run), never through host memory.

Traps handled (measured): after any error a DALI pipeline is dead, so it is rebuilt and the batch is retried one
sample at a time to find the file; that file goes to PyAV, which rejects a bad one with its reason and decodes a
good one DALI cannot (NVDEC has per-GPU limits: minimum sizes, profiles); a (codec, size) that DALI failed on for
good files in two batches, 3 at least and 8 for each it decoded, goes straight to PyAV from then on, but for one
clip in PROBE_EVERY, which tries DALI again on its own (a success gives the shape back). The decoder returns
all-zero frames past a cut without raising, and black frames (a fade-in) are all zeros too, so a sample with an
all-zero frame is decoded again by PyAV, which rejects a cut file (too few frames) and decodes a black one. A file
PyAV rejected after DALI goes straight to PyAV in later epochs: DALI's FFmpeg and DALI itself print their messages
about a bad file with no switch to stop them (DaliClips.rejected), so they come once a run, not once an epoch.
"""
from __future__ import annotations

import math
import sys
from fractions import Fraction

import numpy as np
import torch

from ..paths import echo
from .errors import BadVideoError
from .transforms import matrix_fix, quarter_turns, stored_box, uniform_indices

# Codecs fn.decoders.video takes on each backend (DALI 2.x docs). AV1 only on GPUs whose NVDEC decodes it:
# NVIDIA's NVDEC application note gives it to the Ampere GA10x chips, Ada and Blackwell, not to GA100 (A100) and
# Hopper (H100, H200), where DALI would fail every AV1 clip; PyAV decodes them there.
DALI_CODECS = {"cpu": {"vp8", "vp9", "mjpeg"},
               "gpu": {"vp8", "vp9", "mjpeg", "mpeg4", "h264", "hevc"}}
NVDEC_AV1 = {(8, 6), (8, 7), (8, 9)}  # compute capabilities of GA10x and Ada; every major >= 10 (Blackwell) too
DECLINE_AFTER = 3  # good files DALI failed on, of one (codec, height, width), before PyAV takes it over...
FAILURES_PER_SUCCESS = 8  # ...and this many for each clip of that shape DALI decoded
PROBE_EVERY = 256  # of a declined shape's clips, one in this many still goes to DALI


class _Shapes:
    """What DALI did with each (codec, height, width): which shapes to leave to PyAV."""

    def __init__(self):
        self.ok: dict[tuple, int] = {}  # clips DALI decoded
        self.failed: dict[tuple, int] = {}  # good files (PyAV decoded them) DALI failed on
        self.batches: dict[tuple, set[int]] = {}  # the batches those failures came in
        self.declined: dict[tuple, str] = {}  # shapes left to PyAV -> DALI's reason
        self._seen: dict[tuple, int] = {}  # clips of a declined shape since it was declined
        self.batch = 0  # decode_items calls so far

    def to_dali(self, shape) -> bool:
        if shape not in self.declined:
            return True
        self._seen[shape] = self._seen.get(shape, 0) + 1
        return self._seen[shape] % PROBE_EVERY == 0

    def decoded(self, shape) -> None:
        self.ok[shape] = self.ok.get(shape, 0) + 1
        if self.declined.pop(shape, None) is not None:
            print(f"note: DALI decoded a {_name(shape)} clip again: it gets them again", file=sys.stderr)

    def failed_good_file(self, shape, reason: str, device) -> None:
        self.failed[shape] = self.failed.get(shape, 0) + 1
        self.batches.setdefault(shape, set()).add(self.batch)
        # Mostly failing, not never decoded: the key ignores the profile, and a shape whose files NVDEC mostly
        # refuses (4:4:4, 10-bit) may hold a few it takes.
        ok = self.ok.get(shape, 0)
        if (self.failed[shape] >= max(DECLINE_AFTER, FAILURES_PER_SUCCESS * ok) and len(self.batches[shape]) >= 2
                and shape not in self.declined):
            self.declined[shape], self._seen[shape] = reason, 0
            echo(f"note: DALI cannot decode {_name(shape)} clips on {device} ({reason}); PyAV decodes them from "
                 f"now on (DALI is tried again on one in {PROBE_EVERY})", file=sys.stderr)


def _name(shape) -> str:
    codec, h, w = shape
    return f"{codec} {w}x{h}"


def dali_handles(codec: str, device: torch.device) -> bool:
    if device.type != "cuda":
        return codec in DALI_CODECS["cpu"]
    if codec == "av1":
        capability = torch.cuda.get_device_capability(device)
        return capability in NVDEC_AV1 or capability[0] >= 10
    return codec in DALI_CODECS["gpu"]


def clip_plan(sample, num_frames: int) -> tuple[str, list[int], int, int, int, str]:
    """(codec, frame indices, stored height, stored width, quarter turns to upright, colour matrix) of a sample: from
    the probe fields of a clean manifest when present (frame i at i / fps: a constant frame rate, which `index`
    checked: `cfr`; a manifest indexed without `rotation` is taken as upright, without `matrix` as BT.601), else
    from a demux pass (a variable frame rate: the frames' own timestamps place a window) and the first frame's
    rotation and matrix."""
    p = sample.probe
    if all(k in p for k in ("codec", "frames", "fps", "width", "height")) and p.get("cfr", True):
        n, rate = int(p["frames"]), frame_rate(float(p["fps"]))
        lo = 0 if sample.start is None else min(n, first_frame_at(sample.start, rate))
        hi = n if sample.end is None else min(n, first_frame_at(sample.end, rate))
        if hi - lo < num_frames:
            raise BadVideoError(sample.name, f"too few frames: {hi - lo}, need {num_frames}")
        return (p["codec"], [lo + i for i in uniform_indices(hi - lo, num_frames)], p["height"], p["width"],
                quarter_turns(p.get("rotation", 0)), p.get("matrix", "bt601"))
    from .decode import PyAVClip  # here, not at the top: the graph itself runs without PyAV (the GPU machines lack it)

    with PyAVClip(sample.source(), name=sample.name, threads=1) as clip:
        idx = clip.index
        return (idx.codec, clip.sample_indices(num_frames, sample.start, sample.end), idx.height, idx.width,
                quarter_turns(p["rotation"] if "rotation" in p else clip.rotation),
                p["matrix"] if "matrix" in p else clip.matrix)


def frame_rate(fps: float) -> Fraction:
    """The frame rate a clean manifest's `fps` stands for, exactly. `data index` wrote it rounded to 6 decimals
    before: NTSC's 30000/1001 as 29.97003, 3e-8 fast, so a window starting on a frame past frame ~33 was planned a
    frame late (at 10010 s, frame 300000 of a 3-hour clip, frame 300001; PyAV's timestamps say 300000). Such a
    value is the fraction of denominator <= 1001 (24000/1001, 30000/1001, 25, 12.5 ...) it is the rounding of;
    another (index writes the rate's double now) is the double's own value."""
    exact = Fraction(fps)
    near = exact.limit_denominator(1001)
    rounded = round(fps, 6) == fps and abs(near - exact) <= Fraction(1, 2 * 10**6)
    return near if rounded else exact


def first_frame_at(seconds: float, rate: Fraction) -> int:
    """Index of the first frame shown at or after `seconds` of a constant `rate` (frame i at i / rate), within a
    millionth of a frame (a start written as a float of a frame's time may be a hair past it). Exact arithmetic: a
    10-hour clip has ~2e6 frames, where a float's product is off by 1e-10 of a frame (a float rate's by its own
    rounding)."""
    return math.ceil(Fraction(seconds) * rate - Fraction(1, 10**6))


class DaliClips:
    """Runs the graph over batches of (encoded bytes, frame indices, crop box, flip, colour matrix)."""

    def __init__(self, *, batch_size: int, num_frames: int, resolution: int, device: torch.device,
                 num_threads: int = 2):
        self.batch_size, self.num_frames, self.resolution = batch_size, num_frames, resolution
        self.device, self.num_threads = torch.device(device), num_threads
        self._pipe = None
        self._stream = None  # CUDA: the stream the outputs are copied and checked on
        self.rebuilds = 0  # pipelines rebuilt after an error (a metric for the run log)
        self.shapes = _Shapes()
        # Sample id -> PyAV's reason, for the samples DALI failed on (or gave an all-zero frame) that PyAV then
        # rejected: PyAV alone decides them from then on. DALI has no switch for its messages (it sets its FFmpeg's
        # level to "error" for every decoder it opens, and its own warnings go to std::cerr), so every bad file it
        # met printed its few lines again every epoch (a review's run: 8,470 lines over 400 epochs, 14 bad files);
        # now on the first only. It also spares the failed run, the pipeline rebuild and the batch's retry one clip
        # at a time, every epoch. Not saved with the loader's state: a resumed run meets them once more.
        self.rejected: dict[int, str] = {}

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types

        gpu = self.device.type == "cuda"

        @pipeline_def(batch_size=self.batch_size, num_threads=self.num_threads,
                      device_id=_device_index(self.device) if gpu else None, prefetch_queue_depth=1,
                      exec_dynamic=True)
        def graph():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            frames = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
            roi_start = fn.external_source(name="roi_start", dtype=types.FLOAT, ndim=1)
            roi_end = fn.external_source(name="roi_end", dtype=types.FLOAT, ndim=1)
            flip = fn.external_source(name="flip", dtype=types.INT32, ndim=0)
            colour = fn.external_source(name="colour", dtype=types.FLOAT, ndim=2)
            video = fn.decoders.video(encoded, device="mixed" if gpu else "cpu", frames=frames)
            # Float from the resize to the colour map: one rounding to uint8 (a BT.601 clip's values are a uint8
            # resize's up to that rounding: measured, 133 of 19,200 one level higher).
            video = fn.resize(video, roi_start=roi_start, roi_end=roi_end, roi_relative=False,
                              size=[self.resolution, self.resolution], interp_type=types.INTERP_LINEAR,
                              antialias=True, dtype=types.FLOAT)
            # The decoders convert YUV with BT.601 whatever the stream declares; the map gives the declared
            # matrix's RGB (linear in RGB, so after the resize: R x R pixels, not the stored frame's).
            video = fn.cast(fn.coord_transform(video, M=colour), dtype=types.UINT8)
            return fn.flip(video, horizontal=flip)

        pipe = graph()
        pipe.build()
        return pipe

    def run(self, encoded: list[bytes], frames: list[list[int]], boxes: list[tuple[int, int, int, int]],
            flips: list[bool], matrices: list[str] | None = None) -> tuple[list[torch.Tensor], list[bool]]:
        """(uint8 [T, R, R, 3] per sample on `device`, whether each has an all-zero frame), each clip's RGB that of
        its colour matrix (transforms.LUMA_WEIGHTS; None: all BT.601). Raises whatever DALI raises; the pipeline is
        then rebuilt."""
        inputs = {"encoded": [np.frombuffer(e, np.uint8) for e in encoded],
                  "frames": [np.asarray(f, np.int32) for f in frames],
                  "roi_start": [np.array([y, x], np.float32) for y, x, _, _ in boxes],
                  "roi_end": [np.array([y + h, x + w], np.float32) for y, x, h, w in boxes],
                  "flip": [np.array(int(f), np.int32) for f in flips],
                  "colour": [matrix_fix(m) for m in (matrices or ["bt601"] * len(encoded))]}
        if self._pipe is None:
            self._pipe = self._build()
        try:
            for name, batch in inputs.items():
                self._pipe.feed_input(name, batch)
            (out,) = self._pipe.run()
        except Exception:
            # A pipeline that raised is dead (DALI keeps no usable state): drop it, the next run rebuilds it.
            self._pipe, self.rebuilds = None, self.rebuilds + 1
            raise
        if self.device.type != "cuda":
            video = torch.from_numpy(out.as_array())
            return list(video), _blank(video)
        # On a stream of the loader's own: the host reads the blank flags once the decode and the clone are
        # done, not once the training step queued ahead of them on the current stream is (on that stream the
        # read waited for every queued step, and the next step could only be queued after it).
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        with torch.cuda.stream(self._stream):
            # DLPack hands DALI's device buffer to torch (ordered after DALI's work on this stream); clone it
            # because DALI reuses the buffer.
            video = torch.from_dlpack(out.as_tensor()).clone()
            blank = _blank(video)
        consumer = torch.cuda.current_stream(self.device)
        consumer.wait_stream(self._stream)
        video.record_stream(consumer)  # allocated on the loader's stream, used on the consumer's
        return list(video), blank

    def decode_items(self, items, fallback):
        """Yields `_Item`s in order for [(pos, sample_id, sample, augment)]: DALI for the codecs it takes on this
        device, PyAV (`fallback[pos]`) for the others, for clips DALI returned all-zero frames for (a cut file,
        or a clip that is black there: PyAV tells them apart) and for files DALI failed on (PyAV decodes them or
        says why not). PyAV decodes in this process, as the demux pass of `clip_plan` does for a manifest
        without probe fields: a clean manifest (`videoprism data index`) holds files PyAV decoded there."""
        from .loader import _Item

        self.shapes.batch += 1
        results: dict[int, _Item] = {}
        dali_jobs = []
        for pos, sid, sample, aug in items:
            if sid in self.rejected:
                results[pos] = got = fallback[pos]  # PyAV, which rejected it before (so it is installed)
                if got.bad is None:  # decodes now (the file was replaced): DALI gets it back
                    del self.rejected[sid]
                continue
            try:
                codec, frames, h, w, turns, matrix = clip_plan(sample, self.num_frames)
                if not dali_handles(codec, self.device) or not self.shapes.to_dali((codec, h, w)):
                    results[pos] = _pyav(fallback, pos, sid, f"DALI does not take {codec} here")
                    continue
                # DALI decodes stored frames: the upright frame's box, cropped from them, turned after (then flipped:
                # a flip drawn for the upright clip is left-right there).
                box = stored_box(aug.box(*((w, h) if turns % 2 else (h, w))), turns, h, w)
                dali_jobs.append((pos, sid, (codec, h, w), sample.read_bytes(), frames, box, aug.flip and not turns,
                                  matrix, turns, aug.flip))
            except BadVideoError as e:
                results[pos] = _Item(pos, sid, bad=e.reason)
            except OSError as e:
                results[pos] = _Item(pos, sid, bad=f"unreadable ({e.strerror or e})")
            except ImportError:  # a plan from the timestamps (no probe fields, a variable frame rate) without PyAV
                results[pos] = _pyav(fallback, pos, sid, "its frames are placed by PyAV's timestamps (no probe "
                                                         "fields, or a variable frame rate)")
        # A declined shape's probe runs alone: when it fails, as it mostly will, the batch is not retried clip by clip.
        probes = [j for j in dali_jobs if j[2] in self.shapes.declined]
        regular = [j for j in dali_jobs if j[2] not in self.shapes.declined]
        done = list(zip(regular, self._run_jobs(regular))) + [(j, *self._run_jobs([j])) for j in probes]
        for (_, _, shape, *_), got in done:  # successes first: a shape DALI decodes here is never declined
            if isinstance(got, _Item):
                self.shapes.decoded(shape)
        for (pos, sid, shape, *_), got in done:
            if isinstance(got, _Item):
                results[pos] = got
                continue
            # An all-zero frame (None), or DALI failed on this file alone (its reason): PyAV decides.
            why = "an all-zero frame (a cut file or a black one)" if got is None else f"DALI cannot decode it ({got})"
            try:
                item = fallback[pos]
            except ImportError:
                item = _Item(pos, sid, bad=f"{why}, and PyAV is not installed (pip install av)")
            else:
                if item.bad is not None:  # PyAV's verdict on the file (not a DALI error that may pass)
                    self.rejected[sid] = item.bad
                elif got is not None:  # a good file: DALI's limit, not the file's fault
                    self.shapes.failed_good_file(shape, got, self.device)
            results[pos] = item
        for pos, *_ in items:
            yield results[pos]

    def _run_jobs(self, jobs):
        """Per job: its `_Item` (decoded by DALI), None (an all-zero frame: PyAV decides) or a str (DALI failed on
        this file alone: the reason)."""
        from .loader import _Item

        if not jobs:
            return []
        try:
            videos, blank = self.run(*[[j[k] for j in jobs] for k in (3, 4, 5, 6, 7)])
        except Exception as e:  # noqa: BLE001 - DALI raises RuntimeError subclasses with no finer type
            if len(jobs) == 1:
                return [error_reason(e)]
            # Retry one by one (the pipeline was rebuilt) so that only the failing file is singled out.
            return [item for j in jobs for item in self._run_jobs([j])]
        # A clip with an all-zero frame goes to PyAV (None here), which finds a cut (too few frames) or decodes it.
        return [None if b else _Item(pos, sid, video=_upright(v, turns, flip and turns > 0))
                for (pos, sid, *_, turns, flip), v, b in zip(jobs, videos, blank)]


def _upright(video: torch.Tensor, turns: int, flip: bool) -> torch.Tensor:
    """A clip's uint8 [T, R, R, 3] frames from stored ones: turned `turns` quarter turns counterclockwise, then
    flipped left-right when `flip`."""
    if turns:
        video = torch.rot90(video, turns, dims=(1, 2))
    if flip:
        video = video.flip(2)
    return video.contiguous()


def _pyav(fallback, pos: int, sid: int, why: str):
    """PyAV's `_Item` for position `pos`: decoded, or bad with PyAV's reason; where PyAV is not installed (the lent
    GPU machines), bad with `why` (what sent the clip to PyAV)."""
    from .loader import _Item

    try:
        return fallback[pos]
    except ImportError:
        return _Item(pos, sid, bad=f"{why}, and PyAV is not installed (pip install av)")


def _device_index(device: torch.device) -> int:
    """The CUDA device DALI runs on: the one named, else torch's current one (not always 0)."""
    return device.index if device.index is not None else torch.cuda.current_device()


def _blank(video: torch.Tensor) -> list[bool]:
    """Per clip of a uint8 [B, T, R, R, 3] batch: has it an all-zero frame? DALI decodes the frames past a cut
    as zeros without raising; a black frame (fade, titles) is zeros too. One host read for the batch."""
    return (video.reshape(*video.shape[:2], -1).amax(2) == 0).any(1).tolist()


def error_reason(e: Exception) -> str:
    """The reason of a DALI error: it reads "Error in CPU operator `...` ... encountered:" and
    then the cause on the next line; else its first line."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and "Critical error" not in ln]
    for i, ln in enumerate(lines[:-1]):
        if ln.endswith("encountered:"):
            return lines[i + 1]
    return lines[0] if lines else type(e).__name__
