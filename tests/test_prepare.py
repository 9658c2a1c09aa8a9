"""The prepare command (``osdn_jax.train.prepare``) and the ``shards`` source it feeds: Parquet / JSONL /
text in, tokenized shards and one index out; the same tokens and packed rows as the ``jsonl`` source;
resume after a kill; one-line errors for bad input; two processes reading disjoint rows; uint16 and
uint32 shards. Parquet files are written here with pyarrow, nothing is downloaded."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from osdn_jax.train import data as data_lib, shards
from osdn_jax.train.data import DataConfig, build_tokenizer, make_eval_batches, make_train_iterator
from osdn_jax.train.prepare import PrepareConfig, main, prepare
from osdn_jax.train.tokenizer import ByteTokenizer, TiktokenTokenizer, load_tokenizer, train_bpe

BYTE = ByteTokenizer()


def corpus_docs(n: int = 300, seed: int = 0) -> list[str]:
    """Documents of varied length (some longer than a row), a few blank ones that every reader drops."""
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "ε", "ζῆτα", "rule", "state", "key", "value"]
    docs = [" ".join(rng.choice(words, size=int(rng.integers(1, 60)))) + f" #{i}" for i in range(n)]
    docs[7] = "   "
    docs[100] = ""
    return docs


def write_parquet(folder: Path, docs: list[str], files: int = 3, row_group: int = 25) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, part in enumerate(np.array_split(np.arange(len(docs)), files)):
        table = pa.table({"id": [int(j) for j in part], "text": [docs[j] for j in part]})
        pq.write_table(table, folder / f"part-{i:02d}.parquet", row_group_size=row_group)
    return folder


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: d}) + "\n" for d in docs))
    return path


def take(it, n):
    return [next(it) for _ in range(n)]


def same_batches(a, b) -> bool:
    return len(a) == len(b) and all(all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def docs():
    return corpus_docs()


@pytest.fixture(scope="module")
def parquet_corpus(tmp_path_factory, docs):
    return write_parquet(tmp_path_factory.mktemp("pq") / "corpus", docs)


def _prepare(corpus, out, **kw) -> dict:
    kw = {"workers": 1, "unit_bytes": 2000, **kw}
    return prepare(PrepareConfig(str(corpus), str(out), **kw), progress=False)


def _folder_bytes(out: Path) -> dict[str, bytes]:
    """Every file the index uses, as bytes (records hold timings-free data only)."""
    index = json.loads((out / shards.INDEX_FILE).read_text())
    files = [out / shards.DOCUMENTS_FILE, out / shards.HELDOUT_FILE, out / "tokenizer.json"]
    files += [out / shards.SHARD_DIR / f"{s['name']}.bin" for s in index["shards"]]
    return {f.name: f.read_bytes() for f in files} | {"index": json.dumps(index, sort_keys=True).encode()}


# -- the prepared folder against the jsonl source ----------------------------------------------------

@pytest.mark.parametrize("workers", [1, 2])
def test_shards_give_the_jsonl_sources_tokens_and_rows(tmp_path, docs, parquet_corpus, workers):
    summary = _prepare(parquet_corpus, tmp_path / "out", workers=workers)
    assert len(summary["shards"]) > 3  # row groups cut into several units per file
    kept = [d for d in docs if d.strip()]
    assert summary["num_documents"] == len(kept) and summary["num_tokens"] == sum(len(d.encode()) for d in kept)
    assert summary["dtype"] == "uint16" and summary["tokens_per_s"] > 0

    shard_cfg = DataConfig(source="shards", path=str(tmp_path / "out"), seq_len=32, batch_size=4)
    json_cfg = DataConfig(source="jsonl", path=str(write_jsonl(tmp_path / "c.jsonl", docs)), seq_len=32,
                          batch_size=4)
    tok = build_tokenizer(shard_cfg)
    assert tok.fingerprint == BYTE.fingerprint
    prepared, from_json = data_lib.load_documents(shard_cfg, tok), data_lib.load_documents(json_cfg, tok)
    assert len(prepared) == len(from_json)
    for i in range(len(prepared)):
        np.testing.assert_array_equal(prepared.tokens(i), from_json.tokens(i))
    assert same_batches(take(make_train_iterator(shard_cfg, tok), 6), take(make_train_iterator(json_cfg, tok), 6))
    assert same_batches(make_eval_batches(shard_cfg, tok), make_eval_batches(json_cfg, tok))
    # each shard is also a plain `bin` token file
    bin_cfg = DataConfig(source="bin", path=str(tmp_path / "out" / "shards"), seq_len=32, batch_size=4)
    assert same_batches(take(make_train_iterator(bin_cfg, tok), 3), take(make_train_iterator(json_cfg, tok), 3))


def test_bpe_is_recorded_and_training_must_name_it(tmp_path, docs, parquet_corpus):
    out = tmp_path / "out"
    _prepare(parquet_corpus, out, tokenizer="bpe", bpe_vocab_size=300, workers=2)
    tok = load_tokenizer(out)
    kept = [d for d in docs if d.strip()]
    train_ids, _ = data_lib.split_documents(len(kept), 0.05)
    assert tok.fingerprint == train_bpe((kept[i] for i in train_ids), 300).fingerprint  # the training split
    cfg = DataConfig(source="shards", path=str(out), tokenizer="bpe", seq_len=32, batch_size=4)
    prepared = data_lib.load_documents(cfg, build_tokenizer(cfg))
    np.testing.assert_array_equal(prepared.tokens(3), tok.encode(kept[3]))
    with pytest.raises(ValueError, match=r"DataConfig.tokenizer is 'byte' but the prepared folder .* holds a 'bpe' "
                                         r"tokenizer; pass --data.tokenizer bpe"):
        build_tokenizer(dataclasses.replace(cfg, tokenizer="byte"))
    other = tmp_path / "other"
    other.mkdir()
    (other / "tokenizer.json").write_text(json.dumps(BYTE.to_dict()))
    with pytest.raises(ValueError, match="DataConfig.tokenizer: DataConfig.tokenizer_path .* holds a byte tokenizer"):
        build_tokenizer(dataclasses.replace(cfg, tokenizer_path=str(other)))
    with pytest.raises(ValueError, match=r"DataConfig.eval_fraction is 0.1 but the prepared folder .* holds out 0.05"):
        make_train_iterator(dataclasses.replace(cfg, eval_fraction=0.1), tok)


def test_a_tokenizer_mismatch_stops_training_before_it_writes(tmp_path, parquet_corpus):
    from osdn_jax.train.config import parse_args
    from osdn_jax.train.loop import train

    _prepare(parquet_corpus, tmp_path / "out")
    cfg = parse_args(["--run-dir", str(tmp_path / "run"), "--data.source", "shards", "--data.path",
                      str(tmp_path / "out"), "--data.tokenizer", "tiktoken"])
    with pytest.raises(ValueError, match="holds a 'byte' tokenizer"):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_hugging_face_tokenizer_json_with_its_eos(tmp_path, docs, parquet_corpus):
    from tokenizers import Tokenizer as HfTokenizer

    hf = HfTokenizer.from_str(train_bpe(docs, 300).hf_json())
    hf.add_special_tokens(["</s>"])  # a model whose end-of-text token is </s>, as fla's Llama ones
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "tokenizer.json").write_text(hf.to_str())
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "</s>"}}))
    summary = _prepare(parquet_corpus, tmp_path / "out", tokenizer_path=str(tmp_path / "hf" / "tokenizer.json"))
    tok = load_tokenizer(tmp_path / "out")
    assert summary["tokenizer"]["kind"] == "bpe" and summary["eos_id"] == tok.eos_id == hf.token_to_id("</s>") == 300
    table = np.load(tmp_path / "out" / shards.DOCUMENTS_FILE)
    first = np.memmap(tmp_path / "out" / "shards" / f"{summary['shards'][0]['name']}.bin", np.uint16, mode="r")
    assert first[table[0, 2]] == tok.eos_id  # EOS after each document


@pytest.mark.parametrize("encoding,dtype", [("cl100k_base", "uint32")])
def test_uint16_and_uint32_shards(tmp_path, docs, encoding, dtype):
    corpus = write_jsonl(tmp_path / "c.jsonl", docs[:40])
    small = _prepare(corpus, tmp_path / "byte")
    assert small["dtype"] == "uint16" and (tmp_path / "byte" / "shards" / "00000.bin").stat().st_size == \
        2 * small["shards"][0]["length"]
    big = _prepare(corpus, tmp_path / "tt", tokenizer="tiktoken", tiktoken_encoding=encoding)
    tok = TiktokenTokenizer(encoding)
    assert big["dtype"] == dtype and tok.vocab_size > 2**16
    assert (tmp_path / "tt" / "shards" / "00000.bin").stat().st_size == 4 * big["shards"][0]["length"]
    cfg = DataConfig(source="shards", path=str(tmp_path / "tt"), tokenizer="tiktoken", seq_len=32, batch_size=2)
    prepared = data_lib.load_documents(cfg, build_tokenizer(cfg))
    kept = [d for d in docs[:40] if d.strip()]
    for i in range(len(kept)):
        np.testing.assert_array_equal(prepared.tokens(i), tok.encode(kept[i]))
    assert np.memmap(tmp_path / "tt" / "shards" / "00000.bin", np.uint32, mode="r")[-1] == tok.eos_id > 2**16


def test_text_and_gzip_inputs(tmp_path):
    import gzip

    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "a.txt").write_text("one\ntwo\n\n\nthree\r\n")
    with gzip.open(tmp_path / "t" / "b.txt.gz", "wt") as f:
        f.write("four\n \nfive")
    summary = _prepare(tmp_path / "t", tmp_path / "out", eval_fraction=0.0)
    cfg = DataConfig(source="shards", path=str(tmp_path / "out"), eval_fraction=0.0)
    prepared = data_lib.load_documents(cfg, BYTE)
    assert [BYTE.decode(prepared.tokens(i)) for i in range(len(prepared))] == ["one\ntwo", "three", "four", "five"]
    assert summary["heldout_documents"] == 0


def test_max_tokens_keeps_the_first_documents(tmp_path, docs, parquet_corpus):
    kept = [d for d in docs if d.strip()]
    lengths = np.cumsum([len(d.encode()) for d in kept])
    records = lambda: [json.loads(p.read_text()) for p in (tmp_path / "out" / "shards").glob("*.json")]  # noqa: E731
    tiny = _prepare(parquet_corpus, tmp_path / "out", max_tokens=100)
    assert tiny["num_documents"] == int(np.searchsorted(lengths, 100)) + 1
    assert [r["truncated"] for r in records()] == [True]  # one unit, stopped once it held 100 tokens
    summary = _prepare(parquet_corpus, tmp_path / "out", max_tokens=8000)
    n = int(np.searchsorted(lengths, 8000)) + 1
    assert summary["num_documents"] == n and summary["num_tokens"] == lengths[n - 1] >= 8000
    assert summary["units_reused"] == 0  # the stopped unit is made again
    assert 1 < len(records()) < summary["units"]  # units past the cut were never tokenized
    assert not any(r["truncated"] for r in records())
    # a larger cut reuses the shards made so far
    again = _prepare(parquet_corpus, tmp_path / "out", max_tokens=20000)
    assert again["units_reused"] == summary["units_reused"] + len(summary["shards"]) and again["num_tokens"] >= 20000
    full = _prepare(parquet_corpus, tmp_path / "all")
    assert full["num_documents"] == len(kept)
    table = np.load(tmp_path / "out" / shards.DOCUMENTS_FILE)
    np.testing.assert_array_equal(table, np.load(tmp_path / "all" / shards.DOCUMENTS_FILE)[: len(table)])


# -- resume ------------------------------------------------------------------------------------------

def test_rerun_keeps_finished_shards_and_redoes_the_rest(tmp_path, parquet_corpus):
    out = tmp_path / "out"
    clean = _prepare(parquet_corpus, out)
    reference = _folder_bytes(out)
    names = [s["name"] for s in clean["shards"]]
    # what a kill leaves: the index gone, one shard without its record, one half-written temporary
    (out / shards.INDEX_FILE).unlink()
    (out / "shards" / f"{names[1]}.json").unlink()
    (out / "shards" / f"{names[2]}.bin").rename(out / "shards" / f"{names[2]}.bin.tmp")
    (out / "shards" / f"{names[2]}.json").unlink()
    kept_mtime = (out / "shards" / f"{names[0]}.bin").stat().st_mtime_ns
    with pytest.raises(ValueError, match="has no index.json.*has not finished"):
        data_lib.load_documents(DataConfig(source="shards", path=str(out)), BYTE)
    again = _prepare(parquet_corpus, out)
    assert again["units_reused"] == len(names) - 2
    assert (out / "shards" / f"{names[0]}.bin").stat().st_mtime_ns == kept_mtime
    assert not list((out / "shards").glob("*.tmp"))
    assert _folder_bytes(out) == reference
    # other settings in the same folder are refused, nothing is deleted
    with pytest.raises(ValueError, match=r"out: .* was prepared with other settings \(tokenizer: .*use another --out"):
        _prepare(parquet_corpus, out, tokenizer="tiktoken")
    assert _folder_bytes(out) == reference


def test_a_killed_prepare_resumes(tmp_path, docs):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(12):
        write_jsonl(corpus / f"{i:02d}.jsonl", docs * 3)
    _prepare(corpus, tmp_path / "clean")
    cmd = [sys.executable, "-m", "osdn_jax.train.prepare", str(corpus), "--out", str(tmp_path / "out"),
           "--workers", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not list((tmp_path / "out" / "shards").glob("*.json")) and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "out" / shards.INDEX_FILE).exists()
    done = len(list((tmp_path / "out" / "shards").glob("*.json")))
    assert 1 <= done < 12
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"{done} of 12 units reused" in again.stdout
    assert _folder_bytes(tmp_path / "out") == _folder_bytes(tmp_path / "clean")


# -- bad input: one line naming the file, and nothing that looks finished --------------------------

def _fails(capsys, corpus, out, *flags) -> str:
    with pytest.raises(SystemExit) as e:
        main([str(corpus), "--out", str(out), "--workers", "1", "--no-progress", *flags])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert not (Path(out) / shards.INDEX_FILE).exists()
    return err


def test_bad_inputs_fail_with_one_line(tmp_path, capsys, docs):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 this is not parquet")
    assert f"{bad} is not a readable Parquet file" in _fails(capsys, bad, tmp_path / "o1")

    pq_dir = write_parquet(tmp_path / "pq", docs[:50], files=1)
    err = _fails(capsys, pq_dir, tmp_path / "o2", "--text-column", "body")
    assert "text_column:" in err and "part-00.parquet has no column 'body' (columns: id, text)" in err

    pq.write_table(pa.table({"text": [b"fine", b"\xff\xfe broken"]}), tmp_path / "bin.parquet")
    err = _fails(capsys, tmp_path / "bin.parquet", tmp_path / "o3")
    assert "bin.parquet row group 0 row 1 is not UTF-8 text" in err

    (tmp_path / "j").mkdir()
    write_jsonl(tmp_path / "j" / "a.jsonl", docs[:20])
    (tmp_path / "j" / "b.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "ok"}\n{"text": "\xff"}\n')
    err = _fails(capsys, tmp_path / "j", tmp_path / "o4")
    assert "b.jsonl:3 is not UTF-8 text" in err
    records = sorted(p.name for p in (tmp_path / "o4" / "shards").glob("*.json"))
    assert "00001.json" not in records  # the failed file's shard does not look finished

    (tmp_path / "j" / "b.jsonl").write_text('{"text": "ok"}\n{"body": "x"}\n')
    assert "b.jsonl:2 has no field 'text'" in _fails(capsys, tmp_path / "j", tmp_path / "o5")

    write_jsonl(tmp_path / "empty.jsonl", ["", "  ", "\n"])
    assert "holds no documents" in _fails(capsys, tmp_path / "empty.jsonl", tmp_path / "o6")

    (tmp_path / "none").mkdir()
    assert "holds no Parquet / JSONL / text files" in _fails(capsys, tmp_path / "none", tmp_path / "o7")
    assert "--eval-fraction: expected a number in [0, 1), got 1.5" in _fails(
        capsys, tmp_path / "j", tmp_path / "o8", "--eval-fraction", "1.5")


def test_a_failing_worker_stops_the_pool(tmp_path, capsys, docs):
    (tmp_path / "j").mkdir()
    for i in range(4):
        write_jsonl(tmp_path / "j" / f"{i}.jsonl", docs)
    (tmp_path / "j" / "2.jsonl").write_text("not json\n")
    err = _fails(capsys, tmp_path / "j", tmp_path / "out", "--workers", "2")
    assert "2.jsonl:1 is not valid JSON" in err
    assert not (tmp_path / "out" / "shards" / "00002.json").exists()


# -- several processes ---------------------------------------------------------------------------------

_READER = textwrap.dedent("""
    import json, sys
    import numpy as np
    from osdn_jax.train import data as data_lib, sources
    folder, split, pi, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    read = []
    gather = sources.Documents.gather
    sources.Documents.gather = lambda self, p: (read.append(len(p)), gather(self, p))[1]
    cfg = data_lib.DataConfig(source="shards", path=folder, seq_len=32, batch_size=8)
    it, ev = data_lib.make_process_data(cfg, data_lib.build_tokenizer(cfg), split, 2, pi, 2)
    batches = [next(it) for _ in range(3)]
    real = sum(int((b["segment_ids"] > 0).sum()) + len(b["segment_ids"]) for b in batches + ev)  # + each row's last target
    np.savez(out, *[b[k] for b in batches for k in sorted(b)], read=np.array(sum(read)), real=real)
""")


def test_two_processes_read_disjoint_rows_of_the_global_batch(tmp_path, parquet_corpus):
    _prepare(parquet_corpus, tmp_path / "out")
    script = tmp_path / "reader.py"
    script.write_text(_READER)
    for split in ("rows", "documents"):
        procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / "out"), split, str(i),
                                   str(tmp_path / f"{split}{i}.npz")], stderr=subprocess.PIPE, text=True)
                 for i in range(2)]
        for p in procs:
            assert p.wait(timeout=300) == 0, p.stderr.read()
    cfg = DataConfig(source="shards", path=str(tmp_path / "out"), seq_len=32, batch_size=8)
    glob = take(make_train_iterator(cfg, BYTE), 3)
    keys = sorted(glob[0])
    for split in ("rows", "documents"):
        parts = [np.load(tmp_path / f"{split}{i}.npz") for i in range(2)]
        for p in parts:  # each process read only the tokens of its own rows (the last target aside)
            assert 0 < int(p["read"]) <= int(p["real"])  # appended EOS ids are not read
        for b in range(3):
            mine = [{k: p[f"arr_{b * len(keys) + j}"] for j, k in enumerate(keys)} for p in parts]
            assert all(m["inputs"].shape == (4, 32) for m in mine)
            if split == "rows":  # the union is the one-process global batch
                for k in keys:
                    np.testing.assert_array_equal(np.concatenate([m[k] for m in mine]), glob[b][k])
    # documents: each process packs its own documents (data.shard_documents), so their rows differ
    firsts = [np.load(tmp_path / f"documents{i}.npz")["arr_0"] for i in range(2)]
    assert not np.array_equal(firsts[0], firsts[1])


def test_ppl_reads_a_prepared_folder(tmp_path, parquet_corpus):
    from osdn_jax.train import perplexity

    _prepare(parquet_corpus, tmp_path / "out")
    assert perplexity.infer_source(tmp_path / "out") == "shards"
    cfg = DataConfig(source="shards", path=str(tmp_path / "out"), seq_len=32, batch_size=4)
    docs_all, targets = perplexity.count_targets(cfg, BYTE)
    _, held = data_lib.prepared_split(cfg)
    docs_held, _ = perplexity.count_targets(cfg, BYTE, held)
    assert docs_all > docs_held == len(held) > 0 and targets > 0
    assert os.path.getsize(tmp_path / "out" / shards.HELDOUT_FILE) < 1000


def test_the_shards_iterator_resumes_exactly(tmp_path, parquet_corpus):
    _prepare(parquet_corpus, tmp_path / "out")
    cfg = DataConfig(source="shards", path=str(tmp_path / "out"), seq_len=32, batch_size=4)
    it = make_train_iterator(cfg, BYTE)
    take(it, 5)
    state = it.get_state()
    expected = take(it, 4)
    fresh = make_train_iterator(cfg, BYTE)
    fresh.set_state(state)
    assert same_batches(take(fresh, 4), expected)
    rows = make_train_iterator(cfg, BYTE, rows=slice(2, 4))  # a process's rows resume the same way
    take(rows, 5)
    rows_state = rows.get_state()
    assert rows_state == state
    assert same_batches(take(rows, 4), [{k: v[2:4] for k, v in b.items()} for b in expected])
