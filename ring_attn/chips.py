"""The accelerators users rent, by their spec sheets: dense bf16 peak, HBM size and bandwidth.

One table serves the roofline benchmarks (% of peak, % of bandwidth: the MFU the field quotes),
the cost model (`ring_attn.cost.HARDWARE`) and deviceless compilation (`ring_attn.aot`). A chip is
found from `jax.Device.device_kind`, which names the model ("NVIDIA H100 80GB HBM3", "TPU v5 lite").
Pure Python: no JAX import.

Sources: NVIDIA's A100 (80GB SXM4: 2,039 GB/s; 40GB: 1,555 GB/s; 80GB PCIe: 1,935 GB/s), H100
(SXM: 989 TFLOP/s, 80 GB, 3.35 TB/s; PCIe: 756 TFLOP/s, 80 GB, 2.0 TB/s), H200 SXM (989 TFLOP/s,
141 GB, 4.8 TB/s) and HGX B200 (2.25 PFLOP/s dense a GPU, 180 GB, 8 TB/s) datasheets, their sparse
figures halved; Google Cloud's TPU pages: v4 (275 TFLOP/s, 32 GiB, 1,200 GB/s), v5e (197 TFLOP/s,
16 GiB, 819 GB/s), v5p (459 TFLOP/s, 95 GiB, 2,765 GB/s), v6e (918 TFLOP/s, 32 GiB, 1,640 GB/s).
Device memory, what a program may allocate: the GPUs' total global memory as XLA's own device
specs record it (xla/backends/gpu/target_config/specs; the H100's as this package's deviceless
target has it); for TPU v4, v5e and v6e the HBM libtpu's compiler says is available (30.75, 15.75
and 31.24 GiB). v5p keeps its spec sheet's 95 GiB, below the 95.73 GiB libtpu reports.
"""

from __future__ import annotations

import dataclasses
import re

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator model. `kinds`: regular expressions that its `device_kind` matches."""

    key: str
    name: str
    platform: str  # "gpu" or "tpu"
    flops_per_s: float  # dense bf16
    memory_bytes: float
    hbm_bytes_per_s: float
    kinds: tuple[str, ...]
    # The memory as the device or its compiler offers it to a program (a GPU's total global
    # memory, a TPU's HBM less what the runtime keeps), which the spec sheet rounds ("80 GB");
    # None: the spec sheet's figure.
    device_memory_bytes: float | None = None

    @property
    def program_memory_bytes(self) -> float:
        """What a program may allocate: the device's own figure where known, else the spec sheet's."""
        return self.memory_bytes if self.device_memory_bytes is None else self.device_memory_bytes


CHIPS = {
    chip.key: chip
    for chip in (
        Chip("a100", "A100 SXM4 80GB", "gpu", 312e12, 80e9, 2.039e12, (r"A100.*SXM.*80GB", r"A100-SXM4-80GB"),
             device_memory_bytes=85100068864),
        Chip("a100-40gb", "A100 SXM4 40GB", "gpu", 312e12, 40e9, 1.555e12, (r"A100.*40GB",)),
        Chip("a100-pcie", "A100 80GB PCIe", "gpu", 312e12, 80e9, 1.935e12, (r"A100.*PCIe",)),
        Chip("h100", "H100 SXM", "gpu", 989e12, 80e9, 3.35e12, (r"H100 80GB HBM3", r"H100 SXM"),
             device_memory_bytes=84929347584),
        Chip("h100-pcie", "H100 PCIe", "gpu", 756e12, 80e9, 2.0e12, (r"H100.*PCIe",)),
        Chip("h200", "H200 SXM", "gpu", 989e12, 141e9, 4.8e12, (r"H200",), device_memory_bytes=151397597184),
        Chip("b200", "B200", "gpu", 2.25e15, 180e9, 8.0e12, (r"B200",), device_memory_bytes=191514411008),
        Chip("v4", "TPU v4", "tpu", 275e12, 32 * GiB, 1.2e12, (r"^TPU v4$",), device_memory_bytes=30.75 * GiB),
        Chip("v5e", "TPU v5e", "tpu", 197e12, 16 * GiB, 819e9, (r"^TPU v5 ?lite", r"^TPU v5e"),
             device_memory_bytes=15.75 * GiB),
        Chip("v5p", "TPU v5p", "tpu", 459e12, 95 * GiB, 2.765e12, (r"^TPU v5p?$",)),
        Chip("v6e", "TPU v6e", "tpu", 918e12, 32 * GiB, 1.64e12, (r"^TPU v6 ?lite", r"^TPU v6e"),
             device_memory_bytes=31.24 * GiB),
    )
}


def chip_for_device_kind(device_kind: str) -> Chip | None:
    """The chip whose spec sheet describes a device of this `device_kind`; None for one not in
    `CHIPS` (a CPU, a card not listed): its peak is then measured, not looked up."""
    for chip in CHIPS.values():
        if any(re.search(pattern, device_kind) for pattern in chip.kinds):
            return chip
    return None
