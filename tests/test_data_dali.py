"""The DALI graph (run on the CPU here, on the GPU with the gpu marker) against the PyAV path."""
from __future__ import annotations

import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (pip install nvidia-dali-cuda130)")

from videoprism.data.dali_pipeline import DaliClips  # noqa: E402
from videoprism.data.decode import PyAVClip  # noqa: E402
from videoprism.data.loader import build_loader  # noqa: E402
from videoprism.data.synth import generate  # noqa: E402
from videoprism.data.transforms import Augment, apply_augment, uniform_indices  # noqa: E402

from .test_data import H264, VP9, bad_vp9_files, needs_media, psnr, write_vp9  # noqa: E402
from .test_data_images import assert_same_batches, make_images, write_manifest, write_shard  # noqa: E402


def dali_frames(path, indices, device="cpu", box=None, size=None, flip=False):
    with PyAVClip(path) as c:
        h, w = c.index.height, c.index.width
    dali = DaliClips(batch_size=2, num_frames=len(indices), resolution=size or h, device=torch.device(device))
    (video,), _ = dali.run([open(path, "rb").read()], [indices], [box or (0, 0, h, w)], [flip])
    return video.cpu()


def pyav_frames(path, indices):
    with PyAVClip(path) as c:
        return c.decode(indices)


@needs_media
def test_dali_cpu_decodes_the_frames_pyav_decodes():
    idx = uniform_indices(100, 8)
    d, p = dali_frames(VP9, idx), pyav_frames(VP9, idx)
    assert d.shape == (8, 512, 512, 3) and d.dtype == torch.uint8 and 0 <= d.min() and d.max() <= 255
    same = Augment()  # the same resize applied to both decoders' frames
    assert psnr(apply_augment(d, same, 288), apply_augment(p, same, 288)) >= 40
    # Uniform indices: each DALI frame is closest to the PyAV frame of the same index, not to a neighbour.
    near = sorted({j for i in idx for j in range(max(0, i - 2), min(100, i + 3))})
    everything = dict(zip(near, pyav_frames(VP9, near)))
    for k, i in enumerate(idx):
        scores = {j: psnr(d[k], everything[j]) for j in range(max(0, i - 2), min(100, i + 3))}
        assert max(scores, key=scores.get) == i, scores


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs the ffmpeg command line to cut the clip")
def test_dali_numbers_the_frames_of_an_edit_list_clip_as_the_index_does(tmp_path):
    """A stream-copied cut that starts past a keyframe (an MP4 edit list discarding the frame before
    it): DALI's frame n is the index's frame n (the discarded frame counts in neither), so the plans
    made from the index (and a clean manifest's probe) pick the same frames on DALI and PyAV."""
    src, cut = str(tmp_path / "vp9.mp4"), str(tmp_path / "cut.mp4")
    subprocess.run(["ffmpeg", "-y", "-loglevel", "error", "-f", "lavfi", "-i", "testsrc2=size=96x64:rate=25:duration=2",
                    "-c:v", "libvpx-vp9", "-deadline", "realtime", "-g", "12", src], check=True)
    subprocess.run(["ffmpeg", "-y", "-loglevel", "error", "-ss", "0.5", "-i", src, "-c", "copy", cut], check=True)
    with PyAVClip(cut) as c:
        n = c.index.num_frames
        assert len(c.index.keyframes) > 0 and c.index.keyframes[0] < c.index.pts[0]  # the discarded keyframe
    idx = [0, 1, 5, n - 1]
    d = dali_frames(cut, idx, box=(0, 16, 64, 64), size=64)  # a square crop at its own size: no resize
    p = pyav_frames(cut, idx)[:, :, 16:80]
    everything = pyav_frames(cut, list(range(n)))[:, :, 16:80]
    for k, i in enumerate(idx):
        scores = [psnr(d[k], everything[j]) for j in range(n)]
        assert int(np.argmax(scores)) == i, (i, int(np.argmax(scores)))
    assert psnr(d, p) >= 20  # same frames; the decoders convert saturated colour differently (~25 dB here)


@needs_media
def test_dali_graph_transform_matches_torch_transform():
    aug = Augment.draw(np.random.default_rng(1), flip_prob=0.5)  # this draw flips: the graph's flip is covered
    assert aug.flip
    idx = uniform_indices(100, 8)
    d = dali_frames(VP9, idx, box=aug.box(512, 512), size=96, flip=aug.flip)
    p = apply_augment(pyav_frames(VP9, idx), aug, 96)
    assert d.shape == p.shape == (8, 96, 96, 3)
    assert psnr(d, p) >= 35  # two resize implementations (DALI's and torch's antialiased bilinear)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("synth_dali"))
    generate(out, 20, seed=4, size=64, num_frames=12, workers=1)
    return out


def _loader(synth, manifest="train.jsonl", **kw):
    args = dict(num_frames=8, resolution=36, batch_size=4, train=True, seed=0,
                tokenizer=os.path.join(synth, "spm.model"), backend="dali")
    args.update(kw)
    return build_loader(os.path.join(synth, manifest), **args)


def test_dali_loader_matches_pyav_loader_and_is_deterministic(synth):
    a = list(_loader(synth))
    b = list(_loader(synth))
    p = list(_loader(synth, backend="pyav"))
    assert len(a) == len(p) == 4
    for x, y, z in zip(a, b, p):
        assert x["video"].shape == (4, 8, 36, 36, 3) and x["video"].dtype == torch.uint8
        assert torch.equal(x["video"], y["video"]) and torch.equal(x["index"], z["index"])
        assert psnr(x["video"], z["video"]) >= 35


def test_dali_takes_image_members_of_a_shard_as_it_takes_a_manifests_images(tmp_path):
    """Images are one-frame videos on the DALI path too, routed by codec whatever their source: JPEG (mjpeg, which
    DALI's decoders take) to DALI, PNG and WebP to PyAV, for a shard's members as for a manifest's files."""
    images = make_images(8)
    sources = {"manifest": write_manifest(str(tmp_path), images), "shard": [write_shard(tmp_path / "i.tar", images)]}
    batches, decoded = {}, {}
    for name, source in sources.items():
        loader = build_loader(source, num_frames=1, resolution=24, batch_size=4, train=True, seed=5, tokenizer=None,
                              backend="dali")
        batches[name] = list(loader)
        decoded[name] = loader._dali.shapes.ok
    assert_same_batches(batches["manifest"], batches["shard"])
    assert decoded["shard"] == decoded["manifest"] == {("mjpeg", 40, 56): 2, ("mjpeg", 36, 64): 2}  # the 4 JPEGs
    pyav = list(build_loader(sources["shard"], num_frames=1, resolution=24, batch_size=4, train=True, seed=5,
                             tokenizer=None, backend="pyav"))
    assert all(psnr(x["video"], y["video"]) >= 30 for x, y in zip(batches["shard"], pyav))


def test_dali_loader_shards_and_resumes(synth):
    sets = [set(torch.cat([b["index"] for b in _loader(synth, rank=r, world_size=2, batch_size=3)]).tolist())
            for r in range(2)]
    assert len(sets[0]) == len(sets[1]) == 9 and not sets[0] & sets[1]
    full = [b["video"] for b in _loader(synth, batch_size=3)]
    run = _loader(synth, batch_size=3)
    it = iter(run)
    first = [next(it)["video"] for _ in range(2)]
    resumed = _loader(synth, batch_size=3)
    resumed.load_state_dict(run.state_dict())
    rest = [b["video"] for b in resumed]
    assert len(first) + len(rest) == len(full) and all(torch.equal(x, y) for x, y in zip(first + rest, full))


def test_file_breaking_inside_dali_is_skipped_and_the_run_goes_on(tmp_path, synth):
    recs = [json.loads(line) for line in open(os.path.join(synth, "train.jsonl"))]
    for r in recs:
        r.update(path=os.path.join(synth, r["path"]), codec="vp9", frames=12, fps=8.0, width=64, height=64)
    # Indexed as good, then cut: only DALI sees it (the probe fields spare the demux pass).
    data = open(recs[3]["path"], "rb").read()
    cut = str(tmp_path / "cut.webm")
    with open(cut, "wb") as f:
        f.write(data[: len(data) // 2])
    recs[3]["path"] = cut
    m = tmp_path / "m.jsonl"
    m.write_text("".join(json.dumps(r) + "\n" for r in recs))
    loader = build_loader(str(m), num_frames=8, resolution=36, batch_size=4, train=False, seed=0,
                          tokenizer=os.path.join(synth, "spm.model"), backend="dali", max_bad_share=0.1)
    batches = []
    for b in loader:
        batches.append(b)
        rejects = loader.rejects
    assert sum(len(b["index"]) for b in batches) == len(recs) - 1
    assert [p for p, _ in rejects] == [cut] and rejects[0][1]


def test_dali_meets_a_bad_file_once_a_run_not_once_an_epoch(tmp_path, synth, capfd):
    """DALI has no switch for its messages about a bad file (its FFmpeg's "[vp9 @ 0x...] ...", at the level DALI sets
    for every decoder it opens; its own warnings, on std::cerr), which came every epoch: a file DALI failed on, or
    gave all-zero frames for, that PyAV then rejected goes straight to PyAV in later epochs, with the same reason."""
    recs = [json.loads(line) for line in open(os.path.join(synth, "train.jsonl"))]
    for r in recs:
        r.update(path=os.path.join(synth, r["path"]), codec="vp9", frames=12, fps=8.0, width=64, height=64)
    # Indexed as good, then broken: cut (DALI: zeros past the cut), junk frames (DALI fails), random bytes.
    bad = bad_vp9_files(str(tmp_path), recs[0]["path"])
    bad["not a video"] = str(tmp_path / "random.webm")
    (tmp_path / "random.webm").write_bytes(np.random.default_rng(0).integers(0, 256, 5000, np.uint8).tobytes())
    for k, path in enumerate(bad.values()):
        recs[3 * k + 1]["path"] = path
    m = tmp_path / "m.jsonl"
    m.write_text("".join(json.dumps(r) + "\n" for r in recs))
    loader = build_loader(str(m), num_frames=8, resolution=36, batch_size=4, train=False, tokenizer=None,
                          backend="dali", max_bad_share=0.5)
    capfd.readouterr()
    clips, rejects, stderr, rebuilds = [], [], [], []
    for _ in range(2):
        clips.append(sum(len(b["index"]) for b in loader))
        rejects.append(dict(loader.drain_rejects()))
        stderr.append(capfd.readouterr().err)
        rebuilds.append(loader._dali.rebuilds)
    assert clips == [len(recs) - 3] * 2 and rejects[0] == rejects[1] and set(rejects[0]) == set(bad.values())
    for word, path in bad.items():
        assert word in rejects[0][path], (word, rejects[0][path])
    assert stderr[0].strip()  # the first meeting: DALI's lines (no switch); so this test sees them where they are
    assert stderr[1] == "" and rebuilds[1] == rebuilds[0] > 0  # DALI did not meet them again
    shutil.copy(recs[0]["path"], bad["corrupt stream"])  # replaced by a good file: PyAV decodes it, DALI gets it back
    assert sum(len(b["index"]) for b in loader) == len(recs) - 2 and len(loader._dali.rejected) == 2


def _same_shape_manifest(tmp_path, synth):
    recs = [json.loads(line) for line in open(os.path.join(synth, "train.jsonl"))]
    for r in recs:
        r.update(path=os.path.join(synth, r["path"]), codec="vp9", frames=12, fps=8.0, width=64, height=64)
    m = tmp_path / "m.jsonl"
    m.write_text("".join(json.dumps(r) + "\n" for r in recs))
    kw = dict(num_frames=8, resolution=36, batch_size=4, train=False, seed=0,
              tokenizer=os.path.join(synth, "spm.model"))
    return recs, str(m), kw


@pytest.mark.parametrize("capability, av1", [((8, 0), False), ((8, 6), True), ((8, 9), True), ((9, 0), False),
                                              ((10, 0), True), ((12, 0), True)])
def test_av1_goes_to_dali_only_on_gpus_whose_nvdec_decodes_it(monkeypatch, capability, av1):
    """NVIDIA's NVDEC application note: AV1 Main on GA10x, Ada and Blackwell, not on GA100 (sm_80) or Hopper
    (sm_90). The other GPU codecs go to DALI on every GPU; on the CPU only VP8, VP9 and MJPEG."""
    from videoprism.data.dali_pipeline import dali_handles

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    gpu = torch.device("cuda", 0)
    assert dali_handles("av1", gpu) is av1
    assert all(dali_handles(c, gpu) for c in ("h264", "hevc", "vp9", "vp8", "mjpeg", "mpeg4"))
    cpu = torch.device("cpu")
    assert [c for c in ("av1", "h264", "hevc", "vp9", "vp8", "mjpeg") if dali_handles(c, cpu)] == ["vp9", "vp8",
                                                                                                  "mjpeg"]


def test_good_files_dali_cannot_decode_go_to_pyav_and_their_shape_is_left_to_it(monkeypatch, tmp_path, synth,
                                                                                  capsys):
    """NVDEC refuses some valid files (AV1 on Hopper, sizes under its minimum, profiles): stand-in, a DALI that
    fails every run. Every clip still arrives, decoded by PyAV exactly as the PyAV loader does; once DALI failed
    on DECLINE_AFTER good files of one (codec, size) in two batches and decoded none, it is no longer asked."""
    from videoprism.data import dali_pipeline

    recs, m, kw = _same_shape_manifest(tmp_path, synth)
    calls = []

    def refuse(self, encoded, *rest):
        calls.append(len(encoded))
        raise RuntimeError("Error in MIXED operator `decoders__Video` encountered:\nCodec configuration not "
                           "supported on this GPU\nmore")

    monkeypatch.setattr(DaliClips, "run", refuse)
    dali = build_loader(m, backend="dali", **kw)
    got = list(dali)
    want = list(build_loader(m, backend="pyav", **kw))
    assert not dali.rejects and len(got) == len(want) > 3 and sum(len(b["index"]) for b in got) == len(recs)
    assert all(torch.equal(a["video"], b["video"]) and a["path"] == b["path"] for a, b in zip(got, want))
    # Two batches: each once together, then one by one; none after them.
    assert dali_pipeline.DECLINE_AFTER <= 8 and calls == [4, 1, 1, 1, 1] * 2
    assert dali._dali.shapes.declined == {("vp9", 64, 64): "Codec configuration not supported on this GPU"}
    assert "DALI cannot decode vp9 64x64 clips" in capsys.readouterr().err


def test_a_declined_shape_is_tried_again_and_given_back(monkeypatch, tmp_path, synth, capsys):
    """A shape declined after failures that passed (a GPU out of memory for a while) goes back to DALI once one
    of the clips still sent to it (one in PROBE_EVERY) decodes."""
    from videoprism.data import dali_pipeline

    recs, m, kw = _same_shape_manifest(tmp_path, synth)
    monkeypatch.setattr(dali_pipeline, "PROBE_EVERY", 2)
    real, calls = DaliClips.run, []

    def flaky(self, encoded, *rest):
        calls.append(len(encoded))
        if len(calls) <= 10:  # the first two batches (4 + 1 + 1 + 1 + 1 calls each)
            raise RuntimeError("out of memory")
        return real(self, encoded, *rest)

    monkeypatch.setattr(DaliClips, "run", flaky)
    dali = build_loader(m, backend="dali", **kw)
    got = list(dali)
    assert not dali.rejects and sum(len(b["index"]) for b in got) == len(recs)
    shapes = dali._dali.shapes
    assert shapes.declined == {} and shapes.ok[("vp9", 64, 64)] >= 1
    # Batch 3: its 2nd and 4th clips probe DALI, each on its own (the batch was sorted while the shape was still
    # declined), and DALI decodes them: the shape is back, batch 4 is DALI's whole.
    assert calls[10:13] == [1, 1, 4]
    assert "it gets them again" in capsys.readouterr().err


@pytest.mark.parametrize("odd_rows, declined", [((0, 1, 2, 5, 6, 9, 13), False), ("all but the first", True)])
def test_a_shape_dali_mostly_decodes_is_not_left_to_pyav(monkeypatch, tmp_path, synth, odd_rows, declined):
    """Files DALI fails on among files of the same shape it mostly decodes are the files' fault (or their profile's),
    not DALI's limit: they go to PyAV one by one and the shape stays DALI's. A shape it fails on for
    FAILURES_PER_SUCCESS files per success is left to PyAV all the same."""
    recs, m, kw = _same_shape_manifest(tmp_path, synth)
    rows = range(1, len(recs)) if odd_rows == "all but the first" else odd_rows
    real, odd = DaliClips.run, {open(recs[i]["path"], "rb").read() for i in rows}

    def picky(self, encoded, *rest):
        if any(e in odd for e in encoded):
            raise RuntimeError("odd file")
        return real(self, encoded, *rest)

    monkeypatch.setattr(DaliClips, "run", picky)
    dali = build_loader(m, backend="dali", **kw)
    got = list(dali)
    shapes = dali._dali.shapes
    assert not dali.rejects and sum(len(b["index"]) for b in got) == len(recs)
    assert (("vp9", 64, 64) in shapes.declined) == declined
    if not declined:
        assert (shapes.ok[("vp9", 64, 64)], shapes.failed[("vp9", 64, 64)]) == (len(recs) - len(odd), len(odd))


def test_clip_with_black_frames_is_kept(tmp_path, synth):
    """All-zero frames from DALI are a cut or black content: a clip that opens black is decoded
    (by PyAV, as the DALI-less loader would), not rejected."""
    path = str(tmp_path / "fade.webm")
    frames = np.zeros((12, 64, 64, 3), np.uint8)
    frames[6:] = np.random.default_rng(0).integers(0, 256, (6, 1, 1, 3), dtype=np.uint8)
    write_vp9(path, frames, 8)
    m = tmp_path / "m.jsonl"
    m.write_text(json.dumps({"path": path, "caption": "fade in", "codec": "vp9", "frames": 12, "fps": 8.0,
                             "width": 64, "height": 64}) + "\n")
    kw = dict(num_frames=8, resolution=36, batch_size=1, train=False, tokenizer=os.path.join(synth, "spm.model"))
    dali = build_loader(str(m), backend="dali", **kw)
    got = list(dali)
    assert not dali.rejects and len(got) == 1
    (want,) = list(build_loader(str(m), backend="pyav", **kw))
    assert torch.equal(got[0]["video"], want["video"])


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs the ffmpeg command line to turn the clips")
def test_turned_clips_come_out_of_dali_upright_as_out_of_pyav(tmp_path):
    """DALI decodes the stored frames of a clip whose display matrix turns it (a portrait phone clip): the loader
    crops the upright box's pixels and turns (then flips) them, so DALI's clips are PyAV's (upright, checked against
    the ffmpeg command line in test_data_containers), for random crops with and without flips, from the raw
    manifest (rotation read off the first frame) and from the clean one (its `rotation` field)."""
    from videoprism.cli import main

    up = str(tmp_path / "up.mp4")
    subprocess.run(["ffmpeg", "-y", "-loglevel", "error", "-f", "lavfi", "-i", "testsrc=size=96x64:rate=8:duration=2",
                    "-c:v", "libvpx-vp9", "-deadline", "realtime", "-g", "4", up], check=True)
    recs = [{"path": up}]
    for degrees in (90, 180, 270):
        recs.append({"path": str(tmp_path / f"r{degrees}.mp4")})
        subprocess.run(["ffmpeg", "-y", "-loglevel", "error", "-i", up, "-c", "copy", "-metadata:s:v:0",
                        f"rotate={degrees}", recs[-1]["path"]], check=True)
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs * 2))
    assert main(["data", "index", str(tmp_path / "m.jsonl"), "--out", str(tmp_path / "clean.jsonl"), "--workers", "1",
                 "--quiet"]) == 0
    for manifest in ("m.jsonl", "clean.jsonl"):
        for train, flip_prob in ((True, 0.0), (True, 1.0), (False, 0.0)):
            kw = dict(num_frames=8, resolution=40, batch_size=8, train=train, tokenizer=None, flip_prob=flip_prob)
            (dali,) = list(build_loader(str(tmp_path / manifest), backend="dali", **kw))
            (pyav,) = list(build_loader(str(tmp_path / manifest), backend="pyav", **kw))
            for a, b in zip(dali["video"], pyav["video"]):
                assert psnr(a, b) >= 35, (manifest, train, flip_prob)  # ~40-58 dB; turned or flipped wrong: < 10


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs the ffmpeg command line to encode with BT.709")
def test_bt709_clips_come_out_of_dali_in_the_colours_pyav_gives(tmp_path):
    """DALI's decoders convert YUV to RGB with BT.601 whatever the stream declares; PyAV (as the ffmpeg command line
    and players) with the declared matrix, BT.709 for most HD video. Two flat bars, of colours inside the RGB cube
    under both matrices, came out of DALI 10-24 levels off PyAV's; the graph now maps its RGB to the declared
    matrix's, from the raw manifest (the matrix read off the first frame) and from the clean one (`matrix`)."""
    from videoprism.cli import main

    path = str(tmp_path / "bars.webm")
    bars = ("color=c=0xC83C64:s=32x32:r=8:d=1[a];color=c=0x28C878:s=32x32:r=8:d=1[b];"
            "[a][b]hstack,scale=out_color_matrix=bt709:out_range=tv,format=yuv420p")
    subprocess.run(["ffmpeg", "-y", "-loglevel", "error", "-filter_complex", bars, "-c:v", "libvpx-vp9", "-deadline",
                    "realtime", "-colorspace", "bt709", path], check=True)
    (tmp_path / "m.jsonl").write_text(json.dumps({"path": path}) + "\n")
    assert main(["data", "index", str(tmp_path / "m.jsonl"), "--out", str(tmp_path / "clean.jsonl"), "--workers", "1",
                 "--quiet"]) == 0
    assert json.loads(open(tmp_path / "clean.jsonl").readline())["matrix"] == "bt709"
    kw = dict(num_frames=4, resolution=32, batch_size=1, train=False, tokenizer=None)
    for manifest in ("m.jsonl", "clean.jsonl"):
        (dali,) = list(build_loader(str(tmp_path / manifest), backend="dali", **kw))
        (pyav,) = list(build_loader(str(tmp_path / manifest), backend="pyav", **kw))
        for x0 in (2, 18):  # inside each bar of the centre crop (columns 16-47 of 64: 16 of each colour)
            d, p = (b["video"][0, :, 4:28, x0:x0 + 12].double().mean((0, 1, 2)) for b in (dali, pyav))
            assert (d - p).abs().max() <= 2, (manifest, d, p)


def test_a_clip_planned_by_timestamps_without_pyav_is_skipped_with_the_reason(monkeypatch, synth):
    """A clean manifest's variable-frame-rate clip is planned from PyAV's timestamps; where PyAV is missing (the lent
    GPU machines) the clip is skipped with why, not an ImportError out of the loader."""
    import sys

    from videoprism.data.manifest import read_manifest

    samples, _ = read_manifest(os.path.join(synth, "train.jsonl"))
    s = samples[0]
    vfr = type(s)(**{**s.__dict__, "probe": {"codec": "vp9", "frames": 8, "fps": 8.0, "width": 36, "height": 36,
                                              "cfr": False}})

    class NoPyAV(dict):
        def __getitem__(self, pos):
            raise ImportError("No module named 'av'")

    monkeypatch.setitem(sys.modules, "videoprism.data.decode", None)  # `from .decode import ...` fails
    dali = DaliClips(batch_size=1, num_frames=4, resolution=36, device=torch.device("cpu"))
    (item,) = list(dali.decode_items([(0, 7, vfr, Augment())], NoPyAV()))
    assert item.bad.startswith("its frames are placed by PyAV's timestamps") and "PyAV is not installed" in item.bad


@needs_media
def test_h264_on_the_cpu_falls_back_to_pyav(tmp_path):
    m = tmp_path / "m.jsonl"
    m.write_text(json.dumps({"path": H264, "caption": "drumming"}) + "\n")
    kw = dict(num_frames=8, resolution=72, batch_size=1, train=False, tokenizer=os.path.join(
        os.path.dirname(H264), "test_spm.model"))
    (a,), (b,) = list(build_loader(str(m), backend="dali", **kw)), list(build_loader(str(m), backend="pyav", **kw))
    assert torch.equal(a["video"], b["video"])


@pytest.mark.gpu
@needs_media
@pytest.mark.parametrize("path", [H264, VP9])
def test_dali_gpu_decodes_the_frames_pyav_decodes(path):
    idx = uniform_indices(100, 16)
    d = dali_frames(path, idx, device="cuda")
    same = Augment()
    assert psnr(apply_augment(d, same, 288), apply_augment(pyav_frames(path, idx), same, 288)) >= 40


def test_a_clean_manifests_variable_rate_clip_is_planned_without_decoding_a_frame(monkeypatch, synth):
    """A clean manifest's variable-frame-rate clip is planned from a demux pass; its rotation and colour matrix are
    the manifest's, so no frame is decoded for them (each epoch, per clip: the matrix read as a default was)."""
    from videoprism.data.dali_pipeline import clip_plan
    from videoprism.data.manifest import read_manifest

    samples, _ = read_manifest(os.path.join(synth, "train.jsonl"))
    s = samples[0]
    probe = {"codec": "vp9", "frames": 8, "fps": 8.0, "width": 36, "height": 36, "cfr": False, "rotation": 0,
             "matrix": "bt709"}
    vfr = type(s)(**{**s.__dict__, "probe": probe})

    def no_decode(*a, **k):
        raise AssertionError("a frame was decoded")

    monkeypatch.setattr(PyAVClip, "_frames", no_decode)
    assert clip_plan(vfr, 4)[4:] == (0, "bt709")
