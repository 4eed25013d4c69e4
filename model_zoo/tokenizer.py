"""Tokenizers: the shipped SentencePiece model (trained on the embedded corpus; rebuild it with
`python -m model_zoo.tokenizer`), any SentencePiece `.model`, or a Hugging Face `tokenizer.json`.

A model folder or training workdir carries its own tokenizer file (`convert` copies a Hugging Face
model's; `train` copies the one it trained with); `model_tokenizer` finds it.
"""

import functools
import json
import pathlib
import shutil
import tempfile

import sentencepiece as spm

from model_zoo.corpus import corpus_documents

TOKENIZER_PATH = pathlib.Path(__file__).parent / "assets" / "tokenizer.model"
VOCAB_SIZE = 1024
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3


class Tokenizer:
    """A SentencePiece model; the shipped one is a byte-fallback BPE that round-trips any text
    exactly (identity normalisation, digits split)."""

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


class HFTokenizer:
    """A Hugging Face `tokenizer.json` (the `tokenizers` library). Its BOS and EOS come from the
    `tokenizer_config.json` beside it, else from the usual names (`<s>`, `</s>`, `<|begin_of_text|>`, ...)."""

    BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "[CLS]", "<|startoftext|>")
    EOS_NAMES = ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>", "[SEP]", "<|eot_id|>")

    def __init__(self, path):
        from tokenizers import Tokenizer as Backend

        self.path = pathlib.Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"tokenizer {str(self.path)!r} does not exist")
        try:
            self._tok = Backend.from_file(str(self.path))
        except Exception as error:  # the library raises its own exception type for a malformed file
            raise ValueError(f"{self.path} is not a Hugging Face tokenizer.json: {error}") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        special = _special_tokens(self.path.parent / "tokenizer_config.json")
        self.bos_id = self._token_id(special.get("bos_token"), self.BOS_NAMES, "BOS")
        self.eos_id = self._token_id(special.get("eos_token"), self.EOS_NAMES, "EOS")

    def _token_id(self, configured, names, what):
        for name in ([configured] if configured else []) + list(names):
            token_id = self._tok.token_to_id(name)
            if token_id is not None:
                return token_id
        raise ValueError(f"{self.path} has no {what} token: none of {list(names)} (nor tokenizer_config.json's)")

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def _special_tokens(config_path: pathlib.Path) -> dict:
    """bos/eos token strings from a transformers tokenizer_config.json (a string or an AddedToken dict)."""
    if not config_path.is_file():
        return {}
    values = json.loads(config_path.read_text())
    tokens = {}
    for key in ("bos_token", "eos_token"):
        value = values.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            tokens[key] = value
    return tokens


# What a folder's own tokenizer is called; tokenizer_config.json travels with tokenizer.json.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def load_tokenizer(path):
    """A SentencePiece `.model`, a Hugging Face `tokenizer.json`, or a folder holding either."""
    path = pathlib.Path(path)
    if path.is_dir():
        found = folder_tokenizer(path)
        if found is None:
            raise FileNotFoundError(f"{path} holds no tokenizer ({' or '.join(TOKENIZER_FILES)})")
        return found
    if path.suffix == ".json":
        return HFTokenizer(path)
    if path.suffix == ".model":
        return Tokenizer(path)
    raise ValueError(f"--tokenizer {str(path)!r}: expected a SentencePiece .model or a Hugging Face tokenizer.json")


def folder_tokenizer(folder):
    """The tokenizer a model folder or workdir carries, or None."""
    folder = pathlib.Path(folder)
    for name in TOKENIZER_FILES:
        if (folder / name).is_file():
            return HFTokenizer(folder / name) if name.endswith(".json") else Tokenizer(folder / name)
    return None


def model_tokenizer(folder):
    """The tokenizer of a model folder or workdir: its own, else the shipped one."""
    return folder_tokenizer(folder) or default_tokenizer()


def copy_tokenizer(tokenizer, folder):
    """Puts `tokenizer`'s file (and a tokenizer.json's tokenizer_config.json) into `folder`, under the
    name `folder_tokenizer` looks for; the shipped tokenizer is not copied (it is the default)."""
    if tokenizer.path == default_tokenizer().path:
        return
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    name = "tokenizer.json" if isinstance(tokenizer, HFTokenizer) else "tokenizer.model"
    if tokenizer.path.resolve() != (folder / name).resolve():
        shutil.copyfile(tokenizer.path, folder / name)
        config = tokenizer.path.parent / "tokenizer_config.json"
        if name == "tokenizer.json" and config.is_file():
            shutil.copyfile(config, folder / "tokenizer_config.json")


def check_fits(tokenizer, vocab_size: int):
    """A tokenizer whose ids reach past the model's embedding would index out of it."""
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(
            f"the tokenizer {str(tokenizer.path)!r} has {tokenizer.vocab_size} tokens, more than the model's "
            f"vocabulary of {vocab_size}: use the model's own tokenizer, or a model with a larger vocabulary"
        )


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
