"""Build of the `videoprism._C` extension.

C++ CPU kernels always build. CUDA kernels build when a CUDA toolkit is found and
the installed torch is a CUDA build (our machines: torch 2.14.1+cu130 and CUDA 13 at
/usr/local/cuda), so CI compiles the CUDA sources even without a GPU. Targets sm_80
(A100; its code also runs on sm_86/sm_89) and sm_90 (H100/H200), plus sm_90 PTX that the
driver compiles on newer GPUs (Blackwell: sm_100, sm_120) at first use, unless
TORCH_CUDA_ARCH_LIST says otherwise (e.g. "10.0" to build Blackwell code ahead of time).

`kernels/` (Triton sources) installs as `videoprism.kernels` and `train/` as
`videoprism.train`: no installed top-level module takes a generic name.
"""
import glob
import importlib.util
import os
import subprocess
import sys
import tempfile

from setuptools import find_packages, setup

# torch guesses CUDA_HOME from the nvcc on PATH; a /usr/local/bin/nvcc shim then gives
# /usr/local, which has no lib64/libcudart. Prefer the standard toolkit folder.
if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402  (reads CUDA_HOME at import)


def _want_cuda() -> bool:
    if os.environ.get("VIDEOPRISM_NO_CUDA", "0") == "1":
        return False
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def _pip_cuda_includes() -> list[str]:
    """Headers of the CUDA libraries torch's wheels ship (nvidia/*/include): a toolkit
    with only the compiler and runtime lacks e.g. cusparse.h, which ATen's CUDA headers want."""
    try:
        import nvidia
    except ImportError:
        return []
    dirs = []
    for root in nvidia.__path__:
        dirs += sorted(glob.glob(os.path.join(root, "*", "include")))
    return dirs


def _openmp_flags() -> list[str]:
    """-fopenmp where torch runs OpenMP and the C++ compiler takes it. The CPU kernels split their rows with
    at::parallel_for, an inline template that compiles to a plain loop on the calling thread unless _OPENMP is
    defined: built without the flag (up to 706bd25) every CPU kernel ran on one thread. Linked so, the library
    needs libgomp.so.1, which torch's wheels ship and load first (torch/lib): the loader shares that copy, one
    thread pool for torch and these kernels. A compiler without OpenMP builds them single-threaded, with a warning
    (videoprism._C.intra_op_threads() then says 1)."""
    if not torch.backends.openmp.is_available():
        return []
    compiler = os.environ.get("CXX", "c++")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "omp.cpp")
        with open(src, "w") as fh:
            fh.write("#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
        try:
            ok = subprocess.run([compiler, "-fopenmp", src, "-o", os.path.join(tmp, "omp")],
                                capture_output=True).returncode == 0
        except OSError:
            ok = False
    if not ok:
        print(f"warning: {compiler} -fopenmp does not build a program here: the CPU kernels of videoprism._C build "
              "single-threaded (install the compiler's OpenMP runtime, e.g. libgomp, or set CXX)", file=sys.stderr)
        return []
    return ["-fopenmp"]


def _sources_digest() -> str:
    """videoprism._C.sources: what videoprism/ops/native.py checks a checkout's csrc/ against (a stale build)."""
    spec = importlib.util.spec_from_file_location("_videoprism_sources", os.path.join("videoprism", "_sources.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.sources_digest("csrc")


def _extension():
    cpp = sorted(glob.glob("csrc/*.cpp"))
    # No -std flag: torch's BuildExtension picks the standard its headers need.
    omp = _openmp_flags()
    cxx_flags, link_flags = ["-O3", *omp], omp
    sources = [("VIDEOPRISM_SOURCES", _sources_digest())]
    if _want_cuda():
        # An empty value counts as unset (torch would detect the GPUs, or fail without one).
        archs = os.environ["TORCH_CUDA_ARCH_LIST"] = os.environ.get("TORCH_CUDA_ARCH_LIST") or "8.0;9.0+PTX"
        cu = sorted(glob.glob("csrc/*.cu"))
        return cpp_extension.CUDAExtension(
            "videoprism._C",
            cpp + cu,
            # The targets, for videoprism._C.cuda_arch_list: bare tokens, '/' for ';' and ' ' (nvcc splits -D
            # values at ',').
            define_macros=[("WITH_CUDA", None), ("VIDEOPRISM_CUDA_ARCHS", "/".join(archs.replace(";", " ").split())),
                           *sources],
            include_dirs=_pip_cuda_includes(),
            # No --use_fast_math: it implies -ftz=true, which flushed subnormal fp32 values to
            # zero in the kernels' sums (scatter duplicates, shuffle fwd/bwd adds), unlike torch
            # and the references; the kernels have no division or transcendental to speed up.
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
            extra_link_args=link_flags,
        )
    return cpp_extension.CppExtension("videoprism._C", cpp, define_macros=sources,
                                      extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)


packages = find_packages(include=["videoprism", "videoprism.*"])
packages += ["videoprism.kernels", "videoprism.train"]

setup(
    packages=packages,
    package_dir={"videoprism.kernels": "kernels", "videoprism.train": "train"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
