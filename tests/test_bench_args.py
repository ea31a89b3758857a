"""The bench scripts' arguments: a bad one ends the run with one line naming the option, exit status 2, no
traceback, before anything is built or timed; good ones get through to the benchmark.

Most cases call the script's `main` in this process: a fresh `python -m bench.X` spends ~3 s importing torch, so one
run per script checks the command as a user runs it (the `__main__` exit status) and the rest stay fast.
"""
from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The first work of each script once its arguments are accepted (data: with and without --clips). A case that
# reaches one has let its argument through: it fails there instead of running a benchmark.
FIRST_WORK = {
    "encoder": ["bench.encoder.measure_peaks"],
    "token_ops": ["bench.token_ops.measure_peaks"],
    "train_step": ["bench.train_step.measure_peaks"],
    "attention": ["bench.attention.measure_peaks"],
    "checkpoint": ["videoprism.from_official"],
    "optimizer": ["videoprism.from_official"],
    "data": ["videoprism.data.manifest.read_source", "bench.data.default_clips"],
    "manifest": ["bench.manifest.write_manifest"],
}

BAD = [
    ("encoder", ["--model", "foo"], "--model"),
    ("encoder", ["--device", "gpu"], "--device"),
    ("encoder", ["--device", "cuda:99"], "--device"),
    ("encoder", ["--backends", "bogus"], "--backends"),
    ("encoder", ["--backends", "reference,"], "--backends"),
    ("encoder", ["--modes", "compiled"], "--modes"),
    ("encoder", ["--batch", "0"], "--batch"),
    ("encoder", ["--reps", "0"], "--reps"),
    ("encoder", ["--resolution", "100"], "--resolution"),
    ("token_ops", ["--models", "foo"], "--models"),
    ("token_ops", ["--stages", "stage3"], "--stages"),
    ("token_ops", ["--batch", "-1"], "--batch"),
    ("token_ops", ["--device", "cuda:99"], "--device"),
    ("train_step", ["--preset", "foo"], "--preset"),
    ("train_step", ["--frames", "abc"], "--frames"),
    ("train_step", ["--frames", "8,0"], "--frames"),
    ("train_step", ["--modes", "bogus"], "--modes"),
    ("train_step", ["--stages", "3"], "--stages"),
    ("train_step", ["--batch", "0"], "--batch"),
    ("checkpoint", ["--model", "foo"], "--model"),
    ("checkpoint", ["--model", "videoprism_v1_base"], "--model"),  # an encoder, not a video-text model
    ("checkpoint", ["--reps", "0"], "--reps"),
    ("checkpoint", ["--device", "cuda:99"], "--device"),
    ("data", ["--clips", "/nope"], "--clips"),
    ("data", ["--gpu-batches", "1,x"], "--gpu-batches"),
    ("data", ["--frames", "0"], "--frames"),
    ("data", ["--reps", "0"], "--reps"),
    ("attention", ["--modes", "bwd"], "--modes"),
    ("attention", ["--models", "foo"], "--models"),
    ("attention", ["--tiny", "--models", "base"], "--models"),
    ("attention", ["--tiny", "--batch", "2"], "--batch"),
    ("attention", ["--backends", "bogus"], "--backends"),
    ("attention", ["--batch", "0"], "--batch"),
    ("checkpoint", ["--dir", __file__ + "/ckpt"], "--dir"),  # under a file
    ("optimizer", ["--model", "videoprism_v1_base"], "--model"),  # an encoder, not a video-text model
    ("manifest", ["--lines", "0"], "--lines"),
    ("manifest", ["--reps", "x"], "--reps"),
    ("attention", ["--budget-s", "-1"], "--budget-s"),  # skipped every case, exit status 0
    ("train_step", ["--budget-s", "inf"], "--budget-s"),
    # --out into a folder or under a file: it failed at the first save, after the work, naming a temporary file.
    *[(name, ["--out", os.path.dirname(__file__)], "--out") for name in FIRST_WORK],
    *[(name, ["--out", __file__ + "/r.json"], "--out") for name in FIRST_WORK],
    *[pytest.param(name, ["--device", "cuda"], "--device", id=f"{name}-no-gpu",
                   marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is here"))
      for name in FIRST_WORK if name != "manifest"],  # a CPU benchmark: no --device
]


class ReachedWork(Exception):
    """Not a ValueError or OSError: run_command lets it through to the test."""


@pytest.fixture
def tripwire(monkeypatch):
    monkeypatch.delenv("VIDEOPRISM_TRACEBACK", raising=False)

    def arm(name: str):
        def reached(*args, **kwargs):
            raise ReachedWork(f"bench.{name} got past its arguments")

        for target in FIRST_WORK[name]:
            monkeypatch.setattr(target, reached)
        return importlib.import_module(f"bench.{name}")

    return arm


def _assert_one_line_error(rc, err: str, option: str):
    assert rc == 2, (rc, err)
    assert "Traceback" not in err, err
    errors = [ln for ln in err.splitlines() if "error: " in ln]  # argparse puts its usage lines first
    assert len(errors) == 1 and option in errors[0], err


@pytest.mark.parametrize("name, argv, option", BAD)
def test_bad_argument_one_line_exit_2(name, argv, option, tripwire, capsys):
    module = tripwire(name)
    try:
        rc = module.main(argv)
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    _assert_one_line_error(rc, capsys.readouterr().err, option)


@pytest.mark.parametrize("name, argv, option", [
    ("encoder", ["--model", "foo"], "--model"),
    ("token_ops", ["--stages", "stage3"], "--stages"),
    ("train_step", ["--modes", "bogus"], "--modes"),
    ("checkpoint", ["--model", "foo"], "--model"),
    ("data", ["--clips", "/nope"], "--clips"),  # a ValueError of the script, through run_command
    ("attention", ["--tiny", "--models", "base"], "--models"),
])
def test_bad_argument_as_a_user_runs_it(name, argv, option):
    env = {k: v for k, v in os.environ.items() if k != "VIDEOPRISM_TRACEBACK"}
    r = subprocess.run([sys.executable, "-m", f"bench.{name}", *argv], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    _assert_one_line_error(r.returncode, r.stderr, option)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is here")
def test_exp2_peak_without_a_gpu_is_one_line_exit_2(capsys):
    from bench import exp2_peak

    _assert_one_line_error(exp2_peak.main([]), capsys.readouterr().err, "needs a CUDA GPU")


@pytest.mark.parametrize("name, argv", [
    ("encoder", ["--device", "cpu", "--batch", "2", "--resolution", "36", "--backends", "reference,sdpa",
                 "--modes", "eager,compile"]),
    ("token_ops", ["--device", "cpu", "--models", "base", "--stages", "stage1,stage2", "--batch", "2"]),
    ("train_step", ["--preset", "tiny", "--frames", "8,4", "--modes", "eager,compiled", "--stages", "2,1",
                    "--profile"]),
    ("checkpoint", ["--model", "videoprism_lvt_v1_base", "--reps", "2"]),
    ("optimizer", ["--model", "videoprism_lvt_v1_large"]),
    ("data", ["--clips", "{tmp}", "--frames", "8", "--gpu-batches", "1,4"]),
    ("attention", ["--tiny", "--modes", "fwd,fwd+bwd", "--backends", "reference,triton"]),
    ("manifest", ["--lines", "10", "--reps", "1"]),
])
def test_good_arguments_get_to_the_benchmark(name, argv, tripwire, tmp_path):
    (tmp_path / "clips.jsonl").write_text("")
    module = tripwire(name)
    with pytest.raises(ReachedWork):
        module.main([a.format(tmp=tmp_path) for a in argv])


@pytest.mark.gpu
def test_device_timing_times_the_device_work_not_the_host():
    """device_timing replays a CUDA graph: a kernel that spins is timed as the spin alone (events around
    it, eagerly, are the oracle) though the host work around its launch (a 20 ms Python sleep, run
    at capture, not replayed) is longer; a function with a host sync cannot be captured and gives
    None, not a wrong time."""
    import time

    from bench.common import device_timing

    import statistics

    cycles = 4_000_000                       # ~2 ms at H100/H200 clocks
    torch.cuda._sleep(cycles)                # loads the kernel, raises the clocks
    spins = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        spins.append((start, end))
    torch.cuda.synchronize()
    spin_ms = statistics.median(a.elapsed_time(b) for a, b in spins)

    def call():
        time.sleep(0.02)
        torch.cuda._sleep(cycles)

    timing = device_timing(call, reps=5)
    ms = timing.median_ms if timing is not None else None
    assert ms is not None and 0.7 * spin_ms < ms < 1.3 * spin_ms < 20, (ms, spin_ms)
    x = torch.ones(4, device="cuda")
    stream = torch.cuda.current_stream()
    assert device_timing(lambda: x.sum().item(), reps=2) is None
    assert torch.cuda.current_stream() == stream   # the failed capture left the caller's stream current


def test_train_step_row_that_fails_is_listed_and_the_others_run(monkeypatch, tmp_path, capsys):
    """A row that raises (a compile error on a card no test ran on) is recorded in meta.skipped with its
    error; the rows after it still run and are saved."""
    import json

    from bench import train_step
    from bench.common import Timing

    calls = []

    def fake_row(stage, preset, frames, batch, mode, device, peak, reps, profile):
        calls.append((stage, mode))
        if (stage, mode) == (1, "compiled"):
            raise RuntimeError("InductorError: a kernel failed to compile\nmore lines")
        return Timing(10.0, 9.0, 11.0), dict(stage=stage, frames=frames, mode=mode), None

    monkeypatch.setattr(train_step, "bench_row", fake_row)
    monkeypatch.setattr(train_step, "measure_peaks", lambda device: {"matmul_tflops": 1.0, "copy_gbps": 1.0})
    out = tmp_path / "ts.json"
    assert train_step.main(["--preset", "tiny", "--frames", "8", "--modes", "eager,compiled", "--stages", "1,2",
                            "--out", str(out)]) in (0, None)
    assert calls == [(1, "eager"), (1, "compiled"), (2, "compiled"), (2, "eager")]
    saved = json.loads(out.read_text())
    assert [(r["stage"], r["mode"]) for r in saved["rows"]] == [(1, "eager"), (2, "compiled"), (2, "eager")]
    assert saved["meta"]["skipped"] == ["stage1 8 frames compiled: failed: RuntimeError: InductorError: a kernel "
                                        "failed to compile"]


def test_train_step_skips_a_row_that_would_end_past_the_budget_and_saves_whole_reports(monkeypatch, tmp_path):
    """--budget-s: a row starts only if the last row of its mode would still fit (a compiled row that starts
    just before the budget runs minutes past it and is killed by the caller's time box); each save
    carries the speed-ups and the skipped rows so far, not only the last."""
    import json
    import types

    from bench import train_step
    from bench.common import Timing

    clock, out = [0.0], tmp_path / "ts.json"
    monkeypatch.setattr(train_step, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    seconds = {(1, "eager"): 10, (1, "compiled"): 60, (2, "compiled"): 90, (2, "eager"): 15}
    calls = []

    def fake_row(stage, preset, frames, batch, mode, device, peak, reps, profile):
        calls.append((stage, mode))
        if calls[-1] == (2, "eager"):  # what a caller's time box would leave on disk at this point
            saved = json.loads(out.read_text())
            assert saved["rows"][1]["speedup_vs_eager"] == 2.0
            assert saved["meta"]["skipped"][0].startswith("stage2 8 frames compiled: over --budget-s 100")
        clock[0] += seconds[(stage, mode)]
        return Timing(20.0 if mode == "eager" else 10.0, 9.0, 21.0), dict(stage=stage, frames=frames, mode=mode), None

    monkeypatch.setattr(train_step, "bench_row", fake_row)
    monkeypatch.setattr(train_step, "measure_peaks", lambda device: {"matmul_tflops": 1.0, "copy_gbps": 1.0})
    train_step.main(["--preset", "tiny", "--frames", "8", "--modes", "eager,compiled", "--budget-s", "100",
                     "--out", str(out)])
    # At 70 s the stage-2 compiled row (estimated at the stage-1 one's 60 s) would end at 130: skipped; eager (20 s) fits.
    assert calls == [(1, "eager"), (1, "compiled"), (2, "eager")]
    assert [(r["stage"], r["mode"]) for r in json.loads(out.read_text())["rows"]] == calls


def test_token_ops_runs_every_case_and_saves_its_rows(monkeypatch, tmp_path):
    """The whole loop, the timer stubbed (each function still runs once): every op and mode of each case
    reaches the JSON, with its ratio to the torch composition (the tripwire tests stop before the loop)."""
    import json

    from bench import token_ops
    from bench.common import Timing

    def timeit(fn, device, **kw):
        fn()
        return Timing(1.0, 0.9, 1.1)

    monkeypatch.setattr(token_ops, "timeit", timeit)
    monkeypatch.setattr(token_ops, "measure_peaks", lambda device: {"matmul_tflops": 1.0, "copy_gbps": 100.0})
    out = tmp_path / "token_ops.json"
    assert token_ops.main(["--device", "cpu", "--models", "base", "--stages", "stage1,stage2", "--batch", "1",
                           "--out", str(out)]) in (0, None)
    rows = [r for r in json.loads(out.read_text())["rows"] if r["model"] == "base"]
    for stage in ("stage1", "stage2"):
        got = {(r["op"], r["mode"]) for r in rows if r["stage"] == stage}
        assert got == {("patchify", "fwd")} | {(op, m) for op in ("gather", "scatter", "shuffle")
                                               for m in ("fwd", "bwd", "fwd+bwd")}, stage
    assert all(r["x_torch"] == 1.0 for r in rows)
    assert all(r["pct_same_copy"] == 100.0 for r in rows if "copy_ms" in r)  # the stub times both at 1 ms
    assert {r["op"] for r in rows if "copy_ms" in r} == {"patchify", "gather", "scatter", "shuffle"}
    copy = token_ops.same_bytes_copy(4096, torch.device("cpu"))
    dst = copy()
    assert dst.numel() * dst.element_size() * 2 == 4096  # read + written: the bytes of the op it stands by


def test_default_results_are_named_by_device_kind():
    """A GPU run's JSON goes where the committed GPU results are, never over the CPU ones."""
    from bench.common import results_path

    results = os.path.join(ROOT, "bench", "results")
    assert results_path("train_step", torch.device("cuda")) == os.path.join(results, "train_step_gpu.json")
    assert results_path("train_step", torch.device("cpu")) == os.path.join(results, "train_step_cpu.json")
    assert results_path("attention", torch.device("cpu"), "_tiny") == os.path.join(results, "attention_cpu_tiny.json")


def test_data_method_that_fails_is_a_row_and_the_others_run(monkeypatch, tmp_path):
    """A decoder that raises on a clip (NVDEC refusing a profile, a B-frame stream DALI mishandles) is recorded
    as an error row for that clip and method; every other row is measured and the JSON is written."""
    import json

    pytest.importorskip("av")
    from bench import data

    clips = tmp_path / "clips"
    data.write_clips(str(clips), frames=8, hd=False)
    monkeypatch.setattr(data, "pyav_seek", lambda *a: (_ for _ in ()).throw(RuntimeError("seek refused\ndetail")))
    out = tmp_path / "data.json"
    assert data.main(["--clips", str(clips), "--frames", "8", "--reps", "1", "--out", str(out)]) in (0, None)
    rows = json.loads(out.read_text())["rows"]
    failed = [r for r in rows if r["method"] == "pyav-seek"]
    assert len(failed) == 4 and all(r["error"] == "seek refused" and "ms" not in r for r in failed)
    ok = [r for r in rows if r["method"] != "pyav-seek"]
    assert {r["method"] for r in ok} >= {"videoprism-pyav", "pyav-decode-all"} and all(r["ms"] > 0 for r in ok)
