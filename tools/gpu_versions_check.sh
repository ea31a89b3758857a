#!/usr/bin/env bash
# The test suite on the CPU under the GPU machines' versions (Python 3.12, torch 2.11.0, Triton 3.6.0),
# in a throwaway venv and a clone of HEAD, before spending device time there. Our own venv has newer
# versions, which hid four failures that would have met us on the GPU machine (notes in the
# 2026-11-27 session): a pyproject key older setuptools rejects, Triton 3.6 timing a lone autotune
# config, PyAV 19 (what Python 3.12 gets) dropping a keyword, numpy 2.4 in Triton 3.6's interpreter.
#
#   bash tools/gpu_versions_check.sh               # ~6 min with the wheels cached, ~10 min without
#   bash tools/gpu_versions_check.sh -k attention  # extra arguments go to pytest
#   PY_VERSION=3.10 bash tools/gpu_versions_check.sh  # another Python (pyproject allows >= 3.10), same torch
#
# Env: PY_VERSION (3.12), PYTHON (python$PY_VERSION on PATH, else pyenv's), TORCH (2.11.0),
# WORK (/tmp/videoprism_gpu_versions), CUDA (1).
# The installed extension builds without its CUDA kernels (VIDEOPRISM_NO_CUDA=1), which are compiled on their
# own for sm_90 against the same torch (CUDA=0 skips that), and
# numpy stays below 2.4, which Triton 3.6's interpreter needs (tests/conftest.py says so too).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${WORK:-/tmp/videoprism_gpu_versions}
TORCH=${TORCH:-2.11.0}
V=${PY_VERSION:-3.12}
[[ $V =~ ^3\.[0-9]+$ ]] || { echo "gpu_versions_check: PY_VERSION=$V is not a Python version such as 3.10" >&2
  exit 2; }
is_v() { [ -n "$1" ] && "$1" -c "import sys; assert '%d.%d' % sys.version_info[:2] == '$V'" 2>/dev/null; }
if [ -z "${PYTHON:-}" ]; then  # a pyenv shim on PATH may exist and still refuse to run
  for p in "$(command -v "python$V" 2>/dev/null)" "$HOME/.pyenv/versions/$V".*/bin/"python$V"; do
    is_v "$p" && { PYTHON=$p; break; }
  done
fi
is_v "${PYTHON:-}" || { echo "gpu_versions_check: no working Python $V found; set PYTHON=/path/to/python$V" >&2
  exit 2; }

mkdir -p "$WORK"
VENV=$WORK/venv-torch$TORCH
[ "$V" = 3.12 ] || VENV=$VENV-py$V  # the 3.12 venv keeps its name: an existing one is reused
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip "setuptools<82" wheel ninja "numpy<2.4"
  "$VENV/bin/pip" install -q "torch==$TORCH"
fi
rm -rf "$WORK/repo"
git clone -q "$ROOT" "$WORK/repo"
cd "$WORK/repo"
VIDEOPRISM_NO_CUDA=1 "$VENV/bin/pip" install -q --no-build-isolation -e ".[test,dali]"
"$VENV/bin/python" -c "import sys, torch, triton, av, numpy; print('python', sys.version.split()[0], 'torch', \
torch.__version__, 'triton', triton.__version__, 'av', av.__version__, 'numpy', numpy.__version__)"
# The CUDA kernels too, against this torch's headers, for the GPU machines' sm_90, into a scratch folder (CI
# compiles them against the newest torch only): ~1 min; CUDA=0 skips it, no nvcc skips it with a note.
if [ "${CUDA:-1}" = 1 ]; then
  if [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]; then
    rm -rf "$WORK/cuda_build"
    VIDEOPRISM_NO_CUDA=0 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=${MAX_JOBS:-2} "$VENV/bin/python" setup.py -q build_ext \
      --build-lib "$WORK/cuda_build" --build-temp "$WORK/cuda_build/tmp" > "$WORK/cuda_build.log" 2>&1 \
      || { tail -30 "$WORK/cuda_build.log"; echo "gpu_versions_check: the CUDA build failed (log above)" >&2; exit 1; }
    # A build without CUDA kernels (a CPU torch) also succeeds: check that sm_90 code is in the library.
    "$VENV/bin/python" -c "import glob, sys; from tools import fatbin
lib = glob.glob(sys.argv[1] + '/videoprism/_C*.so')[0]
sys.exit(('elf', 90) not in {(k, sm) for _, k, sm in fatbin.census(open(lib, 'rb').read())})" "$WORK/cuda_build" \
      || { echo "gpu_versions_check: the build holds no sm_90 code ($WORK/cuda_build.log)" >&2; exit 1; }
    n=$(grep -c "warning" "$WORK/cuda_build.log" || true)
    echo "CUDA extension for sm_90 against torch $TORCH: built, $n compiler warning lines ($WORK/cuda_build.log)"
  else
    echo "note: no nvcc at ${CUDA_HOME:-/usr/local/cuda}: the CUDA kernels are not compiled against torch $TORCH"
  fi
fi
# The clone sits outside the checkout, so the tests find ../shared through VIDEOPRISM_SHARED.
SHARED=$(cd "$ROOT/.." && pwd)/shared
[ -d "$SHARED" ] && export VIDEOPRISM_SHARED=$SHARED
OMP_WAIT_POLICY=PASSIVE "$VENV/bin/python" -m pytest -q -ra -p no:cacheprovider "$@"
