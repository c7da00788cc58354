"""Tiny corpora and tokenizers built on the fly for the data tests (nothing downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

EOT = "<|endoftext|>"
# Documents that a lossy reader would change: non-ASCII, "\r\n", tabs, edge spaces, quotes.
TRICKY = ["héllo wörld", "line one\r\nline two\n", "\ttabbed  and  spaced  ", 'a "quoted" \\ word',
          "emoji 🙂 and 中文", " leading space", "x"]


def documents(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct non-empty documents of varied length (1 to ~200 characters)."""
    rng = np.random.default_rng(seed)
    words = ["the", "fold", "mesh", "expert", "token", "über", "naïve", "🙂", "\n", "data"]
    docs = []
    for i in range(n):
        k = int(rng.integers(0, 40))
        body = " ".join(words[j] for j in rng.integers(0, len(words), k))
        docs.append(f"{TRICKY[i % len(TRICKY)]} #{i} {body}")
    return docs


def bpe_tokenizer(path: Path, specials=(EOT,), vocab_size: int = 300) -> Path:
    """A byte-level BPE trained on ``documents``: it round-trips any text exactly."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(documents(50), trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def wordlevel_tokenizer(path: Path, vocab_size: int) -> Path:
    """Words ``w0 .. w{vocab_size - 2}`` and EOT (the last id), split on whitespace."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(vocab_size - 1)} | {EOT: vocab_size - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([EOT])
    tok.save(str(path))
    return path


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"id": i, field: d}, ensure_ascii=i % 2 == 0) + "\n")
    return path


def write_parquet(path: Path, docs: list, field: str = "text") -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": list(range(len(docs))), field: docs}), path,
                   row_group_size=7)
    return path
