"""Training batches: documents packed into fixed rows with segment ids, restarted positions and a loss mask.

A batch is a pure function of (seed, step, shape): a resumed run sees exactly the batches it would have.
The mix: slices of the embedded corpus (every token trained on), needle-retrieval examples (a
number hidden in corpus text, asked for at the end; only the answer is trained on), repeated
passages (a corpus slice, then the same slice again; every token trained on) and copies of random
tokens (drawn from the corpus, then repeated; the copy trained on). The last two train copying
from context, the mechanism (an induction head) that answering a needle question needs: each
token of a second copy is predictable by finding its place in the first, a signal on hundreds of
tokens per row where a needle question gives eight.
"""

import dataclasses
import functools

import numpy as np

from model_zoo.corpus import CITIES, NEEDLE, QUESTION, chat_prompt, corpus_documents
from model_zoo.tokenizer import Tokenizer, default_tokenizer

MIN_DOCUMENT = 16  # shorter leftovers at a row's end are padding
MIN_NEEDLE = 96  # room for the template, a needle, the question and the answer
ANSWER_ROOM = 12  # tokens per asked number: " " + 7 digits + eos, with margin
EXTRA_NEEDLE_ROOM = 64  # tokens for one more needle, its question and its answer, with margin


@dataclasses.dataclass(frozen=True)
class NeedleExample:
    prompt: list[int]  # bos, the chat template around haystack + needles + question
    answer: list[int]  # the asked numbers, then eos
    numbers: tuple[str, ...]  # the asked numbers, for scoring


@functools.cache
def corpus_tokens(tokenizer: Tokenizer | None = None) -> np.ndarray:
    """The whole corpus as one token stream (documents separated by newlines)."""
    tokenizer = tokenizer or default_tokenizer()
    return np.asarray(tokenizer.encode("\n".join(corpus_documents())), np.int32)


def needle_example(rng, context_len, *, depth=None, num_needles=1, num_asked=1, tokenizer=None, haystack=None):
    """A retrieval prompt of exactly `context_len` tokens and its answer, as LWM's needle test builds it.

    `num_needles` needles `The special magic {city} number is: {7 digits}.` go into corpus text at
    `depth` (a fraction of the haystack; None: random, each needle its own), then the question asks
    for `num_asked` of them.
    """
    tokenizer = tokenizer or default_tokenizer()
    haystack = corpus_tokens(tokenizer) if haystack is None else haystack
    cities = rng.choice(len(CITIES), size=num_needles, replace=False)
    numbers = [str(n) for n in rng.integers(1_000_000, 10_000_000, size=num_needles)]
    needles = [tokenizer.encode(" " + NEEDLE.format(city=CITIES[c], number=n) + " ") for c, n in zip(cities, numbers)]
    asked = sorted(rng.choice(num_needles, size=num_asked, replace=False))
    question = " " + " ".join(QUESTION.format(city=CITIES[cities[i]]) for i in asked)
    before, after = chat_prompt("\x00").split("\x00")
    frame = [tokenizer.bos_id] + tokenizer.encode(before), tokenizer.encode(question + after)
    filler = context_len - len(frame[0]) - len(frame[1]) - sum(map(len, needles))
    if filler < 1:
        raise ValueError(f"context_len={context_len} is too short for {num_needles} needle(s) and the question")
    start = int(rng.integers(0, len(haystack) - filler))
    text = list(haystack[start : start + filler])
    depths = [depth] * num_needles if depth is not None else sorted(rng.random(num_needles))
    # Cut points in the haystack alone, filled deepest first so that no needle lands inside another.
    cuts = [int(round(d * len(text))) for d in depths]
    for needle, cut in sorted(zip(needles, cuts), key=lambda nc: -nc[1]):
        text[cut:cut] = needle
    answer = tokenizer.encode(" " + ", ".join(numbers[i] for i in asked)) + [tokenizer.eos_id]
    return NeedleExample(frame[0] + text + frame[1], answer, tuple(numbers[i] for i in asked))


def _text_document(rng, haystack, length, tokenizer):
    start = int(rng.integers(0, len(haystack) - length))
    ids = [tokenizer.bos_id] + list(haystack[start : start + length - 1])
    return ids, [1] * length


def _repeat_document(rng, haystack, length, tokenizer):
    half = (length - 1) // 2
    start = int(rng.integers(0, len(haystack) - half))
    passage = list(haystack[start : start + half])
    ids = [tokenizer.bos_id] + passage + passage
    return ids, [1] * len(ids)


def _copy_document(rng, haystack, length, tokenizer):
    """Tokens drawn at random from the corpus, then the same tokens again; only the second copy is
    trained on. Random tokens have no other predictor than the first copy, so every trained token
    asks for an induction head (find this token's earlier place, copy the next one)."""
    half = (length - 1) // 2
    tokens = list(haystack[rng.integers(0, len(haystack), size=half)])
    ids = [tokenizer.bos_id] + tokens + tokens
    return ids, [0] * (1 + half) + [1] * half


def _needle_document(rng, haystack, length, tokenizer, max_needles=1, far=False):
    """At most `length` tokens: the prompt leaves room for the longest answer. With `max_needles`
    > 1, 1..max_needles needles (as many as fit) are hidden and all are asked for. `far` draws
    the depth as u^2 (u uniform; all needles at it), towards the start, where a needle lies
    farthest from the question: a quarter of them in the first 6% of the document."""
    count = 1
    if max_needles > 1:
        count = int(rng.integers(1, min(max_needles, 1 + (length - MIN_NEEDLE) // EXTRA_NEEDLE_ROOM) + 1))
    depth = float(rng.random() ** 2) if far else None
    example = needle_example(rng, length - count * ANSWER_ROOM, depth=depth, num_needles=count, num_asked=count,
                             tokenizer=tokenizer, haystack=haystack)
    return example.prompt + example.answer, [0] * len(example.prompt) + [1] * len(example.answer)


def check_row_fractions(needle_fraction, repeat_fraction, copy_fraction=0.0):
    """The shares of needle, repeated-passage and random-copy rows: each >= 0, together <= 1."""
    shares = (needle_fraction, repeat_fraction, copy_fraction)
    if not (all(x >= 0 for x in shares) and sum(shares) <= 1):
        raise ValueError(
            f"needle_fraction={needle_fraction!r}, repeat_fraction={repeat_fraction!r} and "
            f"copy_fraction={copy_fraction!r} must be >= 0 with a sum <= 1"
        )


def check_max_needles(max_needles):
    if isinstance(max_needles, bool) or not isinstance(max_needles, int) or max_needles < 1:
        raise ValueError(f"max_needles must be a positive int, got {max_needles!r}")


def check_long_needle_fraction(long_needle_fraction):
    if isinstance(long_needle_fraction, bool) or not 0 <= long_needle_fraction <= 1:
        raise ValueError(f"long_needle_fraction must lie in [0, 1], got {long_needle_fraction!r}")


def packed_batch(
    seed: int, step: int, *, batch_size: int, seq_len: int, needle_fraction=0.5, repeat_fraction=0.0, copy_fraction=0.0,
    max_needles=1, long_needle_fraction=0.0, tokenizer=None,
):
    """The batch for `step`: int32 arrays [batch_size, seq_len] of inputs, targets, segment_ids,
    positions and float32 loss_mask. Segment 0 is padding (masked out); documents are 1, 2, ...
    A row holds needle documents with probability `needle_fraction` (each with up to `max_needles`
    needles, all asked for), repeated passages with `repeat_fraction`, copies of random tokens with
    `copy_fraction`, corpus text otherwise.

    Packed documents have random lengths, so a needle far from its question is rare: in a row of
    L tokens, about 3 in 100 needle rows hold one farther than 3L/4. `long_needle_fraction` of the
    needle rows hold instead one document as long as the row, its needle drawn towards the start
    (depth u^2): 5 in 10 of them farther than 3L/4, 1 in 4 farther than 0.94L.
    """
    check_row_fractions(needle_fraction, repeat_fraction, copy_fraction)
    check_max_needles(max_needles)
    check_long_needle_fraction(long_needle_fraction)
    tokenizer = tokenizer or default_tokenizer()
    haystack = corpus_tokens(tokenizer)
    rng = np.random.default_rng([seed, step, seq_len])
    batch = empty_batch(batch_size, seq_len)
    for row in range(batch_size):
        kind = row_kind(rng, seq_len, needle_fraction=needle_fraction, repeat_fraction=repeat_fraction,
                        copy_fraction=copy_fraction, max_needles=max_needles, long_needle_fraction=long_needle_fraction)
        fill_row(batch, row, rng, kind, haystack, tokenizer)
    return batch


def empty_batch(rows, seq_len, vision=False):
    """Zeros: int32 inputs, targets, segment_ids, positions and float32 loss_mask [rows, seq_len];
    with `vision`, also bool vision_inputs and vision_targets (the input, the target, is a vision
    token: it indexes the vision vocabulary)."""
    batch = {name: np.zeros((rows, seq_len), np.int32) for name in ("inputs", "targets", "segment_ids", "positions")}
    batch["loss_mask"] = np.zeros((rows, seq_len), np.float32)
    if vision:
        for name in ("vision_inputs", "vision_targets"):
            batch[name] = np.zeros((rows, seq_len), bool)
    return batch


@dataclasses.dataclass(frozen=True)
class RowKind:
    """What one row holds: documents made by `document` (at least `shortest` tokens each), the
    first as long as the row when `whole_row`. `text`: slices of the text itself."""

    document: object
    shortest: int
    whole_row: bool = False
    text: bool = False


def row_kind(rng, seq_len, *, needle_fraction, repeat_fraction, copy_fraction, max_needles, long_needle_fraction):
    """Draws a row's kind. A row holds one kind of document, so per-row loss normalisation weighs
    retrieval (a few answer tokens per document) as much as language modelling."""
    kind = rng.random()
    if kind < needle_fraction and seq_len >= MIN_NEEDLE:
        # drawn only when asked for, so that other runs' batches stay as they were
        whole_row = long_needle_fraction > 0 and rng.random() < long_needle_fraction
        document = functools.partial(_needle_document, max_needles=max_needles, far=whole_row)
        return RowKind(document, MIN_NEEDLE, whole_row)
    if needle_fraction <= kind < needle_fraction + repeat_fraction:
        return RowKind(_repeat_document, MIN_DOCUMENT)
    if needle_fraction + repeat_fraction <= kind < needle_fraction + repeat_fraction + copy_fraction:
        return RowKind(_copy_document, MIN_DOCUMENT)
    return RowKind(_text_document, MIN_DOCUMENT, text=True)


def fill_row(batch, row, rng, kind: RowKind, haystack, tokenizer):
    """Packs documents of `kind`, drawn from `haystack` tokens, into `batch`'s `row`."""
    seq_len = batch["inputs"].shape[1]
    used, segment = 0, 0
    while seq_len - used >= kind.shortest:
        if kind.whole_row and used == 0:
            length = seq_len
        else:
            length = min(seq_len - used, int(rng.integers(kind.shortest, seq_len + 1)))
        ids, mask = kind.document(rng, haystack, length + 1, tokenizer)
        n = len(ids) - 1  # next-token pairs
        segment += 1
        cols = slice(used, used + n)
        batch["inputs"][row, cols] = ids[:-1]
        batch["targets"][row, cols] = ids[1:]
        batch["loss_mask"][row, cols] = mask[1:]
        batch["segment_ids"][row, cols] = segment
        batch["positions"][row, cols] = np.arange(n)
        used += n
