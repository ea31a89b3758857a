"""Synthetic data scenes: 'single' is the 'pair' scene without the second shape, in pixels and in the caption."""
import json
import signal

import numpy as np
import pytest

from tests.conftest import child_pids, still_running
from videoprism.data.synth import (COLOURS, DIRECTIONS, _clip_spec, _is_val, caption_of, class_names, generate,
                                   prompt_templates, render)


def _exact(frames, colour_id):
    return (frames == np.array(list(COLOURS.values())[colour_id], np.uint8)).all(-1)


@pytest.mark.parametrize("i", range(6))
def test_single_scene_is_the_pair_scene_without_its_second_shape(i):
    pair, single = _clip_spec(5, i, "pair"), _clip_spec(5, i, "single")
    assert caption_of(pair).startswith(caption_of(single) + " while a ")
    assert caption_of(single).split()[4] == list(DIRECTIONS)[single["direction"]]
    fp, fs = render(pair, 48, 6), render(single, 48, 6)
    # Every colour has a channel >= 150, out of the background's reach (<= ~130): exact matches are shapes.
    assert _exact(fp, pair["colour2"]).sum() > 0 and _exact(fs, single["colour2"]).sum() == 0
    # The main shape is drawn last, at the same place in both scenes; the rest is the same background.
    assert np.array_equal(_exact(fp, pair["colour"]), _exact(fs, single["colour"]))
    second = _exact(fp, pair["colour2"])
    assert np.array_equal(fp[~second], fs[~second])


def test_generate_records_the_scene_and_refuses_unknown_ones(tmp_path):
    meta = generate(str(tmp_path), 2, seed=1, size=32, num_frames=4, scene="single", workers=1)
    assert meta["scene"] == "single"
    rec = json.loads(open(tmp_path / "train.jsonl").readline())
    assert " while " not in rec["caption"] and len(rec["caption"].split()) == 5
    with pytest.raises(ValueError, match="scene must be one of"):
        generate(str(tmp_path / "x"), 2, scene="triple")


def test_val_gets_a_clip_from_two_clips_on_and_large_sets_split_as_before(tmp_path):
    meta = generate(str(tmp_path), 8, size=16, num_frames=2, workers=1)
    assert (meta["num_train"], meta["num_val"]) == (7, 1)
    assert [json.loads(ln)["path"] for ln in open(tmp_path / "val.jsonl")] == ["clips/000007.webm"]
    # The demo's 1000 clips (train.pipeline --clips): every 10th clip, as before.
    assert [i for i in range(1000) if _is_val(i, 1000)] == list(range(9, 1000, 10))
    with pytest.raises(ValueError, match="num must be >= 2"):
        generate(str(tmp_path / "one"), 1)


def test_cli_scene_option(tmp_path, capsys):
    from videoprism.cli import main

    with pytest.raises(SystemExit):
        main(["data", "synth", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--scene {pair,single}" in text and "'single': one moving shape" in text and "(default: pair)" in text
    assert main(["data", "synth", "--out", str(tmp_path), "--num", "2", "--scene", "single", "--size", "16",
                 "--frames", "2", "--workers", "1"]) == 0
    assert json.load(open(tmp_path / "synth.json"))["scene"] == "single"
    assert len(json.loads(open(tmp_path / "train.jsonl").readline())["caption"].split()) == 5
    with pytest.raises(SystemExit):  # argparse's one line, before the folder is made
        main(["data", "synth", "--out", str(tmp_path / "one"), "--num", "1"])
    assert "argument --num: must be >= 2" in capsys.readouterr().err


@pytest.mark.parametrize("workers", [1, 2])
def test_progress_bar_counts_every_clip_and_leaves_the_output_unchanged(tmp_path, capsys, workers):
    generate(str(tmp_path / "quiet"), 6, seed=2, size=16, num_frames=2, workers=workers)
    assert capsys.readouterr().err == ""
    generate(str(tmp_path / "bar"), 6, seed=2, size=16, num_frames=2, workers=workers, progress=True)
    err = capsys.readouterr().err
    assert "6/6" in err and "clip/s" in err
    for name in ("train.jsonl", "val.jsonl", "clips/000004.webm"):
        assert (tmp_path / "quiet" / name).read_bytes() == (tmp_path / "bar" / name).read_bytes()


def test_encoding_processes_are_capped_at_the_clips(tmp_path, monkeypatch):
    """`data synth --num 2 --workers 100000` forked 100000 encoding processes for 2 clips; it starts 2, and writes
    the clips one process writes."""
    from videoprism.data import index

    real, started = index.worker_pool, []

    def spy(workers):  # counted before any process is forked
        started.append(workers)
        if workers > 2:
            raise AssertionError(f"{workers} processes started for 2 clips")
        return real(workers)

    monkeypatch.setattr(index, "worker_pool", spy)
    generate(str(tmp_path / "many"), 2, seed=2, size=16, num_frames=2, workers=100000)
    generate(str(tmp_path / "one"), 2, seed=2, size=16, num_frames=2, workers=1)
    assert started == [2]
    for name in ("train.jsonl", "val.jsonl", "clips/000001.webm"):
        assert (tmp_path / "many" / name).read_bytes() == (tmp_path / "one" / name).read_bytes()


def test_prompt_files_hold_every_caption_of_each_class_and_no_other(tmp_path):
    """Each label's prompt templates, filled with a clip's class name, include the clip's own 'single' caption (and
    its main clause in a 'pair' scene), and filled with another class never do: the prompts speak the captions'
    words and a class differs from the others only in its own word. synth.json names the files and the classes."""
    meta = generate(str(tmp_path), 24, seed=3, size=16, num_frames=2, scene="single", workers=1)
    assert meta["classes"] == class_names()
    for label, rel in meta["prompts"].items():
        templates = open(tmp_path / rel).read().splitlines()
        assert templates == prompt_templates(label) and all(t.count("{}") == 1 for t in templates)
        assert len(templates) == len(set(templates))
        names = meta["classes"][label]
        for line in open(tmp_path / "train.jsonl"):
            rec = json.loads(line)
            filled = {c: {t.replace("{}", c) for t in templates} for c in names}
            own = names[rec["label"][label]]
            assert rec["caption"] in filled[own]
            assert not any(rec["caption"] in filled[c] for c in names if c != own)
        pair = caption_of(_clip_spec(3, 0, "pair")).split(" while ")[0]
        assert pair in filled[names[_clip_spec(3, 0, "pair")[label]]]
    with pytest.raises(ValueError, match="synthetic labels are colour, shape, direction"):
        prompt_templates("verb")


def test_a_rerun_cut_short_leaves_no_clip_cut_and_no_synth_json_of_other_clips(tmp_path, monkeypatch):
    """`data synth` over a folder it had filled, with other settings, stopped by a full disk at its second clip:
    the old synth.json stayed, naming the old settings over clips being replaced (the pipeline took such a folder
    as complete and trained on it), and the clip was cut under its own name. Now synth.json is gone until the
    folder is complete again, every clip is whole (the old one, here), and no temporary file is left."""
    import errno
    import os

    from videoprism.data import synth

    out = str(tmp_path)
    generate(out, 2, seed=0, size=16, num_frames=2, workers=1)
    clip = os.path.join(out, "clips", "000001.webm")
    old = open(clip, "rb").read()
    real_encode = synth.encode

    def full_at_second_clip(frames, path, codec, fps):
        real_encode(frames, path, codec, fps)
        if os.path.basename(path).startswith("000001"):
            with open(path, "r+b") as fh:
                fh.truncate(os.path.getsize(path) // 2)
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(synth, "encode", full_at_second_clip)
    with pytest.raises(OSError, match="No space left"):
        generate(out, 2, seed=1, size=16, num_frames=2, workers=1)
    assert not os.path.exists(os.path.join(out, "synth.json"))
    assert open(clip, "rb").read() == old
    assert sorted(os.listdir(os.path.join(out, "clips"))) == ["000000.webm", "000001.webm"]


def test_a_tokenizer_cut_by_a_full_disk_leaves_the_previous_one(tmp_path, full_disk):
    """train_spm (`data tokenizer`, `data synth`) wrote spm.model in place: a full disk mid-write left a cut
    model under the name ("could not parse ModelProto" at the next run) and the previous one lost."""
    import os

    from videoprism.data.text import Tokenizer, train_spm

    path = str(tmp_path / "spm.model")
    train_spm(["a red circle moves left", "a blue square moves up"], path)
    old = open(path, "rb").read()
    full_disk("spm.model")
    with pytest.raises(OSError, match="No space left"):
        train_spm(["a green star moves down"], path)
    assert open(path, "rb").read() == old and os.listdir(tmp_path) == ["spm.model"]
    assert Tokenizer(path).vocab_size > 3


def _encode_slowly_from_the_third_clip(monkeypatch, signum=None):
    """Clips 0 and 1 encode; the others' workers write half a clip and sleep (a long encode), the third's first
    sending `signum` to this process."""
    import os
    import time

    from videoprism.data import synth

    real_encode, parent = synth.encode, os.getpid()

    def slow(frames, path, codec, fps):  # in a worker
        if os.path.basename(path).startswith(("000000", "000001")):
            return real_encode(frames, path, codec, fps)
        with open(path, "wb") as fh:
            fh.write(b"half a clip")
        if signum and os.path.basename(path).startswith("000002"):
            os.kill(parent, signum)
        time.sleep(30)

    monkeypatch.setattr(synth, "encode", slow)


def _stopped_clean(tmp_path, started: float, children: set[int]) -> None:
    """Stopped at once, every encoding process dead within 10 s of the start (their encodes sleep 30 s), no temporary
    clip file and no synth.json left. `children`: child_pids() before generate."""
    import os
    import time

    assert time.monotonic() - started < 10  # not waiting for the 30 s encodes
    assert not still_running(children, within=started + 10 - time.monotonic())
    assert not [n for n in os.listdir(tmp_path / "clips") if n.endswith(".tmp")]
    assert not (tmp_path / "synth.json").exists()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_while_clips_encode_stops_at_once_leaving_no_process_or_temporary_file(tmp_path, capsys,
                                                                                                 monkeypatch, signum):
    """Ctrl-C while the encoding processes worked waited for every clip queued (the pool's shutdown), and SIGTERM
    ended `data synth` silently with its processes still encoding, orphaned. Now either stops at once with a line,
    the processes killed and the temporary files of the clips they were writing removed."""
    import time

    from videoprism.preemption import Preempted

    def unhandled(signum, frame):  # generate's own handler missing: a failure here, not the end of pytest
        raise AssertionError("the signal reached the test: generate handles none")

    _encode_slowly_from_the_third_clip(monkeypatch, signum)
    t, children = time.monotonic(), child_pids()
    before = signal.signal(signal.SIGTERM, unhandled)
    try:
        with pytest.raises(KeyboardInterrupt if signum == signal.SIGINT else Preempted) as stop:
            generate(str(tmp_path), 6, seed=0, size=16, num_frames=2, workers=2)
    finally:
        signal.signal(signal.SIGTERM, before)
    _stopped_clean(tmp_path, t, children)
    said = str(stop.value) if signum == signal.SIGINT else capsys.readouterr().err.strip().splitlines()[-1]
    assert said.endswith(f"{tmp_path} is incomplete (no synth.json, not all 6 clips): the same command writes it "
                         "again")
    if signum == signal.SIGTERM:
        assert said.startswith("SIGTERM: stopped; ") and stop.value.code == 128 + signal.SIGTERM
