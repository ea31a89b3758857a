"""tools/fatbin.py against NVIDIA's own tools: `fatbinary` writes the one-target fat binary that
pruning must reproduce, and `cuobjdump` (shipped with Triton) reads the pruned library back."""
import os
import shutil
import subprocess

import pytest

from tools import fatbin

SOURCE = """
extern "C" __global__ void add(float* x, float a, int n) { int i = blockIdx.x * blockDim.x + threadIdx.x; if (i < n) x[i] += a; }
extern "C" __global__ void mul(float* x, float a, int n) { int i = blockIdx.x * blockDim.x + threadIdx.x; if (i < n) x[i] *= a; }
"""


def cuda_tool(name):
    for folder in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if folder and os.access(os.path.join(folder, "bin", name), os.X_OK):
            return os.path.join(folder, "bin", name)
    return shutil.which(name) or pytest.skip(f"CUDA's {name} not found (CUDA_HOME or /usr/local/cuda)")


def cuobjdump():
    return fatbin.triton_cuobjdump() or pytest.skip("no Triton, or one that ships no cuobjdump")


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    d = tmp_path_factory.mktemp("fatbin")
    (d / "k.cu").write_text(SOURCE)
    nvcc = cuda_tool("nvcc")
    for arch in ("80", "90"):
        subprocess.run([nvcc, "-cubin", f"-arch=sm_{arch}", "-o", d / f"k{arch}.cubin", d / "k.cu"], check=True)
    subprocess.run([nvcc, "-ptx", "-arch=compute_90", "-o", d / "k90.ptx", d / "k.cu"], check=True)
    return d


def test_pruned_container_is_what_fatbinary_writes_for_one_target(kernels):
    tool, d = cuda_tool("fatbinary"), kernels
    subprocess.run([tool, "--64", f"--create={d / 'three.fatbin'}", f"--image3=kind=elf,sm=80,file={d / 'k80.cubin'}",
                    f"--image3=kind=elf,sm=90,file={d / 'k90.cubin'}", f"--image3=kind=ptx,sm=90,file={d / 'k90.ptx'}"],
                   check=True)
    subprocess.run([tool, "--64", f"--create={d / 'one.fatbin'}", f"--image3=kind=elf,sm=90,file={d / 'k90.cubin'}"],
                   check=True)
    data, want = bytearray((d / "three.fatbin").read_bytes()), (d / "one.fatbin").read_bytes()
    found = fatbin.containers(data, 0, len(data))
    assert [(i.kind, i.sm) for c in found for i in c.images] == [(2, 80), (2, 90), (1, 90)]
    freed = fatbin.prune_containers(data, found, 90)
    assert bytes(data) == want + bytes(len(data) - len(want))  # the same bytes, then zeros
    assert freed == len(data) - len(want)
    # A target none of its cubins is for leaves a container whole (PTX alone is not kept: it is for JIT).
    again = bytearray(data)
    assert fatbin.prune_containers(again, fatbin.containers(again, 0, len(again)), 75) == 0 and again == data


@pytest.mark.parametrize("rdc", [False, True], ids=["linked", "relocatable"])
def test_pruned_library_holds_the_same_sm90_cubins_and_nothing_else(kernels, rdc):
    d, dump = kernels, cuobjdump()
    lib = d / f"lib{int(rdc)}.so"
    subprocess.run([cuda_tool("nvcc"), "-shared", "-Xcompiler", "-fPIC", *(["-rdc=true"] if rdc else []),
                    "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=[sm_90,compute_90]",
                    "-o", lib, d / "k.cu"], check=True)
    before = lib.read_bytes()
    sections = {s: where for s, where in fatbin.elf_sections(before).items() if s in fatbin.SECTIONS}
    assert set(sections) == ({".nv_fatbin", "__nv_relfatbin"} if rdc else {".nv_fatbin"})

    def listing(path, what):
        r = subprocess.run([dump, f"--list-{what}", path], capture_output=True, text=True)
        return sorted(line.rsplit(".", 2)[-2] for line in r.stdout.splitlines() if line.strip())

    def cubins(path, out):
        out.mkdir()
        subprocess.run([dump, "-xelf", "all", path], cwd=out, check=True, capture_output=True)
        return sorted((f.name.rsplit(".", 2)[-2], f.read_bytes()) for f in out.iterdir())

    assert "sm_80" in listing(lib, "elf") and {k for _, k, _ in fatbin.census(before)} == {"elf", "ptx"}
    want = [c for c in cubins(lib, d / f"x{int(rdc)}_before") if c[0] == "sm_90"]
    assert fatbin.main(["prune", "--sm", "90", str(lib)]) == 0
    after = lib.read_bytes()
    assert set(listing(lib, "elf")) == {"sm_90"} and listing(lib, "ptx") == []
    assert {(k, sm) for _, k, sm in fatbin.census(after)} == {("elf", 90)}
    assert cubins(lib, d / f"x{int(rdc)}_after") == want  # every sm_90 cubin, byte for byte
    # Outside the fat binary sections not a byte moved.
    inside = sorted(sections.values())
    edges = [0] + [x for off, size in inside for x in (off, off + size)] + [len(before)]
    assert len(after) == len(before)
    assert all(after[a:b] == before[a:b] for a, b in zip(edges[::2], edges[1::2]))


def test_unknown_bytes_between_containers_are_an_error(kernels):
    d = kernels
    subprocess.run([cuda_tool("fatbinary"), "--64", f"--create={d / 'x.fatbin'}",
                    f"--image3=kind=elf,sm=90,file={d / 'k90.cubin'}"], check=True)
    one = (d / "x.fatbin").read_bytes()
    pad = -len(one) % fatbin.ALIGN
    ok = one + bytes(pad + 8) + one
    assert len(fatbin.containers(ok, 0, len(ok))) == 2
    bad = one + bytes(pad) + b"\x01" + bytes(7) + one
    with pytest.raises(ValueError, match="unknown bytes at offset"):
        fatbin.containers(bad, 0, len(bad))
    truncated = bytearray(one)
    truncated[8:16] = (len(one) - 16 + 8).to_bytes(8, "little")  # the header claims 8 bytes more than the images
    with pytest.raises(ValueError, match="images end at"):
        fatbin.containers(bytes(truncated) + bytes(8), 0, len(truncated) + 8)


def test_inputs_that_are_not_plain_libraries(kernels, tmp_path):
    """Not ELF: skipped with a note; a truncated ELF: an error naming the file; a separate debug file (sections
    SHT_NOBITS, offsets pointing at other bytes): nothing to prune, no error."""
    text = tmp_path / "linker_script.so"
    text.write_text("INPUT(libfoo.so.1)\n")
    tiny = tmp_path / "tiny.so"
    tiny.write_bytes(b"\x7fELF")
    assert fatbin.main(["prune", "--sm", "90", str(text), str(tiny)]) == 0  # both skipped
    lib = kernels / "trunc_src.so"
    subprocess.run([cuda_tool("nvcc"), "-shared", "-Xcompiler", "-fPIC", "-gencode", "arch=compute_80,code=sm_80",
                    "-gencode", "arch=compute_90,code=sm_90", "-o", lib, kernels / "k.cu"], check=True)
    cut = tmp_path / "cut.so"
    cut.write_bytes(lib.read_bytes()[:-4096])
    assert fatbin.main(["prune", "--sm", "90", str(cut)]) == 1
    objcopy = shutil.which("objcopy") or pytest.skip("no objcopy")
    debug = tmp_path / "lib.debug"
    subprocess.run([objcopy, "--only-keep-debug", lib, debug], check=True)
    before = debug.read_bytes()
    assert fatbin.census(before) == {} and fatbin.main(["prune", "--sm", "90", str(debug)]) == 0
    assert debug.read_bytes() == before


def test_the_extension_holds_the_code_its_build_asked_for():
    """The built library's fat binary against the targets its build recorded (`videoprism._C.cuda_arch_list`:
    setup.py's TORCH_CUDA_ARCH_LIST, by default sm_80 and sm_90 code plus sm_90 PTX, which the driver compiles on
    newer GPUs such as Blackwell, where the CUDA ops would otherwise find no kernel image)."""
    import re

    import videoprism._C as ext

    if not hasattr(ext, "cuda_arch_list"):
        pytest.skip("videoprism._C predates cuda_arch_list: rebuild it (make setup)")
    archs = ext.cuda_arch_list
    with open(ext.__file__, "rb") as f:
        found = {(kind, sm) for _, kind, sm in fatbin.census(f.read())}
    if not archs:
        assert not found
        pytest.skip("the extension was built without its CUDA kernels (no CUDA toolkit or a CPU torch)")
    want = set()
    for entry in archs.split(";"):
        m = re.fullmatch(r"(\d+)\.(\d+)(\+PTX)?", entry.strip())
        if m is None:
            pytest.skip(f"TORCH_CUDA_ARCH_LIST entry {entry!r} is not of the form X.Y[+PTX]")
        sm = int(m[1] + m[2])
        want |= {("elf", sm)} | ({("ptx", sm)} if m[3] else set())
    assert found == want
