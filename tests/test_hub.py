"""fastbert.hub: the book's pretrained format, served through the download code path
(file:// URLs, real sha1 checks), loaded with strict=True.  No network."""
import json
import os
import pathlib
import zipfile

import pytest
import torch

from fastbert import BERTModel, hub
from fastbert.data import Vocab
from fastbert.data.download import extract_atomic

TOKENS = ["<unk>", "<pad>", "<mask>", "<cls>", "<sep>", "a", "man", "sleeps", "."]
SIZES = dict(num_hiddens=32, ffn_num_hiddens=48, num_heads=4, num_layers=2, max_len=40)


def _bert(vocab_size, num_hiddens, ffn_num_hiddens, num_heads, num_layers, max_len,
          dropout=0.0):
    h = num_hiddens
    return BERTModel(vocab_size, h, [h], h, ffn_num_hiddens, num_heads, num_layers, dropout,
                     max_len=max_len, key_size=h, query_size=h, value_size=h,
                     hid_in_features=h, mlm_in_features=h, nsp_in_features=h)


@pytest.fixture
def book_zip(tmp_path):
    """``bert.tiny.torch.zip`` laid out like the book's archives: a folder with vocab.json
    (idx_to_token) and pretrained.params (a torch.save'd state_dict)."""
    src = tmp_path / "src" / "bert.tiny.torch"
    src.mkdir(parents=True)
    torch.manual_seed(1)
    model = _bert(len(TOKENS), **SIZES)
    torch.save(model.state_dict(), src / "pretrained.params")
    (src / "vocab.json").write_text(json.dumps(TOKENS))
    zpath = tmp_path / "serve" / "bert.tiny.torch.zip"
    zpath.parent.mkdir()
    with zipfile.ZipFile(zpath, "w") as zf:
        for f in ("vocab.json", "pretrained.params"):
            zf.write(src / f, f"bert.tiny.torch/{f}")
    return model, src, zpath


@pytest.fixture
def registered(book_zip, tmp_path, monkeypatch):
    model, src, zpath = book_zip
    monkeypatch.setitem(hub.DATA_HUB, "bert.tiny",
                        (zpath.as_uri(), hub.sha1_of(str(zpath))))
    monkeypatch.setenv("FASTBERT_HOME", str(tmp_path / "cache"))
    return model, src, zpath


def _assert_same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_book_entries():
    assert hub.DATA_URL == "http://d2l-data.s3-accelerate.amazonaws.com/"
    assert hub.DATA_HUB["bert.base"] == (hub.DATA_URL + "bert.base.torch.zip",
                                         "225d66f04cae318b841a13d32af3acc165f253ac")
    assert hub.DATA_HUB["bert.small"] == (hub.DATA_URL + "bert.small.torch.zip",
                                          "c72329e68a732bef0452e4b96a1c341c8910f81f")


def test_load_by_name_through_download(registered, tmp_path):
    model, _, _ = registered
    bert, vocab = hub.load_pretrained_model("bert.tiny", devices=[torch.device("cpu")],
                                            dropout=0.1, **SIZES)
    _assert_same(bert, model)
    assert vocab.idx_to_token == TOKENS and vocab["man"] == 6 and vocab["zzz"] == 0
    # The book hard-codes dropout 0.2 whatever the argument; book_dropout=False honours it.
    assert bert.encoder.blks[0].addnorm1.dropout.p == 0.2
    bert2, _ = hub.load_pretrained_model("bert.tiny", dropout=0.1, book_dropout=False, **SIZES)
    assert bert2.encoder.blks[0].addnorm1.dropout.p == 0.1
    cached = tmp_path / "cache" / "bert.tiny.torch.zip"
    assert cached.is_file() and (tmp_path / "cache" / "bert.tiny.torch" / "vocab.json").is_file()


def test_cache_hit_does_not_fetch(registered, monkeypatch):
    first = hub.download("bert.tiny")
    monkeypatch.setattr(hub, "_fetch", lambda *a: pytest.fail("fetched despite the cache"))
    assert hub.download("bert.tiny") == first
    # A corrupted cached file is fetched again.
    pathlib.Path(first).write_bytes(b"garbage")
    monkeypatch.undo()
    hub.DATA_HUB["bert.tiny"] = registered[2].as_uri(), hub.sha1_of(str(registered[2]))
    assert hub.sha1_of(hub.download("bert.tiny")) == hub.sha1_of(str(registered[2]))


def test_sha1_mismatch_is_a_clear_error_and_caches_nothing(registered, monkeypatch, tmp_path):
    url, _ = hub.DATA_HUB["bert.tiny"]
    monkeypatch.setitem(hub.DATA_HUB, "bert.tiny", (url, "0" * 40))
    with pytest.raises(ValueError, match="sha1 mismatch .* expected 0000"):
        hub.download("bert.tiny")
    assert os.listdir(tmp_path / "cache") == []


def test_unreachable_url_is_a_clear_error(registered, monkeypatch, tmp_path):
    missing = (tmp_path / "nowhere.zip").as_uri()
    monkeypatch.setitem(hub.DATA_HUB, "bert.tiny", (missing, "0" * 40))
    with pytest.raises(OSError, match="could not download .*nowhere.zip"):
        hub.download("bert.tiny")
    assert os.listdir(tmp_path / "cache") == []


def test_local_folder_and_zip(book_zip, tmp_path, monkeypatch):
    model, src, zpath = book_zip
    monkeypatch.setenv("FASTBERT_HOME", str(tmp_path / "cache"))
    for where in (str(src), str(zpath)):
        bert, vocab = hub.load_pretrained_model(where, dropout=0.1, **SIZES)
        _assert_same(bert, model)
        assert len(vocab) == len(TOKENS)
    assert hub.infer_bert_config(model.state_dict()) == dict(
        vocab_size=len(TOKENS), num_hiddens=32, ffn_num_hiddens=48, num_heads=1,
        num_layers=2, max_len=40)


def test_wrong_sizes_and_missing_files(book_zip, tmp_path):
    _, src, _ = book_zip
    with pytest.raises(ValueError, match="does not fit a BERTModel.*num_hiddens': 32"):
        hub.load_pretrained_model(str(src), 32, 64, 4, 2, 0.1, 40)
    with pytest.raises(FileNotFoundError, match="neither a DATA_HUB name"):
        hub.load_pretrained_model(str(tmp_path / "nope"), 32, 48, 4, 2, 0.1, 40)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no vocab.json and pretrained.params"):
        hub.load_pretrained_model(str(tmp_path / "empty"), 32, 48, 4, 2, 0.1, 40)
    with pytest.raises(KeyError, match="not in DATA_HUB"):
        hub.download("bert.huge")


def test_zip_slip_is_refused(tmp_path):
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("../evil.txt", "x")
    with pytest.raises(ValueError, match="outside"):
        extract_atomic(str(bad), str(tmp_path / "out"))
    assert not (tmp_path / "evil.txt").exists() and os.listdir(tmp_path / "out") == []
