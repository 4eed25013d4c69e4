"""TINY's training step at the longest stage: ring attention on 8 devices vs dense attention, side by side.

    python bench/lwm_step.py [--seq-len 2048] [--batch-size 8] [--runs 5] [--json bench/results/lwm_step.json]

Three variants of one step (loss, gradients, AdamW update) on the same batch, timed alternately
in one process: the ring over an 8-device "sp" axis; blockwise attention on one device; and the
naive dense attention of `reference/` on one device. Prints a markdown table (median step time,
tokens/s, compiled temp memory per device) and writes it to --json. The first two are the main
job's step on `sp=8` and on `sp=1`.
"""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import argparse  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # `reference` is not installed

import reference  # noqa: E402
from model_zoo import TINY, make_mesh  # noqa: E402
from model_zoo.data import packed_batch  # noqa: E402
from model_zoo.sharding import batch_sharding  # noqa: E402
from model_zoo.train import Stage, TrainConfig, initial_state, loss_fn, make_optimizer  # noqa: E402


def dense(q, k, v, segment_ids):
    return reference.attention(q, k, v, causal=True, q_segment_ids=segment_ids, kv_segment_ids=segment_ids)


def step_fn(tx, config, attention):
    def step(state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(state["params"], batch, config, attention)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = jax.tree.map(lambda p, u: p + u, state["params"], updates)
        return dict(state, params=params, opt_state=opt_state), loss

    return step


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--runs", type=int, default=5)
    results = pathlib.Path(__file__).parent / "results"
    parser.add_argument("--json", type=pathlib.Path, default=results / "lwm_step.json")
    args = parser.parse_args()
    cfg = TrainConfig(model=TINY, stages=(Stage(args.seq_len, 1e5, 1),), batch_size=args.batch_size)
    config = TINY.replace(rope_theta=1e5)
    host = packed_batch(0, 0, batch_size=args.batch_size, seq_len=args.seq_len)
    tokens = int(np.count_nonzero(host["segment_ids"]))
    tx = make_optimizer(cfg)
    variants = {}
    ring_mesh, one_mesh = make_mesh(sp=8), make_mesh(sp=1)
    for name, mesh, attention in (("ring, 8 devices (sp=8)", ring_mesh, None),
                                  ("blockwise, 1 device", one_mesh, None),
                                  ("dense (reference), 1 device", one_mesh, dense)):
        with jax.set_mesh(mesh):
            state = initial_state(cfg, mesh)
            batch = jax.device_put(host, batch_sharding(mesh))
            compiled = jax.jit(step_fn(tx, config, attention)).lower(state, batch).compile()
            temp = compiled.memory_analysis().temp_size_in_bytes
            jax.block_until_ready(compiled(state, batch))
        variants[name] = dict(compiled=compiled, args=(state, batch), temp=temp, times=[])
    for _ in range(args.runs):  # alternate, so drift on a shared machine hits every variant alike
        for v in variants.values():
            start = time.perf_counter()
            jax.block_until_ready(v["compiled"](*v["args"]))
            v["times"].append(time.perf_counter() - start)
    rows = []
    base = statistics.median(variants["dense (reference), 1 device"]["times"])
    print(f"TINY train step, batch {args.batch_size} x {args.seq_len} tokens ({tokens} non-padding), "
          f"{jax.device_count()} CPU devices on {os.cpu_count()} cores, median of {args.runs}\n")
    print("| attention | step (s) | tokens/s | speed vs dense | temp memory per device (MiB) |")
    print("|---|---|---|---|---|")
    for name, v in variants.items():
        t = statistics.median(v["times"])
        rows.append(dict(variant=name, seconds=t, tokens_per_s=tokens / t, speedup_vs_dense=base / t,
                         temp_mib=v["temp"] / 2**20))
        print(f"| {name} | {t:.2f} | {tokens / t:,.0f} | {base / t:.2f}x | {v['temp'] / 2**20:.0f} |")
    args.json.write_text(json.dumps(dict(seq_len=args.seq_len, batch_size=args.batch_size, runs=args.runs, rows=rows),
                              indent=2) + "\n")


if __name__ == "__main__":
    main()
