"""Compiling for GPUs and TPUs that are not here: abstract devices, and what the compiled
program says about the ring.

With `jax[cuda13]` and `libtpu` installed (the `aot` extra) and `JAX_PLATFORMS=cpu`,
`jax.experimental.topologies` describes A100, H100, H200 and B200 GPUs or TPU v4, v5e, v5p and v6e
chips without the hardware, and `jax.jit(f).lower(*ShapeDtypeStructs).compile()` runs the real
compilers for them (Triton, Mosaic GPU, Mosaic TPU included). That proves the kernels compile,
their shared memory, the per-chip memory and the compiled schedule; it does not prove results are
right or fast on the chip. Each chip's memory and peak are `ring_attn.chips`'s.

`ring_transfers` reads the scheduled HLO (`compiled.as_text()`): a ring transfer is hidden when a
kernel (or a step's `conditional` or loop holding one) runs between its `collective-permute-start`
and `-done`, or when the two lie on either side of a loop boundary; a synchronous
`collective-permute` is exposed. Ring transfers are the ppermutes traced under `RING_SCOPE`; the
layout's reorder and dk/dv's last hop home are not (nothing can run beside them).
"""

import dataclasses
import functools
import math
import os
import re

import jax
import numpy as np

from ring_attn.chips import CHIPS, Chip

RING_SCOPE = "ring_hop"  # the name scope of every ring transfer (see `ring._hop`)


@dataclasses.dataclass(frozen=True)
class CudaDevice:
    """A GPU as XLA's CUDA compiler describes it (its GpuDeviceInfo), with the figures of XLA's own
    device specs (xla/backends/gpu/target_config/specs). Memory size: `Chip.device_memory_bytes`."""

    compute_capability: tuple[int, int]
    core_count: int  # SMs
    fpus_per_core: int
    shared_memory_per_core: int
    shared_memory_per_block_optin: int  # what one block may ask for
    l2_cache_size: int
    clock_rate_ghz: float
    memory_bandwidth: int  # bytes/s, from the memory clock and bus width the driver reports
    description: str  # the device_kind the abstract devices then have


# The GPUs that can be compiled for, by `ring_attn.chips` key (the topology's prefix: 'a100:8').
CUDA_DEVICES = {
    "a100": CudaDevice((8, 0), 108, 64, 167936, 166912, 41943040, 1.41, 2039040000000, "NVIDIA A100-SXM4-80GB"),
    "h100": CudaDevice((9, 0), 132, 128, 233472, 232448, 52428800, 1.98, 3352320000000, "NVIDIA H100 80GB HBM3"),
    "h200": CudaDevice((9, 0), 132, 128, 233472, 232448, 52428800, 1.98, 4800000000000, "NVIDIA H200 141GB HBM3e"),
    "b200": CudaDevice((10, 0), 148, 128, 233472, 232448, 132644864, 1.965, 7672320000000, "NVIDIA B200"),
}

# The oldest CUDA whose PTX compiler generates code for each compute capability.
CUDA_FOR_CAPABILITY = {(8, 0): (11, 0), (9, 0): (12, 0), (10, 0): (12, 8)}


def cuda_target_config(key: str) -> str:
    """The GpuTargetConfig text (what XLA's deviceless compilation takes for a card) of the GPU
    `key` of `CUDA_DEVICES`."""
    device, chip = CUDA_DEVICES[key], CHIPS[key]
    major, minor = device.compute_capability
    capability = f"    major: {major}\n" + (f"    minor: {minor}\n" if minor else "")
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {device.shared_memory_per_core}
  threads_per_core_limit: 2048
  core_count: {device.core_count}
  fpus_per_core: {device.fpus_per_core}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {device.memory_bandwidth}
  l2_cache_size: {device.l2_cache_size}
  clock_rate_ghz: {device.clock_rate_ghz}
  device_memory_size: {int(chip.program_memory_bytes)}
  shared_memory_per_block_optin: {device.shared_memory_per_block_optin}
  cuda_compute_capability {{
{capability}  }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{
  major: 9
  minor: 3
}}
device_description_str: "{device.description}"
"""


@dataclasses.dataclass(frozen=True)
class TpuGeneration:
    """A TPU generation as libtpu's topology names it ('v6e:4x4')."""

    libtpu_name: str
    dims: int  # 3: a 3D torus of chips (v4, v5p); 2: a 2D one (v5e, v6e)
    # "megacore": one device a chip over its two TensorCores (as JAX runs v4 and v5p);
    # "default": one TensorCore a chip.
    chip_config: str
    host_bounds: tuple[int, int, int]  # the chips one host holds in a multi-host slice
    one_host_chips: int  # a slice of up to this many chips is one host (v5e-8 and v6e-8: 2x4)


# The TPUs that can be compiled for, by `ring_attn.chips` key.
TPU_GENERATIONS = {
    "v4": TpuGeneration("v4", 3, "megacore", (2, 2, 1), 4),
    "v5e": TpuGeneration("v5e", 2, "default", (2, 2, 1), 8),
    "v5p": TpuGeneration("v5p", 3, "megacore", (2, 2, 1), 4),
    "v6e": TpuGeneration("v6e", 2, "default", (2, 2, 1), 8),
}

H100_TARGET_CONFIG = cuda_target_config("h100")
H100_SHARED_MEMORY_PER_BLOCK = CUDA_DEVICES["h100"].shared_memory_per_block_optin
H100_MEMORY = int(CHIPS["h100"].program_memory_bytes)  # bytes: 80 GiB less what the driver keeps
V5P_MEMORY = int(CHIPS["v5p"].program_memory_bytes)  # HBM per v5p chip

TOPOLOGY_FORMS = (
    "'a100:G', 'h100:G', 'h200:G' or 'b200:G' (G GPUs on one host; 'h100:HxG': H hosts of G each), "
    "'v4:AxBxC' or 'v5p:AxBxC' (TPU chips, a 3D torus), 'v5e:AxB' or 'v6e:AxB' (TPU chips, a 2D torus)"
)


@dataclasses.dataclass(frozen=True)
class Topology:
    """Abstract accelerators to compile for: `devices`, what a `jax.sharding.Mesh` takes, each a
    `chip` of `ring_attn.chips`."""

    name: str
    platform: str  # "gpu" or "tpu"
    devices: tuple
    memory_per_chip: int
    chip: Chip | None = None

    @property
    def num_chips(self):
        return len(self.devices)


def topology(name: str) -> Topology:
    """The abstract devices of `name`, `TOPOLOGY_FORMS`: 'a100:8', 'h100:4x8' (4 hosts of 8),
    'h200:8', 'b200:8'; a TPU slice 'v4:2x2x1', 'v5p:4x4x4' (chips, each one megacore device) or
    'v5e:2x2', 'v6e:4x4' (chips). Needs the `aot` extra and a CPU backend. A chip the installed
    compilers cannot target raises RuntimeError saying what to install."""
    kind, _, shape = name.partition(":")
    dims = tuple(int(d) for d in shape.split("x")) if re.fullmatch(r"\d+(x\d+)*", shape) else ()
    generation = TPU_GENERATIONS.get(kind)
    gpus = kind in CUDA_DEVICES and len(dims) in (1, 2)
    if not all(dims) or not (gpus or (generation is not None and len(dims) == generation.dims)):
        raise ValueError(f"unknown topology {name!r}: expected {TOPOLOGY_FORMS}")
    _check_compiler(kind)
    chip = CHIPS[kind]
    memory = int(chip.program_memory_bytes)
    if gpus:
        from jax.experimental import topologies

        hosts, per_host = (1, *dims) if len(dims) == 1 else dims
        desc = topologies.get_topology_desc(
            platform="cuda", target_config=cuda_target_config(kind), topology=f"1x{hosts}x{per_host}"
        )
        return Topology(name, "gpu", tuple(desc.devices), memory, chip)
    if math.prod(dims) <= generation.one_host_chips:
        bounds = (*dims, 1, 1)[:3]
    else:
        bounds = tuple(min(d, b) for d, b in zip((*dims, 1), generation.host_bounds))
    desc = _tpu_topology(name, chip, generation, f"{generation.libtpu_name}:{shape}", bounds)
    return Topology(name, "tpu", tuple(desc.devices), memory, chip)


LIBTPU_LOCKFILE = "/tmp/libtpu_lockfile"


def _tpu_topology(name, chip, generation, libtpu_name, bounds):
    """libtpu's description of the slice `name`, its errors said in words."""
    from jax.experimental import topologies

    try:
        return topologies.get_topology_desc(
            platform="tpu", topology_name=libtpu_name, chip_config_name=generation.chip_config,
            chips_per_host_bounds=bounds, num_slices=1,
        )
    except jax.errors.JaxRuntimeError as error:
        text = str(error)
        message = text.strip().splitlines()[0] if text.strip() else text
        if LIBTPU_LOCKFILE in text:  # libtpu's own advice (remove the lock) would break the other process
            holder = _lock_holder(LIBTPU_LOCKFILE)
            other = "another process" if holder is None else f"another process (pid {holder})"
            raise RuntimeError(
                f"{other} on this host is compiling for TPU: libtpu runs one TPU compilation per host at a "
                "time; wait for the other one to finish, then run this again"
            ) from None
        if "Invalid TPU external name" in text or "Failed to obtain chip config" in text:
            raise RuntimeError(
                f"the installed libtpu {_version('libtpu')} cannot compile for {chip.name} ({message}): "
                "install a newer one, pip install -U libtpu (or pip install -e '.[aot]' from a newer checkout)"
            ) from None
        if "not divisible" in text:
            raise ValueError(
                f"topology {name!r} does not divide into hosts of {'x'.join(map(str, bounds))} chips (libtpu: "
                f"{message}): expected a slice that TPU hosts tile, e.g. 2x4, 4x4, 8x8 (v5e, v6e) or 2x2x2, 4x4x4 "
                "(v4, v5p)"
            ) from None
        raise


def _lock_holder(path):
    """The id of the process that holds the lock on `path` (from /proc/locks), or None where that
    cannot be told."""
    try:
        stat = os.stat(path)
        with open("/proc/locks") as locks:
            lines = locks.read().splitlines()
    except OSError:
        return None
    file_id = f"{os.major(stat.st_dev):02x}:{os.minor(stat.st_dev):02x}:{stat.st_ino}"
    for line in lines:  # "1: POSIX  ADVISORY  WRITE 22081 fe:00:2146442 0 EOF"
        fields = line.split()
        if len(fields) > 5 and fields[5] == file_id and fields[4].isdigit():
            return int(fields[4])
    return None


_COMPILERS = {"gpu": ("jax_plugins.xla_cuda13", "XLA's CUDA compiler"), "tpu": ("libtpu", "libtpu")}
# The pip packages that bring a PTX compiler (the CUDA wheels' nvJitLink and ptxas).
_PTX_COMPILERS = ("nvidia-nvjitlink", "nvidia-cuda-nvcc", "nvidia-nvjitlink-cu13", "nvidia-cuda-nvcc-cu13",
                  "nvidia-nvjitlink-cu12", "nvidia-cuda-nvcc-cu12")


def _installed(module):
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


def _version(package):
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def ptx_compiler():
    """The newest PTX compiler the installed CUDA wheels bring: ((major, minor), 'package version'),
    or None where there is none (a CUDA found elsewhere, whose version this cannot tell)."""
    found = []
    for package in _PTX_COMPILERS:
        if (version := _version(package)) and (m := re.match(r"(\d+)\.(\d+)", version)):
            found.append(((int(m.group(1)), int(m.group(2))), f"{package} {version}"))
    return max(found, default=None)


def missing_compiler(kind=None) -> str | None:
    """Why compiling for `kind` cannot happen here, or None. `kind`: a chip of `CUDA_DEVICES` or
    `TPU_GENERATIONS` ("a100", "v6e", ...), whose compiler must be installed and able to target it;
    None: whether the `aot` extra's compilers are installed at all."""
    kinds = ["h100", "v5p"] if kind is None else [kind]
    for name in kinds:
        module, what = _COMPILERS[CHIPS[name].platform]
        if not _installed(module):
            return (f"compiling for {name} needs {what}, which is not installed: pip install -e '.[aot]' "
                    "(Python 3.12), and run with JAX_PLATFORMS=cpu")
    if kind in CUDA_DEVICES:
        capability = CUDA_DEVICES[kind].compute_capability
        needed = CUDA_FOR_CAPABILITY[capability]
        found = ptx_compiler()
        if found is not None and found[0] < needed:
            return (f"compiling for {kind} (compute capability {'.'.join(map(str, capability))}) needs CUDA "
                    f"{'.'.join(map(str, needed))} or newer, and the newest PTX compiler installed is {found[1]}: "
                    "pip install -U 'jax[cuda13]' (or pip install -e '.[aot]')")
    return None


def _check_compiler(kind):
    if (why := missing_compiler(kind)) is not None:
        raise RuntimeError(why)


def mesh(topo: Topology, axes: dict[str, int]) -> jax.sharding.Mesh:
    """A mesh of `topo`'s devices with these axis sizes (their product is the chip count)."""
    sizes = tuple(axes.values())
    if int(np.prod(sizes)) != topo.num_chips:
        raise ValueError(f"mesh axes {axes} hold {int(np.prod(sizes))} devices, but {topo.name} has {topo.num_chips}")
    return jax.sharding.Mesh(np.array(topo.devices).reshape(sizes), tuple(axes))


# --- the compiled program ---------------------------------------------------------------------

KERNEL_TARGETS = {
    "__gpu$xla.gpu.triton": "triton",
    "mosaic_gpu": "mosaic_gpu",
    "mosaic_gpu_v2": "mosaic_gpu",
    "tpu_custom_call": "mosaic_tpu",
}


@dataclasses.dataclass(frozen=True)
class Instruction:
    name: str
    opcode: str
    operands: tuple[str, ...]
    called: tuple[str, ...]  # computations it runs (loop bodies, branches, fused computations)
    target: str | None  # a custom call's target
    op_name: str  # the JAX name stack it was traced under


@dataclasses.dataclass(frozen=True)
class Transfer:
    """One ring transfer in the compiled schedule."""

    name: str
    computation: str
    hidden: bool
    why: str


_COMPUTATION = re.compile(r"^(?:ENTRY )?%(\S+) .*\{$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = .*? ([a-z][a-z0-9-]*)\((.*)$")


@functools.lru_cache(maxsize=2)  # kernels, host_callbacks and ring_transfers read the same program
def parse_hlo(text: str) -> dict[str, list[Instruction]]:
    """The scheduled HLO module's computations, each its instructions in schedule order (not to
    be modified: the result is shared)."""
    computations, current = {}, None
    for line in text.splitlines():
        if m := _COMPUTATION.match(line):
            current = computations.setdefault(m.group(1), [])
            continue
        if line.strip() == "}":
            current = None
            continue
        if current is None or not (m := _INSTRUCTION.match(line)):
            continue
        name, opcode, rest = m.groups()
        operands = tuple(re.findall(r"%([\w.\-]+)", rest.split("), ")[0]))
        called = tuple(re.findall(
            r"(?:calls|body|condition|to_apply|true_computation|false_computation)=%([\w.\-]+)", rest
        ))
        if branches := re.search(r"branch_computations=\{([^}]*)\}", rest):
            called += tuple(re.findall(r"%([\w.\-]+)", branches.group(1)))
        target = re.search(r'custom_call_target="([^"]+)"', rest)
        op_name = re.search(r'op_name="([^"]*)"', rest)
        current.append(Instruction(
            name, opcode, operands, called, target and target.group(1), op_name.group(1) if op_name else ""
        ))
    return computations


def kernels(text: str) -> dict[str, int]:
    """How many Pallas kernel calls of each family ('triton', 'mosaic_gpu', 'mosaic_tpu') the
    program makes (each call site once)."""
    counts = {}
    for instructions in parse_hlo(text).values():
        for ins in instructions:
            if (family := KERNEL_TARGETS.get(ins.target)) is not None:
                counts[family] = counts.get(family, 0) + 1
    return counts


def host_callbacks(text: str) -> list[str]:
    """The host callbacks in the program (an interpreted kernel leaves them; compiled ones don't)."""
    return [ins.name for instructions in parse_hlo(text).values() for ins in instructions
            if ins.target is not None and "callback" in ins.target]


def ring_transfers(text: str) -> list[Transfer]:
    """Every ring transfer of the program (a ppermute traced under `RING_SCOPE`), hidden or not."""
    computations = parse_hlo(text)
    holds_kernel = {}

    def runs_kernel(ins):
        if ins.target in KERNEL_TARGETS:
            return True
        return any(computation_runs_kernel(c) for c in ins.called)

    def computation_runs_kernel(name):
        if name not in holds_kernel:
            holds_kernel[name] = False  # no recursion through a cycle
            holds_kernel[name] = any(runs_kernel(i) for i in computations.get(name, ()))
        return holds_kernel[name]

    transfers = []
    for comp, instructions in computations.items():
        position = {ins.name: i for i, ins in enumerate(instructions)}
        done_of = {ins.operands[0]: ins for ins in instructions
                   if ins.opcode == "collective-permute-done" and ins.operands}
        for i, ins in enumerate(instructions):
            if RING_SCOPE not in ins.op_name:
                continue
            if ins.opcode == "collective-permute":
                transfers.append(Transfer(ins.name, comp, False, "synchronous collective-permute"))
            elif ins.opcode == "collective-permute-start":
                done = done_of.get(ins.name)
                if done is None:
                    transfers.append(Transfer(ins.name, comp, True, "its done is across a loop boundary"))
                    continue
                between = instructions[i + 1:position[done.name]]
                overlapped = [b.name for b in between if runs_kernel(b)]
                why = f"in flight over {', '.join(overlapped)}" if overlapped else "no kernel runs while in flight"
                transfers.append(Transfer(ins.name, comp, bool(overlapped), why))
    for comp, instructions in computations.items():  # a done whose start is in another computation
        starts = {ins.name for ins in instructions if ins.opcode == "collective-permute-start"}
        for ins in instructions:
            if (ins.opcode == "collective-permute-done" and RING_SCOPE in ins.op_name and ins.operands
                    and ins.operands[0] not in starts):
                transfers.append(Transfer(ins.name, comp, True, "its start is across a loop boundary"))
    return transfers


def exposed(transfers: list[Transfer]) -> list[Transfer]:
    return [t for t in transfers if not t.hidden]


@dataclasses.dataclass(frozen=True)
class CudaKernel:
    """One kernel launch of the compiled CUDA program, as XLA's thunk sequence lists it."""

    name: str
    grid: tuple[int, int, int]
    threads: tuple[int, int, int]
    shared_memory: int  # bytes


_THUNK = re.compile(
    r"kCustomKernel\s.*?\]\s+(\S+) grid: \[(\d+), (\d+), (\d+)\] threads: \[(\d+), (\d+), (\d+)\]\s+"
    r"shared_memory: (\d+) bytes"
)


def cuda_launches(dump_dir: str) -> list[CudaKernel]:
    """Every kernel launch of a CUDA compilation dumped with `compile(compiler_options=
    {"xla_dump_to": dump_dir})`, as XLA's thunk sequence lists it: a kernel's `__N` copies (each
    a binary of its own) apart. Mosaic GPU kernels are compiled by JAX, not XLA, and are not listed."""
    import pathlib

    launches = []
    for path in sorted(pathlib.Path(dump_dir).glob("*thunk_sequence.txt")):
        for m in _THUNK.finditer(path.read_text()):
            numbers = tuple(int(g) for g in m.groups()[1:])
            launches.append(CudaKernel(m.group(1), numbers[0:3], numbers[3:6], numbers[6]))
    return launches


def cuda_kernels(dump_dir: str, prefix: str = "") -> list[CudaKernel]:
    """`cuda_launches`, each distinct launch (name, grid, threads, shared memory) once, its `__N`
    copies folded, those named with `prefix` only."""
    found = {}
    for launch in cuda_launches(dump_dir):
        kernel = dataclasses.replace(launch, name=re.sub(r"__\d+$", "", launch.name))
        if kernel.name.startswith(prefix):
            found.setdefault(kernel, kernel)
    return list(found)
