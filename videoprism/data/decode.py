"""CPU decoding with PyAV: index the packets, then decode only what the sampled frames need.

Why this is the fastest CPU path measured here (issue 5): a demux-only pass (no decoding) gives every frame's
timestamp and every keyframe; the T target frames are then decoded by seeking to the last keyframe before a target
only when that keyframe lies past what is already decoded (so a short clip is decoded once from the start, and a long
clip with long GOPs skips whole GOPs). Decode-all-then-pick decodes every frame; DALI's CPU decoder decodes from
frame 0 and holds them all.

Bad files raise `BadVideoError` with one line naming the file and the reason. Traps handled: PyAV returns only the
frames before a cut (a truncated file whose index sits at the start) without raising, so fewer decoded frames than
targets is reported as "truncated".

Images (JPEG, PNG, WebP: a manifest's image file or a shard's image member) are one-frame videos: FFmpeg's image
demuxers give one frame at 25 fps. Its JPEG decoder returns the rows past a cut as flat green without an error, so
an image's decoder is told to fail on damaged data (`err_detect=explode`): a half-written photo is rejected as
truncated or corrupt, not trained on. A JPEG file may hold a second picture after the first (an Ultra HDR photo's
gain map, an MPO's second view): every viewer shows the first, which is the image (`_first_picture`).
"""
from __future__ import annotations

import bisect
import collections
import io
import os
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np
from av.video.reformatter import VideoReformatter
import torch

from ..paths import shortened
from .errors import BadVideoError
from .manifest import named_image
from .transforms import Augment, apply_augment, quarter_turns, uniform_indices, yuv_matrix

# Tags in a legacy encoding (Latin-1 titles) must not make a decodable file unreadable: PyAV <= 18
# decodes them strictly unless told to replace bad bytes (a UnicodeDecodeError at open); PyAV 19
# dropped that keyword (an unexpected-keyword TypeError) and decodes tags without failing.
_OPEN_OPTIONS = {"metadata_errors": "replace"} if int(av.__version__.split(".")[0]) < 19 else {}

Source = str | bytes  # a file path, or the encoded bytes of a WebDataset member

# FFmpeg's own messages ("[h264 @ 0x...] error while decoding MB 3 2", "[matroska,webm @ 0x...] File ended
# prematurely") repeat, in the decoder's words, what a file's BadVideoError reason says: on a run over bad files they
# come every epoch, from every worker, and bury the progress bar. PyAV discards them by default, but any code in the
# process can turn them on (torchvision's video I/O sets PyAV's level to ERROR when imported; a callback restored to
# FFmpeg's prints every one), so each open sets the policy again (a pointer store). VIDEOPRISM_DECODER_LOG=1 (or a
# level name) brings them back, through FFmpeg's own callback: PyAV's, which feeds Python's logging, takes the GIL
# from FFmpeg's decoder threads (PyAV's docs warn against it with threads).
DECODER_LOG_ENV = "VIDEOPRISM_DECODER_LOG"
_DECODER_LOG_LEVELS = {"1": av.logging.WARNING, "error": av.logging.ERROR, "warning": av.logging.WARNING,
                       "info": av.logging.INFO, "verbose": av.logging.VERBOSE, "debug": av.logging.DEBUG}


def set_decoder_log() -> None:
    """FFmpeg's messages off (the default), or on at the level VIDEOPRISM_DECODER_LOG names (1: warnings and
    errors), in this process: every PyAV open calls it, so DataLoader workers and `data index`'s probe processes
    follow the variable too (they inherit the environment)."""
    level = _DECODER_LOG_LEVELS.get(os.environ.get(DECODER_LOG_ENV, "").strip().lower())
    if level is None:
        av.logging.set_level(None)
    else:
        av.logging.set_libav_level(level)
        av.logging.restore_default_callback()


@dataclass
class VideoIndex:
    """What the demux pass learns about the video stream (no frame decoded)."""

    codec: str
    width: int
    height: int
    fps: float
    time_base: Fraction
    pts: list[int]  # presentation timestamps of all frames, sorted: frame i of the clip has pts[i]
    keyframes: list[int]  # pts of the keyframes, sorted

    @property
    def num_frames(self) -> int:
        return len(self.pts)

    @property
    def duration(self) -> float:
        """Seconds from the first frame to the end of the last one."""
        if not self.pts:
            return 0.0
        return float((self.pts[-1] - self.pts[0]) * self.time_base) + (1.0 / self.fps if self.fps > 0 else 0.0)

    @property
    def constant_rate(self) -> bool:
        """Whether frame i shows at i / fps after the first frame, to a tick of the stream's clock (containers round
        timestamps to ticks): what a clean manifest's frame plan assumes (dali_pipeline.clip_plan). False for a
        variable frame rate, or a rate field that the timestamps contradict."""
        if self.fps <= 0:
            return len(self.pts) == 1
        ticks = np.asarray(self.pts, dtype=np.float64) - self.pts[0]
        want = np.arange(len(ticks)) / self.fps / float(self.time_base)
        return bool(np.abs(ticks - want).max() <= 1.0 + 1e-6)

    def window(self, start: float | None, end: float | None) -> list[int]:
        """Indices of the frames shown in [start, end) seconds, counted from the first frame."""
        if start is None and end is None:
            return list(range(len(self.pts)))
        t0 = self.pts[0] if self.pts else 0
        lo = 0 if start is None else bisect.bisect_left(self.pts, t0 + _to_pts(start, self.time_base))
        hi = len(self.pts) if end is None else bisect.bisect_left(self.pts, t0 + _to_pts(end, self.time_base))
        return list(range(lo, hi))


def _to_pts(seconds: float, time_base: Fraction) -> int:
    """The first tick at or after `seconds`, less half a tick: containers round timestamps to their ticks
    (WebM: whole ms, down), so a frame shown exactly at `seconds` may carry the tick below it. The probe plan
    of a clean manifest (i / fps) counts such a frame in too."""
    return int(np.ceil(Fraction(seconds).limit_denominator(1 << 20) / time_base - Fraction(1, 2)))


def _is_image_demuxer(demuxer: str, name: str) -> bool:
    """Whether FFmpeg's demuxer of a file is one of its image readers (image2, jpeg_pipe, png_pipe, webp_pipe, ...),
    or its motion-JPEG reader on a file named as an image (`name`: the file's, or a shard's `TAR:MEMBER`, which
    FFmpeg does not see in bytes): probing the bytes of a JPEG with a second JPEG after it (an Ultra HDR photo, an
    MPO) takes them for a stream of JPEGs. A raw .mjpeg file is not named an image: a clip of all its frames."""
    return (demuxer in ("image2", "image2pipe") or demuxer.endswith("_pipe")
            or (demuxer == "mjpeg" and named_image(name)))


def _first_picture(pts: list[int], keys: list[int]) -> tuple[list[int], list[int]]:
    """The (sorted) timestamps of an image's frames cut to its first picture. What follows it in the file (the gain
    map of an Ultra HDR photo, the other view of an MPO: a JPEG appended to the first) is two frames to FFmpeg's
    readers of bytes, possibly of two sizes ("frames of 2 sizes" rejected such a photo, or it was indexed as 2
    frames), and nothing to a viewer, nor to FFmpeg's reader of an image file (one packet, the first picture
    decoded)."""
    return pts[:1], keys[:1]


def _is_animated_webp(src: Source) -> bool:
    """Whether `src` (a path or the bytes) starts as an animated WebP does: RIFF, WEBP, an extended (VP8X) header
    with the animation flag."""
    try:
        if isinstance(src, bytes):
            head = src[:21]
        else:
            with open(src, "rb") as f:
                head = f.read(21)
    except OSError:
        return False
    return len(head) == 21 and head[:4] == b"RIFF" and head[8:16] == b"WEBPVP8X" and bool(head[20] & 0x02)


def _name(src: Source, name: str | None) -> str:
    return name if name is not None else (src if isinstance(src, str) else "<bytes>")


class PyAVClip:
    """An open video stream with its packet index. Use as a context manager; every failure is a `BadVideoError`."""

    def __init__(self, src: Source, *, name: str | None = None, threads: int = 0):
        self.name = _name(src, name)
        if isinstance(src, (str, os.PathLike)):
            src = os.fspath(src)
            if not os.path.exists(src):
                raise BadVideoError(self.name, "missing file (no such path)")
            if os.path.isdir(src):
                raise BadVideoError(self.name, "not a video (it is a directory)")
            if os.path.getsize(src) == 0:
                raise BadVideoError(self.name, "empty file (0 bytes)")
        elif len(src) == 0:
            raise BadVideoError(self.name, "empty file (0 bytes)")
        self._src, self._threads, self._unseekable, self._rotation = src, threads, False, None
        self._first = None  # the first frame decoded (`verify` converts it to RGB)
        self._matrix = "bt601"  # the colour matrix of its YUV -> RGB conversion, noted off the first frame decoded
        try:
            self._container = self._open()
        except (av.error.FFmpegError, UnicodeDecodeError) as e:
            raise BadVideoError(self.name, f"not a video or an image, or a truncated or corrupt one (cannot read the "
                                           f"container: {_msg(e)})") from None
        self.image = _is_image_demuxer(self._container.format.name, self.name)
        try:
            if not self._container.streams.video:
                raise BadVideoError(self.name, "not a video (no video stream)")
            if self._container.streams.video[0].codec_context is None:
                # Also what a file cut inside its header looks like (an MP4 cut in its moov box: the codec's
                # description is gone); PyAV cannot tell the two apart.
                raise BadVideoError(self.name, "unsupported codec, or truncated inside its header (this FFmpeg finds "
                                               "no decoder for its video stream)")
            self._stream = self._decoder()
            self.index = self._build_index()
        except BaseException:
            self._container.close()
            raise

    def _open(self):
        # An absolute path: FFmpeg reads a relative "cam1:take2.mp4" as the URL of a protocol "cam1".
        src = io.BytesIO(self._src) if isinstance(self._src, bytes) else os.path.abspath(self._src)
        set_decoder_log()
        return av.open(src, **_OPEN_OPTIONS)

    def _decoder(self):
        """The first video stream, its decoder set up: frame + slice threads (the decoder is the cost; 0 lets
        FFmpeg use every core, the loader passes 1 per worker so that workers do not oversubscribe the cores)."""
        stream = self._container.streams.video[0]
        stream.thread_type = "AUTO"
        stream.codec_context.thread_count = self._threads
        if self.image:  # a cut JPEG decodes without an error otherwise (the module docstring)
            stream.codec_context.options = {"err_detect": "explode"}
        return stream

    def _decode_error(self, e: Exception) -> BadVideoError:
        """The error of data the decoder fails on (`e`): a corrupt stream, a truncated or corrupt image, or an
        animated WebP, which FFmpeg's WebP decoder does not take ("skipping unsupported chunk: ANIM"), whole as it
        is: said so, as a corrupt image it sent the user looking for damage."""
        failed = f"decoding failed: {_msg(e)}"
        if not self.image:
            return BadVideoError(self.name, f"corrupt stream ({failed})")
        if _is_animated_webp(self._src):
            return BadVideoError(self.name, f"an animated WebP, which this FFmpeg does not decode ({failed}): save its "
                                            "first frame as a still image")
        return BadVideoError(self.name, f"truncated or corrupt image ({failed})")

    def __enter__(self) -> "PyAVClip":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._container.close()

    def _build_index(self) -> VideoIndex:
        s = self._stream
        pts, keys = [], []
        leading = []  # shown packets before the first keyframe (decode order): a stream cut mid-GOP; none decode
        # The end of the data (seconds) of the other audio and video streams, and of the rest (subtitles, data
        # tracks): a cut cuts them all, while a longer audio track, a second video track or a subtitle cue only
        # makes the container's duration (Matroska's, whose streams declare none) longer than the video. (A packet
        # that spans a cut hides it: a subtitle cue, or a MOV timecode track's one packet spanning the whole
        # file, so the rest counts only against the container's duration, which spans them.)
        ends = {"media": None, "rest": None}
        try:
            for packet in self._container.demux():
                if packet.stream.index != s.index:
                    if packet.pts is not None and packet.stream.time_base is not None and packet.size:
                        end = float((packet.pts + (packet.duration or 0)) * packet.stream.time_base)
                        kind = "media" if packet.stream.type in ("audio", "video") else "rest"
                        ends[kind] = end if ends[kind] is None else max(ends[kind], end)
                    continue
                ts = packet.pts if packet.pts is not None else packet.dts
                if ts is None or packet.size == 0:
                    continue
                if packet.is_keyframe:
                    keys.append(ts)  # a discarded keyframe still is where decoding can start
                # Packets an edit list discards (a stream-copied cut before a keyframe) are decoded as
                # references but never shown: they are not frames of the clip.
                if not packet.is_discard:
                    (pts if keys else leading).append(ts)
        except av.error.FFmpegError as e:
            raise BadVideoError(self.name, f"corrupt container (demux failed: {_msg(e)})") from None
        if not keys:  # no packet flagged as a keyframe: every one counts
            pts = leading
        if not pts:
            raise BadVideoError(self.name, "no frames (the video stream is empty or cut before its first frame)")
        pts.sort()
        keys.sort()
        if self.image:
            pts, keys = _first_picture(pts, keys)
        rate = s.average_rate or s.guessed_rate
        fps = float(rate) if rate else (len(pts) - 1) / float((pts[-1] - pts[0]) * s.time_base) if len(pts) > 1 else 0.0
        # The codec's canonical name (av1), not the decoder's (libdav1d): DALI routes by it.
        ctx = s.codec_context
        index = VideoIndex(codec=ctx.codec.canonical_name, width=ctx.width, height=ctx.height, fps=fps,
                           time_base=s.time_base, pts=pts, keyframes=keys or [pts[0]])
        # A cut WebM/Matroska file demuxes cleanly up to the cut: only the declared duration tells it is short.
        declared, slack, of_file = self._declared_duration(fps)
        video_end = float(pts[-1] * s.time_base) + (1.0 / fps if fps > 0 else 0.0)
        data_end = max(e for e in (video_end, ends["media"], ends["rest"] if of_file else None) if e is not None)
        # Short both as a span and as an end time: a format may declare its duration from 0 rather than
        # from the first timestamp (WebM written with a start offset), and audio may run past the video.
        if declared is not None and index.duration < declared - slack and data_end < declared - slack:
            raise BadVideoError(self.name, f"truncated: frames end at {index.duration:.2f} s of the declared "
                                           f"{declared:.2f} s")
        return index

    def _declared_duration(self, fps: float) -> tuple[float | None, float, bool]:
        """(duration from the container header, the shortfall that still counts as whole, whether it is the
        file's): the video stream's own duration, else the file's (WebM streams carry none), which also spans the
        other streams, so audio running past the last frame gets a wider margin."""
        s, c = self._stream, self._container
        slack = max(0.5, 2.0 / max(fps, 1e-6))
        if s.duration is not None and s.time_base is not None:
            return float(s.duration * s.time_base), slack, False
        if c.duration is None:
            return None, slack, False
        return c.duration / 1e6, slack, True

    def sample_indices(self, num_frames: int, start: float | None = None, end: float | None = None) -> list[int]:
        """Clip frame indices of `num_frames` uniform samples over the clip or its [start, end) window."""
        window = self.index.window(start, end)
        if len(window) < num_frames:
            where = "" if start is None and end is None else f" in the window [{start}, {end}) s"
            raise BadVideoError(self.name, f"too few frames: {len(window)}{where}, need {num_frames}")
        return [window[i] for i in uniform_indices(len(window), num_frames)]

    def _frames_at(self, indices: list[int]):
        """Yields the av.VideoFrame at each (sorted) clip frame index; stops early where the data ends."""
        targets = [self.index.pts[i] for i in indices]
        keys = self.index.keyframes
        it, last, picked = None, None, None
        self._last_pts = None
        try:
            for t in targets:
                if last is not None and last >= t:  # already decoded (repeated index)
                    yield picked
                    continue
                key = keys[max(0, bisect.bisect_right(keys, t) - 1)]
                if it is None or (last is not None and last < key):
                    # Seek only when it skips frames: the keyframe before the target is past what is decoded
                    # (the first seek also rewinds the demux pass of the index).
                    self._container.seek(key, stream=self._stream, backward=True, any_frame=False)
                    it, last = self._container.decode(self._stream), None
                picked, first = None, last is None
                shown = self.index.pts[bisect.bisect_left(self.index.pts, key)]  # the first frame from `key` on
                for frame in it:
                    if frame.pts is None or (last is not None and frame.pts <= last) or (first and frame.pts > shown):
                        # No timestamp, timestamps out of presentation order (AVI with B-frames), or a seek
                        # that landed after the keyframe asked for (MPEG-TS): timestamps cannot find the frame.
                        raise _Unseekable
                    first = False
                    last = self._last_pts = frame.pts
                    if last >= t:
                        if last != t:
                            raise _Unseekable  # the frame of the index is not where the decoder puts it
                        picked = frame
                        break
                if picked is None:
                    if first:
                        # Nothing at all since the seek: the demuxer landed past the keyframe's packet (MPEG-TS
                        # seeks by decode time: with B-frames, after the only keyframe of a one-GOP clip), not at
                        # the end of the data (the in-order decode tells a cut file all the same).
                        raise _Unseekable
                    return
                yield picked
        except av.error.FFmpegError as e:
            raise self._decode_error(e) from None

    def _frames_in_order(self, indices: list[int]):
        """As `_frames_at`, counting the frames the decoder outputs from the start of a fresh open: for
        streams whose timestamps cannot locate a frame."""
        self._container.close()
        self._container = self._open()
        self._stream = self._decoder()
        self._last_pts = None
        wanted = collections.Counter(indices)
        try:
            for i, frame in enumerate(self._container.decode(self._stream)):
                if i > indices[-1]:
                    return
                self._last_pts = self.index.pts[min(i, len(self.index.pts) - 1)]
                for _ in range(wanted.get(i, 0)):
                    yield frame
        except av.error.FFmpegError as e:
            raise self._decode_error(e) from None

    def _frames(self, indices: list[int], keep: bool = True):
        """The frames at `indices` (their count when not `keep`), by timestamp, else by count from the start."""
        if not self._unseekable:
            try:
                return self._take(self._frames_at(indices), keep)
            except _Unseekable:
                self._unseekable = True  # the next call (verify after decode, another window) goes straight on
        return self._take(self._frames_in_order(indices), keep)

    def _take(self, frames, keep: bool):
        """`frames` as a list (their count when not `keep`), the first kept and its display rotation and colour
        matrix noted (`rotation`, `matrix`: the stream's, the same on every frame)."""
        out, n = [], 0
        for f in frames:
            if self._rotation is None:
                self._rotation, self._first = 90 * quarter_turns(f.rotation), f
                self._matrix = yuv_matrix(f.colorspace, f.format.is_rgb)
            n += 1
            if keep:
                out.append(f)
        return out if keep else n

    def _short(self, got: int, wanted: int, what: str) -> BadVideoError:
        last = self._last_pts
        end = float((last - self.index.pts[0]) * self.index.time_base) if last is not None else 0.0
        return BadVideoError(self.name, f"truncated: decoded {got} of {wanted} {what}, the data ends at {end:.2f} s "
                                        f"of {self.index.duration:.2f} s")

    @property
    def rotation(self) -> int:
        """Degrees (0, 90, 180 or 270) counterclockwise that a player turns the stored frames (the display matrix
        of a portrait phone clip): read off the first frame this clip decoded (`verify` decodes frame 0), else
        off frame 0, decoded for it."""
        if self._rotation is None:
            self._frames([0], keep=False)
        return self._rotation or 0  # none decoded (a stream cut before it): as stored

    @property
    def matrix(self) -> str:
        """The colour matrix (transforms.LUMA_WEIGHTS) that `decode` converts the frames to RGB with: the one the
        stream declares; read off the first frame decoded, as `rotation` is."""
        if self._rotation is None:
            self._frames([0], keep=False)
        return self._matrix

    def decode(self, indices: list[int]) -> torch.Tensor:
        """uint8 [len(indices), H, W, 3] RGB frames at the given (sorted) clip frame indices, upright (turned as a
        player shows them: H, W are the index's height and width swapped for a quarter turn)."""
        # One reformatter for the clip keeps its swscale context: `frame.to_ndarray(format="rgb24")` builds a new
        # one per frame, which cost more than decoding on small clips (same output bits).
        rgb = VideoReformatter()
        decoded = self._frames(indices)
        sizes = list(dict.fromkeys(f"{f.width}x{f.height}" for f in decoded))
        if len(sizes) > 1:  # a clip is one tensor: a stream that changes size, or a picture appended to an image
            raise BadVideoError(self.name, f"frames of {len(sizes)} sizes ({', '.join(sizes)}): re-encode it at one "
                                           "size")
        frames = [np.rot90(self._rgb(rgb, f), quarter_turns(f.rotation)) for f in decoded]
        if len(frames) < len(indices):
            raise self._short(len(frames), len(indices), "sampled frames")
        return torch.from_numpy(np.stack(frames))

    def _rgb(self, reformatter: VideoReformatter, frame) -> np.ndarray:
        """uint8 [H, W, 3] RGB of a decoded frame, converted with the colour matrix its stream declares. The FFmpeg of
        PyAV >= 18 refuses the matrices it has no conversion for (YCgCo, ICtCp, BT.2020 constant luminance: older
        ones took them for BT.601) with ENOTSUP, which read as an unreadable file after `index` had kept it."""
        try:
            return reformatter.reformat(frame, format="rgb24").to_ndarray()
        except av.error.FFmpegError as e:
            matrix = _MATRICES.get(frame.colorspace, f"MatrixCoefficients {frame.colorspace}")
            raise BadVideoError(self.name, f"unsupported colour matrix: its frames ({frame.format.name}, {matrix}) "
                                           f"cannot be converted to RGB here ({_msg(e)})") from None

    def verify(self, full: bool = False) -> None:
        """Decode the first frame and the whole last GOP (every frame when `full`) without keeping them.

        Catches what the demux pass cannot: a cut or corrupt end of the data, a stream the decoder rejects.
        """
        n = self.index.num_frames
        first = 0 if full else bisect.bisect_left(self.index.pts, self.index.keyframes[-1])
        indices = sorted({0, *range(first, n)})
        got = self._frames(indices, keep=False)
        if got < len(indices):
            raise self._short(got, len(indices), "checked frames")
        if self._first is not None:  # one frame to RGB, as `decode` converts them all (same matrix on every frame)
            self._rgb(VideoReformatter(), self._first)


# Names of the colour matrices (ITU-T H.273 MatrixCoefficients, FFmpeg's AVColorSpace) a stream may declare that
# FFmpeg's converter may not take, for the reason `_rgb` gives.
_MATRICES = {3: "a reserved colour matrix", 8: "YCgCo", 10: "BT.2020 constant luminance", 11: "SMPTE ST 2085",
             12: "chromaticity-derived non-constant luminance", 13: "chromaticity-derived constant luminance",
             14: "ICtCp", 15: "IPT-C2", 16: "YCgCo-R even", 17: "YCgCo-R odd"}


class _Unseekable(Exception):
    """The decoder's timestamps do not locate the index's frames (see `_frames_at`)."""


def _msg(e: Exception) -> str:
    """A decoder's error message on one line, cut to its start: one can carry any string (a 1 MB one made as long a
    line)."""
    return shortened(" ".join(str(getattr(e, "strerror", None) or e).split()), 200)


def decode_clip(src: Source, num_frames: int, resolution: int, aug: Augment, *, start: float | None = None,
                end: float | None = None, name: str | None = None, threads: int = 0) -> torch.Tensor:
    """Uniformly sampled, transformed frames: uint8 [num_frames, resolution, resolution, 3]."""
    with PyAVClip(src, name=name, threads=threads) as clip:
        frames = clip.decode(clip.sample_indices(num_frames, start, end))
    return apply_augment(frames, aug, resolution)


def read_clip(path: str | os.PathLike, num_frames: int, resolution: int, *, start: float | None = None,
              end: float | None = None) -> torch.Tensor:
    """Eval-transformed clip for inference: uint8 [num_frames, resolution, resolution, 3].

    `num_frames` frames uniformly over the clip (or its [start, end) window in seconds), the shorter side resized
    to `resolution` and centre-cropped. Raises `BadVideoError` (one line: the file and the reason) for a missing,
    empty, non-video, corrupt, truncated or too short file, or a codec this FFmpeg cannot decode.
    """
    if num_frames < 1 or resolution < 1:
        raise ValueError(f"num_frames and resolution must be >= 1, got num_frames={num_frames}, "
                         f"resolution={resolution}")
    if start is not None and end is not None and end <= start:
        raise ValueError(f"end must be after start, got start={start}, end={end} (seconds)")
    return decode_clip(os.fspath(path), num_frames, resolution, Augment(), start=start, end=end)
