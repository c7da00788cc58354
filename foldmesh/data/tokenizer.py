"""Tokenizers: Hugging Face ``tokenizer.json`` files, or plain bytes.

``load_tokenizer(spec)`` takes

- ``"bytes"``: byte level, as the trainer reads text today: a document's UTF-8 bytes are its
  ids (0..255, vocabulary ``BYTE_VOCAB`` = 256). EOS is the NUL byte (id 0) unless ``eos``
  names another single-byte character;
- a ``tokenizer.json`` file, or a directory holding one (a Hugging Face model directory),
  read with the ``tokenizers`` library. Nothing is downloaded.

Documents are encoded without the tokenizer's template (``add_special_tokens=False``: no BOS
or EOS added by a post-processor); ``foldmesh.data.prepare`` appends EOS itself.

``vocab_size`` is the largest id + 1 (added tokens included), the smallest model vocabulary
that holds every id; ``check_vocab`` compares it with a model's.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ._errors import DataError

BYTE_VOCAB = 256  # the trainer's byte level (foldmesh.train._sources.BYTE_VOCAB)
BYTE_EOS = 0  # NUL: almost never part of text
# End-of-document tokens of common tokenizers, tried in this order when the directory holds no
# tokenizer_config.json naming its eos_token. "<|im_end|>" (chat turns) comes last: a model
# that has both ends documents with "<|endoftext|>".
EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|im_end|>")
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
_SETTING = "the tokenizer (--tokenizer, data.tokenizer)"


class Tokenizer:
    """What the data path needs of a tokenizer.

    Attributes:
        name: ``"bytes"`` or the resolved path of the ``tokenizer.json``.
        vocab_size: largest id + 1.
        eos_id: the id appended after every document.
        eos_token: its text (``"\\x00"`` for bytes).
        sha256: hash of the ``tokenizer.json`` bytes (``None`` for bytes).
    """

    name: str
    vocab_size: int
    eos_id: int
    eos_token: str
    sha256: str | None

    def encode_batch(self, texts: list[str]) -> list[Sequence[int]]:
        """The ids of each text (no special tokens added): lists or 1-D integer arrays."""
        raise NotImplementedError

    def decode(self, ids) -> str:
        """Text of ``ids`` (a sequence or 1-D array of ints); special tokens are kept."""
        raise NotImplementedError

    def identity(self) -> dict:
        """What must match for two token files to hold the same ids (JSON-serialisable):
        the file's hash, not its path."""
        return {"sha256": self.sha256, "vocab_size": self.vocab_size, "eos_id": self.eos_id,
                "eos_token": self.eos_token}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.name!r}, vocab_size={self.vocab_size}, "
                f"eos_id={self.eos_id})")


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255."""

    def __init__(self, eos: str | None = None):
        self.name, self.vocab_size, self.sha256 = "bytes", BYTE_VOCAB, None
        if eos is None:
            self.eos_id = BYTE_EOS
        else:
            raw = eos.encode("utf-8")
            if len(raw) != 1:
                raise DataError(f"eos = {eos!r} is {len(raw)} bytes: the byte-level tokenizer "
                                "needs a single-byte EOS (--eos, data.eos), e.g. '\\n'")
            self.eos_id = raw[0]
        self.eos_token = chr(self.eos_id)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]

    def decode(self, ids) -> str:
        return bytes(np.asarray(ids, dtype=np.uint8)).decode("utf-8", errors="replace")


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers.Tokenizer`` loaded from a ``tokenizer.json``."""

    def __init__(self, file: Path, eos: str | None = None):
        from tokenizers import Tokenizer as _Tokenizer

        try:
            raw = file.read_bytes()
        except OSError as e:
            raise DataError(f"cannot read {file} ({e.strerror}): fix {_SETTING}") from None
        try:
            self._tok = _Tokenizer.from_str(raw.decode("utf-8"))
        except Exception as e:  # tokenizers raises a bare Exception on a bad file
            raise DataError(f"{file} is not a Hugging Face tokenizer.json ({e}): fix "
                            f"{_SETTING}") from None
        self.name, self.sha256 = str(file.resolve()), hashlib.sha256(raw).hexdigest()
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1
        self.eos_token = eos if eos is not None else _find_eos(file, vocab)
        if self.eos_token not in vocab:
            raise DataError(f"eos = {self.eos_token!r} is not a token of {file}: name one of "
                            f"its tokens with --eos (data.eos)")
        self.eos_id = vocab[self.eos_token]
        # encode_batch_fast (tokenizers >= 0.20) skips computing offsets we do not use.
        self._encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._encode(texts, add_special_tokens=False)]

    # Pickled for spawned prepare workers: the bound method is rebuilt, not pickled.
    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_encode"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def _find_eos(file: Path, vocab: dict[str, int]) -> str:
    """The eos_token of a tokenizer_config.json beside ``file``, else the first of
    ``EOS_CANDIDATES`` in the vocabulary."""
    config = file.parent / TOKENIZER_CONFIG
    if config.is_file():
        try:
            eos = json.loads(config.read_text(encoding="utf-8")).get("eos_token")
        except (ValueError, AttributeError) as e:
            raise DataError(f"{config} is not a JSON object ({e}): fix or remove it") from None
        if isinstance(eos, dict):  # an AddedToken written out: {"content": "</s>", ...}
            eos = eos.get("content")
        if isinstance(eos, str) and eos:
            return eos
    for candidate in EOS_CANDIDATES:
        if candidate in vocab:
            return candidate
    raise DataError(f"{file} has none of the end-of-document tokens {list(EOS_CANDIDATES)} "
                    f"and no {TOKENIZER_CONFIG} naming its eos_token: name its EOS token with "
                    "--eos (data.eos)")


def load_tokenizer(spec: str | Path, eos: str | None = None) -> Tokenizer:
    """``"bytes"``, a ``tokenizer.json`` file or a directory holding one.

    ``eos`` (a token's text) overrides the EOS found in the directory's
    ``tokenizer_config.json`` or among ``EOS_CANDIDATES``.
    """
    if str(spec) == "bytes":
        return ByteTokenizer(eos)
    if not str(spec):
        raise DataError(f'{_SETTING} is empty: give "bytes", a tokenizer.json or a directory '
                        "holding one")
    path = Path(spec)
    if path.is_dir():
        path = path / TOKENIZER_FILE
        if not path.is_file():
            raise DataError(f"{spec} holds no {TOKENIZER_FILE}: point {_SETTING} at a "
                            f'Hugging Face tokenizer.json, its directory, or "bytes"')
    elif not path.is_file():
        raise DataError(f"{spec} does not exist: point {_SETTING} at a Hugging Face "
                        f'tokenizer.json, its directory, or "bytes"')
    return HFTokenizer(path, eos)


def token_dtype(vocab_size: int) -> str:
    """The narrowest token file type that holds ids ``0..vocab_size - 1``."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def check_vocab(tokenizer_vocab: int, model_vocab: int) -> None:
    """Raise ``DataError`` when ids ``0..tokenizer_vocab - 1`` do not all fit a model whose
    embedding has ``model_vocab`` rows."""
    if tokenizer_vocab > model_vocab:
        raise DataError(f"the data's token ids need a vocabulary of {tokenizer_vocab} but the "
                        f"model's vocab_size is {model_vocab}: use a model with vocab_size >= "
                        f"{tokenizer_vocab} (model.overrides.vocab_size) or the tokenizer the "
                        "model was trained with (data.tokenizer)")
