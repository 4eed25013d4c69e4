"""The user's documents as one random-access source for Grain: JSON lines (`.jsonl`, `.jsonl.gz`),
Parquet, plain text (a file a document), ArrayRecord (a JSON object a record) and Hugging Face
datasets saved to disk (`Dataset.save_to_disk`).

Opening the files scans each once: every record is checked (UTF-8, JSON, the text field present
and a string, or a conversation) so that bad input is refused with its file and line before any
step runs, and only where each document lies is kept (byte offsets, row numbers), never its text:
a file far bigger than memory is read a document at a time. The index of a file is cached
(`$RING_ATTN_DATA_CACHE`, default `~/.cache/ring_attn/data`), keyed by its path, size and
modification time; a `.jsonl.gz` is decompressed once into that cache, since gzip cannot seek.

A record is a text document (a `str`) or a conversation: `{"messages": [{"role", "content"}, ...]}`
(roles system, user, assistant), also made from a row's `prompt` + `completion`; in a run with
vision (`vision`, a `model_zoo.vision_data.VisionSpec`), a row with a `vision`, `video` or `image`
field is a vision row (`model_zoo.vision_data.VisionRecord`); in a run without, such a row is
refused unless it has the text field.
"""

import codecs
import collections
import dataclasses
import glob
import gzip
import hashlib
import json
import os
import pathlib
import tempfile
import zlib

import numpy as np

INDEX_VERSION = 1
SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet", ".txt", ".arrayrecord", ".array_record")
ROLES = ("system", "user", "assistant")
VISION_KEYS = ("vision", "video", "image")  # a row holding one is a vision row


class DataError(ValueError):
    """Bad input, named by its file (and line or record where there is one)."""


def cache_dir() -> pathlib.Path:
    default = pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache")) / "ring_attn" / "data"
    return pathlib.Path(os.environ.get("RING_ATTN_DATA_CACHE", default))


def resolve_files(patterns) -> list[pathlib.Path]:
    """Files and globs -> paths, each glob sorted, in the order given; a folder is a Hugging Face dataset."""
    if isinstance(patterns, str | os.PathLike):
        patterns = [patterns]
    paths = []
    for pattern in patterns:
        literal = pathlib.Path(os.path.expanduser(str(pattern)))
        if literal.exists():  # a name that holds glob characters, e.g. "notes[1].jsonl"
            paths.append(literal)
            continue
        matches = sorted(glob.glob(str(literal), recursive=True))
        if not matches:
            raise DataError(f"--data {str(pattern)!r} matches no file")
        paths.extend(pathlib.Path(m) for m in matches)
    return paths


def record_from_row(row, where: str, field: str, vision=None, base=None):
    """A text document (str, possibly empty), a conversation or a vision row (`vision`: the run's
    VisionSpec, None without vision; `base`: the folder relative image and video names start from)
    from one JSON-like row."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    # Without vision, a text row may carry an `image` column (a URL, say): its text field decides.
    if any(key in row for key in VISION_KEYS) and (vision is not None or field not in row):
        from model_zoo.vision_data import vision_record

        return vision_record(row, where, field, vision, base)
    if field in row:
        text = row[field]
        if not isinstance(text, str):
            raise DataError(f"{where}: field {field!r} is {type(text).__name__}, expected a string")
        return text
    if "messages" in row:
        return {"messages": _checked_messages(row["messages"], where)}
    if "prompt" in row and "completion" in row:
        for key in ("prompt", "completion"):
            if not isinstance(row[key], str):
                raise DataError(f"{where}: field {key!r} is {type(row[key]).__name__}, expected a string")
        return {"messages": [{"role": "user", "content": row["prompt"]},
                             {"role": "assistant", "content": row["completion"]}]}
    raise DataError(
        f"{where}: no field {field!r} (--data-field), nor 'messages', nor 'prompt' + 'completion'; "
        f"the row has {sorted(row)[:8]}"
    )


def _checked_messages(messages, where):
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}}")
    checked = []
    for i, message in enumerate(messages):
        if not (isinstance(message, dict) and message.get("role") in ROLES and isinstance(message.get("content"), str)):
            raise DataError(f"{where}: messages[{i}] must be {{'role': one of {ROLES}, 'content': a string}}, "
                            f"got {message!r:.120}")
        checked.append({"role": message["role"], "content": message["content"]})
    if not any(m["role"] == "assistant" for m in checked):
        raise DataError(f"{where}: 'messages' has no assistant turn, so nothing to train on")
    return checked


def is_empty(record) -> bool:
    if not isinstance(record, str | dict):  # a vision row
        return False
    if isinstance(record, str):
        return not record
    return not any(m["content"] for m in record["messages"] if m["role"] == "assistant")


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{where}: invalid UTF-8 (byte {error.start}: {raw[error.start:error.start + 1]!r})") from None


def _json_row(raw: bytes, where: str, field: str, vision=None, base=None):
    text = _decode(raw, where)
    try:
        row = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{where}: not JSON ({error.msg} at column {error.colno})") from None
    return record_from_row(row, where, field, vision, base)


@dataclasses.dataclass
class _Index:
    """Where a file's non-empty documents lie (`locators`: one int64 each) and how many were empty."""

    locators: np.ndarray
    empty: int


def _file_key(path: pathlib.Path, *extra) -> str:
    stat = path.stat()
    fields = (INDEX_VERSION, path.resolve(), stat.st_size, stat.st_mtime_ns, *extra)
    return hashlib.sha256("|".join(map(str, fields)).encode()).hexdigest()[:32]


def _scan_key(field: str, vision) -> str:
    """What a file's index depends on besides the file: the text field, and how vision rows are checked."""
    return field if vision is None else f"{field}|{vision.cache_key()}"


def _cached_index(path: pathlib.Path, field: str, scan) -> _Index:
    cached = cache_dir() / f"{_file_key(path, field)}.npz"
    if cached.is_file():
        try:
            with np.load(cached) as saved:
                return _Index(saved["locators"], int(saved["empty"]))
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache entry is rebuilt
    index = scan()
    try:
        with _atomic_file(cached) as partial:
            np.savez(partial, locators=index.locators, empty=index.empty)
    except OSError:
        pass  # a cache that cannot be written costs the next run a scan, nothing else
    return index


class _atomic_file:
    """A temporary file beside `path`, renamed to it on success: a reader (another process or host
    sharing the cache) sees the whole file or none."""

    def __init__(self, path: pathlib.Path):
        self.path = path

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name + ".", suffix=".partial")
        self.file, self.partial = os.fdopen(handle, "wb"), pathlib.Path(name)
        return self.file

    def __exit__(self, kind, error, trace):
        self.file.close()
        if kind is None:
            self.partial.replace(self.path)
        else:
            self.partial.unlink(missing_ok=True)


class _OpenFiles:
    """At most `limit` files held open, the least recently used closed first: a shuffle over
    thousands of files would otherwise run out of file descriptors."""

    def __init__(self, limit=64):
        self.limit, self._open = limit, collections.OrderedDict()

    def get(self, key, opener):
        handle = self._open.pop(key, None)
        if handle is None:
            handle = opener()
            if len(self._open) >= self.limit:
                self._open.popitem(last=False)[1].close()
        self._open[key] = handle
        return handle


_OPEN_FILES = _OpenFiles()


class JsonLinesFile:
    """A JSON object a line; the index holds each document's byte offset."""

    def __init__(self, path: pathlib.Path, field: str, vision=None):
        self.path, self.field, self.vision = path, field, vision
        self._text_path = path
        self.index = _cached_index(path, _scan_key(field, vision), self._scan)

    def _scan(self) -> _Index:
        offsets, empty, offset = [], 0, 0
        with open(self._text_path, "rb") as lines:
            for number, line in enumerate(lines, 1):
                if line.strip():
                    if is_empty(_json_row(line, f"{self.path}:{number}", self.field, self.vision, self.path.parent)):
                        empty += 1
                    else:
                        offsets.append(offset)
                offset += len(line)
        return _Index(np.asarray(offsets, np.int64), empty)

    def __getitem__(self, locator):
        lines = _OPEN_FILES.get(self._text_path, lambda: open(self._text_path, "rb"))
        lines.seek(int(locator))
        return _json_row(lines.readline(), f"{self.path} at byte {locator}", self.field, self.vision,
                         self.path.parent)


class GzipJsonLinesFile(JsonLinesFile):
    """A `.jsonl.gz`: decompressed once into the cache (gzip cannot seek), then read as JSON lines."""

    def __init__(self, path: pathlib.Path, field: str, vision=None):
        self.path, self.field, self.vision = path, field, vision
        self._text_path = cache_dir() / f"{_file_key(path)}.jsonl"
        if not self._text_path.is_file():  # an index cached without its decompressed copy is stale
            (cache_dir() / f"{_file_key(path, _scan_key(field, vision))}.npz").unlink(missing_ok=True)
        self.index = _cached_index(path, _scan_key(field, vision), self._decompress_and_scan)

    def _decompress_and_scan(self) -> _Index:
        try:
            with gzip.open(self.path, "rb") as source, _atomic_file(self._text_path) as target:
                lines = 0
                while True:
                    try:
                        line = source.readline()
                    except (EOFError, OSError, zlib.error) as error:
                        raise DataError(
                            f"{self.path}: a damaged or truncated gzip file after line {lines} ({error})"
                        ) from None
                    if not line:
                        break
                    target.write(line)
                    lines += 1
        except OSError as error:  # writing the copy
            raise DataError(f"{self.path}: cannot write its decompressed copy to {cache_dir()} ({error}); "
                            "point RING_ATTN_DATA_CACHE at a folder with room") from None
        return self._scan()


class TextFile:
    """A plain-text file is one document."""

    def __init__(self, path: pathlib.Path, field: str, vision=None):
        self.path = path
        self.index = _cached_index(path, "", self._scan)

    def _scan(self) -> _Index:
        decoder, line, chars = codecs.getincrementaldecoder("utf-8")(), 1, 0
        with open(self.path, "rb") as source:
            while chunk := source.read(1 << 20):
                pending = decoder.getstate()[0]  # a character cut by the last chunk's end
                try:
                    text = decoder.decode(chunk)
                except UnicodeDecodeError:
                    bad = line + _lines_before_bad_byte(pending + chunk)
                    raise DataError(f"{self.path}:{bad}: invalid UTF-8") from None
                line, chars = line + text.count("\n"), chars + len(text)
            try:
                decoder.decode(b"", final=True)
            except UnicodeDecodeError:
                raise DataError(f"{self.path}:{line}: invalid UTF-8 (a character cut off at the end)") from None
        return _Index(np.zeros(1 if chars else 0, np.int64), 0 if chars else 1)

    def __getitem__(self, locator):
        return self.path.read_text(encoding="utf-8")


def _lines_before_bad_byte(chunk: bytes) -> int:
    try:
        chunk.decode("utf-8")
    except UnicodeDecodeError as error:
        return chunk[: error.start].count(b"\n")
    return 0


class ArrayRecordFile:
    """An ArrayRecord file whose records are JSON objects, as JSON lines hold them."""

    def __init__(self, path: pathlib.Path, field: str, vision=None):
        self.path, self.field, self.vision = path, field, vision
        self.index = _cached_index(path, _scan_key(field, vision), self._scan)

    def _open(self):
        def opener():
            from array_record.python.array_record_module import ArrayRecordReader

            try:
                return ArrayRecordReader(str(self.path), "readahead_buffer_size:0")
            except Exception as error:  # the C++ reader's status error
                raise DataError(f"{self.path}: not a readable ArrayRecord file ({error})") from None

        return _OPEN_FILES.get(self.path, opener)

    def _scan(self) -> _Index:
        reader = self._open()
        records, empty, chunk = [], 0, 1024
        try:
            for start in range(0, reader.num_records(), chunk):  # in ranges: a chunk is decoded once
                raws = reader.read(start, min(start + chunk, reader.num_records()))
                for number, raw in enumerate(raws, start):
                    record = _json_row(raw, f"{self.path} record {number}", self.field, self.vision, self.path.parent)
                    if is_empty(record):
                        empty += 1
                    else:
                        records.append(number)
        except DataError:
            raise
        except Exception as error:
            raise DataError(f"{self.path}: a damaged ArrayRecord file ({error})") from None
        return _Index(np.asarray(records, np.int64), empty)

    def __getitem__(self, locator):
        raw = self._open().read([int(locator)])[0]
        return _json_row(raw, f"{self.path} record {locator}", self.field, self.vision, self.path.parent)


class _TableFile:
    """Rows of an Arrow table (Parquet row groups, or a Hugging Face dataset's memory-mapped Arrow files)."""

    base = None  # the folder that relative image and video names start from

    def _columns(self, schema_names):
        if any(key in schema_names for key in VISION_KEYS):
            return list(schema_names)  # each row is checked as a vision row (refused without vision)
        if self.field in schema_names:
            return [self.field]
        for columns in (["messages"], ["prompt", "completion"]):
            if all(c in schema_names for c in columns):
                return columns
        raise DataError(f"{self.path}: no column {self.field!r} (--data-field), nor 'messages', nor 'prompt' + "
                        f"'completion'; the columns are {list(schema_names)[:8]}")

    def _records(self, table, first_row):
        """(row number, record) for each row of `table`, whose first row is `first_row` of the file."""
        rows = zip(*(table.column(c).to_pylist() for c in self.columns))
        for number, values in enumerate(rows, first_row):
            row = dict(zip(self.columns, values))
            yield number, record_from_row(row, f"{self.path} row {number}", self.field, self.vision, self.base)

    def _scan_tables(self, tables) -> _Index:
        rows, empty, first = [], 0, 0
        for table in tables:
            for number, record in self._records(table, first):
                if is_empty(record):
                    empty += 1
                else:
                    rows.append(number)
            first += table.num_rows
        return _Index(np.asarray(rows, np.int64), empty)


class ParquetFile(_TableFile):
    """A Parquet file, read a row group at a time (the last few read are kept). Under a global
    shuffle each document may cost a row group's decoding: write small row groups."""

    GROUPS_KEPT = 4

    def __init__(self, path: pathlib.Path, field: str, vision=None):
        self.path, self.field, self.vision, self.base = path, field, vision, path.parent
        self._groups = collections.OrderedDict()
        file = self._open()
        self.columns = self._columns(file.schema_arrow.names)
        metadata = file.metadata
        self._group_starts = np.cumsum([0] + [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)])
        self.index = _cached_index(path, _scan_key(field, vision), lambda: self._scan_tables(
            self._read_group(g) for g in range(metadata.num_row_groups)))

    def _open(self):
        def opener():
            import pyarrow.parquet as pq

            try:
                return pq.ParquetFile(self.path)
            except Exception as error:  # pyarrow's ArrowInvalid and OSError for a damaged file
                raise DataError(f"{self.path}: not a readable Parquet file ({error})") from None

        return _OPEN_FILES.get(self.path, opener)

    def _read_group(self, group):
        try:
            return self._open().read_row_group(group, columns=self.columns)
        except Exception as error:
            raise DataError(f"{self.path}: row group {group} does not read ({error})") from None

    def __getitem__(self, locator):
        group = int(np.searchsorted(self._group_starts, locator, side="right")) - 1
        table = self._groups.pop(group, None)
        if table is None:
            table = self._read_group(group)
            if len(self._groups) >= self.GROUPS_KEPT:
                self._groups.popitem(last=False)
        self._groups[group] = table
        first = int(self._group_starts[group])
        return next(self._records(table.slice(int(locator) - first, 1), int(locator)))[1]


class HFDiskDataset(_TableFile):
    """A Hugging Face dataset folder from `save_to_disk`: its Arrow files memory-mapped, as `datasets` does."""

    def __init__(self, path: pathlib.Path, field: str, vision=None):
        self.path, self.field, self.vision, self.base = path, field, vision, path
        if (path / "dataset_dict.json").is_file():
            splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
            raise DataError(f"{path} holds a DatasetDict with splits {splits}: give one split's folder, "
                            f"e.g. {path / (splits[0] if splits else 'train')}")
        state = path / "state.json"
        if not state.is_file():
            raise DataError(f"{path} is a folder but not a Hugging Face dataset saved to disk (no state.json); "
                            f"for files in it give a glob, e.g. {path}/*.jsonl")
        self._files = [path / f["filename"] for f in json.loads(state.read_text())["_data_files"]]
        self._table = None
        self.columns = self._columns(self._open().schema.names)
        self.index = _cached_index(state, _scan_key(field, vision),
                                   lambda: self._scan_tables(self._open().to_batches()))

    def _open(self):
        if self._table is None:
            import pyarrow as pa

            tables = []
            for file in self._files:
                try:
                    tables.append(pa.ipc.open_stream(pa.memory_map(str(file))).read_all())
                except Exception as error:
                    raise DataError(f"{file}: not a readable Arrow stream ({error})") from None
            self._table = pa.concat_tables(tables)
        return self._table

    def __getitem__(self, locator):
        return next(self._records(self._open().slice(int(locator), 1), int(locator)))[1]


def open_file(path: pathlib.Path, field: str, vision=None):
    name = path.name.lower()
    if path.is_dir():
        return HFDiskDataset(path, field, vision)
    if name.endswith(".jsonl.gz"):
        return GzipJsonLinesFile(path, field, vision)
    readers = {".jsonl": JsonLinesFile, ".parquet": ParquetFile, ".txt": TextFile,
               ".arrayrecord": ArrayRecordFile, ".array_record": ArrayRecordFile}
    if path.suffix.lower() not in readers:
        raise DataError(f"{path}: unknown kind of file; --data takes {', '.join(SUFFIXES)} files "
                        "and Hugging Face dataset folders (save_to_disk)")
    return readers[path.suffix.lower()](path, field, vision)


class Documents:
    """Every non-empty document of `files` (paths or globs), in file order: `len` and `[i]`, which
    is what Grain's `MapDataset.source` needs. `empty` counts the empty ones skipped. `vision`:
    the run's `model_zoo.vision_data.VisionSpec`, None (a text-only run refuses vision rows)."""

    def __init__(self, files, field: str = "text", vision=None):
        if not isinstance(field, str) or not field:
            raise DataError(f"--data-field must be a non-empty string, got {field!r}")
        self.paths = resolve_files(files)
        self.vision = vision
        self.files = [open_file(p, field, vision) for p in self.paths]
        counts = [len(f.index.locators) for f in self.files]
        self._starts = np.cumsum([0] + counts)
        self.empty = sum(f.index.empty for f in self.files)
        if not len(self):
            raise DataError(f"--data {', '.join(map(str, self.paths))} holds no non-empty document "
                            f"({self.empty} empty skipped)")

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, i):
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"document {i} of {len(self)}")
        k = int(np.searchsorted(self._starts, i, side="right")) - 1
        file = self.files[k]
        return file[file.index.locators[i - self._starts[k]]]

    def identity(self) -> dict:
        """What a resumed run must read again to continue where it stopped: the files (path, size,
        modification time) and the documents counted in them."""
        files = []
        for path in self.paths:
            stat = path.stat()
            files.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
        return {"files": files, "documents": len(self)}

    def describe(self) -> str:
        skipped = f", {self.empty} empty skipped" if self.empty else ""
        return f"{len(self):,} documents in {len(self.paths)} file(s){skipped}"
