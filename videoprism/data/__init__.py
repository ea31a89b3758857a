"""Video data: sources, decoding (PyAV on the CPU, DALI on the GPU), transforms, captions, bad-input handling.

Public entry points:
* `read_clip(path, num_frames, resolution, *, start=None, end=None)` -> uint8 [T, R, R, 3] (eval transform).
* `BadVideoError` (a ValueError): one line naming the file and the reason.
* `videoprism.data.loader.build_loader(...)`: the training/eval loader (see its docstring).
* `videoprism.data.synth.generate(...)`, `videoprism.data.index.index_dataset(...)`,
  `videoprism.data.pack.write_pack(...)` (a manifest packed for every reader to map), `videoprism.data.cli`.
"""
from .errors import BadSampleError, BadVideoError, TooManyBadSamplesError


def __getattr__(name: str):
    # Decoding needs PyAV; import it on first use so that the rest of the data layer (and the
    # trainer, on GPU machines with no PyAV) imports without it.
    if name == "read_clip":
        from .decode import read_clip

        return read_clip
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["read_clip", "BadVideoError", "BadSampleError", "TooManyBadSamplesError"]
