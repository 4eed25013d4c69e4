"""The ring compiled for 8 H100s and 4 TPU v5p chips (deviceless; the aot extra, JAX_PLATFORMS=cpu):
for each kernel family at 2K, 8K and 32K tokens a device (and at 8K with MLA's q/k 192, v 128),
forward and forward + backward, the ring transfers the compiled schedule exposes, the compiled
temporary memory, and each Triton kernel's grid, threads and shared memory.

    JAX_PLATFORMS=cpu python bench/aot_schedule.py   # writes bench/results/aot_schedule.json

Compiled, not run: this says what XLA scheduled, not how fast it runs.
"""

import json
import pathlib
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))

from test_aot import CASES, FAMILIES, ring_program  # noqa: E402

from ring_attn import aot  # noqa: E402

OUT = pathlib.Path(__file__).parent / "results" / "aot_schedule.json"


def main():
    rows = []
    for per_device, case in ((2048, "causal_zigzag"), (8192, "causal_zigzag"), (32768, "causal_zigzag"),
                             (8192, "mla")):
        head_dims = "192/128" if case == "mla" else "128/128"
        for topology, impl, family in FAMILIES:
            for backward in (False, True):
                fn, args = ring_program(topology, impl, CASES[case], backward, per_device=per_device)
                with tempfile.TemporaryDirectory() as dump:
                    options = {"xla_dump_to": dump} if topology.startswith("h100") else {}
                    compiled = fn.lower(*args).compile(compiler_options=options)
                    launches = aot.cuda_kernels(dump, prefix="ring_attn") if options else []
                text = compiled.as_text()
                transfers = aot.ring_transfers(text)
                row = dict(
                    topology=topology, family=family, tokens_per_device=per_device, head_dims=head_dims,
                    pass_="forward+backward" if backward else "forward", transfers=len(transfers),
                    exposed=len(aot.exposed(transfers)), kernels=aot.kernels(text),
                    temp_gib=round(compiled.memory_analysis().temp_size_in_bytes / 2**30, 3),
                    cuda_kernels=[dict(name=k.name, grid=k.grid, threads=k.threads, shared_memory=k.shared_memory)
                                  for k in launches],
                )
                rows.append(row)
                print(f"{topology:10} {family:11} {per_device:>6} {head_dims} {row['pass_']:17} "
                      f"exposed {row['exposed']}/"
                      f"{row['transfers']}  temp {row['temp_gib']} GiB", flush=True)
    OUT.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
