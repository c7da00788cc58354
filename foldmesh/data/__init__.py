"""Real corpora for training: tokenizers, document sources, a one-off prepare step writing
memory-mapped token shards, and epochs of packed documents.

    python -m foldmesh.data.prepare --tokenizer tokenizer.json --input corpus/*.jsonl --out tok/
    python -m foldmesh.data verify tok/

then, in the trainer: ``TokenDataset("tok/")`` → ``PackedSequences`` → ``PackedBatches``.
The prepare function itself is ``foldmesh.data.prepare.prepare`` (not imported here, so that
``python -m foldmesh.data.prepare`` runs the module exactly once).
"""

from ._errors import DataError
from .dataset import TokenDataset
from .format import read_manifest, verify
from .packing import IGNORE_INDEX, PackedBatch, PackedBatches, PackedSequences, split_documents
from .sources import expand_inputs, iter_corpus, iter_documents
from .tokenizer import BYTE_VOCAB, Tokenizer, check_vocab, load_tokenizer, token_dtype

__all__ = [
    "BYTE_VOCAB",
    "IGNORE_INDEX",
    "DataError",
    "PackedBatch",
    "PackedBatches",
    "PackedSequences",
    "TokenDataset",
    "Tokenizer",
    "check_vocab",
    "expand_inputs",
    "iter_corpus",
    "iter_documents",
    "load_tokenizer",
    "read_manifest",
    "split_documents",
    "token_dtype",
    "verify",
]
