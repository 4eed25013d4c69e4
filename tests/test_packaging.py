"""What `pip install` puts on sys.path: the product's packages, and no generic top-level names."""

import os
import subprocess
import sys

PROBE = """
import importlib.util
print(sorted(name for name in ("ring_attn", "pallas_kernels", "model_zoo", "reference")
             if importlib.util.find_spec(name) is not None))
"""


def test_the_oracle_is_not_installed(tmp_path):
    # Outside the checkout only what the installation put on sys.path is importable.
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    found = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, env=env, capture_output=True, text=True,
                           check=True).stdout.strip()
    assert found == "['model_zoo', 'pallas_kernels', 'ring_attn']"
