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
