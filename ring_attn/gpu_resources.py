"""What the compilers made of each GPU kernel of a deviceless H100 compilation: registers a
thread uses, bytes spilled to local memory, shared memory, threads, and the occupancy they allow.

Where each number comes from:
- registers and stack frame: the cubins the executable carries (`jax.experimental.serialize_executable`;
  XLA stores them in Riegeli records, Snappy-compressed), the ELF's `.nv.info` (EIATTR_REGCOUNT,
  EIATTR_FRAME_SIZE); static shared memory: its `.nv.shared.<kernel>` section (on Hopper it holds the
  1 KiB the toolchain reserves per block).
- spill stores and loads (which no binary records): `ptxas -v` on the kernel's PTX in the mode
  both compilers build with (relocatable, `-c`: XLA links through nvJitLink, Mosaic GPU compiles
  then links). Each replay must give the binary's registers and frame exactly, or the kernel is
  reported as not matching. The PTX: Triton kernels' from XLA's dump (`xla_dump_emitter_re=ptx`),
  Mosaic GPU kernels' from the cubin itself (its `.nv_debug_ptx_txt`).
- threads and dynamic shared memory (launch parameters, not in a binary): Triton kernels' from
  XLA's thunk sequence; Mosaic GPU kernels' threads from their PTX's `.maxntid` and shared memory
  from the resources Mosaic GPU dumps while lowering (`MOSAIC_GPU_DUMP_TO`: scratch plus 8 bytes
  per mbarrier), by kernel name (the largest, should lowerings of one name differ).

    compiled = compile_for_resources(jax.jit(f), args, dump_dir)
    for k in kernel_resources(compiled, dump_dir):
        print(k.name, k.registers, k.spill_stores, k.occupancy.warps_per_sm)

Needs the `aot` extra (XLA's CUDA compiler, with CUDA's ptxas) and JAX_PLATFORMS=cpu.
"""

import contextlib
import dataclasses
import math
import os
import pathlib
import pickletools
import re
import shutil
import struct
import subprocess
import tempfile

from ring_attn import aot

# --- the streaming multiprocessor -----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SmLimits:
    """Per-SM resources of a GPU and the units they are handed out in."""

    registers: int = 65536
    shared_memory: int = 233472  # 228 KiB
    threads: int = 2048
    blocks: int = 32
    warp_size: int = 32
    register_unit: int = 256  # registers are allocated per warp in units of 256
    shared_memory_unit: int = 128
    max_registers_per_thread: int = 255


H100 = SmLimits()


@dataclasses.dataclass(frozen=True)
class Occupancy:
    """Resident blocks and warps per SM, and which resources bind (`limits`: blocks each allows)."""

    blocks_per_sm: int
    warps_per_sm: int
    limited_by: tuple[str, ...]
    limits: tuple[tuple[str, int], ...]


def occupancy(registers: int, threads: int, shared_memory: int, sm: SmLimits = H100) -> Occupancy:
    """Blocks and warps an SM holds at once for a kernel of `registers` per thread, `threads` per
    block and `shared_memory` bytes per block (dynamic plus static), as CUDA's occupancy calculator
    counts them."""
    warps = -(-threads // sm.warp_size)
    registers_per_warp = -(-registers * sm.warp_size // sm.register_unit) * sm.register_unit
    shared = -(-shared_memory // sm.shared_memory_unit) * sm.shared_memory_unit
    limits = {
        "registers": sm.registers // (registers_per_warp * warps) if registers else None,
        "shared_memory": sm.shared_memory // shared if shared else None,  # a kernel that uses none
        "threads": sm.threads // (warps * sm.warp_size),
        "blocks": sm.blocks,
    }
    limits = {k: v for k, v in limits.items() if v is not None}
    blocks = min(limits.values())
    binding = tuple(k for k, v in limits.items() if v == blocks)
    return Occupancy(blocks, blocks * warps, binding, tuple(limits.items()))


# --- one kernel -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class KernelResources:
    """One compiled kernel (call sites compiling to the same binary counted in `copies`)."""

    name: str  # the kernel's name (a Mosaic GPU kernel's without its `_mosaic_gpu_kernel` suffix)
    family: str  # "triton" or "mosaic_gpu"
    registers: int  # per thread
    spill_stores: int  # bytes
    spill_loads: int  # bytes
    stack_frame: int  # bytes of local memory per thread
    shared_memory: int  # bytes per block: dynamic (at launch) plus static
    threads: int  # per block
    occupancy: Occupancy
    replay_matches_binary: bool  # ptxas's registers and frame are the shipped binary's
    copies: int = 1

    @property
    def spilled(self) -> int:
        return self.spill_stores + self.spill_loads

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["occupancy"]["limits"] = dict(self.occupancy.limits)
        return d


MOSAIC_SUFFIX = "_mosaic_gpu_kernel"
PTX_DUMP_OPTIONS = {"xla_dump_emitter_re": "ptx"}


def compile_for_resources(jitted, args, dump_dir):
    """`jitted.lower(*args).compile()`, leaving in `dump_dir` what `kernel_resources` reads: XLA's
    dump (thunk sequence, Triton kernels' PTX) and the resources Mosaic GPU kernels report while
    lowering. Mosaic GPU reads its dump switch at lowering and again at compiling, so it is on only
    while lowering (on at compiling, it would write every pass of every kernel)."""
    mosaic_dump = pathlib.Path(dump_dir) / "mosaic"
    mosaic_dump.mkdir(parents=True, exist_ok=True)
    with _env(MOSAIC_GPU_DUMP_TO=str(mosaic_dump)):
        lowered = jitted.lower(*args)
    return lowered.compile(compiler_options={"xla_dump_to": str(pathlib.Path(dump_dir) / "xla"), **PTX_DUMP_OPTIONS})


@contextlib.contextmanager
def _env(**values):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def kernel_resources(compiled, dump_dir, *, prefix: str = "ring_attn", sm: SmLimits = H100) -> list[KernelResources]:
    """Every kernel named with `prefix` in `compiled` (from `compile_for_resources(..., dump_dir)`)."""
    dump_dir = pathlib.Path(dump_dir)
    launches = _thunk_launches(dump_dir / "xla")
    mosaic_shared = _mosaic_shared_memory(dump_dir / "mosaic")
    triton_ptx = _dumped_ptx(dump_dir / "xla", prefix)
    found, replays = {}, {}
    for binary in executable_kernels(compiled):
        if not binary.name.startswith(prefix):
            continue
        mosaic = binary.name.endswith(MOSAIC_SUFFIX)
        name = binary.name.removesuffix(MOSAIC_SUFFIX)
        ptx = binary.ptx if mosaic else triton_ptx.get(binary.name)
        if ptx is None:
            where = "in its cubin" if mosaic else f"in XLA's dump: was the program compiled with {PTX_DUMP_OPTIONS}?"
            raise LookupError(f"no PTX for {binary.name} {where}")
        if ptx not in replays:  # the call sites of one kernel share their PTX
            replays[ptx] = replay_ptxas(ptx)
        replay = replays[ptx][binary.name]
        if mosaic:
            if name not in mosaic_shared:
                raise LookupError(f"no Mosaic GPU resources for {name}: was it lowered by compile_for_resources?")
            threads, dynamic = _ptx_threads(ptx), mosaic_shared[name]
        else:
            if binary.name not in launches:
                raise LookupError(f"{binary.name} is not in XLA's thunk sequence")
            threads, dynamic = launches[binary.name]
        shared = dynamic + binary.static_shared_memory
        row = KernelResources(
            name=name, family="mosaic_gpu" if mosaic else "triton", registers=binary.registers,
            spill_stores=replay.spill_stores, spill_loads=replay.spill_loads, stack_frame=binary.stack_frame,
            shared_memory=shared, threads=threads, occupancy=occupancy(binary.registers, threads, shared, sm),
            replay_matches_binary=(replay.registers, replay.stack_frame) == (binary.registers, binary.stack_frame),
        )
        found[row] = found.get(row, 0) + 1
    return [dataclasses.replace(row, copies=n) for row, n in found.items()]


# --- the binaries the executable carries ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BinaryKernel:
    """A kernel function of a cubin: what its ELF records."""

    name: str
    registers: int
    stack_frame: int
    static_shared_memory: int
    ptx: str | None  # the PTX ptxas embedded, when it did (Mosaic GPU kernels)


def executable_kernels(compiled) -> list[BinaryKernel]:
    """The kernel functions of every cubin in `compiled`'s serialized executable."""
    found = []
    for elf in cubins(_executable_bytes(compiled)):
        found.extend(_cubin_kernels(elf))
    return found


def _executable_bytes(compiled) -> bytes:
    """The XLA executable's serialization inside `serialize_executable`'s pickle (its largest bytes
    argument), read without unpickling anything."""
    from jax.experimental import serialize_executable

    pickled, _, _ = serialize_executable.serialize(compiled)
    blobs = [arg for op, arg, _ in pickletools.genops(pickled) if isinstance(arg, bytes)]
    return max(blobs, key=len)


def cubins(data: bytes) -> list[bytes]:
    """The ELF images in `data`, looking inside the Riegeli file it holds (whose records may hold one)."""
    if (i := data.find(RIEGELI_SIGNATURE)) >= 0:
        # Only the first file: others found further on lie inside its records, cut by its block headers.
        return [elf for record in riegeli_records(data[i:]) for elf in cubins(record)]
    return [data[i:i + size] for i in _find_all(data, b"\x7fELF\x02") if (size := _elf_size(data, i))]


def _find_all(data, pattern):
    i = data.find(pattern)
    while i >= 0:
        yield i
        i = data.find(pattern, i + 1)


def _elf_size(data, i):
    """Bytes of the 64-bit little-endian ELF at i (its section headers come last), or None."""
    if len(data) < i + 64 or data[i + 4] != 2 or data[i + 5] != 1:
        return None
    shoff, = struct.unpack_from("<Q", data, i + 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, i + 0x3A)
    size = shoff + shentsize * shnum
    return size if shentsize == 64 and 0 < size <= len(data) - i else None


# Riegeli: 64 KiB blocks, each opened by a 24-byte block header; chunks of a 40-byte header and data.
# The signature is the hash of the first block header, the same in every file.
RIEGELI_SIGNATURE = b"\x83\xafp\xd1\r\x88J?"
_BLOCK = 1 << 16
_BLOCK_HEADER = 24
_CHUNK_HEADER = 40
_SIMPLE_CHUNK = ord("r")


def riegeli_records(data: bytes) -> list[bytes]:
    """The records of the Riegeli file at the start of `data` (simple chunks, uncompressed or
    Snappy); whatever follows the file is ignored."""
    stream = b"".join(data[k + _BLOCK_HEADER:k + _BLOCK] for k in range(0, len(data), _BLOCK))
    records, i = [], 0
    while i + _CHUNK_HEADER <= len(stream):
        _, size, _, type_and_count, decoded = struct.unpack_from("<QQQQQ", stream, i)
        chunk_type, count = type_and_count & 0xFF, type_and_count >> 8
        if chunk_type not in b"smrtp" or i + _CHUNK_HEADER + size > len(stream):
            break  # past the file's last chunk
        chunk = stream[i + _CHUNK_HEADER:i + _CHUNK_HEADER + size]
        # A chunk spans at least as many bytes as it has records (positions address records).
        i += max(_CHUNK_HEADER + size, count)
        if chunk_type == _SIMPLE_CHUNK and size:
            records.extend(_simple_chunk_records(chunk, count, decoded))
    return records


def _simple_chunk_records(chunk, count, decoded):
    compression = chunk[0]
    sizes_length, j = _varint(chunk, 1)
    sizes, values = chunk[j:j + sizes_length], chunk[j + sizes_length:]
    if compression == ord("s"):
        sizes, values = (_snappy(block[_varint(block, 0)[1]:]) for block in (sizes, values))
    elif compression != 0:
        raise NotImplementedError(f"Riegeli compression {chr(compression)!r} (only Snappy is read)")
    records, p, q = [], 0, 0
    for _ in range(count):
        length, p = _varint(sizes, p)
        records.append(values[q:q + length])
        q += length
    if q != decoded or len(values) != decoded:
        raise ValueError(f"Riegeli chunk decodes to {q} bytes of records, its header says {decoded}")
    return records


def _varint(data, i):
    value = shift = 0
    while True:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def _snappy(data: bytes) -> bytes:
    """Decompresses raw Snappy (a length, then literals and back-references)."""
    length, i = _varint(data, 0)
    out = bytearray()
    while i < len(data):
        tag = data[i]
        i += 1
        kind = tag & 3
        if kind == 0:  # literal
            n = tag >> 2
            if n >= 60:
                width = n - 59
                n = int.from_bytes(data[i:i + width], "little")
                i += width
            out += data[i:i + n + 1]
            i += n + 1
            continue
        if kind == 1:
            n, offset = ((tag >> 2) & 7) + 4, ((tag >> 5) << 8) | data[i]
            i += 1
        else:
            width = 2 if kind == 2 else 4
            n, offset = (tag >> 2) + 1, int.from_bytes(data[i:i + width], "little")
            i += width
        start = len(out) - offset
        if offset >= n:
            out += out[start:start + n]
        else:  # the copy overlaps what it writes: the last `offset` bytes repeat
            out += (out[start:] * (n // offset + 1))[:n]
    if len(out) != length:
        raise ValueError(f"Snappy data decodes to {len(out)} bytes, its header says {length}")
    return bytes(out)


# ELF .nv.info attributes (EIATTR_*): each entry is format, attribute, a 16-bit value or size.
_EIATTR_FRAME_SIZE, _EIATTR_REGCOUNT = 0x11, 0x2F
_EIFMT_SVAL = 4


def _sections(elf):
    shoff, = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)
    headers = [struct.unpack_from("<IIQQQQIIQQ", elf, shoff + k * shentsize) for k in range(shnum)]
    names_at = headers[shstrndx][4]

    def name(offset):
        return elf[names_at + offset:elf.index(b"\0", names_at + offset)].decode()

    # (name, type, offset, size, link), in section-index order
    return [(name(h[0]), h[1], h[4], h[5], h[6]) for h in headers]


def _symbols(elf, sections):
    _, _, offset, size, link = next(s for s in sections if s[0] == ".symtab")
    strings_at = sections[link][2]
    names = []
    for k in range(size // 24):
        st_name, = struct.unpack_from("<I", elf, offset + 24 * k)
        names.append(elf[strings_at + st_name:elf.index(b"\0", strings_at + st_name)].decode())
    return names


def _cubin_kernels(elf) -> list[BinaryKernel]:
    listed = _sections(elf)
    sections = {s[0]: s[2:4] for s in listed}  # name -> (offset, size)
    if ".nv.info" not in sections:
        return []
    symbols = _symbols(elf, listed)
    offset, size = sections[".nv.info"]
    attributes, i = {}, offset
    while i < offset + size:
        fmt, attribute, value = struct.unpack_from("<BBH", elf, i)
        i += 4
        if fmt == _EIFMT_SVAL:
            if attribute in (_EIATTR_FRAME_SIZE, _EIATTR_REGCOUNT) and value == 8:
                symbol, number = struct.unpack_from("<II", elf, i)
                attributes.setdefault(symbols[symbol], {})[attribute] = number
            i += value
    kernels = []
    for name, found in attributes.items():
        if f".text.{name}" not in sections:
            continue  # a device function, not a kernel
        shared = sections.get(f".nv.shared.{name}")
        ptx = next((s for n, s in sections.items() if n.startswith(".nv_debug_ptx_txt")), None)
        kernels.append(BinaryKernel(
            name=name, registers=found.get(_EIATTR_REGCOUNT, 0), stack_frame=found.get(_EIATTR_FRAME_SIZE, 0),
            static_shared_memory=shared[1] if shared else 0,
            ptx=elf[ptx[0]:ptx[0] + ptx[1]].replace(b"\0", b"\n").decode() if ptx else None,
        ))
    return kernels


# --- ptxas ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PtxasReport:
    registers: int
    stack_frame: int
    spill_stores: int
    spill_loads: int


def ptxas() -> str:
    """The ptxas of the CUDA that JAX's CUDA plugin uses (the compilers' own version), else one on PATH."""
    try:
        from jax._src import lib

        bundled = pathlib.Path(lib.cuda_path or "") / "bin" / "ptxas"
        if lib.cuda_path and bundled.exists():
            return str(bundled)
    except ImportError:
        pass
    if found := shutil.which("ptxas"):
        return found
    raise FileNotFoundError("no ptxas: install the aot extra (jax[cuda13] brings CUDA's ptxas)")


_PTX_TARGET = re.compile(r"^\s*\.target\s+(sm_\w+)", re.M)
_PTXAS_FUNCTION = re.compile(r"(?:Compiling entry function|Function properties for) '?([\w$.]+)'?")
_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")


def replay_ptxas(ptx: str) -> dict[str, PtxasReport]:
    """`ptxas -c -v` on `ptx` for its own target: per entry function, registers, stack frame and
    spills."""
    target = _PTX_TARGET.search(ptx)
    if target is None:
        raise ValueError("PTX without a .target")
    with tempfile.TemporaryDirectory() as tmp:
        source = pathlib.Path(tmp) / "kernel.ptx"
        source.write_text(ptx)
        result = subprocess.run(
            [ptxas(), f"-arch={target.group(1)}", "-c", "-v", str(source), "-o", str(source.with_suffix(".o"))],
            capture_output=True, text=True, check=False,
        )
    if result.returncode:
        raise RuntimeError(f"ptxas failed: {result.stderr[-2000:]}")
    found, current = {}, None
    for line in result.stderr.splitlines():
        if m := _PTXAS_FUNCTION.search(line):
            current = found.setdefault(m.group(1), {})
        elif current is not None and (m := _PTXAS_FRAME.search(line)):
            current.update(stack_frame=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif current is not None and (m := _PTXAS_REGISTERS.search(line)):
            current["registers"] = int(m.group(1))
    return {name: PtxasReport(**numbers) for name, numbers in found.items() if "registers" in numbers}


_PTX_ENTRY = re.compile(r"^\.visible \.entry ([\w$]+)\(", re.M)
_PTX_THREADS = re.compile(r"^\s*\.(?:maxntid|reqntid)\s+(\d+)(?:,\s*(\d+))?(?:,\s*(\d+))?", re.M)


def _ptx_threads(ptx):
    m = _PTX_THREADS.search(ptx)
    if m is None:
        raise ValueError("PTX without .maxntid or .reqntid: the block size is not in it")
    return int(m.group(1)) * int(m.group(2) or 1) * int(m.group(3) or 1)


# --- the dumps ------------------------------------------------------------------------------------


def _dumped_ptx(xla_dump, prefix):
    """Entry name -> the PTX file's text, for XLA's dumped modules that define one named `prefix`."""
    found = {}
    for path in sorted(pathlib.Path(xla_dump).glob("*.ptx")):
        text = path.read_text()
        for name in _PTX_ENTRY.findall(text):
            if name.startswith(prefix):
                found[name] = text
    return found


def _thunk_launches(xla_dump):
    """Kernel name (each `__N` copy its own) -> (threads, dynamic shared memory) of its launches."""
    return {k.name: (math.prod(k.threads), k.shared_memory) for k in aot.cuda_launches(xla_dump)}


_RESOURCES = re.compile(r"smem_scratch_bytes=(\d+)")
_BARRIERS = re.compile(r"num_barriers=(\d+)[^)]*\): (\d+)")
MBARRIER_BYTES = 8


def _mosaic_shared_memory(mosaic_dump):
    """Kernel name -> dynamic shared memory Mosaic GPU launches it with (scratch, then mbarriers),
    the largest where lowerings of one name differ."""
    found = {}
    for path in sorted(pathlib.Path(mosaic_dump).glob("*.resources.txt")):
        text = path.read_text()
        scratch = _RESOURCES.search(text)
        if scratch is None:
            raise ValueError(f"{path.name} does not read as Mosaic GPU resources: {text[:200]!r}")
        barriers = sum(int(n) * int(count) for n, count in _BARRIERS.findall(text))
        name = re.sub(r"_\d+$", "", path.name.removesuffix(".resources.txt"))
        found[name] = max(found.get(name, 0), int(scratch.group(1)) + MBARRIER_BYTES * barriers)
    return found


# --- reading the results --------------------------------------------------------------------------

# The ring's kernels by name: which pass each computes.
PASSES = (("_bwd_dkv", "dk/dv"), ("_bwd_dq", "dq"), ("_fwd", "forward"))


def kernel_pass(name: str) -> str:
    """'forward', 'dq' or 'dk/dv' for a ring_attn kernel name (else the name)."""
    return next((label for key, label in PASSES if key in name), name)


def by_pass(kernels: list[KernelResources]) -> dict[str, list[KernelResources]]:
    """The kernels of each pass (forward, dq, dk/dv), each pass's variants together."""
    found = {}
    for k in kernels:
        found.setdefault(kernel_pass(k.name), []).append(k)
    order = [label for _, label in reversed(PASSES)]
    return dict(sorted(found.items(), key=lambda item: order.index(item[0]) if item[0] in order else len(order)))


def _span(values):
    low, high = min(values), max(values)
    return f"{low:,}" if low == high else f"{low:,}-{high:,}"


def markdown_table(groups: list[tuple[dict, list[KernelResources]]]) -> str:
    """One row per group (its labels, e.g. kernels, head dims, pass; then its variants' numbers,
    a range where the variants differ). Occupancy is the group's lowest."""
    labels = list(groups[0][0]) if groups else []
    header = [*labels, "binaries", "registers", "spill stores / loads (bytes)", "stack frame (bytes)",
              "shared memory (bytes)", "threads", "blocks/SM", "warps/SM", "limited by"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for group_labels, kernels in groups:
        least = min(kernels, key=lambda k: k.occupancy.warps_per_sm).occupancy
        cells = [
            *(str(group_labels[label]) for label in labels), str(sum(k.copies for k in kernels)),
            _span([k.registers for k in kernels]),
            f"{_span([k.spill_stores for k in kernels])} / {_span([k.spill_loads for k in kernels])}",
            _span([k.stack_frame for k in kernels]), _span([k.shared_memory for k in kernels]),
            _span([k.threads for k in kernels]), str(least.blocks_per_sm), str(least.warps_per_sm),
            ", ".join(least.limited_by),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
