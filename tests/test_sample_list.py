"""The compact sample store (videoprism.data.manifest.SampleList): the same samples as a list, and a forked
DataLoader worker that reads every sample copies none of it (a list of Sample objects it copies whole)."""
from __future__ import annotations

import multiprocessing
import os

import pytest

from videoprism.data.manifest import Sample, SampleList


def _samples(n: int) -> list[Sample]:
    out = []
    for i in range(n):
        kind = i % 4
        out.append(Sample(
            path=f"/data/videos/shard{i // 100:05d}/clip_{i:08d}.mp4", caption=f"a clip number {i} — ünïcode",
            dataset="" if kind else "webvid", start=None if kind else 1.5, end=None if kind < 2 else 4.0 + i,
            label=None if kind == 0 else i % 7 if kind == 1 else {"colour": i % 3, "shape": i % 5},
            offset=None if kind != 3 else 512 * i, size=None if kind != 3 else 1000 + i,
            member=None if kind != 3 else f"{i:06d}.mp4", probe={} if kind else {"codec": "vp9", "frames": 12},
            extra={} if kind != 2 else {"source_id": f"yt:{i}", "tags": ["a", "b"]}))
    return out


def test_holds_the_samples_of_the_list():
    want = _samples(203)
    got = SampleList(want)
    assert len(got) == len(want)
    assert [got[i] for i in range(len(got))] == want and list(got) == want
    assert got[-1] == want[-1] and got[-203] == want[0]
    assert got[5:40:3] == want[5:40:3] and got[::-1] == want[::-1]
    assert got[7].probe == want[7].probe and got[6].extra == want[6].extra and got[8].probe == {"codec": "vp9",
                                                                                                "frames": 12}
    for bad in (203, -204):
        with pytest.raises(IndexError):
            got[bad]


def _private_growth(samples, conn) -> None:
    """In a forked child: touch every sample as a worker's __getitem__ does and send how many bytes of the
    parent's memory that copied into this process (Private_Dirty grows as shared pages are written)."""
    def private_kb() -> int:
        with open("/proc/self/smaps_rollup") as fh:
            return sum(int(line.split()[1]) for line in fh if line.startswith("Private_Dirty"))

    before = private_kb()
    for i in range(len(samples)):
        samples[i].caption
    conn.send((private_kb() - before) * 1024)


def _growth(samples) -> int:
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_private_growth, args=(samples, child))
    p.start()
    child.close()  # the child's end: a child that fails ends the pipe (EOFError) instead of leaving recv() waiting
    got = parent.recv()
    p.join()
    return got


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps_rollup"), reason="Linux /proc memory accounting")
def test_a_forked_worker_copies_none_of_it():
    plain = _samples(100_000)
    compact = SampleList(plain)
    size = len(compact._data)  # ~12 MB of records
    copied_list, copied_compact = _growth(plain), _growth(compact)
    assert copied_list > size, (copied_list, size)  # the negative control: every object's page was written
    assert copied_compact < size / 10, (copied_compact, size)


def test_what_a_loader_reads_of_every_sample_is_gathered_on_append():
    import hashlib
    import pickle

    want = _samples(50)
    got = SampleList(want)
    assert got.int_label and got.label_names == ["colour", "shape"]
    assert not SampleList(_samples(1)).int_label and SampleList(_samples(1)).label_names == []
    # The formula checkpoints saved before the list was compact: their data positions still resume.
    h = hashlib.sha256()
    for s in want:
        h.update(f"{s.name}\0{s.start}\0{s.end}\n".encode())
    assert got.fingerprint == f"50:{h.hexdigest()[:16]}"
    assert SampleList(want[:49]).fingerprint != got.fingerprint
    back = pickle.loads(pickle.dumps(got))  # a spawned worker's copy
    assert list(back) == want and back.fingerprint == got.fingerprint and back.label_names == got.label_names


def test_a_non_utf8_file_name_is_one_usable_sample(tmp_path):
    """A file name that is not UTF-8 reaches a manifest as a lone surrogate ("caf\\udce9.mp4": how os.listdir gives
    it and json.dumps writes it). The fingerprint's strict UTF-8 encode raised inside append after the record was
    stored: the line was reported as rejected and kept all the same (len 2 with 1 reject), and the fingerprint
    counted a sample it had not hashed."""
    import json

    from videoprism.data.loader import build_loader
    from videoprism.data.manifest import read_manifest

    odd = os.fsdecode(b"caf\xe9.mp4")
    p = tmp_path / "m.jsonl"
    p.write_text(json.dumps({"path": odd, "caption": "a"}) + "\n" + json.dumps({"path": "b.mp4", "caption": "b"})
                 + "\n")
    samples, rejects = read_manifest(str(p), max_bad_share=1.0)
    assert rejects == []
    assert [s.path for s in samples] == [str(tmp_path / odd), str(tmp_path / "b.mp4")]
    # The fingerprint covers both samples: without the odd one it differs, and a checkpoint can save it.
    assert samples.fingerprint.startswith("2:")
    assert samples.fingerprint != SampleList([Sample(samples[1].path, "b"), samples[1]]).fingerprint
    loader = build_loader(str(p), num_frames=2, resolution=16, batch_size=1, train=True, tokenizer=None)
    assert loader.state_dict()["samples"] == samples.fingerprint


def test_a_copy_or_an_unpickled_list_appends_on_its_own():
    """copy.copy shared the two buffers (an append to the copy grew the original, whose fingerprint then counted
    a sample it never hashed), and an unpickled or copied list raised on append (its hash state was None)."""
    import copy
    import hashlib
    import pickle

    want = _samples(6)
    for make in (lambda sl: copy.copy(sl), lambda sl: pickle.loads(pickle.dumps(sl))):
        original = SampleList(want[:5])
        fp = original.fingerprint
        other = make(original)
        other.append(want[5])
        assert len(original) == 5 and list(original) == want[:5] and original.fingerprint == fp
        h = hashlib.sha256()
        for s in want:
            h.update(f"{s.name}\0{s.start}\0{s.end}\n".encode())
        assert list(other) == want and other.fingerprint == f"6:{h.hexdigest()[:16]}" == SampleList(want).fingerprint
