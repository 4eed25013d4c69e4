"""One process of the two-process ring test: 4 CPU devices here, 8 in the ring across processes.

    python tests/multihost_worker.py PORT PROCESS_ID OUT_DIR [ok|die]
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import ring_attn

NUM_PROCESSES = 2
B, L, N, K, H = 2, 128, 4, 2, 32


def global_inputs(seed=0):
    rng = np.random.default_rng(seed)
    q, d_out = (rng.standard_normal((B, L, N, H)).astype(np.float32) for _ in range(2))
    k, v = (rng.standard_normal((B, L, K, H)).astype(np.float32) for _ in range(2))
    ids = np.sort(rng.integers(0, 3, (B, L)), axis=1).astype(np.int32)
    return q, k, v, d_out, ids


def loss_and_grads(mesh, q, k, v, d_out, ids):
    def loss(q, k, v, d_out, ids):
        out = ring_attn.ring_attention_global(
            q, k, v, mesh=mesh, axis_name="sp", causal=True, layout="zigzag", segment_ids=ids
        )
        return jnp.sum(out * d_out), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v, d_out, ids)
    return out, grads


def main():
    port, process_id, out_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    mode = sys.argv[4] if len(sys.argv) > 4 else "ok"
    # Read when the CPU backend starts, which is below: imported by the test, this module changes nothing.
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        f"127.0.0.1:{port}", NUM_PROCESSES, process_id, initialization_timeout=60, heartbeat_timeout_seconds=10
    )
    if mode == "die" and process_id == 1:
        os._exit(3)  # a host lost mid-job
    mesh = Mesh(np.array(jax.devices()), ("sp",))
    sharded = NamedSharding(mesh, P(None, "sp"))
    arrays = [jax.make_array_from_callback(x.shape, sharded, lambda idx, x=x: x[idx]) for x in global_inputs()]
    out, grads = loss_and_grads(mesh, *arrays)
    gathered = [np.asarray(multihost_utils.process_allgather(x, tiled=True)) for x in (out, *grads)]
    if process_id == 0:
        np.savez(os.path.join(out_dir, "result.npz"), out=gathered[0], dq=gathered[1], dk=gathered[2], dv=gathered[3])
    print(f"process {process_id}: done over {len(jax.devices())} devices", flush=True)


if __name__ == "__main__":
    main()
