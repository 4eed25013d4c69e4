"""bench/tpu_check.py runs end to end at tiny shapes (every TPU kernel interpreted), so it cannot rot."""

import json

import pytest
from conftest import bench_script

# end to end: the first CI leg runs it, the JAX-compatibility legs skip it (tests/conftest.py)
pytestmark = pytest.mark.slow


def test_tpu_check_runs_tiny(tmp_path):
    report = bench_script("tpu_check").main(["--tiny", "--out", str(tmp_path)])
    checked = {r["kernel"] for r in report["correctness"]}
    assert checked == {"attention", "splash", "feedforward", "ring_ppermute_zigzag", "ring_remote_dma"}, checked
    assert all(r["ok"] for r in report["correctness"]), report["correctness"]
    assert report["timing"] and all(
        "fwd_s" in r[name] for r in report["timing"] for name in ("ring_attn", "splash", "xla")
    ), report["timing"]
    assert all("fwd_s" in r["ring_attn"] for r in report["feedforward_timing"]), report["feedforward_timing"]
    saved = json.loads((tmp_path / "tpu_check.json").read_text())
    assert saved["correctness"] == report["correctness"]
    assert "| splash |" in (tmp_path / "tpu_check.md").read_text()
