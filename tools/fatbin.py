"""CUDA fat binaries inside ELF shared libraries: list their images, keep one GPU architecture's.

Why: the lent GPU machines have no DALI and a device call carries at most 64 MiB, while DALI's
libraries hold device code for six GPUs (sm_75 ... sm_120) and PTX: 105 MiB of its 469 MiB
unpacked, 90 of them not for sm_90. Keeping only the card's cubins (sm_90 for H100/H200) is what lets the packed
install travel in one call (bench/dali_wheel.sh). The result is what `nvcc -gencode
arch=compute_90,code=sm_90` would have embedded: the driver picks a cubin by its header's SM.

Layout (little-endian; what NVIDIA's `fatbinary` writes, checked against it in
tests/test_fatbin.py):
  * sections `.nv_fatbin` (the device code the CUDA runtime registers at load time) and
    `__nv_relfatbin` (relocatable copies for device linking; never loaded) hold containers
    back to back, each 8-byte aligned, zero bytes between them;
  * a container: u32 magic 0xBA55ED50, u16 version, u16 header size, u64 size of the images
    after the header;
  * an image: its own header (u16 kind: 1 PTX, 2 ELF cubin; u16 version; u32 header size;
    u64 payload size; ...; u32 SM at byte 28), then the payload; images back to back.

Pruning rewrites a container in place: its images of the kept SM's cubins first, the freed
bytes zeroed, the container's size field shrunk. Nothing moves, so every pointer into the
section (the runtime's registration wrappers) still finds its container. A container with no
cubin of the kept SM (code built for other targets only) is left whole. Unknown bytes between
containers stop the tool with an error rather than guess.

    python -m tools.fatbin list LIB...           # images per section, kind and SM
    python -m tools.fatbin prune --sm 90 LIB...  # in place; prints the bytes freed
    python -m tools.fatbin prune --sm 90 --check-with CUOBJDUMP LIB...
        # and NVIDIA's reader must find the same sm_90 cubins of `.nv_fatbin` (the code the runtime
        # loads), byte for byte, before and after (Triton ships cuobjdump: triton/backends/nvidia/bin/)

`prune` always checks, before it writes, that the kept cubins of every section are byte for byte
what they were; files that are not ELF are skipped with a note.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import struct
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass

MAGIC = 0xBA55ED50
SECTIONS = (".nv_fatbin", "__nv_relfatbin")
KINDS = {1: "ptx", 2: "elf"}
ALIGN = 8


@dataclass(frozen=True)
class Image:
    kind: int  # 1 PTX, 2 cubin
    sm: int  # e.g. 90
    offset: int  # of its header, in the file
    size: int  # header + payload


@dataclass(frozen=True)
class Container:
    offset: int
    header_size: int
    images: tuple[Image, ...]


class NotELF(ValueError):
    pass


def elf_sections(data: bytes) -> dict[str, tuple[int, int]]:
    """Section name -> (file offset, size) of a 64-bit little-endian ELF file, sections with file bytes only
    (not SHT_NOBITS, whose offset holds another section's bytes, as in a separate debug file)."""
    if len(data) < 64 or data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise NotELF("not a 64-bit little-endian ELF file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    entsize, count, names = struct.unpack_from("<HHH", data, 0x3A)
    if shoff == 0 or count == 0:
        return {}
    if entsize < 40 or names >= count or shoff + count * entsize > len(data):
        raise ValueError("section headers beyond the end of the file: truncated?")
    headers = [struct.unpack_from("<IIQQQQ", data, shoff + i * entsize) for i in range(count)]
    base = headers[names][4]
    out = {}
    for name, kind, _, _, offset, size in headers:
        if kind == 8:  # SHT_NOBITS
            continue
        if offset + size > len(data) or base + name >= len(data):
            raise ValueError(f"a section beyond the end of the file (offset {offset}, size {size}): truncated?")
        start = base + name
        out[data[start:data.index(b"\0", start)].decode(errors="replace")] = (offset, size)
    return out


def read_container(data: bytes, offset: int) -> tuple[Container, int]:
    """The container at `offset` and the offset just past it; its images must fill it exactly."""
    magic, _, header_size, body = struct.unpack_from("<IHHQ", data, offset)
    if magic != MAGIC:
        raise ValueError(f"no fat binary at offset {offset}")
    images, p, end = [], offset + header_size, offset + header_size + body
    while p < end:
        if end - p < 32:
            break
        kind, _, image_header, payload = struct.unpack_from("<HHIQ", data, p)
        if image_header < 32 or p + image_header + payload > end:
            break
        sm, = struct.unpack_from("<I", data, p + 28)
        images.append(Image(kind, sm, p, image_header + payload))
        p += image_header + payload
    if p != end:
        raise ValueError(f"fat binary at offset {offset}: images end at {p}, the header says {end}")
    return Container(offset, header_size, tuple(images)), end


def containers(data: bytes, offset: int, size: int) -> list[Container]:
    """Every container of the section at (offset, size); anything but zero padding between them is an error."""
    out, p, end = [], offset, offset + size
    while p < end:
        if end - p >= 16 and struct.unpack_from("<I", data, p)[0] == MAGIC:
            c, p = read_container(data, p)
            out.append(c)
            p = offset + -(-(p - offset) // ALIGN) * ALIGN
        elif not any(data[p:min(p + ALIGN, end)]):
            p += ALIGN
        else:
            raise ValueError(f"unknown bytes at offset {p} of a fat binary section: not a layout this tool knows")
    return out


def fatbins(data: bytes) -> dict[str, list[Container]]:
    return {name: containers(data, *where) for name, where in elf_sections(data).items() if name in SECTIONS}


def prune_containers(data: bytearray, found: list[Container], sm: int) -> int:
    """Keep only the SM `sm` cubins of each container in `found` that has one, in place; returns the bytes zeroed."""
    freed = 0
    for c in found:
        kept = [i for i in c.images if i.kind == 2 and i.sm == sm]
        if not kept or len(kept) == len(c.images):
            continue
        body = b"".join(bytes(data[i.offset:i.offset + i.size]) for i in kept)
        start = c.offset + c.header_size
        old = sum(i.size for i in c.images)
        data[start:start + old] = body + bytes(old - len(body))
        struct.pack_into("<Q", data, c.offset + 8, len(body))
        freed += old - len(body)
    return freed


def prune(data: bytearray, sm: int) -> int:
    """`prune_containers` over every fat binary section of an ELF file held in `data`."""
    return sum(prune_containers(data, found, sm) for found in fatbins(data).values())


def census(data: bytes) -> Counter:
    """(section, kind, SM) -> bytes of images."""
    out = Counter()
    for section, found in fatbins(data).items():
        for c in found:
            for i in c.images:
                out[(section, KINDS.get(i.kind, str(i.kind)), i.sm)] += i.size
    return out


def image_digests(data: bytes, sm: int) -> list[str]:
    """sha256 of every SM `sm` cubin in the fat binary sections, as this module reads them, sorted."""
    return sorted(hashlib.sha256(data[i.offset:i.offset + i.size]).hexdigest()
                  for found in fatbins(data).values() for c in found for i in c.images if i.kind == 2 and i.sm == sm)


def triton_cuobjdump() -> str | None:
    """The cuobjdump Triton's wheel ships (no CUDA toolkit needed), or None where Triton or it is missing."""
    try:
        import triton
    except ImportError:
        return None
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return tool if os.access(tool, os.X_OK) else None


def cubin_digests(cuobjdump: str, path: str, sm: int) -> list[str]:
    """sha256 of every sm_`sm` cubin that NVIDIA's cuobjdump extracts from `path` (those of `.nv_fatbin`: it does
    not read `__nv_relfatbin`), sorted."""
    with tempfile.TemporaryDirectory() as out:
        r = subprocess.run([cuobjdump, "-xelf", "all", os.path.abspath(path)], cwd=out, capture_output=True, text=True)
        if r.returncode != 0 and "does not contain device code" not in r.stderr + r.stdout:
            raise ValueError(f"cuobjdump failed: {(r.stderr or r.stdout).strip()[-300:]}")
        return sorted(hashlib.sha256(open(os.path.join(out, f), "rb").read()).hexdigest()
                      for f in os.listdir(out) if f.endswith(f".sm_{sm}.cubin"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.fatbin", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="images per section: kind, SM, bytes").add_argument("libs", nargs="+")
    pr = sub.add_parser("prune", help="keep one SM's cubins, in place")
    pr.add_argument("--sm", type=int, required=True, help="the SM to keep, e.g. 90 for H100/H200")
    pr.add_argument("--check-with", metavar="CUOBJDUMP", default=None,
                    help="cuobjdump to check each library with: the same cubins of the kept SM before and after")
    pr.add_argument("libs", nargs="+")
    args = p.parse_args(argv)
    if args.cmd == "prune" and args.check_with:
        args.check_with = os.path.abspath(args.check_with)  # it runs in a scratch folder
        if not os.access(args.check_with, os.X_OK):
            p.error(f"--check-with {args.check_with}: not an executable cuobjdump")
    for path in args.libs:
        with open(path, "rb") as f:
            data = bytearray(f.read())
        try:
            if args.cmd == "list":
                for (section, kind, sm), n in sorted(census(data).items()):
                    print(f"{path}: {section} {kind} sm_{sm}: {n / 2**20:.2f} MiB")
                continue
            want = cubin_digests(args.check_with, path, args.sm) if args.check_with else None
            kept = image_digests(data, args.sm)
            freed = prune(data, args.sm)
            if image_digests(data, args.sm) != kept:  # before writing: a bug here never damages the file
                raise ValueError(f"pruning changed the sm_{args.sm} cubins (a bug in this tool): file left as it was")
            if freed:
                with open(path, "wb") as f:
                    f.write(data)
            if want is not None and cubin_digests(args.check_with, path, args.sm) != want:
                raise ValueError(f"cuobjdump finds other sm_{args.sm} cubins after pruning: the file is damaged")
        except NotELF as e:
            print(f"{path}: skipped: {e}")
            continue
        except ValueError as e:
            print(f"{path}: {e}", file=sys.stderr)
            return 1
        print(f"{path}: {freed / 2**20:.2f} MiB of device code for other targets zeroed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
