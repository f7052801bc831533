"""Data: tokenizer, .bin/.idx bytes, preprocessing, GPT-NeoX's sample order, blending, loading."""

import json
import struct

import numpy as np
import pytest

from neox_jax.data.dataset import (BlendedDataset, GlobalBatches, GPTDataset, build_path_datasets, build_split_datasets,
                                   normalised_weights, samples_per_dataset, skipped_documents, split_boundaries)
from neox_jax.data.helpers import blending_indices
from neox_jax.data.indexed import IndexedDataset, IndexedDatasetWriter
from neox_jax.data.preprocess import preprocess
from neox_jax.data.tokenizer import SPACE_RUNS, NeoXTokenizer, train_tokenizer
from neox_jax.errors import BadRecordError

FIB = "def fibRec(n):\n    if n < 2:\n        return n\n    else:\n        return fibRec(n-1) + fibRec(n-2)"


# ---- tokenizer -------------------------------------------------------------------------------------------

def test_real_tokenizer_fibrec_and_round_trip(shared):
    tok = NeoXTokenizer(shared / "20B_tokenizer.json")
    assert len(tok.encode(FIB)) == 39  # the paper's example
    assert (tok.vocab_size, tok.eod_id, tok.pad_id) == (50277, 0, 1)
    text = "naïve café — 東京\t\ttabs\n\n    four spaces\n" + " " * 30 + "thirty\r\nend  "
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode_batch(tok.encode_batch([FIB, text])) == [FIB, text]


def test_trained_tokenizer_is_neox_style(tmp_path):
    rng = np.random.RandomState(0)
    words = ["".join(rng.choice(list("abcdefghij"), rng.randint(2, 7))) for _ in range(3000)]
    texts = [FIB, "class A:\n    def f(self):\n        return 1\n", " ".join(words)] * 5
    path = train_tokenizer(texts, 400, tmp_path / "tok.json")
    tok = NeoXTokenizer(path)
    assert tok.vocab_size == 400 and tok.eod_id == 0 and tok.pad_id == 1
    spec = json.loads(path.read_text())
    assert spec["normalizer"]["type"] == "NFC"
    assert spec["pre_tokenizer"] == {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                                     "use_regex": True}
    runs = {t["content"]: t["id"] for t in spec["added_tokens"] if t["content"].strip() == ""}
    assert sorted(len(r) for r in runs) == sorted(SPACE_RUNS)
    assert tok.encode("        x")[0] == runs[" " * 8]  # 8 spaces are one token
    assert tok.decode(tok.encode("naïve\n\t  end")) == "naïve\n\t  end"


def test_bad_tokenizer_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer .* not found"):
        NeoXTokenizer(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        NeoXTokenizer(tmp_path / "bad.json")


# ---- .bin / .idx --------------------------------------------------------------------------------------------

def minimal_writer(prefix, docs, dtype_code=8, dtype=np.uint16):
    """An independent writer from the byte layout in the reference (not our code)."""
    sizes = [len(d) for d in docs]
    with open(f"{prefix}.bin", "wb") as f:
        for d in docs:
            f.write(np.asarray(d, dtype).tobytes())
    with open(f"{prefix}.idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", dtype_code))
        f.write(struct.pack("<Q", len(docs)) + struct.pack("<Q", len(docs) + 1))
        f.write(np.asarray(sizes, np.int32).tobytes())
        f.write(np.asarray(np.concatenate([[0], np.cumsum(sizes)[:-1]]) * np.dtype(dtype).itemsize,
                           np.int64).tobytes())
        f.write(np.arange(len(docs) + 1, dtype=np.int64).tobytes())


@pytest.mark.parametrize("dtype,code", [(np.uint16, 8), (np.int32, 4)])
def test_indexed_write_read_and_bytes_match_an_independent_writer(tmp_path, dtype, code):
    rng = np.random.RandomState(0)
    docs = [rng.randint(0, 60000, rng.randint(1, 50)) for _ in range(30)] + [np.array([], np.int64)]
    with IndexedDatasetWriter(tmp_path / "ours", dtype) as w:
        for d in docs:
            w.add_document(d)
    minimal_writer(tmp_path / "ref", docs, code, dtype)
    for ext in ("bin", "idx"):
        assert (tmp_path / f"ours.{ext}").read_bytes() == (tmp_path / f"ref.{ext}").read_bytes()
    ds = IndexedDataset(tmp_path / "ref")
    assert len(ds) == len(docs) and ds.dtype == np.dtype(dtype)
    for d, got in zip(docs, (ds[i] for i in range(len(ds)))):
        np.testing.assert_array_equal(got, d)
    np.testing.assert_array_equal(ds.get(3, offset=2, length=3), docs[3][2:5])


def test_reads_the_file_gpt_neox_wrote(shared):
    ds = IndexedDataset(shared / "neox-preprocessed" / "tiny_text_document")
    tok = NeoXTokenizer(shared / "20B_tokenizer.json")
    first = json.loads((shared / "neox-preprocessed" / "tiny.jsonl").read_text().splitlines()[0])["text"]
    assert len(ds) == 201 and ds.dtype == np.uint16
    assert ds[0][-1] == tok.eod_id and tok.decode(ds[0][:-1]) == first


def test_corrupt_index_is_named(tmp_path):
    minimal_writer(tmp_path / "d", [[1, 2, 3]])
    idx = tmp_path / "d.idx"
    idx.write_bytes(idx.read_bytes()[:-4])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        IndexedDataset(tmp_path / "d")
    with pytest.raises(FileNotFoundError, match="without .bin/.idx"):
        IndexedDataset(tmp_path / "nothing")


# ---- preprocessing ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("workers", [1, 2])
def test_preprocess_is_byte_identical_to_gpt_neox(shared, tmp_path, workers):
    data = shared / "neox-preprocessed"
    summary = preprocess([data / "tiny.jsonl"], shared / "20B_tokenizer.json", str(tmp_path / "tiny"),
                         append_eod=True, workers=workers, show_progress=False)
    assert summary.documents == 201 and not summary.rejected
    for ext in ("bin", "idx"):
        assert (tmp_path / f"tiny_text_document.{ext}").read_bytes() == (data / f"tiny_text_document.{ext}").read_bytes()


def _long_record(n_words: int, seed: int = 0) -> str:
    """One line of text with what byte-level BPE treats specially: space runs, tabs, contractions, digits,
    punctuation, accents written with combining marks, CJK."""
    words = ["the", "cat", "über", "naïve", "x=1;", "3.14", "  ", "code()", "日本語", "e\u0301", "don't", "'s", "\t",
             "—", "123456", "   indented", "a\u0308"]
    rng = np.random.default_rng(seed)
    return " ".join(words[i] for i in rng.integers(0, len(words), n_words))


def test_a_long_text_encoded_in_pieces_has_the_tokens_of_the_whole(shared):
    from neox_jax.data.tokenizer import pieces

    tok = NeoXTokenizer(shared / "20B_tokenizer.json")
    text = _long_record(40_000)
    whole = tok.encode(text)
    for size in (20, 1000):
        parts = list(pieces(text, size))
        assert "".join(parts) == text and len(parts) > len(text) // (size * 2)
        assert all(p[0] == " " and not p[1].isspace() and not q[-1].isspace() for q, p in zip(parts, parts[1:]))
        assert np.concatenate([tok.encode(p) for p in parts]).tolist() == whole
    assert tok.pieceable and tok.encode_array(text).tolist() == whole  # in pieces of 64 Ki characters
    assert list(pieces("x" * 50, 20)) == ["x" * 50]  # no lone space: kept whole


def test_a_tokenizer_that_would_encode_pieces_differently_is_encoded_whole(shared, tmp_path):
    spec = json.loads((shared / "20B_tokenizer.json").read_text())
    for change in ({"post_processor": {"type": "TemplateProcessing", "single": [], "pair": [],
                                       "special_tokens": {}}},
                   {"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                                      "use_regex": True}},
                   {"added_tokens": spec["added_tokens"] + [{**spec["added_tokens"][0], "id": 50277,
                                                             "content": "a b"}]}):
        (tmp_path / "t.json").write_text(json.dumps({**spec, **change}))
        assert not NeoXTokenizer(tmp_path / "t.json").pieceable, change


@pytest.mark.slow
def test_preprocessing_one_huge_record_keeps_its_memory_bounded(shared, tmp_path):
    """A single-line record of 8 MB: its tokens equal encoding it whole; the peak memory above a one-line run
    stays within 3x the record (encoding it whole took about 200x)."""
    import subprocess
    import sys

    (tmp_path / "huge.jsonl").write_text(json.dumps({"text": _long_record(1_200_000)}) + "\n")
    (tmp_path / "small.jsonl").write_text(json.dumps({"text": "hello world"}) + "\n")
    script = ("import resource, sys; from neox_jax.data.preprocess import preprocess; "
              "preprocess([sys.argv[1]], sys.argv[2], sys.argv[3], show_progress=False); "
              "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)")

    def peak(name):
        out = subprocess.run([sys.executable, "-c", script, str(tmp_path / f"{name}.jsonl"),
                              str(shared / "20B_tokenizer.json"), str(tmp_path / name)],
                             capture_output=True, text=True, check=True)
        return int(out.stdout.split()[-1])

    size = (tmp_path / "huge.jsonl").stat().st_size
    assert peak("huge") - peak("small") < 3 * size
    text = json.loads((tmp_path / "huge.jsonl").read_text())["text"]
    tokens = IndexedDataset(tmp_path / "huge_text_document")[0]
    assert tokens.tolist() == NeoXTokenizer(shared / "20B_tokenizer.json").encode(text)


@pytest.fixture
def small_tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tok.json"
    return train_tokenizer([FIB, "hello world, the quick brown fox"] * 20, 320, path)


def test_bad_records_are_reported_with_line_and_nothing_else_is_lost(tmp_path, small_tokenizer, capsys):
    lines = [b'{"text": "good one"}', b'{"text": "broken', b'{"other": "x"}', b'{"text": ""}',
             b'{"text": "bad \xff byte"}', b'{"text": "good two"}', b'[1, 2]', b'{"text": "good three"}']
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"\n".join(lines) + b"\n")
    summary = preprocess([src], small_tokenizer, str(tmp_path / "out"), show_progress=False,
                         log=__import__("sys").stdout)
    assert summary.documents == 3
    assert summary.rejected == {"invalid JSON": 1, "missing key 'text'": 1, "empty text": 1, "invalid UTF-8": 1,
                                "expected a JSON object, got list": 1}
    rejects = (tmp_path / "out_rejects.tsv").read_text().splitlines()
    assert [r.split("\t")[1] for r in rejects[1:]] == ["2", "3", "4", "5", "7"]
    printed = capsys.readouterr().out
    assert f"rejected {src}:2: invalid JSON" in printed
    tok = NeoXTokenizer(small_tokenizer)
    ds = IndexedDataset(tmp_path / "out_text_document")
    assert [tok.decode(ds[i]) for i in range(len(ds))] == ["good one", "good two", "good three"]


def test_strict_stops_and_leaves_no_output(tmp_path, small_tokenizer):
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "fine"}\n{"text": 1}\n')
    with pytest.raises(BadRecordError, match=r"in.jsonl:2: key 'text' is not a string: int"):
        preprocess([src], small_tokenizer, str(tmp_path / "out"), strict=True, show_progress=False)
    assert not list(tmp_path.glob("out*"))


def test_zst_and_txt_inputs_and_several_keys(tmp_path, small_tokenizer):
    zstandard = pytest.importorskip("zstandard", reason="reading .jsonl.zst needs zstandard: pip install zstandard")
    records = [{"text": f"doc {i}", "title": f"title {i}"} for i in range(5)]
    (tmp_path / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
        "".join(json.dumps(r) + "\n" for r in records).encode()))
    summary = preprocess([tmp_path / "a.jsonl.zst"], small_tokenizer, str(tmp_path / "z"),
                         jsonl_keys=["text", "title"], append_eod=True, show_progress=False)
    assert summary.documents == 5
    tok = NeoXTokenizer(small_tokenizer)
    titles = IndexedDataset(tmp_path / "z_title_document")
    assert tok.decode(titles[4][:-1]) == "title 4" and titles[4][-1] == tok.eod_id
    (tmp_path / "b.txt").write_text(FIB)
    preprocess([tmp_path / "b.txt"], small_tokenizer, str(tmp_path / "t"), show_progress=False)
    assert tok.decode(IndexedDataset(tmp_path / "t_text_document")[0]) == FIB


# ---- sample order ----------------------------------------------------------------------------------------

def reference_index_maps(sizes, documents, num_samples, seq_length, seed):
    """GPT-NeoX's algorithm written straightforwardly (the C++ loop of build_sample_idx included)."""
    tokens_per_epoch = int(np.sum(sizes[documents]))
    epochs, total = 0, 0
    while True:
        epochs += 1
        total += tokens_per_epoch
        if (total - 1) // seq_length >= num_samples:
            break
    rng = np.random.RandomState(seed=seed)
    doc_idx = np.mgrid[0:epochs, 0:len(documents)][1]
    doc_idx[:] = documents
    doc_idx = doc_idx.reshape(-1).astype(np.int32)
    rng.shuffle(doc_idx)
    n = (epochs * tokens_per_epoch - 1) // seq_length
    sample_idx = np.zeros((n + 1, 2), np.int64)
    doc_index, offset = 0, 0
    for s in range(1, n + 1):
        remaining = seq_length + 1
        while remaining != 0:
            length = sizes[doc_idx[doc_index]] - offset
            remaining -= length
            if remaining <= 0:
                offset += remaining + length - 1
                remaining = 0
            else:
                doc_index += 1
                offset = 0
        sample_idx[s] = doc_index, offset
    shuffle_idx = np.arange(n, dtype=np.uint32)
    rng.shuffle(shuffle_idx)
    return doc_idx, sample_idx, shuffle_idx


@pytest.fixture
def corpus(tmp_path):
    rng = np.random.RandomState(3)
    docs = [rng.randint(2, 1000, rng.randint(1, 40)) for _ in range(57)]
    with IndexedDatasetWriter(tmp_path / "c", np.uint16) as w:
        for d in docs:
            w.add_document(d)
    return IndexedDataset(tmp_path / "c"), docs


@pytest.mark.parametrize("num_samples,seq_length", [(10, 16), (300, 16), (97, 33)])  # 1 to ~8 epochs
def test_sample_order_equals_reference_neox_algorithm(corpus, tmp_path, num_samples, seq_length):
    ds, docs = corpus
    documents = np.arange(5, 50, dtype=np.int32)
    ours = GPTDataset(ds, documents, num_samples, seq_length, seed=1234, cache_dir=tmp_path / "cache")
    doc_idx, sample_idx, shuffle_idx = reference_index_maps(ds.sizes, documents, num_samples, seq_length, 1234)
    np.testing.assert_array_equal(ours.doc_idx, doc_idx)
    np.testing.assert_array_equal(ours.sample_idx, sample_idx)
    np.testing.assert_array_equal(ours.shuffle_idx, shuffle_idx)
    assert len(ours) >= num_samples
    # each sample is the stream of shuffled documents from its start, seq_length + 1 tokens
    stream = np.concatenate([docs[d] for d in doc_idx])
    for i in range(len(ours)):
        start = int(shuffle_idx[i]) * seq_length
        np.testing.assert_array_equal(ours[i], stream[start:start + seq_length + 1])
    # the cache is reused: same maps, loaded memory-mapped
    again = GPTDataset(ds, documents, num_samples, seq_length, seed=1234, cache_dir=tmp_path / "cache")
    assert isinstance(again.sample_idx, np.memmap)
    np.testing.assert_array_equal(again.shuffle_idx, shuffle_idx)
    assert not list((tmp_path / "cache").glob("*.tmp*"))


def test_split_boundaries_follow_neox():
    assert split_boundaries("969,30,1", 1000) == [0, 969, 999, 1000]
    assert split_boundaries("995,4,1", 201) == [0, 200, 201, 201]
    assert split_boundaries("1", 10) == [0, 10, 10, 10]
    with pytest.raises(ValueError, match="split='a,b'"):
        split_boundaries("a,b", 10)


def reference_blending(weights, size):
    """GPT-NeoX's helpers.cpp `build_blending_indices`, line for line in Python."""
    dataset_index, sample_index, current = [0] * size, [0] * size, [0] * len(weights)
    for i in range(size):
        at = max(float(i), 1.0)
        best, best_error = 0, weights[0] * at - float(current[0])
        for d in range(1, len(weights)):
            error = weights[d] * at - float(current[d])
            if error > best_error:
                best, best_error = d, error
        dataset_index[i], sample_index[i] = best, current[best]
        current[best] += 1
    return np.asarray(dataset_index, np.uint8), np.asarray(sample_index, np.int64)


@pytest.mark.parametrize("weights", [[0.5, 0.3, 0.2], [1.0, 1.0], [3.0, 1.0, 1.0, 1.0],
                                     list(np.random.RandomState(1).lognormal(0, 1.5, 22)),
                                     list(np.random.RandomState(0).rand(40) + 0.01)])
def test_blending_equals_gpt_neox_loop(weights):
    w = normalised_weights(weights)
    size = 30_000
    index, sample = blending_indices(w, size)
    want_index, want_sample = reference_blending(list(w), size)
    np.testing.assert_array_equal(index, want_index)
    np.testing.assert_array_equal(sample, want_sample)
    for n in (10, 77, 500, size):  # every prefix is within one sample of the weights
        counts = np.bincount(index[:n], minlength=len(w))
        assert np.all(np.abs(counts - w * n) <= 1), (n, counts)


def test_blend_weights_are_normalised_as_gpt_neox_does():
    weights = [0.1] * 7 + [0.3] * 15  # the numpy sum and the Python sum of these differ in the last bit
    total = sum(weights)
    python = [x / total for x in weights]
    np.testing.assert_array_equal(normalised_weights(weights), np.asarray(python) / np.sum(python))
    assert samples_per_dataset([2.0, 1.0], 1000) == [670, 335]  # GPT-NeoX's 0.5% slack, rounded up


def test_train_and_valid_data_paths_read_whole_datasets_as_gpt_neox(corpus, tmp_path):
    """GPT-NeoX's train/valid_data_paths (Pythia's configs): every document, maps named train_0 / valid_0, 0.5%
    slack on the samples asked for, and a one-dataset blend that is the identity."""
    ds, _ = corpus
    train, valid = build_path_datasets([ds.prefix], None, [ds.prefix], None, [200, 30, 0], 8, seed=5,
                                       cache_dir=tmp_path)
    doc_idx, sample_idx, shuffle_idx = reference_index_maps(ds.sizes, np.arange(len(ds)), 201, 8, 5)
    np.testing.assert_array_equal(train.datasets[0].shuffle_idx, shuffle_idx)  # ceil(200 x 1.005) = 201 samples
    np.testing.assert_array_equal(train.datasets[0].doc_idx, doc_idx)
    np.testing.assert_array_equal(train.sample_index, np.arange(len(train)))
    assert sorted(p.name for p in tmp_path.glob("*_shuffle_idx.npy")) == [
        "c_train_0_indexmap_201ns_8sl_5s_packedpi_shuffle_idx.npy",
        "c_valid_0_indexmap_31ns_8sl_5s_packedpi_shuffle_idx.npy"]
    stream = np.concatenate([ds[int(d)] for d in doc_idx])
    start = int(shuffle_idx[7])
    (doc_f, off_f) = sample_idx[start]
    offset = sum(len(ds[int(d)]) for d in doc_idx[:doc_f]) + off_f
    np.testing.assert_array_equal(train[7], stream[offset:offset + 9])


def test_blended_split_datasets(corpus, tmp_path):
    ds, _ = corpus
    train, valid, test = build_split_datasets([ds.prefix, ds.prefix], [2.0, 1.0], "90,10,0", [60, 6, 0], 8,
                                              seed=7, cache_dir=tmp_path)
    assert isinstance(train, BlendedDataset) and test is None
    assert len(train) >= 60 and len(valid) >= 6
    assert train[5].shape == (9,) and train[5].dtype == np.int64


def test_batches_from_cached_maps_equal_the_built_ones(corpus, tmp_path):
    ds, _ = corpus
    make = lambda: GlobalBatches(GPTDataset(ds, np.arange(57), 200, 8, 1, cache_dir=tmp_path), 2, 3, 2)  # noqa
    walked = make()  # builds the index maps and writes them to the cache
    assert not isinstance(walked.dataset.shuffle_idx, np.memmap)
    history = [walked.batch(n)["tokens"] for n in range(6)]
    fresh = make()  # a resumed run: reads the cached maps
    assert isinstance(fresh.dataset.shuffle_idx, np.memmap)
    np.testing.assert_array_equal(fresh.batch(5)["tokens"], history[5])
    assert history[5].shape == (2, 6, 9)
    # a process feeding rows 3..6 of each microstep gets exactly those rows
    np.testing.assert_array_equal(fresh.batch(4, 3, 6)["tokens"], history[4][:, 3:6])
    # rows are dealt microstep-major, then rank, then micro batch: row j of microstep k is sample 12n + 6k + j
    np.testing.assert_array_equal(history[2][1, 4], walked.dataset[2 * 12 + 6 + 4])


def test_unpacked_samples_are_whole_documents_in_gpt_neox_order(tmp_path):
    """pack_impl: unpacked: GPT-NeoX's `_build_index_mappings` (transcribed: documents whose labels train nothing
    within seq_length skipped, the rest cycled to num_samples, `shuffle_idx` a seeded shuffle of arange) and a sample
    the document alone, padded with 0 / -100 (GPT-NeoX's reader also appends the next document's first token)."""
    rng = np.random.RandomState(1)
    files = {k: IndexedDatasetWriter(tmp_path / k, np.int32) for k in ("text", "label")}
    docs = [rng.randint(1, 500, rng.randint(2, 14)) for _ in range(23)]
    for d, tokens in enumerate(docs):
        files["text"].add_document(tokens)
        files["label"].add_document(np.full(len(tokens), -100) if d % 5 == 3 else np.where(
            np.arange(len(tokens)) < 2, -100, tokens))
    for f in files.values():
        f.finalize()
    text, labels = IndexedDataset(tmp_path / "text"), IndexedDataset(tmp_path / "label")
    seq, num_samples, seed = 8, 50, 7
    ours = GPTDataset(text, np.arange(23), num_samples, seq, seed, labels=labels, pack_impl="unpacked")
    untrained = sum(not np.any(labels.get(d)[:seq] >= 0) for d in range(23))  # 3, 8, 13, 18 and the 2-token ones
    assert untrained >= 5 and ours.skipped == untrained
    assert skipped_documents(BlendedDataset([ours, ours], [1, 1])) == 2 * untrained

    np_rng = np.random.RandomState(seed=seed)  # GPT-NeoX's, pack_impl == "unpacked"
    shuffle_idx = np.arange(num_samples)
    np_rng.shuffle(shuffle_idx)
    doc_idx, doc_i = [], 0
    while len(doc_idx) <= num_samples:
        if np.all(labels.get(doc_i)[:seq] == -100):
            doc_i = (doc_i + 1) % 23
            continue
        doc_idx.append(doc_i)
        doc_i = (doc_i + 1) % 23
    for i in range(num_samples):
        d = doc_idx[shuffle_idx[i]]
        want = np.zeros((2, seq + 1), np.int64)
        want[1] = -100
        n = min(len(docs[d]), seq + 1)
        want[0, :n], want[1, :n] = docs[d][:n], labels.get(d)[:n]
        np.testing.assert_array_equal(ours[i], want)


def test_pack_until_overflow_packs_whole_documents_in_gpt_neox_order(tmp_path):
    """pack_impl: pack_until_overflow: GPT-NeoX's `_build_index_mappings` (transcribed: a seeded shuffle of the
    samples, then of the documents, reshuffled at each pass; documents whose labels train nothing within
    seq_length + 1 skipped; whole documents until the next would overflow) and each sample its documents
    concatenated, cut or padded (GPT-NeoX's reader also appends the next document's first token)."""
    rng = np.random.RandomState(2)
    files = {k: IndexedDatasetWriter(tmp_path / k, np.int32) for k in ("text", "label")}
    docs = [rng.randint(1, 500, rng.randint(1, 14)) for _ in range(17)]
    for d, tokens in enumerate(docs):
        files["text"].add_document(tokens)
        files["label"].add_document(np.full(len(tokens), -100) if d % 6 == 4 else tokens)
    for f in files.values():
        f.finalize()
    text, labels = IndexedDataset(tmp_path / "text"), IndexedDataset(tmp_path / "label")
    seq, num_samples, seed = 10, 40, 5
    ours = GPTDataset(text, np.arange(17), num_samples, seq, seed, labels=labels, pack_impl="pack_until_overflow")
    assert ours.skipped == 3  # documents 4, 10, 16

    np_rng = np.random.RandomState(seed=seed)  # GPT-NeoX's, packing_impl == "pack_until_overflow"
    shuffle_idx = np.arange(num_samples)
    np_rng.shuffle(shuffle_idx)
    sample_idx, doc_idx = [], []
    temp_shuffle_idx = np.arange(17)
    np_rng.shuffle(temp_shuffle_idx)
    running_length = curr_shuffle_idx = 0
    while len(sample_idx) < num_samples:
        if np.all(labels.get(temp_shuffle_idx[curr_shuffle_idx])[:seq + 1] == -100):
            curr_shuffle_idx += 1
        else:
            doc_length = text.sizes[temp_shuffle_idx[curr_shuffle_idx]]
            if running_length == 0:
                sample_idx.append(len(doc_idx))
                doc_idx.append(temp_shuffle_idx[curr_shuffle_idx])
                running_length += doc_length
            else:
                if running_length + doc_length > seq + 1:
                    running_length = doc_length
                    sample_idx.append(len(doc_idx))
                else:
                    running_length += doc_length
                doc_idx.append(temp_shuffle_idx[curr_shuffle_idx])
            curr_shuffle_idx += 1
        if curr_shuffle_idx == 17:
            curr_shuffle_idx = 0
            np_rng.shuffle(temp_shuffle_idx)
    sample_idx.append(len(doc_idx))
    for i in range(num_samples):
        k = shuffle_idx[i]
        sample = np.concatenate([docs[d] for d in doc_idx[sample_idx[k]:sample_idx[k + 1]]])[:seq + 1]
        want = np.zeros((2, seq + 1), np.int64)
        want[1] = -100
        want[0, :len(sample)] = want[1, :len(sample)] = sample
        np.testing.assert_array_equal(ours[i], want)
    assert any(sample_idx[k + 1] - sample_idx[k] > 1 for k in range(num_samples))  # samples of several documents


def test_kto_rewards_give_each_token_its_documents_reward(tmp_path):
    """A reward file (one integer per document, as GPT-NeoX's chat preprocessing writes it) read in step with the
    tokens: each token of a sample, whichever document it comes from, carries that document's reward, as GPT-NeoX's
    GPT2Dataset repeats it; without a label file the labels are the tokens."""
    rng = np.random.RandomState(0)
    rewards = rng.choice([-1, 1, 3], 40)
    files = {k: IndexedDatasetWriter(tmp_path / k, np.int32) for k in ("text", "reward")}
    for d in range(40):  # document d's tokens are all d + 1, so a token names its document
        files["text"].add_document(np.full(rng.randint(1, 13), d + 1))
        files["reward"].add_document([rewards[d]])
    for f in files.values():
        f.finalize()
    text, reward = IndexedDataset(tmp_path / "text"), IndexedDataset(tmp_path / "reward")
    batches = GlobalBatches(GPTDataset(text, np.arange(40), 30, 8, 1, cache_dir=tmp_path, rewards=reward), 2, 3, 1)
    batch = batches.batch(2)
    assert set(batch) == {"tokens", "labels", "rewards"} and batch["rewards"].shape == (2, 3, 9)
    np.testing.assert_array_equal(batch["labels"], batch["tokens"])
    np.testing.assert_array_equal(batch["rewards"], rewards[batch["tokens"] - 1])
    assert len({len(set(row)) for row in batch["tokens"].reshape(6, 9)} - {1}) > 0  # rows span documents
    files = {k: IndexedDatasetWriter(tmp_path / f"short_{k}", np.int32) for k in ("text", "reward")}
    files["text"].add_document([5, 6])
    files["reward"].add_document([1])
    for f in files.values():
        f.finalize()
    with pytest.raises(ValueError, match="reward file .*short_reward .*1 documents.* does not match"):
        GPTDataset(text, np.arange(40), 30, 8, 1, cache_dir=tmp_path, rewards=IndexedDataset(tmp_path / "short_reward"))


@pytest.mark.parametrize("source, prefix, keys, flags", [
    ("sft.jsonl", "sft", ["messages"], []),
    ("pairs.jsonl", "pairs", ["chosen", "rejected"], ["--only-last"]),
    ("pairs.jsonl", "rm", ["chosen", "rejected"], ["--for-rm"]),
])
def test_chat_preprocessing_writes_the_bytes_gpt_neox_wrote(shared, tmp_path, capsys, source, prefix, keys, flags):
    """The three commands of ../shared/data/neox-post-training/README.md, and their outputs byte for byte."""
    import shutil

    from neox_jax.cli import main as cli

    data = shared / "neox-post-training"
    shutil.copy(shared / "20B_tokenizer.json", tmp_path / "tokenizer.json")
    shutil.copy(data / "tokenizer_config.json", tmp_path)  # its chat template
    assert cli(["preprocess", "--input", str(data / source), "--tokenizer", str(tmp_path / "tokenizer.json"),
                "--output-prefix", str(tmp_path / prefix), "--jsonl-keys", *keys, "--chat", *flags]) == 0
    for key in keys:
        for kind in ("document", "label_document"):
            for ext in ("bin", "idx"):
                name = f"{prefix}_{key}_{kind}.{ext}"
                assert (tmp_path / name).read_bytes() == (data / "out" / name).read_bytes(), name
    assert "chats" in capsys.readouterr().out


def test_prompt_completion_records_train_the_completion_only(shared, tmp_path, capsys):
    """--prompt-completion (TRL's SFT and KTO record form): the prompt's tokens labelled -100, the completion's and a
    closing end-of-text token trained, each text tokenised on its own; with TRL's KTO `label` as the reward."""
    from neox_jax.cli import main as cli

    tok = NeoXTokenizer(shared / "20B_tokenizer.json")
    records = [{"prompt": "Q: what is 2 + 2?\nA:", "completion": " 4", "label": True},
               {"prompt": "Translate 'chat':", "completion": " cat, in English.", "label": False}]
    with open(tmp_path / "pc.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    assert cli(["preprocess", "--input", str(tmp_path / "pc.jsonl"), "--tokenizer", str(shared / "20B_tokenizer.json"),
                "--output-prefix", str(tmp_path / "sft"), "--jsonl-keys", "prompt", "completion",
                "--prompt-completion", "--reward-key", "label", "--binary-reward"]) == 0
    tokens, labels, rewards = (IndexedDataset(tmp_path / f"sft_completion_{k}document") for k in ("", "label_",
                                                                                                 "reward_"))
    eos = tok.tokenizer.token_to_id("<|endoftext|>")
    for i, r in enumerate(records):
        prompt, completion = tok.encode(r["prompt"]), tok.encode(r["completion"])
        assert tokens.get(i).tolist() == prompt + completion + [eos]
        assert labels.get(i).tolist() == [-100] * len(prompt) + completion + [eos]
        assert rewards.get(i).tolist() == [1 if r["label"] else -1]
    assert "2 records" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--prompt-completion reads two keys"):
        cli(["preprocess", "--input", str(tmp_path / "pc.jsonl"), "--tokenizer", str(shared / "20B_tokenizer.json"),
             "--output-prefix", str(tmp_path / "x"), "--jsonl-keys", "prompt", "--prompt-completion"])


def test_chat_preprocessing_writes_kto_rewards(shared, tmp_path, capsys):
    """--reward-key (and --binary-reward), GPT-NeoX's: one int32 per chat beside the token and label files, which
    stay GPT-NeoX's bytes; a fractional reward, which GPT-NeoX's int32 would cut, stops it naming the record."""
    import shutil

    from neox_jax.cli import main as cli

    data = shared / "neox-post-training"
    shutil.copy(shared / "20B_tokenizer.json", tmp_path / "tokenizer.json")
    shutil.copy(data / "tokenizer_config.json", tmp_path)
    records = [json.loads(line) for line in (data / "sft.jsonl").read_text().splitlines() if line.strip()]
    good = [i % 3 != 1 for i in range(len(records))]
    with open(tmp_path / "rated.jsonl", "w") as f:
        for r, g, score in zip(records, good, range(len(records))):
            f.write(json.dumps({**r, "good": g, "score": float(score - 2)}) + "\n")
    common = ["preprocess", "--input", str(tmp_path / "rated.jsonl"), "--tokenizer", str(tmp_path / "tokenizer.json"),
              "--jsonl-keys", "messages", "--chat"]
    assert cli([*common, "--output-prefix", str(tmp_path / "kto"), "--reward-key", "good", "--binary-reward"]) == 0
    for kind in ("document", "label_document"):
        for ext in ("bin", "idx"):
            assert (tmp_path / f"kto_messages_{kind}.{ext}").read_bytes() == (
                data / "out" / f"sft_messages_{kind}.{ext}").read_bytes()
    rewards = IndexedDataset(tmp_path / "kto_messages_reward_document")
    assert rewards.dtype == np.int32 and list(rewards.sizes) == [1] * len(records)
    assert [int(rewards.get(i)[0]) for i in range(len(records))] == [1 if g else -1 for g in good]
    assert cli([*common, "--output-prefix", str(tmp_path / "scored"), "--reward-key", "score"]) == 0
    assert [int(x[0]) for x in IndexedDataset(tmp_path / "scored_messages_reward_document")] == [
        s - 2 for s in range(len(records))]
    with open(tmp_path / "rated.jsonl", "a") as f:
        f.write(json.dumps({**records[0], "score": 0.5}) + "\n")
    capsys.readouterr()
    assert cli([*common, "--output-prefix", str(tmp_path / "half"), "--reward-key", "score"]) == 1
    assert f"rated.jsonl:{len(records) + 1}: reward 0.5 under 'score' is not a whole number" in capsys.readouterr().err
    assert not list(tmp_path.glob("half*"))


def test_chat_preprocessing_without_a_template_or_with_a_bad_chat_says_so(shared, tmp_path, capsys):
    from neox_jax.cli import main as cli

    (tmp_path / "chats.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": "hi"}\n')
    args = ["preprocess", "--input", str(tmp_path / "chats.jsonl"), "--output-prefix", str(tmp_path / "out"), "--chat",
            "--jsonl-keys", "messages"]
    assert cli([*args, "--tokenizer", str(shared / "20B_tokenizer.json")]) == 2
    assert "has no chat template (tokenizer_config.json's chat_template): give one with --chat-template FILE" in \
        capsys.readouterr().err
    (tmp_path / "t.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert cli([*args, "--tokenizer", str(shared / "20B_tokenizer.json"), "--chat-template",
                str(tmp_path / "t.jinja")]) == 1
    assert f"{tmp_path / 'chats.jsonl'}:2: key 'messages' is not a chat" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chats.jsonl", "t.jinja"]
