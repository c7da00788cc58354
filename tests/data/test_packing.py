"""Packed documents: over an epoch every document token is a target exactly once, epochs
reorder, batches are the same at every data-parallel degree, and a resume continues exactly."""

import json
from collections import defaultdict

import numpy as np
import pytest
import torch
from data_corpus import write_jsonl

from foldmesh.data import (
    IGNORE_INDEX,
    DataError,
    PackedBatches,
    PackedSequences,
    TokenDataset,
    split_documents,
)
from foldmesh.data.prepare import prepare

SEQ, BATCH, SEED = 13, 8, 5  # odd sizes on purpose


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    """60 byte-level documents of 1 to 80 bytes (many shorter, some longer than SEQ), in
    two shards."""
    root = tmp_path_factory.mktemp("pack")
    rng = np.random.default_rng(1)
    docs = ["".join(chr(97 + int(c)) for c in rng.integers(0, 26, int(n)))
            for n in rng.integers(1, 80, 60)]
    files = [write_jsonl(root / "a.jsonl", docs[:35]), write_jsonl(root / "b.jsonl", docs[35:])]
    prepare("bytes", files, root / "out", workers=1, progress=False)
    return TokenDataset(root / "out")


def _epoch(packed, epoch):
    return [packed.window(epoch, w) for w in range(packed.num_windows)]


def test_every_token_is_a_target_once_per_epoch(ds):
    packed = PackedSequences(ds, SEQ, SEED)
    assert packed.num_targets == ds.num_tokens
    assert packed.num_windows == -(-ds.num_tokens // SEQ)
    seen = defaultdict(list)  # document -> its labels, in the order they were targets
    for inputs, labels, doc_ids in _epoch(packed, 0):
        real = labels != IGNORE_INDEX
        assert np.array_equal(real, doc_ids >= 0)
        assert np.all(inputs[~real] == ds.eos_id)  # padding: pad id = EOS by default
        for label, d in zip(labels[real], doc_ids[real], strict=True):
            seen[int(d)].append(int(label))
    assert sorted(seen) == list(range(ds.num_documents))
    for d, labels in seen.items():  # each document exactly once, in order, with its EOS
        assert labels == ds.document(d).tolist()
    padded = packed.num_windows * SEQ - ds.num_tokens
    last = packed.window(0, packed.num_windows - 1)[1]
    assert 0 <= padded < SEQ and np.all(last[SEQ - padded:] == IGNORE_INDEX)


def test_windows_overlap_by_one_token(ds):
    packed = PackedSequences(ds, SEQ, SEED)
    windows = _epoch(packed, 3)
    assert windows[0][0][0] == ds.eos_id  # the leading EOS: the first document's context
    for (inputs, labels, _), (after, _, _) in zip(windows, windows[1:], strict=False):
        assert np.array_equal(inputs[1:], labels[:-1])
        assert after[0] == labels[-1]
    order = packed.order(3)
    first = ds.document(int(order[0]))
    assert windows[0][1][:len(first)].tolist() == first.tolist()[:SEQ]


def test_document_ids_give_each_document_its_eos_as_bos(ds):
    packed = PackedSequences(ds, SEQ, SEED)
    for inputs, _, ids in _epoch(packed, 0):
        starts = np.flatnonzero((ids[1:] != ids[:-1]) & (ids[1:] >= 0)) + 1
        assert np.all(inputs[starts] == ds.eos_id)  # a new document's first input is EOS
        assert ids[0] >= 0


def test_epochs_reorder_deterministically(ds):
    packed = PackedSequences(ds, SEQ, SEED)
    orders = [packed.order(e) for e in range(3)]
    for o in orders:
        assert sorted(o.tolist()) == list(range(ds.num_documents))
    assert not np.array_equal(orders[0], orders[1])
    assert not np.array_equal(orders[1], orders[2])
    again = PackedSequences(ds, SEQ, SEED)
    assert np.array_equal(again.order(1), orders[1])  # recomputed, not remembered
    assert not np.array_equal(PackedSequences(ds, SEQ, SEED + 1).order(0), orders[0])


def test_batches_are_the_same_at_every_dp_degree(ds):
    batches = PackedBatches(PackedSequences(ds, SEQ, SEED), BATCH)
    W = batches.packed.num_windows
    epoch_end = W // BATCH  # this step's batch ends one epoch and begins the next
    assert W % BATCH, "the corpus should not split into whole batches"
    assert batches.num_targets(epoch_end) < BATCH * SEQ  # it holds the padded window
    for step in (0, 1, epoch_end, 2 * epoch_end + 1):
        full = batches.batch(step)
        assert batches.num_targets(step) == int((full.labels != IGNORE_INDEX).sum())
        assert full.inputs.shape == (BATCH, SEQ) and full.inputs.dtype == torch.int64
        for dp in (1, 2, 4):
            rows = BATCH // dp
            parts = [batches.batch(step, range(d * rows, (d + 1) * rows)) for d in range(dp)]
            for name, whole in full._asdict().items():
                assert torch.equal(torch.cat([getattr(p, name) for p in parts]), whole)
        for r in range(BATCH):
            epoch, w = batches.locate(step, r)
            assert epoch * W + w == step * BATCH + r
            assert torch.equal(full.labels[r], torch.from_numpy(batches.packed.window(epoch, w)[1]))
    assert batches.locate(epoch_end, 0)[0] == 0 and batches.locate(epoch_end, BATCH - 1)[0] == 1
    assert torch.equal(batches.batch(2, slice(3, 6)).inputs, batches.batch(2).inputs[3:6])


def test_resume_continues_exactly(ds):
    packed = PackedSequences(ds, SEQ, SEED)
    straight = PackedBatches(packed, BATCH)
    reference = [straight.next() for _ in range(25)]  # over three epochs
    first = PackedBatches(PackedSequences(ds, SEQ, SEED), BATCH)
    for _ in range(11):
        first.next()
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint as JSON
    assert (state["step"], state["epoch"], state["position"]) == (
        11, 11 * BATCH // packed.num_windows, 11 * BATCH % packed.num_windows)
    resumed = PackedBatches(PackedSequences(ds, SEQ, SEED), BATCH)
    resumed.load_state_dict(state)
    for ref in reference[11:]:
        got = resumed.next()
        assert all(torch.equal(a, b) for a, b in zip(got, ref, strict=True))
    # Another global batch continues at the same window: windows are counted, not steps.
    wider = PackedBatches(PackedSequences(ds, SEQ, SEED), 2 * BATCH)
    wider.load_state_dict(state)
    assert torch.equal(wider.batch(11).labels, torch.cat([reference[11].labels,
                                                          reference[12].labels]))


def test_resume_refuses_other_data(ds):
    state = PackedBatches(PackedSequences(ds, SEQ, SEED), BATCH).state_dict()
    other = PackedBatches(PackedSequences(ds, SEQ, SEED + 1), BATCH)
    with pytest.raises(DataError, match=r"the train data changed since the checkpoint \(seed: "
                                        r"5 -> 6\): restore the run's data.\* and training.seed"):
        other.load_state_dict(state)
    train, _ = split_documents(ds.num_documents, 0.1)
    subset = PackedBatches(PackedSequences(ds, SEQ, SEED, documents=train), BATCH)
    with pytest.raises(DataError, match="documents: "):
        subset.load_state_dict(state)


def test_split_documents(ds):
    train, val = split_documents(ds.num_documents, 0.1, seed=3)
    assert len(val) == 6 and len(train) == ds.num_documents - 6
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(ds.num_documents))
    assert np.array_equal(split_documents(ds.num_documents, 0.1, seed=3)[1], val)
    assert len(split_documents(5, 0.01)[1]) == 1 and len(split_documents(5, 0)[1]) == 0
    packed = PackedSequences(ds, SEQ, SEED, documents=val)
    assert packed.num_targets == int(ds.document_lengths[val].sum())
    ids = {int(d) for _, _, doc_ids in _epoch(packed, 0) for d in doc_ids if d >= 0}
    assert ids == set(val.tolist())
    with pytest.raises(DataError, match=r"data.val_fraction = 1.0 must lie in \[0, 1\)"):
        split_documents(10, 1.0)
    with pytest.raises(DataError, match=r"data.val_fraction = 0.5 of 1 documents leaves none "
                                        "for training"):
        split_documents(1, 0.5)


def test_bad_settings(ds):
    packed = PackedSequences(ds, SEQ, SEED)
    with pytest.raises(DataError, match=rf"make {packed.num_windows} sequences of data.seq_len "
                                        rf"= {SEQ} per epoch, fewer than one global batch of "
                                        r"training.global_batch = 10000: give more data"):
        PackedBatches(packed, 10_000)
    with pytest.raises(DataError, match=r"data.seq_len = 0 must be at least 1"):
        PackedSequences(ds, 0, SEED)
    with pytest.raises(DataError, match=r"training.global_batch = 0 must be at least 1"):
        PackedBatches(packed, 0)
    with pytest.raises(DataError, match="no documents of"):
        PackedSequences(ds, SEQ, SEED, documents=np.array([], dtype=np.int64))
    with pytest.raises(IndexError, match="row 8 of a global batch of 8"):
        PackedBatches(packed, BATCH).batch(0, range(6, 9))
