"""Packed manifests (videoprism/data/pack.py): a pack gives exactly what parsing its manifest gives, is used only
while it matches the manifest, and costs a reader neither parse time nor private memory."""
from __future__ import annotations

import copy
import json
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
import zlib

import pytest

from tests.test_sample_list import _growth, _samples
from videoprism.data.errors import TooManyBadSamplesError
from videoprism.data.manifest import SampleList, read_manifest
from videoprism.data.pack import pack_path, write_pack


def _manifest(folder, n=300, bad_lines=()) -> str:
    """A manifest of `n` varied samples (windows, int and dict labels, byte ranges, probe and extra fields) with
    the lines of `bad_lines` inserted after the first."""
    path = os.path.join(folder, "m.jsonl")
    lines = [json.dumps(dict(s.to_record(), path=f"clips/{os.path.basename(s.path)}")) for s in _samples(n)]
    lines[1:1] = bad_lines
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    return path


def _same(got, want) -> None:
    (gs, gr), (ws, wr) = got, want
    assert list(gs) == list(ws) and gr == wr
    assert [s.probe for s in gs] == [s.probe for s in ws] and [s.extra for s in gs] == [s.extra for s in ws]
    assert (gs.fingerprint, gs.int_label, gs.label_names) == (ws.fingerprint, ws.int_label, ws.label_names)


def test_a_pack_reads_back_what_the_manifest_parses_to(tmp_path, capsys):
    m = _manifest(tmp_path, bad_lines=['{"path": "x.mp4", "caption": ""}', "not json"])
    parsed = read_manifest(m, max_bad_share=0.05)
    assert write_pack(m) == {"pack": pack_path(m), "samples": 300, "rejected": 2}
    packed = read_manifest(m, max_bad_share=0.05)
    assert packed[0]._pack == os.path.abspath(m)  # from the pack, not parsed again
    _same(packed, parsed)
    assert packed[1] == [(f"{m}:2", "'caption' must be a non-empty string, got ''"),
                         (f"{m}:3", "bad JSON (Expecting value at column 1)")]
    assert capsys.readouterr().err == ""


def test_a_manifest_named_too_long_for_a_pack_beside_it(tmp_path, capsys):
    """A pack is its manifest's name plus .pack (and ~45 bytes of temporary suffix while written), which a name near
    the file system's 255 bytes cannot take. A read of such a manifest noted at every read "pack cannot be opened
    (File name too long); ... `videoprism data pack` writes it again", which cannot; `data pack` said to copy the
    manifest to a folder you can write; `data index --out` of such a name probed every file, wrote the clean manifest
    and then failed. Now a read has no pack to note, the pack's error names the fix, and the index refuses the name
    before any work."""
    from videoprism.data.index import index_dataset

    manifest = str(tmp_path / ("m" * 246 + ".jsonl"))  # 252 bytes: no room for .pack
    os.rename(_manifest(tmp_path, n=3), manifest)
    samples, _ = read_manifest(manifest)
    assert len(samples) == 3 and capsys.readouterr().err == ""
    with pytest.raises(OSError, match="rename the manifest shorter"):
        write_pack(manifest)
    out = str(tmp_path / ("c" * 240 + ".jsonl"))
    with pytest.raises(ValueError, match=r"--out .*: its name is 246 bytes, \d+ too many for the pack"):
        index_dataset(manifest, out, workers=1)
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(manifest)]  # refused before any file was written


def test_a_pack_with_video_only_lines_serves_readers_without_captions_only(tmp_path, capsys):
    """A line without a caption is a sample for a reader that needs none (stage 2, probes) and a rejected line for
    one that needs captions (stage 1, retrieval), from the pack as from the parse: the pack keeps such lines and
    counts them, and a reader that needs captions parses the manifest instead (which lines to reject, the pack
    does not say)."""
    m = _manifest(tmp_path, n=100, bad_lines=['{"path": "x.mp4"}', '{"path": "y.mp4", "caption": null}'])
    assert write_pack(m) == {"pack": pack_path(m), "samples": 102, "rejected": 0}
    video_only = read_manifest(m, max_bad_share=0.05, captions=False)
    assert video_only[0]._pack == os.path.abspath(m) and video_only[0].uncaptioned == 2
    _same(video_only, read_manifest(m, max_bad_share=0.05, captions=False, use_pack=False))
    assert [s.caption for s in video_only[0][1:3]] == [None, None] and video_only[1] == []
    assert video_only[0][1].to_record() == {"path": os.path.join(tmp_path, "x.mp4")}  # no "caption": None
    capsys.readouterr()
    needed = read_manifest(m, max_bad_share=0.05)
    assert needed[0]._pack is None and "holds 2 video-only lines" in capsys.readouterr().err
    _same(needed, read_manifest(m, max_bad_share=0.05, use_pack=False))
    assert len(needed[0]) == 100 and needed[0].uncaptioned == 0
    assert [r[0] for r in needed[1]] == [f"{m}:2", f"{m}:3"] and all("no caption" in r[1] for r in needed[1])
    with pytest.raises(TooManyBadSamplesError, match="2 of 102 lines"):
        read_manifest(m, max_bad_share=0.01, use_pack=False)


def test_a_reader_that_needs_captions_stops_on_a_packs_count_without_parsing(tmp_path, monkeypatch):
    """Past the share, the pack's count of video-only lines (plus the lines rejected when packing) stops a reader
    that needs captions at once, with the parse's numbers: a parse of a large manifest on every rank took minutes
    to reach the same verdict."""
    import videoprism.data.manifest as manifest

    m = _manifest(tmp_path, n=100, bad_lines=['{"path": "x.mp4"}', '{"path": "y.mp4"}', "not json"])
    write_pack(m)
    with pytest.raises(TooManyBadSamplesError) as parsed:
        read_manifest(m, max_bad_share=0.02, use_pack=False)
    monkeypatch.setattr(manifest, "_parse_manifest", lambda *a, **k: pytest.fail("parsed"))
    with pytest.raises(TooManyBadSamplesError) as packed:
        read_manifest(m, max_bad_share=0.02)
    assert str(parsed.value).startswith("3 of 103 lines") and str(packed.value).startswith("3 of 103 lines")
    assert "video-only lines: 2 (" in str(packed.value) and "lines rejected when it was packed: 1." in str(packed.value)
    assert "--require-captions" in str(packed.value)


def test_a_packs_rejects_name_the_manifest_as_its_reader_does(tmp_path, monkeypatch):
    """A rejected line is `FILE:LINE` with FILE as the reader names the manifest. The pack kept the name it was
    packed by: packed as `m.jsonl` in its folder, a run elsewhere reported (rejects.rank<r>.jsonl, the bad-share
    error) `m.jsonl:2`, a file it could not find, where the parse says the path it was given."""
    m = _manifest(tmp_path, n=20, bad_lines=["{"])
    monkeypatch.chdir(tmp_path)
    write_pack("m.jsonl")
    monkeypatch.chdir("/")
    got = read_manifest(m, max_bad_share=0.1)
    assert got[0]._pack == m
    _same(got, read_manifest(m, max_bad_share=0.1, use_pack=False))
    assert got[1] == [(f"{m}:2", "bad JSON (Expecting property name enclosed in double quotes at column 2)")]


def test_a_pack_applies_the_readers_bad_share(tmp_path):
    """The pack keeps every rejected line: the share is the reader's, as when it parses."""
    m = _manifest(tmp_path, n=20, bad_lines=["{", "{"])
    write_pack(m)
    with pytest.raises(TooManyBadSamplesError, match="2 of 22 lines"):
        read_manifest(m, max_bad_share=0.05)
    assert len(read_manifest(m, max_bad_share=0.1)[0]) == 20


@pytest.mark.parametrize("change", ["edit", "move", "linked folder", "damage", "cut", "foreign"])
def test_a_pack_that_does_not_match_its_manifest_is_not_used(tmp_path, capsys, change):
    m = _manifest(tmp_path, n=30)
    write_pack(m)
    pack = pack_path(m)
    if change == "edit":  # same size, one caption changed
        text = open(m, encoding="utf-8").read()
        open(m, "w", encoding="utf-8").write(text.replace("a clip number 7 ", "a clip number 9 ", 1))
    elif change == "move":  # relative paths now resolve in the new folder
        os.makedirs(tmp_path / "moved")
        for f in (m, pack):
            shutil.move(f, tmp_path / "moved")
        m, pack = str(tmp_path / "moved" / "m.jsonl"), pack_path(str(tmp_path / "moved" / "m.jsonl"))
    elif change == "linked folder":  # the same files under another name (/data -> /lustre/data): paths differ
        os.symlink(tmp_path, f"{tmp_path}_link")
        m, pack = f"{tmp_path}_link/m.jsonl", f"{tmp_path}_link/m.jsonl.pack"
    elif change == "damage":
        with open(pack, "r+b") as fh:
            fh.seek(20)
            fh.write(b"\xff\xff")
    elif change == "cut":
        os.truncate(pack, os.path.getsize(pack) - 3)
    else:
        open(pack, "wb").write(b"PK\x03\x04 not a pack")
    got = read_manifest(m)
    assert got[0]._pack is None
    _same(got, read_manifest(m, use_pack=False))
    if change == "move":
        assert got[0][0].path == str(tmp_path / "moved" / "clips" / "clip_00000000.mp4")
    err = capsys.readouterr().err
    assert f"note: {pack}" in err and "videoprism data pack" in err
    if change in ("move", "linked folder"):  # what changed, not "its size, time or folder changed"
        assert f"{pack} was packed for the manifest in {tmp_path}, not {os.path.dirname(m)}" in err


def _with_header(pack: str, edit) -> None:
    """Rewrite `pack` with its header replaced by `edit(header)` (and its checksum, as a writer would: the shape
    is checked past it), the records kept (moved to the new alignment)."""
    raw = open(pack, "rb").read()
    n = struct.unpack_from("<Q", raw, 8)[0]
    body = raw[20 + n + (-(20 + n) % 8):]
    header = json.dumps(edit(json.loads(raw[16:16 + n]))).encode()
    pad = b"\0" * (-(20 + len(header)) % 8)
    open(pack, "wb").write(raw[:8] + struct.pack("<Q", len(header)) + header + struct.pack("<I", zlib.crc32(header))
                           + pad + body)


@pytest.mark.parametrize("edit", [
    lambda h: list(h),                                      # valid JSON, not an object
    lambda h: {k: v for k, v in h.items() if k != "manifest"},  # a field missing
    lambda h: dict(h, manifest="m.jsonl"),                  # a field of another type
    lambda h: dict(h, manifest=dict(h["manifest"], folder=None)),
    lambda h: dict(h, rejects=[[2]]),                       # a reject without its reason
    lambda h: dict(h, label_names=3),
    lambda h: dict(h, count=-1),
], ids=["list", "no manifest", "manifest a string", "folder null", "reject cut", "label_names a number",
        "negative count"])
def test_a_pack_whose_header_has_another_shape_is_a_damaged_pack(tmp_path, capsys, edit):
    """A header of valid JSON but another shape (another program's file, a hand edit) raised a KeyError, TypeError
    or IndexError out of every reader, where a damaged pack is ignored with a note and the manifest parsed."""
    m = _manifest(tmp_path, n=30, bad_lines=["{"])
    write_pack(m)
    _with_header(pack_path(m), edit)
    got = read_manifest(m, max_bad_share=0.1)
    assert got[0]._pack is None
    _same(got, read_manifest(m, max_bad_share=0.1, use_pack=False))
    err = capsys.readouterr().err
    assert f"note: {pack_path(m)} is damaged (header" in err and f"`videoprism data pack {m}` writes it again" in err


def test_a_stale_pack_is_noted_once_a_process_on_rank_0(tmp_path, capsys, monkeypatch):
    """A command that reads a manifest twice (eval probe: labels, then clips) said the same note twice, and every
    rank of a run said it: once, on rank 0. Another reason for the same pack is said too."""
    m = _manifest(tmp_path, n=30)
    write_pack(m)
    with open(m, "a") as fh:  # the manifest grows: its pack is stale
        fh.write(json.dumps({"path": "clip_x.mp4", "caption": "one more"}) + "\n")
    note = f"note: {pack_path(m)} was written for another version of the manifest (its size changed"
    monkeypatch.setenv("RANK", "1")
    read_manifest(m)
    assert note not in capsys.readouterr().err
    monkeypatch.setenv("RANK", "0")
    for _ in range(2):
        read_manifest(m)
    assert capsys.readouterr().err.count(note) == 1
    with open(pack_path(m), "r+b") as fh:  # now damaged as well: another note
        fh.write(b"\0" * 8)
    read_manifest(m)
    assert f"note: {pack_path(m)} is not a videoprism pack" in capsys.readouterr().err


def test_the_header_rewrite_of_the_test_keeps_a_pack_usable(tmp_path):
    """The oracle of the test above: _with_header with no change gives a pack every reader still maps."""
    m = _manifest(tmp_path, n=30)
    write_pack(m)
    _with_header(pack_path(m), lambda h: dict(h, extra="a longer header moves the records"))
    assert read_manifest(m)[0]._pack == m


def test_a_packed_list_travels_to_spawned_workers_and_copies_on_append(tmp_path, monkeypatch):
    m = _manifest(tmp_path, n=40)
    write_pack(m)
    monkeypatch.chdir(tmp_path)
    samples, _ = read_manifest("m.jsonl")  # a relative name: the unpickling process may run elsewhere
    state = pickle.dumps(samples)
    assert len(state) < 1000  # the pack's name, not its records
    monkeypatch.chdir("/")
    back = pickle.loads(state)
    assert list(back) == list(samples) and back.fingerprint == samples.fingerprint
    grown = copy.copy(samples)
    grown.append(samples[0])
    assert len(grown) == 41 and len(samples) == 40 and list(read_manifest(m)[0]) == list(samples)
    assert grown.fingerprint == SampleList(list(samples) + [samples[0]]).fingerprint
    write_pack(m)  # packed again (same samples, so the same fingerprint): a spawned process still maps it
    assert list(pickle.loads(state)) == list(samples)


def test_two_writers_of_one_pack_never_write_one_file(tmp_path, monkeypatch):
    """Two `data pack` runs of one manifest at once (one per node of a job, on a shared file system, in containers
    where every process has the same pid) wrote the same `PACK.<pid>.tmp`: each truncated the other's half-written
    file, the first renamed it into place while the second still wrote into it, and the second's rename failed
    with "cannot write ... copy the manifest to a folder you can write". Each writes its own file."""
    m = _manifest(tmp_path, n=20)
    monkeypatch.setattr(os, "getpid", lambda: 7)
    theirs = tmp_path / "m.jsonl.pack.7.tmp"  # the other node's pack, half written
    theirs.write_bytes(b"VPPACK half of it")
    write_pack(m)
    assert theirs.read_bytes() == b"VPPACK half of it"
    assert read_manifest(m)[0]._pack == m
    assert sorted(os.listdir(tmp_path)) == ["m.jsonl", "m.jsonl.pack", "m.jsonl.pack.7.tmp"]


_PACK_STOPPED = textwrap.dedent("""
    import os, signal, sys
    from videoprism.data import pack
    real = os.replace

    def stop(tmp, path):  # the pack written, not yet renamed into place
        if sys.argv[2] == "killed":
            os.kill(os.getpid(), signal.SIGKILL)
        print(tmp, flush=True)
        sys.stdin.readline()  # a live writer: goes on when told
        real(tmp, path)

    os.replace = stop
    pack.write_pack(sys.argv[1])
""")


def test_a_pack_removes_the_files_of_writers_that_are_gone_not_of_live_ones(tmp_path, capsys):
    """A `data pack` killed while writing left its tmp file beside the manifest forever (the size of the pack: GBs
    at tens of millions of clips). The next pack of that manifest removes it once its writer is provably gone: a
    process of this machine that no longer runs, or a file untouched for a day (another node's, whose pid cannot be
    looked up here). A live writer's file, another manifest's and a fresh one of another node stay."""
    m = _manifest(tmp_path, n=20)
    with subprocess.Popen([sys.executable, "-c", _PACK_STOPPED, m, "live"], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True) as live:
        live_tmp = live.stdout.readline().strip()
        assert os.path.isfile(live_tmp), live_tmp
        killed = subprocess.run([sys.executable, "-c", _PACK_STOPPED, m, "killed"], capture_output=True, text=True,
                                timeout=300)
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
        assert "removed" not in killed.stderr  # the live writer's file is not its to remove
        (dead,) = [p for p in map(str, tmp_path.glob("*.tmp")) if p != live_tmp]
        # The dead writer's file as another node's (another pid space): its pid means nothing here.
        space = dead.split(".pack.")[1].split(".")[0]
        node_fresh, node_old = (dead.replace(f".{space}.", f".{s}.") for s in ("0" * 12, "1" * 12))
        other_manifest = dead.replace("m.jsonl.pack", "n.jsonl.pack")
        for f in (node_fresh, node_old, other_manifest):
            shutil.copy(dead, f)
        day_ago = time.time() - 25 * 3600
        os.utime(node_old, (day_ago, day_ago))
        write_pack(m)
        live.stdin.write("\n")
        live.stdin.flush()
        assert live.wait(60) == 0  # its file was left to it: renamed into place
    assert not os.path.exists(dead) and not os.path.exists(node_old)
    assert sorted(os.listdir(tmp_path)) == sorted(["m.jsonl", "m.jsonl.pack", os.path.basename(node_fresh),
                                                   os.path.basename(other_manifest)])
    assert read_manifest(m)[0]._pack == m
    notes = [line for line in capsys.readouterr().err.splitlines() if "removed" in line]
    assert len(notes) == 1 and "removed 2 unfinished pack file(s)" in notes[0], notes
    assert dead in notes[0] and node_old in notes[0]


def _names(samples, conn) -> None:
    conn.send([s.name for s in samples])


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
@pytest.mark.parametrize("change", ["packed again", "removed"])
def test_a_worker_started_after_the_pack_changed_maps_its_parents_pack(tmp_path, method, change):
    """A spawned or forkserver process (a DataLoader worker under those start methods, each epoch's or a restart's)
    mapped the pack by name: once it was packed again over an edited manifest (the next version of the data,
    prepared during a run) or removed, every worker died at start and the run stopped at its next epoch ("workers
    died 3 times ... out of memory?"), where a parsed manifest was read once. It gets the parent's open file."""
    import multiprocessing

    m = _manifest(tmp_path, n=30)
    write_pack(m)
    samples, _ = read_manifest(m)
    assert samples._pack == m
    if change == "removed":
        os.remove(pack_path(m))
    else:
        _manifest(tmp_path, n=29)
        write_pack(m)
    ctx = multiprocessing.get_context(method)
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_names, args=(samples, child))
    p.start()
    child.close()  # the child's end: a child that dies ends the pipe
    try:
        # It imports torch and this module first: 9-25 s on a loaded 2-core machine. A child that dies ends the
        # pipe at once; the bound is for one that hangs, which join() would otherwise wait for forever.
        got = parent.recv() if parent.poll(300) else None
    except EOFError:
        got = None
    if got is None:
        p.kill()
    p.join()
    assert got == [s.name for s in samples], f"the {method} process ended with exit code {p.exitcode}"


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps_rollup"), reason="Linux /proc memory accounting")
def test_a_packed_list_costs_a_reader_no_private_memory(tmp_path):
    m = _manifest(tmp_path, n=20_000)
    write_pack(m)
    samples, _ = read_manifest(m)
    grew = _growth(samples)
    assert grew < os.path.getsize(pack_path(m)) / 10, grew


def test_a_loader_over_a_pack_yields_the_batches_of_the_manifest(tmp_path):
    from videoprism.data.loader import build_loader
    from videoprism.data.synth import generate

    generate(str(tmp_path), 10, seed=3, size=32, num_frames=4, workers=1)
    m = str(tmp_path / "train.jsonl")
    kw = dict(num_frames=2, resolution=16, batch_size=3, train=True, seed=1, tokenizer=None)
    want = list(build_loader(m, **kw))
    write_pack(m)
    loader = build_loader(m, **kw)
    assert loader.samples._pack == m
    got = list(loader)
    assert [b["path"] for b in got] == [b["path"] for b in want]
    assert all((g["video"] == w["video"]).all() for g, w in zip(got, want))
    assert loader.state_dict()["samples"] == build_loader(m, **kw).samples.fingerprint


def test_data_pack_and_index_commands(tmp_path, capsys):
    from videoprism.cli import main
    from videoprism.data.synth import generate

    generate(str(tmp_path), 10, seed=3, size=32, num_frames=4, workers=1)
    m = str(tmp_path / "train.jsonl")
    assert main(["data", "pack", m, "--quiet"]) == 0
    assert f"packed 9 samples (0 rejected lines kept for the reports) -> {m}.pack" in capsys.readouterr().out
    assert os.path.isfile(pack_path(m))
    clean = str(tmp_path / "clean.jsonl")
    assert main(["data", "index", m, "--out", clean, "--workers", "1"]) == 0
    out, err = capsys.readouterr()
    assert f"(packed: {clean}.pack)" in out
    assert "read clean.jsonl" in err  # the pack's read has its bar: minutes at tens of millions of clips
    _same(read_manifest(clean), read_manifest(clean, use_pack=False))
    assert read_manifest(clean)[0]._pack == clean
    # As every reader says it, not "[Errno 2] No such file or directory: '...missing.jsonl'" (the stamp's stat).
    assert main(["data", "pack", str(tmp_path / "missing.jsonl")]) == 2
    assert f"manifest '{tmp_path / 'missing.jsonl'}' does not exist; pass a .jsonl file" in capsys.readouterr().err


def test_the_startup_benchmark_reads_the_pack_it_wrote(tmp_path):
    """bench.manifest's pack rows come from a mapped pack (measure raises on a parse) and beat the parse."""
    from bench import manifest as bench_manifest

    out = tmp_path / "r.json"
    assert bench_manifest.main(["--lines", "3000", "--reps", "1", "--out", str(out)]) == 0
    parse, pack, copied = json.loads(out.read_text())["rows"]
    assert (parse["mode"], pack["mode"], copied["mode"]) == ("parse", "pack", "pack_copied")
    assert pack["read_s"] < parse["read_s"] and copied["read_s"] < parse["read_s"]


def _replace_keeping_size_and_time(m: str, how: str) -> None:
    """Replace manifest `m` by one of other content, the same size and the same modification time, as `cp -p`,
    `rsync -t` or a tar extract of another version does (`rewritten`: in place; `renamed`: a new file moved over
    it)."""
    st = os.stat(m)
    text = open(m, encoding="utf-8").read()
    new = text.replace("a clip number 7 ", "a clip number 9 ", 1)
    assert new != text and len(new) == len(text)
    target = m if how == "rewritten" else m + ".new"
    with open(target, "w", encoding="utf-8") as fh:
        fh.write(new)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    if how == "renamed":
        os.replace(target, m)
    assert (os.stat(m).st_size, os.stat(m).st_mtime_ns) == (st.st_size, st.st_mtime_ns)


@pytest.mark.parametrize("how", ["rewritten", "renamed"])
def test_a_manifest_replaced_with_the_same_size_and_time_is_not_read_from_its_pack(tmp_path, capsys, how):
    """The pack took a manifest as unchanged while its size and modification time were: another version of the
    same size copied over it with its time (`cp -p`, `rsync -t`, a tar extract) trained on the old samples. Its
    content is checked against the pack's hash of it whenever the file is not the one packed (inode, change time)."""
    m = _manifest(tmp_path, n=30)
    write_pack(m)
    _replace_keeping_size_and_time(m, how)
    got = read_manifest(m)
    assert got[0]._pack is None
    _same(got, read_manifest(m, use_pack=False))
    assert got[0][7].caption.startswith("a clip number 9 ")
    err = capsys.readouterr().err
    assert f"note: {pack_path(m)} was written for another version of the manifest (its content differs" in err
    assert f"`videoprism data pack {m}` writes it again" in err


@pytest.mark.parametrize("change", ["copied", "touched"])
def test_a_copied_manifest_is_read_from_its_pack_once_its_content_is_checked(tmp_path, capsys, change):
    """A dataset folder copied to another machine or file system at the same path (`cp -a`, rsync -a, a restore):
    each file is another inode with another change time, the same content. Its pack is used after its content is
    checked (a note says so and what brings the startup back to a header read), not ignored for a parse of
    minutes. A manifest touched (its modification time changed, its content not) is read from its pack alike."""
    os.makedirs(tmp_path / "data")
    m2 = m = _manifest(tmp_path / "data", n=30)
    write_pack(m)
    if change == "copied":
        os.rename(tmp_path / "data", tmp_path / "elsewhere")
        shutil.copytree(tmp_path / "elsewhere", tmp_path / "data")  # copy2: the times kept, new inodes
    else:
        st = os.stat(m)
        os.utime(m, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    got = read_manifest(m2)
    assert got[0]._pack == m2
    _same(got, read_manifest(m2, use_pack=False))
    err = capsys.readouterr().err
    assert f"note: {pack_path(m2)} is used: {m2} was copied, moved or touched since it was packed" in err
    assert "its content matches the pack's" in err and f"`videoprism data pack {m2}` packs it again" in err
    write_pack(m2)  # packed again: the header read alone
    assert read_manifest(m2)[0]._pack == m2 and capsys.readouterr().err == ""


def test_a_pack_is_written_after_its_manifests_last_change_time_has_passed(tmp_path):
    """An edit within the time stamps' resolution of the packed version keeps its size, time and change time: the
    pack records the manifest only once a change from then on gets another change time (the read of the
    manifest starts past the tick of its last change, on the file system's own clock)."""
    from videoprism.data.pack import _resolution_ns

    m = _manifest(tmp_path, n=5)
    write_pack(m)
    raw = open(pack_path(m), "rb").read()
    header = json.loads(raw[16:16 + struct.unpack_from("<Q", raw, 8)[0]])
    ctime = header["manifest"]["ctime_ns"]
    assert ctime == os.stat(m).st_ctime_ns
    assert header["manifest"]["read_after_ns"] - ctime > _resolution_ns(ctime)


def _flip(path: str, at: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(at)
        b = fh.read(1)
        fh.seek(at)
        fh.write(bytes([b[0] ^ 0x04]))


def test_a_flipped_byte_in_a_packs_records_never_reaches_a_reader(tmp_path, capsys):
    """A pack had no checksum of its records: bit rot, or a copy with a hole in it, read wrong captions or paths
    silently. Each record is checked as it is read; a damaged one is read from the manifest instead, with a note."""
    m = _manifest(tmp_path, n=30)
    write_pack(m)
    raw = open(pack_path(m), "rb").read()
    _flip(pack_path(m), raw.index("a clip number 17 ".encode()) + 14)
    got = read_manifest(m)
    assert got[0]._pack == m  # the header and index are sound: mapped, its records checked as read
    _same(got, read_manifest(m, use_pack=False))
    assert got[0][17].caption.startswith("a clip number 17 ")
    err = capsys.readouterr().err
    assert f"note: {pack_path(m)} is damaged (record 17 fails its checksum); reading {m} instead" in err
    assert err.count("note:") == 1  # parsed once, not once a record


def test_a_damaged_record_of_a_pack_whose_manifest_changed_since_stops_with_the_fix(tmp_path):
    """The manifest read in place of a damaged record must hold the samples the run was given (its checkpoint's
    positions index into them): one edited since is no replacement, and the run stops saying so."""
    from videoprism.data.pack import StalePack

    m = _manifest(tmp_path, n=30)
    write_pack(m)
    samples, _ = read_manifest(m)
    _manifest(tmp_path, n=29)  # the next version of the data, prepared during the run
    _flip(pack_path(m), open(pack_path(m), "rb").read().index("a clip number 17 ".encode()) + 14)
    assert samples[16] == read_manifest(m, use_pack=False)[0][16]
    with pytest.raises(StalePack, match=r"record 17 fails its checksum.* no longer holds the samples"):
        samples[17]


def _with_record(pack: str, i: int, edit) -> None:
    """Rewrite `pack` with its record `i` replaced by `edit(record)`, the offsets and checksums made to match (as
    anyone who writes a pack can)."""
    import array

    from videoprism.data.pack import record_crcs

    raw = open(pack, "rb").read()
    n = struct.unpack_from("<Q", raw, 8)[0]
    count = json.loads(raw[16:16 + n])["count"]
    at = 20 + n + (-(20 + n) % 8)
    ends = array.array("q", raw[at:at + 8 * count])
    data = raw[at + 12 * count:]
    records = [data[(ends[j - 1] if j else 0):ends[j]] for j in range(count)]
    records[i] = edit(records[i])
    data = b"".join(records)
    ends = array.array("q", [sum(map(len, records[:j + 1])) for j in range(count)])
    open(pack, "wb").write(raw[:at] + ends.tobytes() + record_crcs(data, ends).tobytes() + data)


def _plant(marker: str, *values):
    """What a crafted record calls: writes `marker` (the proof that reading a sample ran code), then gives the
    values of the genuine record, so that nothing else shows it."""
    open(marker, "w").close()
    return values


class _Call:
    def __init__(self, marker: str, values: tuple):
        self.marker, self.values = marker, values

    def __reduce__(self):
        return _plant, (self.marker, *self.values)


def _crafted(how: str, marker: str, genuine: bytes) -> bytes:
    values = pickle.loads(genuine)
    if how == "not a record":
        return pickle.dumps(42)
    if how == "INST":  # protocol 0's instance opcode: calls _plant(marker)
        return b"(V" + marker.encode() + b"\ni" + __name__.encode() + b"\n_plant\n."
    return pickle.dumps(_Call(marker, values), protocol={"GLOBAL": 0, "STACK_GLOBAL": 5}[how])


@pytest.mark.parametrize("how", ["STACK_GLOBAL", "GLOBAL", "INST", "not a record"])
def test_a_crafted_pack_shipped_with_its_manifest_runs_no_code(tmp_path, capsys, how):
    """A pack comes with its manifest from wherever the data did, and one beside a copy of its manifest is used once
    the manifest's content matches the SHA-256 in its header: anyone who ships both can arrange that, and the
    checksums of the records too. Its records were read with pickle.loads: one naming a function called it at the
    first read of that sample (the marker file written, the sample read as if nothing happened), here and in
    every worker that maps the pack. A record is read as plain values only; one that names anything (or does not
    decode at all) is a damaged record: read from the manifest instead, with a note."""
    os.makedirs(tmp_path / "data")
    m = _manifest(tmp_path / "data", n=30)
    write_pack(m)
    marker = str(tmp_path / "ran")
    _with_record(pack_path(m), 3, lambda genuine: _crafted(how, marker, genuine))
    os.rename(tmp_path / "data", tmp_path / "sent")  # as shipped: another copy of both files, at the same path
    shutil.copytree(tmp_path / "sent", tmp_path / "data")
    samples, _ = read_manifest(m)
    assert samples._pack == m  # the header matches: the pack is used
    worker = pickle.loads(pickle.dumps(samples))  # a worker's copy: maps the pack again
    want = read_manifest(m, use_pack=False)
    for got in (worker, samples):
        _same((got, []), (want[0], []))
        assert not os.path.exists(marker), f"reading the samples of a crafted pack ({how}) ran code"
    err = capsys.readouterr().err
    named = f"it names {__name__}._plant, which reading it would call" if how != "not a record" else "cannot unpack"
    assert f"note: {pack_path(m)} is damaged (record 3 does not decode: {named}" in err
    assert f"reading {m} instead" in err


def test_the_record_rewrite_of_the_test_keeps_a_pack_usable(tmp_path, capsys):
    """The oracle of the test above: _with_record writing the record's own values (in other bytes: protocol 0) gives
    a pack read whole, without a note."""
    m = _manifest(tmp_path, n=30)
    write_pack(m)
    _with_record(pack_path(m), 3, lambda genuine: pickle.dumps(pickle.loads(genuine), protocol=0))
    got = read_manifest(m)
    _same(got, read_manifest(m, use_pack=False))
    assert got[0]._pack == m and capsys.readouterr().err == ""


def test_a_header_value_changed_by_damage_is_a_damaged_pack(tmp_path, capsys):
    """A flipped byte inside a header string (a label name, a fingerprint) left valid JSON of the right shape: read
    as it was. The header has a checksum."""
    m = _manifest(tmp_path, n=30)
    write_pack(m)
    raw = open(pack_path(m), "rb").read()
    _flip(pack_path(m), raw.index(b'"colour"') + 2)
    got = read_manifest(m)
    assert got[0]._pack is None and got[0].label_names == ["colour", "shape"]
    assert f"note: {pack_path(m)} is damaged (header checksum" in capsys.readouterr().err


def _old_pack(m: str) -> None:
    """`m`'s pack as videoprism wrote it before records had checksums (format 2): its manifest's size, time and
    folder, the header straight after its length, the ends, the records."""
    samples, rejects = read_manifest(m, max_bad_share=1.0, use_pack=False)
    st = os.stat(m)
    header = json.dumps({
        "version": 2, "byteorder": sys.byteorder,
        "manifest": {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "folder": os.path.dirname(os.path.abspath(m))},
        "count": len(samples), "lines": len(samples) + len(rejects), "int_label": samples.int_label,
        "label_names": samples.label_names, "fingerprint": samples.fingerprint, "rejects": []}).encode()
    data, ends = samples.buffers()
    with open(pack_path(m), "wb") as fh:
        fh.write(b"VPPACK\x00\x01" + struct.pack("<Q", len(header)) + header)
        fh.write(b"\0" * (-fh.tell() % 8))
        fh.write(ends.tobytes())
        fh.write(data)


def test_a_pack_of_the_older_format_is_stale_not_misread(tmp_path, capsys):
    m = _manifest(tmp_path, n=30)
    _old_pack(m)
    got = read_manifest(m)
    assert got[0]._pack is None
    _same(got, read_manifest(m, use_pack=False))
    from videoprism.data.pack import VERSION

    assert f"note: {pack_path(m)} has format version 2, this videoprism reads {VERSION}" in capsys.readouterr().err


def test_a_pack_written_within_its_manifests_last_tick_is_used_after_a_content_check(tmp_path, capsys, monkeypatch):
    """A pack whose writer could not wait out the manifest's last tick (the file system's clock behind the
    manifest's change time: clocks that disagree) does not vouch for the manifest by its stamp: every read checks
    the content, and says why."""
    from videoprism.data import pack

    monkeypatch.setattr(pack, "_SETTLE_S", 0.0)
    monkeypatch.setattr(pack, "_resolution_ns", lambda stamp_ns: 10**12)
    m = _manifest(tmp_path, n=30)
    write_pack(m)
    got = read_manifest(m)
    assert got[0]._pack == m
    _same(got, read_manifest(m, use_pack=False))
    assert f"{m} was packed within its time stamps' resolution of a change to it, and its content matches the " \
           "pack's" in capsys.readouterr().err


def test_a_manifest_changed_while_it_is_packed_leaves_no_pack(tmp_path, monkeypatch):
    """The content hash and the parse are two reads: an edit between them would pack a hash of one version with
    the samples of another. The manifest's stamp after both must be the one before."""
    from videoprism.data import manifest as manifest_module

    m = _manifest(tmp_path, n=30)
    real = manifest_module.read_manifest

    def edited_first(path, **kw):
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"path": "clips/late.mp4", "caption": "a late line"}) + "\n")
        return real(path, **kw)

    monkeypatch.setattr(manifest_module, "read_manifest", edited_first)
    with pytest.raises(ValueError, match="changed while it was packed; pack it again once it is written"):
        write_pack(m)
    assert sorted(os.listdir(tmp_path)) == ["m.jsonl"]


def test_a_manifest_written_relative_to_the_current_folder_is_pointed_out(tmp_path, monkeypatch, capsys):
    """Paths resolve against the manifest's folder; a manifest written with paths relative to where its script ran
    had every clip skipped as a missing file, and nothing said why."""
    (tmp_path / "clips").mkdir()
    (tmp_path / "clips" / "a.webm").write_bytes(b"video")
    (tmp_path / "lists").mkdir()
    m = tmp_path / "lists" / "m.jsonl"
    m.write_text(json.dumps({"path": "clips/a.webm", "caption": "a cat"}) + "\n")
    monkeypatch.chdir(tmp_path)
    read_manifest(str(m), use_pack=False)
    err = capsys.readouterr().err
    assert f"its own folder, {tmp_path / 'lists'}, which has no 'clips/a.webm'; the current folder has one" in err
    m.write_text(json.dumps({"path": "../clips/a.webm", "caption": "a cat"}) + "\n")  # right: nothing to say
    read_manifest(str(m), use_pack=False)
    assert capsys.readouterr().err == ""
