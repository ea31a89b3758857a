"""The bench scripts' timing and ratios compare like with like: no GPU needed (the timers and the device are stubbed)."""
from __future__ import annotations

from bench.common import Report, Timing


def _row(report: Report, backend: str, ms: float, dev_ms: float | None = None) -> None:
    extra = {} if dev_ms is None else {"dev_ms": dev_ms}
    report.add(Timing(ms, ms, ms), model="base", axis="space", case="K=256", backend=backend, mode="fwd+bwd", **extra)


def test_attention_speedups_never_divide_a_call_time_by_a_device_time(capsys):
    """A backend whose call could not be captured in a CUDA graph has no dev_ms: its speed-up is of the call
    times of both rows (2x here), not its call time over triton's device time (which read 4x)."""
    from bench import attention

    report = Report("attention", "cpu")
    _row(report, "triton", 1.0, dev_ms=0.5)
    _row(report, "flex", 2.0)               # no CUDA graph: call time only
    _row(report, "sdpa", 1.5, dev_ms=1.0)   # both graphed: device times
    got = attention._speedups(report)[("base", "space", "K=256")]
    assert got == {"flex": (2.0, "call"), "sdpa": (2.0, "dev")}
    assert "flex 2.00x (call), sdpa 2.00x (dev)" in capsys.readouterr().out


def test_host_clock_timing_waits_for_the_warm_up_before_the_first_timed_call(monkeypatch):
    """timeit(host_clock=True) on CUDA: a warm-up call's queued device work must not land in the first timed call
    (with --reps 5 that call is the p80's neighbour)."""
    from bench import common

    log = []
    monkeypatch.setattr(common, "_sync", lambda device: log.append("sync"))
    common.timeit(lambda: log.append("call"), "cuda", warmup=2, reps=2, host_clock=True)
    assert log == ["call", "call", "sync", "call", "sync", "call", "sync"]


class _FakeCudaDevice:
    """torch.cuda.device without a GPU: records which device is current."""
    current = None

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        self.prev, _FakeCudaDevice.current = _FakeCudaDevice.current, self.device

    def __exit__(self, *exc):
        _FakeCudaDevice.current = self.prev


def test_cuda_timers_run_on_the_benchmarked_device(monkeypatch):
    """do_bench and the CUDA-graph timer record their events on the current device's stream: with --device cuda:1
    they must run with cuda:1 current, or they time cuda:0's idle stream (the host's launch time) instead of the
    work."""
    import torch
    import triton.testing

    from bench import common

    seen = []
    monkeypatch.setattr(torch.cuda, "device", _FakeCudaDevice)
    monkeypatch.setattr(triton.testing, "do_bench",
                        lambda fn, **kw: (seen.append(("do_bench", _FakeCudaDevice.current)), [1.0, 0.9, 1.1])[1])
    device = torch.device("cuda:1")
    assert common.timeit(lambda: None, device) == Timing(1.0, 0.9, 1.1)
    assert seen == [("do_bench", device)]
    monkeypatch.setattr(common, "_device_timing", raising=False,
                        value=lambda fn, reps: seen.append(("graph", _FakeCudaDevice.current)) or Timing(1.0, 0.9, 1.1))
    assert common.device_timing(lambda: None, device=device) == Timing(1.0, 0.9, 1.1)
    assert seen[1:] == [("graph", device)]


def test_commit_says_when_the_run_is_not_that_commits_code(tmp_path, monkeypatch):
    """The JSON's commit is HEAD's hash with "-dirty" when the code differs from it (a run on uncommitted changes
    is no measurement of HEAD); rewritten results under bench/results do not count."""
    import subprocess

    from bench import common

    monkeypatch.delenv("VIDEOPRISM_COMMIT", raising=False)
    monkeypatch.setattr(common, "__file__", str(tmp_path / "bench" / "common.py"))  # a checkout at tmp_path
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path)]
    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "kernel.py").write_text("x = 1\n")
    (tmp_path / "bench" / "results" / "r.json").write_text("{}\n")
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "c"], check=True)
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert common._commit() == head
    (tmp_path / "bench" / "results" / "r.json").write_text('{"rows": []}\n')
    assert common._commit() == head
    (tmp_path / "kernel.py").write_text("x = 2\n")
    assert common._commit() == head + "-dirty"
    monkeypatch.setenv("VIDEOPRISM_COMMIT", "abc1234")
    assert common._commit() == "abc1234"


def test_token_ops_ratio_to_torch_of_device_times_where_both_rows_have_them():
    """x_torch is of the eager calls; dev_x_torch of the CUDA-graph device times, where both rows have one (an
    eager call of a few tens of microseconds is the host's time: x_torch read 0.70 for a kernel 2.37x faster than
    the torch composition on the device)."""
    from bench.token_ops import torch_ratios

    rows = [dict(impl="triton", mode="fwd+bwd", ms=0.5, dev_ms=0.1), dict(impl="triton", mode="bwd", ms=0.3),
            dict(impl="torch", mode="fwd+bwd", ms=0.35, dev_ms=0.237), dict(impl="torch", mode="bwd", ms=0.6)]
    torch_ratios(rows)
    assert (rows[0]["x_torch"], rows[0]["dev_x_torch"]) == (0.7, 2.37)
    assert rows[1]["x_torch"] == 2.0 and "dev_x_torch" not in rows[1]
    assert (rows[2]["x_torch"], rows[2]["dev_x_torch"]) == (1.0, 1.0)


def test_attention_chart_draws_device_times_and_hatches_call_times(monkeypatch, tmp_path):
    """The chart's bars are the rows' device times (dev_ms) where they have one; a row with its call time only is
    drawn hatched and the axis says so (it plotted every row's call time, host dispatch included)."""
    import matplotlib.axes

    from bench import attention

    bars = []
    monkeypatch.setattr(matplotlib.axes.Axes, "bar",
                        lambda self, x, h, w, **kw: bars.append((kw["label"], h, kw.get("hatch"))))
    report = Report("attention", "cpu", meta={"dtype": "bfloat16"})
    _row(report, "triton", 1.0, dev_ms=0.5)
    _row(report, "flex", 2.0)
    attention._chart(report, str(tmp_path / "a.png"))
    assert bars == [("triton", 0.5, None), ("flex", 2.0, "//")]
    assert (tmp_path / "a.png").is_file()
