"""The schedule sweep of tests/test_schedule_sweep.py, larger and recorded: ring configurations
drawn at random from its `SPACE` (options, N:K, head dims with MLA's 192/128, tokens a device, the
loss, forward or forward + backward), each compiled for 8 H100s and for 4 TPU v5p chips, and the
ring transfers the compiled schedule exposes counted.

    JAX_PLATFORMS=cpu python bench/schedule_sweep.py --cases 150   # writes bench/results/schedule_sweep.json

Needs the aot extra (Python 3.12). Compiled, not run: what XLA scheduled, not how fast it runs.
"""

import argparse
import json
import pathlib
import random
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))

from test_schedule_sweep import GPU_KERNELS, SPACE, TARGETS, transfers, valid  # noqa: E402

from ring_attn import aot  # noqa: E402

OUT = pathlib.Path(__file__).parent / "results" / "schedule_sweep.json"


def draw(rng, target):
    while True:
        case = {key: rng.choice(values) for key, values in SPACE.items()}
        case["impl"] = rng.choice(GPU_KERNELS) if target == "h100" else "auto"
        if valid(case):
            return case


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=150, help="configurations drawn per target")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rows, start = [], time.time()
    for target in TARGETS:
        rng = random.Random(f"{args.seed}-{target}")
        for i in range(args.cases):
            case = draw(rng, target)
            found = transfers(target, case)
            exposed = aot.exposed(found)
            rows.append(dict(target=target, case=case, transfers=len(found), exposed=len(exposed),
                             exposed_names=[t.name for t in exposed]))
            print(f"{target} {i + 1}/{args.cases}: {len(exposed)} of {len(found)} exposed  {case}", flush=True)
    summary = {target: dict(cases=sum(r["target"] == target for r in rows),
                            programs_with_exposed=sum(r["target"] == target and r["exposed"] > 0 for r in rows),
                            transfers=sum(r["transfers"] for r in rows if r["target"] == target),
                            exposed=sum(r["exposed"] for r in rows if r["target"] == target))
               for target in TARGETS}
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(dict(summary=summary, seed=args.seed, rows=rows), indent=1) + "\n")
    print(json.dumps(summary), f"in {time.time() - start:.0f} s; wrote {OUT}")


if __name__ == "__main__":
    main()
