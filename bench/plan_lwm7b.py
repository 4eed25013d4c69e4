"""LWM-7B's full training step (AdamW included) compiled for TPU v5p slices and H100 nodes from 32K
to 1M tokens (deviceless; the aot extra, JAX_PLATFORMS=cpu): per-chip memory by the compiler, the
ring's exposed transfers, and the cost model's step time.

    JAX_PLATFORMS=cpu python bench/plan_lwm7b.py   # writes bench/results/plan_lwm7b.json

Compiled, not run. Each row is `python -m model_zoo plan --preset lwm-7b --seq-len L --topology T`.
"""

import dataclasses
import json
import pathlib

from model_zoo import plan
from model_zoo.config import preset

OUT = pathlib.Path(__file__).parent / "results" / "plan_lwm7b.json"
CASES = [
    (32_768, "h100:8"), (131_072, "h100:8"), (262_144, "h100:8"), (524_288, "h100:4x8"), (1_048_576, "h100:4x8"),
    (32_768, "v5p:2x2x1"), (131_072, "v5p:2x2x2"), (262_144, "v5p:2x2x4"), (524_288, "v5p:4x4x2"),
    (1_048_576, "v5p:4x4x4"),
]


def main():
    rows = []
    for seq_len, topology in CASES:
        result = plan.plan(preset("lwm-7b"), seq_len=seq_len, topology=topology)
        print(result.report(), flush=True)
        rows.append(dict(dataclasses.asdict(result), fits=result.fits))
        OUT.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
