"""Models by name: the shipped model resolves, loads and retrieves right after install; `export`
writes a self-contained folder whose provenance is read from the run itself."""

import json

import jax
import numpy as np
import pytest

from model_zoo.__main__ import main
from model_zoo.checkpoint import load_model
from model_zoo.shipped import SHIPPED_DIR, resolve_model, shipped_models


def test_paths_resolve_to_themselves_and_unknown_names_are_named(tmp_path):
    assert resolve_model(tmp_path) == tmp_path
    with pytest.raises(FileNotFoundError, match="neither a folder nor a shipped model; shipped: "):
        resolve_model("lwm-huge")


def test_export_writes_the_run_and_its_provenance(tmp_path):
    workdir, out = tmp_path / "run", tmp_path / "model"
    train = ["train", "--workdir", str(workdir), "--stages", "32:1e4:2", "--batch-size", "2", "--mesh", "sp=1",
             "--no-progress"]
    assert main(train) == 0
    assert main(["eval-needle", "--model", str(workdir), "--lengths", "128", "--depths", "0.5", "--trials", "1",
                 "--mesh", "sp=1"]) == 0
    assert main(["export", "--workdir", str(workdir), "--out", str(out)]) == 0
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["commands"] == ["python -m model_zoo " + " ".join(train)]
    assert provenance["steps"] == 2 and 0 < provenance["tokens"] <= 2 * 2 * 32  # rows end in padding
    assert provenance["needle_accuracy"] == json.loads((workdir / "needle.json").read_text())["accuracy"]
    (config, params), (config_out, params_out) = load_model(workdir), load_model(out)
    assert config_out == config
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params_out)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_export_needs_the_needle_grid(tmp_path, capsys):
    (tmp_path / "checkpoints").mkdir()
    assert main(["export", "--workdir", str(tmp_path), "--out", str(tmp_path / "m")]) == 1
    assert "run eval-needle --model" in capsys.readouterr().err


NAME = "lwm-tiny-retrieval"


def test_the_shipped_model_resolves_by_name():
    assert NAME in shipped_models()
    assert resolve_model(NAME) == SHIPPED_DIR / NAME
    with pytest.raises(FileNotFoundError, match=f"shipped: {NAME}"):
        resolve_model("lwm-huge")


def test_the_shipped_model_carries_its_provenance():
    provenance = json.loads((SHIPPED_DIR / NAME / "provenance.json").read_text())
    command = "python -m model_zoo train --preset tiny --recipe retrieval --workdir runs/retrieval"
    assert provenance["commands"] == [command]  # run once, exactly as the README gives it
    assert provenance["steps"] == sum(stage["steps"] for stage in provenance["run"]["stages"]) == 3800
    assert provenance["tokens"] > 0
    grid = provenance["needle_grid"]
    assert grid["lengths"] == [256, 512, 1024, 1536, 2048] and len(grid["depths"]) == 5 and grid["trials"] == 4
    assert provenance["needle_accuracy"] == pytest.approx(np.mean(grid["scores"]))
    assert provenance["needle_accuracy"] >= 0.9
    assert (SHIPPED_DIR / NAME / "params.safetensors").stat().st_size < 8 * 2**20  # a few MB


def test_the_shipped_model_retrieves_right_after_install(tmp_path, capsys):
    # One cell of the grid on haystacks of another seed than the provenance's grid.
    out = tmp_path / "needle"
    assert main(["eval-needle", "--model", NAME, "--lengths", "1024", "--depths", "0.5", "--trials", "4",
                 "--seed", "7", "--mesh", "sp=1", "--out", str(out)]) == 0
    assert json.loads((out / "needle.json").read_text())["accuracy"] >= 0.75
    assert main(["generate", "--model", NAME, "--prompt", "The with statement", "--max-new-tokens", "8",
                 "--mesh", "sp=1"]) == 0
    assert capsys.readouterr().out.strip()
