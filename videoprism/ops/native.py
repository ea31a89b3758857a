"""The compiled extension `videoprism._C` (csrc/): its C++ / CUDA token-op kernels, or why they cannot run.

A copy whose extension is missing (never built, or not built for this Python), cannot be loaded (built against
another torch: the loader's "undefined symbol"), lacks an op the Python side calls or, in a checkout, was built from
other csrc/ sources than the checkout's (videoprism/_sources.py) still imports and runs: the token ops' default
backend becomes "reference" (plain PyTorch, slower), and one line on stderr says why and how to rebuild. Importing
the library raised a traceback there ("cannot import name '_C' from partially initialized module", or the loader's
undefined symbol) before any command could say a word, or ran the old kernels with no word. Asking for "cpp" or
"cuda" then is a ValueError with the same reason (videoprism/ops/token_ops.py).
"""
from __future__ import annotations

import importlib
import importlib.machinery
import os
import sys

import torch  # loads libtorch, which the extension links against, before it

from videoprism._sources import sources_digest
from videoprism.paths import note_once

# The kernels' schemas in csrc/ops.cpp, which videoprism/ops/token_ops.py calls through torch.ops.videoprism.
OPS = ("gather_tokens_native", "scatter_tokens_native", "shuffle_tokens_fwd_native", "shuffle_tokens_bwd_native",
       "patchify_gather_native")
_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the videoprism folder
REBUILD = ("rebuild it: `pip install --no-build-isolation -e .` in the repository (`make setup`), or reinstall the "
           "package")


def _load() -> str | None:
    """None when videoprism._C is loaded with every op in OPS, else why not (one line)."""
    try:
        importlib.import_module("videoprism._C")  # registers the native kernels: torch.ops.videoprism.*_native
    except ModuleNotFoundError:
        return f"is not built (no _C{importlib.machinery.EXTENSION_SUFFIXES[0]} in {_PACKAGE})"
    except ImportError as e:  # the loader's error names the file: undefined symbol, wrong ELF class, ...
        lines = str(e).strip().splitlines() or [type(e).__name__]
        return f"cannot be loaded ({lines[0]})"
    missing = [op for op in OPS if not hasattr(torch.ops.videoprism, op)]
    if missing:
        return f"lacks {', '.join(missing)} (built from older csrc/ sources)"
    return _stale()


def _stale() -> str | None:
    """Why a checkout's library does not match its csrc/ (None when it does, or in an installed copy, which has no
    csrc/: pip built its library from the sources it installed)."""
    root = os.path.dirname(_PACKAGE)
    csrc = os.path.join(root, "csrc")
    # A checkout: this project's csrc/ and setup.py beside the package (a site-packages folder may hold another
    # distribution's top-level csrc/).
    if not (os.path.isfile(os.path.join(csrc, "ops.cpp")) and os.path.isfile(os.path.join(root, "setup.py"))):
        return None
    if getattr(sys.modules["videoprism._C"], "sources", "") != sources_digest(csrc):
        return f"was built from other sources than {csrc}"
    return None


MISSING = _load()
if MISSING is not None:
    note_once(f"videoprism._C {MISSING}: the token ops run their plain-PyTorch references (slower); {REBUILD}")
