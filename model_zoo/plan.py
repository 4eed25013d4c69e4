"""`python -m model_zoo plan`: the model zoo's training step compiled, deviceless, for a GPU or TPU
topology (A100, H100, H200, B200; TPU v4, v5e, v5p, v6e: `ring_attn.aot.TOPOLOGY_FORMS`), and what
the compiler says about it per chip.

Compiled, not run: memory is XLA's own buffer assignment for the target (`memory_analysis()`),
against the chip's memory in `ring_attn.chips`; the kernels and the ring's schedule are read from
the compiled program (`ring_attn.aot`); the step time is the cost model's estimate for that chip
(`ring_attn.cost.CHIP_HARDWARE`). Needs the `aot` extra and `JAX_PLATFORMS=cpu`.
"""

import dataclasses
import os
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from model_zoo.config import LWMConfig
from model_zoo.model import init_params
from model_zoo.sharding import MESH_AXES, ZERO_AXES, attention_axes, batch_sharding, check_mesh_shapes, param_shardings
from model_zoo.train import TrainConfig, make_optimizer, optimizer_state_shardings, train_step
from ring_attn import aot, cost

GiB = 2**30


@dataclasses.dataclass
class Plan:
    """One compiled training step, per chip."""

    topology: str
    mesh: dict
    seq_len: int
    batch_size: int
    state_bytes: int  # parameters + optimizer state
    batch_bytes: int
    temp_bytes: int  # activations and every other temporary
    total_bytes: int
    chip_bytes: int
    kernels: dict
    transfers: int
    exposed: int
    compile_s: float
    strategy: str
    predicted_step_s: float
    note: str = ""  # why transfers are exposed, where the compiler's settings explain it

    @property
    def fits(self):
        return self.total_bytes <= self.chip_bytes

    def report(self) -> str:
        gib = lambda b: f"{b / GiB:.2f} GiB"  # noqa: E731
        mesh = ", ".join(f"{k}={v}" for k, v in self.mesh.items() if v > 1) or "one chip"
        lines = [
            f"{self.seq_len:,} tokens x {self.batch_size} on {self.topology} (mesh {mesh}), compiled in "
            f"{self.compile_s:.0f} s; per chip:",
            f"  parameters + optimizer state  {gib(self.state_bytes)}",
            f"  batch                         {gib(self.batch_bytes)}",
            f"  activations (temp)            {gib(self.temp_bytes)}",
            f"  total                         {gib(self.total_bytes)} of {gib(self.chip_bytes)}: "
            + ("fits" if self.fits else f"does not fit, {gib(self.total_bytes - self.chip_bytes)} short"),
            f"  attention kernels             {self.kernels or 'none (jnp)'}",
            f"  ring transfers exposed        {self.exposed} of {self.transfers}"
            + (f": {self.note}" if self.note else ""),
            f"  cost model                    strategy {self.strategy!r}, about {self.predicted_step_s:.2f} s a step",
        ]
        return "\n".join(lines)


class CompilerOutOfMemory(ValueError):
    """The compiler refused the step: its temporaries alone need more memory than a chip has (the
    TPU compiler checks this; XLA's CUDA compiler leaves it to `Plan.fits`)."""


def _compile(lowered, what):
    try:
        return lowered.compile()
    except jax.errors.JaxRuntimeError as error:
        text = str(error)
        if "CompileTimeHbmOom" not in text:
            raise
        # "RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: Ran out of memory on HBM, the total ..."
        sentence = text.split("CompileTimeHbmOom:", 1)[1].split(". HLO module", 1)[0].strip()
        raise CompilerOutOfMemory(f"{what} does not fit: the compiler says: {sentence}") from None


def default_mesh(topo: aot.Topology) -> dict:
    """The sequence over every chip (sp), batch 1: parameters and optimizer state are then
    sharded over sp too (ZeRO-3 over every device), as `plan` compiles them."""
    return {"dp": 1, "fsdp": 1, "tp": 1, "sp": topo.num_chips, "uly": 1}


def plan(model: LWMConfig, *, seq_len: int, topology: str, mesh_axes: dict | None = None,
         batch_size: int | None = None, progress=True) -> Plan:
    """Compiles `model`'s training step (loss, gradients, AdamW update) for `topology` (e.g.
    'h100:8', 'b200:8', 'v6e:4x4'; `ring_attn.aot.TOPOLOGY_FORMS`) and returns what the compiler
    says about it per chip."""
    topo = aot.topology(topology)
    axes = dict(default_mesh(topo), **(mesh_axes or {}))
    mesh = aot.mesh(topo, {a: axes[a] for a in MESH_AXES})
    batch_size = axes["dp"] * axes["fsdp"] if batch_size is None else batch_size
    check_mesh_shapes(model, axes, batch_size, seq_len)
    train_cfg = TrainConfig(model=model, params_over_sequence=True)
    tx = make_optimizer(train_cfg)
    # Parameters and optimizer state over every device (ZeRO-3), as `train` places them with
    # params_over_sequence=True.
    shapes = jax.eval_shape(lambda key: init_params(model, key), jax.random.key(0))
    params = jax.tree.map(lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                          shapes, param_shardings(shapes, mesh, ZERO_AXES))
    replicated = NamedSharding(mesh, jax.sharding.PartitionSpec())
    opt_state = jax.tree.map(lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                             jax.eval_shape(tx.init, shapes), optimizer_state_shardings(tx, params))
    state = {"params": params, "opt_state": opt_state, "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
             "rng": jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated)}
    rows = batch_sharding(mesh)
    batch = {name: jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32, sharding=rows)
             for name in ("inputs", "targets", "segment_ids", "positions")}
    batch["loss_mask"] = jax.ShapeDtypeStruct((batch_size, seq_len), jnp.float32, sharding=rows)

    start = time.perf_counter()
    with _progress(f"compiling the training step for {topology}", progress), jax.set_mesh(mesh):
        step = train_step(tx, model, state_shardings=jax.tree.map(lambda s: s.sharding, state))
        compiled = _compile(step.lower(state, batch), f"{seq_len:,} tokens x {batch_size} on {topology}")
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    text = compiled.as_text()
    transfers = aot.ring_transfers(text)
    exposed = aot.exposed(transfers)
    state_bytes = _per_chip_bytes(state)
    batch_bytes = _per_chip_bytes(batch)
    total = memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
    total += memory.temp_size_in_bytes
    strategy, step_s = _predicted(model, topo, axes, batch_size, seq_len)
    return Plan(
        topology=topology, mesh=axes, seq_len=seq_len, batch_size=batch_size, state_bytes=state_bytes,
        batch_bytes=batch_bytes, temp_bytes=memory.temp_size_in_bytes, total_bytes=total,
        chip_bytes=topo.memory_per_chip, kernels=aot.kernels(text), transfers=len(transfers),
        exposed=len(exposed), compile_s=compile_s, strategy=strategy, predicted_step_s=step_s,
        note=_exposure_note(topo, exposed),
    )


def _exposure_note(topo, exposed):
    """Why XLA left ring transfers exposed, where its defaults for the chip explain it: its CUDA
    compiler schedules collectives to overlap compute (the latency-hiding scheduler) on Hopper and
    newer only, and synchronously on older GPUs."""
    device = aot.CUDA_DEVICES.get(topo.chip.key) if topo.chip is not None else None
    if not exposed or device is None or device.compute_capability >= (9, 0):
        return ""
    if "xla_gpu_enable_latency_hiding_scheduler" in os.environ.get("XLA_FLAGS", ""):  # the user has chosen
        return ""
    return (f"XLA schedules collectives to overlap compute on Hopper and newer only; for {topo.chip.name} set "
            "XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true")


def max_seq_len(model: LWMConfig, *, topology: str, mesh_axes=None, batch_size=None, start=32768, progress=True):
    """The longest power-of-two context from `start` whose training step fits, and its `Plan`
    (None, None when `start` does not fit)."""
    best = None
    seq_len = start
    while True:
        try:
            result = plan(model, seq_len=seq_len, topology=topology, mesh_axes=mesh_axes, batch_size=batch_size,
                          progress=progress)
        except CompilerOutOfMemory as error:
            if progress:
                print(f"{seq_len:,} tokens: {error}", file=sys.stderr)
            return (best.seq_len, best) if best else (None, None)
        if progress:
            print(f"{seq_len:,} tokens: {result.total_bytes / GiB:.2f} GiB of {result.chip_bytes / GiB:.2f}",
                  file=sys.stderr)
        if not result.fits:
            return (best.seq_len, best) if best else (None, None)
        best = result
        seq_len *= 2


def _per_chip_bytes(tree):
    """Bytes of a tree of sharded ShapeDtypeStructs held by one chip (the largest shard)."""
    def one(s):
        shard = s.sharding.shard_shape(s.shape)
        return int(np.prod(shard)) * jnp.dtype(s.dtype).itemsize

    return sum(one(s) for s in jax.tree.leaves(tree) if jnp.issubdtype(s.dtype, jnp.number))


def _predicted(model, topo, axes, batch_size, seq_len):
    """The cost model's attention strategy and step time: its attention seconds per layer, plus
    the dense matmuls (forward, backward, and the recompute of remat="full") at the chip's peak."""
    hardware = cost.HARDWARE[cost.CHIP_HARDWARE[topo.chip.key]]
    strategy, _ = attention_axes(model, axes)
    sequence_devices = axes["sp"] * axes["uly"]
    choice = cost.choose_strategy(
        hardware, seq_len=seq_len, num_devices=sequence_devices, num_heads=model.num_heads // axes["tp"],
        num_kv_heads=model.num_kv_heads // axes["tp"], head_dim=model.head_dim, batch=max(batch_size // (
            axes["dp"] * axes["fsdp"]), 1), layout=model.ring_layout,
    )
    chosen = choice.strategy if strategy == "auto" else strategy
    attention_s = choice.costs[chosen] * model.num_layers
    passes = 4 if model.remat == "full" else 3  # forward, backward (2x), recompute
    dense_flops = 2 * passes * model.num_params * batch_size * seq_len
    return chosen, attention_s + dense_flops / (topo.num_chips * hardware.flops_per_s)


class _progress:
    """A line on stderr that counts seconds while the compiler runs (on a terminal; elsewhere a
    line when it starts and one when it ends)."""

    def __init__(self, what, enabled):
        self.what, self.enabled, self.done = what, enabled, threading.Event()

    def __enter__(self):
        if self.enabled:
            self.start = time.perf_counter()
            self.thread = threading.Thread(target=self._tick, daemon=True)
            if sys.stderr.isatty():
                self.thread.start()
            else:
                print(f"{self.what} ...", file=sys.stderr, flush=True)
        return self

    def _tick(self):
        while not self.done.wait(1.0):
            print(f"\r{self.what}: {time.perf_counter() - self.start:.0f} s", end="", file=sys.stderr, flush=True)

    def __exit__(self, exc_type, *exc):
        if self.enabled:
            self.done.set()
            if self.thread.is_alive():
                self.thread.join()
            ended = "done" if exc_type is None else "stopped"
            print(f"\r{self.what}: {ended} in {time.perf_counter() - self.start:.0f} s", file=sys.stderr)
