"""videoprism.paths.write_json_atomic: a write that fails leaves the previous file whole and no temporary file."""
from __future__ import annotations

import json
import os

import pytest

from videoprism.paths import write_json_atomic


def test_a_failed_write_leaves_the_previous_file(tmp_path, monkeypatch):
    path = str(tmp_path / "sub" / "r.json")
    write_json_atomic(path, {"a": 1})
    assert json.loads(open(path).read()) == {"a": 1}

    real_dump = json.dump

    def dump_then_fail(obj, fh, **kw):  # half written, then the disk is full
        real_dump(obj, fh, **kw)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(json, "dump", dump_then_fail)
    with pytest.raises(OSError, match="No space left"):
        write_json_atomic(path, {"a": 2, "b": list(range(1000))})
    monkeypatch.undo()
    assert json.loads(open(path).read()) == {"a": 1}
    assert os.listdir(tmp_path / "sub") == ["r.json"]
    write_json_atomic(path, {"a": 3})
    assert json.loads(open(path).read()) == {"a": 3}
