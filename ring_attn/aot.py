"""Compiling for GPUs and TPUs that are not here: abstract devices, and what the compiled
program says about the ring.

With `jax[cuda13]` and `libtpu` installed (the `aot` extra) and `JAX_PLATFORMS=cpu`,
`jax.experimental.topologies` describes H100s or TPU v5p chips without the hardware, and
`jax.jit(f).lower(*ShapeDtypeStructs).compile()` runs the real compilers for them (Triton, Mosaic
GPU, Mosaic TPU included). That proves the kernels compile, their shared memory, the per-chip
memory and the compiled schedule; it does not prove results are right or fast on the chip.

`ring_transfers` reads the scheduled HLO (`compiled.as_text()`): a ring transfer is hidden when a
kernel (or a step's `conditional` or loop holding one) runs between its `collective-permute-start`
and `-done`, or when the two lie on either side of a loop boundary; a synchronous
`collective-permute` is exposed. Ring transfers are the ppermutes traced under `RING_SCOPE`; the
layout's reorder and dk/dv's last hop home are not (nothing can run beside them).
"""

import dataclasses
import functools
import re

import jax
import numpy as np

RING_SCOPE = "ring_hop"  # the name scope of every ring transfer (see `ring._hop`)

# An H100 SXM's GpuTargetConfig (the text XLA's deviceless compilation takes for the card).
H100_TARGET_CONFIG = """gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 84929347584
  shared_memory_per_block_optin: 232448
  cuda_compute_capability {
    major: 9
  }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info {
  major: 9
  minor: 3
}
device_description_str: "NVIDIA H100 80GB HBM3"
"""
H100_SHARED_MEMORY_PER_BLOCK = 232448
H100_MEMORY = 84929347584  # bytes, as the target config says (80 GiB less what the driver keeps)
V5P_MEMORY = 95 * 2**30  # HBM per v5p chip

TOPOLOGY_FORMS = "'h100:G' (G GPUs on one host), 'h100:HxG' (H hosts of G), or 'v5p:AxBxC' (chips)"


@dataclasses.dataclass(frozen=True)
class Topology:
    """Abstract accelerators to compile for: `devices`, what a `jax.sharding.Mesh` takes."""

    name: str
    platform: str  # "gpu" or "tpu"
    devices: tuple
    memory_per_chip: int

    @property
    def num_chips(self):
        return len(self.devices)


def topology(name: str) -> Topology:
    """The abstract devices of `name`: 'h100:8', 'h100:4x8' or a TPU v5p slice 'v5p:2x2x1',
    'v5p:4x4x4' (chips, each one megacore device). Needs the `aot` extra and a CPU backend."""
    from jax.experimental import topologies

    kind, _, shape = name.partition(":")
    _check_compiler(kind)
    dims = tuple(int(d) for d in shape.split("x")) if re.fullmatch(r"\d+(x\d+)*", shape) else ()
    if kind == "h100" and len(dims) in (1, 2) and all(dims):
        hosts, gpus = (1, *dims) if len(dims) == 1 else dims
        desc = topologies.get_topology_desc(
            platform="cuda", target_config=H100_TARGET_CONFIG, topology=f"1x{hosts}x{gpus}"
        )
        return Topology(name, "gpu", tuple(desc.devices), H100_MEMORY)
    if kind == "v5p" and len(dims) == 3 and all(dims):
        bounds = tuple(min(d, b) for d, b in zip(dims, (2, 2, 1)))
        desc = topologies.get_topology_desc(
            platform="tpu", topology_name=name, chip_config_name="megacore", chips_per_host_bounds=bounds,
            num_slices=1,
        )
        return Topology(name, "tpu", tuple(desc.devices), V5P_MEMORY)
    raise ValueError(f"unknown topology {name!r}: expected {TOPOLOGY_FORMS}")


_COMPILERS = {"h100": ("jax_plugins.xla_cuda13", "XLA's CUDA compiler"), "v5p": ("libtpu", "libtpu")}


def _installed(module):
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


def missing_compiler(kind=None) -> str | None:
    """Why compiling for `kind` ("h100", "v5p"; None: both) cannot happen here, or None."""
    for name, (module, what) in _COMPILERS.items():
        if kind in (None, name) and not _installed(module):
            return (f"compiling for {name} needs {what}, which is not installed: pip install -e '.[aot]' "
                    "(Python 3.12), and run with JAX_PLATFORMS=cpu")
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


def cuda_kernels(dump_dir: str, prefix: str = "") -> list[CudaKernel]:
    """The generated kernels of a CUDA compilation dumped with `compile(compiler_options=
    {"xla_dump_to": dump_dir})`, each distinct launch (name, grid, threads, shared memory) once,
    its `__N` copies folded, those named with `prefix` only. Mosaic GPU kernels are compiled by
    JAX, not XLA, and are not listed."""
    import pathlib

    found = {}
    for path in sorted(pathlib.Path(dump_dir).glob("*thunk_sequence.txt")):
        for m in _THUNK.finditer(path.read_text()):
            name = re.sub(r"__\d+$", "", m.group(1))
            if name.startswith(prefix):
                numbers = tuple(int(g) for g in m.groups()[1:])
                found.setdefault((name, numbers), CudaKernel(name, numbers[0:3], numbers[3:6], numbers[6]))
    return list(found.values())
