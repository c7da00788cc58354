"""Document sources: text, JSON Lines and Parquet read back exactly, directories expanded in
order, and every bad input refused with the file (and line or row) and the setting."""

import json
import sys

import pytest
from data_corpus import TRICKY, write_jsonl, write_parquet

from foldmesh.data import DataError, expand_inputs, iter_corpus, iter_documents


def test_text_file_is_one_exact_document(tmp_path):
    f = tmp_path / "doc.txt"
    f.write_bytes("ünïcode\r\nkept as is\n".encode())
    assert list(iter_documents(f)) == ["ünïcode\r\nkept as is\n"]
    (tmp_path / "empty.txt").write_bytes(b"")
    assert list(iter_documents(tmp_path / "empty.txt")) == []


def test_jsonl_reads_the_text_field(tmp_path):
    f = write_jsonl(tmp_path / "a.jsonl", TRICKY, field="body")
    with open(f, "a") as out:
        out.write("\n   \n" + json.dumps({"body": ""}) + "\n")  # blank lines, an empty text
    assert list(iter_documents(f, "body")) == TRICKY


def test_parquet_reads_the_text_column(tmp_path):
    pytest.importorskip("pyarrow")
    docs = [f"row {i} {TRICKY[i % len(TRICKY)]}" for i in range(30)]  # several row groups
    f = write_parquet(tmp_path / "a.parquet", docs + [""])
    assert list(iter_documents(f)) == docs


def test_directories_expand_sorted_without_hidden_files(tmp_path):
    (tmp_path / "b").mkdir()
    for name in ("b/z.txt", "a.txt", "b/a.txt", ".hidden.txt"):
        (tmp_path / name).write_text(name)
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "x").write_text("x")
    files = expand_inputs([tmp_path, tmp_path / "a.txt"])
    assert [f.relative_to(tmp_path).as_posix() for f in files] == ["a.txt", "b/a.txt",
                                                                   "b/z.txt", "a.txt"]
    assert list(iter_corpus([tmp_path / "b"])) == ["b/a.txt", "b/z.txt"]


def _lines(tmp_path, *lines):
    f = tmp_path / "c.jsonl"
    f.write_text("".join(line + "\n" for line in lines))
    return f


@pytest.mark.parametrize("lines, message", [
    (['{"text": "ok"}', "", '{"txt": "typo"}'],
     r"c.jsonl:3: no field 'text' \(the line has \['txt'\]\): set --text-field / "
     r"data.text_field"),
    (['{"text": "ok"}', '{"text": "unterminated}'],
     r"c.jsonl:2: bad JSON \(Unterminated string.*\): fix the line"),
    (['[{"text": "a"},', '{"text": "b"}]'],
     r"c.jsonl:1: bad JSON .*a JSON array is not JSON Lines"),
    (['"just a string"'], r"c.jsonl:1: a JSON string, not an object with a 'text' field"),
    (['{"text": 12}'], r"c.jsonl:1: field 'text' is a JSON number, not a string: set --text-field"),
    (['{"text": null}'], r"c.jsonl:1: field 'text' is a JSON null, not a string"),
])
def test_bad_jsonl_lines(tmp_path, lines, message):
    f = _lines(tmp_path, *lines)
    with pytest.raises(DataError, match=message):
        list(iter_documents(f))


def test_missing_unreadable_and_empty_inputs(tmp_path):
    with pytest.raises(DataError, match=r"nope.jsonl does not exist: fix --input / data.path"):
        expand_inputs([tmp_path / "nope.jsonl"])
    with pytest.raises(DataError, match="no input files"):
        expand_inputs([])
    (tmp_path / "hollow").mkdir()
    with pytest.raises(DataError, match=r"hollow is a directory without files"):
        expand_inputs([tmp_path / "hollow"])
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("café".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.txt: not UTF-8 text \(byte 3: b'\\xe9'\): "
                                        r"convert the file to UTF-8"):
        list(iter_documents(latin))
    bad_line = tmp_path / "d.jsonl"
    bad_line.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: not UTF-8 text"):
        list(iter_documents(bad_line))
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match=r"the corpus is empty: .*e.jsonl hold no non-empty "
                                        r"document; fix --input / data.path"):
        list(iter_corpus([tmp_path / "e.jsonl"]))


def test_bad_parquet(tmp_path):
    pytest.importorskip("pyarrow")
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = write_parquet(tmp_path / "a.parquet", ["x", "y"], field="content")
    with pytest.raises(DataError, match=r"a.parquet: no column 'text' \(it has \['id', "
                                        r"'content'\]\): set --text-field / data.text_field"):
        list(iter_documents(f))
    with pytest.raises(DataError, match=r"column 'id' holds int64, not strings"):
        list(iter_documents(f, "id"))
    pq.write_table(pa.table({"text": ["a", None, "c"]}), tmp_path / "n.parquet")
    with pytest.raises(DataError, match=r"n.parquet: row 1 has no 'text' \(null\)"):
        list(iter_documents(tmp_path / "n.parquet"))
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"junk.parquet is not a readable Parquet file"):
        list(iter_documents(tmp_path / "junk.parquet"))


def test_parquet_without_pyarrow_names_the_extra(tmp_path, monkeypatch):
    f = tmp_path / "a.parquet"
    f.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow now fails
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(DataError, match=r"a.parquet is Parquet, which needs pyarrow: pip "
                                        r"install 'foldmesh\[data\]'"):
        expand_inputs([f])
