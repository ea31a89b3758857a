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
