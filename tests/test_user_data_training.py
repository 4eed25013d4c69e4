"""Training on the user's documents: every format trains, a SIGKILLed run resumes to the same losses
bit for bit (the loader's position included), two processes reading their own shards reproduce one
process, a Hugging Face LLaMA trains and speaks through its own tokenizer, eval-loss matches a
per-token oracle."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from test_lwm_train import environment, kill_after_steps, run
from test_multihost import finish, free_port
from test_user_data import FORMATS, random_texts, write_format, write_jsonl

from model_zoo import TINY
from model_zoo.train import Stage, TrainConfig, read_metrics, train

# end to end: the first CI leg runs it, the JAX-compatibility legs skip it (tests/conftest.py)
pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def data_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RING_ATTN_DATA_CACHE", str(tmp_path / "cache"))


def test_every_format_trains_and_the_loss_falls(tmp_path):
    files = [str(write_format(kind, tmp_path / kind.replace(".", "_"), random_texts(12, seed=i, high=300)))
             for i, kind in enumerate(FORMATS)]
    cfg = TrainConfig(model=TINY.replace(num_layers=1), stages=(Stage(128, 1e4, 16),), batch_size=4,
                      mesh=(("sp", 4),), data=tuple(files), needle_fraction=0.0, learning_rate=1e-2, warmup_steps=2,
                      save_every=100)
    train(cfg, tmp_path / "run", progress=False)
    losses = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    assert np.isfinite(losses).all() and np.mean(losses[-4:]) < np.mean(losses[:2]) - 1.0, losses


def train_command(workdir, data):
    return [sys.executable, "-m", "model_zoo", "--cpu-devices", "4", "train", "--workdir", str(workdir),
            "--preset", "tiny", "--init-from", "none", "--stages", "32:1e4:4,64:1e5:8", "--save-every", "2",
            "--batch-size", "2", "--mesh", "dp=2,sp=2", "--data", str(data), "--needle-fraction", "0.3",
            "--no-progress"]


def test_a_sigkilled_run_on_user_data_resumes_to_the_same_losses_and_data_position(tmp_path):
    data = write_format("jsonl.gz", tmp_path / "data", random_texts(40, seed=3, high=200))
    env = environment(tmp_path / "compiled")
    whole = run(train_command(tmp_path / "whole", data), env)
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert "data: 40 documents in 1 file(s)" in whole.stdout
    expected = read_metrics(tmp_path / "whole" / "metrics.jsonl")

    workdir = tmp_path / "killed"
    metrics = workdir / "metrics.jsonl"
    kill_after_steps(train_command(workdir, data), env, metrics, 7)
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and 4 < steps[-1] < 12, steps  # past the stage change: the loader continues at a new length

    resumed = run(train_command(workdir, data), env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from the checkpoint at step {steps[-1]}" in resumed.stdout
    got = read_metrics(metrics)
    assert [r["step"] for r in got] == list(range(12))
    assert [(r["loss"], r["tokens"]) for r in got] == [(r["loss"], r["tokens"]) for r in expected]

    def data_state(run):
        record = run / "checkpoints" / "12" / "record" / "metadata"
        return json.loads(record.read_text())["data_state"]

    assert data_state(workdir) == data_state(tmp_path / "whole")


def two_process_command(workdir, data):
    """train over a dp=2 x sp=4 mesh: 8 devices, one process or two of 4; the parameters and their
    moments sharded over every device, so each process holds only its part of them."""
    return ["train", "--workdir", str(workdir), "--preset", "tiny", "--init-from", "none", "--stages",
            "64:1e4:3,128:1e5:3", "--batch-size", "4", "--mesh", "dp=2,sp=4", "--data", data,
            "--needle-fraction", "0.25", "--save-every", "2", "--params-over-sequence", "--no-progress"]


def test_two_processes_reading_their_own_shards_train_as_one_process(tmp_path):
    from model_zoo.__main__ import main

    data = str(write_format("jsonl", tmp_path / "data", random_texts(60, seed=5, high=300)))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [subprocess.Popen([sys.executable, "-m", "model_zoo", "--cpu-devices", "4", "--coordinator",
                               f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i),
                               *two_process_command(tmp_path / "two", data)],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outputs = finish(procs, timeout=400)
    for i, (p, text) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, text[-3000:]
        assert f"data: 2 shards (dp x fsdp); process {i} reads {i}\n" in text

    assert main(two_process_command(tmp_path / "one", data)) == 0  # this process: 8 devices
    one, two = (read_metrics(tmp_path / run / "metrics.jsonl") for run in ("one", "two"))
    assert [r["tokens"] for r in two] == [r["tokens"] for r in one]
    np.testing.assert_allclose([r["loss"] for r in two], [r["loss"] for r in one], rtol=2e-6)
    np.testing.assert_allclose([r["grad_norm"] for r in two], [r["grad_norm"] for r in one], rtol=1e-5)


def test_eval_loss_buckets_match_each_document_scored_alone(tmp_path, capsys):
    import jax

    from model_zoo.__main__ import main
    from model_zoo.documents import Documents
    from model_zoo.loader import encode_record
    from model_zoo.model import forward, init_params
    from model_zoo.position_loss import bucket_edges, evaluate_position_loss, scored_documents
    from model_zoo.sharding import make_mesh
    from model_zoo.tokenizer import default_tokenizer

    texts = random_texts(5, seed=11, low=100, high=6000)
    documents = Documents([str(write_jsonl(tmp_path / "held.jsonl", [{"text": t} for t in texts]))])
    config = TINY.replace(num_layers=2)
    params = init_params(config, jax.random.key(4))
    mesh = make_mesh(sp=4, devices=jax.devices()[:4])
    scored, short = scored_documents(documents, default_tokenizer(), seq_len=256, min_tokens=1)
    assert short == 0
    with jax.set_mesh(mesh):
        got = evaluate_position_loss(params, config, scored, mesh=mesh, seq_len=256, batch_size=2, progress=False)
    sums, counts = np.zeros(256), np.zeros(256)
    for text in texts:  # the oracle: one document, no padding, one device
        ids, _ = encode_record(text, default_tokenizer())
        n = min(len(ids) - 1, 256)
        logits = np.asarray(jax.jit(forward, static_argnames="config")(params, ids[None, :n], config=config))[0]
        picked = logits[np.arange(n), ids[1 : n + 1]]
        sums[:n] += np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1) - picked
        counts[:n] += 1
    edges = bucket_edges(256)
    assert got["buckets"] == list(zip(edges, edges[1:])) and edges == [0, 32, 64, 128, 256]
    want = [sums[lo:hi].sum() / counts[lo:hi].sum() for lo, hi in got["buckets"]]
    np.testing.assert_allclose(got["loss"], want, rtol=2e-5)
    assert got["tokens"] == [counts[lo:hi].sum() for lo, hi in got["buckets"]]

    # the command: a table, loss.json and loss.png, two models on the same documents
    assert main(["eval-loss", "--model", "lwm-tiny-retrieval", "--model", "lwm-tiny-8k", "--data",
                 str(tmp_path / "held.jsonl"), "--seq-len", "1024", "--out", str(tmp_path / "out"),
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "512-1K" in out and "lwm-tiny-8k" in out
    long_enough = sum(len(encode_record(t, default_tokenizer())[0]) > 1024 for t in texts)
    assert f"scoring {long_enough} documents ({5 - long_enough} shorter than 1024 tokens left out)" in out
    assert 0 < long_enough < 5
    saved = json.loads((tmp_path / "out" / "loss.json").read_text())
    assert set(saved["models"]) == {"lwm-tiny-retrieval", "lwm-tiny-8k"} and saved["seq_len"] == 1024
    assert (tmp_path / "out" / "loss.png").stat().st_size > 0


def test_bad_data_and_tokenizers_stop_the_command_before_anything_is_written(tmp_path, capsys):
    from tokenizers import Tokenizer, models

    from model_zoo.__main__ import main

    def train(*extra):
        return main(["train", "--preset", "tiny", "--init-from", "none", "--stages", "256:1e4:2", "--batch-size",
                     "2", "--workdir", str(tmp_path / "run"), "--no-progress", *extra])

    few = write_jsonl(tmp_path / "few.jsonl", [{"text": t} for t in random_texts(2, seed=1, high=60)])
    assert train("--data", str(few)) == 1
    assert "fewer tokens than one batch of 2 x 256" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": random_texts(1, seed=2)[0]}) + "\n{not json\n")
    assert train("--data", str(bad)) == 1
    assert f"error: {bad}:2: not JSON" in capsys.readouterr().err
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(2000)}}
    Tokenizer(models.WordLevel(vocab, unk_token="<unk>")).save(str(tmp_path / "tokenizer.json"))
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": t} for t in random_texts(30, seed=3)])
    assert train("--data", str(good), "--tokenizer", str(tmp_path / "tokenizer.json")) == 1
    assert "has 2003 tokens, more than the model's vocabulary of 1024" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing half-made

    with_empty = write_jsonl(tmp_path / "with_empty.jsonl",
                             [{"text": t} for t in random_texts(30, seed=4)] + [{"text": ""}] * 3)
    assert train("--data", str(with_empty)) == 0
    assert "data: 30 documents in 1 file(s), 3 empty skipped" in capsys.readouterr().out
