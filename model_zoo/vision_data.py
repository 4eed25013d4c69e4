"""Vision-language rows laid out as LWM lays them (`lwm/data.py`'s VisionTextProcessor), and the
prompts that ask the model for a clip or about one (`lwm/vision_generation.py`, `lwm/vision_chat.py`).

A clip of F frames of n VQGAN codes each becomes the text tokens of `<vision>`, then each frame's
codes followed by <eof> (8192), the last frame's by <eov> (8193) instead, then the text tokens of
`</vision>`. The vision mask is True on the codes, <eof> and <eov> only: those ids index the vision
vocabulary, every other id the text one.

A vision row is a JSON object (a line of a `.jsonl`, a record of an ArrayRecord file, a row of a
table) with exactly one clip:

- `"vision"`: the codes themselves, a list per frame (`[[c, ...], [c, ...]]`, n codes each) or one
  flat list of F x n codes (n = `VisionSpec.frame_tokens`, 256 by default as in LWM's data);
  every code in [0, num_codes) (the encoder's codebook, else LWM's 8192).
- `"video"` or `"image"`: a file (PNG, JPEG, GIF, MP4, ...; `model_zoo.media`), absolute or
  relative to the folder of the data file that names it, read when the row is drawn (at most
  `max_frames` frames, sampled evenly), centre-cropped and resized to the encoder's resolution and
  encoded by the VQGAN (`VisionSpec.encoder`).

and text in one of four forms, looked for in this order:

1. `"fields"`: LWM's own layout, e.g. `"[text],vision"`: bos, then the named fields in order, then
   eos (always trained on). A field in brackets has no loss. The clip's key names the clip; other
   names are text fields of the row (`a+b`: both joined by a space), each tokenized on its own;
   `<|bos|>` / `<|eos|>` are those tokens.
2. `"question"` + `"answer"` (understanding): `understanding_prompt(question, clip)`, then the
   answer and eos, only the answer and its eos trained on.
3. `"caption"` (generation): `generation_prompt(caption)`, then the clip, `</vision>` and eos,
   trained on (the prompt is not).
4. the text field (`--data-field`, "text" by default) alone: as `"fields": "[text],<clip key>"`.

Examples:

    {"vision": [[12, 4051, ...], [977, 3, ...]], "text": "a red circle", "fields": "[text],vision"}
    {"video": "clips/0001.mp4", "caption": "a red circle moving left"}
    {"image": "images/cat.png", "question": "What animal is this?", "answer": "A cat."}
    {"video": "clips/0002.gif", "text": "a ball bouncing"}
"""

import dataclasses
import pathlib

import numpy as np

from model_zoo.config import EOF_TOKEN, EOV_TOKEN, VQGAN_CODES
from model_zoo.corpus import chat_prompt
from model_zoo.documents import DataError
from model_zoo.media import SUFFIXES, MediaError, fit_frames, read_frames, sampled_indices

CLIP_KEYS = ("vision", "video", "image")
VISION_START, VISION_END = "<vision>", "</vision>"
LWM_TOKENS_PER_FRAME = 256  # 16 x 16 codes of a 256 x 256 frame
BOS_FIELD, EOS_FIELD = "<|bos|>", "<|eos|>"
# LWM's generation prompts: an image for one frame, a video for more.
GENERATE_IMAGE, GENERATE_VIDEO = "Generate an image of {caption}", "Generate a video of {caption}"
_BEFORE, _AFTER = chat_prompt("\x00").split("\x00")  # "You are a helpful assistant. USER: ", " ASSISTANT:"


@dataclasses.dataclass(frozen=True, eq=False)
class VisionSpec:
    """How a run reads vision rows.

    `encoder`: the VQGAN that turns frames into codes (`.resolution`, `.num_codes`,
    `.encode_frames(uint8 [F, H, W, 3]) -> int [F, n]`), needed by rows that name files; None: rows
    must give codes. `tokens_per_frame`: codes per frame (splits a flat code list); None: the
    encoder's `tokens_per_frame`, else LWM's 256. `max_frames`: at most this many frames a clip,
    sampled evenly (None: all).
    """

    encoder: object = None
    tokens_per_frame: int | None = None
    max_frames: int | None = None

    def __post_init__(self):
        for name in ("tokens_per_frame", "max_frames"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"VisionSpec.{name} must be a positive int or None, got {value!r}")
        if self.encoder is not None:
            missing = [a for a in ("resolution", "num_codes", "encode_frames") if not hasattr(self.encoder, a)]
            if missing:
                raise ValueError(f"the vision encoder {type(self.encoder).__name__} has no {', '.join(missing)}")

    @property
    def frame_tokens(self) -> int:
        if self.tokens_per_frame is not None:
            return self.tokens_per_frame
        return int(getattr(self.encoder, "tokens_per_frame", None) or LWM_TOKENS_PER_FRAME)

    @property
    def num_codes(self) -> int:
        return int(self.encoder.num_codes) if self.encoder is not None else VQGAN_CODES

    def cache_key(self) -> str:
        """What checking a row depends on (kept with a file's cached index)."""
        return f"vision:{self.frame_tokens}:{self.num_codes}:{'encoder' if self.encoder is not None else 'codes'}"


@dataclasses.dataclass(frozen=True, eq=False)
class Clip:
    key: str  # the row's field: vision, video or image
    codes: np.ndarray | None = None  # int32 [F, n], given in the row
    path: str | None = None  # a file, encoded when the row is drawn


@dataclasses.dataclass(frozen=True, eq=False)
class VisionRecord:
    """A checked vision row: `form` is "fields", "understand" or "generate" (see the module's doc)."""

    where: str
    clip: Clip
    form: str
    fields: tuple = ()  # ((name, trained), ...) of the "fields" form
    texts: dict = dataclasses.field(default_factory=dict)  # the row's text fields that the layout uses


def is_vision_row(row) -> bool:
    return isinstance(row, dict) and any(k in row for k in CLIP_KEYS)


def vision_record(row: dict, where: str, field: str, spec: VisionSpec | None, base=None) -> VisionRecord:
    """The checked record of a vision row (codes checked, files found); `base`: the folder that
    relative file names start from. DataError naming `where` for anything amiss."""
    keys = [k for k in CLIP_KEYS if k in row]
    if spec is None:
        raise DataError(f"{where}: the row has {keys[0]!r} but the model has vision=False; "
                        "train a vision model (LWMConfig vision=True) or leave vision rows out")
    if len(keys) != 1:
        raise DataError(f"{where}: the row has {' and '.join(map(repr, keys))}; a row holds one clip")
    key = keys[0]
    clip = _clip(row[key], key, where, spec, base)
    if "fields" in row:
        fields, texts = _fields(row, where, key)
        return VisionRecord(where, clip, "fields", fields, texts)
    if "question" in row or "answer" in row:
        return VisionRecord(where, clip, "understand", texts=_texts(row, where, ("question", "answer")))
    if "caption" in row:
        return VisionRecord(where, clip, "generate", texts=_texts(row, where, ("caption",)))
    if field in row:
        return VisionRecord(where, clip, "fields", ((field, False), (key, True)), _texts(row, where, (field,)))
    raise DataError(f"{where}: a {key!r} row needs its text: 'fields' (LWM's layout), 'question' + 'answer', "
                    f"'caption', or {field!r} (--data-field); the row has {sorted(row)[:8]}")


def _texts(row, where, names) -> dict:
    for name in names:
        if name not in row:
            raise DataError(f"{where}: the row has no {name!r} (it has {sorted(row)[:8]})")
        if not isinstance(row[name], str):
            raise DataError(f"{where}: field {name!r} is {type(row[name]).__name__}, expected a string")
    return {name: row[name] for name in names}


def _fields(row, where, key):
    spec = row["fields"]
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"{where}: 'fields' must be a string such as \"[text],{key}\", got {spec!r:.80}")
    fields, names = [], []
    for part in spec.split(","):
        name = part.strip()
        trained = not (name.startswith("[") and name.endswith("]"))
        name = name if trained else name[1:-1].strip()
        if not name:
            raise DataError(f"{where}: 'fields' {spec!r} has an empty field")
        if name in CLIP_KEYS and name != key:
            raise DataError(f"{where}: 'fields' {spec!r} names {name!r}, but the row's clip is {key!r}")
        if name not in (key, BOS_FIELD, EOS_FIELD):
            names += name.split("+")
        fields.append((name, trained))
    if not any(name == key for name, _ in fields):
        raise DataError(f"{where}: 'fields' {spec!r} does not name the row's clip {key!r}")
    return tuple(fields), _texts(row, where, dict.fromkeys(names))


def _clip(value, key, where, spec: VisionSpec, base) -> Clip:
    if key == "vision":
        return Clip(key, codes=_given_codes(value, where, spec))
    if not isinstance(value, str) or not value:
        raise DataError(f"{where}: field {key!r} must name an image or video file, got {value!r:.80}")
    path = pathlib.Path(value).expanduser()
    if not path.is_absolute() and base is not None:
        path = pathlib.Path(base) / path
    if path.suffix.lower() not in SUFFIXES:
        raise DataError(f"{where}: field {key!r} names {path}, not a known image or video ({', '.join(SUFFIXES)})")
    if spec.encoder is None:
        raise DataError(f"{where}: field {key!r} names a file, which needs a VQGAN to become codes, and the run "
                        "has none; give one, or the codes as 'vision'")
    if not path.is_file():
        raise DataError(f"{where}: field {key!r} names {path}, which does not exist")
    return Clip(key, path=str(path))


def _given_codes(value, where, spec: VisionSpec) -> np.ndarray:
    n, num_codes = spec.frame_tokens, spec.num_codes
    if not isinstance(value, list | tuple | np.ndarray) or not len(value):
        raise DataError(f"{where}: field 'vision' must be a non-empty list of codes (flat, or a list per frame), "
                        f"got {value!r:.80}")
    nested = all(isinstance(v, list | tuple | np.ndarray) for v in value)
    if nested:
        for i, frame in enumerate(value):
            if len(frame) != n:
                raise DataError(f"{where}: field 'vision' frame {i} holds {len(frame)} codes, expected {n} "
                                "(the codes of a frame)")
    flat = [x for frame in value for x in frame] if nested else value
    if not isinstance(flat, np.ndarray):
        bad = next((x for x in flat if isinstance(x, bool | np.bool_) or not isinstance(x, int | np.integer)), None)
        if bad is not None:
            raise DataError(f"{where}: field 'vision' holds {bad!r:.40}, not an integer code")
    elif flat.dtype.kind not in "iu":
        raise DataError(f"{where}: field 'vision' holds {flat.dtype} values, not integer codes")
    try:
        codes = np.asarray(flat, np.int64)
    except OverflowError:
        bad = next(x for x in flat if not -(2**63) <= x < 2**63)
        raise DataError(f"{where}: field 'vision' holds code {bad}, outside the codebook [0, {num_codes})") from None
    if not nested and len(codes) % n:
        raise DataError(f"{where}: field 'vision' holds {len(codes)} codes, not a multiple of the {n} codes of "
                        "a frame")
    _check_range(codes.reshape(-1), num_codes, where, "vision")
    return codes.reshape(-1, n).astype(np.int32)


def _check_range(flat, num_codes, where, key):
    outside = np.flatnonzero((flat < 0) | (flat >= num_codes))
    if len(outside):
        i = int(outside[0])
        raise DataError(f"{where}: field {key!r} holds code {int(flat[i])} (code {i}), outside the codebook "
                        f"[0, {num_codes})")


def clip_codes(record: VisionRecord, spec: VisionSpec) -> np.ndarray:
    """int32 [F, n]: the row's codes (at most `spec.max_frames` frames, sampled evenly), its file
    read and encoded by `spec.encoder` where it names one."""
    clip, where = record.clip, record.where
    if clip.codes is not None:
        return clip.codes[sampled_indices(len(clip.codes), spec.max_frames)]
    try:
        frames = read_frames(clip.path, max_frames=spec.max_frames)
    except MediaError as error:
        raise MediaError(f"{where}: field {clip.key!r}: {error}") from None
    codes = np.asarray(spec.encoder.encode_frames(fit_frames(frames, int(spec.encoder.resolution))))
    if codes.ndim != 2 or len(codes) != len(frames) or codes.shape[1] != spec.frame_tokens:
        raise DataError(f"{where}: the encoder gave codes of shape {codes.shape} for {len(frames)} frames of "
                        f"{clip.path}, expected [{len(frames)}, {spec.frame_tokens}]")
    _check_range(codes.reshape(-1), spec.num_codes, f"{where} ({clip.path} as encoded)", clip.key)
    return codes.astype(np.int32)


def clip_tokens(codes) -> np.ndarray:
    """int32: each frame's codes followed by <eof>, the last frame's by <eov>."""
    codes = np.asarray(codes, np.int32)
    if codes.ndim != 2 or not codes.size:
        raise ValueError(f"codes must be int [F, n] with F, n >= 1, got shape {codes.shape}")
    ends = np.full((len(codes), 1), EOF_TOKEN, np.int32)
    ends[-1] = EOV_TOKEN
    return np.concatenate([codes, ends], axis=1).reshape(-1)


def _vision_part(tokenizer, codes):
    """(ids, vision mask) of `<vision>` clip `</vision>`."""
    start, end, clip = tokenizer.encode(VISION_START), tokenizer.encode(VISION_END), clip_tokens(codes)
    ids = np.concatenate([np.asarray(start, np.int32), clip, np.asarray(end, np.int32)])
    mask = np.zeros(len(ids), bool)
    mask[len(start) : len(start) + len(clip)] = True
    return ids, mask


def generation_prompt(tokenizer, caption: str, *, video: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32, vision mask bool) that ask for a clip as LWM's `vision_generation.py` asks:
    bos, "You are a helpful assistant. USER: Generate a video of {caption} ASSISTANT:" ("an
    image" when not `video`), then the tokens of `<vision>`; the model goes on with the codes."""
    text = (GENERATE_VIDEO if video else GENERATE_IMAGE).format(caption=caption)
    ids = [tokenizer.bos_id, *tokenizer.encode(chat_prompt(text)), *tokenizer.encode(VISION_START)]
    return np.asarray(ids, np.int32), np.zeros(len(ids), bool)


def understanding_prompt(tokenizer, codes, question: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32, vision mask bool) that ask about a clip as LWM's `vision_chat.py` asks: bos,
    "You are a helpful assistant. USER: {question}\\n", `<vision>` clip `</vision>`, " ASSISTANT:";
    the model goes on with the answer. `codes`: int [F, n]."""
    head = [tokenizer.bos_id, *tokenizer.encode(_BEFORE + question + "\n")]
    clip, clip_mask = _vision_part(tokenizer, codes)
    tail = tokenizer.encode(_AFTER)
    ids = np.concatenate([np.asarray(head, np.int32), clip, np.asarray(tail, np.int32)])
    mask = np.concatenate([np.zeros(len(head), bool), clip_mask, np.zeros(len(tail), bool)])
    return ids, mask


def encode_vision_record(record: VisionRecord, tokenizer, spec: VisionSpec):
    """(ids int32, loss mask float32, vision mask bool) of a vision row (the module's doc)."""
    codes = clip_codes(record, spec)
    texts = record.texts
    if record.form == "generate":
        prompt, prompt_mask = generation_prompt(tokenizer, texts["caption"], video=len(codes) > 1)
        clip, end = clip_tokens(codes), tokenizer.encode(VISION_END) + [tokenizer.eos_id]
        ids = np.concatenate([prompt, clip, np.asarray(end, np.int32)])
        loss = np.concatenate([np.zeros(len(prompt)), np.ones(len(clip) + len(end))])
        vision = np.concatenate([prompt_mask, np.ones(len(clip), bool), np.zeros(len(end), bool)])
    elif record.form == "understand":
        from model_zoo.loader import _turn

        prompt, vision = understanding_prompt(tokenizer, codes, texts["question"])
        answer = _turn(tokenizer, _AFTER, " " + texts["answer"])[1] + [tokenizer.eos_id]
        ids = np.concatenate([prompt, np.asarray(answer, np.int32)])
        loss = np.concatenate([np.zeros(len(prompt)), np.ones(len(answer))])
        vision = np.concatenate([vision, np.zeros(len(answer), bool)])
    else:
        parts = [(np.asarray([tokenizer.bos_id], np.int32), 0.0, np.zeros(1, bool))]
        for name, trained in record.fields:
            if name == record.clip.key:
                ids, vision = _vision_part(tokenizer, codes)
            elif name in (BOS_FIELD, EOS_FIELD):
                ids = np.asarray([tokenizer.bos_id if name == BOS_FIELD else tokenizer.eos_id], np.int32)
                vision = np.zeros(1, bool)
            else:
                ids = np.asarray(tokenizer.encode(" ".join(texts[s] for s in name.split("+"))), np.int32)
                vision = np.zeros(len(ids), bool)
            parts.append((ids, float(trained), vision))
        parts.append((np.asarray([tokenizer.eos_id], np.int32), 1.0, np.zeros(1, bool)))
        ids = np.concatenate([p[0] for p in parts])
        loss = np.concatenate([np.full(len(p[0]), p[1]) for p in parts])
        vision = np.concatenate([p[2] for p in parts])
    return ids.astype(np.int32), loss.astype(np.float32), vision.astype(bool)
