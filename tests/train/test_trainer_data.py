"""The trainer on real corpora: a tokenizer built here, JSON Lines and Parquet documents,
``python -m foldmesh.data.prepare``, packed epochs; the same losses on two folds and world
sizes, a bitwise resume, ``model.hf_path``'s tokenizer by default, and bad corpora refused
before any process group exists.
"""

import json
import shutil
import subprocess
import sys

import pytest
from test_trainer import launch, losses

from foldmesh.data import TokenDataset

WORDS = ["the", "fold", "mesh", "expert", "token", "über", "naïve", "route", "\n", "data"]


def documents(n):
    import numpy as np

    rng = np.random.default_rng(0)
    return [f"doc {i}: " + " ".join(WORDS[j] for j in rng.integers(0, len(WORDS),
                                                                    int(rng.integers(40, 160))))
            for i in range(n)]


def bpe_tokenizer(path):
    """A byte-level BPE of about 300 ids trained here on the documents (nothing downloaded)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(documents(60), trainer)
    tok.save(str(path))
    return path


# the demo's model with a vocabulary that holds the tokenizer's ids, 2 layers, 2 micro-batches
MODEL = ["--model.overrides.vocab_size", "320", "--data.seq_len", "32",
         "--training.micro_batch", "2"]
FOLD8 = ["--fold.tp", "2", "--fold.cp", "2", "--fold.ep", "4", "--fold.etp", "2"]
FOLD4 = ["--fold.tp", "1", "--fold.cp", "1", "--fold.ep", "4", "--fold.etp", "1"]
RUN = ["--training.deterministic", "true", "--training.steps", "6", "--checkpoint.every", "3"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    tok = bpe_tokenizer(root / "tokenizer.json")
    docs = documents(120)
    (root / "text").mkdir()
    with open(root / "text" / "a.jsonl", "w", encoding="utf-8") as f:
        for d in docs[:80]:
            f.write(json.dumps({"text": d}) + "\n")
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.table({"text": docs[80:]}), root / "text" / "b.parquet")
    out = root / "prepared"
    subprocess.run([sys.executable, "-m", "foldmesh.data.prepare", "--tokenizer", str(tok),
                    "--input", str(root / "text"), "--out", str(out), "--no-progress"],
                   check=True, timeout=300)
    return root, docs


@pytest.fixture(scope="module")
def run8(corpus, tmp_path_factory):
    root, _ = corpus
    run = tmp_path_factory.mktemp("run8")
    launch(8, run, *MODEL, *FOLD8, *RUN, "--data.source", "prepared",
           "--data.path", str(root / "prepared"))
    return run


def test_prepared_documents_decode_to_the_inputs(corpus):
    from tokenizers import Tokenizer

    root, docs = corpus
    ds = TokenDataset(root / "prepared")
    tok = Tokenizer.from_file(str(root / "tokenizer.json"))
    got = [tok.decode(ds.document(i)[:-1].tolist()) for i in range(ds.num_documents)]
    assert got == docs  # the JSON Lines file, then the Parquet file, in order


def test_the_same_losses_on_another_fold_and_world(corpus, run8, tmp_path):
    root, _ = corpus
    run = tmp_path / "run4"
    launch(4, run, *MODEL, *FOLD4, *RUN, "--data.source", "prepared",
           "--data.path", str(root / "prepared"))
    want, got = losses(run8), losses(run)
    assert sorted(got) == list(range(1, 7))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-4), step


def test_stop_and_resume_continues_the_epochs_bitwise(corpus, run8, tmp_path):
    root, _ = corpus
    run = tmp_path / "resumed"
    args = [*MODEL, *FOLD8, *RUN, "--data.source", "prepared",
            "--data.path", str(root / "prepared")]
    launch(8, run, *args, "--training.stop_after", "3")
    launch(8, run, *args)
    assert losses(run) == losses(run8)
    extra = json.loads((run / "checkpoints" / "step-00000006" / "extra.json").read_text())
    assert {"epoch", "position"} <= set(extra["data"])


def test_hf_model_trains_on_a_text_corpus_with_its_tokenizer(corpus, run8, tmp_path):
    """``model.hf_path`` holding a tokenizer.json: pointing ``data.path`` at a corpus is all
    it takes (the corpus is tokenized by that tokenizer into the run directory)."""
    root, _ = corpus
    hf = tmp_path / "hf"
    launch(4, tmp_path / "export", *MODEL, *FOLD4, "--training.steps", "1",
           "--checkpoint.export_hf", "true", "--data.source", "prepared",
           "--data.path", str(root / "prepared"))
    shutil.copytree(tmp_path / "export" / "hf", hf)
    shutil.copy(root / "tokenizer.json", hf / "tokenizer.json")
    run = tmp_path / "from_hf"
    launch(4, run, "--model.hf_path", str(hf), *FOLD4, "--data.source", "corpus",
           "--data.path", str(root / "text"), "--data.seq_len", "32",
           "--training.micro_batch", "2", "--training.steps", "2")
    assert sorted(losses(run)) == [1, 2]
    manifest = json.loads((run / "tokens" / "MANIFEST.json").read_text())
    assert manifest["num_documents"] == 120
    from foldmesh.data import load_tokenizer

    assert manifest["tokenizer"]["sha256"] == load_tokenizer(hf).sha256  # hf_path's tokenizer


def refused(capsys, tmp_path, *args) -> str:
    """``python -m foldmesh.train`` on one process with ``args``: it must stop with exit
    code 2 before any process group exists; returns what it printed."""
    import torch.distributed as dist

    from foldmesh.train.__main__ import main

    rc = main([*MODEL, "--fold.tp", "1", "--fold.cp", "1", "--fold.ep", "1", "--fold.etp", "1",
               "--metrics.progress", "false", "--checkpoint.dir", str(tmp_path / "run"), *args])
    assert rc == 2 and not dist.is_initialized()
    return capsys.readouterr().err


def test_bad_corpora_fail_before_training(corpus, tmp_path, capsys):
    root, _ = corpus
    tok = str(root / "tokenizer.json")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.jsonl").write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    err = refused(capsys, tmp_path, "--data.source", "corpus", "--data.path", str(bad),
                  "--data.tokenizer", tok)
    assert "x.jsonl:2" in err and "text_field" in err, err
    # the tokenizer's ids do not fit a 256-id vocabulary
    err = refused(capsys, tmp_path, "--model.overrides.vocab_size", "256", "--data.source",
                  "corpus", "--data.path", str(root / "text"), "--data.tokenizer", tok)
    assert "vocab_size is 256" in err and "data.tokenizer" in err, err
    # a damaged prepared directory
    damaged = tmp_path / "damaged"
    shutil.copytree(root / "prepared", damaged)
    shard = sorted(damaged.glob("*.bin"))[0]
    shard.write_bytes(shard.read_bytes()[:-2])
    err = refused(capsys, tmp_path, "--data.source", "prepared", "--data.path", str(damaged))
    assert shard.name in err, err
    # fewer sequences than one global batch
    err = refused(capsys, tmp_path, "--data.source", "prepared", "--data.path",
                  str(root / "prepared"), "--data.seq_len", "4096")
    assert "fewer than one global batch" in err and "training.global_batch" in err, err


def test_token_files_with_ids_beyond_the_vocabulary_are_refused(tmp_path, capsys):
    import numpy as np

    ids = np.arange(4096, dtype=np.uint16) % 300  # ids up to 299 for a 256-id model
    (tmp_path / "tok").mkdir()
    ids.tofile(tmp_path / "tok" / "a.bin")
    err = refused(capsys, tmp_path, "--model.overrides.vocab_size", "256",
                  "--data.source", "tokens", "--data.path", str(tmp_path / "tok"))
    assert "vocabulary of 300" in err and "vocab_size is 256" in err, err
