"""Inputs found by fuzzing the readers of user files: each is refused or skipped with one line, never another
exception type escaping as a traceback or a read sized by a damaged header."""
from __future__ import annotations

import io
import json
import os
import struct
import tarfile
import zipfile
import zlib

import numpy as np
import pytest
import torch

from videoprism.checkpoint import CheckpointError, _read_npz, safetensors_config
from videoprism.data import manifest as manifest_mod
from videoprism.data.errors import TooManyBadSamplesError
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


def test_manifest_offset_or_size_true_or_false_is_rejected_not_read_as_1_or_0(tmp_path):
    # json's true is an int to isinstance: {"offset": true, "size": 4} read bytes [1, 5) of the tar as the video.
    lines = ['{"path": "s.tar", "caption": "ok", "offset": 512, "size": 4}',
             '{"path": "s.tar", "caption": "c", "offset": true, "size": 4}',
             '{"path": "s.tar", "caption": "c", "offset": 0, "size": false}']
    samples, rejects = read_manifest(_write(tmp_path / "m.jsonl", "\n".join(lines) + "\n"), max_bad_share=1.0)
    assert [(s.offset, s.size) for s in samples] == [(512, 4)]
    why = "'offset' and 'size' must both be non-negative ints or both absent, got "
    assert [r for _, r in rejects] == [why + "True, 4", why + "0, False"]


def test_manifest_field_depth_is_a_fixed_bound_not_the_interpreters(tmp_path):
    # Up to MAX_FIELD_DEPTH levels a sample, one more a skipped line, on every Python: 101 levels pickled fine, and
    # 500 were a skipped line on Python 3.11 but a sample on 3.12 (pickle's own limit).
    limit = 100
    lines = ['{"path": "a.mp4", "caption": "c", "extra": ' + "[" * limit + "1" + "]" * limit + "}",
             '{"path": "b.mp4", "caption": "c", "extra": ' + "[" * (limit + 1) + "]" * (limit + 1) + "}",
             '{"path": "c.mp4", "caption": "c", "label": {"a": 1}, "codec": "h264", "extra": {"k": [1, [2]]}}',
             '{"path": "d.mp4", "caption": "c", "extra": ' + '{"k": ' * (limit + 1) + "1" + "}" * (limit + 1) + "}"]
    samples, rejects = read_manifest(_write(tmp_path / "m.jsonl", "\n".join(lines) + "\n"), max_bad_share=1.0)
    assert [os.path.basename(s.path) for s in samples] == ["a.mp4", "c.mp4"]
    assert len(rejects) == 2 and all("nested too deep to keep" in r for _, r in rejects)
    assert manifest_mod.MAX_FIELD_DEPTH == limit


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
    # Here, not at the top: the journal imports PyAV (data index's), which the GPU machines lack, and this file's
    # other tests run there.
    pytest.importorskip("av", reason="data index's journal imports PyAV")
    from videoprism.data.journal import MAGIC, VERSION, Journal

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


def _member(name, data=b"", **fields) -> tuple[tarfile.TarInfo, io.BytesIO | None]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for k, v in fields.items():
        setattr(info, k, v)
    return info, io.BytesIO(data) if data else None


def test_shard_links_devices_folders_and_sparse_members_are_not_read_and_reject_their_key(tmp_path):
    """A symlink, hard link, device, FIFO or folder named as a key's video or caption was dropped without a word: the
    key's reason was "no video or image member" (or "no .txt member") beside its a.mp4. A sparse video's byte range
    is not the file's. Each is named now; none is followed (/etc/passwd is no caption)."""
    sym, lnk = tarfile.SYMTYPE, tarfile.LNKTYPE
    special = [("s1.mp4", dict(type=sym, linkname="ok.mp4")), ("s2.mp4", dict(type=sym, linkname="/etc/passwd")),
               ("s3.mp4", dict(type=sym, linkname="gone.mp4")), ("h.mp4", dict(type=lnk, linkname="ok.mp4")),
               ("c.mp4", dict(type=tarfile.CHRTYPE, devmajor=1, devminor=3)), ("f.mp4", dict(type=tarfile.FIFOTYPE)),
               ("d.mp4", dict(type=tarfile.DIRTYPE)), ("sp.mp4", dict(type=tarfile.GNUTYPE_SPARSE))]
    tar = str(tmp_path / "s.tar")
    with tarfile.open(tar, "w", format=tarfile.GNU_FORMAT) as t:
        for info, data in [_member("ok.mp4", b"x"), _member("ok.txt", b"ok"), _member("t.mp4", b"x"),
                           _member("t.txt", type=sym, linkname="/etc/passwd"), _member("dir", type=tarfile.DIRTYPE),
                           *(_member(name, **fields) for name, fields in special),
                           *(_member(name[:-4] + ".txt", b"c") for name, _ in special)]:
            t.addfile(info, data)
    samples, rejects = read_shards([tar], max_bad_share=1.0)
    assert [s.member for s in samples] == ["ok.mp4"]
    kinds = {"s1": "a symbolic link (to 'ok.mp4')", "s2": "a symbolic link (to '/etc/passwd')",
             "s3": "a symbolic link (to 'gone.mp4')", "h": "a hard link (to 'ok.mp4')", "c": "a device",
             "f": "a FIFO", "d": "a directory", "sp": "a sparse file (tar --sparse)"}
    want = {f"{tar}:{k}": f"its video member {k}.mp4 is {kind}, not a plain file: it is not read; a shard holds its "
                          "files' bytes (tar --dereference --hard-dereference, without --sparse)"
            for k, kind in kinds.items()}
    want[f"{tar}:t"] = want[f"{tar}:s2"].replace("video member s2.mp4", ".txt member t.txt")
    assert dict(rejects) == want  # the folder "dir" is no key


def test_a_shard_member_past_the_end_of_its_file_is_rejected_not_read(tmp_path):
    """The last member of a cut shard declaring 2**50 bytes (a header intact, its data cut) was read with
    f.read(2**50): `data index` stopped on a MemoryError ("out of memory ... use a smaller batch"). Now it is that
    member's reject, beside the shard's."""
    from videoprism.data.index import index_dataset

    head, _ = _member("a.mp4")
    head.size = 1 << 50
    tar = _tar(tmp_path / "cut.tar", [("a.txt", b"a caption")])
    with open(tar, "r+b") as f:
        f.truncate(1024)  # a.txt's header and data, then a.mp4's header and 100 of its bytes
        f.seek(1024)
        f.write(head.tobuf(tarfile.PAX_FORMAT) + b"v" * 100)
    counts = index_dataset([tar], str(tmp_path / "clean.jsonl"), workers=1)
    assert (counts["kept"], counts["rejected"]) == (0, 2)
    offset = read_shards([tar], max_bad_share=1.0)[0][0].offset
    reasons = {r["path"]: r["reason"] for r in map(json.loads, open(str(tmp_path / "clean.rejects.jsonl")))}
    assert reasons[f"{tar}:a.mp4"] == (f"truncated: its bytes [{offset}, {offset + (1 << 50)}) pass the end of the "
                                       f"file ({offset + 100} bytes): a cut shard (copy it again) or a wrong "
                                       "'offset' / 'size'")
    assert reasons[tar].startswith("truncated or not a tar file: read stopped after 2 members")


def test_a_compressed_shard_is_refused_in_one_line_naming_the_compression(tmp_path):
    """A .tar.gz was "a binary file, not a JSONL manifest" (as a manifest), and a gzip-compressed .tar "truncated or
    not a tar file": neither said it was compressed, nor that shards are read uncompressed."""
    tar = _tar(tmp_path / "s.tar", [("a.mp4", b"x"), ("a.txt", b"c")])
    gz = str(tmp_path / "s.tar.gz")
    with open(tar, "rb") as f, open(gz, "wb") as g:
        g.write(zlib.compressobj(wbits=31).compress(f.read()))  # wbits=31: a gzip stream
    with pytest.raises(ValueError, match=r"s\.tar\.gz is a gzip-compressed file: manifests and shards are read "
                                         r"uncompressed .*; decompress it and pass the \.jsonl or \.tar$"):
        manifest_mod.read_source([gz])
    os.replace(gz, tar)  # named as a shard
    with pytest.raises(TooManyBadSamplesError, match=f"{tar}: a gzip-compressed file, not a plain tar: decompress it"):
        read_shards([tar, _tar(tmp_path / "b.tar", [("b.mp4", b"x"), ("b.txt", b"c")])])


def test_shard_member_names_are_keys_only_and_the_index_of_them_loads(tmp_path):
    """'../', absolute, non-UTF-8 and 300-character (PAX) member names are names, not paths: their videos are byte
    ranges of the shard, kept under those names; a symlink to /etc/passwd is the one reject, named by shard and key.
    The clean manifest loads."""
    from videoprism.data.index import index_dataset
    from videoprism.data.loader import build_loader
    from videoprism.data.synth import generate

    generate(str(tmp_path), 2, seed=0, size=32, num_frames=4, workers=1)
    video = (tmp_path / "clips" / "000000.webm").read_bytes()
    keys = ["../up", "/tmp/abs", "bad\udcffname", "L" * 300]
    tar = _tar(tmp_path / "s.tar", [m for k in keys for m in ((f"{k}.webm", video), (f"{k}.txt", k[:3].encode()))])
    with tarfile.open(tar, "a") as t:
        t.addfile(*_member("s.webm", type=tarfile.SYMTYPE, linkname="/etc/passwd"))
        t.addfile(*_member("s.txt", b"c"))
    out = str(tmp_path / "clean.jsonl")
    assert index_dataset([tar], out, workers=1)["kept"] == 4
    (report,) = map(json.loads, open(str(tmp_path / "clean.rejects.jsonl")))
    assert report["path"] == f"{tar}:s" and "s.webm is a symbolic link (to '/etc/passwd')" in report["reason"]
    assert [json.loads(line)["member"] for line in open(out)] == [f"{k}.webm" for k in keys]
    batch = next(iter(build_loader(out, num_frames=4, resolution=32, batch_size=4, train=False, tokenizer=None,
                                   backend="pyav")))
    assert batch["video"].shape[0] == 4 and batch["caption"] == ["../", "/tm", "bad", "LLL"]
