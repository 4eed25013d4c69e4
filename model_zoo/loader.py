"""The user's documents as training batches: Grain shuffles and shards them, they are tokenized
(conversations in the chat template, the loss on the answers only) and packed into rows with
segment ids, positions restarting per document and a loss mask.

Data shards follow the mesh's data-parallel ranks (dp x fsdp): rank d reads the documents at d,
d + D, d + 2D, ... of the seeded global shuffle (reshuffled each epoch), and a process reads only
the shards of the rows its devices hold. So two processes of 4 devices build the same global batch
as one of 8, each reading its own shard. (Processes that split one rank's rows over the sequence
read that rank's shard alike: each holds a part of the same rows.)

Packing keeps documents whole where they can be: documents go into the row in order; one that
fits in a row but not in the room left starts the next row (next fit), and one longer than a row
fills the room left and goes on in row-long pieces (concat-then-split), each piece a segment of
its own with positions from 0. A shard's position is (document, token offset), which is all that
a checkpoint needs to resume the stream bit for bit, and which carries over when a context stage
changes the row length. (Grain's own packers keep a buffer tied to one row length.)

With vision (`vision`, a `model_zoo.vision_data.VisionSpec`), vision rows go through the same
shuffle, sharding and packing, and batches carry two more masks: `vision_inputs` (the input is a
vision token) and `vision_targets` (the target is). Without it, batches hold only the text keys.

With `needle_fraction` and the other row kinds of `model_zoo.data`, a row's kind is drawn per row
(from the seed, the step and the row, so in any process alike); the haystack of a retrieval,
repeat or copy row is the text of the row it replaces, topped up from the rows after it.
"""

import grain
import numpy as np

from model_zoo.corpus import chat_prompt
from model_zoo.data import MIN_DOCUMENT, MIN_NEEDLE, empty_batch, fill_row, row_kind
from model_zoo.documents import DataError

SYSTEM_PROMPT = chat_prompt("\x00").split(" USER:")[0]  # "You are a helpful assistant."


def encode_record(record, tokenizer, vision=None) -> tuple[np.ndarray, ...]:
    """(ids, loss mask) of one document: bos, text, eos, every token trained on; or a conversation
    in the chat template (`model_zoo.corpus.CHAT_TEMPLATE`), each assistant answer followed by eos,
    only the answers and their eos trained on. With `vision` (the run's VisionSpec): (ids, loss
    mask, vision mask), a vision row laid out by `model_zoo.vision_data.encode_vision_record`."""
    if vision is not None:
        if not isinstance(record, str | dict):
            from model_zoo.vision_data import encode_vision_record

            return encode_vision_record(record, tokenizer, vision)
        ids, mask = encode_record(record, tokenizer)
        return ids, mask, np.zeros(len(ids), bool)
    if not isinstance(record, str | dict):
        raise DataError(f"{record.where}: a vision row, but the model has vision=False")
    if isinstance(record, str):
        ids = [tokenizer.bos_id, *tokenizer.encode(record), tokenizer.eos_id]
        return np.asarray(ids, np.int32), np.ones(len(ids), np.float32)
    messages = record["messages"]
    system = SYSTEM_PROMPT
    if messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    ids, mask, prompt = [tokenizer.bos_id], [0.0], system
    for message in messages:
        if message["role"] == "assistant":
            prompt_ids, answer = _turn(tokenizer, prompt + " ASSISTANT:", " " + message["content"])
            answer.append(tokenizer.eos_id)
            ids += prompt_ids + answer
            mask += [0.0] * len(prompt_ids) + [1.0] * len(answer)
            prompt = ""
        else:  # a user turn (a later system message reads as one)
            prompt += " USER: " + message["content"]
    return np.asarray(ids, np.int32), np.asarray(mask, np.float32)


def _turn(tokenizer, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """A turn's prompt and answer tokens as the turn's whole text tokenizes (the prompt as
    `generate --chat` encodes it); where a token spans the boundary, each part on its own."""
    prompt_ids, whole = tokenizer.encode(prompt), tokenizer.encode(prompt + answer)
    if whole[: len(prompt_ids)] == prompt_ids:
        return prompt_ids, whole[len(prompt_ids) :]
    return prompt_ids, tokenizer.encode(answer)


class ShardStream:
    """One data shard's documents, tokenized, packed into rows of any length in turn."""

    def __init__(self, documents, tokenizer, *, seed: int, shard: int, num_shards: int, vision=None):
        if len(documents) < num_shards:
            raise DataError(f"--data holds {len(documents)} documents, fewer than the {num_shards} data shards "
                            "(the mesh's dp x fsdp)")
        self._documents = (
            grain.MapDataset.source(documents).shuffle(seed=seed).repeat()[shard::num_shards]
            .map(lambda record: encode_record(record, tokenizer, vision))
        )
        self.vision = vision
        self.per_epoch = len(range(shard, len(documents), num_shards))  # an epoch's share, about
        self.document, self.offset = 0, 0  # the next token to pack
        self._cached = (None, None)

    def _tokens(self, index):
        if self._cached[0] != index:  # a long document is read once for all its pieces
            self._cached = (index, self._documents[index])
        return self._cached[1]

    def next_row(self, seq_len: int) -> dict:
        """inputs, targets, loss_mask, segment_ids and positions of the next row, [seq_len] each;
        with vision, vision_inputs and vision_targets too."""
        row = {k: v[0] for k, v in empty_batch(1, seq_len, self.vision is not None).items()}
        used, segment = 0, 0
        while True:
            ids, mask, *vision = self._tokens(self.document)
            pairs, room = len(ids) - 1, seq_len - used
            left = pairs - self.offset
            if left <= room:
                piece = left
            elif left > seq_len and (room >= MIN_DOCUMENT or used == 0):  # longer than any row: split it here
                piece = room
            else:  # it fits a row, the next one
                return row
            cols, take = slice(used, used + piece), slice(self.offset, self.offset + piece)
            row["inputs"][cols] = ids[take]
            row["targets"][cols] = ids[1:][take]
            row["loss_mask"][cols] = mask[1:][take]
            if vision:
                row["vision_inputs"][cols] = vision[0][take]
                row["vision_targets"][cols] = vision[0][1:][take]
            segment += 1
            row["segment_ids"][cols] = segment
            row["positions"][cols] = np.arange(piece)
            used += piece
            self.offset += piece
            if self.offset == pairs:
                self.document, self.offset = self.document + 1, 0

    @property
    def state(self) -> list[int]:
        return [self.document, self.offset]

    @state.setter
    def state(self, value):
        self.document, self.offset = int(value[0]), int(value[1])


class DocumentBatches:
    """Batches from the user's documents, built in step order; `state` is what a checkpoint keeps.

    `shards`: the data shards this process builds rows for (all of them in one process); rows of
    other shards are left as padding, for the processes that hold them. `vision`: the run's
    `model_zoo.vision_data.VisionSpec` (batches then carry vision_inputs and vision_targets), None
    for text only.
    """

    def __init__(self, documents, tokenizer, *, seed: int, num_shards: int = 1, shards=None, needle_fraction=0.0,
                 repeat_fraction=0.0, copy_fraction=0.0, max_needles=1, long_needle_fraction=0.0, vision=None):
        self.documents, self.seed, self.num_shards, self.tokenizer = documents, seed, num_shards, tokenizer
        self.vision = vision
        self.shards = sorted(range(num_shards) if shards is None else shards)
        self.streams = {d: ShardStream(documents, tokenizer, seed=seed, shard=d, num_shards=num_shards, vision=vision)
                        for d in self.shards}
        self.kinds = dict(needle_fraction=needle_fraction, repeat_fraction=repeat_fraction,
                          copy_fraction=copy_fraction, max_needles=max_needles,
                          long_needle_fraction=long_needle_fraction)

    def batch(self, step: int, rows: int, seq_len: int) -> dict:
        if rows % self.num_shards:
            raise ValueError(f"{rows} rows do not split over {self.num_shards} data shards")
        per_shard = rows // self.num_shards
        batch = empty_batch(rows, seq_len, self.vision is not None)
        for row in range(rows):
            stream = self.streams.get(row // per_shard)
            if stream is None:
                continue
            rng = np.random.default_rng([self.seed, step, seq_len, row])  # the same in any process
            kind = row_kind(rng, seq_len, **self.kinds)
            text = stream.next_row(seq_len)
            if kind.text:
                for name, values in text.items():
                    batch[name][row] = values
            else:
                fill_row(batch, row, rng, kind, self._haystack(stream, text, seq_len), self.tokenizer)
        return batch

    @staticmethod
    def _haystack(stream, row, seq_len):
        """The row's text tokens, topped up from the rows after it to more than a row (what a
        row-long needle document needs: its filler is cut from a haystack longer than itself).
        Vision tokens are left out: their ids are not text."""

        def text(row):
            kept = row["segment_ids"] > 0
            return row["inputs"][kept & ~row["vision_inputs"] if "vision_inputs" in row else kept]

        parts = [text(row)]
        while sum(map(len, parts)) <= seq_len + MIN_NEEDLE:
            parts.append(text(stream.next_row(seq_len)))
        return np.concatenate(parts)

    def check_enough(self, rows: int, seq_len: int):
        """Refuses data whose text cannot fill one batch without repeating a document. Every shard
        is checked, this process's or not: a process that stopped alone would leave the others
        waiting for it."""
        for shard in range(self.num_shards):
            stream = ShardStream(self.documents, self.tokenizer, seed=self.seed, shard=shard,
                                 num_shards=self.num_shards, vision=self.vision)
            for _ in range(rows // self.num_shards):
                stream.next_row(seq_len)
                if (stream.document, stream.offset) > (stream.per_epoch, 0):  # into a second epoch
                    raise DataError(
                        f"--data holds fewer tokens than one batch of {rows} x {seq_len}"
                        + (f" in data shard {shard} of {self.num_shards}" if self.num_shards > 1 else "")
                        + ": add documents, or shorten the stage"
                    )

    @property
    def state(self) -> dict:
        """{shard: [document, offset]} for this process's shards."""
        return {str(d): s.state for d, s in self.streams.items()}

    def restore(self, state: dict):
        for d, stream in self.streams.items():
            if str(d) not in state:
                raise ValueError(f"the checkpoint's data state has no shard {d}: it has {sorted(state)}")
            stream.state = state[str(d)]
