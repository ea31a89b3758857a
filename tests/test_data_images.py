"""Images as one-frame videos (DESIGN 5): image files listed in a JSONL manifest, good and bad."""
from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest

av = pytest.importorskip("av", reason="PyAV decodes every image here (the GPU machines lack it)")

from videoprism.cli import main  # noqa: E402
from videoprism.data.loader import build_loader  # noqa: E402

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


def bad_images(good_jpg: bytes, good_png: bytes) -> list[tuple[str, str, bytes, tuple[str, ...]]]:
    """(what, extension, the bytes, the reasons the loader may give) of bad image files. A non-image is "not a video
    or an image" (FFmpeg finds no format in it) or, as a file, may fail at its decode (FFmpeg's image2 reader goes
    by the extension)."""
    return [("empty", ".jpg", b"", ("empty file (0 bytes)",)),
            ("cut JPEG", ".jpg", good_jpg[: len(good_jpg) // 2], ("truncated or corrupt image",)),
            ("cut PNG", ".png", good_png[: len(good_png) * 3 // 4], ("truncated or corrupt image",)),
            ("not an image", ".jpg", b"a caption where the photo should be\n" * 8,
             ("not a video or an image", "truncated or corrupt image"))]


def test_bad_images_are_rejected_with_their_reason(tmp_path):
    """Empty, cut (a JPEG cut in half decoded without an error, the rows past the cut flat green: it was trained on)
    and non-image files listed in a manifest: skipped with their reason by the loader and by `data index`."""
    images, bad = make_images(6), bad_images(*(im["data"] for im in make_images(2)))
    for i, (what, ext, data, _) in enumerate(bad):
        images[i] = dict(images[i], name=f"{i:04d}{ext}", data=data, caption=what)
    manifest = write_manifest(str(tmp_path), images)
    loader = build_loader(manifest, num_frames=1, resolution=16, batch_size=1, train=False, tokenizer=None,
                          backend="pyav", max_bad_share=1.0)
    assert [c for b in loader for c in b["caption"]] == [im["caption"] for im in images[len(bad):]]
    rejects = loader.drain_rejects()
    assert [os.path.basename(name) for name, _ in rejects] == [im["name"] for im in images[:len(bad)]]
    assert all(reason.startswith(why) for (_, reason), (*_, why) in zip(rejects, bad)), rejects
    out = str(tmp_path / "clean.jsonl")
    assert main(["data", "index", manifest, "--out", out, "--workers", "1", "--quiet"]) == 0
    report = [json.loads(line) for line in open(str(tmp_path / "clean.rejects.jsonl"))]
    assert [r["path"] for r in report] == [str(tmp_path / im["name"]) for im in images[:len(bad)]]
    assert all(r["reason"].startswith(why) for r, (*_, why) in zip(report, bad)), report
