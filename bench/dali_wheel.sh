#!/usr/bin/env bash
# NVIDIA DALI for the lent GPU machines, which have no DALI, no PyAV/FFmpeg and no internet, while a device call
# carries at most 64 MiB: DALI's wheel (190 MiB; 469 MiB unpacked) travels as a pack of what the machine runs —
# the install tree for one Python (cp312) and one GPU (sm_90: H100/H200), host symbol tables stripped, device code
# for other GPUs dropped (tools/fatbin.py, checked with cuobjdump), xz-compressed: ~47 MiB, one call.
#
#   bash bench/dali_wheel.sh prepare   # here (registry reachable): the pack into .whl/dali/ (in chunks should it
#                                      # outgrow a call) + SHA256SUMS, the small deps DALI imports into
#                                      # .whl/deps-cp312/,
#                                      # the clip set .device/dali_clips; prints the device calls with their carry
#                                      # lists (sized against this working tree)
#   bash bench/dali_wheel.sh status    # there: which chunks are present and intact (exit 1 while one is missing)
#   bash bench/dali_wheel.sh install   # there: join, check sha256, unpack into /tmp/site (plus the deps the
#                                      # machine lacks); prints the `export PYTHONPATH=...` to use
#   bash bench/dali_wheel.sh gpu       # there: install, then tests/test_data_dali_gpu.py and bench/data.py's DALI
#                                      # rows -> $OUT/data_gpu.json (bench/results/ when $OUT is not set)
#   bash bench/dali_wheel.sh shim      # prints a folder with `videoprism` minus its extension (gpu uses it where
#                                      # the extension is not built)
#
# All of it is git-ignored: .whl/dali/part-NN, .whl/dali/SHA256SUMS (the joined pack first, then every chunk),
# .whl/deps-cp312/*.whl (manylinux), .device/dali_clips/ (clips.jsonl with probe fields + the clips).
# Env: PY (python3), DALI_SITE (/tmp/site), DALI_DEPS (.whl/deps-cp312), DALI_CLIPS (.device/dali_clips), DALI_SM (90),
# DALI_PYTHON (312: the Python the pack is for), CHUNK_MIB (55), CALL_MIB (64).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
SPEC=nvidia-dali-cuda130==2.4.0
PYTAG=${DALI_PYTHON:-312}  # the GPU machines' Python (3.12): the pack keeps its extension modules only
# What `import nvidia.dali` and a pipeline run need besides numpy (measured by importing it with nothing else on the
# path), plus makefun. Left out, as the video graph does not load them: nvtx, libcst (dynamic mode), and the
# nvidia-nvimgcodec-cu13 / nvidia-libnvcomp-cu13 libraries (image decoding, compression; DALI dlopens them lazily).
DEPS="optree==0.20.0 typing_extensions==4.16.0 gast==0.7.0 astunparse==1.6.3 six==1.17.0 packaging==26.3
makefun==1.16.0"
DIR=.whl/dali
SUMS=$DIR/SHA256SUMS
DEPS_DIR=${DALI_DEPS:-.whl/deps-cp$PYTAG}  # install reads the one of its pack's Python
SITE=${DALI_SITE:-/tmp/site}
CLIPS=${DALI_CLIPS:-.device/dali_clips}
SM=${DALI_SM:-90}
CHUNK_MIB=${CHUNK_MIB:-55}
CALL_MIB=${CALL_MIB:-64}
MiB=$((1 << 20))
# prepare's tools (tools.fatbin with Triton's cuobjdump, bench.data --write-clips with torch and PyAV): the project's
# venv where there is one
TOOLS_PY=$PY
[ -x .venv/bin/python ] && TOOLS_PY=.venv/bin/python
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1

die() { echo "dali_wheel: $*" >&2; exit 2; }

download() {  # download DEST SPEC...: cp$PYTAG manylinux x86_64 wheels, no deps
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version "3.${PYTAG#3}" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$@"
}

pack() {  # pack WHEEL OUT: the install tree for cp$PYTAG and sm_$SM, stripped, pruned, checked, as .tar.xz
  local wheel=$1 out=$2 tree dump
  command -v strip >/dev/null || die "prepare needs strip (binutils) to pack DALI"
  command -v xz >/dev/null || die "prepare needs xz to pack DALI"
  dump=$($TOOLS_PY -c "from tools.fatbin import triton_cuobjdump; print(triton_cuobjdump() or '')" 2>/dev/null) \
    || dump=""
  [ -x "$dump" ] || die "prepare checks the pruned libraries with the cuobjdump Triton ships: make setup first"
  tree=$(mktemp -d)
  $PY -m zipfile -e "$wheel" "$tree"
  # Extension modules built for other Pythons (3.10-3.15, free-threaded): 12 files, 40 MiB.
  find "$tree" -name '*.cpython-3*' ! -name "*.cpython-$PYTAG-*" -delete
  local libs
  mapfile -t libs < <(find "$tree" -type f -name '*.so*' -exec sh -c 'head -c4 "$1" | grep -q ELF' _ {} \; -print)
  # Host symbol tables (.symtab/.strtab: 50 MiB in libdali_operators.so alone); the dynamic ones stay.
  strip --strip-unneeded "${libs[@]}"
  local log
  log=$($TOOLS_PY -m tools.fatbin prune --sm "$SM" --check-with "$dump" "${libs[@]}" 2>&1) \
    || { echo "$log" >&2; rm -rf "$tree"; die "pruning DALI's device code failed (above)"; }
  grep -v ' 0.00 MiB' <<< "${log//$tree\//}" || true
  echo "packing $(du -sm "$tree" | cut -f1) MiB with xz -9 (about two minutes on two cores)"
  tar -C "$tree" -cf - . | xz -9e -T0 > "$out.tmp"
  rm -rf "$tree"
  mv "$out.tmp" "$out"
}

prepare() {
  mkdir -p "$DIR" "$DEPS_DIR"
  local wheel
  wheel=$(ls .whl/nvidia_dali_cuda130-*.whl 2>/dev/null | head -1 || true)
  if [ -z "$wheel" ]; then
    download .whl "$SPEC"
    wheel=$(ls .whl/nvidia_dali_cuda130-*.whl | head -1)
  fi
  # shellcheck disable=SC2086
  download "$DEPS_DIR" $DEPS
  local base name
  base=$(basename "$wheel" .whl)
  name=${base%%-py3-*}-cp$PYTAG-sm$SM.tar.xz  # nvidia_dali_cuda130-2.4.0-cp312-sm90.tar.xz
  [ -f ".whl/$name" ] || pack "$wheel" ".whl/$name"
  local size tree room n chunk
  size=$(stat -c %s ".whl/$name")
  tree=$(git ls-files -z -co --exclude-standard | $PY -c \
    "import os,sys; print(sum(os.path.getsize(p) for p in sys.stdin.read().split('\0') if os.path.isfile(p)))")
  room=$((CALL_MIB * MiB - tree - MiB))  # what a call can carry besides the tree (1 MiB kept for slack)
  chunk=$((CHUNK_MIB * MiB < room ? CHUNK_MIB * MiB : room))
  n=$(((size + chunk - 1) / chunk))
  chunk=$(((size + n - 1) / n))  # equal chunks
  rm -f "$DIR"/part-*
  split -b "$chunk" -d -a 2 ".whl/$name" "$DIR/part-"
  (cd "$DIR" && sha256sum "../$name" | sed "s|\.\./||" > SHA256SUMS.tmp \
    && sha256sum part-* >> SHA256SUMS.tmp && mv SHA256SUMS.tmp SHA256SUMS)
  if [ ! -f "$CLIPS/clips.jsonl" ]; then
    OMP_WAIT_POLICY=PASSIVE $TOOLS_PY -m bench.data --write-clips "$CLIPS"
  fi
  plan "$tree"
}

plan() {  # plan TREE_BYTES: first-fit of the small paths into the calls, from the last call back
  $PY - "$1" "$CALL_MIB" "$SUMS" "$DEPS_DIR" "$CLIPS" <<'EOF'
import json, os, subprocess, sys
tree, limit, sums, deps, clips = int(sys.argv[1]), int(sys.argv[2]) << 20, *sys.argv[3:]
def size(p):
    return os.path.getsize(p) if os.path.isfile(p) else sum(
        os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(p) for f in fs)
folder = os.path.dirname(sums)
parts = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.startswith("part-"))
calls = [[sums, p] for p in parts]  # every call carries the tiny SHA256SUMS, so `status` can check what arrived
golden = ".device/shared/golden/visible"  # the goldens for device_check's gpu-tests, when linked (README)
for extra in (deps, clips) + ((golden,) if os.path.isdir(golden) else ()):
    for c in reversed(calls):
        if tree + sum(map(size, c)) + size(extra) <= limit - (1 << 20):
            c.append(extra)
            break
    else:
        calls.append([sums, extra])
pack = open(sums).readline().split()[1]
commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True).stdout.strip()
print(f"\n{pack}: {os.path.getsize(os.path.join('.whl', pack)) / 2**20:.1f} MiB in {len(parts)} chunks of "
      f"{size(parts[0]) / 2**20:.1f} MiB; deps {size(deps) / 2**20:.1f} MiB; clips {size(clips) / 2**20:.1f} MiB; "
      f"working tree (tracked + untracked, not ignored) {tree / 2**20:.1f} MiB; {limit >> 20} MiB per call")
print("Device calls, one right after the other on the same warm machine (it goes back after a short idle; ignored "
      "paths that a call does not name stay there):")
dc = f"VIDEOPRISM_COMMIT={commit} bash bench/device_check.sh"
print(f"  before them (the plan of bench/device_check.sh): {dc} build attention train-step token-ops  "
      "(timeout_s=600)")
for i, c in enumerate(calls, 1):
    if i == len(calls):
        cmd = (f"{dc} token-tests dali-gpu gpu-tests   (timeout_s: what the budget leaves; `build` first on a fresh machine; "
               "DALI alone needs no build)")
    else:
        cmd = "bash bench/dali_wheel.sh status"
    print(f"  DALI call {i}: carry={json.dumps(c)}  ({(tree + sum(map(size, c))) / 2**20:.1f} MiB with the tree)\n"
          f"          command: {cmd}")
EOF
}

check_chunks() {  # exit 1 naming the first missing or damaged chunk
  if [ ! -f "$SUMS" ]; then
    echo "dali_wheel: missing $SUMS: carry it (bash bench/dali_wheel.sh prepare prints the calls)" >&2
    return 1
  fi
  local n=0 bad=0 total sum name
  total=$(($(wc -l < "$SUMS") - 1))
  while read -r sum name; do
    case $name in part-*) ;; *) continue ;; esac
    n=$((n + 1))
    if [ ! -f "$DIR/$name" ]; then
      echo "dali_wheel: missing chunk $DIR/$name ($n of $total): carry it in a call on this warm machine" >&2; bad=1
    elif [ "$(sha256sum "$DIR/$name" | cut -d' ' -f1)" != "$sum" ]; then
      echo "dali_wheel: damaged chunk $DIR/$name ($n of $total): sha256 differs, carry it again" >&2; bad=1
    else
      echo "chunk $DIR/$name ($n of $total): ok"
    fi
  done < "$SUMS"
  return $bad
}

import_check() {  # prints where nvidia.dali comes from; fails unless it is the copy under $SITE
  PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH} $PY -c "
import os, sys
import nvidia.dali as d
print('nvidia.dali', d.__version__, 'from', os.path.dirname(d.__file__))
sys.exit(not os.path.realpath(d.__file__).startswith(os.path.realpath(sys.argv[1]) + os.sep))" "$SITE"
}

nvdec() {  # DALI dlopens NVDEC's library (the driver's): check that it loads; where it lies only in the driver's
  # folder (the lent machines mount theirs read-only at /usr/local/nvidia), put that folder on LD_LIBRARY_PATH
  local d
  if $PY -c "import ctypes; ctypes.CDLL('libnvcuvid.so.1')" 2>/dev/null; then
    echo "libnvcuvid.so.1 (NVDEC): loads"
    return 0
  fi
  for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/lib/x86_64-linux-gnu /usr/lib64; do
    if [ -e "$d/libnvcuvid.so.1" ]; then
      export LD_LIBRARY_PATH=$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
      echo "libnvcuvid.so.1 (NVDEC): in $d, now on LD_LIBRARY_PATH"
      echo "export LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
      return 0
    fi
  done
  echo "warning: libnvcuvid.so.1 (NVDEC, from the driver) not found: DALI's GPU video decoder will fail (a container" \
       "needs the 'video' driver capability)" >&2
}

install() {
  check_chunks >/dev/null || die "cannot install: chunks missing (above)"
  local pack want tmp
  read -r want pack < "$SUMS"
  local ver=${pack#nvidia_dali_cuda130-}; ver=${ver%%-*}
  local tag sm
  tag=$($PY -c "import sys; print(f'{sys.version_info[0]}{sys.version_info[1]}')")
  [ "cp$tag" = "$(cut -d- -f3 <<< "$pack")" ] || die "$pack holds DALI for $(cut -d- -f3 <<< "$pack"), this $PY is" \
    "cp$tag: DALI_PYTHON=${tag} bash bench/dali_wheel.sh prepare (and carry its deps)"
  sm=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d .) || sm=""
  [ -z "$sm" ] || [ "sm$sm" = "$(cut -d- -f4 <<< "${pack%.tar.xz}")" ] || die "$pack holds device code for" \
    "$(cut -d- -f4 <<< "${pack%.tar.xz}") only, this GPU is sm$sm: DALI_SM=$sm bash bench/dali_wheel.sh prepare"
  local done=$SITE/.dali-pack-$want  # written once the whole pack is unpacked: a call cut mid-way unpacks again
  [ -n "${DALI_DEPS:-}" ] || DEPS_DIR=.whl/deps-$(cut -d- -f3 <<< "$pack")
  if [ -f "$done" ]; then
    echo "nvidia-dali-cuda130 $ver already installed in $SITE"
  else
    tmp=$(mktemp -d)
    cat "$DIR"/part-* > "$tmp/$pack"
    if [ "$(sha256sum "$tmp/$pack" | cut -d' ' -f1)" != "$want" ]; then
      rm -rf "$tmp"
      die "joined $pack: sha256 differs from $SUMS"
    fi
    mkdir -p "$SITE"
    # Python's tarfile: no xz binary needed there; the 'data' filter refuses links and paths out of $SITE.
    $PY -c "import sys, tarfile; tarfile.open(sys.argv[1], 'r:xz').extractall(sys.argv[2], filter='data')" \
      "$tmp/$pack" "$SITE" || { rm -rf "$tmp"; die "unpacking $pack into $SITE failed"; }
    rm -rf "$tmp"
    touch "$done"
    echo "unpacked $pack into $SITE"
  fi
  local w mod
  for w in "$DEPS_DIR"/*.whl; do  # only what this Python lacks: never shadow the machine's own numpy, packaging...
    [ -f "$w" ] || continue
    mod=$(basename "$w" | cut -d- -f1 | tr 'A-Z' 'a-z')
    if ! PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH} $PY -c "import $mod" 2>/dev/null; then
      $PY -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$w" || die "pip install of $w failed"
      echo "installed $(basename "$w") (missing here)"
    fi
  done
  # DALI's libraries look for CUDA libraries it loads lazily next to themselves (RUNPATH $ORIGIN/../cu13/lib, ...):
  # point those at the machine's own copies (torch's nvidia-*-cu13 wheels), none of which the video graph needs.
  local d name
  for d in $($PY -c "import nvidia; print(*nvidia.__path__)" 2>/dev/null); do
    for name in cu13 cufft npp nvjpeg nvimgcodec libnvcomp; do
      if [ -e "$d/$name" ] && [ ! -e "$SITE/nvidia/$name" ]; then ln -s "$d/$name" "$SITE/nvidia/$name"; fi
    done
  done
  if ! import_check >/dev/null 2>&1; then
    # A regular package `nvidia` (with an __init__.py) elsewhere on the path hides our namespace portion: make ours
    # the regular one, extended over every `nvidia` folder on the path (pkgutil style).
    [ -f "$SITE/nvidia/__init__.py" ] || echo "__path__ = __import__('pkgutil').extend_path(__path__, __name__)" \
      > "$SITE/nvidia/__init__.py"
  fi
  import_check || die "nvidia.dali does not import from $SITE (see above)"
  nvdec
  echo "export PYTHONPATH=$SITE\${PYTHONPATH:+:\$PYTHONPATH}"
}

shim() {  # prints a folder holding `videoprism` without the extension: every module and subpackage of the
  # package linked, its __init__ (which loads videoprism._C and the model) replaced by an empty one
  local dir=${DALI_SHIM:-/tmp/videoprism_no_ext} f
  rm -rf "$dir" && mkdir -p "$dir/videoprism"
  echo '"""videoprism without its extension (bench/dali_wheel.sh shim): data, CLI helpers, pure modules."""' \
    > "$dir/videoprism/__init__.py"
  for f in "$PWD"/videoprism/*; do
    case $(basename "$f") in __init__.py | __pycache__ | *.so) ;; *) ln -s "$f" "$dir/videoprism/" ;; esac
  done
  echo "$dir"
}

gpu() {
  install
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
  local flags=() rc=0
  if ! $PY -c "import videoprism" 2>/dev/null; then
    # The extension is not built here (device_check.sh's build step did not run): the data layer and the benchmark
    # need none of it, so import them through a package shell, ahead of the repo (-P: no cwd on the path).
    local shim
    shim=$(shim)
    export PYTHONPATH=$SITE:$shim:$PWD${PYTHONPATH#"$SITE"}
    flags=(-P)
    echo "note: videoprism is not built here: running without its extension ($shim)"
  fi
  local out=${OUT:-bench/results}
  mkdir -p "$out"
  local xml=${OUT:-/tmp}/dali_gpu_tests.xml
  $PY "${flags[@]}" -m pytest -v -ra -p no:cacheprovider --import-mode=importlib -m gpu tests/test_data_dali_gpu.py \
    --junitxml="$xml" || rc=1
  # pytest exits 0 when every test skipped (no CUDA, no clip set): that is no result.
  $PY -c "import sys, xml.etree.ElementTree as E; s = E.parse(sys.argv[1]).getroot().iter('testsuite').__next__()
sys.exit(int(s.get('tests', 0)) == int(s.get('skipped', 0)))" "$xml" \
    || { echo "dali_wheel: no DALI GPU test ran (all skipped: the reasons are above)" >&2; rc=1; }
  # Against the training step measured on this machine when there is one (device_check's train-step, in this call's
  # $OUT or an earlier call's copy in .device/results), else the committed one.
  local ts=() f
  for f in "$out/train_step_gpu.json" .device/results/train_step_gpu.json; do
    [ -f "$f" ] && { ts=(--train-step "$f"); break; }
  done
  $PY "${flags[@]}" -m bench.data --device cuda --clips "$CLIPS" --reps 3 "${ts[@]}" --out "$out/data_gpu.json" || rc=1
  return $rc
}

case ${1:-} in
  prepare) prepare ;;
  status) check_chunks ;;
  install) install ;;
  gpu) gpu ;;
  shim) shim ;;
  *) echo "usage: bash bench/dali_wheel.sh prepare|status|install|gpu|shim (see the header of this file)" >&2; exit 2 ;;
esac
