"""Registers, spills and occupancy of every GPU attention kernel the ring compiles for 8 H100s
(deviceless: the aot extra, JAX_PLATFORMS=cpu): Triton and Mosaic GPU, forward, dq and dk/dv,
bf16, at q/k and v head dims 64/64, 128/128 and MLA's 192/128, at the shipped block sizes (the
ring's defaults), 8K tokens a device, causal zigzag; `--all-cases` adds test_aot's other cases
(segments and GQA, non-causal, window, soft cap and sinks, packed documents) at 128/128.

    JAX_PLATFORMS=cpu python bench/gpu_registers.py   # writes bench/results/gpu_registers.json

Registers and stack frame are read from the cubins in the compiled executable, spills from
`ptxas -v` replaying their PTX (`ring_attn.gpu_resources`). Compiled, not run.
"""

import argparse
import json
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))

from test_aot import CASES, ring_program  # noqa: E402

from ring_attn import gpu_resources  # noqa: E402

OUT = pathlib.Path(__file__).parent / "results" / "gpu_registers.json"
FAMILIES = (("pallas_triton", "triton"), ("pallas_mgpu", "mosaic_gpu"))
HEAD_DIMS = {"64/64": (64, 64), "128/128": (128, 128), "192/128": (192, 128)}


def program_kernels(impl, case, head_dims):
    """The kernels of the ring's forward + backward program (every pass) on 8 H100s."""
    options = dict(CASES[case], head_dims=HEAD_DIMS[head_dims])
    fn, args = ring_program("h100:8", impl, options, backward=True)
    with tempfile.TemporaryDirectory() as dump:
        compiled = gpu_resources.compile_for_resources(fn, args, dump)
        return gpu_resources.kernel_resources(compiled, dump)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all-cases", action="store_true", help="also every other test_aot case at 128/128")
    parser.add_argument("--json", type=pathlib.Path, default=OUT)
    args = parser.parse_args()
    runs = [("causal_zigzag", head_dims) for head_dims in HEAD_DIMS]
    if args.all_cases:
        runs += [(case, "128/128") for case in CASES if case not in ("causal_zigzag", "mla")]
    results, groups = [], []
    for case, head_dims in runs:
        for impl, family in FAMILIES:
            start = time.perf_counter()
            kernels = program_kernels(impl, case, head_dims)
            print(f"{family:10} {case:15} {head_dims:7} {len(kernels)} kernels in {time.perf_counter() - start:.0f} s",
                  file=sys.stderr, flush=True)
            results.append(dict(family=family, case=case, head_dims=head_dims,
                                kernels=[k.as_dict() for k in kernels]))
            for pass_, variants in gpu_resources.by_pass(kernels).items():
                labels = {"kernels": family, "case": case, "q/k, v head dims": head_dims, "pass": pass_}
                groups.append((labels, variants))
    print(gpu_resources.markdown_table(groups))
    args.json.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
