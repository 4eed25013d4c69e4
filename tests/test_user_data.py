"""The user's documents: every format reads back what was written, Grain's shuffle and the data
shards, next-fit packing with segment ids and restarted positions, conversations trained on their
answers, the loader's state, and bad input named with its file and line."""

import gzip
import json

import chex
import numpy as np
import pytest

from model_zoo.corpus import corpus_documents
from model_zoo.documents import DataError, Documents
from model_zoo.loader import DocumentBatches, ShardStream, encode_record
from model_zoo.tokenizer import HFTokenizer, check_fits, default_tokenizer, load_tokenizer


@pytest.fixture(autouse=True)
def data_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RING_ATTN_DATA_CACHE", str(tmp_path / "cache"))


def random_texts(count, seed, low=20, high=400):
    """Documents of random length cut from the embedded corpus at random places (never constants)."""
    rng = np.random.default_rng(seed)
    corpus = "\n".join(corpus_documents())
    texts = []
    for _ in range(count):
        n = int(rng.integers(low, high))
        start = int(rng.integers(0, len(corpus) - n))
        texts.append(corpus[start : start + n] + f" #{rng.integers(1 << 30)} ünïcødé")
    return texts


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_format(kind, directory, texts, field="text"):
    """`texts` written as `kind`; returns the path to give --data."""
    directory.mkdir(parents=True, exist_ok=True)
    rows = [{field: t, "id": i} for i, t in enumerate(texts)]
    if kind == "jsonl":
        return write_jsonl(directory / "docs.jsonl", rows)
    if kind == "jsonl.gz":
        path = directory / "docs.jsonl.gz"
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        return path
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = directory / "docs.parquet"
        pq.write_table(pa.table({field: texts, "id": list(range(len(texts)))}), path, row_group_size=7)
        return path
    if kind == "txt":
        for i, t in enumerate(texts):
            (directory / f"doc{i:04d}.txt").write_text(t, encoding="utf-8")
        return directory / "*.txt"
    if kind == "arrayrecord":
        from array_record.python.array_record_module import ArrayRecordWriter

        path = directory / "docs.arrayrecord"
        writer = ArrayRecordWriter(str(path), "group_size:4")
        for r in rows:
            writer.write(json.dumps(r).encode())
        writer.close()
        return path
    if kind == "hf":
        import datasets

        path = directory / "hf"
        datasets.Dataset.from_dict({field: texts, "id": list(range(len(texts)))}).save_to_disk(str(path))
        return path
    raise AssertionError(kind)


FORMATS = ("jsonl", "jsonl.gz", "parquet", "txt", "arrayrecord", "hf")


@pytest.mark.parametrize("kind", FORMATS)
def test_every_format_reads_back_its_documents_in_order(kind, tmp_path):
    texts = random_texts(23, seed=len(kind))
    documents = Documents([str(write_format(kind, tmp_path / kind, texts))])
    assert len(documents) == len(texts)
    assert [documents[i] for i in range(len(documents))] == texts
    assert [documents[i] for i in (17, 3, 22, 0, 8)] == [texts[i] for i in (17, 3, 22, 0, 8)]  # random access
    again = Documents([str(write_format(kind, tmp_path / kind, texts))])  # the cached index
    assert [again[i] for i in range(len(again))] == texts


def test_the_text_field_is_chosen_and_files_and_globs_join_in_order(tmp_path):
    a, b = random_texts(5, seed=1), random_texts(4, seed=2)
    write_jsonl(tmp_path / "a.jsonl", [{"body": t} for t in a])
    write_jsonl(tmp_path / "b.jsonl", [{"body": t} for t in b])
    documents = Documents([str(tmp_path / "*.jsonl")], field="body")
    assert [documents[i] for i in range(len(documents))] == a + b


def test_empty_documents_and_blank_lines_are_skipped_and_counted(tmp_path):
    texts = random_texts(6, seed=3)
    rows = [{"text": texts[0]}, {"text": ""}, {"text": texts[1]}, {"text": ""}]
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    documents = Documents([str(path)])
    assert [documents[i] for i in range(len(documents))] == texts[:2]
    assert documents.empty == 2 and "2 empty skipped" in documents.describe()


def test_conversations_are_laid_out_in_the_chat_template_with_the_loss_on_the_answers(tmp_path):
    tokenizer = default_tokenizer()
    path = write_jsonl(tmp_path / "chat.jsonl", [
        {"prompt": "What is 2 + 3?", "completion": "It is 5."},
        {"messages": [{"role": "system", "content": "Answer briefly."},
                      {"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "Seven."},
                      {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "Eleven."}]},
    ])
    documents = Documents([str(path)])
    ids, mask = encode_record(documents[0], tokenizer)
    assert ids[0] == tokenizer.bos_id
    assert tokenizer.decode(ids[mask == 0][1:]) == "You are a helpful assistant. USER: What is 2 + 3? ASSISTANT:"
    answer = ids[mask == 1]
    assert answer[-1] == tokenizer.eos_id and tokenizer.decode(answer[:-1]).strip() == "It is 5."
    # a turn is tokenized as its whole text is, the answer's first token no different
    whole = "You are a helpful assistant. USER: What is 2 + 3? ASSISTANT: It is 5."
    assert list(ids[1:-1]) == tokenizer.encode(whole)
    ids, mask = encode_record(documents[1], tokenizer)
    trained = np.flatnonzero(mask)
    pieces = np.split(ids[trained], np.flatnonzero(np.diff(trained) > 1) + 1)
    assert [tokenizer.decode(p[:-1]).strip() for p in pieces] == ["Seven.", "Eleven."]
    assert all(p[-1] == tokenizer.eos_id for p in pieces)
    assert tokenizer.decode(ids[1 : trained[0]]) == "Answer briefly. USER: Name a prime. ASSISTANT:"
    second_turn = ids[pieces[0].size + trained[0] : -1]
    assert list(second_turn) == tokenizer.encode(" USER: Another? ASSISTANT: Eleven.")


def documents_tokens(documents, tokenizer):
    return [encode_record(documents[i], tokenizer) for i in range(len(documents))]


def unpack(rows):
    """The segments of packed rows, in order: (inputs, targets, loss_mask, first position) each."""
    pieces = []
    for row in rows:
        for segment in range(1, row["segment_ids"].max() + 1):
            at = row["segment_ids"] == segment
            assert np.array_equal(row["positions"][at], np.arange(at.sum())), "positions restart per segment"
            pieces.append((row["inputs"][at], row["targets"][at], row["loss_mask"][at]))
        assert np.all(row["segment_ids"][row["segment_ids"] == 0] == 0)
        used = np.flatnonzero(row["segment_ids"])
        assert used.size == 0 or np.array_equal(used, np.arange(used.size)), "padding only at the end"
    return pieces


@pytest.mark.parametrize("seq_len", [48, 256])
def test_packing_keeps_documents_whole_where_they_fit_and_splits_only_longer_ones(tmp_path, seq_len):
    import grain

    from model_zoo.data import MIN_DOCUMENT

    tokenizer = default_tokenizer()
    texts = random_texts(40, seed=seq_len, low=10, high=1500)
    documents = Documents([str(write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts]))])
    stream = ShardStream(documents, tokenizer, seed=5, shard=0, num_shards=1)
    rows = [stream.next_row(seq_len) for _ in range(30)]
    # The oracle: each document tokenized on its own, in Grain's shuffled order.
    order = list(grain.MapDataset.source(list(range(len(texts)))).shuffle(seed=5))
    encoded = [encode_record(texts[i], tokenizer) for i in order]
    doc, offset, splits = 0, 0, 0
    for r, row in enumerate(rows):
        pieces = unpack([row])
        for k, (inputs, targets, mask) in enumerate(pieces):
            ids, full_mask = encoded[doc]
            n = len(inputs)
            np.testing.assert_array_equal(inputs, ids[offset : offset + n])
            np.testing.assert_array_equal(targets, ids[offset + 1 : offset + n + 1])
            np.testing.assert_array_equal(mask, full_mask[offset + 1 : offset + n + 1])
            offset += n
            if offset < len(ids) - 1:  # cut: a document longer than a row, cut at the row's end
                splits += 1
                assert len(ids) - 1 - (offset - n) > seq_len and k == len(pieces) - 1
                assert np.count_nonzero(row["segment_ids"]) == seq_len
            else:
                doc, offset = doc + 1, 0
        # a row ends early only where the next document fits a row but not the room left
        room = seq_len - np.count_nonzero(row["segment_ids"])
        if room and r + 1 < len(rows):
            left = len(encoded[doc][0]) - 1 - offset
            assert left > room and (left <= seq_len or room < MIN_DOCUMENT), (r, left, room)
    assert splits > 3, "some documents were longer than a row"


def test_shards_are_disjoint_cover_an_epoch_and_follow_the_seed(tmp_path):
    texts = random_texts(30, seed=9)
    documents = Documents([str(write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts]))])

    def order(seed, shard, shards):
        stream = ShardStream(documents, default_tokenizer(), seed=seed, shard=shard, num_shards=shards)
        return [stream._documents[i] for i in range(stream.per_epoch)]

    def as_text(encoded):
        return default_tokenizer().decode(encoded[0][1:-1])

    shard0, shard1 = order(1, 0, 2), order(1, 1, 2)
    seen = [as_text(d) for d in shard0 + shard1]
    assert sorted(seen) == sorted(texts)  # disjoint, and together every document once
    assert [as_text(d) for d in order(1, 0, 2)] == [as_text(d) for d in shard0]
    assert [as_text(d) for d in order(2, 0, 1)] != [as_text(d) for d in order(1, 0, 1)]


def test_two_loaders_of_one_shard_each_build_the_one_loader_batch(tmp_path):
    texts = random_texts(60, seed=4)
    documents = Documents([str(write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts]))])
    kinds = dict(needle_fraction=0.4, long_needle_fraction=0.5)
    both = DocumentBatches(documents, default_tokenizer(), seed=3, num_shards=2, **kinds)
    halves = [DocumentBatches(documents, default_tokenizer(), seed=3, num_shards=2, shards=[d], **kinds)
              for d in (0, 1)]
    for step in range(4):
        whole = both.batch(step, 4, 128)
        parts = [h.batch(step, 4, 128) for h in halves]
        for name in whole:
            np.testing.assert_array_equal(whole[name][:2], parts[0][name][:2])
            np.testing.assert_array_equal(whole[name][2:], parts[1][name][2:])
            assert not parts[0][name][2:].any() and not parts[1][name][:2].any()


def test_a_restored_loader_continues_with_the_same_batches_across_a_stage_change(tmp_path):
    texts = random_texts(50, seed=6, high=900)
    documents = Documents([str(write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts]))])
    loader = DocumentBatches(documents, default_tokenizer(), seed=0, needle_fraction=0.3)
    plan = [(0, 4, 64), (1, 4, 64), (2, 2, 128), (3, 2, 128)]
    for step, rows, length in plan[:2]:
        loader.batch(step, rows, length)
    state = json.loads(json.dumps(loader.state))  # as a checkpoint's JSON record keeps it
    expected = [loader.batch(*p) for p in plan[2:]]
    resumed = DocumentBatches(documents, default_tokenizer(), seed=0, needle_fraction=0.3)
    resumed.restore(state)
    for want, p in zip(expected, plan[2:]):
        got = resumed.batch(*p)
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])


def test_retrieval_rows_hide_a_needle_in_the_users_text(tmp_path):
    tokenizer = default_tokenizer()
    texts = [t.replace("e", "é") for t in random_texts(40, seed=8, high=700)]  # text the corpus does not hold
    documents = Documents([str(write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts]))])
    loader = DocumentBatches(documents, tokenizer, seed=0, needle_fraction=1.0)
    batch = loader.batch(0, 2, 512)
    for row in range(2):
        text = tokenizer.decode(batch["inputs"][row])
        assert "special magic" in text and "é" in text
        answer = tokenizer.decode(batch["targets"][row][batch["loss_mask"][row] > 0])
        assert answer.replace(",", "").split()[0].isdigit()


def byte_level_bpe(path, vocab_size=400):
    """A tokenizer.json trained here: byte-level BPE with <s> and </s>, as LLaMA-3's kind is built."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(random_texts(200, seed=1), trainer)
    backend.save(str(path))
    return path


def test_a_tokenizer_json_tokenizes_and_a_too_large_one_is_refused(tmp_path):
    tokenizer = load_tokenizer(byte_level_bpe(tmp_path / "tokenizer.json"))
    assert isinstance(tokenizer, HFTokenizer) and (tokenizer.bos_id, tokenizer.eos_id) == (1, 2)
    text = random_texts(1, seed=2)[0]
    assert tokenizer.decode(tokenizer.encode(text)) == text
    check_fits(tokenizer, 1024)
    with pytest.raises(ValueError, match=r"tokenizer.json' has 400 tokens, more than the model's vocabulary of 256"):
        check_fits(tokenizer, 256)


@pytest.mark.parametrize("content, message", [
    (b'{"text": "fine"}\n{"text": "cut', r"bad\.jsonl:2: not JSON \(Unterminated string"),
    (b'{"text": "fine"}\n{"body": "x"}\n', r"bad\.jsonl:2: no field 'text' \(--data-field\)"),
    (b'{"text": "fine"}\n\n{"text": 7}\n', r"bad\.jsonl:3: field 'text' is int, expected a string"),
    (b'{"text": "fine"}\n{"text": "caf\xe9"}\n', r"bad\.jsonl:2: invalid UTF-8"),
    (b'["a list"]\n', r"bad\.jsonl:1: expected a JSON object, got list"),
    (b'{"messages": [{"role": "user", "content": "hi"}]}\n', r"bad\.jsonl:1: 'messages' has no assistant turn"),
])
def test_bad_json_lines_are_named_with_file_and_line(tmp_path, content, message):
    (tmp_path / "bad.jsonl").write_bytes(content)
    with pytest.raises(DataError, match=message):
        Documents([str(tmp_path / "bad.jsonl")])


def test_other_bad_input_is_named(tmp_path):
    with pytest.raises(DataError, match=r"--data '.*nothing\*\.jsonl' matches no file"):
        Documents([str(tmp_path / "nothing*.jsonl")])
    (tmp_path / "notes.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"notes\.csv: unknown kind of file; --data takes \.jsonl, \.jsonl\.gz"):
        Documents([str(tmp_path / "notes.csv")])
    (tmp_path / "latin1.txt").write_bytes("line one\nline two\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.txt:3: invalid UTF-8"):
        Documents([str(tmp_path / "latin1.txt")])
    whole = gzip.compress("".join(json.dumps({"text": t}) + "\n" for t in random_texts(50, seed=1)).encode())
    (tmp_path / "cut.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match=r"cut\.jsonl\.gz: a damaged or truncated gzip file after line \d+"):
        Documents([str(tmp_path / "cut.jsonl.gz")])
    (tmp_path / "empty.jsonl").write_text(json.dumps({"text": ""}) + "\n")
    with pytest.raises(DataError, match=r"holds no non-empty document \(1 empty skipped\)"):
        Documents([str(tmp_path / "empty.jsonl")])
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match=r"folder is a folder but not a Hugging Face dataset"):
        Documents([str(tmp_path / "folder")])
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "other.parquet")
    with pytest.raises(DataError, match=r"other\.parquet: no column 'text' \(--data-field\)"):
        Documents([str(tmp_path / "other.parquet")])
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    with pytest.raises(DataError, match=r"ints\.parquet row 0: field 'text' is int, expected a string"):
        Documents([str(tmp_path / "ints.parquet")])


def test_too_little_data_for_one_batch_is_refused(tmp_path):
    documents = Documents([str(write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in random_texts(3, seed=1)]))])
    loader = DocumentBatches(documents, default_tokenizer(), seed=0)
    with pytest.raises(DataError, match=r"fewer tokens than one batch of 8 x 512"):
        loader.check_enough(8, 512)
    loader.check_enough(1, 32)
    with pytest.raises(DataError, match=r"3 documents, fewer than the 4 data shards"):
        DocumentBatches(documents, default_tokenizer(), seed=0, num_shards=4)


def test_the_index_is_cached_until_the_file_changes(tmp_path, monkeypatch):
    from model_zoo import documents as reader

    path = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in random_texts(8, seed=1)])
    assert len(Documents([str(path)])) == 8
    real_scan = reader.JsonLinesFile._scan
    monkeypatch.setattr(reader.JsonLinesFile, "_scan", lambda self: pytest.fail("scanned again"))
    assert len(Documents([str(path)])) == 8  # from the cache
    with open(path, "a") as more:
        more.write(json.dumps({"text": random_texts(1, seed=2)[0]}) + "\n")
    monkeypatch.setattr(reader.JsonLinesFile, "_scan", real_scan)
    assert len(Documents([str(path)])) == 9  # size and time changed: scanned again


def test_epochs_reshuffle_and_a_loader_restored_in_the_second_continues_the_same(tmp_path):
    texts = random_texts(12, seed=3, high=200)
    documents = Documents([str(write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts]))])
    stream = ShardStream(documents, default_tokenizer(), seed=4, shard=0, num_shards=1)
    decoded = [default_tokenizer().decode(stream._documents[i][0][1:-1]) for i in range(36)]
    epochs = [decoded[i : i + 12] for i in (0, 12, 24)]
    assert all(sorted(e) == sorted(texts) for e in epochs) and epochs[0] != epochs[1] != epochs[2]
    loader = DocumentBatches(documents, default_tokenizer(), seed=4)
    for step in range(10):  # well into the second epoch
        loader.batch(step, 2, 64)
    assert loader.streams[0].document > 12
    state = json.loads(json.dumps(loader.state))
    resumed = DocumentBatches(documents, default_tokenizer(), seed=4)
    resumed.restore(state)
    for step in range(10, 16):
        want, got = loader.batch(step, 2, 64), resumed.batch(step, 2, 64)
        chex.assert_trees_all_equal(got, want, strict=True)


def test_a_resume_on_changed_files_is_refused(tmp_path):
    import jax

    from model_zoo import TINY
    from model_zoo.sharding import make_mesh
    from model_zoo.train import Stage, TrainConfig, TrainingBatches

    path = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in random_texts(20, seed=5)])
    cfg = TrainConfig(model=TINY, stages=(Stage(64, 1e4, 2),), batch_size=2, data=(str(path),))
    mesh = make_mesh(sp=1, devices=jax.devices()[:1])
    batches = TrainingBatches(cfg, mesh, default_tokenizer(), Documents([str(path)]))
    batches.host_batch(0, cfg.stages[0])
    record = json.loads(json.dumps(batches.checkpoint_record()))
    TrainingBatches(cfg, mesh, default_tokenizer(), Documents([str(path)])).restore(record)  # the same files
    with open(path, "a") as more:
        more.write(json.dumps({"text": random_texts(1, seed=6)[0]}) + "\n")
    again = TrainingBatches(cfg, mesh, default_tokenizer(), Documents([str(path)]))
    with pytest.raises(ValueError, match=r"read other data than --data names now: files \(d\.jsonl\); "
                                         r"documents \(20 then, 21 now\) differ"):
        again.restore(record)


def test_names_with_glob_characters_and_utf8_errors_past_the_first_chunk(tmp_path):
    texts = random_texts(3, seed=7)
    literal = write_jsonl(tmp_path / "notes[1].jsonl", [{"text": t} for t in texts])
    assert len(Documents([str(literal)])) == 3
    # the first byte of "é" ends the first 1 MiB read, and a bad byte follows lines later
    body = b"aaaaaaaaa\n" * 104857 + b"aaaaa" + "é".encode() + b"\n" + b"line\n" * 3 + b"bad \xff\n"
    assert body.index("é".encode()) == 2**20 - 1
    (tmp_path / "long.txt").write_bytes(body)
    with pytest.raises(DataError, match=r"long\.txt:104862: invalid UTF-8"):
        Documents([str(tmp_path / "long.txt")])


def test_a_workdir_made_before_the_data_settings_still_resumes(tmp_path):
    import dataclasses

    from model_zoo import TINY
    from model_zoo.__main__ import _check_same_run
    from model_zoo.train import Stage, TrainConfig

    cfg = TrainConfig(model=TINY, stages=(Stage(64, 1e4, 2),))
    settings = json.loads(json.dumps(dataclasses.asdict(cfg)))
    for key in ("data", "data_field", "tokenizer"):
        del settings[key]
    (tmp_path / "run.json").write_text(json.dumps(settings))
    _check_same_run(tmp_path, cfg)
    with pytest.raises(ValueError, match=r"holds a run with different settings \(data\)"):
        _check_same_run(tmp_path, dataclasses.replace(cfg, data=("x.jsonl",)))


def test_a_shard_short_of_data_is_refused_in_every_process(tmp_path):
    # 3 documents of 260-330 tokens over 2 shards: shard 0 reads two, shard 1 one; two rows of 512
    # a shard need two documents (two do not share a row)
    texts = random_texts(3, seed=8, low=800, high=1000)
    documents = Documents([str(write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts]))])
    assert all(256 < len(encode_record(t, default_tokenizer())[0]) < 512 for t in texts)
    only_mine = DocumentBatches(documents, default_tokenizer(), seed=0, num_shards=2, shards=[0])
    only_mine.check_enough(2, 512)
    with pytest.raises(DataError, match=r"fewer tokens than one batch of 4 x 512 in data shard 1 of 2"):
        only_mine.check_enough(4, 512)


def test_many_files_read_through_a_bounded_set_of_open_handles(tmp_path):
    from model_zoo import documents as reader

    texts = random_texts(150, seed=9, high=120)
    for i, text in enumerate(texts):
        write_jsonl(tmp_path / f"part{i:03d}.jsonl", [{"text": text}])
    documents = Documents([str(tmp_path / "part*.jsonl")])
    order = np.random.default_rng(0).permutation(len(texts))
    assert [documents[i] for i in order] == [texts[i] for i in order]
    assert len(reader._OPEN_FILES._open) <= reader._OPEN_FILES.limit < len(texts)


def test_array_record_files_of_several_read_ranges(tmp_path):
    texts = random_texts(2600, seed=10, low=5, high=40)
    documents = Documents([str(write_format("arrayrecord", tmp_path, texts))])
    assert len(documents) == 2600
    assert [documents[i] for i in (0, 1023, 1024, 2047, 2048, 2599)] == [texts[i] for i in
                                                                          (0, 1023, 1024, 2047, 2048, 2599)]
