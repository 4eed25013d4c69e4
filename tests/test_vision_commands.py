"""The vision commands end to end on a small random vision model and VQGAN: generate-video writes
clips, generate --video answers about one, both in --batch; bad input is refused by name."""

import json

import jax
import numpy as np
import pytest

from model_zoo import TINY, init_params
from model_zoo.__main__ import main
from model_zoo.media import read_frames, write_frames
from model_zoo.shipped import export_model
from model_zoo.vqgan import VQGANConfig, save_diffusers
from model_zoo.vqgan import init_params as vqgan_params

CONFIG = TINY.replace(vocab_size=1024, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                      num_kv_heads=2, vision=True)
VQ = VQGANConfig(resolution=16, hidden_channels=8, channel_mult=(1, 2), num_res_blocks=1, z_channels=4,
                 num_codes=32, code_dim=4, norm_groups=4)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vision-model")
    export_model(folder, CONFIG, init_params(CONFIG, jax.random.key(0)), {"note": "random, for the commands' test"})
    params = vqgan_params(VQ, jax.random.key(1))
    params["quantize.embedding.weight"] = jax.random.normal(jax.random.key(2), (VQ.num_codes, VQ.code_dim))
    save_diffusers(folder / "vqgan", VQ, params)
    return folder


@pytest.mark.slow
def test_generate_video_then_ask_about_it(model, tmp_path, capsys):
    clip = tmp_path / "clip.gif"
    assert main(["generate-video", "--model", str(model), "--prompt", "a red circle moving left", "--frames", "3",
                 "--out", str(clip), "--top-k", "8"]) == 0
    frames = read_frames(clip)
    assert frames.shape == (3, 16, 16, 3) and frames.std() > 0
    capsys.readouterr()
    assert main(["generate", "--model", str(model), "--video", str(clip), "--prompt", "What colour is the shape?",
                 "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip()  # the streamed answer


@pytest.mark.slow
def test_batches_write_one_line_a_row(model, tmp_path):
    rows = tmp_path / "captions.jsonl"
    rows.write_text("".join(json.dumps({"prompt": p, "id": i}) + "\n" for i, p in enumerate(["a", "b c"])))
    out = tmp_path / "out" / "clips.jsonl"
    assert main(["generate-video", "--model", str(model), "--batch", str(rows), "--frames", "2", "--out", str(out),
                 "--cfg-scale", "1"]) == 0
    made = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in made] == [0, 1]
    for r in made:
        assert read_frames(out.parent / r["video"]).shape == (2, 16, 16, 3)
    # a larger clip than the VQGAN's frames is resized on the way in
    write_frames(tmp_path / "big.gif", np.random.default_rng(0).integers(0, 256, (4, 40, 48, 3), dtype=np.uint8))
    questions = tmp_path / "questions.jsonl"
    questions.write_text(json.dumps({"prompt": "What shape is it?", "video": "big.gif"}) + "\n"
                         + json.dumps({"prompt": "Which way is it moving?", "video": "out/clips-0001.gif"}) + "\n")
    answers = tmp_path / "answers.jsonl"
    assert main(["generate", "--model", str(model), "--batch", str(questions), "--out", str(answers),
                 "--max-new-tokens", "3"]) == 0
    got = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [g["video"] for g in got] == ["big.gif", "out/clips-0001.gif"]
    assert all(isinstance(g["answer"], str) for g in got)


def test_bad_input_is_refused_by_name(model, tmp_path, capsys):
    def error(argv):
        assert main(argv) == 1
        return capsys.readouterr().err

    (tmp_path / "empty.gif").write_bytes(b"GIF89a")
    assert "empty.gif" in error(["generate", "--model", str(model), "--video", str(tmp_path / "empty.gif"),
                                 "--prompt", "q"])
    assert "has no vision (vision=False): it cannot take a video" in error(
        ["generate", "--model", "lwm-tiny-retrieval", "--video", str(tmp_path / "empty.gif"), "--prompt", "q"])
    assert "has no vision (vision=False): it cannot generate a clip" in error(
        ["generate-video", "--model", "lwm-tiny-retrieval", "--prompt", "a", "--out", str(tmp_path / "c.gif")])
    assert "expected a .gif, .mp4 or .png clip" in error(
        ["generate-video", "--model", str(model), "--prompt", "a", "--out", str(tmp_path / "c.txt")])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"question": "no prompt"}\n')
    assert f"{bad}:2: expected a JSON object with a string 'prompt'" in error(
        ["generate", "--model", str(model), "--batch", str(bad), "--out", str(tmp_path / "r.jsonl")])
