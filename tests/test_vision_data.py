"""Vision-language rows: LWM's layout token by token (both orders, the chat prompts), the loss and
vision masks, packing with text through the loader, images and clips read from files and encoded,
and bad input named with its file, line and field."""

import json

import numpy as np
import pytest
from PIL import Image

from model_zoo.corpus import corpus_documents
from model_zoo.documents import DataError, Documents, record_from_row
from model_zoo.loader import DocumentBatches, encode_record
from model_zoo.media import MediaError, fit_frames, read_frames, write_frames
from model_zoo.tokenizer import default_tokenizer
from model_zoo.vision_data import VisionSpec, generation_prompt, understanding_prompt

EOF, EOV = 8192, 8193
TEXT_KEYS = {"inputs", "targets", "loss_mask", "segment_ids", "positions"}


@pytest.fixture(autouse=True)
def data_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RING_ATTN_DATA_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer()


def random_codes(rng, frames, per_frame, high=8192):
    return rng.integers(0, high, size=(frames, per_frame)).tolist()


def random_text(rng, low=10, high=60):
    corpus = "\n".join(corpus_documents())
    n = int(rng.integers(low, high))
    start = int(rng.integers(0, len(corpus) - n))
    return corpus[start : start + n].replace("\n", " ").strip() + f" #{rng.integers(1 << 20)}"


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def one_record(tmp_path, row, spec, name="docs.jsonl"):
    """The record of a one-row JSON lines file."""
    return Documents(write_jsonl(tmp_path / name, [row]), vision=spec)[0]


def expected_clip(tok, frames, trained):
    """(ids, loss, vision) of `<vision>` clip `</vision>` by the rule: each frame's codes, then 8192,
    the last frame's 8193; the vision mask on the codes and those two only."""
    start, end = tok.encode("<vision>"), tok.encode("</vision>")
    codes = []
    for i, frame in enumerate(frames):
        codes += list(frame) + [EOV if i == len(frames) - 1 else EOF]
    ids = start + codes + end
    return ids, [trained] * len(ids), [False] * len(start) + [True] * len(codes) + [False] * len(end)


def check(encoded, ids, loss, vision):
    got_ids, got_loss, got_vision = encoded
    assert got_ids.dtype == np.int32 and got_loss.dtype == np.float32 and got_vision.dtype == bool
    assert got_ids.tolist() == ids
    assert got_loss.tolist() == [float(x) for x in loss]
    assert got_vision.tolist() == vision


# --- the layout of one row ------------------------------------------------------------------------


@pytest.mark.parametrize("frames", [1, 3])
def test_generation_row(tmp_path, tok, frames):
    rng = np.random.default_rng(frames)
    codes, caption = random_codes(rng, frames, 4), random_text(rng)
    spec = VisionSpec(tokens_per_frame=4)
    record = one_record(tmp_path, {"vision": codes, "caption": caption}, spec)
    what = "a video" if frames > 1 else "an image"
    prompt = [tok.bos_id] + tok.encode(f"You are a helpful assistant. USER: Generate {what} of {caption} ASSISTANT:")
    prompt += tok.encode("<vision>")
    clip = [c for i, f in enumerate(codes) for c in f + [EOV if i == frames - 1 else EOF]]
    end = tok.encode("</vision>") + [tok.eos_id]
    ids = prompt + clip + end
    loss = [0] * len(prompt) + [1] * (len(clip) + len(end))
    vision = [False] * len(prompt) + [True] * len(clip) + [False] * len(end)
    check(encode_record(record, tok, spec), ids, loss, vision)
    # the generation command asks with exactly the tokens the row was trained after
    asked, asked_vision = generation_prompt(tok, caption, video=frames > 1)
    assert asked.tolist() == prompt and not asked_vision.any()


def test_understanding_row(tmp_path, tok):
    rng = np.random.default_rng(7)
    codes, question, answer = random_codes(rng, 2, 4), random_text(rng) + "?", random_text(rng)
    spec = VisionSpec(tokens_per_frame=4)
    record = one_record(tmp_path, {"vision": codes, "question": question, "answer": answer}, spec)
    head = [tok.bos_id] + tok.encode(f"You are a helpful assistant. USER: {question}\n")
    clip_ids, _, clip_vision = expected_clip(tok, codes, 0)
    tail = tok.encode(" ASSISTANT:")
    whole = tok.encode(" ASSISTANT: " + answer)
    assert whole[: len(tail)] == tail  # the answer's tokens are what follows the prompt in the whole turn
    reply = whole[len(tail) :] + [tok.eos_id]
    prompt = head + clip_ids + tail
    ids = prompt + reply
    loss = [0] * len(prompt) + [1] * len(reply)
    vision = [False] * len(head) + clip_vision + [False] * (len(tail) + len(reply))
    check(encode_record(record, tok, spec), ids, loss, vision)
    asked, asked_vision = understanding_prompt(tok, np.asarray(codes), question)
    assert asked.tolist() == prompt and asked_vision.tolist() == vision[: len(prompt)]


@pytest.mark.parametrize("fields", ["[text],vision", "[vision],text", "vision,[text]", "[title+text],vision,<|eos|>"])
def test_lwm_fields_row(tmp_path, tok, fields):
    """LWM's VisionTextProcessor: bos (no loss), the fields in order ([x]: no loss), eos (loss)."""
    rng = np.random.default_rng(len(fields))
    codes = random_codes(rng, 3, 4)
    row = {"vision": [c for f in codes for c in f], "text": random_text(rng), "title": random_text(rng),
           "fields": fields}
    spec = VisionSpec(tokens_per_frame=4)
    ids, loss, vision = [tok.bos_id], [0], [False]
    for field in fields.split(","):
        trained = 0 if field.startswith("[") else 1
        name = field.strip("[]")
        if name == "vision":
            part = expected_clip(tok, codes, trained)
        elif name == "<|eos|>":
            part = [tok.eos_id], [trained], [False]
        else:
            text = tok.encode(" ".join(row[k] for k in name.split("+")))
            part = text, [trained] * len(text), [False] * len(text)
        ids, loss, vision = ids + part[0], loss + part[1], vision + part[2]
    ids, loss, vision = ids + [tok.eos_id], loss + [1], vision + [False]
    check(encode_record(one_record(tmp_path, row, spec), tok, spec), ids, loss, vision)


def test_text_alone_is_caption_then_clip(tmp_path, tok):
    rng = np.random.default_rng(3)
    codes = random_codes(rng, 2, 4)
    spec = VisionSpec(tokens_per_frame=4)
    text = random_text(rng)
    plain = encode_record(one_record(tmp_path, {"vision": codes, "text": text}, spec), tok, spec)
    laid = encode_record(one_record(tmp_path, {"vision": codes, "text": text, "fields": "[text],vision"}, spec,
                                    name="b.jsonl"), tok, spec)
    for a, b in zip(plain, laid):
        np.testing.assert_array_equal(a, b)


def test_max_frames_samples_given_codes_evenly(tmp_path, tok):
    rng = np.random.default_rng(11)
    codes = random_codes(rng, 7, 4)
    spec = VisionSpec(tokens_per_frame=4, max_frames=3)
    ids, _, vision = encode_record(one_record(tmp_path, {"vision": codes, "text": "x"}, spec), tok, spec)
    kept = [codes[0], codes[3], codes[6]]  # np.linspace(0, 6, 3)
    assert ids[vision].tolist() == [c for i, f in enumerate(kept) for c in f + [EOV if i == 2 else EOF]]


# --- packing through the loader ---------------------------------------------------------------------


def test_vision_rows_pack_with_text(tmp_path, tok):
    rng = np.random.default_rng(5)
    spec = VisionSpec(tokens_per_frame=4)
    rows, expected = [], []
    for i in range(24):
        codes = random_codes(rng, int(rng.integers(1, 4)), 4)
        if i % 3 == 0:
            rows.append({"text": random_text(rng)})
            ids = [tok.bos_id] + tok.encode(rows[-1]["text"]) + [tok.eos_id]
            expected.append((ids, [False] * len(ids)))
        elif i % 3 == 1:
            rows.append({"vision": codes, "caption": random_text(rng)})
            what = "a video" if len(codes) > 1 else "an image"
            prompt = [tok.bos_id] + tok.encode(
                f"You are a helpful assistant. USER: Generate {what} of {rows[-1]['caption']} ASSISTANT:")
            prompt += tok.encode("<vision>")
            clip = [c for j, f in enumerate(codes) for c in f + [EOV if j == len(codes) - 1 else EOF]]
            end = tok.encode("</vision>") + [tok.eos_id]
            ids = prompt + clip + end
            expected.append((ids, [False] * len(prompt) + [True] * len(clip) + [False] * len(end)))
        else:
            rows.append({"vision": codes, "text": random_text(rng), "fields": "[vision],text"})
            clip_ids, _, clip_vision = expected_clip(tok, codes, 0)
            text = tok.encode(rows[-1]["text"])
            ids = [tok.bos_id] + clip_ids + text + [tok.eos_id]
            expected.append((ids, [False] + clip_vision + [False] * (len(text) + 1)))
    documents = Documents(write_jsonl(tmp_path / "mixed.jsonl", rows), vision=spec)
    batch = DocumentBatches(documents, tok, seed=1, vision=spec).batch(0, 4, 256)
    assert set(batch) == TEXT_KEYS | {"vision_inputs", "vision_targets"}
    assert batch["vision_inputs"].dtype == bool and batch["vision_targets"].dtype == bool
    by_ids = {tuple(ids): vision for ids, vision in expected}
    segments = kinds = 0
    for r in range(4):
        seg = batch["segment_ids"][r]
        for s in range(1, seg.max() + 1):
            cols = seg == s
            ids = tuple(batch["inputs"][r, cols].tolist() + [int(batch["targets"][r, cols][-1])])
            assert ids in by_ids, f"row {r} segment {s} is no whole document"
            vision = by_ids[ids]
            assert batch["vision_inputs"][r, cols].tolist() == vision[:-1]
            assert batch["vision_targets"][r, cols].tolist() == vision[1:]
            assert batch["positions"][r, cols].tolist() == list(range(cols.sum()))
            segments, kinds = segments + 1, kinds | (1 << int(any(vision)))
        pad = seg == 0
        assert not batch["vision_inputs"][r, pad].any() and not batch["vision_targets"][r, pad].any()
    assert segments >= 8 and kinds == 3  # text and vision documents both packed
    # a vision token's id lies in the vision vocabulary; a text token's in the text one
    assert (batch["inputs"][batch["vision_inputs"]] <= EOV).all()
    assert (batch["inputs"][~batch["vision_inputs"]] < tok.vocab_size).all()


def test_text_only_batches_are_unchanged(tmp_path, tok):
    rng = np.random.default_rng(9)
    path = write_jsonl(tmp_path / "text.jsonl", [{"text": random_text(rng, 40, 300)} for _ in range(40)])
    plain = DocumentBatches(Documents(path), tok, seed=3, needle_fraction=0.3).batch(2, 4, 128)
    assert set(plain) == TEXT_KEYS
    spec = VisionSpec()
    with_vision = DocumentBatches(Documents(path, vision=spec), tok, seed=3, needle_fraction=0.3,
                                  vision=spec).batch(2, 4, 128)
    for key in TEXT_KEYS:
        np.testing.assert_array_equal(plain[key], with_vision[key])
    assert not with_vision["vision_inputs"].any() and not with_vision["vision_targets"].any()


# --- files: images and clips ------------------------------------------------------------------------


def grey_frames(count, size=32, step=20):
    """Frame i: four quadrants of grey 10 + step * (4 i + q), q = 0..3 (distinct, exact in GIF's palette)."""
    frames = np.zeros((count, size, size, 3), np.uint8)
    h = size // 2
    for i in range(count):
        for q, (y, x) in enumerate([(0, 0), (0, h), (h, 0), (h, h)]):
            frames[i, y : y + h, x : x + h] = 10 + step * (4 * i + q) % 240
    return frames


@pytest.mark.slow
def test_read_png_gif_mp4(tmp_path):
    import imageio.v3 as iio

    frames = grey_frames(10, step=6)
    Image.fromarray(frames[4]).save(tmp_path / "one.png")
    iio.imwrite(tmp_path / "clip.gif", frames, loop=0, duration=100)
    iio.imwrite(tmp_path / "clip.mp4", frames, plugin="pyav", codec="libx264", fps=4)
    png = read_frames(tmp_path / "one.png")
    assert png.shape == (1, 32, 32, 3) and png.dtype == np.uint8
    np.testing.assert_array_equal(png[0], frames[4])
    gif = read_frames(tmp_path / "clip.gif")
    assert gif.shape == (10, 32, 32, 3)
    np.testing.assert_array_equal(gif, frames)
    for path, tolerance in [(tmp_path / "clip.gif", 0), (tmp_path / "clip.mp4", 6)]:
        sampled = read_frames(path, max_frames=4)
        assert sampled.shape == (4, 32, 32, 3)
        want = frames[[0, 3, 6, 9]]  # np.linspace(0, 9, 4) rounded down
        centre = (slice(None), slice(4, 12), slice(4, 12))  # inside a quadrant, away from codec blur
        assert np.abs(sampled[centre].astype(int) - want[centre]).max() <= tolerance, path
    assert len(read_frames(tmp_path / "clip.mp4")) == 10
    assert len(read_frames(tmp_path / "clip.gif", max_frames=20)) == 10


def test_grey_and_alpha_become_rgb(tmp_path):
    rng = np.random.default_rng(2)
    grey = rng.integers(0, 256, (9, 7), dtype=np.uint8)
    rgba = rng.integers(0, 256, (9, 7, 4), dtype=np.uint8)
    Image.fromarray(grey, "L").save(tmp_path / "grey.png")
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(read_frames(tmp_path / "grey.png")[0], np.repeat(grey[..., None], 3, -1))
    np.testing.assert_array_equal(read_frames(tmp_path / "rgba.png")[0], rgba[..., :3])


def test_fit_frames_crops_the_centre_and_resizes():
    frames = np.zeros((2, 20, 30, 3), np.uint8)
    frames[:, :, :5] = (255, 0, 0)  # the bands a centre crop drops
    frames[:, :, 25:] = (255, 0, 0)
    frames[:, :, 5:25] = (0, 0, 200)
    np.testing.assert_array_equal(fit_frames(frames, 20), np.broadcast_to(np.array([0, 0, 200], np.uint8),
                                                                          (2, 20, 20, 3)))
    small = fit_frames(frames, 8)
    assert small.shape == (2, 8, 8, 3) and small.dtype == np.uint8
    assert np.abs(small.astype(int) - [0, 0, 200]).max() <= 2
    tall = fit_frames(np.zeros((1, 40, 10, 3), np.uint8), 16)
    assert tall.shape == (1, 16, 16, 3)


def test_write_frames(tmp_path):
    frames = grey_frames(3, size=16)
    assert write_frames(tmp_path / "out.gif", frames) == [tmp_path / "out.gif"]
    np.testing.assert_array_equal(read_frames(tmp_path / "out.gif"), frames)
    paths = write_frames(tmp_path / "out.png", frames)
    assert [p.name for p in paths] == ["out-000.png", "out-001.png", "out-002.png"]
    np.testing.assert_array_equal(read_frames(paths[2])[0], frames[2])
    assert write_frames(tmp_path / "still.png", frames[1]) == [tmp_path / "still.png"]
    np.testing.assert_array_equal(read_frames(tmp_path / "still.png")[0], frames[1])


class QuadrantEncoder:
    """A stand-in VQGAN: a frame of `resolution` becomes 2 x 2 codes, each its quadrant's mean grey / 10."""

    resolution, num_codes, tokens_per_frame = 16, 8192, 4

    def __init__(self):
        self.shapes = []

    def encode_frames(self, frames):
        self.shapes.append(frames.shape)
        q = frames.reshape(len(frames), 2, 8, 2, 8, 3).mean(axis=(2, 4, 5))
        return np.rint(q / 10).astype(np.int32).reshape(len(frames), 4)


class SmallCodebook(QuadrantEncoder):
    num_codes = 1000


def quadrant_codes(frames):
    return [[int(round(float(v) / 10)) for v in frame[[0, 0, 16, 16], [0, 16, 0, 16], 0]] for frame in frames]


def test_files_are_read_and_encoded(tmp_path, tok):
    import imageio.v3 as iio

    frames = grey_frames(5, step=10)  # quadrant greys are multiples of 10: the codes are exact
    (tmp_path / "clips").mkdir()
    iio.imwrite(tmp_path / "clips" / "a.gif", frames, loop=0, duration=100)
    Image.fromarray(frames[2]).save(tmp_path / "still.png")
    encoder = QuadrantEncoder()
    spec = VisionSpec(encoder=encoder, max_frames=3)
    rows = [{"video": "clips/a.gif", "caption": "grey squares"},
            {"image": str(tmp_path / "still.png"), "question": "What is it?", "answer": "Squares."}]
    documents = Documents(write_jsonl(tmp_path / "data" / "rows.jsonl", [dict(rows[0], video="../clips/a.gif"),
                                                                          rows[1]]), vision=spec)
    ids, loss, vision = encode_record(documents[0], tok, spec)
    kept = quadrant_codes(frames[[0, 2, 4]])
    assert encoder.shapes == [(3, 16, 16, 3)]  # 32 x 32 frames resized to the encoder's 16
    assert ids[vision].tolist() == [c for i, f in enumerate(kept) for c in f + [EOV if i == 2 else EOF]]
    assert loss[vision].min() == 1
    ids, loss, vision = encode_record(documents[1], tok, spec)
    assert ids[vision].tolist() == quadrant_codes(frames[[2]])[0] + [EOV]
    assert loss[vision].max() == 0 and loss[-1] == 1


# --- errors -----------------------------------------------------------------------------------------


def test_unreadable_and_empty_files(tmp_path, tok):
    import av

    (tmp_path / "bad.mp4").write_bytes(b"no video in here" * 8)
    container = av.open(str(tmp_path / "empty.mp4"), "w")
    stream = container.add_stream("libx264", rate=4)
    stream.width = stream.height = 16
    container.start_encoding()
    container.close()
    (tmp_path / "bad.png").write_bytes(b"\x89PNG but not really")
    with pytest.raises(MediaError, match=r"bad\.mp4: cannot read it as a clip"):
        read_frames(tmp_path / "bad.mp4")
    with pytest.raises(MediaError, match=r"empty\.mp4: holds no frame"):
        read_frames(tmp_path / "empty.mp4")
    with pytest.raises(MediaError, match=r"bad\.png: cannot read it as an image"):
        read_frames(tmp_path / "bad.png")
    with pytest.raises(MediaError, match=r"missing\.gif: no such file"):
        read_frames(tmp_path / "missing.gif")
    with pytest.raises(MediaError, match=r"clip\.xyz: unknown kind of image or video '\.xyz'"):
        read_frames(tmp_path / "clip.xyz")
    spec = VisionSpec(encoder=QuadrantEncoder())
    documents = Documents(write_jsonl(tmp_path / "rows.jsonl", [{"video": "bad.mp4", "caption": "c"},
                                                                {"video": "empty.mp4", "caption": "c"}]), vision=spec)
    with pytest.raises(DataError, match=r"rows\.jsonl at byte 0: field 'video': .*bad\.mp4: cannot read"):
        encode_record(documents[0], tok, spec)
    with pytest.raises(DataError, match=r"rows\.jsonl at byte \d+: field 'video': .*empty\.mp4: holds no frame"):
        encode_record(documents[1], tok, spec)


@pytest.mark.parametrize("row, spec, message", [
    ({"vision": [[1, 2, 3, 8192]], "text": "t"}, VisionSpec(tokens_per_frame=4),
     r"rows\.jsonl:2: field 'vision' holds code 8192 \(code 3\), outside the codebook \[0, 8192\)"),
    ({"vision": [5, -1, 7, 0], "text": "t"}, VisionSpec(tokens_per_frame=4),
     r"rows\.jsonl:2: field 'vision' holds code -1 \(code 1\), outside the codebook \[0, 8192\)"),
    ({"vision": [[3, 999, 1000, 0]], "text": "t"}, VisionSpec(encoder=SmallCodebook()),
     r"rows\.jsonl:2: field 'vision' holds code 1000 \(code 2\), outside the codebook \[0, 1000\)"),
    ({"vision": list(range(10)), "text": "t"}, VisionSpec(tokens_per_frame=4),
     r"rows\.jsonl:2: field 'vision' holds 10 codes, not a multiple of the 4 codes of a frame"),
    ({"vision": [[1, 2, 3, 4], [5, 6, 7]], "text": "t"}, VisionSpec(tokens_per_frame=4),
     r"rows\.jsonl:2: field 'vision' frame 1 holds 3 codes, expected 4"),
    ({"vision": [1, 2, 3.5, 4], "text": "t"}, VisionSpec(tokens_per_frame=4),
     r"rows\.jsonl:2: field 'vision' holds 3\.5, not an integer code"),
    ({"video": "clip.gif", "caption": "c"}, None,
     r"rows\.jsonl:2: the row has 'video' but the model has vision=False"),
    ({"image": "x.png", "caption": "c"}, None, r"rows\.jsonl:2: the row has 'image' but the model has vision=False"),
    ({"video": "missing.gif", "caption": "c"}, VisionSpec(encoder=QuadrantEncoder()),
     r"rows\.jsonl:2: field 'video' names .*missing\.gif, which does not exist"),
    ({"video": "clip.gif", "caption": "c"}, VisionSpec(),
     r"rows\.jsonl:2: field 'video' names a file, which needs a VQGAN"),
    ({"vision": [1, 2, 3, 4], "video": "clip.gif", "text": "t"}, VisionSpec(tokens_per_frame=4),
     r"rows\.jsonl:2: the row has 'vision' and 'video'; a row holds one clip"),
    ({"vision": [1, 2, 3, 4], "text": "t", "fields": "[text]"}, VisionSpec(tokens_per_frame=4),
     r"rows\.jsonl:2: 'fields' '\[text\]' does not name the row's clip 'vision'"),
    ({"vision": [1, 2, 3, 4], "fields": "[caption],vision"}, VisionSpec(tokens_per_frame=4),
     r"rows\.jsonl:2: the row has no 'caption'"),
    ({"vision": [1, 2, 3, 4]}, VisionSpec(tokens_per_frame=4), r"rows\.jsonl:2: a 'vision' row needs its text"),
])
def test_bad_rows_are_named(tmp_path, row, spec, message):
    write_frames(tmp_path / "clip.gif", grey_frames(2, size=16))
    path = write_jsonl(tmp_path / "rows.jsonl", [{"text": "a text row first"}, row])
    with pytest.raises(DataError, match=message):
        Documents(path, vision=spec)


def test_a_text_row_with_an_image_column_stays_text_without_vision():
    """Without vision the text field decides: an `image` column (a URL, say) does not make a vision row."""
    row = {"text": "a caption of a photo", "image": "https://example.com/photo.jpg"}
    assert record_from_row(row, "rows.jsonl:1", "text") == "a caption of a photo"
