"""Errors of the data layer and the skip-and-count budget for bad samples (DESIGN 7).

A bad sample (missing, empty, truncated, non-video or unsupported file, too few frames, bad manifest line, bad
caption) is skipped and recorded with its path and reason; a run stops only when the skipped share passes a
configured limit, with an error that says how many, which ones and how to raise the limit.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..paths import LONGEST_PATH, shortened


class BadVideoError(ValueError):
    """A video file that cannot give the requested frames. `str()` is one line: the file and the reason."""

    def __init__(self, path: str, reason: str):
        self.path = str(path)
        self.reason = reason
        # The path of a manifest line has no limit but the line's: a 1 MB one made a 1 MB error line.
        super().__init__(f"{shortened(self.path, LONGEST_PATH)}: {reason}")


class BadSampleError(ValueError):
    """A manifest line or caption that cannot be used (`str()` names the source, the line and the reason)."""

    def __init__(self, where: str, reason: str):
        self.path = where
        self.reason = reason
        super().__init__(f"{shortened(where, LONGEST_PATH)}: {reason}")


class NoUsableSamplesError(ValueError):
    """A manifest or shard set with no usable sample; `rejects` holds every (where, reason)."""

    def __init__(self, message: str, rejects: list[tuple[str, str]]):
        self.rejects = rejects
        super().__init__(message)


class FileNameEncodingError(OSError):
    """A manifest path holding a character that this process's file names cannot: Python encodes them in the
    locale's encoding (ascii under LC_ALL=C with PYTHONUTF8=0, latin-1 ...), not UTF-8. Not a bad line: every such
    path of the manifest fails alike here and names its file in a UTF-8 locale, so the command stops instead of
    writing a result (a clean manifest, a run) that depends on the locale it ran in."""


class TooManyBadSamplesError(RuntimeError):
    """The share of skipped samples passed `max_bad_share`."""


@dataclass
class BadSampleBudget:
    """Counts skipped samples against a share of `total` (the samples planned for one pass).

    The check is `bad > max_share * total` on the running count, so it trips as soon as the pass is certain to end
    past the share (no false alarm early in a pass, no waiting until its end either).
    """

    total: int
    max_share: float = 0.01
    what: str = "samples"
    # The command that cleans the data, as specific as the caller knows it (the manifest, the frames a clip needs).
    clean: str = "videoprism data index MANIFEST --out CLEAN.jsonl"
    rejects: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self):
        if not 0.0 <= self.max_share <= 1.0:
            raise ValueError(f"max_bad_share must be in [0, 1], got {self.max_share}; 0.01 allows 1% bad {self.what}")

    @property
    def bad(self) -> int:
        return len(self.rejects)

    def skip(self, path: str, reason: str) -> None:
        self.rejects.append((str(path), reason))
        # bad / total, not max_share * total: the product rounds (0.29 * 100 = 28.999...), which stopped a run
        # at exactly the share; the quotient of two ints rounds as the share's literal does.
        if self.over(self.bad):
            # At once, not at the end of the pass: the count is a floor (the rest is unchecked).
            # The rejects keep their paths whole (a report lists them); the line cuts them as a path is cut.
            latest = "; ".join(f"{shortened(p, LONGEST_PATH)}: {r}" for p, r in self.rejects[-3:])
            self.stop(self.bad, "the latest: " + latest, so_far=True)

    def over(self, bad: int) -> bool:
        """Whether `bad` skipped samples pass the share."""
        return bad > 0 and (self.total == 0 or bad / self.total > self.max_share)

    def stop(self, bad: int, which: str, so_far: bool = False):
        """Raise the error for `bad` skipped samples (`so_far`: of those checked, the pass stopped there), `which`
        saying which ones."""
        raise TooManyBadSamplesError(
            f"{bad} of {self.total} {self.what} are bad{' so far' if so_far else ''} ({bad / max(self.total, 1):.1%} "
            f"> max_bad_share {self.max_share:.1%}{', the rest unchecked' if so_far else ''}); {which}. Clean the "
            f"data with `{self.clean}` (its report lists every bad one) or raise the share (training: "
            "data.max_bad_share; videoprism eval: --max-bad-share).")

    def state_dict(self) -> dict:
        return {"rejects": [list(r) for r in self.rejects]}

    def load_state_dict(self, state: dict) -> None:
        self.rejects = [tuple(r) for r in state["rejects"]]
