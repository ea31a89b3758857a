"""Video data: sources, decoding (PyAV on the CPU, DALI on the GPU), transforms, captions, bad-input handling.

Public entry points:
* `read_clip(path, num_frames, resolution, *, start=None, end=None)` -> uint8 [T, R, R, 3] (eval transform).
* `BadVideoError` (a ValueError): one line naming the file and the reason.
* `videoprism.data.loader.build_loader(...)`: the training/eval loader (see its docstring).
* `videoprism.data.synth.generate(...)`, `videoprism.data.index.index_dataset(...)`, `videoprism.data.cli`.
"""
from .decode import read_clip
from .errors import BadSampleError, BadVideoError, TooManyBadSamplesError

__all__ = ["read_clip", "BadVideoError", "BadSampleError", "TooManyBadSamplesError"]
