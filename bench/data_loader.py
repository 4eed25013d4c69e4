"""The user-data loader against the step it feeds, and its memory on a file far bigger than the run.

    python bench/data_loader.py throughput [--seq-len 8192] [--rows 2] [--batches 30] [--json FILE]
    python bench/data_loader.py memory [--size-gb 2] [--steps 6] [--keep-file] [--json FILE]

throughput: tokens per second that `model_zoo.loader.DocumentBatches` packs (reading JSON lines,
tokenizing with the shipped tokenizer, next-fit packing) beside the tokens per second that TINY's
training step consumes at the same shape on the ring of 8 simulated devices (the main job's 8K
stage), in one process, with the host's float32 matmul ceiling. The documents are the Python
standard library's modules, written out as the README's example does.

memory: the peak resident memory (ru_maxrss) of `python -m model_zoo train` on a JSON-lines file
of --size-gb (the standard library's modules repeated, each copy numbered) beside the same run on
the embedded corpus, at the same shape, each in a fresh process and with a cold index cache, so
the first scan of the file is included; then the data run again with its index cached.
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import sysconfig
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def stdlib_documents():
    return [{"path": m.name, "text": m.read_text(encoding="utf-8")}
            for m in sorted(pathlib.Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))]


def throughput(args):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    import jax
    import numpy as np
    from timing import matmul_ceiling

    from model_zoo.checkpoint import load_model
    from model_zoo.documents import Documents
    from model_zoo.loader import DocumentBatches
    from model_zoo.sharding import batch_sharding, make_mesh
    from model_zoo.shipped import resolve_model
    from model_zoo.tokenizer import default_tokenizer
    from model_zoo.train import Stage, TrainConfig, init_optimizer, make_optimizer, train_step

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["RING_ATTN_DATA_CACHE"] = tmp
        path = pathlib.Path(tmp) / "stdlib.jsonl"
        path.write_text("".join(json.dumps(d) + "\n" for d in stdlib_documents()))
        documents = Documents([str(path)])
        loader = DocumentBatches(documents, default_tokenizer(), seed=0)
        start, tokens = time.perf_counter(), 0
        batches = []
        for step in range(args.batches):
            batch = loader.batch(step, args.rows, args.seq_len)
            tokens += int(np.count_nonzero(batch["segment_ids"]))
            batches.append(batch)
        loader_seconds = time.perf_counter() - start
    loader_rate = tokens / loader_seconds

    mesh = make_mesh(sp=8)
    config, params = load_model(resolve_model("lwm-tiny-8k"), mesh=mesh)
    cfg = TrainConfig(model=config, stages=(Stage(args.seq_len, 1e6, 100, args.rows),))
    tx = make_optimizer(cfg)
    with jax.set_mesh(mesh):
        state = {"params": params, "opt_state": init_optimizer(tx, params), "step": jax.numpy.zeros((), "int32")}
        step_fn = train_step(tx, cfg.stage_model(cfg.stages[0]))
        placed = [jax.device_put(b, batch_sharding(mesh)) for b in batches[: args.steps + 1]]
        state, out = step_fn(state, placed[0])  # compiles
        jax.block_until_ready(out)
        times = []
        for batch in placed[1:]:
            start = time.perf_counter()
            state, out = step_fn(state, batch)
            jax.block_until_ready(out)
            times.append(time.perf_counter() - start)
    step_tokens = np.mean([np.count_nonzero(b["segment_ids"]) for b in batches[1 : args.steps + 1]])
    step_rate = step_tokens / float(np.median(times))
    ceiling = matmul_ceiling(5)
    result = {
        "documents": len(documents), "seq_len": args.seq_len, "rows": args.rows,
        "loader_tokens_per_s": round(loader_rate), "loader_batches": args.batches,
        "step_tokens_per_s": round(step_rate), "step_median_s": round(float(np.median(times)), 3),
        "ratio": round(loader_rate / step_rate, 1), "matmul_gflops": round(ceiling / 1e9, 1),
        "jax": jax.__version__,
    }
    print(f"loader: {loader_rate:,.0f} tokens/s ({args.batches} batches of {args.rows} x {args.seq_len})")
    print(f"step:   {step_rate:,.0f} tokens/s (TINY, ring of 8, median of {len(times)} steps, "
          f"{np.median(times):.2f} s a step)")
    print(f"ratio:  {loader_rate / step_rate:.1f}x   (host float32 matmul ceiling {ceiling / 1e9:.0f} GFLOP/s)")
    return result


def write_big_file(path, size_bytes):
    documents = stdlib_documents()
    written, copy = 0, 0
    with open(path, "w") as out:
        while written < size_bytes:
            for document in documents:
                line = json.dumps({"path": document["path"], "text": f"# copy {copy}\n" + document["text"]}) + "\n"
                out.write(line)
                written += len(line)
            copy += 1
    return written


def peak_rss(command, env):
    """(peak resident bytes, seconds, output) of a child process."""
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{output[-3000:]}")
    return usage.ru_maxrss * 1024, time.perf_counter() - start, output


def memory(args):
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="ring_attn_memory_"))
    big = tmp / "big.jsonl"
    written = write_big_file(big, int(args.size_gb * 2**30))
    print(f"wrote {big}: {written / 2**30:.2f} GiB")
    stages = f"{args.seq_len}:1e6:{args.steps}:{args.rows}"
    common = [sys.executable, "-m", "model_zoo", "train", "--init-from", "lwm-tiny-8k", "--stages", stages,
              "--no-progress"]
    env = dict(os.environ, RING_ATTN_DATA_CACHE=str(tmp / "cache"))
    runs = {}
    for name, extra in (("embedded corpus", []), ("data, cold index", ["--data", str(big)]),
                        ("data, cached index", ["--data", str(big)])):
        workdir = tmp / name.replace(" ", "_").replace(",", "")
        rss, seconds, output = peak_rss(common + ["--workdir", str(workdir)] + extra, env)
        runs[name] = {"peak_rss_bytes": rss, "seconds": round(seconds, 1)}
        print(f"{name:>20}: peak RSS {rss / 2**20:,.0f} MiB, {seconds:.0f} s"
              + "".join(f"   [{line}]" for line in output.splitlines() if line.startswith("data:")))
    base = runs["embedded corpus"]["peak_rss_bytes"]
    for name in runs:
        runs[name]["ratio"] = round(runs[name]["peak_rss_bytes"] / base, 3)
    print("ratio to the embedded-corpus run: " + ", ".join(f"{n} {r['ratio']:.3f}" for n, r in runs.items()))
    if not args.keep_file:
        big.unlink()
    return {"file_bytes": written, "seq_len": args.seq_len, "rows": args.rows, "steps": args.steps, "runs": runs}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = parser.add_subparsers(dest="mode", required=True)
    fast = modes.add_parser("throughput")
    fast.add_argument("--seq-len", type=int, default=8192)
    fast.add_argument("--rows", type=int, default=2)
    fast.add_argument("--batches", type=int, default=30)
    fast.add_argument("--steps", type=int, default=5, help="timed training steps")
    big = modes.add_parser("memory")
    big.add_argument("--size-gb", type=float, default=2.0)
    big.add_argument("--seq-len", type=int, default=8192)
    big.add_argument("--rows", type=int, default=2)
    big.add_argument("--steps", type=int, default=6)
    big.add_argument("--keep-file", action="store_true")
    for mode in (fast, big):
        mode.add_argument("--json", type=pathlib.Path, help="also write the result here")
    args = parser.parse_args()
    result = throughput(args) if args.mode == "throughput" else memory(args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
