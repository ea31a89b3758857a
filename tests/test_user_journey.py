"""Errors a user meets bringing their own data: each names the file at fault and the fix."""
from __future__ import annotations

import json
import os

import pytest

from videoprism.data.errors import TooManyBadSamplesError
from videoprism.data.loader import build_loader
from .test_data import write_clip


def _manifest(d, rows, name="m.jsonl"):
    path = os.path.join(d, name)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


def test_bad_share_error_names_the_manifest_and_the_min_frames_that_cleans_it(tmp_path):
    # A validation manifest indexed without --min-frames keeps a clip shorter than the model's clips: the error
    # must say which manifest (a run has data.train and data.val) and the index command that drops such clips.
    d = str(tmp_path)
    write_clip(os.path.join(d, "long.mp4"), 10)
    write_clip(os.path.join(d, "short.mp4"), 3)
    path = _manifest(d, [{"path": "long.mp4", "caption": "a"}, {"path": "short.mp4", "caption": "b"}], "val.jsonl")
    loader = build_loader(path, num_frames=8, resolution=32, batch_size=2, train=False, tokenizer=None,
                          max_bad_share=0.0)
    with pytest.raises(TooManyBadSamplesError) as e:
        list(loader)
    msg = str(e.value)
    assert f"samples of {path}" in msg
    assert f"`videoprism data index {path} --out CLEAN.jsonl --min-frames 8`" in msg
    assert "--max-bad-share" in msg  # the eval commands' option, beside training's data.max_bad_share


def test_index_rejects_a_short_window_naming_the_window(tmp_path):
    # The report's path is the whole file: "clip.mp4: too few frames: 5, need 8" for a 20-frame file read as if
    # the file were short. The reason must name the window it counted.
    from videoprism.cli import main

    d = str(tmp_path)
    write_clip(os.path.join(d, "clip.mp4"), 20)  # 10 fps: 2 s
    src = _manifest(d, [{"path": "clip.mp4", "caption": "whole"},
                        {"path": "clip.mp4", "caption": "half a second", "start": 0.0, "end": 0.5}])
    out = os.path.join(d, "clean.jsonl")
    assert main(["data", "index", src, "--out", out, "--min-frames", "8", "--workers", "1", "--quiet"]) == 0
    (rej,) = [json.loads(line) for line in open(os.path.join(d, "clean.rejects.jsonl"))]
    assert rej["reason"] == "too few frames: 5 in the window [0.0, 0.5) s (the file has 20), need 8", rej
    (kept,) = [json.loads(line) for line in open(out)]
    assert kept["caption"] == "whole"


def test_embed_a_bad_or_short_clip_says_how_to_go_on(tmp_path, capsys):
    # "error: short.mp4: too few frames: 3, need 4" named no way on; an image-like 1-frame clip met it too.
    from videoprism.cli import main

    d = str(tmp_path)
    write_clip(os.path.join(d, "short.mp4"), 3)
    with open(os.path.join(d, "notes.mp4"), "w") as f:
        f.write("not a video\n")
    tiny = ["--model", "videoprism_v1_base", "--resolution", "16", "--device", "cpu", "--set", "model_dim=16",
            "--set", "num_heads=2", "--set", "mlp_dim=32", "--set", "num_spatial_layers=1",
            "--set", "num_temporal_layers=1", "--set", "patch_size=8", "--quiet", "--out", os.path.join(d, "e.npy")]

    def error(*argv) -> str:
        capsys.readouterr()
        assert main(["embed", *argv, *tiny]) == 2
        return capsys.readouterr().err.strip().splitlines()[-1]

    err = error(os.path.join(d, "short.mp4"), "--num-frames", "4")
    assert err.startswith("error: ") and "too few frames: 3, need 4" in err, err
    assert "--num-frames, now 4" in err and "--skip-bad" in err, err
    err = error(os.path.join(d, "notes.mp4"), "--num-frames", "4")
    assert "notes.mp4: not a video" in err and "--skip-bad" in err and "--num-frames" not in err, err
    assert main(["embed", os.path.join(d, "short.mp4"), "--num-frames", "3", *tiny]) == 0  # the way on works


def test_clean_command_quotes_a_path_with_spaces(tmp_path):
    d = str(tmp_path / "my videos")
    os.makedirs(d)
    write_clip(os.path.join(d, "short.mp4"), 3)
    path = _manifest(d, [{"path": "short.mp4", "caption": "a"}], "val set.jsonl")
    loader = build_loader(path, num_frames=8, resolution=32, batch_size=1, train=False, tokenizer=None,
                          max_bad_share=0.0)
    with pytest.raises(TooManyBadSamplesError) as e:
        list(loader)
    assert f"`videoprism data index '{path}' --out CLEAN.jsonl --min-frames 8`" in str(e.value)
