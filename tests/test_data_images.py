"""Images as one-frame videos (DESIGN 5): image members of WebDataset shards (key.jpg + key.txt [+ key.json], the
format public image-text data ships in) against the oracle of the same images listed in a JSONL manifest."""
from __future__ import annotations

import io
import json
import os
import struct
import tarfile

import numpy as np
import pytest
import torch

av = pytest.importorskip("av", reason="PyAV decodes every image here (the GPU machines lack it)")

from videoprism.cli import main  # noqa: E402
from videoprism.data.decode import PyAVClip  # noqa: E402
from videoprism.data.loader import build_loader  # noqa: E402
from videoprism.data.manifest import PROBE_FIELDS, read_manifest, read_shards  # noqa: E402

# Encoder and pixel format per extension (a WebDataset member's kind is its extension, as a manifest file's is).
ENCODERS = {".jpg": ("mjpeg", "yuvj420p"), ".png": ("png", "rgb24"), ".webp": ("libwebp", "yuv420p"),
            ".jpeg": ("mjpeg", "yuvj444p")}
SIZES = ((40, 56), (48, 48), (56, 40), (36, 64))  # (height, width): landscape, square and portrait crops


def encode_image(pixels: np.ndarray, ext: str) -> bytes:
    """One image file's bytes, encoded by FFmpeg as `ext` says."""
    codec, pix_fmt = ENCODERS[ext]
    buf = io.BytesIO()
    with av.open(buf, "w", format="image2pipe") as out:
        stream = out.add_stream(codec)
        stream.height, stream.width = pixels.shape[:2]
        stream.pix_fmt = pix_fmt
        frame = av.VideoFrame.from_ndarray(pixels, format="rgb24").reformat(format=pix_fmt)
        for packet in (*stream.encode(frame), *stream.encode()):
            out.mux(packet)
    return buf.getvalue()


def make_images(n: int, seed: int = 0) -> list[dict]:
    """`n` small images, the formats and sizes in turn: [{"name", "data", "caption", "label"}]."""
    rng = np.random.default_rng(seed)
    images = []
    for i in range(n):
        ext, (h, w) = list(ENCODERS)[i % len(ENCODERS)], SIZES[i % len(SIZES)]
        yy, xx = np.mgrid[0:h, 0:w]
        pixels = np.stack([xx * 255 // w, yy * 255 // h, np.full_like(xx, 40 * i % 256)], -1)
        pixels = (pixels + rng.integers(-25, 25, pixels.shape)).clip(0, 255).astype(np.uint8)
        images.append({"name": f"{i:04d}{ext}", "data": encode_image(pixels, ext), "label": i % 3,
                       "caption": f"image {i} of a gradient"})
    return images


def write_manifest(folder, images: list[dict]) -> str:
    """The images as files beside a JSONL manifest listing them (the oracle)."""
    path = os.path.join(folder, "images.jsonl")
    with open(path, "w") as f:
        for im in images:
            with open(os.path.join(folder, im["name"]), "wb") as g:
                g.write(im["data"])
            f.write(json.dumps({"path": im["name"], "caption": im["caption"], "label": im["label"]}) + "\n")
    return path


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shard(path, images: list[dict]) -> str:
    """A WebDataset tar of the images: KEY.<ext>, KEY.txt (the caption), KEY.json (the label)."""
    with tarfile.open(path, "w") as tar:
        for im in images:
            key = im["name"].split(".")[0]
            add_member(tar, im["name"], im["data"])
            add_member(tar, f"{key}.txt", im["caption"].encode())
            add_member(tar, f"{key}.json", json.dumps({"label": im["label"]}).encode())
    return str(path)


@pytest.fixture
def both(tmp_path):
    """(manifest, shard) of the same 8 images."""
    images = make_images(8)
    return write_manifest(str(tmp_path), images), write_shard(tmp_path / "images-000.tar", images)


def epochs(source, **kw) -> list[dict]:
    args = dict(num_frames=1, resolution=24, batch_size=4, seed=5, tokenizer=None, backend="pyav")
    return list(build_loader(source, **{**args, **kw}))


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert torch.equal(x["video"], y["video"]) and torch.equal(x["label"], y["label"])
        assert x["caption"] == y["caption"] and torch.equal(x["index"], y["index"])


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_image_members_of_a_shard_load_as_the_manifest_lists_them(both, train):
    """A shard of key.jpg/.png/.webp/.jpeg + key.txt was rejected key by key ("no video member"): each image is
    now a one-frame video, and the loader gives the tensors of the same images listed in a manifest (training
    crops and the evaluation transform)."""
    manifest, shard = both
    samples, rejects = read_shards([shard])
    assert not rejects and [s.member for s in samples] == [os.path.basename(s.path) for s in read_manifest(manifest)[0]]
    a, b = epochs(manifest, train=train), epochs([shard], train=train)
    assert_same_batches(a, b)
    assert b[0]["video"].shape == (4, 1, 24, 24, 3) and b[0]["video"].float().std() > 10  # real pixels
    assert b[0]["path"][0].startswith(f"{shard}:")  # messages name the member


def test_data_index_probes_image_members_as_manifest_images(both, tmp_path, capsys):
    """`data index` (and its alias `validate`) over image shards writes the probe fields a manifest image gets, and
    the clean manifest of byte ranges loads the same tensors."""
    manifest, shard = both
    clean = {}
    for cmd, name, source in (("index", "shard", shard), ("validate", "manifest", manifest)):
        clean[name] = str(tmp_path / "clean" / f"{name}.jsonl")
        assert main(["data", cmd, source, "--out", clean[name], "--workers", "1", "--quiet"]) == 0
        assert "8 of 8 samples kept" in capsys.readouterr().out
    lines = {k: [json.loads(line) for line in open(p)] for k, p in clean.items()}
    probes = {k: [{f: r[f] for f in PROBE_FIELDS} for r in recs] for k, recs in lines.items()}
    assert probes["shard"] == probes["manifest"]
    assert [p["codec"] for p in probes["shard"][:4]] == ["mjpeg", "png", "webp", "mjpeg"]
    assert {(p["frames"], p["rotation"]) for p in probes["shard"]} == {(1, 0)}
    assert {r["path"] for r in lines["shard"]} == {"../images-000.tar"}  # byte ranges of the shard, named
    assert [r["member"] for r in lines["shard"]] == [os.path.basename(r["path"]) for r in lines["manifest"]]
    assert_same_batches(epochs(clean["manifest"], train=True), epochs(clean["shard"], train=True))


def test_a_key_with_a_video_and_an_image_is_its_video(tmp_path):
    """The rule for a key with both: its video is the sample, the image (a thumbnail, as video datasets ship one
    per clip) ignored, also two of them. Two images and no video are as ambiguous as two videos; a plain image
    member wins over a compound one, as for videos."""
    images = make_images(3)
    clip = tmp_path / "clip.webm"
    from videoprism.data.synth import encode

    encode(np.zeros((4, 16, 16, 3), np.uint8), str(clip), "vp9", 8)
    shard = str(tmp_path / "s.tar")
    with tarfile.open(shard, "w") as tar:
        add_member(tar, "v.jpg", images[0]["data"])  # the thumbnail first: the order in the tar does not matter
        tar.add(clip, arcname="v.webm")
        add_member(tar, "v.png", images[1]["data"])
        add_member(tar, "two.jpg", images[0]["data"])
        add_member(tar, "two.png", images[1]["data"])
        add_member(tar, "p.small.jpg", images[0]["data"])
        add_member(tar, "p.jpg", images[2]["data"])
        for key in ("v", "two", "p"):
            add_member(tar, f"{key}.txt", key.encode())
    samples, rejects = read_shards([shard], max_bad_share=1.0)
    assert {s.caption: s.member for s in samples} == {"v": "v.webm", "p": "p.jpg"}
    assert rejects == [(f"{shard}:two", "two.jpg and two.png are both its image member; give each key one (a "
                                        "compound field such as KEY.preview.mp4 yields to the plain KEY.mp4)")]
    batch = next(iter(build_loader([shard], num_frames=4, resolution=16, batch_size=1, train=False, tokenizer=None,
                                   backend="pyav", max_bad_share=1.0)))
    assert batch["caption"] == ["v"] and batch["video"].shape == (1, 4, 16, 16, 3)  # the clip's 4 frames


def bad_images(good_jpg: bytes, good_png: bytes) -> list[tuple[str, str, bytes, tuple[str, ...]]]:
    """(what, extension, the bytes, the reasons the loader may give) of bad image files. A non-image is "not a video
    or an image" as a member (FFmpeg finds no format in bytes) and may fail at its decode as a file (FFmpeg's image2
    reader goes by the extension)."""
    return [("empty", ".jpg", b"", ("empty file (0 bytes)",)),
            ("cut JPEG", ".jpg", good_jpg[: len(good_jpg) // 2], ("truncated or corrupt image",)),
            ("cut PNG", ".png", good_png[: len(good_png) * 3 // 4], ("truncated or corrupt image",)),
            ("not an image", ".jpg", b"a caption where the photo should be\n" * 8,
             ("not a video or an image", "truncated or corrupt image"))]


def test_bad_image_members_are_rejected_with_their_reason_as_manifest_images_are(tmp_path):
    """Empty, cut (a JPEG cut in half decoded without an error, the rows past the cut flat green) and non-image
    members, and the same files listed in a manifest: skipped with their reason by the loader and by `data index`."""
    images, bad = make_images(6), bad_images(*(im["data"] for im in make_images(2)))
    for i, (what, ext, data, _) in enumerate(bad):
        images[i] = dict(images[i], name=f"{i:04d}{ext}", data=data, caption=what)
    manifest, shard = write_manifest(str(tmp_path), images), write_shard(tmp_path / "bad.tar", images)
    for source in (manifest, [shard]):
        loader = build_loader(source, num_frames=1, resolution=16, batch_size=1, train=False, tokenizer=None,
                              backend="pyav", max_bad_share=1.0)
        assert [c for b in loader for c in b["caption"]] == [im["caption"] for im in images[len(bad):]]
        rejects = loader.drain_rejects()
        names = [os.path.basename(name).split(":")[-1] for name, _ in rejects]  # a file, or a member of the tar
        assert names == [im["name"] for im in images[:len(bad)]]
        assert all(reason.startswith(why) for (_, reason), (*_, why) in zip(rejects, bad)), rejects
    out = str(tmp_path / "clean.jsonl")
    assert main(["data", "index", shard, "--out", out, "--workers", "1", "--quiet"]) == 0
    report = [json.loads(line) for line in open(str(tmp_path / "clean.rejects.jsonl"))]
    assert [r["path"] for r in report] == [f"{shard}:{im['name']}" for im in images[:len(bad)]]
    assert all(r["reason"].startswith(why) for r, (*_, why) in zip(report, bad)), report


def with_exif(jpeg: bytes) -> bytes:
    """`jpeg` with an (empty) Exif segment after its start marker, as a camera writes one: FFmpeg's probe of bytes
    then takes two JPEGs one after the other for an image (jpeg_pipe), without it for a motion-JPEG stream (mjpeg)."""
    segment = b"Exif\x00\x00" + b"MM\x00\x2a\x00\x00\x00\x08" + b"\x00\x00" + b"\x00\x00\x00\x00"  # TIFF: no tags
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(segment) + 2) + segment + jpeg[2:]


def test_a_jpeg_with_a_second_picture_after_it_is_its_first_picture(tmp_path, capsys):
    """An Ultra HDR photo (a smaller JPEG, its gain map, appended, as Android phones write) and an MPO (a stereo
    camera's second view appended) are two JPEGs one after the other: FFmpeg's readers of bytes (a shard's member;
    jpeg_pipe with a camera's Exif segment, the motion-JPEG reader without) took them for 2 frames, so a shard's photo
    was indexed as frames=2 and rejected as "frames of 2 sizes (56x40, 16x12)" at 2 sampled frames. Each is the
    image a viewer shows, its first picture: from a shard and from a manifest, the loader gives the tensors of that
    picture alone, and `data index` writes frames=1 and its size. A photo cut inside its first picture is still
    rejected."""
    rng = np.random.default_rng(1)
    photo = encode_image(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8), ".jpg")
    gain_map = encode_image(np.full((12, 16, 3), 90, np.uint8), ".jpg")
    view = encode_image(np.full((40, 56, 3), 200, np.uint8), ".jpg")
    files = {"0000.jpg": photo, "0001.jpg": photo + gain_map, "0002.jpg": with_exif(photo) + gain_map,
             "0003.jpeg": photo + view, "0004.jpg": with_exif(photo) + view,
             "0005.jpg": photo[:len(photo) // 2] + gain_map}
    images = [{"name": name, "data": data, "caption": name, "label": 0} for name, data in files.items()]
    manifest, shard = write_manifest(str(tmp_path), images), write_shard(tmp_path / "photos.tar", images)
    for source in (manifest, [shard]):
        loader = build_loader(source, num_frames=1, resolution=24, batch_size=1, train=False, tokenizer=None,
                              backend="pyav", max_bad_share=1.0)
        videos = {b["caption"][0]: b["video"] for b in loader}
        assert sorted(videos) == list(files)[:5]
        assert all(torch.equal(v, videos["0000.jpg"]) for v in videos.values())
        (name, reason), = loader.drain_rejects()
        assert name.endswith("0005.jpg") and reason.startswith("truncated or corrupt image"), reason
    for source in (manifest, shard):
        out = str(tmp_path / "clean" / f"{os.path.basename(source)}.jsonl")
        assert main(["data", "index", source, "--out", out, "--workers", "1", "--quiet"]) == 0
        assert "5 of 6 samples kept" in capsys.readouterr().out
        assert {(r["frames"], r["width"], r["height"]) for r in map(json.loads, open(out))} == {(1, 56, 40)}


def test_a_raw_mjpeg_file_is_a_clip_of_all_its_frames(tmp_path, capsys):
    """A .mjpeg file (a motion-JPEG stream: JPEGs one after the other, as a JPEG with a second picture is laid out)
    is not named as an image: FFmpeg's motion-JPEG reader gives all its frames, which load and index as a clip's,
    while the same bytes named .jpg are an image, its first frame."""
    stream = b"".join(encode_image(np.full((16, 24, 3), 40 * i, np.uint8), ".jpg") for i in range(6))
    for name in ("clip.mjpeg", "clip.jpg"):
        (tmp_path / name).write_bytes(stream)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"path": name, "caption": name}) + "\n" for name in ("clip.mjpeg",
                                                                                                "clip.jpg")))
    videos = {}
    for frames in (6, 1):
        loader = build_loader(str(manifest), num_frames=frames, resolution=16, batch_size=1, train=False,
                              tokenizer=None, backend="pyav", max_bad_share=1.0)
        videos[frames] = {b["caption"][0]: b["video"][0] for b in loader}
    levels = videos[6]["clip.mjpeg"].float().mean((1, 2, 3))
    assert list(videos[6]) == ["clip.mjpeg"] and torch.allclose(levels, 40 * torch.arange(6.0), atol=3), levels
    assert torch.equal(videos[1]["clip.jpg"], videos[6]["clip.mjpeg"][:1])
    out = str(tmp_path / "clean.jsonl")
    assert main(["data", "index", str(manifest), "--out", out, "--workers", "1", "--quiet"]) == 0
    assert [(r["path"], r["frames"]) for r in map(json.loads, open(out))] == [("clip.mjpeg", 6), ("clip.jpg", 1)]


def test_frames_of_two_sizes_are_a_bad_sample_not_a_crash(tmp_path):
    """A stream that changes size (two MPEG-TS files of two sizes joined), sampled at two frames, stopped the loader
    with "ValueError: all input arrays must have the same shape": a bad sample naming the sizes."""
    joined = b""
    for size in (32, 16):  # two MPEG-TS files: a stream whose frames change size
        buf = io.BytesIO()
        with av.open(buf, "w", format="mpegts") as out:
            stream = out.add_stream("mpeg2video", rate=8)
            stream.width = stream.height = size
            stream.pix_fmt = "yuv420p"
            for i in range(8):
                frame = av.VideoFrame.from_ndarray(np.full((size, size, 3), 30 * i, np.uint8), format="rgb24")
                out.mux(stream.encode(frame))
            out.mux(stream.encode())
        joined += buf.getvalue()
    (tmp_path / "joined.ts").write_bytes(joined)
    (tmp_path / "m.jsonl").write_text(json.dumps({"path": "joined.ts", "caption": "a clip"}) + "\n")
    loader = build_loader(str(tmp_path / "m.jsonl"), num_frames=2, resolution=16, batch_size=1, train=False,
                          tokenizer=None, backend="pyav", max_bad_share=1.0)
    assert list(loader) == []
    (_, reason), = loader.drain_rejects()
    assert reason == "frames of 2 sizes (32x32, 16x16): re-encode it at one size", reason


def animated_webp(frames: int = 3) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="webp") as out:
        stream = out.add_stream("libwebp_anim", rate=4)
        stream.width = stream.height = 16
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            out.mux(stream.encode(av.VideoFrame.from_ndarray(np.full((16, 16, 3), 60 * i, np.uint8), format="rgb24")))
        out.mux(stream.encode())
    return buf.getvalue()


def test_an_animated_webp_is_a_clip_or_rejected_as_one_not_as_a_corrupt_image(tmp_path):
    """FFmpeg up to 8 decodes still WebP only ("skipping unsupported chunk: ANIM"): a whole animated WebP, which
    browsers play, was rejected as "truncated or corrupt image" (a "corrupt stream" before), a reason that sent the
    user looking for damage. It is named for what it is, with the fix, as a file and as a shard member. An FFmpeg
    with the webp_anim demuxer (PyAV >= 19, Python 3.12's) reads it as the clip it is: its frames, in order."""
    images = make_images(2)
    images[0] = dict(images[0], name="0000.webp", data=animated_webp())
    manifest, shard = write_manifest(str(tmp_path), images), write_shard(tmp_path / "anim.tar", images)
    plays = "webp_anim" in av.formats_available
    if plays:
        with PyAVClip(images[0]["data"]) as clip:  # animated_webp's frame i is 60 * i everywhere
            levels = clip.decode([0, 1, 2]).float().mean((1, 2, 3))
        assert clip.index.num_frames == 3 and torch.allclose(levels, torch.tensor([0.0, 60.0, 120.0]), atol=3), levels
    for source in (manifest, [shard]):
        loader = build_loader(source, num_frames=1, resolution=16, batch_size=1, train=False, tokenizer=None,
                              backend="pyav", max_bad_share=1.0)
        batches = list(loader)
        if plays:
            assert [c for b in batches for c in b["caption"]] == [images[0]["caption"], images[1]["caption"]]
            assert loader.drain_rejects() == []
            continue
        assert [c for b in batches for c in b["caption"]] == [images[1]["caption"]]
        (name, reason), = loader.drain_rejects()
        assert name.endswith("0000.webp") and reason.startswith(
            "an animated WebP, which this FFmpeg does not decode (decoding failed: "), reason
        assert reason.endswith("): save its first frame as a still image"), reason
