"""Inputs found by fuzzing the readers of user files: each is refused or skipped with one line, never another
exception type escaping as a traceback or a read sized by a damaged header."""
from __future__ import annotations

import io
import json
import struct
import tarfile
import zipfile
import zlib

import numpy as np
import pytest
import torch

from videoprism.checkpoint import CheckpointError, _read_npz, safetensors_config
from videoprism.data import manifest as manifest_mod
from videoprism.data.journal import MAGIC, VERSION, Journal
from videoprism.data.manifest import read_manifest, read_shards
from videoprism.data.pack import StalePack, pack_path, read_pack, write_pack

DEEP = "[" * 100000 + "]" * 100000  # past json's and tomllib's recursion limit


def _write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_manifest_lines_nested_too_deep_or_past_a_float_are_skipped(tmp_path):
    lines = ['{"path": "a.mp4", "caption": "ok"}', DEEP,
             '{"path": "b.mp4", "caption": "c", "start": 1' + "0" * 400 + "}",  # 1e400: no float
             '{"path": "c.mp4", "caption": "c", "extra": ' + "[" * 500 + "]" * 500 + "}"]
    samples, rejects = read_manifest(_write(tmp_path / "m.jsonl", "\n".join(lines) + "\n"), max_bad_share=1.0)
    assert len(samples) == 1
    reasons = [r for _, r in rejects]
    assert "nested too deep" in reasons[0]
    assert "'start' must be a non-negative, finite number" in reasons[1]
    assert "nested too deep" in reasons[2]


def _tar(path, members) -> str:
    with tarfile.open(path, "w") as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return str(path)


def test_shard_json_nested_too_deep_and_a_long_caption_are_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr(manifest_mod, "MAX_TEXT_MEMBER", 4096)
    deep = b"[" * 2000 + b"]" * 2000  # past json's recursion limit, within the member size
    tar = _tar(tmp_path / "s.tar", [("a.mp4", b"x"), ("a.txt", b"ok"), ("b.mp4", b"x"), ("b.txt", b"ok"),
                                    ("b.json", deep), ("c.mp4", b"x"), ("c.txt", b"y" * 4097)])
    samples, rejects = read_shards([tar], max_bad_share=1.0)
    assert [s.member for s in samples] == ["a.mp4"]
    reasons = dict(rejects)
    assert "nested too deep" in reasons[f"{tar}:b"]
    assert "c.txt is 4097 bytes, over the 4096" in reasons[f"{tar}:c"]


def _with_header(data: bytes, header: bytes) -> bytes:
    """A pack with another header (its checksum and padding redone)."""
    (n,) = struct.unpack_from("<Q", data, 8)
    rest = data[20 + n + (-(20 + n) % 8):]
    new = data[:8] + struct.pack("<Q", len(header)) + header + struct.pack("<I", zlib.crc32(header))
    return new + b"\0" * (-len(new) % 8) + rest


@pytest.mark.parametrize("change", ["deep", "lines"])
def test_pack_header_nested_too_deep_or_a_count_past_int64_is_stale(tmp_path, change):
    m = _write(tmp_path / "m.jsonl", '{"path": "a.mp4", "caption": "ok"}\n')
    write_pack(m)
    with open(pack_path(m), "rb") as fh:
        data = fh.read()
    (n,) = struct.unpack_from("<Q", data, 8)
    header = json.loads(data[16:16 + n])
    header["lines"] = 2**70
    text = (DEEP if change == "deep" else json.dumps(header)).encode()
    with open(pack_path(m), "r+b") as fh:  # the same file: the manifest's stamp still matches
        fh.truncate(0)
        fh.write(_with_header(data, text))
    with pytest.raises(StalePack, match="nested too deep" if change == "deep" else "header.lines is"):
        read_pack(m)
    assert len(read_manifest(m)[0]) == 1  # the manifest read instead


def test_journal_lines_nested_too_deep_are_ignored_or_skipped(tmp_path, capsys):
    video = tmp_path / "a.mp4"
    video.write_bytes(b"x")
    key = {"sources": [], "options": {}, "pyav": "1"}
    path = tmp_path / "out.jsonl.journal"
    path.write_text(DEEP + "\n")
    Journal(str(path), key, [str(video)]).close()
    assert "not a journal" in capsys.readouterr().err
    path.write_text(json.dumps({"journal": MAGIC, "version": VERSION, "key": key}) + "\n" + DEEP + "\n")
    Journal(str(path), key, [str(video)]).close()
    assert "(1 damaged line(s) skipped)" in capsys.readouterr().err


@pytest.mark.parametrize("ext", [".json", ".toml"])
def test_config_nested_too_deep_is_one_line(tmp_path, ext):
    from train.config import read_config_file

    text = DEEP if ext == ".json" else "a = " + DEEP
    with pytest.raises(ValueError, match="nested too deep"):
        read_config_file(_write(tmp_path / f"c{ext}", text))


def test_safetensors_config_nested_too_deep_is_a_checkpoint_error(tmp_path):
    from safetensors.torch import save_file

    path = str(tmp_path / "m.safetensors")
    save_file({"w": torch.zeros(2)}, path, metadata={"class": "FactorizedEncoder", "config": DEEP})
    with pytest.raises(CheckpointError, match="not JSON.*nested too deep"):
        safetensors_config(path)


def _npz(path, npy: bytes) -> str:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("w.npy", npy)
    return str(path)


def _npy(shape) -> bytes:
    """An .npy of 4 float32 zeros whose header declares `shape`."""
    bio = io.BytesIO()
    np.lib.format.write_array_header_1_0(bio, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return bio.getvalue() + bytes(16)


def test_npz_of_a_huge_declared_shape_or_a_bad_crc_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match=r"declares shape \(1099511627776,\).*holds 16 bytes"):
        _read_npz(_npz(tmp_path / "big.npz", _npy((1 << 40,))))
    path = _npz(tmp_path / "crc.npz", _npy((4,)))
    data = bytearray(open(path, "rb").read())
    data[data.rindex(b"NUMPY") + 100] ^= 1  # a byte of the array: its CRC fails (zipfile.BadZipFile)
    open(path, "wb").write(bytes(data))
    with pytest.raises(CheckpointError, match="not a readable .npz"):
        _read_npz(path)
