"""Tokenizers: bytes, tokenizer.json files and directories, the EOS found, and errors that
name the file and the setting."""

import json
import pickle

import pytest
from data_corpus import EOT, TRICKY, bpe_tokenizer

from foldmesh.data import BYTE_VOCAB, DataError, check_vocab, load_tokenizer, token_dtype


@pytest.fixture(scope="module")
def tok_file(tmp_path_factory):
    return bpe_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json")


def test_bytes_are_utf8_ids():
    tok = load_tokenizer("bytes")
    assert (tok.vocab_size, tok.eos_id, tok.sha256) == (BYTE_VOCAB, 0, None)
    for text in TRICKY:
        (ids,) = tok.encode_batch([text])
        assert list(ids) == list(text.encode("utf-8"))
        assert tok.decode(ids) == text
    assert load_tokenizer("bytes", eos="\n").eos_id == 10


def test_bytes_eos_must_be_one_byte():
    with pytest.raises(DataError, match=r"'ab' is 2 bytes.*single-byte EOS \(--eos, data.eos\)"):
        load_tokenizer("bytes", eos="ab")


def test_file_and_directory_load_the_same(tok_file):
    a, b = load_tokenizer(tok_file), load_tokenizer(tok_file.parent)
    assert a.identity() == b.identity()
    assert a.eos_token == EOT and a.eos_id == 0  # the first special token trained
    vocab = json.loads(tok_file.read_text())["model"]["vocab"]
    assert a.vocab_size == max(vocab.values()) + 1
    ids = a.encode_batch(TRICKY)
    assert [a.decode(x) for x in ids] == TRICKY
    assert all(a.eos_id not in x for x in ids)  # no template tokens added
    again = pickle.loads(pickle.dumps(a))  # what a spawned prepare worker receives
    assert again.encode_batch(TRICKY) == ids


def test_eos_from_tokenizer_config_then_known_tokens(tmp_path):
    d = tmp_path / "model"
    bpe_tokenizer(d / "tokenizer.json", specials=("<|im_end|>", EOT))
    tok = load_tokenizer(d)
    assert tok.eos_token == EOT  # "<|im_end|>" (chat turns) is the last resort
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    assert load_tokenizer(d).eos_token == "<|im_end|>"
    (d / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": {"content": "<|im_end|>", "special": True}}))
    assert load_tokenizer(d).eos_id == tok.encode_batch(["<|im_end|>"])[0][0]
    assert load_tokenizer(d, eos=EOT).eos_token == EOT  # an explicit eos wins


def test_tokenizer_errors(tmp_path, tok_file):
    with pytest.raises(DataError, match=r"nope does not exist: point the tokenizer "
                                        r"\(--tokenizer, data.tokenizer\)"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(DataError, match="holds no tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(DataError, match="is empty"):
        load_tokenizer("")
    bad = tmp_path / "bad.json"
    bad.write_text('{"not": "a tokenizer"}')
    with pytest.raises(DataError, match=r"bad.json is not a Hugging Face tokenizer.json"):
        load_tokenizer(bad)
    with pytest.raises(DataError, match=r"eos = 'nope' is not a token of .*tokenizer.json"):
        load_tokenizer(tok_file, eos="nope")
    plain = bpe_tokenizer(tmp_path / "plain" / "tokenizer.json", specials=())
    with pytest.raises(DataError, match=r"plain/tokenizer.json has none of the end-of-document "
                                        r"tokens .* --eos \(data.eos\)"):
        load_tokenizer(plain)
    (plain.parent / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(DataError, match="tokenizer_config.json is not a JSON object"):
        load_tokenizer(plain)


def test_check_vocab_names_both_numbers():
    check_vocab(256, 256)
    with pytest.raises(DataError, match=r"vocabulary of 50257 but the model's vocab_size is "
                                        r"32000.*model.overrides.vocab_size"):
        check_vocab(50257, 32000)


def test_token_dtype():
    assert token_dtype(256) == token_dtype(65536) == "uint16"
    assert token_dtype(65537) == "uint32"
