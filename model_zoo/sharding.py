"""The model mesh ("dp", "fsdp", "tp", "sp", "uly") and where each parameter and activation lives on it."""

import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("dp", "fsdp", "tp", "sp", "uly")
BATCH = ("dp", "fsdp")  # batch rows are split over both data axes
# The sequence lies over "sp" and "uly", "sp" major: a ring over "sp" of Ulysses groups over "uly"
# (strategy "usp"); with uly=1 (the default) it is the ring's axis alone.
SEQUENCE = ("sp", "uly")

# Per parameter (by name), the mesh axis of each dimension; layer-stacked ones lead with None.
_PARAM_AXES = {
    "embed": ("tp", "fsdp"),
    "vision_embed": ("tp", "fsdp"),
    "lm_head": ("fsdp", "tp"),
    "vision_head": ("fsdp", "tp"),
    "final_norm": (None,),
    "attn_norm": (None, None),
    "mlp_norm": (None, None),
    "wq": (None, "fsdp", "tp"),
    "wk": (None, "fsdp", "tp"),
    "wv": (None, "fsdp", "tp"),
    "wo": (None, "tp", "fsdp"),
    "sinks": (None, "tp"),
    "w_gate": (None, "fsdp", "tp"),
    "w_up": (None, "fsdp", "tp"),
    "w_down": (None, "tp", "fsdp"),
}


def make_mesh(dp=1, fsdp=1, tp=1, sp=-1, uly=1, devices=None) -> Mesh:
    """A mesh with the model's five axes over `devices` (default: all). One size may be -1: the
    devices left over. Sizes whose product is smaller than the device count use the first ones."""
    devices = np.asarray(jax.devices() if devices is None else devices).ravel()
    sizes = {"dp": dp, "fsdp": fsdp, "tp": tp, "sp": sp, "uly": uly}
    for name, size in sizes.items():
        if isinstance(size, bool) or not isinstance(size, int) or (size <= 0 and size != -1):
            raise ValueError(f"mesh axis {name} must be a positive int or -1, got {size!r}")
    free = [name for name, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {free}")
    known = math.prod(size for size in sizes.values() if size != -1)
    if free:
        if devices.size % known:
            raise ValueError(f"{devices.size} devices cannot be split as {sizes}")
        sizes[free[0]] = devices.size // known
    needed = math.prod(sizes.values())
    if needed > devices.size:
        raise ValueError(f"mesh {sizes} needs {needed} devices, {devices.size} are available")
    shape = tuple(sizes[a] for a in MESH_AXES)
    return Mesh(devices[:needed].reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def model_mesh(config, batch, length):
    """The mesh the model runs in (from `jax.set_mesh`), validated for these shapes; None outside one."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    if tuple(mesh.axis_names) != MESH_AXES:
        raise ValueError(f"the model runs in a mesh with axes {MESH_AXES}, got {tuple(mesh.axis_names)}")
    check_mesh_shapes(config, dict(mesh.shape), batch, length)
    return mesh


def check_mesh_shapes(config, shape, batch, length):
    """ValueError unless a [batch, length] batch of `config`'s model splits over mesh axis sizes
    `shape`: rows over dp*fsdp, the sequence over sp (2*sp for zigzag), heads over tp."""
    rows = shape["dp"] * shape["fsdp"]
    if batch % rows:
        raise ValueError(f"batch_size={batch} must be divisible by dp*fsdp={rows}")
    sequence = shape["sp"] * shape["uly"]
    if length % sequence:
        raise ValueError(
            f"sequence length {length} must be divisible by the {sequence} devices it lies over "
            f"(sp={shape['sp']} x uly={shape['uly']})"
        )
    if config.ring_layout == "zigzag" and length % (2 * sequence):
        raise ValueError(
            f"zigzag layout: sequence length {length} must be divisible by 2 x the {sequence} devices it lies over "
            f"(sp={shape['sp']} x uly={shape['uly']})"
        )
    strategy, _ = attention_axes(config, shape)
    if strategy == "usp" and (config.num_heads // shape["tp"]) % shape["uly"]:
        raise ValueError(
            f"num_heads={config.num_heads} over tp={shape['tp']} must be divisible by the uly axis size {shape['uly']}"
        )
    for name in ("num_heads", "num_kv_heads", "intermediate_size"):
        if getattr(config, name) % shape["tp"]:
            raise ValueError(f"{name}={getattr(config, name)} must be divisible by the tp axis size {shape['tp']}")


def param_specs(params, mesh: Mesh, extra_axes=()):
    """A PartitionSpec per parameter; a dimension the axis does not divide stays whole.

    `extra_axes` (e.g. ("dp", "sp", "uly")) shard the "fsdp" dimension of every parameter
    further, where they divide it: ZeRO-3 over those devices too, so parameters and optimizer
    state need not fit one chip (XLA gathers each layer's weights where they are used)."""

    def dim_axes(a, size):
        if a is None:
            return None
        group = (a, *extra_axes) if a == "fsdp" else (a,)
        group = tuple(g for g in group if mesh.shape[g] > 1) or (a,)
        while group and size % math.prod(mesh.shape[g] for g in group):
            group = group[:-1]
        return None if not group else group[0] if len(group) == 1 else group

    def spec(path, leaf):
        name = path[-1].key
        return P(*(dim_axes(a, leaf.shape[i]) for i, a in enumerate(_PARAM_AXES[name])))

    return jax.tree_util.tree_map_with_path(spec, params)


# The axes that shard parameters and optimizer state beyond fsdp when a run asks for ZeRO-3 over
# every device (`TrainConfig.params_over_sequence`): the data-parallel and sequence axes.
ZERO_AXES = ("dp", "sp", "uly")


def param_shardings(params, mesh: Mesh, extra_axes=()):
    return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(params, mesh, extra_axes))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Where a [B, L] batch array lives: rows over dp/fsdp, the sequence over sp and uly."""
    return NamedSharding(mesh, P(BATCH, SEQUENCE))


def global_batch(host_batch: dict, sharding) -> dict:
    """Host arrays [B, L] as global arrays placed by `sharding`: each process supplies the parts its
    devices hold (with several processes, only those parts need be filled in)."""
    return {name: jax.make_array_from_callback(values.shape, sharding, lambda index, v=values: v[index])
            for name, values in host_batch.items()}


def attention_axes(config, shape):
    """(strategy, axis_name) that `ring_attn.context_attention` runs with over mesh axis sizes
    `shape`: a uly axis above 1 means Ulysses inside the ring ("usp" over ("sp", "uly"); "auto"
    becomes it); otherwise the configured strategy over "sp"."""
    strategy = config.attention_strategy
    if shape["uly"] > 1:
        if strategy not in ("auto", "usp"):
            raise ValueError(
                f"a mesh with uly={shape['uly']} runs attention as Ulysses inside the ring: "
                f"attention_strategy must be 'usp' or 'auto', got {strategy!r}"
            )
        return "usp", ("sp", "uly")
    if strategy == "usp":
        return "usp", ("sp", "uly")
    return strategy, "sp"
