"""The published error bound: bfloat16 error against float64 does not grow with the ring."""

import json
import pathlib
import subprocess
import sys

import pytest

# end to end: the first CI leg runs it, the JAX-compatibility legs skip it (tests/conftest.py)
pytestmark = pytest.mark.slow

SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "bench" / "numerics.py"


def test_bfloat16_error_at_a_ring_of_32_stays_within_1_5x_of_one_device(tmp_path):
    # bench/numerics.py in its own process: it needs 32 simulated devices, the suite has 8.
    out = tmp_path / "numerics.json"
    subprocess.run(
        [sys.executable, str(SCRIPT), "--length", "1024", "--ring-sizes", "1", "32", "--no-peer", "--json", str(out)],
        check=True, cwd=SCRIPT.parent, capture_output=True, timeout=600,
    )
    one, thirty_two = (row["ours"] for row in json.loads(out.read_text())["rows"])
    for name in ("out", "dq", "dk", "dv"):
        assert 0 < one[name] < 1e-2, f"{name}: error {one[name]:.2e} on one device is not bfloat16-sized"
        assert thirty_two[name] <= 1.5 * one[name], (
            f"{name}: error {thirty_two[name]:.2e} on a ring of 32 against {one[name]:.2e} on one device"
        )
