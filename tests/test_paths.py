"""videoprism.paths: a JSON write that fails leaves the previous file whole and no temporary file; new files' modes."""
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


def test_non_finite_numbers_are_written_as_null(tmp_path):
    """json.dump wrote NaN and Infinity (a diverged run's loss in a result), which JSON has not: JSON.parse and
    serde_json refuse the file. They are null; finite numbers and the rest are kept."""
    path = str(tmp_path / "r.json")
    write_json_atomic(path, {"loss": float("nan"), "rows": [{"ms": float("inf")}, (1.5, -float("inf"))], "n": 2,
                             "ok": True, "name": "x"})

    def refuse(name):
        raise ValueError(f"{name} is no JSON")

    assert json.loads(open(path).read(), parse_constant=refuse) == {
        "loss": None, "rows": [{"ms": None}, [1.5, None]], "n": 2, "ok": True, "name": "x"}


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_weights_get_the_mode_of_any_new_file(tmp_path, umask):
    """safetensors' save_file leaves its files 0o600 whatever the umask: on a shared cluster nobody else could read
    an export. Our weights get what open() gives a new file under the same umask."""
    import torch

    from videoprism.checkpoint import write_safetensors

    old = os.umask(umask)
    try:
        write_safetensors({"w": torch.zeros(3)}, str(tmp_path / "w.safetensors"), {"k": "v"})
        open(tmp_path / "plain", "w").close()
    finally:
        os.umask(old)
    mode = os.stat(tmp_path / "w.safetensors").st_mode & 0o777
    assert mode == os.stat(tmp_path / "plain").st_mode & 0o777 == 0o666 & ~umask


def test_weights_cut_by_an_interrupt_leave_the_previous_file_and_no_temporary(tmp_path, monkeypatch):
    """write_safetensors removed its temporary file on a SafetensorError or OSError only: Ctrl-C (or any other
    error) mid-write left `w.safetensors.tmp`, a model's size of disk. The previous file stays, nothing else."""
    import safetensors.torch
    import torch

    from videoprism.checkpoint import write_safetensors

    path = str(tmp_path / "w.safetensors")
    write_safetensors({"w": torch.zeros(3)}, path, {"k": "v"})
    before = open(path, "rb").read()

    def cut(tensors, name, metadata=None):
        with open(name, "wb") as fh:
            fh.write(b"\x08\x00")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", cut)
    with pytest.raises(KeyboardInterrupt):
        write_safetensors({"w": torch.ones(1000)}, path, {"k": "v"})
    assert open(path, "rb").read() == before and os.listdir(tmp_path) == ["w.safetensors"]


def test_outputs_are_on_disk_before_they_replace_the_previous_ones(tmp_path, monkeypatch):
    """A file renamed over the previous one before its data reached the disk is empty after a power loss (the
    rename may be written first): the previous weights or result lost for an empty file. Each writer syncs its
    temporary file before the rename."""
    import torch

    from videoprism.checkpoint import write_safetensors

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("sync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                  real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", os.fspath(a))), real_replace(a, b))[1])
    write_safetensors({"w": torch.zeros(3)}, str(tmp_path / "w.safetensors"), {"k": "v"})
    write_json_atomic(str(tmp_path / "r.json"), {"a": 1})
    replaced = [name for what, name in events if what == "replace"]
    assert len(replaced) == 2
    for name in replaced:
        assert ("sync", name) in events[:events.index(("replace", name))], (name, events)
