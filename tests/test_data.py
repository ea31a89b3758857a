"""Data layer on the CPU: read_clip against a decode-everything oracle, bad inputs, text, manifests, loader state."""
from __future__ import annotations

import io
import json
import multiprocessing
import os
import re
import signal
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

av = pytest.importorskip("av", reason="PyAV decodes every clip here (the GPU machines lack it)")

from videoprism.data import BadVideoError, TooManyBadSamplesError, read_clip
from videoprism.data.loader import build_loader
from videoprism.data.manifest import read_manifest, read_shards
from videoprism.data.synth import COLOURS, DIRECTIONS, SHAPES, encode, generate
from videoprism.data.text import Tokenizer, canonicalize_text
from videoprism.data.transforms import uniform_indices

from .conftest import MEDIA, psnr

H264 = os.path.join(MEDIA, "water_bottle_drumming.mp4")
VP9 = os.path.join(MEDIA, "water_bottle_drumming_vp9.webm")
SPM = os.path.join(MEDIA, "test_spm.model")
needs_media = pytest.mark.skipif(not os.path.isfile(H264), reason="shared/media is absent (only on project machines)")
# The longest a script below may run in a fresh Python (torch and the loader imported): most of these tests catch a
# process that never exits, which no timeout outlasts. On a loaded 2-core machine (load 7-10) one such script took
# 13-48 s, 21-26 s of it starting Python and importing; 25 s timed out while the loader was right.
HANG_S = 300


def decode_all(path: str) -> np.ndarray:
    """Oracle: every frame, decoded in order with no seeking."""
    with av.open(path) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def eval_oracle(frames: np.ndarray, t: int, res: int) -> torch.Tensor:
    """Oracle eval transform in float: centre square, antialiased bilinear resize, rounded."""
    idx = [int(i) for i in np.linspace(0, len(frames), t, endpoint=False)]
    x = torch.from_numpy(frames[idx]).permute(0, 3, 1, 2).float()
    h, w = x.shape[-2:]
    s = min(h, w)
    x = x[..., (h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    x = F.interpolate(x, size=(res, res), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).permute(0, 2, 3, 1)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("synth"))
    generate(out, 20, seed=3, size=64, num_frames=12, workers=1)
    return out


def write_clip(path, n, size=32, codec="h264", gop=None):
    frames = np.random.default_rng(n).integers(0, 255, (n, size, size, 3), dtype=np.uint8)
    if gop is None:
        encode(frames, path, codec, fps=10)
        return frames
    with av.open(path, "w", format="mp4") as out:
        s = out.add_stream("libx264", rate=10, options={"g": str(gop), "keyint_min": str(gop), "sc_threshold": "0",
                                                      "preset": "ultrafast", "threads": "1"})
        s.width = s.height = size
        s.pix_fmt = "yuv420p"
        for f in frames:
            out.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        out.mux(s.encode())
    return frames


def write_vp9(path: str, frames: np.ndarray, fps: int, title: str | None = None) -> None:
    """Frames as VP9 in Matroska/WebM with PyAV's default settings (black decodes to exact zeros)."""
    with av.open(path, "w", format="matroska" if path.endswith(".mkv") else "webm") as out:
        if title is not None:
            out.metadata["title"] = title
        s = out.add_stream("libvpx-vp9", rate=fps)
        s.width, s.height = frames.shape[2], frames.shape[1]
        s.pix_fmt = "yuv420p"
        for f in frames:
            out.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        out.mux(s.encode())


def test_non_utf8_tags_do_not_make_a_clip_unreadable(tmp_path):
    """A Latin-1 title tag (legacy files): PyAV used to raise UnicodeDecodeError on open."""
    path = tmp_path / "latin1.mkv"
    write_vp9(str(path), np.random.default_rng(0).integers(0, 255, (8, 32, 32, 3), dtype=np.uint8), 8, title="caf_XYZ")
    data = path.read_bytes()
    assert data.count(b"caf_XYZ") == 1
    path.write_bytes(data.replace(b"caf_XYZ", b"caf\xe9XYZ"[:7]))  # same length: Latin-1 e-acute
    assert read_clip(str(path), num_frames=4, resolution=16).shape == (4, 16, 16, 3)


def test_webm_with_audio_cut_in_half_is_truncated(tmp_path):
    """WebM streams carry no duration; the file's covers audio too: a cut clip with an audio track
    is caught against it (it was accepted, its frames sampled over the half that survived)."""
    path = tmp_path / "av.webm"
    rate = 48000
    with av.open(str(path), "w", format="webm") as out:
        v = out.add_stream("libvpx-vp9", rate=10)
        v.width = v.height = 32
        v.pix_fmt = "yuv420p"
        a = out.add_stream("libopus", rate=rate)
        rng = np.random.default_rng(0)
        for i in range(40):  # 4 s of video and audio
            out.mux(v.encode(av.VideoFrame.from_ndarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8),
                                                        format="rgb24")))
            tone = (0.1 * np.sin(np.arange(rate // 10) / 10.0)).astype(np.float32)[None]
            af = av.AudioFrame.from_ndarray(tone, format="fltp", layout="mono")
            af.sample_rate, af.pts = rate, i * (rate // 10)
            out.mux(a.encode(af))
        out.mux(v.encode())
        out.mux(a.encode())
    assert read_clip(str(path), num_frames=8, resolution=16).shape[0] == 8
    cut = tmp_path / "cut.webm"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(BadVideoError, match="truncated"):
        read_clip(str(cut), num_frames=8, resolution=16)


@needs_media
def test_window_edges_agree_between_containers_and_the_probe_plan():
    """WebM rounds timestamps down to whole ms: a frame shown exactly at `start` (7/12 s at 12 fps)
    must stay in the window, as in the MP4 twin and in the i / fps plan of a clean manifest."""
    from videoprism.data.decode import PyAVClip

    for start, end in ((7 / 12, 2.5), (1 / 3, 1.0)):
        want = list(range(int(np.ceil(start * 12 - 1e-6)), int(np.ceil(end * 12 - 1e-6))))
        for path in (H264, VP9):
            with PyAVClip(path) as clip:
                assert clip.index.window(start, end) == want, (path, start, end)


# ---- sampling and decoding ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("h, w", [(180, 320), (320, 180), (64, 64)])
def test_train_crops_keep_the_aspect_ratio_range(h, w):
    """Every random resized crop fits the frame with width / height in TRAIN_RATIO (to a pixel),
    also where the drawn box is larger than a wide or tall frame allows."""
    from videoprism.data.transforms import TRAIN_RATIO, Augment

    rng = np.random.default_rng(0)
    for _ in range(2000):
        y0, x0, ch, cw = Augment.draw(rng).box(h, w)
        assert 0 <= y0 and y0 + ch <= h and 0 <= x0 and x0 + cw <= w
        assert (cw - 1) / (ch + 1) <= TRAIN_RATIO[1] and (cw + 1) / (ch - 1) >= TRAIN_RATIO[0], (cw, ch)


@pytest.mark.skipif("libsvtav1" not in av.codecs_available, reason="this PyAV has no AV1 encoder (libsvtav1)")
def test_index_records_the_codec_not_the_decoder(tmp_path):
    """AV1 decodes through libdav1d; the index records `av1`, the name DALI's NVDEC routing takes."""
    from videoprism.data.decode import PyAVClip

    path = str(tmp_path / "a.mp4")
    with av.open(path, "w") as c:
        st = c.add_stream("libsvtav1", rate=8)
        st.width = st.height = 64
        st.pix_fmt = "yuv420p"
        for i in range(8):
            c.mux(st.encode(av.VideoFrame.from_ndarray(np.full((64, 64, 3), 30 * i, np.uint8), format="rgb24")))
        c.mux(st.encode())
    with PyAVClip(path) as clip:
        assert clip.index.codec == "av1"


def test_uniform_indices_are_segment_starts():
    assert uniform_indices(100, 16) == [int(i) for i in np.linspace(0, 100, 16, endpoint=False)]
    assert uniform_indices(8, 8) == list(range(8))
    with pytest.raises(ValueError):
        uniform_indices(4, 8)


@needs_media
@pytest.mark.parametrize("path", [H264, VP9])
def test_read_clip_matches_decode_all_oracle(path):
    clip = read_clip(path, 16, 96)
    assert clip.shape == (16, 96, 96, 3) and clip.dtype == torch.uint8
    assert (clip.float() - eval_oracle(decode_all(path), 16, 96)).abs().max() <= 1


@needs_media
def test_h264_and_vp9_twins_decode_alike():
    assert psnr(read_clip(H264, 8, 288), read_clip(VP9, 8, 288)) > 30


@needs_media
def test_window_samples_inside_window():
    frames = decode_all(VP9)  # 12 fps: [2 s, 4 s) is frames 24..47
    clip = read_clip(VP9, 8, 512, start=2.0, end=4.0)
    expect = torch.from_numpy(frames[[24 + i for i in uniform_indices(24, 8)]])
    assert torch.equal(clip, expect)
    from videoprism.data.decode import PyAVClip

    with PyAVClip(VP9) as c:  # the window's own frames: 8 samples of 24 or 25 frames can be the same
        assert c.index.window(2.0, 4.0) == list(range(24, 48))


def test_keyframe_seeking_gives_the_frames_of_a_full_decode(tmp_path):
    path = str(tmp_path / "gop.mp4")
    write_clip(path, 90, gop=10)  # 9 GOPs: sampling 4 frames seeks over whole GOPs
    ref = decode_all(path)
    for t in (4, 9, 90):
        got = read_clip(path, t, 32)
        assert torch.equal(got, torch.from_numpy(ref[uniform_indices(90, t)]))


# ---- bad inputs ------------------------------------------------------------------------------------------------------
def _faststart_copy(src, dst):
    with av.open(src) as inp, av.open(dst, "w", format="mp4", options={"movflags": "faststart"}) as out:
        o = out.add_stream_from_template(inp.streams.video[0])
        for pk in inp.demux(video=0):
            if pk.dts is not None:
                pk.stream = o
                out.mux(pk)


def _unknown_codec(dst):
    buf = io.BytesIO()
    with av.open(buf, "w", format="matroska") as out:
        s = out.add_stream("ffv1", rate=8)
        s.width = s.height = 32
        s.pix_fmt = "yuv420p"
        for f in np.zeros((4, 32, 32, 3), np.uint8):
            out.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        out.mux(s.encode())
    data = buf.getvalue()
    assert b"V_FFV1" in data
    with open(dst, "wb") as f:  # a codec id no FFmpeg knows, same length so the container stays valid
        f.write(data.replace(b"V_FFV1", b"V_QQQQ"))


def make_bad_files(d, good_mp4) -> dict[str, str]:
    """name -> path of one bad file per kind; the keys are words the reason must contain."""
    bad = {"missing": os.path.join(d, "missing.mp4"), "empty": os.path.join(d, "empty.mp4"),
           "not a video": os.path.join(d, "notes.mp4"), "truncated": os.path.join(d, "cut.mp4"),
           "unsupported codec": os.path.join(d, "unknown.mkv"), "too few frames": os.path.join(d, "short.mp4")}
    open(bad["empty"], "wb").close()
    with open(bad["not a video"], "w") as f:
        f.write("this is a text file, not a video\n" * 20)
    fast = os.path.join(d, "faststart.mp4")
    _faststart_copy(good_mp4, fast)
    data = open(fast, "rb").read()
    with open(bad["truncated"], "wb") as f:  # index at the start, data cut: PyAV decodes the head silently
        f.write(data[: len(data) // 2])
    _unknown_codec(bad["unsupported codec"])
    write_clip(bad["too few frames"], 3)
    return bad


def test_each_bad_file_raises_one_line_naming_file_and_reason(tmp_path):
    good = str(tmp_path / "good.mp4")
    write_clip(good, 40, size=32)
    for reason, path in make_bad_files(str(tmp_path), good).items():
        with pytest.raises(BadVideoError) as e:
            read_clip(path, 8, 32)
        msg = str(e.value)
        assert isinstance(e.value, ValueError) and "\n" not in msg
        assert msg.startswith(path) and reason in msg, msg
    assert read_clip(good, 8, 32).shape == (8, 32, 32, 3)
    # An MP4 cut inside its moov box, before the codec is described, reads as an unknown codec to PyAV: the reason
    # says both (it said "unsupported codec" only).
    with open(good, "rb") as f:
        whole = f.read()
    moov = whole.index(b"moov")
    cut_header = str(tmp_path / "cut_header.mp4")
    with open(cut_header, "wb") as f:
        f.write(whole[:whole.index(b"stsd", moov)])  # the sample description box (the codec) cut
    with pytest.raises(BadVideoError, match="truncated inside its header"):
        read_clip(cut_header, 8, 32)


def test_truncated_webm_is_bad(tmp_path):
    path = str(tmp_path / "a.webm")
    write_clip(path, 40, codec="vp9")
    cut = str(tmp_path / "cut.webm")
    data = open(path, "rb").read()
    with open(cut, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(BadVideoError, match="truncated"):
        read_clip(cut, 8, 32)


# ---- text ------------------------------------------------------------------------------------------------------------
def test_canonicalize_text():
    assert canonicalize_text("Hello, World!") == "hello world."
    assert canonicalize_text("  Hello   WORLD") == "hello world."
    assert canonicalize_text("Hello,World..") == "hello world."


@needs_media
def test_tokenizer_matches_sentencepiece_oracle():
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=SPM)
    tok = Tokenizer(SPM)
    texts = ["A person drumming on water bottles!", "x " * 200]
    ids, pad = tok(texts)
    assert ids.shape == (2, 64) and ids.dtype == torch.int64 and pad.dtype == torch.float32
    for row, text in enumerate(texts):
        expect = ([sp.bos_id()] if sp.bos_id() >= 0 else []) + sp.encode(canonicalize_text(text))
        expect = expect[:64]
        assert ids[row, : len(expect)].tolist() == expect
        assert (ids[row, len(expect):] == 0).all()
        assert pad[row].tolist() == [0.0] * len(expect) + [1.0] * (64 - len(expect))
    for bad, needle in ((["ok", None], "got a NoneType: None"), ([b"x"], "got a bytes"), ("one", "wrap it")):
        with pytest.raises(TypeError, match=needle):
            tok(bad)


_CAPTIONS = [f"a {c} {s} moves {d}" for c in ("red", "blue", "green") for s in ("circle", "square")
             for d in ("left", "right")]


def test_trained_tokenizer_has_c4_ens_layout_and_no_bos(tmp_path):
    """train_spm lays ids out as the official c4_en (golden NOTES 7): pad 0, eos 1, unk 2 and no BOS, so a caption
    is its SentencePiece pieces alone, then id-0 padding."""
    import sentencepiece as spm

    from videoprism.data.text import train_spm

    path = str(tmp_path / "s.model")
    train_spm(_CAPTIONS, path, vocab_size=60)
    sp = spm.SentencePieceProcessor(model_file=path)
    assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, -1)
    ids, pad = Tokenizer(path)(["A red circle moves LEFT!"])
    pieces = sp.encode("a red circle moves left.")
    assert ids[0, :len(pieces)].tolist() == pieces and not ids[0, len(pieces):].any()
    assert pad[0].tolist() == [0.0] * len(pieces) + [1.0] * (64 - len(pieces))


def test_a_bos_of_id_0_is_prepended_and_counts_as_a_token(tmp_path):
    """"BOS only if bos_id >= 0" (golden NOTES 7): id 0 is a valid BOS; it leads the ids with padding 0.0."""
    import sentencepiece as spm

    path, buf = str(tmp_path / "bos0.model"), io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(canonicalize_text(c) for c in _CAPTIONS), model_writer=buf,
                                   vocab_size=60, model_type="bpe", bos_id=0, pad_id=3, eos_id=1, unk_id=2,
                                   hard_vocab_limit=False, minloglevel=2)
    with open(path, "wb") as f:
        f.write(buf.getvalue())
    pieces = spm.SentencePieceProcessor(model_file=path).encode("a red circle.")
    ids, pad = Tokenizer(path, max_length=8)(["a red circle"])
    want = ([0] + pieces + [0] * 8)[:8]
    assert ids[0].tolist() == want
    assert pad[0].tolist() == [0.0] * min(8, 1 + len(pieces)) + [1.0] * (8 - min(8, 1 + len(pieces)))


def test_tokenizer_max_length_truncates_and_must_be_positive(tmp_path):
    """A custom max_length sets the width of ids and paddings and truncates; 0 (empty rows) is refused."""
    from videoprism.data.text import train_spm

    path = str(tmp_path / "s.model")
    train_spm(_CAPTIONS, path, vocab_size=60)
    tok = Tokenizer(path, max_length=3)
    full = Tokenizer(path).encode_one("a blue square moves right")
    assert len(full) > 3
    ids, pad = tok(["a blue square moves right", "a"])
    assert ids.shape == pad.shape == (2, 3)
    assert ids[0].tolist() == full[:3] and pad[0].tolist() == [0.0] * 3
    for bad in (0, -1):
        with pytest.raises(ValueError, match="max_length must be >= 1"):
            Tokenizer(path, max_length=bad)


# ---- manifests -------------------------------------------------------------------------------------------------------
def test_manifest_bad_lines_are_rejected_with_line_and_reason(tmp_path, synth):
    lines = [json.dumps({"path": os.path.join(synth, "clips", f"{i:06d}.webm"), "caption": "ok"}).encode()
             for i in range(3)]
    bad = [b'{"path": "a.mp4", "caption": "x"',  # bad JSON
           json.dumps({"caption": "no path"}).encode(),
           json.dumps({"path": "a.mp4", "caption": "   "}).encode(),
           '{"path": "a.mp4", "caption": "caf\u00e9"}'.encode("latin-1"),  # not UTF-8
           json.dumps({"path": "a.mp4", "caption": "x", "start": 3, "end": 1}).encode(),
           json.dumps(["not", "an", "object"]).encode(),
           b'{"path": "a.mp4", "caption": "x", "start": NaN}',  # json parses NaN and Infinity
           b'{"path": "a.mp4", "caption": "x", "end": Infinity}',
           # a dict key named as the int label: both were the probe "label", the dict's unreachable
           json.dumps({"path": "a.mp4", "caption": "x", "label": {"label": 2}}).encode()]
    p = tmp_path / "m.jsonl"
    p.write_bytes(b"\n".join(lines + bad) + b"\n")
    samples, rejects = read_manifest(str(p), max_bad_share=1.0)
    assert len(samples) == 3
    reasons = dict(rejects)
    for n, word in zip(range(4, 13), ["bad JSON", "'path'", "'caption'", "not UTF-8", "'end'", "object",
                                      "'start' must be a non-negative, finite", "'end' must be a non-negative, finite",
                                      "'label' dict key 'label' is the name of an int label"]):
        assert word in reasons[f"{p}:{n}"], reasons
    with pytest.raises(TooManyBadSamplesError, match="max_bad_share"):
        read_manifest(str(p), max_bad_share=0.5)


def test_manifest_with_a_byte_order_mark_and_bad_json_columns(tmp_path, synth):
    good = json.dumps({"path": os.path.join(synth, "clips", "000000.webm"), "caption": "ok"})
    p = tmp_path / "bom.jsonl"
    # A missing comma, worded and placed alike by Python 3.10-3.13 (3.13 reworded a trailing comma's error and
    # moved its column from 34 to 33).
    p.write_bytes(b"\xef\xbb\xbf" + good.encode() + b"\n" + b'{"path": "a.mp4" "caption": "x"}\n')
    samples, rejects = read_manifest(str(p), max_bad_share=1.0)
    assert len(samples) == 1  # the BOM is not part of line 1
    assert rejects == [(f"{p}:2", "bad JSON (Expecting ',' delimiter at column 18)")]


def test_a_caption_pasted_raw_into_a_line_is_a_reason_naming_the_fix(tmp_path):
    """A tab or a terminal's escape pasted raw into a caption is no JSON: the reason read "Invalid control character at
    at column 36", with no fix; a latin-1 line's, "not UTF-8", none either."""
    p = tmp_path / "m.jsonl"
    p.write_bytes(b'{"path": "a.webm", "caption": "ok"}\n{"path": "a.webm", "caption": "red \x1b[31mdog"}\n'
                  + '{"path": "a.webm", "caption": "caf\xe9"}\n'.encode("latin-1"))
    samples, rejects = read_manifest(str(p), max_bad_share=1.0, use_pack=False)
    assert len(samples) == 1 and rejects == [
        (f"{p}:2", "bad JSON (Invalid control character at column 36: a string holds '\\x1b' raw; escape it (\\t, "
                   "\\n, \\u001b), as json.dumps writes it)"),
        (f"{p}:3", "not UTF-8 (invalid continuation byte at byte 34); save the manifest as UTF-8")]


def test_a_caption_of_another_type_is_a_short_reason(tmp_path):
    """A 1 MB caption given as a list was a 1 MB reason: a line of the rejects report, and of the error that stops a
    run, each 1 MB."""
    p = tmp_path / "m.jsonl"
    p.write_text('{"path": "a.webm", "caption": "ok"}\n' + json.dumps({"path": "a.webm", "caption": ["x" * 10**6]})
                 + "\n")
    samples, rejects = read_manifest(str(p), max_bad_share=1.0, use_pack=False)
    assert len(samples) == 1
    assert rejects == [(f"{p}:2", f"'caption' must be one string, got a list of 1: ['{'x' * 58}... (1000004 "
                                  "characters); give one caption a line (for training, a clip may repeat on a line "
                                  "per caption)")]
    with pytest.raises(TooManyBadSamplesError, match=f"{p}:2: 'caption' must") as e:
        read_manifest(str(p), use_pack=False)
    assert len(str(e.value)) < 1000


def test_a_caption_list_is_refused_naming_the_fix(tmp_path):
    """A clip's several captions given as a list were refused as "'caption' must be a non-empty string, got ['a dog
    runs', 'a dog plays']", which says neither that a list is the trouble nor what to write instead."""
    p = tmp_path / "m.jsonl"
    p.write_text('{"path": "a.webm", "caption": "ok"}\n{"path": "a.webm", "caption": ["a dog runs", "a dog plays"]}\n')
    _, rejects = read_manifest(str(p), max_bad_share=1.0, use_pack=False)
    assert rejects == [(f"{p}:2", "'caption' must be one string, got a list of 2: ['a dog runs', 'a dog plays']; give "
                                  "one caption a line (for training, a clip may repeat on a line per caption)")]


def test_resume_over_other_samples_is_refused(tmp_path, synth):
    """The position indexes a permutation of the sample list: restoring it over another list (a
    re-indexed manifest with a line less) would silently repeat and drop samples."""
    kw = dict(num_frames=8, resolution=36, batch_size=4, train=True, seed=0, tokenizer=os.path.join(synth, "spm.model"),
              backend="pyav")
    full = build_loader(os.path.join(synth, "train.jsonl"), **kw)
    it = iter(full)
    next(it)
    lines = open(os.path.join(synth, "train.jsonl")).read().splitlines()
    short = tmp_path / "short.jsonl"
    short.write_text("\n".join(json.dumps({**json.loads(x), "path": os.path.join(synth, json.loads(x)["path"])})
                               for x in lines[:-1]) + "\n")
    with pytest.raises(ValueError, match="saved over other samples"):
        build_loader(str(short), **kw).load_state_dict(full.state_dict())
    build_loader(os.path.join(synth, "train.jsonl"), **kw).load_state_dict(full.state_dict())  # same data: fine


def test_resume_of_moved_data_names_the_old_path(tmp_path, synth):
    """A manifest's data position is tied to its samples' absolute paths: the same manifest and clips moved to another
    folder (another machine's mount) were refused as "other samples ... start a new run for it", though a symlink at
    the old path resumes them. The refusal names that remedy, which works."""
    kw = dict(num_frames=8, resolution=36, batch_size=4, train=True, seed=0, tokenizer=None, backend="pyav")
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text(open(os.path.join(synth, "train.jsonl")).read())  # relative paths
    (data / "clips").symlink_to(os.path.join(synth, "clips"))
    state = build_loader(str(data / "train.jsonl"), **kw).state_dict()
    moved = tmp_path / "moved"
    data.rename(moved)  # the manifest and its clips, byte for byte
    with pytest.raises(ValueError, match="saved over other samples.*old path .a symlink there"):
        build_loader(str(moved / "train.jsonl"), **kw).load_state_dict(state)
    data.symlink_to(moved)  # the old path leads to the new place
    build_loader(str(data / "train.jsonl"), **kw).load_state_dict(state)


def test_relative_paths_resolve_against_manifest_folder(synth):
    samples, rejects = read_manifest(os.path.join(synth, "train.jsonl"))
    assert not rejects and all(os.path.isfile(s.path) for s in samples)


def test_a_path_climbing_out_of_a_symlinked_folder_is_the_file_ls_lists(tmp_path):
    """A manifest in a symlinked folder, link -> real/deep/data, with "../clips/a.webm": `ls link/../clips` lists
    real/deep/clips, but the path was normalised as text to link's parent, tmp/clips: `data index` rejected every
    file as missing. Now it is the file the kernel reaches; a clean manifest's relative path reads back to the same
    file wherever it is written; and a path that textual normalising already resolved keeps its name (the
    fingerprint a run's checkpoint keeps of it)."""
    from videoprism.data.manifest import sample_from_record

    real = tmp_path / "real" / "deep"
    (real / "data").mkdir(parents=True)
    (real / "clips").mkdir()
    clip = real / "clips" / "a.webm"
    clip.write_bytes(b"")
    link = tmp_path / "link"
    link.symlink_to(real / "data")
    (link / "train.jsonl").write_text('{"path": "../clips/a.webm", "caption": "a"}\n')
    (sample,), _ = read_manifest(str(link / "train.jsonl"))
    assert os.path.samefile(sample.path, clip)
    (tmp_path / "other").mkdir()
    for out in (link, tmp_path / "other", link / "below"):  # a clean manifest beside it, elsewhere, below the link
        back = sample_from_record(sample.to_record(str(out)), str(out))
        assert os.path.samefile(back.path, clip), sample.to_record(str(out))["path"]
    (tmp_path / "up").symlink_to(real)  # up/data/../clips is up/clips as text and as the kernel resolves it
    (real / "data" / "up.jsonl").write_text('{"path": "../clips/a.webm", "caption": "a"}\n')
    (sample,), _ = read_manifest(str(tmp_path / "up" / "data" / "up.jsonl"))
    assert sample.path == str(tmp_path / "up" / "clips" / "a.webm")


def test_a_path_no_file_name_can_hold_is_a_rejected_line(tmp_path):
    """A manifest path with a NUL or a lone UTF-16 surrogate (JSON's "\\ud800") names no file: it was read as a
    sample, whose probe raised in `data index`, ending the whole index with "'utf-8' codec can't encode character
    '\\ud800' in position 12: surrogates not allowed". It is a rejected line, naming the character; a name of a byte
    that is not UTF-8, as os.listdir and json.dumps give it ("\\udce9"), is a path."""
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"path": "a\\ud800.webm", "caption": "a"}\n{"path": "a\\u0000b.webm", "caption": "b"}\n'
                        '{"path": "caf\\udce9.webm", "caption": "c"}\n')
    samples, rejects = read_manifest(str(manifest), max_bad_share=1.0)
    assert [s.path for s in samples] == [os.fsdecode(os.path.join(os.fsencode(str(tmp_path)), b"caf\xe9.webm"))]
    assert [(where, reason.split(",")[0]) for where, reason in rejects] == [
        (f"{manifest}:1", "'path' holds '\\ud800' at 1"),
        (f"{manifest}:2", "'path' 'a\\x00b.webm' holds a NUL character")]


# Reads argv[1] as JSON and then from its pack, in this process's locale: what each gives, one line each.
_READ_IN_LOCALE = r"""
import sys
from videoprism.data.manifest import read_manifest
sys.stdout.reconfigure(encoding="utf-8")  # an error names the sample's path, which ascii cannot print
print(sys.getfilesystemencoding())
for use_pack in (False, True):
    try:
        samples, rejects = read_manifest(sys.argv[1], use_pack=use_pack, max_bad_share=1.0)
        print(f"read {len(samples)} samples, rejects {rejects}")
    except (OSError, ValueError) as e:
        print(f"{type(e).__name__}: {e}")
"""


def test_a_path_the_locale_cannot_name_stops_the_read_naming_the_fix(tmp_path):
    """Under a locale that is not UTF-8 (LC_ALL=C with PYTHONUTF8=0: file names are ascii) a manifest's
    "caf\u00e9.mp4", a file in a UTF-8 locale, was a rejected line "a lone UTF-16 surrogate, which no file name
    holds": `data index` wrote a clean manifest without it (18 of 22 synthetic lines kept, 19 in a UTF-8 locale) and
    the run trained on other data. Read from a pack made in a UTF-8 locale, it reached the probe, which ended the
    index with "'ascii' codec can't encode character '\\xe9'". Both now stop with the line (or sample) and the fix."""
    if sys.getfilesystemencoding() != "utf-8":
        pytest.skip("the manifest and its pack are written in a UTF-8 locale here")
    from videoprism.data.pack import write_pack

    write_clip(str(tmp_path / "caf\u00e9.mp4"), 2)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"path": "caf\\u00e9.mp4", "caption": "a"}\n')
    write_pack(str(manifest))
    (sample,), _ = read_manifest(str(manifest), use_pack=False)
    assert os.path.isfile(sample.path)  # a file in this locale
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    r = subprocess.run([sys.executable, "-c", _READ_IN_LOCALE, str(manifest)], capture_output=True, env=env,
                       timeout=HANG_S)
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    encoding, parsed, packed = r.stdout.decode().splitlines()
    if encoding != "ascii":
        pytest.skip(f"LC_ALL=C gives file names in {encoding} here, not ascii")
    fix = "which this process's file names cannot: they are ascii, from the locale (LC_ALL, LC_CTYPE, LANG), not " \
          "UTF-8; run with PYTHONUTF8=1 or in a UTF-8 locale (LC_ALL=C.UTF-8)"
    assert parsed == f"FileNameEncodingError: {manifest}:1: 'path' holds '\u00e9' at 3, {fix}", parsed
    at = sample.path.index("\u00e9")  # the pack holds the absolute path
    assert packed == (f"FileNameEncodingError: {manifest} (read from its pack), the sample of {sample.path}: 'path' "
                      f"holds '\u00e9' at {at}, {fix}"), packed


def test_a_shards_caption_is_its_text_without_a_byte_order_mark_or_line_end(tmp_path):
    """A .txt member saved by Notepad (UTF-8 with a byte-order mark, CRLF) kept the mark as the caption's first
    character, one more piece to the tokenizer (an <unk>), and a .txt of the mark alone was a caption; a .txt in
    latin-1 was rejected as "caption or json not UTF-8", naming neither the member nor the fix."""
    members = {"bom.txt": b"\xef\xbb\xbfa dog runs\r\n", "crlf.txt": b"a dog runs\r\n\r\n",
               "mark.txt": b"\xef\xbb\xbf\r\n", "latin.txt": "caf\xe9 au lait".encode("latin-1"),
               "js.txt": b"a dog", "js.json": b'\xef\xbb\xbf{"label": 3}', "latjs.txt": b"a dog",
               "latjs.json": '{"dataset": "caf\xe9"}'.encode("latin-1")}
    shard = str(tmp_path / "s.tar")
    with tarfile.open(shard, "w") as tar:
        for name, data in {**{f"{k}.webm": b"video bytes" for k in ("bom", "crlf", "mark", "latin", "js", "latjs")},
                           **members}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    got, rejects = read_shards([shard], max_bad_share=1.0)
    assert [(g.member, g.caption, g.label) for g in got] == [("bom.webm", "a dog runs", None),
                                                               ("crlf.webm", "a dog runs", None),
                                                               ("js.webm", "a dog", 3)]
    reasons = dict(rejects)
    assert reasons[f"{shard}:mark"] == "'caption' must be a non-empty string, got ''"
    assert reasons[f"{shard}:latin"] == ("the .txt member (the caption) is not UTF-8 (invalid continuation byte at "
                                         "byte 3); save it as UTF-8")
    assert reasons[f"{shard}:latjs"].startswith("the .json member (start, end, label, dataset) is not UTF-8 (")


def write_shard(path: str, samples) -> None:
    """A WebDataset tar of the samples: NNNN.webm, NNNN.txt (caption), NNNN.json (label)."""
    with tarfile.open(path, "w") as tar:
        for i, s in enumerate(samples):
            tar.add(s.path, arcname=f"{i:04d}.webm")
            for ext, data in ((".txt", s.caption.encode()), (".json", json.dumps({"label": s.label}).encode())):
                info = tarfile.TarInfo(f"{i:04d}{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_video_only_shard_members_and_lines_are_samples_for_readers_without_text(tmp_path, synth):
    """A shard key without a .txt member, like a manifest line without a caption, is a bad sample for a reader with
    a tokenizer (stage 1, retrieval) and a clip for one without (stage 2, probes): batches carry caption None."""
    samples, _ = read_manifest(os.path.join(synth, "val.jsonl"))
    shard = str(tmp_path / "shard-000.tar")
    with tarfile.open(shard, "w") as tar:
        for i, s in enumerate(samples[:2]):
            tar.add(s.path, arcname=f"{i:04d}.webm")
        info = tarfile.TarInfo("0000.txt")
        info.size = len(b"a caption")
        tar.addfile(info, io.BytesIO(b"a caption"))
    got, rejects = read_shards([shard], max_bad_share=1.0)
    assert [g.caption for g in got] == ["a caption"] and rejects == [(f"{shard}:0001", rejects[0][1])]
    assert rejects[0][1].startswith("no .txt member: no caption")
    got, rejects = read_shards([shard], captions=False)
    assert [g.caption for g in got] == ["a caption", None] and not rejects and got.uncaptioned == 1
    kw = dict(num_frames=4, resolution=32, batch_size=2, train=False, backend="pyav")
    batch = next(iter(build_loader([shard], tokenizer=None, **kw)))
    assert batch["caption"] == ["a caption", None] and batch["video"].shape[0] == 2 and "text_ids" not in batch
    tok = Tokenizer(os.path.join(synth, "spm.model"))
    batch = next(iter(build_loader([shard], tokenizer=tok, max_bad_share=0.5, **kw)))
    assert batch["caption"] == ["a caption"] and batch["text_ids"].shape[0] == 1


def test_webdataset_shards_give_the_manifest_samples(tmp_path, synth):
    samples, _ = read_manifest(os.path.join(synth, "val.jsonl"))
    shard = str(tmp_path / "shard-000.tar")
    write_shard(shard, samples)
    got, rejects = read_shards([shard])
    assert not rejects and [g.caption for g in got] == [s.caption for s in samples]
    assert got[1].name == f"{shard}:0001.webm"  # messages name the member, not a byte range
    tok = Tokenizer(os.path.join(synth, "spm.model"))
    kw = dict(num_frames=8, resolution=36, batch_size=2, train=False, tokenizer=tok, backend="pyav")
    a = next(iter(build_loader(os.path.join(synth, "val.jsonl"), **kw)))
    b = next(iter(build_loader([shard], **kw)))
    assert torch.equal(a["video"], b["video"]) and torch.equal(a["label_colour"], b["label_colour"])


def test_a_shard_named_in_upper_case_is_read_as_a_shard(tmp_path, synth, capsys):
    """A shard is told by its extension: "SHARD:000.TAR" (a case-insensitive file system's copy) was taken for a
    manifest, "is a binary file, not a JSONL manifest; pass ... WebDataset .tar shards", by every reader and by
    `data index`, and `data pack` packed it as one. A ':' in its path is no member name either."""
    from videoprism.cli import main
    from videoprism.data.manifest import read_source

    samples, _ = read_manifest(os.path.join(synth, "val.jsonl"))
    folder = tmp_path / "take 12:30"
    folder.mkdir()
    shard = str(folder / "SHARD:000.TAR")
    write_shard(shard, samples)
    got, rejects = read_source(shard)
    assert not rejects and [g.name for g in got] == [f"{shard}:{i:04d}.webm" for i in range(len(samples))]
    assert main(["data", "pack", shard]) == 2
    assert "is a WebDataset shard" in capsys.readouterr().err and not os.path.exists(shard + ".pack")


def test_a_shard_key_with_two_videos_or_a_shard_given_twice_is_refused(tmp_path, synth):
    """Two plain (or two compound) video members of one key: the second was dropped without a word, in neither the
    samples nor the rejects; a plain member still wins over a compound one (a preview). A shard given twice (under
    another spelling too) read its samples twice."""
    samples, _ = read_manifest(os.path.join(synth, "val.jsonl"))
    shard = str(tmp_path / "s.tar")
    with tarfile.open(shard, "w") as tar:
        for name in ("two.webm", "two.mkv", "a.b.webm", "a.c.webm", "p.preview.webm", "p.webm", "q.x.webm",
                     "q.y.webm", "q.webm", "t.b.webm", "t.c.webm"):
            tar.add(samples[0].path, arcname=name)
        # t's plain caption settles which of its two captions is meant, not which of its two videos (it did: t.b.webm
        # was read, t.c.webm dropped without a word).
        for key, field in (("two", "txt"), ("a", "txt"), ("p", "txt"), ("q", "txt"), ("t", "x.txt"), ("t", "txt")):
            info = tarfile.TarInfo(f"{key}.{field}")
            info.size = len(key)
            tar.addfile(info, io.BytesIO(key.encode()))
    got, rejects = read_shards([shard], max_bad_share=1.0)
    assert sorted(g.caption for g in got) == ["p", "q"] and [g.member for g in got if g.caption == "p"] == ["p.webm"]
    assert dict(rejects) == {f"{shard}:two": "two.webm and two.mkv are both its video member; give each key one (a "
                                             "compound field such as KEY.preview.mp4 yields to the plain KEY.mp4)",
                             f"{shard}:a": dict(rejects)[f"{shard}:a"], f"{shard}:t": dict(rejects)[f"{shard}:t"]}
    assert dict(rejects)[f"{shard}:a"].startswith("a.b.webm and a.c.webm are both its video member")
    assert dict(rejects)[f"{shard}:t"].startswith("t.b.webm and t.c.webm are both its video member")
    again = os.path.join(str(tmp_path), "..", tmp_path.name, "s.tar")
    with pytest.raises(ValueError, match=f"shard '{re.escape(again)}' is given twice"):
        read_shards([shard, again])


def test_labels_are_class_ids_and_captions_text(tmp_path):
    """A negative label read as "no label" downstream (-1 is the loader's), one past int64 failed in the batch with
    no file named; a caption with a lone surrogate (JSON "\\ud800") failed the tokenizer mid-run. Each rejects its
    line, named."""
    m = tmp_path / "m.jsonl"
    lines = [{"path": "a.webm", "caption": "ok", "label": 3}, {"path": "a.webm", "caption": "x", "label": -7},
             {"path": "a.webm", "caption": "x", "label": {"colour": 10**30}}]
    m.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"path": "a.webm", "caption": "bad \\ud800 text"}\n')
    got, rejects = read_manifest(str(m), max_bad_share=1.0, use_pack=False)
    assert [g.label for g in got] == [3]
    assert [w for w, _ in rejects] == [f"{m}:2", f"{m}:3", f"{m}:4"]
    assert "must be a class id (an int >= 0)" in rejects[0][1] and "must be a class id" in rejects[1][1]
    assert "a lone UTF-16 surrogate" in rejects[2][1]


def test_cut_or_garbage_shard_is_rejected_by_name_and_its_intact_members_kept(tmp_path, synth):
    samples, _ = read_manifest(os.path.join(synth, "val.jsonl"))
    whole = str(tmp_path / "whole.tar")
    write_shard(whole, samples)
    data = open(whole, "rb").read()
    cut, garbage = str(tmp_path / "cut.tar"), str(tmp_path / "garbage.tar")
    open(cut, "wb").write(data[: len(data) // 2])
    open(garbage, "wb").write(b"not a tar " * 100)
    got, rejects = read_shards([cut, garbage, whole], max_bad_share=1.0)
    reasons = dict(rejects)
    assert "truncated or not a tar" in reasons[cut] and "read stopped after 0 members" in reasons[garbage]
    assert 0 < len(got) - len(samples) < len(samples)  # the cut shard's members before the cut
    with pytest.raises(TooManyBadSamplesError, match="cut.tar: truncated or not a tar"):
        read_shards([cut])


# ---- loader ----------------------------------------------------------------------------------------------------------
def _loader(synth, **kw):
    args = dict(num_frames=8, resolution=36, batch_size=4, train=True, seed=0,
                tokenizer=os.path.join(synth, "spm.model"), backend="pyav")
    args.update(kw)
    return build_loader(os.path.join(synth, "train.jsonl"), **args)


def test_loader_batches(synth):
    loader = _loader(synth)
    batches = list(loader)
    assert len(batches) == len(loader) == 18 // 4
    b = batches[0]
    assert b["video"].shape == (4, 8, 36, 36, 3) and b["video"].dtype == torch.uint8
    assert b["text_ids"].shape == (4, 64) and b["text_paddings"].shape == (4, 64)
    assert b["video"].float().std() > 10  # real pixels, not a constant
    classes = json.load(open(os.path.join(synth, "synth.json")))["classes"]
    for i, cap in enumerate(b["caption"]):  # labels name the main shape: the first words of the caption
        words = cap.split()
        assert words[1] == classes["colour"][b["label_colour"][i]] and words[2] == classes["shape"][b["label_shape"][i]]
        assert words[4] == classes["direction"][b["label_direction"][i]]
    ids = torch.cat([x["index"] for x in batches])
    assert len(set(ids.tolist())) == len(ids)  # an epoch never repeats a sample


def test_pyav_clips_of_a_gpu_loader_stay_on_the_host(synth):
    """A loader for a CUDA run hands PyAV's clips over on the host: the trainer copies them page-locked and
    non-blocking (videoprism/data/device.py to_device); a pageable copy to the GPU here would make the host wait for the
    queued training step every batch. (This machine has no GPU: a copy to it would raise.)"""
    b = next(iter(_loader(synth, backend="pyav", device="cuda")))
    assert b["video"].device.type == "cpu" and b["video"].shape == (4, 8, 36, 36, 3)


def test_loader_is_deterministic_and_independent_of_workers(synth):
    a = [b["video"] for b in _loader(synth, seed=5)]
    b = [b["video"] for b in _loader(synth, seed=5, num_workers=2)]
    c = [b["video"] for b in _loader(synth, seed=6)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_loader_workers_are_capped_at_the_items_and_the_cores(synth, monkeypatch, capsys):
    """`videoprism embed V --workers 100000` of one video started 100000 worker processes and hung (stopped at 120
    s); an absurd data.workers alike. The workers are capped at the items left (the others would get none) and at
    WORKERS_PER_CORE per core (a note says so), with the same batches."""
    import videoprism.data.loader as loader_mod

    started = []

    def spy(*args, **kw):  # the DataLoader a pass starts: its workers counted before any is forked
        started.append(kw["num_workers"])
        if kw["num_workers"] > 4:
            raise AssertionError(f"{kw['num_workers']} workers started")
        return real(*args, **kw)

    real = loader_mod._WatchedDataLoader
    monkeypatch.setattr(loader_mod, "_WatchedDataLoader", spy)
    val = dict(num_frames=4, resolution=36, batch_size=18, train=False, tokenizer=None, backend="pyav")
    for split, cores, asked, want in (("val", 64, 50, 2), ("train", 1, 5, 4)):  # 2 and 18 clips
        manifest = os.path.join(synth, f"{split}.jsonl")
        ref = [b["video"] for b in build_loader(manifest, **val)]
        monkeypatch.setattr(loader_mod, "usable_cores", lambda: cores)
        started.clear()
        got = [b["video"] for b in build_loader(manifest, **val, num_workers=asked)]
        assert started == [want] and len(got) == len(ref) == 1 and torch.equal(got[0], ref[0])
        note = capsys.readouterr().err
        assert (f"note: {asked} decoding workers asked (data.workers, --workers), 1 core(s) here: 4 decode" in note) \
            == (cores == 1), note


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or (os.cpu_count() or 1) < 2,
                    reason="needs an affinity mask narrower than the machine (Linux, 2+ cores)")
def test_worker_caps_count_the_cores_the_job_may_use():
    """Under SLURM's --cpus-per-task (or taskset, a container's cpuset) os.cpu_count() is the node's count: a
    4-core job on a 128-core node capped its decoding workers at 512 and sized data index's and synth's pools at
    128. The caps count the affinity mask (set here on this thread, which is what sched_getaffinity(0) reads)."""
    from videoprism.data.loader import WORKERS_PER_CORE, _decoding_workers

    mask = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(mask)})
    try:
        assert _decoding_workers(1000, rank=1) == WORKERS_PER_CORE
    finally:
        os.sched_setaffinity(0, mask)
    assert _decoding_workers(1000, rank=1) == WORKERS_PER_CORE * len(mask)


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads the workers' signal masks from Linux /proc")
def test_loader_workers_leave_the_stop_signals_to_their_parent(synth):
    """A scheduler's SIGTERM / SIGUSR1 reaches the whole process group; the trainer saves a
    checkpoint on it (videoprism/preemption.py), which a worker killed by it would prevent."""
    def children() -> set[str]:
        me = os.getpid()
        return {pid for task in os.listdir(f"/proc/{me}/task")
                for pid in open(f"/proc/{me}/task/{task}/children").read().split()}

    # Only this loader's workers: earlier tests of the session may leave a fork server or resource tracker.
    before = children()
    it = iter(_loader(synth, num_workers=1))
    next(it)
    workers = children() - before
    assert workers
    for pid in workers:
        ignored = int(next(line for line in open(f"/proc/{pid}/status") if line.startswith("SigIgn:")).split()[1], 16)
        assert all(ignored >> (s - 1) & 1 for s in (signal.SIGTERM, signal.SIGUSR1)), (pid, hex(ignored))
    del it


_CTRL_C_AT_A_FORK = """
import os, signal, sys
if __name__ == "__main__":
    # Python leaves SIGINT ignored when it starts so (pytest under `nohup`, or a shell's `cmd &`): then no Ctrl-C.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from videoprism.data.loader import build_loader
    armed = []

    def ctrl_c_in_the_parent_after_a_fork():  # as a Ctrl-C landing while the loader starts its workers
        if armed:
            armed.clear()
            os.kill(os.getpid(), signal.SIGINT)

    os.register_at_fork(after_in_parent=ctrl_c_in_the_parent_after_a_fork)
    loader = build_loader(os.path.join(sys.argv[1], "train.jsonl"), num_frames=8, resolution=36, batch_size=4,
                          train=True, tokenizer=os.path.join(sys.argv[1], "spm.model"), backend="pyav", num_workers=1)
    try:
        for epoch in range(2):
            armed.append(1)
            for b in loader:
                pass
        print("not interrupted")
    except KeyboardInterrupt:
        print("interrupted in epoch", epoch)
"""


def test_a_ctrl_c_while_the_workers_start_interrupts(synth):
    """Python raises a Ctrl-C's KeyboardInterrupt at the main thread's next bytecode: when that was in one of
    os.fork's callbacks (logging's, as the loader forks its workers), Python printed "Exception ignored in" and
    dropped it, and the run went on (2 Ctrl-Cs in 12 on tiny epochs). Here the Ctrl-C lands in such a callback."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _CTRL_C_AT_A_FORK, synth], capture_output=True, text=True, timeout=HANG_S)
    assert r.stdout.strip() == "interrupted in epoch 0" and "Exception ignored" not in r.stderr, (r.stdout,
                                                                                                  r.stderr[-3000:])


_NOTICE_TO_THE_GROUP = """
import json, multiprocessing, os, signal, sys
if __name__ == "__main__":
    multiprocessing.set_start_method("forkserver")
    from videoprism.data.loader import build_loader
    signal.signal(signal.SIGTERM, lambda *a: None)  # the trainer's handler: it saves, then exits
    loader = build_loader(os.path.join(sys.argv[1], "train.jsonl"), num_frames=8, resolution=36, batch_size=4,
                          train=True, tokenizer=os.path.join(sys.argv[1], "spm.model"), backend="pyav", num_workers=1)
    out = []
    for i, b in enumerate(loader):
        if i == 0:
            os.killpg(0, signal.SIGTERM)  # as SLURM signals every process of the job, torchrun a worker's group
        out.append([b["index"].tolist(), b["video"].double().mean().item()])
    print(json.dumps(out))
"""


def test_a_notice_to_the_process_group_leaves_the_fork_servers_workers_alive(synth):
    """forkserver (Python 3.14's default): the workers' parent is the fork server, in the loader's process group.
    It died of a notice to the group, and the loader read every worker as dead (exit 255): a restart inside the
    trainer's save budget, and a strike against the file in flight ("the decoder crashed on it")."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _NOTICE_TO_THE_GROUP, synth], capture_output=True, text=True,
                       timeout=HANG_S, start_new_session=True)
    assert r.returncode == 0 and "worker died" not in r.stderr, r.stderr[-3000:]
    ref = [[b["index"].tolist(), b["video"].double().mean().item()] for b in _loader(synth)]
    assert json.loads(r.stdout.splitlines()[-1]) == ref


_START_METHOD = """
import json, multiprocessing, os, sys
if __name__ == "__main__":
    multiprocessing.set_start_method(sys.argv[2])
    from videoprism.data.loader import build_loader
    from videoprism.data.pack import write_pack
    m, packed = os.path.join(sys.argv[1], "train.jsonl"), sys.argv[3] == "packed"
    if packed:
        write_pack(m)
    loader = build_loader(m, num_frames=8, resolution=36, batch_size=4,
                          train=True, tokenizer=os.path.join(sys.argv[1], "spm.model"), backend="pyav", num_workers=2)
    if packed:  # mapped; then the next version of the data is packed over it before the workers start
        assert loader.samples._pack == m, loader.samples._pack
        lines = open(m).readlines()
        open(m, "w").writelines(lines[:-1])
        write_pack(m)
    print(json.dumps([[b["index"].tolist(), b["video"].double().mean().item()] for b in loader]))
"""


@pytest.mark.parametrize("packed", ["parsed", "packed"])
@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_loader_workers_run_under_every_start_method(tmp_path, synth, method, packed):
    """forkserver is Python 3.14's default: there a worker's OS parent is the fork server, not the loader. Over a
    packed manifest the workers map the loader's pack, the one it read even if the manifest was packed again."""
    import shutil
    import subprocess
    import sys

    folder = synth
    if packed == "packed":  # a copy of the manifest, beside the clips: the fixture's stays as it is
        folder = str(tmp_path)
        shutil.copy(os.path.join(synth, "train.jsonl"), folder)
        for name in ("clips", "spm.model"):
            os.symlink(os.path.join(synth, name), os.path.join(folder, name))
    r = subprocess.run([sys.executable, "-c", _START_METHOD, folder, method, packed], capture_output=True,
                       text=True, timeout=HANG_S)
    assert r.returncode == 0, r.stderr[-3000:]
    ref = [[b["index"].tolist(), b["video"].double().mean().item()] for b in _loader(synth)]
    assert json.loads(r.stdout.splitlines()[-1]) == ref


_KILLED_MID_DECODE = """
import os, signal, sys, time
import videoprism.data.decode as decode
from videoprism.data.loader import build_loader
real = decode.decode_clip
def stuck(*a, **k):  # the first clip decodes; then every decode hangs, as in a stuck decoder
    if os.path.exists(sys.argv[2]):
        time.sleep(600)
    open(sys.argv[2], "w").close()
    return real(*a, **k)
decode.decode_clip = stuck
loader = build_loader(os.path.join(sys.argv[1], "train.jsonl"), num_frames=8, resolution=36, batch_size=1,
                      train=True, tokenizer=os.path.join(sys.argv[1], "spm.model"), backend="pyav", num_workers=1)
it = iter(loader)
next(it)
me = os.getpid()
with open(sys.argv[3], "w") as f:
    f.write(" ".join(p for t in os.listdir(f"/proc/{me}/task") for p in open(f"/proc/{me}/task/{t}/children").read().split()))
time.sleep(0.5)  # the worker is inside a hung decode now
os.kill(me, signal.SIGKILL)  # the parent dies without any cleanup
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="Linux only (PR_SET_PDEATHSIG, /proc)")
def test_a_worker_stuck_in_a_decode_dies_with_its_parent(tmp_path, synth):
    """Workers ignore the stop signals, so the kernel must end them when their parent dies:
    torch's own watchdog never runs while a worker hangs inside a decode."""
    import subprocess
    import sys
    import time

    # Files, not pipes: a leaked worker would hold a pipe open and hang the wait for its end.
    with open(tmp_path / "stderr", "w") as err:
        # its temp folder too: killed outright, the parent leaves its multiprocessing folder (pymp-*) there
        r = subprocess.run([sys.executable, "-c", _KILLED_MID_DECODE, synth, str(tmp_path / "first"),
                            str(tmp_path / "pids")], stdout=subprocess.DEVNULL, stderr=err, timeout=HANG_S,
                           env={**os.environ, "TMPDIR": str(tmp_path)})
    assert r.returncode == -signal.SIGKILL, (tmp_path / "stderr").read_text()[-2000:]
    workers = [int(p) for p in (tmp_path / "pids").read_text().split()]
    assert workers
    deadline = time.time() + 5
    while time.time() < deadline and any(os.path.exists(f"/proc/{p}") for p in workers):
        time.sleep(0.05)
    assert not [p for p in workers if os.path.exists(f"/proc/{p}")], "a worker outlived its parent"


forked_workers = pytest.mark.skipif(multiprocessing.get_start_method() != "fork",
                                    reason="the fault is injected into forked workers")


def _reference_epoch(synth, **kw):
    """Sample ids of one epoch and the video of each id, decoded without faults."""
    loader = _loader(synth, **kw)
    ids, videos = [], {}
    for b in loader:
        ids += b["index"].tolist()
        videos.update(zip(b["index"].tolist(), b["video"]))
    return loader, ids, videos


def _inject(monkeypatch, victims: set[str], fault: str, once_dir=None):
    """Make the decode of each file named in `victims` kill or hang its worker (every time; with `once_dir`,
    only the first time, as the environment would)."""
    import time

    import videoprism.data.decode as decode

    real = decode.decode_clip

    def faulty(*a, name=None, **k):
        if name in victims:
            mark = once_dir and os.path.join(once_dir, os.path.basename(name))
            if not mark or not os.path.exists(mark):
                if mark:
                    open(mark, "w").close()
                if fault == "hang":
                    time.sleep(600)
                os.kill(os.getpid(), signal.SIGSEGV if fault == "segfault" else signal.SIGKILL)
        return real(*a, name=name, **k)

    monkeypatch.setattr(decode, "decode_clip", faulty)


@forked_workers
@pytest.mark.parametrize("fault", ["segfault", "hang"])
def test_a_file_that_crashes_or_hangs_the_decoder_is_skipped_and_the_epoch_goes_on(synth, monkeypatch, fault):
    """A libav segfault kills its worker process: a plain DataLoader then raises in the main thread
    wherever it is (here: inside the consumer's sleep, as it would inside an optimizer step). A hung
    decode stalls it forever. The loader instead skips the file (once its decode has killed a worker
    twice) and delivers every other sample as a run without that file would."""
    import time

    ref, ref_ids, ref_videos = _reference_epoch(synth, seed=3, batch_size=3)
    victims = {ref.samples[ref_ids[2]].name: ref_ids[2], ref.samples[ref_ids[10]].name: ref_ids[10]}
    _inject(monkeypatch, set(victims), fault)
    # 1 s, waited out twice per hung file: a good clip here decodes in ~20 ms even on a busy machine
    run = _loader(synth, seed=3, num_workers=2, batch_size=3, max_bad_share=0.2, decode_timeout=1)
    t0 = time.monotonic()
    batches = []
    for b in run:
        batches.append(b)
        time.sleep(0.2)  # the workers run ahead and meet the victims while the main thread is elsewhere
    ids = torch.cat([b["index"] for b in batches]).tolist()
    kept = [i for i in ref_ids if i not in victims.values()]
    assert ids == kept[: len(kept) - len(kept) % 3]
    assert all(torch.equal(v, ref_videos[i]) for b in batches for i, v in zip(b["index"].tolist(), b["video"]))
    rejects = dict(run.drain_rejects())
    assert set(rejects) == set(victims)
    if fault == "segfault":
        assert all(r == "the decoder crashed on it (its worker process was killed by SIGSEGV)" for r in rejects.values())
    else:
        assert all(r == "the decoder hung on it (no result after 1 s: data.decode_timeout)" for r in rejects.values())
    assert time.monotonic() - t0 < 120


@forked_workers
def test_a_worker_killed_once_in_a_good_file_costs_a_restart_not_the_file(synth, monkeypatch, tmp_path, capfd):
    """The OOM killer or a full /dev/shm can end a worker in the middle of any decode: that file is
    decoded again, and nothing is skipped."""
    _, ref_ids, ref_videos = _reference_epoch(synth, seed=3, batch_size=3)
    run = _loader(synth, seed=3, num_workers=2, batch_size=3)
    _inject(monkeypatch, {run.samples[ref_ids[4]].name}, "kill", once_dir=str(tmp_path))
    batches = list(run)
    assert torch.cat([b["index"] for b in batches]).tolist() == ref_ids
    assert all(torch.equal(v, ref_videos[i]) for b in batches for i, v in zip(b["index"].tolist(), b["video"]))
    assert run.drain_rejects() == []
    assert "a data loader worker died" in capfd.readouterr().err


_KILLED_AFTER_A_BATCH = """
import os, signal, sys
import videoprism.data.decode as decode
from videoprism.data.loader import build_loader
real = decode.decode_clip
decodes = []
def killed_once(*a, **k):  # a worker's 4th decode (it has sent batches): killed, as by the OOM killer, once
    decodes.append(1)
    if len(decodes) == 4 and not os.path.exists(sys.argv[2]):
        open(sys.argv[2], "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*a, **k)
decode.decode_clip = killed_once
loader = build_loader(os.path.join(sys.argv[1], "train.jsonl"), num_frames=8, resolution=36, batch_size=1,
                      train=True, tokenizer=os.path.join(sys.argv[1], "spm.model"), backend="pyav", num_workers=1)
print(sum(1 for _ in loader))
"""


def test_a_worker_killed_after_sending_a_batch_leaves_nothing_in_the_temp_folder(tmp_path, synth):
    """A worker makes a /tmp/pymp-* folder (with the socket that hands a batch's shared memory over) when it sends
    its first batch, and removes it as it exits: one killed (the OOM killer, a decoder crash or hang) left it in
    the user's /tmp, one folder per worker killed over a run."""
    import subprocess
    import sys

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    r = subprocess.run([sys.executable, "-c", _KILLED_AFTER_A_BATCH, synth, str(tmp_path / "killed")],
                       capture_output=True, text=True, timeout=HANG_S, env={**os.environ, "TMPDIR": str(tmp)})
    assert r.returncode == 0 and (tmp_path / "killed").exists(), r.stderr[-3000:]
    assert int(r.stdout.split()[-1]) == len(_loader(synth).samples)
    assert os.listdir(tmp) == []


def test_epoch_moves_to_another_number_of_ranks_without_repeats_or_gaps(synth):
    """Positions of 3 ranks (unequal, as when one skipped bad files) moved to 2 ranks, and those to 3 again: the new
    ranks' orders and everything read before are disjoint and together the epoch; the states survive JSON;
    the next epoch is dealt as usual."""
    def layout(world, **kw):
        return [_loader(synth, seed=5, rank=r, world_size=world, **kw) for r in range(world)]

    def read_set(loaders):
        return [int(x) for ld in loaders for x in ld.epoch_order(ld.epoch)[:ld.position]]

    old = layout(3)
    epoch = set(range(len(old[0].samples)))
    # 18 samples on 3 ranks: 6 each; on 2 ranks, what is left of 18 (18 - 7 = 11) loses its odd one.
    for ld, p in zip(old, (2, 3, 2)):
        ld.position = p
    read = read_set(old)
    states = json.loads(json.dumps([ld.state_dict() for ld in old]))
    for r, state in enumerate(states):  # skips the old ranks counted before the checkpoint
        state["rejects"] = [[f"bad{r}.mp4", "truncated"]]
    new = layout(2, max_bad_share=0.3)
    for ld in new:
        ld.load_resharded(states)
    # The share stays one of the rank's whole epoch (9 of 18), not of what is left of it (5); the old ranks'
    # skips are dealt over the new ranks, none lost or counted twice.
    assert [ld._budget.total for ld in new] == [9, 9]
    assert [ld.rejects for ld in new] == [[("bad0.mp4", "truncated"), ("bad2.mp4", "truncated")],
                                          [("bad1.mp4", "truncated")]]
    rest = [int(x) for ld in new for x in ld.epoch_order(ld.epoch)]
    assert len(read) + len(rest) == len(set(read) | set(rest)) == 17 and set(read) | set(rest) <= epoch
    assert len(new[0].epoch_order(0)) == len(new[1].epoch_order(0)) == 5

    for ld, p in zip(new, (1, 2)):  # a second move, 2 -> 3, in the same epoch
        ld.position = p
    read2 = read + read_set(new)
    states = json.loads(json.dumps([ld.state_dict() for ld in new]))
    again = layout(3)
    for ld in again:
        ld.load_resharded(states)
    rest = [int(x) for ld in again for x in ld.epoch_order(ld.epoch)]
    assert len(read2) + len(rest) == len(set(read2) | set(rest)) == 16  # 17 - 3 read = 7 left: 6 dealt

    # A same-size resume keeps the chain; the next epoch drops it.
    same = _loader(synth, seed=5, rank=1, world_size=3)
    same.load_state_dict(again[1].state_dict())
    assert same.epoch_order(0).tolist() == again[1].epoch_order(0).tolist()
    assert layout(3)[1].epoch_order(1).tolist() == again[1].epoch_order(1).tolist()

    with pytest.raises(ValueError, match="different epochs"):
        mixed = [ld.state_dict() for ld in layout(2)]
        mixed[1]["epoch"] = 1
        layout(1)[0].load_resharded(mixed)
    with pytest.raises(ValueError, match="saved over other samples"):
        _loader(synth, seed=5, max_bad_share=1.0).load_resharded([{**states[0], "samples": "1:x"}, states[1]])


def test_resharded_loader_reads_the_rest_of_the_epoch(synth):
    """Decoded: 2 ranks read a batch each, a 1-rank loader resumed from both states reads every other sample
    of the epoch, once."""
    two = [_loader(synth, seed=4, batch_size=2, rank=r, world_size=2) for r in range(2)]
    head = [int(i) for ld in two for i in next(iter(ld))["index"]]
    one = _loader(synth, seed=4, batch_size=2)
    one.load_resharded([ld.state_dict() for ld in two])
    tail = [int(i) for b in one for i in b["index"]]
    assert len(head) == 4 and len(head) + len(tail) == len(set(head) | set(tail)) == 18


@forked_workers
def test_resume_after_a_crash_gives_the_rest_of_the_run(synth, monkeypatch):
    """The checkpointed position and bad-sample count stay right across a crash: a resumed loader gives the
    batches the uninterrupted one gave next, and counts the skipped file once."""
    ref, ref_ids, _ = _reference_epoch(synth, seed=3, batch_size=2)
    victim = ref.samples[ref_ids[1]].name
    _inject(monkeypatch, {victim}, "segfault")
    full = _loader(synth, seed=3, num_workers=2, batch_size=2, max_bad_share=0.2)
    it = iter(full)
    head = [next(it)["index"] for _ in range(3)]
    state = json.loads(json.dumps(full.state_dict()))
    tail = [b["index"] for b in it]
    assert state["rejects"] == [[victim, "the decoder crashed on it (its worker process was killed by SIGSEGV)"]]
    resumed = _loader(synth, seed=3, num_workers=2, batch_size=2, max_bad_share=0.2)
    resumed.load_state_dict(state)
    rest = [b["index"] for b in resumed]
    assert len(rest) == len(tail) and all(torch.equal(x, y) for x, y in zip(rest, tail))
    assert torch.cat(head + tail).tolist() == [i for i in ref_ids if ref.samples[i].name != victim][:2 * (len(head) + len(tail))]


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads the worker's state from Linux /proc")
def test_workers_are_unregistered_from_torchs_sigchld_check(synth, monkeypatch):
    """The private torch API the crash recovery rests on: a worker's death is not raised by torch's SIGCHLD
    check (which would fire anywhere in the main thread), from before the workers get their first item."""
    import time

    from torch.utils.data._utils.signal_handling import _error_if_any_worker_fails
    from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter

    from videoprism.data import loader as loader_mod

    # torch's _reset sends the workers their first items: record whether the SIGCHLD check watched them then.
    watched_at_dispatch = []
    base_reset = _MultiProcessingDataLoaderIter._reset

    def reset(self, *a, **k):
        watched_at_dispatch.append(self._worker_pids_set)
        return base_reset(self, *a, **k)

    monkeypatch.setattr(_MultiProcessingDataLoaderIter, "_reset", reset)
    loader = _loader(synth, num_workers=1, batch_size=1)
    items = loader._pyav_items(loader.epoch_order(0))
    next(items)
    assert watched_at_dispatch == [False]
    (it,) = [i for i in loader_mod._LIVE_ITERATORS if getattr(i, "_workers", None)]
    pid = it._workers[0].pid
    os.kill(pid, signal.SIGKILL)
    deadline = time.time() + 10  # dead but not reaped: the state torch's check looks for
    while time.time() < deadline and open(f"/proc/{pid}/stat").read().split(") ")[1][0] != "Z":
        time.sleep(0.05)
    _error_if_any_worker_fails()  # raises "DataLoader worker (pid N) is killed by signal" for a watched worker
    items.close()


_EXIT_WITH_A_LIVE_LOADER = """
import os, sys
from videoprism.data.loader import build_loader
loader = build_loader(os.path.join(sys.argv[1], "train.jsonl"), num_frames=8, resolution=36, batch_size=1,
                      train=True, tokenizer=os.path.join(sys.argv[1], "spm.model"), backend="pyav", num_workers=1)
it = iter(loader)
next(it)
raise SystemExit("an uncaught error with the loader's workers alive")
"""


def test_a_process_exits_while_its_loader_workers_are_alive(synth):
    """multiprocessing's exit handler SIGTERMs daemonic workers and joins them; ours ignore SIGTERM, so
    without the loader's own exit handler the process would wait forever."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _EXIT_WITH_A_LIVE_LOADER, synth], capture_output=True, text=True,
                       timeout=HANG_S)
    assert r.returncode == 1 and "an uncaught error" in r.stderr, r.stderr[-2000:]


@forked_workers
def test_workers_that_keep_dying_between_files_stop_the_run_with_a_message(synth, monkeypatch):
    from videoprism.data import loader as loader_mod

    monkeypatch.setattr(loader_mod, "_init_worker", lambda _: os.kill(os.getpid(), signal.SIGKILL))
    with pytest.raises(RuntimeError, match=r"died 3 times in a row with no item delivered in between \(last: "
                                           r"between files: its worker process was killed by SIGKILL; .*Lower "
                                           r"data.workers"):
        next(iter(_loader(synth, num_workers=1)))


def test_ranks_read_disjoint_shards(synth):
    ids = [torch.cat([b["index"] for b in _loader(synth, rank=r, world_size=3, batch_size=2)]) for r in range(3)]
    sets = [set(i.tolist()) for i in ids]
    assert all(len(s) == 6 for s in sets) and not (sets[0] & sets[1] or sets[1] & sets[2] or sets[0] & sets[2])


def test_resume_gives_exactly_the_remaining_batches(synth):
    ref = _loader(synth, batch_size=3)
    full = [b["index"] for b in ref] + [b["index"] for b in ref]  # two epochs
    run = _loader(synth, batch_size=3)
    it = iter(run)
    seen = [next(it)["index"] for _ in range(4)]
    state = json.loads(json.dumps(run.state_dict()))  # what a checkpoint stores
    resumed = _loader(synth, batch_size=3)
    resumed.load_state_dict(state)
    rest = [b["index"] for b in resumed] + [b["index"] for b in resumed]
    assert len(seen) + len(rest) == len(full)
    assert all(torch.equal(x, y) for x, y in zip(seen + rest, full))


def test_bad_samples_are_skipped_below_the_share_and_stop_the_run_above(tmp_path, synth):
    good = [json.loads(line) for line in open(os.path.join(synth, "train.jsonl"))]
    for rec in good:
        rec["path"] = os.path.join(synth, rec["path"])
    write_clip(str(tmp_path / "g.mp4"), 40)
    bad_files = make_bad_files(str(tmp_path), str(tmp_path / "g.mp4"))
    bad = [{"path": p, "caption": f"bad {k}"} for k, p in bad_files.items()]
    m = tmp_path / "m.jsonl"
    m.write_text("".join(json.dumps(r) + "\n" for r in good + bad))
    kw = dict(num_frames=8, resolution=36, batch_size=4, train=False, tokenizer=os.path.join(synth, "spm.model"),
              backend="pyav")
    loader = build_loader(str(m), max_bad_share=0.5, **kw)
    seen = torch.cat([b["index"] for b in loader]).tolist()
    assert len(seen) == len(good)
    assert sorted(r for _, r in loader.state_dict()["rejects"]) == []  # a new epoch starts clean
    loader = build_loader(str(m), max_bad_share=0.5, **kw)
    for _ in loader:
        rejects = dict(loader.rejects)
    assert set(rejects) == set(bad_files.values())
    for reason, path in bad_files.items():
        assert reason in rejects[path]
    # 0.2 * 24 = 4.8: the run stops at the 5th bad sample, as soon as the epoch is certain to pass the share.
    with pytest.raises(TooManyBadSamplesError, match=r"5 of 24 samples"):
        list(build_loader(str(m), max_bad_share=0.2, **kw))


def write_corrupt_payload(src: str, dst: str) -> None:
    """`src`'s packets remuxed, those of its second half replaced by random bytes: the container is intact (the
    demux pass and a clean manifest's probe pass it), the decoder fails on the data."""
    rng = np.random.default_rng(0)
    with av.open(src) as inp, av.open(dst, "w", format="webm") as out:
        o = out.add_stream_from_template(inp.streams.video[0])
        packets = [pk for pk in inp.demux(video=0) if pk.size]
        for k, pk in enumerate(packets):
            if k >= len(packets) // 2:
                junk = av.Packet(rng.integers(0, 256, pk.size, dtype=np.uint8).tobytes())
                junk.pts, junk.dts, junk.time_base, junk.is_keyframe = pk.pts, pk.dts, pk.time_base, pk.is_keyframe
                pk = junk
            pk.stream = o
            out.mux(pk)


def bad_vp9_files(d: str, good_webm: str) -> dict[str, str]:
    """reason word -> a bad file FFmpeg has words for: a cut WebM ("File ended prematurely") and one whose
    second half is random bytes in an intact container ("[vp9 @ 0x...] Failed to read frame header.")."""
    data = open(good_webm, "rb").read()
    cut = os.path.join(d, "cut.webm")
    with open(cut, "wb") as f:
        f.write(data[: len(data) * 3 // 4])  # past the first frames: "truncated" (a half of a short clip has none)
    junk = os.path.join(d, "junk.webm")
    write_corrupt_payload(good_webm, junk)
    return {"truncated": cut, "corrupt stream": junk}


_LOAD_BAD_FILES = """
import sys
import av
if sys.argv[2] == "callback":  # FFmpeg's own callback: every message on stderr
    av.logging.restore_default_callback()
elif sys.argv[2] == "level":  # as torchvision's video I/O does on import: errors to Python's logging
    av.logging.set_level(av.logging.ERROR)
from videoprism.data.loader import build_loader
loader = build_loader(sys.argv[1], num_frames=8, resolution=32, batch_size=2, train=False, tokenizer=None,
                      backend="pyav", num_workers=2, max_bad_share=1.0)
print(sum(len(b["index"]) for b in loader))
for path, reason in loader.drain_rejects():  # this epoch's, as a trainer reports them
    print(f"skipped {path}: {reason}", file=sys.stderr)
"""


@pytest.mark.parametrize("turned_on", ["callback", "level", "env"])
def test_ffmpegs_messages_stay_off_stderr_and_the_env_var_brings_them_back(tmp_path, synth, turned_on):
    """Bad files through the loader's worker processes: stderr holds our one line per file (path and reason), not
    FFmpeg's own words for it, also where other code in the process turned them on (PyAV's callback restored to
    FFmpeg's, or PyAV's level set as torchvision does); VIDEOPRISM_DECODER_LOG=1 brings them back, reasons unchanged."""
    import subprocess
    import sys

    good = [os.path.join(synth, json.loads(line)["path"]) for line in open(os.path.join(synth, "train.jsonl"))][:3]
    bad = bad_vp9_files(str(tmp_path), good[0])
    m = tmp_path / "m.jsonl"
    m.write_text("".join(json.dumps({"path": p}) + "\n" for p in [*good, *bad.values()]))
    env = {k: v for k, v in os.environ.items() if k != "VIDEOPRISM_DECODER_LOG"}
    if turned_on == "env":
        env["VIDEOPRISM_DECODER_LOG"] = "1"
    r = subprocess.run([sys.executable, "-c", _LOAD_BAD_FILES, str(m), turned_on], capture_output=True, text=True,
                       env=env, timeout=HANG_S)
    assert r.returncode == 0 and r.stdout.split() == ["3"], r.stderr[-3000:]
    lines = r.stderr.splitlines()
    ours = [ln for ln in lines if ln.startswith("skipped ")]
    assert len(ours) == 2
    for word, path in bad.items():
        assert any(ln.startswith(f"skipped {path}: ") and word in ln for ln in ours), (word, ours)
    theirs = [ln for ln in lines if ln not in ours]
    if turned_on == "env":
        assert any(ln.startswith("[vp9 @ 0x") for ln in theirs) and any(
            ln.startswith("[matroska,webm @ 0x") for ln in theirs), theirs
    else:
        assert theirs == []


# ---- synthetic data --------------------------------------------------------------------------------------------------
def test_synth_is_deterministic_and_shows_its_caption(tmp_path, synth):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    for d in (a, b):
        generate(d, 4, seed=3, size=64, num_frames=12, workers=1)
    for rel in ["train.jsonl", "val.jsonl", "spm.model", "clips/000000.webm", "clips/000003.webm"]:
        assert open(os.path.join(a, rel), "rb").read() == open(os.path.join(synth, rel) if rel.startswith("clips")
                                                               else os.path.join(b, rel), "rb").read()
    # Motion oracle: the centroid of the main colour moves along the captioned direction.
    for rec in map(json.loads, open(os.path.join(synth, "train.jsonl"))):
        frames = decode_all(os.path.join(synth, rec["path"])).astype(np.float32)
        rgb = np.array(list(COLOURS.values())[rec["label"]["colour"]], np.float32)
        near = (np.abs(frames - rgb).max(-1) < 40).astype(np.float32)
        ys, xs = np.mgrid[0:64, 0:64]
        cy = [(n * ys).sum() / n.sum() for n in near[[0, -1]]]
        cx = [(n * xs).sum() / n.sum() for n in near[[0, -1]]]
        dx, dy = DIRECTIONS[list(DIRECTIONS)[rec["label"]["direction"]]]
        assert (cx[1] - cx[0]) * dx + (cy[1] - cy[0]) * dy > 15, rec
        assert SHAPES[rec["label"]["shape"]] in rec["caption"]


def _shape_seen(near: np.ndarray) -> str:
    """The shape a boolean mask [H, W] shows, from its bounding box, not from the generator: an upward triangle's
    top half holds a third of its bottom half's pixels (circle and square: as many); a square fills its box, a
    circle pi/4 of it. The thresholds are the midpoints of those ideal values."""
    ys, xs = np.nonzero(near)
    mid = (ys.min() + ys.max()) / 2
    if (ys < mid).sum() / (ys > mid).sum() < (1 / 3 + 1) / 2:
        return "triangle"
    fill = near.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
    return "square" if fill > (np.pi / 4 + 1) / 2 else "circle"


def test_synth_captions_name_the_colour_shape_and_motion_the_clip_shows(synth):
    """DESIGN 7: appearance (colour, shape) and motion (direction) are both captioned. Read from the caption's own
    words, checked against the decoded pixels: the named colour is on screen, the blob of that colour has the named
    shape, and it moves the named way; the labels are the ids of those words (the motion test above checks the
    pixels against the labels only, so captions naming another colour or direction than the labels' passed it)."""
    classes = {"colour": list(COLOURS), "shape": list(SHAPES), "direction": list(DIRECTIONS)}
    for rec in map(json.loads, open(os.path.join(synth, "train.jsonl"))):
        m = re.match(r"a (\w+) (\w+) (?:moves|slides|travels) (\w+)( while |$)", rec["caption"])
        assert m, rec["caption"]
        words = dict(zip(("colour", "shape", "direction"), m.groups()[:3]))
        assert rec["label"] == {k: classes[k].index(w) for k, w in words.items()}, rec
        frames = decode_all(os.path.join(synth, rec["path"])).astype(np.float32)
        near = np.abs(frames - np.array(COLOURS[words["colour"]], np.float32)).max(-1) < 40  # [T, H, W]
        assert all(n.sum() > 20 for n in near), rec
        shapes = [_shape_seen(n) for n in near]
        assert max(set(shapes), key=shapes.count) == words["shape"], (rec, shapes)
        ys, xs = np.mgrid[0:near.shape[1], 0:near.shape[2]]
        moved = np.array([[(n * xs).sum() / n.sum(), (n * ys).sum() / n.sum()] for n in near[[0, -1]]])
        step = moved[1] - moved[0]
        assert np.linalg.norm(step) > 15, rec
        assert max(DIRECTIONS, key=lambda d: step @ np.array(DIRECTIONS[d])) == words["direction"], (rec, step)


def test_synth_h264(tmp_path):
    generate(str(tmp_path), 2, seed=0, codec="h264", size=48, num_frames=8, workers=1)
    rec = json.loads(open(tmp_path / "train.jsonl").readline())
    assert rec["path"].endswith(".mp4") and read_clip(str(tmp_path / rec["path"]), 8, 48).shape == (8, 48, 48, 3)


def test_loader_flip_prob_mirrors_the_same_crops(synth):
    """flip_prob=1 gives exactly the mirror of the flip_prob=0 batch (same crops, same frames)."""
    plain = next(iter(_loader(synth)))["video"]
    flipped = next(iter(_loader(synth, flip_prob=1.0)))["video"]
    assert torch.equal(flipped, plain.flip(3))
    with pytest.raises(ValueError, match="flip_prob"):
        _loader(synth, flip_prob=1.5)


def test_bad_sample_budget_allows_exactly_the_configured_share():
    """29 of 100 bad is 29%, not past max_bad_share=0.29 (0.29 * 100 rounds to 28.999...)."""
    from videoprism.data.errors import BadSampleBudget, TooManyBadSamplesError

    b = BadSampleBudget(total=100, max_share=0.29)
    for i in range(29):
        b.skip(f"f{i}", "bad")
    with pytest.raises(TooManyBadSamplesError, match="30 of 100"):
        b.skip("f29", "bad")


def test_a_relative_path_with_a_colon_is_a_file_not_a_protocol(tmp_path, monkeypatch):
    """FFmpeg read "cam1:take2.mp4" as a URL of protocol "cam1" ("Protocol not found": the clip was rejected as not a
    video); a path is opened as the file it names."""
    monkeypatch.chdir(tmp_path)
    frames = write_clip(str(tmp_path / "cam1:take2.mp4"), 8, size=32)
    assert read_clip("cam1:take2.mp4", 8, 32).shape == frames.shape


_WORKERS_START_OUT_OF_FILES = """
import multiprocessing, os, resource, time
from videoprism.data.loader import _WatchedDataLoader, _init_worker
dl = _WatchedDataLoader(list(range(8)), batch_size=None, num_workers=2, worker_init_fn=_init_worker)
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
failed = []
for slack in range(40):  # the limit rises a file at a time: iter() fails before, between and after the forks
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + slack, hard))
    try:
        it = iter(dl)
    except OSError:
        failed.append(slack)
        time.sleep(0.2)  # a worker forked before the failure has started: it ignores SIGTERM now
        continue
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert sorted(it) == list(range(8))
    break
print(len(failed), slack, len(multiprocessing.active_children()))
"""


def test_workers_that_cannot_all_start_leave_none_behind():
    """`ulimit -n` too low for the second worker's queue (EMFILE after the first had forked): torch's clean-up of
    the half-built iterator failed (AttributeError '_workers_status'), the first worker, which ignores SIGTERM,
    outlived it, and the command printed `error: [Errno 24] Too many open files` and then hung at exit waiting for
    it (stage 1 under `ulimit -n 16`: 10 minutes until killed)."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _WORKERS_START_OUT_OF_FILES], capture_output=True, text=True,
                       timeout=HANG_S)
    failed, slack, alive = (int(x) for x in r.stdout.split())
    assert r.returncode == 0 and failed >= 2 and slack > 0 and alive == 0, (r.stdout, r.stderr[-3000:])
    assert "Exception ignored" not in r.stderr, r.stderr[-3000:]


_WORKERS_WITH_A_FULL_SHM = """
import os, sys
from videoprism.cli import run_command
from videoprism.data.loader import build_loader
loader = build_loader(os.path.join(sys.argv[1], "train.jsonl"), num_frames=8, resolution=36, batch_size=4,
                      train=True, tokenizer=os.path.join(sys.argv[1], "spm.model"), backend="pyav",
                      num_workers=int(sys.argv[2]))
raise SystemExit(run_command(lambda: print(sum(len(b["index"]) for b in loader))))
"""


@pytest.mark.skipif(not (shutil.which("unshare") and hasattr(os, "geteuid") and os.geteuid() == 0),
                    reason="needs root and unshare(1): a small /dev/shm in a mount namespace of its own")
def test_a_full_dev_shm_is_one_line_naming_the_fix_not_a_hang(synth):
    """Docker's /dev/shm is 64 MB. A worker's clip failed to go into a full one in the queue's feeder thread: a
    traceback per worker ("unable to allocate shared memory(shm) ... No space left on device"), the item lost and the
    loader waiting for it forever (tiny stage 1, data.workers=2, a 64 KiB /dev/shm: stopped by `timeout` after
    120 s). Here /dev/shm is 64 KiB in a mount namespace of the test's own."""
    import subprocess
    import sys

    def under_small_shm(workers: int):
        script = ('mount -t tmpfs -o size=64k tmpfs /dev/shm && exec "$0" -c "$1" "$2" "$3"')
        return subprocess.run(["unshare", "-m", "sh", "-c", script, sys.executable, _WORKERS_WITH_A_FULL_SHM, synth,
                               str(workers)], capture_output=True, text=True, timeout=HANG_S)

    r = under_small_shm(2)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-3000:]
    assert lines[0].startswith("error: [Errno 28] /dev/shm is full (") and "--shm-size" in lines[0], lines
    assert "data.workers=0" in lines[0]
    r = under_small_shm(0)  # the fix it names
    assert r.returncode == 0, r.stderr[-3000:]
    assert int(r.stdout.split()[-1]) == sum(len(b["index"]) for b in _loader(synth)) > 0, r.stdout
