"""Tokenizer, masked sequence packing, needle examples and the per-row normalised loss."""

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from model_zoo import TINY
from model_zoo.corpus import CITIES, corpus_documents
from model_zoo.data import needle_example, packed_batch
from model_zoo.tokenizer import Tokenizer, default_tokenizer
from model_zoo.train import TrainConfig, loss_fn, row_normalised


def test_tokenizer_round_trips_the_corpus_and_other_text():
    tokenizer = default_tokenizer()
    assert tokenizer.vocab_size == 1024
    for text in corpus_documents() + ["  two  spaces\n\ttab, ünïcödé ≠ ascii 🙂, digits 0123456789"]:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    # Digits are single tokens, so a number is copied digit by digit.
    assert len(tokenizer.encode(" 1234567")) == 8
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer("/nonexistent/tokenizer.model")


def test_packing_rows():
    batch = packed_batch(7, 3, batch_size=6, seq_len=256)
    assert {k: v.shape for k, v in batch.items()} == {k: (6, 256) for k in batch}
    for row in range(6):
        seg, pos, mask = batch["segment_ids"][row], batch["positions"][row], batch["loss_mask"][row]
        assert np.all(np.diff(seg[seg > 0]) >= 0) and seg[0] == 1  # documents in order from the start
        assert np.all(mask[seg == 0] == 0) and np.all(batch["inputs"][row][seg == 0] == 0)  # padding
        for s in np.unique(seg[seg > 0]):
            idx = np.flatnonzero(seg == s)
            assert np.array_equal(idx, np.arange(idx[0], idx[-1] + 1))
            assert np.array_equal(pos[idx], np.arange(len(idx)))  # positions restart per document
            # Targets are the next inputs within a document.
            assert np.array_equal(batch["targets"][row, idx[:-1]], batch["inputs"][row, idx[1:]])


def test_needle_rows_train_only_on_the_answer():
    tokenizer = default_tokenizer()
    batch = packed_batch(1, 0, batch_size=8, seq_len=512, needle_fraction=1.0)
    for row in range(8):
        seg, mask = batch["segment_ids"][row], batch["loss_mask"][row]
        for s in np.unique(seg[seg > 0]):
            idx = np.flatnonzero(seg == s)
            answer = tokenizer.decode(batch["targets"][row, idx][mask[idx] > 0])
            prompt = tokenizer.decode(batch["inputs"][row, idx][: int(np.argmax(mask[idx])) + 1])
            number = answer.strip()
            assert len(number) == 7 and number.isdigit(), answer
            assert f"number is: {number}." in prompt and prompt.endswith("ASSISTANT:")
            assert mask[idx][-1] == 1 and mask[idx].sum() == 9  # a space, 7 digits, the end of sequence


def test_long_needle_rows_hold_one_row_long_document_with_the_needle_far_from_the_question():
    tokenizer = default_tokenizer()
    seq_len, rows = 512, 64

    def distances(batch):
        """Each row's first needle's distance from the question, as a share of the row."""
        shares = []
        for row in range(rows):
            seg, mask = batch["segment_ids"][row], batch["loss_mask"][row]
            idx = np.flatnonzero(seg == 1)
            prompt = batch["inputs"][row, idx][: int(np.argmax(mask[idx]))]
            text = tokenizer.decode(prompt)
            before_needle = len(tokenizer.encode(text[: text.index(" The special magic")]))
            shares.append((len(prompt) - before_needle) / seq_len)
        return np.array(shares)

    long = packed_batch(2, 0, batch_size=rows, seq_len=seq_len, needle_fraction=1.0, long_needle_fraction=1.0)
    # one document a row, as long as the row but for the answer's room
    assert np.all(long["segment_ids"].max(axis=1) == 1)
    assert np.all((long["segment_ids"] > 0).sum(axis=1) >= seq_len - 12)
    packed = packed_batch(2, 0, batch_size=rows, seq_len=seq_len, needle_fraction=1.0)
    # Row-long documents with their depth drawn towards the start put half their needles beyond
    # 3/4 of the row from the question, where packed documents of random lengths put 3 in 100.
    far_long, far_packed = np.mean(distances(long) > 0.75), np.mean(distances(packed) > 0.75)
    assert far_long > 0.35 and far_packed < 0.1, (far_long, far_packed)
    for fraction in (-0.1, 1.5, True):
        with pytest.raises(ValueError, match=f"long_needle_fraction must lie in \\[0, 1\\], got {fraction!r}"):
            packed_batch(0, 0, batch_size=1, seq_len=seq_len, long_needle_fraction=fraction)


def test_multi_needle_rows_ask_for_every_needle():
    tokenizer = default_tokenizer()
    batch = packed_batch(4, 0, batch_size=8, seq_len=512, needle_fraction=1.0, max_needles=3)
    counts = []
    for row in range(8):
        seg, mask = batch["segment_ids"][row], batch["loss_mask"][row]
        for s in np.unique(seg[seg > 0]):
            idx = np.flatnonzero(seg == s)
            numbers = tokenizer.decode(batch["targets"][row, idx][mask[idx] > 0]).strip().split(", ")
            prompt = tokenizer.decode(batch["inputs"][row, idx][: int(np.argmax(mask[idx])) + 1])
            assert prompt.count("number is: ") == prompt.count("What is the special magic") == len(numbers)
            for number in numbers:
                assert len(number) == 7 and number.isdigit() and f"number is: {number}." in prompt
            counts.append(len(numbers))
    assert set(counts) == {1, 2, 3}, counts
    # The default is one needle, drawn exactly as before the option existed.
    one = packed_batch(4, 0, batch_size=8, seq_len=512, max_needles=1)
    default = packed_batch(4, 0, batch_size=8, seq_len=512)
    chex.assert_trees_all_equal(one, default, strict=True)
    with pytest.raises(ValueError, match="max_needles must be a positive int, got 0"):
        packed_batch(0, 0, batch_size=1, seq_len=128, max_needles=0)
    with pytest.raises(ValueError, match="max_needles must be a positive int, got 2.0"):
        TrainConfig(model=TINY, max_needles=2.0)


def test_repeat_rows_hold_a_passage_twice_and_train_on_every_token():
    batch = packed_batch(2, 0, batch_size=4, seq_len=256, needle_fraction=0.0, repeat_fraction=1.0)
    for row in range(4):
        seg, mask = batch["segment_ids"][row], batch["loss_mask"][row]
        assert np.array_equal(mask, (seg > 0).astype(np.float32))
        for s in np.unique(seg[seg > 0]):
            ids = batch["targets"][row, seg == s]  # the document after its bos
            half = len(ids) // 2
            assert len(ids) == 2 * half >= 14 and np.array_equal(ids[:half], ids[half:])
    with pytest.raises(ValueError, match="needle_fraction=0.6, repeat_fraction=0.5 and copy_fraction=0.0 must be >= 0 "
                                         "with a sum <= 1"):
        packed_batch(0, 0, batch_size=1, seq_len=128, needle_fraction=0.6, repeat_fraction=0.5)
    with pytest.raises(ValueError, match="repeat_fraction=-0.1 and copy_fraction=0.0 must be >= 0"):
        TrainConfig(model=TINY, repeat_fraction=-0.1)


def test_copy_rows_repeat_random_corpus_tokens_and_train_on_the_copy():
    batch = packed_batch(3, 0, batch_size=4, seq_len=256, needle_fraction=0.0, copy_fraction=1.0)
    for row in range(4):
        seg = batch["segment_ids"][row]
        for s in np.unique(seg[seg > 0]):
            inputs, targets, trained = (batch[k][row, seg == s] for k in ("inputs", "targets", "loss_mask"))
            tokens = np.concatenate([inputs[1:], targets[-1:]])  # the document after its bos
            half = len(tokens) // 2
            assert np.array_equal(tokens[:half], tokens[half:])
            # The first copy is random (nothing to learn), the second is trained on, token for token.
            assert np.array_equal(trained, np.r_[np.zeros(half), np.ones(half)])
            assert len(set(tokens[:half].tolist())) > half // 2  # drawn at random, not a corpus passage
    with pytest.raises(ValueError, match="copy_fraction=0.7 must be >= 0 with a sum <= 1"):
        TrainConfig(model=TINY, copy_fraction=0.7)


def test_batches_are_a_function_of_seed_and_step():
    a, b = packed_batch(0, 5, batch_size=2, seq_len=128), packed_batch(0, 5, batch_size=2, seq_len=128)
    chex.assert_trees_all_equal(a, b, strict=True)
    c = packed_batch(0, 6, batch_size=2, seq_len=128)
    assert not np.array_equal(a["inputs"], c["inputs"])


def test_needle_example_depth_and_multi_needle():
    tokenizer = default_tokenizer()
    rng = np.random.default_rng(3)
    for depth in (0.0, 0.5, 1.0):
        example = needle_example(rng, 400, depth=depth)
        assert len(example.prompt) == 400
        text = tokenizer.decode(example.prompt)
        number = example.numbers[0]
        at = text.index(f"number is: {number}.") / len(text)
        assert abs(at - depth) < 0.2, (depth, at)
    example = needle_example(rng, 600, num_needles=4, num_asked=2)
    text = tokenizer.decode(example.prompt)
    assert text.count("The special magic") == 4 and text.count("What is the special magic") == 2
    assert all(f"{n}." in text for n in example.numbers) and len(example.numbers) == 2
    assert sum(city in text for city in CITIES) >= 4
    with pytest.raises(ValueError, match="context_len=30 is too short"):
        needle_example(rng, 30)


def test_loss_is_normalised_per_row():
    rng = np.random.default_rng(0)
    losses = rng.random((3, 8)).astype(np.float32)
    mask = np.zeros((3, 8), np.float32)
    mask[0, :2] = 1
    mask[1, :] = 1  # row 2 has no loss tokens and does not count
    want = (losses[0, :2].mean() + losses[1].mean()) / 2
    np.testing.assert_allclose(row_normalised(jnp.asarray(losses), jnp.asarray(mask)), want, rtol=1e-6)


@pytest.mark.slow
def test_text_and_vision_losses_weigh_half_each():
    """The loss with both kinds of target is the mean of the text-only and vision-only losses."""
    import jax

    from model_zoo import init_params

    config = TINY.replace(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                          num_kv_heads=2, vision=True)
    params = init_params(config, jax.random.key(0))
    rng = np.random.default_rng(1)
    vision_targets = np.zeros((2, 16), bool)
    vision_targets[1] = True  # row 0 text, row 1 vision
    batch = {"inputs": rng.integers(0, 64, (2, 16)).astype(np.int32),
             "targets": rng.integers(0, 64, (2, 16)).astype(np.int32),
             "segment_ids": np.ones((2, 16), np.int32), "positions": np.tile(np.arange(16, dtype=np.int32), (2, 1)),
             "loss_mask": np.ones((2, 16), np.float32), "vision_inputs": vision_targets.copy(),
             "vision_targets": vision_targets}

    def only(row, value):
        return dict(batch, loss_mask=np.where(np.arange(2)[:, None] == row, 1.0, 0.0).astype(np.float32))

    text, vision = loss_fn(params, only(0, 1), config), loss_fn(params, only(1, 1), config)
    np.testing.assert_allclose(loss_fn(params, batch, config), 0.5 * text + 0.5 * vision, rtol=1e-6)
    assert not np.isclose(text, vision)
