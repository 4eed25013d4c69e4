"""Models by name: the shipped model resolves, loads and retrieves right after install; `export`
writes a self-contained folder whose provenance is read from the run itself."""

import json

import chex
import numpy as np
import pytest

from model_zoo.__main__ import main
from model_zoo.checkpoint import load_model
from model_zoo.shipped import SHIPPED_DIR, resolve_model, shipped_models


def test_paths_resolve_to_themselves_and_unknown_names_are_named(tmp_path):
    assert resolve_model(tmp_path) == tmp_path
    with pytest.raises(FileNotFoundError, match="neither a folder nor a shipped model; shipped: "):
        resolve_model("lwm-huge")


@pytest.mark.slow
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
    chex.assert_trees_all_equal(params_out, params)


def test_export_needs_the_needle_grid(tmp_path, capsys):
    (tmp_path / "checkpoints").mkdir()
    assert main(["export", "--workdir", str(tmp_path), "--out", str(tmp_path / "m")]) == 1
    assert "run eval-needle --model" in capsys.readouterr().err


# What each shipped model's provenance must say: the command, run once exactly as the README gives
# it, its steps and its grid's lengths.
SHIPPED = {
    "lwm-tiny-retrieval": ("python -m model_zoo train --preset tiny --recipe retrieval --workdir runs/retrieval",
                           3800, [256, 512, 1024, 1536, 2048]),
    "lwm-tiny-8k": ("python -m model_zoo train --preset tiny --workdir runs/tiny", 140, [1024, 2048, 4096, 6144, 8192]),
}


def test_the_shipped_models_resolve_by_name():
    assert set(SHIPPED) <= set(shipped_models())
    for name in SHIPPED:
        assert resolve_model(name) == SHIPPED_DIR / name
    with pytest.raises(FileNotFoundError, match="shipped: lwm-tiny-8k, lwm-tiny-retrieval"):
        resolve_model("lwm-huge")


@pytest.mark.parametrize("name", SHIPPED)
def test_the_shipped_model_carries_its_provenance(name):
    command, steps, lengths = SHIPPED[name]
    provenance = json.loads((SHIPPED_DIR / name / "provenance.json").read_text())
    assert provenance["commands"] == [command]
    assert provenance["steps"] == sum(stage["steps"] for stage in provenance["run"]["stages"]) == steps
    assert provenance["tokens"] > 0
    grid = provenance["needle_grid"]
    assert grid["lengths"] == lengths and len(grid["depths"]) == 5 and grid["trials"] == 4
    assert provenance["needle_accuracy"] == pytest.approx(np.mean(grid["scores"]))
    assert provenance["needle_accuracy"] >= 0.9
    assert (SHIPPED_DIR / name / "params.safetensors").stat().st_size < 8 * 2**20  # a few MB


def test_the_extended_model_starts_from_the_other_and_keeps_its_last_row():
    provenance = json.loads((SHIPPED_DIR / "lwm-tiny-8k" / "provenance.json").read_text())
    assert provenance["run"]["init_from"] == "lwm-tiny-retrieval"
    assert np.mean(provenance["needle_grid"]["scores"][-1]) >= 0.85  # the 8192-token row


# A cell (the 2048-token model), or the whole 8192-token row of the extended model (1.00 on these
# haystacks), on haystacks of another seed than the provenance's grid.
@pytest.mark.parametrize("name,length,depths,mesh,least", [
    ("lwm-tiny-retrieval", 1024, "0.5", "sp=1", 0.75),
    ("lwm-tiny-8k", 8192, "0,0.25,0.5,0.75,1", "sp=8", 0.85),
])
def test_the_shipped_model_retrieves_right_after_install(name, length, depths, mesh, least, tmp_path, capsys):
    out = tmp_path / "needle"
    assert main(["eval-needle", "--model", name, "--lengths", str(length), "--depths", depths, "--trials", "4",
                 "--seed", "7", "--mesh", mesh, "--out", str(out)]) == 0
    assert json.loads((out / "needle.json").read_text())["accuracy"] >= least
    assert main(["generate", "--model", name, "--prompt", "The with statement", "--max-new-tokens", "8",
                 "--mesh", mesh]) == 0
    assert capsys.readouterr().out.strip()


def test_the_needle_grid_follows_the_models_positions(tmp_path, capsys, monkeypatch):
    import model_zoo.needle

    seen = []

    def record(params, config, *, lengths, depths, **kwargs):
        seen.append((config.max_position_embeddings, list(lengths)))
        return np.ones((len(lengths), len(depths)))

    monkeypatch.setattr(model_zoo.needle, "evaluate_needles", record)
    base = ["eval-needle", "--model", "lwm-tiny-retrieval", "--mesh", "sp=1", "--out", str(tmp_path)]
    assert main(base) == 0
    assert main([*base, "--positions", "8192"]) == 0
    assert seen == [(2048, [256, 512, 1024, 1536, 2048]), (8192, [1024, 2048, 4096, 6144, 8192])]
    assert json.loads((tmp_path / "needle.json").read_text())["positions_raised_to"] == 8192
    assert main([*base, "--lengths", "4096"]) == 1
    assert "--lengths up to 4096 exceed the model's 2048 positions (--positions raises them" in capsys.readouterr().err
