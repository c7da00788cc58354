"""Token sources and step-addressed batches: determinism, replica slicing, split bounds,
exact windows of token files, resume, and errors that name the setting."""

import numpy as np
import pytest
import torch

from foldmesh.train.config import DataSection
from foldmesh.train.data import TokenBatches, build_data, replica_rows

SEQ, BATCH, SEED = 31, 8, 3  # odd sizes on purpose


def _tokens_dir(tmp_path, dtype, sizes=(1000, 777)):
    """Two .bin files of distinct ids in a directory; returns (dir, their concatenation)."""
    rng = np.random.default_rng(0)
    top = 60_000 if dtype == "uint16" else 3_000_000_000
    arrays = [rng.integers(0, top, n, dtype=np.int64) for n in sizes]
    for i, a in enumerate(arrays):
        a.astype(dtype).tofile(tmp_path / f"shard-{i}.bin")
    return tmp_path, np.concatenate(arrays)


def _text(tmp_path, n=5000):
    (tmp_path / "b").mkdir()
    (tmp_path / "a.txt").write_bytes(bytes(range(256)) * (n // 256))
    (tmp_path / "b" / "c.txt").write_text("hello world\n" * (n // 12))
    return tmp_path


@pytest.fixture(scope="module")
def stdlib():
    return build_data(DataSection(seq_len=SEQ, max_bytes=200_000), BATCH, SEED)


def test_deterministic_across_builds(stdlib):
    again = build_data(DataSection(seq_len=SEQ, max_bytes=200_000), BATCH, SEED)
    for a, b in zip(stdlib, again, strict=True):
        for step in (0, 1, 17):
            assert torch.equal(a.batch(step), b.batch(step))


def test_replica_rows_concatenate_to_the_full_batch(stdlib):
    train, _ = stdlib
    full = train.batch(5)
    assert full.shape == (BATCH, SEQ + 1) and full.dtype == torch.int64
    for dp in (1, 2, 4):
        parts = [train.batch(5, replica_rows(BATCH, d, dp)) for d in range(dp)]
        assert torch.equal(torch.cat(parts), full)
    assert torch.equal(train.batch(5, slice(2, 5)), full[2:5])


def test_steps_and_seeds_differ(stdlib):
    train, val = stdlib
    assert not torch.equal(train.starts(0), train.starts(1))
    other, _ = build_data(DataSection(seq_len=SEQ, max_bytes=200_000), BATCH, SEED + 1)
    assert not torch.equal(train.starts(0), other.starts(0))


def test_windows_stay_inside_their_split(stdlib):
    train, val = stdlib
    assert train.begin == 0 and train.end == val.begin and val.end == len(train.stream)
    for step in range(50):
        t, v = train.starts(step), val.starts(step)
        assert (t >= 0).all() and (t + SEQ + 1 <= train.end).all()
        assert (v >= val.begin).all() and (v + SEQ + 1 <= val.end).all()


def test_stdlib_source_is_bytes_capped_by_max_bytes(stdlib):
    train, _ = stdlib
    assert len(train.stream) == 200_000 and train.min_vocab == 256
    whole = train.stream.read(0, len(train.stream))
    assert whole.min() >= 0 and whole.max() < 256
    assert b"import" in whole.astype(np.uint8).tobytes()


def test_text_source_reads_files_in_path_order(tmp_path):
    root = _text(tmp_path)
    train, val = build_data(DataSection(source="text", path=str(root), seq_len=SEQ,
                                        val_fraction=0.1), BATCH, SEED)
    n = len(train.stream)
    assert val.end == n and n == (tmp_path / "a.txt").stat().st_size + 1 + (
        tmp_path / "b" / "c.txt").stat().st_size
    assert train.stream.read(0, 3).tolist() == [0, 1, 2]  # a.txt before b/c.txt
    capped, _ = build_data(DataSection(source="text", path=str(root), seq_len=SEQ,
                                       max_bytes=1000), BATCH, SEED)
    assert len(capped.stream) == 1000


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_token_files_give_the_drawn_windows(tmp_path, dtype):
    root, ids = _tokens_dir(tmp_path, dtype)
    train, val = build_data(DataSection(source="tokens", path=str(root), dtype=dtype,
                                        seq_len=SEQ, val_fraction=0.25), BATCH, SEED)
    assert len(train.stream) == len(ids) and val.begin == len(ids) - int(len(ids) * 0.25)
    for split in (train, val):
        for step in range(20):
            windows = split.batch(step)
            for row, s in enumerate(split.starts(step).tolist()):
                assert torch.equal(windows[row], torch.from_numpy(ids[s:s + SEQ + 1]))
    boundary = 1000 - 5  # a read that crosses from shard-0 into shard-1
    assert train.stream.read(boundary, 10).tolist() == ids[boundary:boundary + 10].tolist()
    assert train.min_vocab == ids.max() + 1


def test_resume_continues_the_sequence(stdlib):
    train, _ = stdlib
    train.step = 0
    for _ in range(3):
        train.next()
    state = train.state_dict()
    expected = [train.next(range(2, 6)) for _ in range(2)]
    fresh, _ = build_data(DataSection(seq_len=SEQ, max_bytes=200_000), BATCH, SEED)
    fresh.load_state_dict(state)
    assert fresh.step == 3
    assert all(torch.equal(fresh.next(range(2, 6)), e) for e in expected)


def test_resume_refuses_changed_data(stdlib, tmp_path):
    state = stdlib[0].state_dict()
    for cfg, seed in [(DataSection(seq_len=SEQ, max_bytes=100_000), SEED),
                      (DataSection(seq_len=SEQ, max_bytes=200_000), SEED + 1)]:
        other, _ = build_data(cfg, BATCH, seed)
        with pytest.raises(ValueError, match="data changed since the checkpoint"):
            other.load_state_dict(state)
    # Same length, other contents: caught by the digest.
    root = _text(tmp_path)
    a, _ = build_data(DataSection(source="text", path=str(root), seq_len=SEQ), BATCH, SEED)
    (root / "a.txt").write_bytes(bytes(reversed((root / "a.txt").read_bytes())))
    b, _ = build_data(DataSection(source="text", path=str(root), seq_len=SEQ), BATCH, SEED)
    with pytest.raises(ValueError, match="digest"):
        b.load_state_dict(a.state_dict())


@pytest.mark.parametrize("cfg, key", [
    (DataSection(source="tokens", path="/no/such/path"), "data.path"),
    (DataSection(source="text", path=""), "data.path"),
    (DataSection(source="tokens", path=".", dtype="int8"), "data.dtype"),
    (DataSection(max_bytes=1000, seq_len=100), "data.seq_len"),
    (DataSection(val_fraction=0.0), "data.val_fraction"),
    (DataSection(source="parquet"), "data.source"),
])
def test_errors_name_the_setting(cfg, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        build_data(cfg, BATCH, SEED)


def test_errors_for_empty_dirs_bad_sizes_and_rows(tmp_path, stdlib):
    with pytest.raises(ValueError, match=r"data\.path"):
        build_data(DataSection(source="tokens", path=str(tmp_path)), BATCH, SEED)
    (tmp_path / "odd.bin").write_bytes(b"\0" * 7)
    with pytest.raises(ValueError, match=r"data\.dtype"):
        build_data(DataSection(source="tokens", path=str(tmp_path)), BATCH, SEED)
    with pytest.raises(ValueError, match=r"fold\.dp"):
        replica_rows(BATCH, 0, 3)
    with pytest.raises(ValueError, match=r"training\.global_batch"):
        stdlib[0].batch(0, range(6, 10))
    assert isinstance(stdlib[1], TokenBatches)
