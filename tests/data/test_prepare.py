"""The prepare step and its reader: decoded documents equal the inputs, the output bytes do
not depend on the worker count, an interrupted run resumes to the same bytes, and a
directory that does not match its manifest is refused naming the file."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from data_corpus import EOT, bpe_tokenizer, documents, wordlevel_tokenizer, write_jsonl

import foldmesh.data.prepare as prep
from foldmesh.data import DataError, TokenDataset, load_tokenizer, verify
from foldmesh.data.__main__ import main as data_main
from foldmesh.data.prepare import prepare

DOCS = documents(60)


@pytest.fixture(scope="module")
def tok_file(tmp_path_factory):
    return bpe_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json")


@pytest.fixture
def corpus(tmp_path):
    """Inputs of every kind (JSON Lines, a text file, Parquet when pyarrow is there) and
    the documents they hold, in order."""
    root = tmp_path / "corpus"
    root.mkdir()
    files = [write_jsonl(root / "a.jsonl", DOCS[:25])]
    (root / "b.txt").write_bytes(DOCS[25].encode())
    files.append(root / "b.txt")
    try:
        from data_corpus import write_parquet
        files.append(write_parquet(root / "c.parquet", DOCS[26:50]))
        docs = DOCS[:50]
    except ImportError:
        docs = DOCS[:26]
    files.append(write_jsonl(root / "d.jsonl", DOCS[50:]))
    return files, docs + DOCS[50:]


def _outputs(path):
    """Every file of a prepared directory and its bytes."""
    return {f.name: f.read_bytes() for f in sorted(path.iterdir())}


def test_decoded_documents_equal_the_inputs(tmp_path, tok_file, corpus):
    files, docs = corpus
    m = prepare(tok_file, files, tmp_path / "out", workers=1, progress=False)
    ds = TokenDataset(tmp_path / "out")
    tok = load_tokenizer(tok_file)
    assert (ds.num_documents, ds.dtype, ds.eos_id, ds.vocab_size) == (
        len(docs), "uint16", tok.eos_id, tok.vocab_size)
    assert m["tokenizer"]["sha256"] == tok.sha256 and m["tokenizer"]["eos_token"] == EOT
    for i, text in enumerate(docs):
        ids = ds.document(i)
        assert ids.dtype == np.uint16 and ids[-1] == ds.eos_id and ds.eos_id not in ids[:-1]
        assert tok.decode(ids[:-1]) == text
    whole = np.concatenate([ds.document(i) for i in range(ds.num_documents)])
    assert len(whole) == ds.num_tokens == len(ds)
    edge = m["shards"][0]["tokens"]  # slices across a shard boundary join the pieces
    assert np.array_equal(ds[edge - 5:edge + 7], whole[edge - 5:edge + 7])
    assert np.array_equal(ds.read(3, 50), whole[3:53].astype(np.int64))
    assert np.array_equal(ds[:], whole) and len(ds[10:4]) == 0
    assert list(ds.document_lengths) == [len(ds.document(i)) for i in range(len(docs))]


def test_text_field_and_byte_level(tmp_path):
    f = write_jsonl(tmp_path / "a.jsonl", DOCS, field="content")
    prepare("bytes", [f], tmp_path / "out", text_field="content", progress=False)
    ds = TokenDataset(tmp_path / "out")
    assert (ds.vocab_size, ds.eos_id) == (256, 0)
    assert [ds.document(i)[:-1].astype(np.uint8).tobytes().decode()
            for i in range(ds.num_documents)] == DOCS
    # The shards are also plain token files of the trainer's data.source = "tokens".
    from foldmesh.train._sources import token_stream

    stream = token_stream(str(tmp_path / "out"), ds.dtype)
    assert np.array_equal(stream.read(0, len(stream)), ds.read(0, len(ds)))
    # ... and the dataset is a stream for the trainer's sampling with replacement.
    from foldmesh.train.data import TokenBatches

    windows = TokenBatches(ds, 0, len(ds), "train", seq_len=9, global_batch=4, seed=0)
    for s, row in zip(windows.starts(3).tolist(), windows.batch(3), strict=True):
        assert row.tolist() == ds.read(s, 10).tolist()


def test_large_vocabulary_uses_uint32(tmp_path):
    tok = wordlevel_tokenizer(tmp_path / "tokenizer.json", vocab_size=70_000)
    docs = ["w1 w69998 w65536", "w70 w0"]
    prepare(tok, [write_jsonl(tmp_path / "a.jsonl", docs)], tmp_path / "out", progress=False)
    ds = TokenDataset(tmp_path / "out")
    assert ds.dtype == "uint32" and ds.eos_id == 69_999
    assert ds.document(0).tolist() == [1, 69_998, 65_536, 69_999]
    assert ds.document(1).tolist() == [70, 0, 69_999]


def test_worker_count_does_not_change_the_bytes(tmp_path, tok_file, corpus, monkeypatch):
    files, _ = corpus
    monkeypatch.setattr(prep, "_BATCH_DOCS", 3)  # many small tasks, finishing out of order
    outs = {}
    for workers in (1, 2, 3):
        prepare(tok_file, files, tmp_path / f"w{workers}", workers=workers,
                progress=False)
        outs[workers] = _outputs(tmp_path / f"w{workers}")
    assert outs[1] == outs[2] == outs[3]


def test_interrupted_prepare_resumes_to_the_same_bytes(tmp_path, tok_file, corpus,
                                                       monkeypatch):
    files, _ = corpus
    prepare(tok_file, files, tmp_path / "clean", workers=1, progress=False)
    out = tmp_path / "out"
    encode, calls = prep.encode_documents, []

    def dies_in_the_third_file(tokenizer, texts, dtype):
        calls.append(len(texts))
        if len(calls) == 6:  # tasks of 10, 10, 5 documents; 1; then the third file's 2nd
            raise KeyboardInterrupt
        return encode(tokenizer, texts, dtype)

    monkeypatch.setattr(prep, "_BATCH_DOCS", 10)
    monkeypatch.setattr(prep, "encode_documents", dies_in_the_third_file)
    with pytest.raises(KeyboardInterrupt):
        prepare(tok_file, files, out, workers=1, progress=False)
    assert calls[:4] == [10, 10, 5, 1]
    assert not (out / "MANIFEST.json").exists()
    assert (out / "00000.json").exists() and (out / "00001.json").exists()
    assert (out / "00002.bin.tmp").stat().st_size > 0 and not (out / "00002.json").exists()
    first = (out / "00000.bin").stat().st_mtime_ns
    (out / "00003.idx.tmp").write_bytes(b"junk of an older run")
    (out / "00017.bin").write_bytes(b"a shard of an input no longer given")

    monkeypatch.setattr(prep, "encode_documents", encode)
    prepare(tok_file, files, out, workers=1, progress=False)
    assert _outputs(out) == _outputs(tmp_path / "clean")  # no .tmp or stale shard left
    assert (out / "00000.bin").stat().st_mtime_ns == first  # the finished shard was kept
    verify(out, checksums=True)


def test_changed_input_is_refused_then_redone(tmp_path, tok_file, corpus):
    files, _ = corpus
    out = tmp_path / "out"
    prepare(tok_file, files, out, workers=1, progress=False)
    kept = {f: (out / f).stat().st_mtime_ns for f in ("00000.bin", "00001.bin")}
    with open(files[-1], "a") as f:
        f.write(json.dumps({"text": "one more document"}) + "\n")
    with pytest.raises(DataError, match=rf"input {files[-1]} changed since {out} was prepared"
                                        r".*rerun python -m foldmesh.data.prepare"):
        verify(out)
    TokenDataset(out)  # opening does not look at the inputs (they may be elsewhere)
    with pytest.raises(DataError, match="d.jsonl changed"):
        TokenDataset(out, check_inputs=True)
    prepare(tok_file, files, out, workers=1, progress=False)
    verify(out)
    assert {f: (out / f).stat().st_mtime_ns for f in kept} == kept
    ds = TokenDataset(out)
    last = ds.document(ds.num_documents - 1)[:-1]
    assert load_tokenizer(tok_file).decode(last) == "one more document"


def test_damaged_directory_is_refused_naming_the_file(tmp_path, tok_file, corpus):
    files, _ = corpus
    out = tmp_path / "out"
    prepare(tok_file, files, out, workers=1, progress=False)
    TokenDataset(out)
    data = (out / "00001.bin").read_bytes()
    (out / "00001.bin").write_bytes(data[:-2])
    for check in (lambda: TokenDataset(out), lambda: verify(out)):
        with pytest.raises(DataError, match=r"00001.bin has \d+ bytes, the manifest says \d+ "
                                            r"\(\d+ uint16 tokens\): the file is truncated"):
            check()
    (out / "00001.bin").write_bytes(data[:-2] + bytes([data[-2] ^ 1, data[-1]]))
    verify(out)  # same size: only the checksums see it
    with pytest.raises(DataError, match=r"00001.bin does not match its sha256"):
        verify(out, checksums=True)
    (out / "00001.bin").write_bytes(data)
    index = np.fromfile(out / "00000.idx", dtype="<i8")
    index[-1] -= 1
    index.tofile(out / "00000.idx")
    with pytest.raises(DataError, match=r"00000.idx does not end at the shard's \d+ tokens"):
        TokenDataset(out)
    index[-1] += 1
    index.tofile(out / "00000.idx")
    (out / "00002.idx").unlink()
    with pytest.raises(DataError, match=r"00002.idx is missing"):
        verify(out)
    (out / "MANIFEST.json").unlink()
    with pytest.raises(DataError, match=r"has no MANIFEST.json: its prepare did not finish; "
                                        r"rerun python -m foldmesh.data.prepare with --out"):
        TokenDataset(out)


def test_bad_inputs_are_refused_before_writing(tmp_path, tok_file):
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"missing.jsonl does not exist: fix --input"):
        prepare(tok_file, [tmp_path / "missing.jsonl"], out, progress=False)
    with pytest.raises(DataError, match=r"nope does not exist: point the tokenizer"):
        prepare(tmp_path / "nope", [tok_file], out, progress=False)
    assert not out.exists()
    (tmp_path / "e.jsonl").write_text('{"text": ""}\n\n')
    with pytest.raises(DataError, match=r"the corpus is empty"):
        prepare(tok_file, [tmp_path / "e.jsonl"], out, progress=False)
    assert not (out / "MANIFEST.json").exists()
    with pytest.raises(DataError, match=r"--workers = 0 must be at least 1"):
        prepare(tok_file, [tmp_path / "e.jsonl"], out, workers=0)


def test_command_line(tmp_path, tok_file, corpus, capsys):
    files, docs = corpus
    out = tmp_path / "out"
    args = ["--tokenizer", str(tok_file), "--out", str(out), "--no-progress", "--input"]
    assert prep.main(args + [str(f) for f in files]) == 0
    assert f"{len(docs)} documents" in capsys.readouterr().out
    assert data_main(["verify", str(out), "--checksums"]) == 0
    assert "ok" in capsys.readouterr().out
    assert prep.main(args + [str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt does not exist" in capsys.readouterr().err
    (out / "00000.idx").unlink()
    assert data_main(["verify", str(out)]) == 2
    assert "00000.idx is missing" in capsys.readouterr().err


def test_module_runs_as_a_script(tmp_path, corpus):
    files, _ = corpus
    env = {**os.environ, "PYTHONWARNINGS": "error::RuntimeWarning"}  # runpy's double import
    run = subprocess.run([sys.executable, "-m", "foldmesh.data.prepare", "--tokenizer",
                          "bytes", "--input", str(files[0]), "--out", str(tmp_path / "out"),
                          "--workers", "2"], capture_output=True, text=True, env=env,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert "25 documents" in run.stdout and "tokenizing" in run.stderr  # the progress bar
