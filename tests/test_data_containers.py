"""Frame sampling against a full decode (the oracle) on clips whose timestamps are awkward: an edit list that
discards leading frames, MPEG-TS (imprecise seeks), H.264 with B-frames in AVI (no presentation timestamps), WebM
with a start offset or with audio longer than the video, Matroska with a longer second video track or subtitle cue;
clips a player turns upright (a display-matrix rotation); a colour matrix FFmpeg cannot convert. Needs the ffmpeg
command line to make the clips."""
import shutil
import subprocess

import numpy as np
import pytest

av = pytest.importorskip("av", reason="PyAV decodes every clip here (the GPU machines lack it)")

from videoprism.data.decode import PyAVClip  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs the ffmpeg command line")
SRC = ["-f", "lavfi", "-i", "testsrc2=size=96x64:rate=25:duration=4"]


def ffmpeg(*args):
    subprocess.run(["ffmpeg", "-y", "-loglevel", "error", *args], check=True)


def full_decode(path):
    with av.open(path) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])])


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("containers")
    bf3 = str(d / "bf3.mp4")
    ffmpeg(*SRC, "-c:v", "libx264", "-g", "12", "-bf", "3", bf3)
    srt = d / "cue.srt"
    srt.write_text("1\n00:00:00,000 --> 00:00:09,000\na cue that outlasts the video\n")
    vp9 = ["-c:v", "libvpx-vp9", "-deadline", "realtime", "-g", "12"]
    out = {
        "editlist": ["-ss", "0.5", "-i", bf3, "-c", "copy"],
        "ts": [*SRC, "-c:v", "libx264", "-g", "12", "-bf", "3", "-f", "mpegts"],
        # One GOP (x264's default: 250 frames): a seek lands past the only keyframe, and the decoder outputs nothing.
        "ts_one_gop": [*SRC, "-c:v", "libx264", "-bf", "3", "-f", "mpegts"],
        # Cut mid-GOP, the packets before the first keyframe kept: the decoder shows none of them.
        "midgop_ts": ["-i", bf3, "-ss", "0.5", "-c", "copy", "-copyinkf", "-f", "mpegts"],
        "avi": [*SRC, "-c:v", "libx264", "-g", "12", "-bf", "3"],
        "offset_webm": [*SRC, "-c:v", "libvpx-vp9", "-deadline", "realtime", "-g", "12", "-output_ts_offset", "10"],
        "audio_longer_webm": [*SRC, "-f", "lavfi", "-i", "sine=duration=7", "-c:v", "libvpx-vp9", "-deadline",
                              "realtime", "-g", "12", "-c:a", "libopus"],
        # Matroska streams declare no duration: the file's spans a longer second video track or a subtitle cue.
        "two_videos_mkv": [*SRC, "-f", "lavfi", "-i", "testsrc=size=64x48:rate=25:duration=6", "-map", "0", "-map",
                           "1", *vp9],
        "subtitle_mkv": [*SRC, "-i", str(srt), *vp9, "-c:s", "srt"],
    }
    ext = {"editlist": "mp4", "ts": "ts", "ts_one_gop": "ts", "midgop_ts": "ts", "avi": "avi", "offset_webm": "webm",
           "audio_longer_webm": "webm", "two_videos_mkv": "mkv", "subtitle_mkv": "mkv"}
    paths = {}
    for name, args in out.items():
        paths[name] = str(d / f"{name}.{ext[name]}")
        ffmpeg(*args, paths[name])
    return paths


@pytest.mark.parametrize("name", ["editlist", "ts", "ts_one_gop", "midgop_ts", "avi", "offset_webm",
                                  "audio_longer_webm", "two_videos_mkv", "subtitle_mkv"])
def test_sampled_frames_are_those_of_a_full_decode(clips, name):
    oracle = full_decode(clips[name])
    with PyAVClip(clips[name]) as clip:
        assert clip.index.num_frames == len(oracle)
        for t in (8, len(oracle)):
            idx = clip.sample_indices(t)
            got = clip.decode(idx).numpy()
            np.testing.assert_array_equal(got, oracle[idx])
        clip.verify(full=True)


@pytest.mark.parametrize("name", ["ts", "ts_one_gop"])
def test_windows_anywhere_in_an_mpeg_ts_are_those_of_a_full_decode(clips, name):
    """A window's first seek may land past its keyframe (MPEG-TS seeks by decode time); the decoder then outputs
    nothing, which read as the end of the data ("truncated: decoded 0 of 8")."""
    oracle = full_decode(clips[name])
    for start in (0.0, 1.3, 2.5, 3.0):
        with PyAVClip(clips[name]) as clip:
            idx = clip.sample_indices(8, start, 4.0)
            np.testing.assert_array_equal(clip.decode(idx).numpy(), oracle[idx])


def test_shard_member_with_dotted_extension_is_a_video(tmp_path):
    import io
    import tarfile

    from videoprism.data.manifest import read_shards

    tar = tmp_path / "a.tar"
    with tarfile.open(tar, "w") as t:
        for name, data in (("clip.v1.mp4", b"\0" * 10), ("clip.v1.txt", b"a cat")):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            t.addfile(ti, io.BytesIO(data))
    samples, rejects = read_shards([str(tar)], max_bad_share=1.0)
    assert rejects == [] and [s.member for s in samples] == ["clip.v1.mp4"] and samples[0].caption == "a cat"
    # Sidecars of a sample ("clip.preview.mp4", "clip.meta.txt") never replace its plain fields, in either order.
    for order in (1, -1):
        members = [("b.preview.mp4", b"\1" * 4), ("b.mp4", b"\0" * 10), ("b.meta.txt", b"x"), ("b.txt", b"a dog")]
        with tarfile.open(tar, "w") as t:
            for name, data in members[::order]:
                ti = tarfile.TarInfo(name)
                ti.size = len(data)
                t.addfile(ti, io.BytesIO(data))
        samples, rejects = read_shards([str(tar)], max_bad_share=1.0)
        assert [(s.member, s.caption) for s in samples] == [("b.mp4", "a dog")] and rejects == []


def test_an_unseekable_stream_is_not_seeked_again(clips, monkeypatch):
    """After the timestamps failed to locate a frame once, later calls (verify after decode, other windows)
    count frames from the start without first decoding up to the failure again."""
    tried = []
    with PyAVClip(clips["ts"]) as clip:
        real = clip._frames_at
        monkeypatch.setattr(clip, "_frames_at", lambda idx: (tried.append(1), real(idx))[1])
        clip.decode(clip.sample_indices(8))
        clip.decode(clip.sample_indices(4, 1.0, 2.0))
        clip.verify()
    assert len(tried) == 1


@pytest.fixture(scope="module")
def turned(tmp_path_factory):
    """{degrees: an MP4 whose display matrix turns it `degrees` counterclockwise} (ffmpeg's `rotate` tag)."""
    d = tmp_path_factory.mktemp("turned")
    up = str(d / "up.mp4")
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=96x64:rate=8:duration=2", "-c:v", "libx264", "-g", "4", up)
    paths = {0: up}
    for degrees in (90, 180, 270):
        paths[degrees] = str(d / f"r{degrees}.mp4")
        ffmpeg("-i", up, "-c", "copy", "-metadata:s:v:0", f"rotate={degrees}", paths[degrees])
    return paths


@pytest.mark.parametrize("degrees", [0, 90, 180, 270])
def test_a_turned_clip_decodes_upright_as_the_ffmpeg_command_line_shows_it(turned, degrees):
    """The oracle: the ffmpeg command line's own decode, which turns a clip by its display matrix (a phone's
    portrait clip is stored landscape). The index reports the stored size and the rotation."""
    with PyAVClip(turned[degrees]) as clip:
        assert clip.rotation == degrees and (clip.index.height, clip.index.width) == (64, 96)
        got = clip.decode(list(range(clip.index.num_frames))).numpy()
    raw = subprocess.run(["ffmpeg", "-loglevel", "error", "-i", turned[degrees], "-f", "rawvideo", "-pix_fmt",
                          "rgb24", "-"], capture_output=True, check=True).stdout
    assert got.shape == ((16, 96, 64, 3) if degrees % 180 else (16, 64, 96, 3))
    np.testing.assert_array_equal(got, np.frombuffer(raw, np.uint8).reshape(got.shape))


def test_the_index_records_the_rotation(turned, tmp_path):
    import json

    from videoprism.cli import main

    m = tmp_path / "m.jsonl"
    m.write_text("".join(json.dumps({"path": turned[d], "caption": "a test card"}) + "\n" for d in sorted(turned)))
    assert main(["data", "index", str(m), "--out", str(tmp_path / "clean.jsonl"), "--workers", "1", "--quiet"]) == 0
    recs = [json.loads(line) for line in open(tmp_path / "clean.jsonl")]
    assert [(r["rotation"], r["width"], r["height"]) for r in recs] == [(d, 96, 64) for d in sorted(turned)]


def test_a_cut_mov_with_a_timecode_track_is_truncated(tmp_path):
    """A MOV timecode track holds one packet spanning the whole file: its end says nothing of where the data ends
    (counting it passed a file cut in half as whole)."""
    from videoprism.data.errors import BadVideoError

    whole, cut = str(tmp_path / "tc.mov"), str(tmp_path / "cut.mov")
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=96x64:rate=25:duration=8", "-c:v", "libx264", "-timecode",
           "00:00:00:00", "-movflags", "+faststart", whole)
    data = open(whole, "rb").read()
    open(cut, "wb").write(data[:len(data) // 2])
    with PyAVClip(whole) as clip:
        assert clip.index.num_frames == 200
    with pytest.raises(BadVideoError, match="truncated: frames end at"):
        PyAVClip(cut)


def test_a_colour_matrix_ffmpeg_cannot_convert_is_rejected_by_the_index(tmp_path):
    """A stream may declare a colour matrix that FFmpeg's converter has no RGB conversion for (YCgCo here; ICtCp and
    BT.2020 constant luminance too). `index` kept such a clip (it decodes, and the index converted none of its
    frames), then every read failed as "unreadable (Operation not supported)", and read_clip raised a bare OSError.
    The index now rejects it, naming the matrix, and a read gives the same reason; a BT.709 twin is kept."""
    import json

    from videoprism.cli import main
    from videoprism.data import BadVideoError, read_clip

    probe = av.VideoFrame(16, 16, "yuv420p")
    probe.colorspace = 8  # AVCOL_SPC_YCGCO
    try:
        probe.reformat(format="rgb24")
        pytest.skip("this FFmpeg converts YCgCo (FFmpeg < 8 took it for BT.601)")
    except av.error.FFmpegError:
        pass
    paths = {cs: str(tmp_path / f"{cs}.mp4") for cs in ("ycgco", "bt709")}
    for cs, path in paths.items():
        ffmpeg("-f", "lavfi", "-i", "testsrc2=size=64x48:rate=8:duration=1", "-c:v", "libx264", "-preset", "ultrafast",
               "-pix_fmt", "yuv420p", "-colorspace", cs, path)
    m = tmp_path / "m.jsonl"
    m.write_text("".join(json.dumps({"path": p}) + "\n" for p in paths.values()))
    assert main(["data", "index", str(m), "--out", str(tmp_path / "clean.jsonl"), "--workers", "1", "--quiet"]) == 0
    kept = [json.loads(line)["path"] for line in open(tmp_path / "clean.jsonl")]
    (reject,) = [json.loads(line) for line in open(tmp_path / "clean.rejects.jsonl")]
    assert kept == ["bt709.mp4"] and reject["path"] == paths["ycgco"]
    assert reject["reason"].startswith("unsupported colour matrix: its frames (yuv420p, YCgCo)"), reject
    with pytest.raises(BadVideoError) as e:
        read_clip(paths["ycgco"], 4, 32)
    assert e.value.reason == reject["reason"]
    assert read_clip(paths["bt709"], 4, 32).shape == (4, 32, 32, 3)
