"""The world recipe end to end at toy sizes: VQGAN, rows, LWM on the ring, scores, the model folder
(which the vision commands then run); a rerun resumes instead of starting over, and a later round
starts from the round before on fresh clips; the rows' layout."""

import json

import numpy as np
import pytest

from model_zoo import world
from model_zoo.__main__ import main
from model_zoo.config import EOF_TOKEN, EOV_TOKEN
from model_zoo.tokenizer import default_tokenizer
from model_zoo.vision_data import VisionSpec, encode_vision_record, vision_record
from model_zoo.world_recipe import WORLD_MODEL


@pytest.mark.slow
def test_recipe_at_toy_sizes_then_its_model_runs(tmp_path, capsys):
    argv = ["world", "--workdir", str(tmp_path), "--steps", "2", "--vqgan-steps", "3", "--clips", "4",
            "--eval-clips", "2", "--rounds", "1", "--no-progress"]
    assert main(argv) == 0
    model = tmp_path / "model"
    provenance = json.loads((model / "provenance.json").read_text())
    assert provenance["steps"] == 2 and provenance["world_eval"]["clips"] == 2
    for key in ("answer_colour", "answer_shape", "answer_direction", "generated_colour", "generated_motion"):
        assert 0 <= provenance["world_eval"][key] <= 1
    assert len(provenance["world_eval"]["next_code_accuracy"]) == world.FRAMES
    assert json.loads((model / "model.json").read_text())["config"]["vision"] is True
    assert (model / "vqgan" / "config.json").is_file()
    rows = [json.loads(line) for line in (tmp_path / "data" / "rows.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and sum("question" in r for r in rows) == 4
    clip = tmp_path / "clip.gif"
    assert main(["generate-video", "--model", str(model), "--prompt", "a red circle moving left", "--frames", "2",
                 "--out", str(clip)]) == 0
    assert main(["generate", "--model", str(model), "--video", str(clip), "--prompt", "What colour is the shape?",
                 "--max-new-tokens", "3"]) == 0
    # done steps are not redone: a rerun asking for a second round resumes the first from its checkpoint,
    # then trains the second from the first's parameters on clips of its own
    capsys.readouterr()
    assert main([*argv[:-2], "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "resuming from the checkpoint at step 2" in out
    assert f"starting from the parameters in {tmp_path / 'lwm'}" in out
    provenance = json.loads((model / "provenance.json").read_text())
    assert provenance["steps"] == 4 and [r["steps"] for r in provenance["rounds"]] == [2, 2]
    second = [json.loads(line) for line in (tmp_path / "data" / "rows-2.jsonl").read_text().splitlines()]
    assert len(second) == 8 and second != rows


def test_world_rows_as_the_model_reads_them():
    """A caption row and a question row of world codes, laid out token by token as LWM lays them."""
    tokenizer, rng = default_tokenizer(), np.random.default_rng(0)
    codes = rng.integers(0, 512, (world.FRAMES, 64))
    spec = VisionSpec(tokens_per_frame=64)
    clip_ids = np.concatenate([np.append(f, EOF_TOKEN) for f in codes[:-1]] + [np.append(codes[-1], EOV_TOKEN)])
    ids, loss, vision = encode_vision_record(
        vision_record({"vision": codes.tolist(), "caption": "a red circle moving left"}, "row", "text", spec),
        tokenizer, spec)
    start = int(np.flatnonzero(vision)[0])
    np.testing.assert_array_equal(ids[start:start + len(clip_ids)], clip_ids)
    assert vision.sum() == len(clip_ids) and loss[start:start + len(clip_ids)].all() and not loss[:start].any()
    prompt = tokenizer.decode(ids[1:start].tolist())
    assert "Generate a video of a red circle moving left" in prompt and prompt.endswith("<vision>")
    ids, loss, vision = encode_vision_record(
        vision_record({"vision": codes.tolist(), "question": "What colour is the shape?", "answer": "red"}, "row",
                      "text", spec), tokenizer, spec)
    assert tokenizer.decode(ids[loss > 0].tolist()).strip() == "red"
    assert ids[-1] == tokenizer.eos_id and vision.sum() == len(clip_ids)
    assert WORLD_MODEL.vision and WORLD_MODEL.vision_vocab_size == 8448
