"""The shipped SentencePiece tokenizer, trained on the embedded corpus; rebuild with `python -m model_zoo.tokenizer`."""

import functools
import pathlib
import tempfile

import sentencepiece as spm

from model_zoo.corpus import corpus_documents

TOKENIZER_PATH = pathlib.Path(__file__).parent / "assets" / "tokenizer.model"
VOCAB_SIZE = 1024
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3


class Tokenizer:
    """Byte-fallback BPE that round-trips any text exactly (identity normalisation, digits split)."""

    def __init__(self, path=TOKENIZER_PATH):
        self.path = pathlib.Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"tokenizer model {str(self.path)!r} does not exist")
        self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
        self.vocab_size = self._sp.vocab_size()
        self.pad_id, self.bos_id, self.eos_id = self._sp.pad_id(), self._sp.bos_id(), self._sp.eos_id()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])


@functools.cache
def default_tokenizer() -> Tokenizer:
    return Tokenizer()


def train_tokenizer(path=TOKENIZER_PATH, vocab_size=VOCAB_SIZE):
    """Trains the BPE model on the embedded corpus and writes it to `path`."""
    with tempfile.TemporaryDirectory() as tmp:
        text = pathlib.Path(tmp) / "corpus.txt"
        text.write_text("\n".join(corpus_documents()))
        prefix = pathlib.Path(tmp) / "tokenizer"
        spm.SentencePieceTrainer.train(
            input=str(text), model_prefix=str(prefix), vocab_size=vocab_size, model_type="bpe",
            split_digits=True, byte_fallback=True, character_coverage=1.0,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True, user_defined_symbols=["\n"],
            pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=UNK_ID, num_threads=1, minloglevel=2,
        )
        pathlib.Path(path).write_bytes(prefix.with_suffix(".model").read_bytes())


if __name__ == "__main__":
    train_tokenizer()
    print(f"wrote {TOKENIZER_PATH}")
