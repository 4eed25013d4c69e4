"""One process of the two-process training test: 4 CPU devices here, a dp=2 x sp=4 mesh across both
processes, each reading the data shard of its rows.

    python tests/multihost_train_worker.py PORT PROCESS_ID WORKDIR DATA_FILE
"""

import os
import sys

NUM_PROCESSES = 2


def config(data_file):
    from model_zoo import TINY
    from model_zoo.train import Stage, TrainConfig

    return TrainConfig(model=TINY.replace(num_layers=2), stages=(Stage(64, 1e4, 3), Stage(128, 1e5, 3)),
                       batch_size=4, mesh=(("dp", 2), ("sp", 4)), data=(data_file,), needle_fraction=0.25,
                       save_every=2)


def main():
    port, process_id, workdir, data_file = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    # Read when the CPU backend starts, which is below: imported by the test, this module changes nothing.
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax

    from model_zoo.train import train

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        f"127.0.0.1:{port}", NUM_PROCESSES, process_id, initialization_timeout=60, heartbeat_timeout_seconds=10
    )
    train(config(data_file), workdir, progress=False)
    print(f"process {process_id}: trained over {len(jax.devices())} devices", flush=True)


if __name__ == "__main__":
    main()
