"""`videoprism data index` and `synth` through the `videoprism` command: clean manifest and rejects report."""
from __future__ import annotations

import json
import math
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest

from videoprism.cli import main
from videoprism.data.manifest import read_manifest
from .conftest import child_pids, still_running
from .test_data import make_bad_files, write_clip, write_shard


def run(argv):
    return main(argv)  # the `videoprism` command, errors as one line and exit status 2


def test_synth_then_index_keeps_good_files_and_reports_every_bad_one(tmp_path):
    d = str(tmp_path)
    assert run(["data", "synth", "--out", d, "--num", "10", "--size", "48", "--frames", "8", "--workers", "1"]) == 0
    write_clip(os.path.join(d, "g.mp4"), 40)
    bad = make_bad_files(d, os.path.join(d, "g.mp4"))
    recs = [json.loads(line) for line in open(os.path.join(d, "train.jsonl"))]
    recs += [{"path": os.path.relpath(p, d), "caption": k} for k, p in bad.items()]
    with open(os.path.join(d, "all.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs)
        f.write('{"path": "x.webm", "caption": \n')
    out = os.path.join(d, "clean", "clean.jsonl")
    assert run(["data", "index", os.path.join(d, "all.jsonl"), "--out", out, "--min-frames", "8", "--workers", "2",
                "--quiet"]) == 0
    clean, rejects = read_manifest(out)
    assert not rejects and len(clean) == 9
    assert all(s.probe["codec"] == "vp9" and s.probe["frames"] == 8 and s.probe["width"] == 48 for s in clean)
    assert all(os.path.isfile(s.path) for s in clean)  # relative paths re-based on the clean manifest's folder
    report = [json.loads(line) for line in open(os.path.join(d, "clean", "clean.rejects.jsonl"))]
    reasons = {r["path"]: r["reason"] for r in report}
    assert len(report) == len(bad) + 1 and "bad JSON" in reasons[os.path.join(d, "all.jsonl") + ":16"]
    for kind, path in bad.items():
        assert kind in reasons[path], (kind, reasons)


def test_index_rejects_wrong_arguments(tmp_path, capsys):
    assert run(["data", "index", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "c.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run(["data", "synth", "--out", str(tmp_path), "--num", "0"])


def test_index_of_an_all_bad_manifest_still_writes_the_report(tmp_path, capsys):
    m = tmp_path / "bad.jsonl"
    m.write_text('{"path": "a.mp4", "caption": ""}\n{"caption": "no path"}\nnot json\n')
    out = str(tmp_path / "clean.jsonl")
    # `validate` is DESIGN 7's other name for the command: the same parser and behaviour.
    assert run(["data", "validate", str(m), "--out", out, "--quiet"]) == 2
    assert "no usable sample" in capsys.readouterr().err
    report = [json.loads(line) for line in open(str(tmp_path / "clean.rejects.jsonl"))]
    assert [r["path"] for r in report] == [f"{m}:{n}" for n in (1, 2, 3)] and all(r["reason"] for r in report)


def test_index_and_pack_say_names_with_control_characters_escaped(tmp_path, capsys):
    """A folder named "x\\nerror: forged\\x1b[31m" was said raw in `data index`'s and `data pack`'s summaries and
    in the error of a manifest without a usable sample: a forged `error: forged` line, in red. Each is escaped, one
    line."""
    d = tmp_path / "x\nerror: forged\x1b[31m"
    d.mkdir()
    write_clip(str(d / "g.mp4"), 12)
    (d / "m.jsonl").write_text('{"path": "g.mp4", "caption": "a clip"}\n')
    (d / "bad.jsonl").write_text("not json\n")
    assert run(["data", "index", str(d / "m.jsonl"), "--out", str(d / "c.jsonl"), "--workers", "1", "--quiet"]) == 0
    assert run(["data", "pack", str(d / "c.jsonl"), "--quiet"]) == 0
    assert run(["data", "index", str(d / "bad.jsonl"), "--out", str(d / "b.jsonl"), "--quiet"]) == 2
    said = capsys.readouterr()
    shown = f"{tmp_path}/x\\nerror: forged\\x1b[31m"
    out, err = said.out.splitlines(), said.err.splitlines()
    assert out[0] == f"1 of 1 samples kept -> {shown}/c.jsonl (packed: {shown}/c.jsonl.pack); 0 rejected -> " \
                     f"{shown}/c.rejects.jsonl", out
    assert out[1].startswith("packed 1 samples ") and out[1].endswith(f"-> {shown}/c.jsonl.pack"), out
    assert len(out) == 3 and out[2].startswith(f"0 of 1 samples kept -> {shown}/b.jsonl;"), out
    assert err == [f"error: no usable sample in {shown}/bad.jsonl; the reasons are in {shown}/b.rejects.jsonl"]
    assert "\x1b" not in said.out + said.err


def test_index_keeps_video_only_lines_and_says_how_many(tmp_path, capsys):
    """A decodable clip without a caption is clean (stage 2 and probes read it): kept without a caption and counted;
    a reader that needs captions then skips it as a bad line."""
    write_clip(str(tmp_path / "g.mp4"), 12)
    m = tmp_path / "m.jsonl"
    m.write_text('{"path": "g.mp4", "caption": "a clip"}\n{"path": "g.mp4", "label": 2}\n{"path": "missing.mp4"}\n')
    out = str(tmp_path / "clean.jsonl")
    assert run(["data", "index", str(m), "--out", out, "--workers", "1", "--quiet"]) == 0
    said = capsys.readouterr().out
    assert "2 of 3 samples kept" in said and "(1 of them video-only, without a caption" in said
    lines = [json.loads(x) for x in open(out)]
    assert [x.get("caption") for x in lines] == ["a clip", None] and "caption" not in lines[1]
    assert lines[1]["label"] == 2
    video_only, _ = read_manifest(out, captions=False)
    assert len(video_only) == 2 and video_only.uncaptioned == 1
    captioned, rejects = read_manifest(out, max_bad_share=0.5)
    assert len(captioned) == 1 and rejects == [(f"{out}:2", rejects[0][1])] and "no caption" in rejects[0][1]
    report = [json.loads(x) for x in open(tmp_path / "clean.rejects.jsonl")]
    assert [r["path"] for r in report] == [str(tmp_path / "missing.mp4")]
    # --require-captions: rejected as a reader that needs captions rejects them, so the pack serves such readers.
    strict = str(tmp_path / "strict.jsonl")
    assert run(["data", "index", str(m), "--out", strict, "--workers", "1", "--quiet", "--require-captions"]) == 0
    assert [json.loads(x)["caption"] for x in open(strict)] == ["a clip"]
    report = [json.loads(x) for x in open(tmp_path / "strict.rejects.jsonl")]
    assert [r["path"] for r in report] == [f"{m}:2", f"{m}:3"] and "no caption" in report[0]["reason"]
    capsys.readouterr()
    assert read_manifest(strict)[0]._pack is not None and capsys.readouterr().err == ""


def test_a_nan_field_of_the_source_is_null_in_the_clean_manifest(tmp_path):
    """Python's json reads `NaN` (a manifest written by json.dumps of a row with a missing score) and wrote it back
    into the clean manifest, which is then no JSON: JSON.parse and serde_json refuse the line. It is null there."""
    write_clip(str(tmp_path / "g.mp4"), 12)
    m = tmp_path / "m.jsonl"
    m.write_text('{"path": "g.mp4", "caption": "a clip", "score": NaN, "extra": [1.5, Infinity]}\n')
    out = str(tmp_path / "clean.jsonl")
    assert run(["data", "index", str(m), "--out", out, "--workers", "1", "--quiet"]) == 0

    def refuse(name):
        raise ValueError(f"{name} is no JSON")

    (rec,) = [json.loads(line, parse_constant=refuse) for line in open(out)]
    assert rec["score"] is None and rec["extra"] == [1.5, None] and rec["caption"] == "a clip"
    assert len(read_manifest(out)[0]) == 1


class SlowSubmit(ProcessPoolExecutor):
    """A pool whose jobs trickle in, so a worker can die while the rest are being submitted."""

    def submit(self, *args, **kwargs):
        time.sleep(0.05)
        return super().submit(*args, **kwargs)


@pytest.mark.skipif(multiprocessing.get_start_method() != "fork", reason="the crash is injected into forked workers")
@pytest.mark.parametrize("submission", ["at_once", "trickling"])
def test_files_that_crash_the_decoder_are_rejected_and_the_others_kept(tmp_path, monkeypatch, submission):
    """A decoder segfault kills its worker and breaks the whole process pool (also while jobs
    are still being submitted): the index pins each crash on its file and still probes every
    other file."""
    from videoprism.data import index

    if submission == "trickling":
        monkeypatch.setattr(index, "ProcessPoolExecutor", SlowSubmit)
    d = str(tmp_path)
    assert run(["data", "synth", "--out", d, "--num", "12", "--size", "32", "--frames", "4", "--workers", "1"]) == 0
    manifest = os.path.join(d, "train.jsonl")
    names = [json.loads(line)["path"] for line in open(manifest)]
    victims = {os.path.basename(names[1]), os.path.basename(names[6])}
    assert run(["data", "index", manifest, "--out", os.path.join(d, "ok.jsonl"), "--workers", "3", "--quiet"]) == 0
    real = index.probe

    def crashing(sample, **kw):
        if os.path.basename(sample.path) in victims:
            os.kill(os.getpid(), signal.SIGKILL)  # as a segfault or the OOM killer would end it
        return real(sample, **kw)

    monkeypatch.setattr(index, "probe", crashing)
    out = os.path.join(d, "clean.jsonl")
    assert run(["data", "index", manifest, "--out", out, "--workers", "3", "--quiet"]) == 0
    expected = [line for line in open(os.path.join(d, "ok.jsonl")) if os.path.basename(json.loads(line)["path"]) not in victims]
    assert open(out).readlines() == expected
    report = [json.loads(line) for line in open(os.path.join(d, "clean.rejects.jsonl"))]
    assert sorted(os.path.basename(r["path"]) for r in report) == sorted(victims)
    assert all("crashed" in r["reason"] for r in report)


@pytest.mark.skipif(multiprocessing.get_start_method() != "fork", reason="the fault is injected into forked workers")
def test_workers_that_die_before_any_file_stop_the_index_with_a_message(tmp_path, monkeypatch, capsys):
    from videoprism.data import index

    d = str(tmp_path)
    assert run(["data", "synth", "--out", d, "--num", "4", "--size", "32", "--frames", "4", "--workers", "1"]) == 0
    monkeypatch.setattr(index, "_init_worker", lambda started: os._exit(1))
    assert run(["data", "index", os.path.join(d, "train.jsonl"), "--out", os.path.join(d, "c.jsonl"), "--quiet"]) == 2
    assert "died before they started on any file" in capsys.readouterr().err


def _sigterm_self() -> str:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(20)  # a worker that outlives SIGTERM returns, and the test fails
    return "outlived SIGTERM"


@pytest.mark.skipif(multiprocessing.get_start_method() != "fork", reason="the parent's handler reaches forked workers")
def test_a_probe_worker_ends_on_sigterm_under_the_indexs_own_handler():
    """A broken pool ends its other workers by SIGTERM and, from Python 3.12, holds the lock `submit` takes until
    they are gone: workers that ignored SIGTERM, or ran the index's own handler (inherited through fork), hung
    `data index` at the first file that crashed its worker. Here under that handler, as `data index` runs."""
    from concurrent.futures.process import BrokenProcessPool

    from videoprism.data import index
    from videoprism.preemption import Preempted, stopping

    t = time.monotonic()
    with stopping(True, lambda signum: Preempted(signum, None, None)), index.worker_pool(1) as pool, \
            pytest.raises(BrokenProcessPool):
        pool.submit(_sigterm_self).result()
    assert time.monotonic() - t < 15


_SIGTERM_AT_FORK: list[int] = []  # armed: a forked child SIGTERMs itself in its after-fork callbacks


def _sigterm_in_an_after_fork_callback() -> None:
    if _SIGTERM_AT_FORK:
        os.kill(os.getpid(), signal.SIGTERM)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_sigterm_in_an_after_fork_callback)


@pytest.mark.skipif(multiprocessing.get_start_method() != "fork", reason="the signal is sent in a forked worker")
def test_a_sigterm_that_reaches_a_probe_worker_as_it_forks_ends_it(tmp_path, monkeypatch):
    """A broken pool SIGTERMs its other workers, one of them perhaps still forking. Before its initializer the
    worker had the index's handler, whose exception Python drops when it comes inside an after-fork callback
    (threading's): the worker lived on, and Python 3.12's pool waited for it forever (3 of 5 runs of 100-400 pools
    with a crash hung under Python 3.12.1). Here the SIGTERM comes in such a callback: it ends the worker."""
    from concurrent.futures.process import BrokenProcessPool
    from types import SimpleNamespace

    from videoprism.data import index
    from videoprism.preemption import Preempted, stopping

    monkeypatch.setattr(index, "probe", lambda sample, **kw: {"survived": "SIGTERM"})
    (tmp_path / "f").write_bytes(b"")
    _SIGTERM_AT_FORK.append(1)
    try:
        with stopping(True, lambda signum: Preempted(signum, None, None)), index.worker_pool(1) as pool, \
                pytest.raises(BrokenProcessPool):
            job = (0, SimpleNamespace(path=str(tmp_path / "f")), 1, False)
            index.submit(pool, index._probe_job, job).result(timeout=120)
    finally:
        _SIGTERM_AT_FORK.clear()


_SIGNAL_AFTER_FORK: list[int] = []  # armed: the parent sends itself this signal in its after-fork callbacks


def _signal_in_a_parents_after_fork_callback() -> None:
    if _SIGNAL_AFTER_FORK:
        os.kill(os.getpid(), _SIGNAL_AFTER_FORK.pop())


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_parent=_signal_in_a_parents_after_fork_callback)


@pytest.mark.skipif(multiprocessing.get_start_method() != "fork", reason="the signal comes as the pool forks")
@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGINT])
def test_a_stop_or_ctrl_c_as_the_probe_pool_forks_stops_the_index(signum):
    """A notice (SIGTERM from another thread's mask, SLURM's SIGUSR1) or Ctrl-C whose handler ran in an after-fork
    callback of the parent (logging's lock release) was dropped there ("Exception ignored in _releaseLock"): a
    SIGTERM as `data index` started its pool ran the whole index, status 0. Held back over the fork, it stops."""
    from videoprism.data import index
    from videoprism.preemption import Preempted, stopping

    pids, children = [], child_pids()
    _SIGNAL_AFTER_FORK.append(signum)
    try:
        with pytest.raises(Preempted if signum != signal.SIGINT else KeyboardInterrupt), \
                stopping(True, lambda s: Preempted(s, None, None)), index.worker_pool(1) as pool:
            index.submit(pool, os.getpid).result(timeout=120)
            pids = list(pool._processes)
    finally:
        _SIGNAL_AFTER_FORK.clear()
    assert not pids  # the signal came before the job's result
    assert not still_running(children, within=10)  # the pool's worker killed, not left running


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs the ffmpeg command line to make a VFR clip")
def test_a_variable_frame_rate_clip_is_planned_from_its_timestamps(tmp_path):
    """A clean manifest's frame plan (dali_pipeline.clip_plan) puts frame i at i / fps; for a variable frame rate
    (24 frames in [0, 1) s, 24 in [1, 5), 24 in [5, 6)) that took a window's frames from past its end. `index`
    marks such a clip (`cfr` false), and its plan comes from its timestamps, as PyAV's does; a constant-rate clip
    keeps the plan from its probe fields."""
    from videoprism.data.dali_pipeline import clip_plan
    from videoprism.data.decode import PyAVClip

    steps = "if(lt(N,24),N/24/TB,if(lt(N,48),(1+(N-24)/6)/TB,(5+(N-48)/24)/TB))"
    for name, vf in (("vfr.webm", [f"setpts='{steps}'", "-fps_mode", "vfr"]), ("cfr.webm", [])):
        subprocess.run(["ffmpeg", "-y", "-loglevel", "error", "-f", "lavfi", "-i",
                        "testsrc2=size=64x48:rate=24:duration=3", *(["-vf", *vf[:1], *vf[1:]] if vf else []),
                        "-c:v", "libvpx-vp9", "-deadline", "realtime", str(tmp_path / name)], check=True)
    windows = {"vfr.webm": [(None, None), (1.0, 5.0), (0.5, 5.5), (4.0, None)],
               "cfr.webm": [(None, None), (0.5, 2.5), (1.0, None)]}
    recs = [{"path": name, "start": a, "end": b} for name, spans in windows.items() for a, b in spans]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if v is not None}) + "\n"
                                              for r in recs))
    assert run(["data", "index", str(tmp_path / "m.jsonl"), "--out", str(tmp_path / "clean.jsonl"), "--workers", "1",
                "--quiet"]) == 0
    clean, rejects = read_manifest(str(tmp_path / "clean.jsonl"), captions=False)
    assert not rejects and len(clean) == len(recs)
    assert [s.probe["cfr"] for s in clean] == [os.path.basename(s.path) == "cfr.webm" for s in clean]
    for s in clean:
        with PyAVClip(s.path) as clip:
            want = clip.sample_indices(8, s.start, s.end)
        assert clip_plan(s, 8)[1] == want, (s.path, s.start, s.end)


def test_an_ntsc_clips_window_starting_on_a_frame_is_planned_as_pyav_plans_it(tmp_path):
    """A clean manifest's constant-rate plan (dali_pipeline.clip_plan) of a 30000/1001 clip whose window starts on a
    frame: `index` wrote fps rounded to 29.97003 (3e-8 fast), and from frame ~33 on the plan took the frame after
    the start (PyAV's timestamps: the start's own frame). The manifest now holds the rate's double."""
    from fractions import Fraction

    from videoprism.data.dali_pipeline import clip_plan
    from videoprism.data.decode import PyAVClip
    from videoprism.data.synth import encode

    rate = Fraction(30000, 1001)
    encode(np.zeros((60, 16, 16, 3), np.uint8), str(tmp_path / "ntsc.mp4"), "h264", fps=rate)
    recs = [{"path": "ntsc.mp4", "start": float(k / rate)} for k in (40, 50)]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert run(["data", "index", str(tmp_path / "m.jsonl"), "--out", str(tmp_path / "clean.jsonl"), "--workers", "1",
                "--quiet"]) == 0
    clean, _ = read_manifest(str(tmp_path / "clean.jsonl"), captions=False)
    assert [s.probe["fps"] for s in clean] == [float(rate)] * 2
    for s in clean:
        with PyAVClip(s.path) as clip:
            want = clip.sample_indices(8, s.start, s.end)
        assert want[0] == round(s.start * rate)
        for fps in (s.probe["fps"], round(s.probe["fps"], 6)):  # as index writes it, and as it wrote it
            planned = type(s)(**{**s.__dict__, "probe": {**s.probe, "fps": fps}})
            assert clip_plan(planned, 8)[1] == want, (fps, s.start)


@pytest.mark.parametrize("rate", ["30000/1001", "24000/1001", "60000/1001", "25", "60"])
def test_a_10_hour_clips_frame_plan_is_exact(rate):
    """Windows over a 10-hour constant-rate clip (2.2M frames at 60 fps): each planned frame is the one exact
    rational arithmetic puts there, for windows starting and ending on a frame or between two, with fps as
    `index` writes it and as it wrote it (6 decimals: every NTSC window on a frame was planned a frame late)."""
    from fractions import Fraction

    from videoprism.data.dali_pipeline import clip_plan
    from videoprism.data.manifest import Sample
    from videoprism.data.transforms import uniform_indices

    rate = Fraction(rate)
    n = int(10 * 3600 * rate)
    rng = np.random.default_rng(0)
    for fps in (float(rate), round(float(rate), 6)):
        for k in [*map(int, rng.integers(n - 10**5, n - 100, 50)), n - 100]:
            for shift in (0.0, float(rng.random())):  # on frame k's time, or between it and the next
                start, end = float((k + shift) / rate), float((k + 64 + shift) / rate)
                s = Sample(path="x.mp4", caption=None, start=start, end=end,
                           probe={"codec": "h264", "frames": n, "fps": fps, "width": 8, "height": 8, "cfr": True})
                lo, hi = (math.ceil(Fraction(t) * rate - Fraction(1, 10**6)) for t in (start, end))
                assert clip_plan(s, 16)[1] == [lo + i for i in uniform_indices(hi - lo, 16)], (fps, k, shift)


def test_data_tokenizer_trains_a_model_that_covers_the_captions(tmp_path, capsys):
    """`videoprism data tokenizer`: a SentencePiece model of a manifest's captions with the text encoder's ids (pad
    0, eos 1, unk 2): every caption encodes without an unknown piece, within --vocab-size; video-only lines are
    left out, and a manifest without captions is refused."""
    from videoprism.data.text import Tokenizer

    d = tmp_path / "synth"
    assert run(["data", "synth", "--out", str(d), "--num", "12", "--size", "32", "--frames", "4", "--workers", "1",
                "--quiet"]) == 0
    recs = [json.loads(line) for line in open(d / "train.jsonl")]
    (d / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [*recs, {"path": recs[0]["path"]}]))
    out = tmp_path / "tok" / "spm.model"
    assert run(["data", "tokenizer", str(d / "mixed.jsonl"), "--out", str(out), "--vocab-size", "60"]) == 0
    assert f"wrote {out}: " in capsys.readouterr().out
    tok = Tokenizer(out)
    assert tok.vocab_size <= 60 and (tok._sp.pad_id(), tok._sp.eos_id(), tok._sp.unk_id()) == (0, 1, 2)
    for r in recs:
        ids = tok.encode_one(r["caption"])
        assert ids and 2 not in ids and max(ids) < tok.vocab_size
    (d / "none.jsonl").write_text(json.dumps({"path": recs[0]["path"]}) + "\n")
    assert run(["data", "tokenizer", str(d / "none.jsonl"), "--out", str(out)]) == 2
    assert "holds no caption to train a tokenizer on" in capsys.readouterr().err


def test_data_commands_never_write_over_what_they_read(tmp_path, capsys):
    """`data index --out M` or `--rejects M` replaced the manifest M it read (rejected lines lost), `--rejects` =
    `--out` left a report that said one reject and held none, `--out X.tar` wrote a JSONL file every reader took
    for a shard, `data tokenizer M --out M` replaced the manifest with the model: each is one line, nothing
    written."""
    d = str(tmp_path)
    assert run(["data", "synth", "--out", d, "--num", "2", "--size", "32", "--frames", "2", "--workers", "1",
                "--quiet"]) == 0
    m = os.path.join(d, "train.jsonl")
    before = open(m).read()
    for argv, needle in ((["--out", m], f"--out {m}: is the input source {m}"),
                         (["--out", f"{d}/c.jsonl", "--rejects", m], f"--rejects {m}: is the input source {m}"),
                         (["--out", f"{d}/c.jsonl", "--rejects", f"{d}/c.jsonl"], "is --out: the report and the "
                                                                                  "clean manifest need a file each"),
                         (["--out", f"{d}/c.tar"], "the clean manifest must end in .jsonl")):
        capsys.readouterr()
        assert run(["data", "index", m, "--quiet", *argv]) == 2, argv
        assert needle in capsys.readouterr().err, argv
    assert run(["data", "tokenizer", m, "--out", m]) == 2
    assert f"--out {m}: is the input source {m}" in capsys.readouterr().err
    assert open(m).read() == before and not os.path.exists(f"{d}/c.jsonl")


def test_data_tokenizer_vocabulary_and_long_captions(tmp_path, capsys):
    """A --vocab-size below what the captions' characters need was SentencePiece's traceback; a caption over 4192
    bytes was left out of the training without a word (its words came out <unk>)."""
    from videoprism.data.text import Tokenizer

    m = tmp_path / "m.jsonl"
    long = "zebra quagga " * 400  # 5200 bytes
    m.write_text(json.dumps({"path": "a.webm", "caption": "a red circle"}) + "\n"
                 + json.dumps({"path": "b.webm", "caption": long}) + "\n")
    assert run(["data", "tokenizer", str(m), "--out", str(tmp_path / "s.model"), "--vocab-size", "4"]) == 2
    assert "too small for these captions: their characters and the special pieces need" in capsys.readouterr().err
    for n in ("1", "2"):  # below the special pieces: SentencePiece's RuntimeError ("INTERNAL: ... unk_id"), a traceback
        with pytest.raises(SystemExit) as e:
            run(["data", "tokenizer", str(m), "--out", str(tmp_path / "s.model"), "--vocab-size", n])
        assert e.value.code == 2 and f"--vocab-size: must be >= 3, got {n}" in capsys.readouterr().err
    assert run(["data", "tokenizer", str(m), "--out", str(tmp_path / "s.model"), "--vocab-size", "40"]) == 0
    tok = Tokenizer(str(tmp_path / "s.model"))
    ids, pads = tok(["zebra quagga"])
    assert 2 not in ids[0][pads[0] == 0].tolist()  # no <unk> (id 2): the long caption's letters were learned


def test_synth_options_are_checked_before_its_folder_is_made(tmp_path, capsys):
    for argv, needle in ((["--seed", "-5"], "argument --seed: must be >= 0, got -5"),
                         (["--num", "1"], "argument --num: must be >= 2"),
                         (["--size", "17"], "argument --size: must be an even int >= 16")):
        with pytest.raises(SystemExit):
            main(["data", "synth", "--out", str(tmp_path / "out"), "--num", "3", *argv])
        assert needle in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _probe_that(real, log: str, crash=(), stop=None):
    """index.probe as `real`, that also appends each file it probes to `log`, kills its process on the files named
    in `crash` (as a decoder segfault does) and, on the file of `stop` = (name, journal, n, how), waits until the
    journal holds n results, writes its pid beside the log, then stops the index: "SIGKILL" kills it (the OOM
    killer, a lost node), "SIGTERM" signals the whole process group (a scheduler)."""
    def probe(sample, **kw):
        name = os.path.basename(sample.path)
        with open(log, "a") as f:
            f.write(name + "\n")
        if name in crash:
            os.kill(os.getpid(), signal.SIGKILL)
        if stop is not None and name == stop[0]:
            deadline = time.monotonic() + 30  # no journal (or a slow one): the test fails, but in seconds
            while _results_in(stop[1]) < stop[2] and time.monotonic() < deadline:
                time.sleep(0.01)
            with open(log + ".pid", "w") as f:
                f.write(str(os.getpid()))
            if stop[3] == "SIGKILL":
                os.kill(os.getppid(), signal.SIGKILL)
            else:
                os.killpg(os.getpgid(0), signal.SIGTERM)
            time.sleep(600)  # until the index ends this process (it waited for it: the test's timeout)
        return real(sample, **kw)

    return probe


def _results_in(journal: str) -> int:
    return open(journal, "rb").read().count(b"\n") - 1 if os.path.exists(journal) else 0


def _index_stopped_midway(spec: str) -> int:
    """A child process's `data index` with _probe_that's probe: spec is JSON [argv, log, crash, stop]."""
    from videoprism.data import index

    argv, log, crash, stop = json.loads(spec)
    index.probe = _probe_that(index.probe, log, crash, stop)
    return main(argv)


def _alive(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _bad_manifest(d: str) -> tuple[str, list[str]]:
    """10 synthetic clips, one bad file of each kind and a bad JSON line: (manifest, its files' base names)."""
    assert run(["data", "synth", "--out", d, "--num", "10", "--size", "32", "--frames", "4", "--workers", "1",
                "--quiet"]) == 0
    write_clip(os.path.join(d, "g.mp4"), 12)
    recs = [json.loads(line) for line in open(os.path.join(d, "train.jsonl"))]
    recs += [{"path": os.path.relpath(p, d), "caption": k} for k, p in make_bad_files(d, f"{d}/g.mp4").items()]
    manifest = os.path.join(d, "all.jsonl")
    with open(manifest, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs[:4])
        f.write('{"path": "x.webm", "caption": \n')
        f.writelines(json.dumps(r) + "\n" for r in recs[4:])
    return manifest, [os.path.basename(r["path"]) for r in recs]


@pytest.mark.skipif(multiprocessing.get_start_method() != "fork", reason="the faults are injected into forked workers")
@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_an_index_stopped_midway_goes_on_where_it_stopped(tmp_path, monkeypatch, capsys, how):
    """All the results were held in memory and written at the end: a kill at 95% lost the whole index. Each
    result is journaled as it comes; a run killed after 5 of 15 files (one of them crashing its decoder), its
    journal's last line cut as a kill mid-write cuts it, is continued by the same command: only the files not
    journaled are probed (another one crashing its decoder), and the clean manifest and rejects report are those of
    an uninterrupted run, byte for byte; the journal is then removed. SIGTERM (to the whole process group, as a
    scheduler sends it) stops the index with a line and status 143; after a SIGKILL no worker is left."""
    from videoprism.data import index

    d = str(tmp_path)
    manifest, names = _bad_manifest(d)
    crash = [names[1], names[8]]
    args, real = [manifest, "--workers", "1", "--quiet"], index.probe
    monkeypatch.setattr(index, "probe", _probe_that(real, f"{d}/ref.log", crash))
    assert run(["data", "index", *args, "--out", f"{d}/ref/clean.jsonl"]) == 0
    assert not os.path.exists(f"{d}/ref/clean.jsonl.journal")

    out, journal = f"{d}/run/clean.jsonl", f"{d}/run/clean.jsonl.journal"
    spec = json.dumps([["data", "index", *args, "--out", out], f"{d}/killed.log", crash, [names[5], journal, 5, how]])
    with open(f"{d}/child.err", "w") as err:  # not a pipe: a worker left behind would hold it open
        child = subprocess.run([sys.executable, "-c", "import sys; from tests.test_data_index import "
                                "_index_stopped_midway as f; sys.exit(f(sys.argv[1]))", spec], start_new_session=True,
                               cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), stderr=err,
                               timeout=120)
    said = open(f"{d}/child.err").read()
    assert child.returncode == (-9 if how == "SIGKILL" else 143), said
    if how == "SIGTERM":
        assert f"SIGTERM: stopped; 5 of 15 files probed, kept in {journal}: the same command goes on from there" in said
    worker = int(open(f"{d}/killed.log.pid").read())
    deadline = time.monotonic() + 10
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = _alive(worker)
    if left:
        os.kill(worker, signal.SIGKILL)
    assert not left  # its parent killed it, or Linux did when the parent died
    lines = open(journal, "rb").readlines()
    assert len(lines) == 1 + 5 and b"crashed" in lines[2]
    with open(journal, "wb") as f:
        f.writelines(lines[:-1] + [lines[-1][:len(lines[-1]) // 2]])  # killed in the middle of the 5th result

    monkeypatch.setattr(index, "probe", _probe_that(real, f"{d}/rerun.log", crash))
    capsys.readouterr()
    assert run(["data", "index", *args, "--out", out]) == 0
    assert f"{journal}: 4 of 15 files probed by an earlier run of this command are taken from it" \
        in capsys.readouterr().err
    assert set(open(f"{d}/rerun.log").read().split()) == set(names[4:])
    for name in ("clean.jsonl", "clean.rejects.jsonl"):
        assert open(f"{d}/run/{name}", "rb").read() == open(f"{d}/ref/{name}", "rb").read(), name
    assert "crashed" in open(f"{d}/run/clean.rejects.jsonl").read() and not os.path.exists(journal)


def _index(monkeypatch, capsys, argv, log, ctrl_c_at_the_end=False) -> tuple[int, str, list[str]]:
    """(status, stderr, files probed) of `data index argv`; `ctrl_c_at_the_end`: a Ctrl-C once every file is
    probed and journaled, before the clean manifest is written."""
    from videoprism.data import index

    def ctrl_c(*args):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        if ctrl_c_at_the_end:
            m.setattr(index, "_write", ctrl_c)
        m.setattr(index, "probe", _probe_that(index.probe, log))
        capsys.readouterr()
        status = run(["data", "index", *argv])
    probed = []
    if os.path.exists(log):
        probed = open(log).read().split()
        os.remove(log)
    return status, capsys.readouterr().err, probed


@pytest.mark.skipif(multiprocessing.get_start_method() != "fork", reason="the probes are counted in forked workers")
def test_a_journal_is_used_only_for_the_sources_and_options_it_was_written_for(tmp_path, monkeypatch, capsys):
    """A journal is tied to what it holds results of: a manifest touched but unchanged keeps it; another content,
    another --min-frames or a shard written again (the same sample names: only its stamp tells) is a note and every
    file probed again; a damaged line costs only its file, a cut last line too, and the lines after it are whole.
    Ctrl-C says how many files are kept and where."""
    d = str(tmp_path)
    assert run(["data", "synth", "--out", d, "--num", "10", "--size", "32", "--frames", "4", "--workers", "1",
                "--quiet"]) == 0
    write_clip(f"{d}/g.mp4", 12)
    manifest, out, log = f"{d}/train.jsonl", f"{d}/out/clean.jsonl", f"{d}/probed.log"
    names = [os.path.basename(json.loads(line)["path"]) for line in open(manifest)]
    journal = out + ".journal"
    argv = [manifest, "--out", out, "--workers", "1", "--quiet"]
    status, err, probed = _index(monkeypatch, capsys, argv, log, ctrl_c_at_the_end=True)
    assert status == 130 and probed == names
    assert f"interrupted: 9 of 9 files probed, kept in {journal}: the same command goes on from there" in err

    os.utime(manifest)  # touched: its content, which the results are of, is the same
    lines = open(journal, "rb").readlines()
    assert [json.loads(lines[i])[0] for i in (3, 9)] == [2, 8]
    with open(journal, "wb") as f:  # the third result damaged, the last one cut (a kill mid-write)
        f.writelines(lines[:3] + [b'[2, {"codec": \n'] + lines[4:-1] + [lines[-1][:10]])
    status, err, probed = _index(monkeypatch, capsys, argv, log, ctrl_c_at_the_end=True)
    taken = f"{journal}: %d of 9 files probed by an earlier run of this command are taken from it"
    assert taken % 7 + " (1 damaged line(s) skipped)" in err and probed == [names[2], names[8]]
    status, err, probed = _index(monkeypatch, capsys, argv, log, ctrl_c_at_the_end=True)
    assert taken % 9 + " (1 damaged line(s) skipped)" in err and probed == []  # the new lines are whole

    status, err, probed = _index(monkeypatch, capsys, [*argv, "--min-frames", "8"], log)
    assert f"note: {journal} ignored (written with --min-frames 1, this run has --min-frames 8): every file is " \
           "probed again" in err
    assert status == 2 and probed == names and not os.path.exists(journal)  # 4 frames each: all rejected

    _index(monkeypatch, capsys, argv, log, ctrl_c_at_the_end=True)
    recs = open(manifest).readlines()
    recs[3] = json.dumps({"path": "g.mp4", "caption": "a longer clip"}) + "\n"
    open(manifest, "w").writelines(recs)
    status, err, probed = _index(monkeypatch, capsys, argv, log)
    assert f"note: {journal} ignored ({os.path.abspath(manifest)} changed since it was written)" in err
    assert status == 0 and len(probed) == 9 and json.loads(open(out).readlines()[3])["frames"] == 12

    samples, _ = read_manifest(manifest)
    shard = f"{d}/shard-000.tar"
    write_shard(shard, samples)
    argv = [shard, "--out", out, "--workers", "1", "--quiet"]
    _index(monkeypatch, capsys, argv, log, ctrl_c_at_the_end=True)
    write_shard(shard, list(reversed(samples)))  # the 12-frame clip moves from the 4th key to the 6th
    status, err, probed = _index(monkeypatch, capsys, argv, log)
    assert f"note: {journal} ignored ({shard} changed since it was written)" in err
    assert status == 0 and len(probed) == 9
    assert [json.loads(line)["frames"] for line in open(out)] == [4] * 5 + [12] + [4] * 3


@pytest.mark.skipif(multiprocessing.get_start_method() != "fork", reason="the probes are counted in forked workers")
def test_a_file_replaced_between_two_runs_is_probed_again(tmp_path, monkeypatch, capsys):
    """A journal named its manifest, not the files it lists: a 4-frame clip replaced by a 12-frame one under the
    same path between an interrupted index and the same command again kept its first probe (frames=4, and every
    file taken from the journal). Each result holds the stamp of its file: the replaced file, one written over in
    place keeping its size and modification time (`cp -p` of a file of the same size: its change time tells) and
    one deleted since are probed again, with a note, the other 6 results taken from the journal."""
    d = str(tmp_path)
    assert run(["data", "synth", "--out", d, "--num", "10", "--size", "32", "--frames", "4", "--workers", "1",
                "--quiet"]) == 0
    manifest, out, log = f"{d}/train.jsonl", f"{d}/out/clean.jsonl", f"{d}/probed.log"
    paths = [os.path.join(d, json.loads(line)["path"]) for line in open(manifest)]
    names = [os.path.basename(p) for p in paths]
    argv = [manifest, "--out", out, "--workers", "1", "--quiet"]
    status, err, probed = _index(monkeypatch, capsys, argv, log, ctrl_c_at_the_end=True)
    assert status == 130 and probed == names

    write_clip(f"{d}/longer.mp4", 12)
    os.replace(f"{d}/longer.mp4", paths[3])  # another clip at the same path (FFmpeg reads its content, not its name)
    os.remove(paths[5])
    st, data = os.stat(paths[7]), open(paths[7], "rb").read()
    open(paths[7], "wb").write(data)
    os.utime(paths[7], ns=(st.st_atime_ns, st.st_mtime_ns))
    assert [os.stat(paths[7]).st_size, os.stat(paths[7]).st_mtime_ns] == [st.st_size, st.st_mtime_ns]
    status, err, probed = _index(monkeypatch, capsys, argv, log)
    assert f"{out}.journal: 6 of 9 files probed by an earlier run of this command are taken from it; 3 changed " \
           "since (replaced, written over or deleted): probed again" in err
    assert status == 0 and probed == [names[3], names[5], names[7]]
    assert [json.loads(line)["frames"] for line in open(out)] == [4] * 3 + [12] + [4] * 4
    report = [json.loads(line) for line in open(f"{d}/out/clean.rejects.jsonl")]
    assert [(r["path"], r["reason"]) for r in report] == [(paths[5], "missing file (no such path)")]


def test_two_indexes_of_one_out_are_refused(tmp_path, capsys):
    """Two commands writing one --out would each take the other's journal lines for their own."""
    from videoprism.data.journal import Journal

    m = tmp_path / "m.jsonl"
    m.write_text('{"path": "a.mp4", "caption": "a"}\n')
    out = str(tmp_path / "clean.jsonl")
    held = Journal(out + ".journal", {}, [])
    try:
        assert run(["data", "index", str(m), "--out", out, "--quiet"]) == 2
    finally:
        held.close()
    assert f"{out}.journal is held by another `videoprism data index` writing the same --out" in capsys.readouterr().err


def test_an_index_cut_by_a_full_disk_keeps_the_previous_report_and_manifest(tmp_path, full_disk, capsys):
    """The rejects report was written in place: a full disk mid-write left a cut report under its name (half its
    lines) and the previous one lost, and the clean manifest's out.tmp was left behind (its disk still used). Now
    both files stay as the last complete index wrote them, with no temporary file, and the journal goes on."""
    write_clip(str(tmp_path / "g.mp4"), 8)
    (tmp_path / "m.jsonl").write_text('{"path": "g.mp4", "caption": "a"}\n{"path": "nope.mp4", "caption": "b"}\n')
    argv = ["data", "index", str(tmp_path / "m.jsonl"), "--out", str(tmp_path / "c.jsonl"), "--workers", "1",
            "--quiet"]
    assert run(argv) == 0
    before = {n: (tmp_path / n).read_bytes() for n in ("c.jsonl", "c.rejects.jsonl")}
    full_disk("c.rejects.jsonl")
    assert run(argv) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert {n: (tmp_path / n).read_bytes() for n in before} == before
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
