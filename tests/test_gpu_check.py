"""bench/gpu_check.py runs end to end at tiny shapes (kernels interpreted), so it cannot rot."""

import json

import pytest
from conftest import bench_script

# end to end: the first CI leg runs it, the JAX-compatibility legs skip it (tests/conftest.py)
pytestmark = pytest.mark.slow


def test_gpu_check_runs_tiny(tmp_path):
    report = bench_script("gpu_check").main(["--tiny", "--out", str(tmp_path)])
    assert report["correctness"] and all(r["ok"] for r in report["correctness"]), report["correctness"]
    assert report["timing"] and all("fwd_s" in r["ring_attn"] and "fwd_s" in r["xla"] for r in report["timing"])
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert saved["correctness"] == report["correctness"]
    assert "| ring_attn |" in (tmp_path / "gpu_check.md").read_text()
