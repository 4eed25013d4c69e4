"""Training reliability: a SIGKILLed run resumes to the same losses bit for bit, a damaged checkpoint
is reported and skipped, a NaN loss stops the run with its step, a run starts from another's
parameters, bad settings are named."""

import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from model_zoo import TINY
from model_zoo.__main__ import main
from model_zoo.checkpoint import load_model
from model_zoo.data import packed_batch
from model_zoo.train import Stage, TrainConfig, TrainingError, loss_fn, read_metrics, train, training_mesh

ROOT = pathlib.Path(__file__).resolve().parents[1]


def train_command(workdir):
    return [sys.executable, "-m", "model_zoo", "--cpu-devices", "4", "train", "--workdir", str(workdir),
            "--stages", "32:1e4:4,64:1e5:8", "--save-every", "2", "--batch-size", "2", "--mesh", "sp=4",
            "--no-progress"]


def environment(cache_dir):
    """The runs share a compilation cache (the same programs compile once); the command sets the devices."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


def run(command, env):
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def kill_after_steps(command, env, metrics: pathlib.Path, steps: int):
    """Starts `command` and SIGKILLs it once `metrics` holds `steps` lines."""
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= steps):
        assert process.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()


def damage(checkpoint: pathlib.Path):
    """Overwrites the middle of the checkpoint's largest file, as a failing disk would."""
    largest = max((p for p in checkpoint.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(largest.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes((b + 1) % 256 for b in data[middle : middle + 64])
    largest.write_bytes(bytes(data))


@pytest.mark.slow
def test_sigkill_and_damaged_checkpoint_resume_to_identical_losses(tmp_path):
    env = environment(tmp_path / "compiled")
    whole = run(train_command(tmp_path / "whole"), env)
    assert whole.returncode == 0, whole.stderr[-3000:]
    expected = read_metrics(tmp_path / "whole" / "metrics.jsonl")
    assert [r["step"] for r in expected] == list(range(12))

    workdir = tmp_path / "killed"
    metrics = workdir / "metrics.jsonl"
    kill_after_steps(train_command(workdir), env, metrics, 5)
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and steps[-1] < 12, steps
    damage(workdir / "checkpoints" / str(steps[-1]))

    resumed = run(train_command(workdir), env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"checkpoint at step {steps[-1]}" in resumed.stderr and "damaged" in resumed.stderr
    assert "resuming from the checkpoint at step" in resumed.stdout
    got = read_metrics(metrics)
    assert [r["step"] for r in got] == list(range(12))
    assert [r["loss"] for r in got] == [r["loss"] for r in expected]  # to the bit: JSON floats round-trip
    assert (workdir / "loss.png").stat().st_size > 0


@pytest.mark.slow
def test_nan_loss_stops_with_the_step(tmp_path, monkeypatch):
    import model_zoo.train as training

    real_init = training.init_params
    monkeypatch.setattr(training, "init_params",
                        lambda config, key: jax.tree.map(lambda p: p * float("nan"), real_init(config, key)))
    cfg = TrainConfig(model=TINY.replace(num_layers=1), stages=(Stage(32, 1e4, 2),), batch_size=2,
                      mesh=(("dp", 2), ("sp", 4)))
    with pytest.raises(TrainingError, match=r"step 0 \(stage 1, 32 tokens\): loss is nan"):
        train(cfg, tmp_path, progress=False)


@pytest.mark.slow
def test_init_from_starts_a_new_run_from_another_runs_parameters(tmp_path):
    model = TINY.replace(num_layers=1)
    first = TrainConfig(model=model, stages=(Stage(32, 1e4, 1),), batch_size=2, mesh=(("sp", 1),))
    trained = jax.device_get(train(first, tmp_path / "first", progress=False)["params"])
    # A longer context, another theta and other data: the next stage of a progressive run.
    second = dataclasses.replace(first, stages=(Stage(64, 1e5, 1),), seed=3, init_from=str(tmp_path / "first"))
    train(second, tmp_path / "second", progress=False)
    [record] = read_metrics(tmp_path / "second" / "metrics.jsonl")
    batch = packed_batch(3, 0, batch_size=2, seq_len=64)
    expected = loss_fn(trained, batch, model.replace(rope_theta=1e5))  # the loss is taken before the update
    np.testing.assert_allclose(record["loss"], expected, rtol=1e-5)
    # The saved model is the one the last stage trained: its rope_theta, not the preset's.
    assert load_model(tmp_path / "second")[0].rope_theta == 1e5

    wider = dataclasses.replace(second, model=model.replace(num_layers=2))
    with pytest.raises(ValueError, match="init_from=.*first' holds parameters of other shapes than the model"):
        train(wider, tmp_path / "third", progress=False)


@pytest.mark.slow
def test_parameters_sharded_over_the_sequence_train_to_the_same_losses(tmp_path):
    """params_over_sequence (ZeRO-3 over the ring, what `plan` compiles) changes where parameters
    and AdamW state lie, not what the steps compute."""
    plain = TrainConfig(model=TINY.replace(num_layers=1), stages=(Stage(64, 1e4, 3),), batch_size=2,
                        mesh=(("sp", 4),))
    zero = dataclasses.replace(plain, params_over_sequence=True)
    train(plain, tmp_path / "plain", progress=False)
    state = train(zero, tmp_path / "zero", progress=False)
    losses = [[r["loss"] for r in read_metrics(tmp_path / run / "metrics.jsonl")] for run in ("plain", "zero")]
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)
    assert state["params"]["layers"]["wq"].sharding.spec[1] == "sp"
    mu = state["opt_state"][1][0].mu["layers"]["wq"]  # clip_by_global_norm, then adamw's moments
    assert mu.sharding.spec[1] == "sp"


def test_bad_settings_are_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--workdir", str(tmp_path), "--steps", "0"])
    assert "expected a positive integer, got '0'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--workdir", str(tmp_path), "--stages", "512:1e4"])
    assert "a stage is SEQ_LEN:ROPE_THETA:STEPS[:ROWS], got '512:1e4'" in capsys.readouterr().err
    assert main(["train", "--workdir", str(tmp_path / "a"), "--preset", "huge"]) == 1
    assert "unknown preset 'huge'" in capsys.readouterr().err
    assert main(["train", "--workdir", str(tmp_path / "b"), "--mesh", "sp=16"]) == 1
    assert "needs 16 devices, 8 are available" in capsys.readouterr().err
    assert main(["train", "--workdir", str(tmp_path / "e"), "--init-from", "none", "--batch-size", "3",
                 "--mesh", "dp=2,sp=4"]) == 1
    assert "batch_size=3 must be divisible by dp*fsdp=2" in capsys.readouterr().err
    # The main job's stages set their own rows: a rows flag would change nothing, so it is refused.
    assert main(["train", "--workdir", str(tmp_path / "j"), "--batch-size", "3"]) == 1
    assert "every stage of this run sets its own rows, so --batch-size would change nothing" in capsys.readouterr().err
    # A stage that does not split over the ring is refused before training, naming the stage and
    # the axis, and a refused run leaves no workdir behind.
    assert main(["train", "--workdir", str(tmp_path / "f"), "--mesh", "sp=3"]) == 1
    assert "stage 1 (4096 tokens) on the mesh" in (err := capsys.readouterr().err)
    assert "sequence length 4096 must be divisible by the 3 devices it lies over (sp=3 x uly=1)" in err
    assert main(["train", "--workdir", str(tmp_path / "i"), "--init-from", str(tmp_path / "nowhere")]) == 1
    assert "is neither a folder nor a shipped model" in capsys.readouterr().err
    assert main(["train", "--workdir", str(tmp_path / "g"), "--mesh", "sp=0"]) == 1
    assert "mesh axis sp must be a positive int or -1, got 0" in capsys.readouterr().err
    assert main(["train", "--workdir", str(tmp_path / "h"), "--mesh", "sp=4,uly=2"]) == 1
    assert "a mesh with uly=2 runs attention as Ulysses inside the ring: attention_strategy must be" in (
        capsys.readouterr().err
    )
    for refused in "abefghij":
        assert not (tmp_path / refused).exists(), f"a refused run left {tmp_path / refused} behind"
    assert main(["train", "--workdir", str(tmp_path / "c"), "--learning-rate", "5"]) == 1
    assert "learning_rate must be in (0, 1), got 5.0" in capsys.readouterr().err
    # A workdir keeps one run's settings: resuming with others would mix two runs.
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "run.json").write_text(json.dumps({"seed": 1}))
    assert main(["train", "--workdir", str(tmp_path / "d")]) == 1
    assert "holds a run with different settings" in capsys.readouterr().err


def test_the_command_line_offers_every_attention_strategy():
    from model_zoo import __main__ as cli
    from ring_attn.context import STRATEGIES

    assert cli.STRATEGIES == STRATEGIES  # named twice so that --help needs no JAX


@pytest.mark.slow
def test_tokens_per_batch_sizes_each_stage(tmp_path):
    # 256 tokens a batch: 8 rows of 32, then 4 of 64, checked against the mesh before training.
    cfg = TrainConfig(model=TINY.replace(num_layers=1), stages=(Stage(32, 1e4, 1), Stage(64, 1e5, 1)),
                      tokens_per_batch=256, mesh=(("dp", 2), ("sp", 2)))
    assert [cfg.rows(s) for s in cfg.stages] == [8, 4]
    train(cfg, tmp_path, progress=False)
    assert [r["tokens"] <= 256 for r in read_metrics(tmp_path / "metrics.jsonl")] == [True, True]
    with pytest.raises(ValueError, match="tokens_per_batch=48 holds no row of a stage of 64 tokens"):
        dataclasses.replace(cfg, tokens_per_batch=48)
    with pytest.raises(ValueError, match=r"stage 2 \(64 tokens\).*batch_size=3 must be divisible by dp\*fsdp=2"):
        training_mesh(dataclasses.replace(cfg, tokens_per_batch=192))


@pytest.mark.slow
def test_recipes_are_named_once_for_the_command_line_and_checked(tmp_path, capsys, monkeypatch):
    import model_zoo.train as training
    from model_zoo import __main__ as cli

    assert cli.RECIPES == tuple(training.RECIPES)  # named twice so that --help needs no JAX
    assert set(cli.TRAIN_DEFAULTS) <= {f.name for f in dataclasses.fields(TrainConfig)}
    # The recipe's settings reach the run (its stages shrunk here to two steps), and its rows per stage.
    small = dict(training.RECIPES["retrieval"], stages=(Stage(32, 1e4, 1, batch_size=4), Stage(64, 1e5, 1, 2)))
    monkeypatch.setitem(training.RECIPES, "retrieval", small)
    assert main(["train", "--recipe", "retrieval", "--workdir", str(tmp_path / "r"), "--mesh", "sp=2",
                 "--no-progress"]) == 0
    run = json.loads((tmp_path / "r" / "run.json").read_text())
    assert (run["needle_fraction"], run["repeat_fraction"], run["save_every"]) == (0.5, 0.5, 200)
    assert [s["batch_size"] for s in run["stages"]] == [4, 2]
    assert [r["seq_len"] for r in read_metrics(tmp_path / "r" / "metrics.jsonl")] == [32, 64]
    assert main(["train", "--recipe", "retrieval", "--workdir", str(tmp_path / "s"), "--stages", "32:1e4:1",
                 "--learning-rate", "1e-3"]) == 1
    assert "--recipe retrieval sets --stages, --learning-rate: drop them" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


@pytest.mark.slow
def test_the_main_job_extends_the_shipped_model_and_none_trains_from_scratch(tmp_path, monkeypatch):
    import model_zoo.train as training

    # The main job's stages shrunk to one step each; its start, theta, rows, learning rate and
    # needle rows reach the run, and a flag given beside it overrides its setting.
    main_job = dict(training.MAIN_JOB, stages=(Stage(64, 3e5, 1, batch_size=4), Stage(128, 1e6, 1, 2)))
    monkeypatch.setattr(training, "MAIN_JOB", main_job)
    monkeypatch.setattr(training, "TINY_STAGES", (Stage(64, 1e4, 1), Stage(128, 1e5, 1)))
    runs = (("extend", []), ("scratch", ["--init-from", "none"]), ("rate", ["--learning-rate", "2e-3"]))
    for name, flags in runs:
        assert main(["train", "--workdir", str(tmp_path / name), "--mesh", "sp=2", "--no-progress", *flags]) == 0
    extended = json.loads((tmp_path / "extend" / "run.json").read_text())
    assert extended["init_from"] == "lwm-tiny-retrieval"
    assert [(s["rope_theta"], s["batch_size"]) for s in extended["stages"]] == [(3e5, 4), (1e6, 2)]
    assert (extended["learning_rate"], extended["long_needle_fraction"]) == (1e-3, 0.5)
    scratch = json.loads((tmp_path / "scratch" / "run.json").read_text())
    assert scratch["init_from"] is None
    assert (scratch["learning_rate"], scratch["long_needle_fraction"]) == (3e-3, 0.0)  # as before
    rate = json.loads((tmp_path / "rate" / "run.json").read_text())
    assert (rate["init_from"], rate["learning_rate"], rate["long_needle_fraction"]) == ("lwm-tiny-retrieval", 2e-3, 0.5)
    first_loss = {name: read_metrics(tmp_path / name / "metrics.jsonl")[0]["loss"] for name in ("extend", "scratch")}
    # A trained model starts far below the untrained one's log(vocab) = 6.9.
    assert first_loss["extend"] < 4.0 < 6.0 < first_loss["scratch"], first_loss
