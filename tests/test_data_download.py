"""``download_data`` / ``--download`` against a local HTTP server (127.0.0.1, no internet)
serving zip archives laid out like the book's (``snli_1.0/snli_1.0_<split>.txt``,
``wikitext-2/wiki.<split>.tokens``), built here from the packaged data: a full download
that resolution then finds in the cache, an interrupted transfer resumed with a Range
request, a server that ignores Range, a sha1 mismatch and an incomplete archive that leave
nothing complete-looking behind."""
import functools
import gzip
import hashlib
import http.server
import os
import re
import threading
import zipfile

import pytest

from fastbert.cli import main
from fastbert.data import DataNotFoundError, download_data, locate, locate_wiki, read_snli_file
from fastbert.data.paths import PACKAGED_DIR
from train_testing import TINY, official_snli_text, one_thread, tsv_rows  # noqa: F401

N_ROWS = 400  # rows per SNLI split in the test archive (enough for a tiny training run)


def _sha1(path):
    return hashlib.sha1(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
    """``{name: (file name, sha1)}`` of the served archives; dev rows stand in for train."""
    root = tmp_path_factory.mktemp("serve")
    rows = {"train": tsv_rows("dev")[:N_ROWS], "dev": tsv_rows("dev")[N_ROWS:2 * N_ROWS],
            "test": tsv_rows("test")[:N_ROWS]}
    with zipfile.ZipFile(root / "snli_1.0.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        for split, r in rows.items():
            zf.writestr(f"snli_1.0/snli_1.0_{split}.txt", official_snli_text(r))
        zf.writestr("__MACOSX/snli_1.0/._snli_1.0_dev.txt", "junk the real archive has too")
    with gzip.open(os.path.join(PACKAGED_DIR, "wikitext-2", "wiki.valid.tokens.gz"), "rb") as f:
        valid = f.read()
    with zipfile.ZipFile(root / "wikitext-2-v1.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        for split in ("train", "valid", "test"):
            zf.writestr(f"wikitext-2/wiki.{split}.tokens", valid)
    with zipfile.ZipFile(root / "broken.zip", "w") as zf:  # wikitext-2 without its test split
        zf.writestr("wikitext-2/wiki.train.tokens", valid)
    names = ("snli_1.0.zip", "wikitext-2-v1.zip", "broken.zip")
    return root, {n: _sha1(root / n) for n in names}, rows


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.root``; ``server.mode``: ``ok`` (honours Range), ``cut`` (sends the
    first ``server.cut`` bytes of the body, then closes the connection), ``norange``."""

    def do_GET(self):
        srv = self.server
        path = os.path.join(srv.root, self.path.lstrip("/"))
        rng = self.headers.get("Range")
        srv.log.append((self.path, rng))
        if not os.path.isfile(path):
            self.send_error(404)
            return
        data = open(path, "rb").read()
        m = re.fullmatch(r"bytes=(\d+)-", rng or "")
        if m and srv.mode == "ok":
            start = int(m.group(1))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            body = data[start:]
        else:
            self.send_response(200)
            body = data
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if srv.mode == "cut":
            self.wfile.write(body[:srv.cut])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(archives):
    root, _, _ = archives
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.root, httpd.mode, httpd.cut, httpd.log = str(root), "ok", 0, []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def home(tmp_path, monkeypatch):
    path = tmp_path / "home"
    monkeypatch.setenv("FASTBERT_HOME", str(path))
    monkeypatch.delenv("FASTBERT_DATA", raising=False)
    monkeypatch.delenv("FASTBERT_DATA_URL", raising=False)
    return path


def _complete_looking(home):
    """Entries of the cache that a reader could take for finished data."""
    return [n for n in (os.listdir(home) if os.path.isdir(home) else [])
            if not n.endswith(".part")]


def test_download_then_resolution_uses_the_cache(server, archives, home, monkeypatch):
    _, sha1s, rows = archives
    folder = download_data("snli", url=server.url + "/snli_1.0.zip", sha1=sha1s["snli_1.0.zip"],
                           progress=False, verbose=False)
    assert folder == str(home / "snli_1.0")
    assert sorted(os.listdir(home)) == ["snli_1.0", "snli_1.0.zip"]  # no __MACOSX, no temp
    src = locate("snli", ["train", "test"])
    assert src.source == "cache" and src.files["train"] == str(home / "snli_1.0" /
                                                                "snli_1.0_train.txt")
    assert "from the cache (FASTBERT_HOME)" in src.describe()
    premises, hypotheses, labels = read_snli_file(src.files["train"])
    assert premises == [r[1] for r in rows["train"]] and hypotheses == [r[2] for r in rows["train"]]
    assert len(labels) == N_ROWS
    # The cache now comes before the packaged splits for dev/test too.
    assert locate("snli", ["dev", "test"]).source == "cache"
    # A complete copy is not fetched again.
    n = len(server.log)
    download_data("snli", url=server.url + "/snli_1.0.zip", sha1=sha1s["snli_1.0.zip"],
                  progress=False, verbose=False)
    assert len(server.log) == n
    # The mirror variable: the archive under its own file name.
    monkeypatch.setenv("FASTBERT_DATA_URL", server.url + "/")
    download_data("wikitext-2", sha1=sha1s["wikitext-2-v1.zip"], progress=False, verbose=False)
    assert server.log[-1] == ("/wikitext-2-v1.zip", None)
    source, notice = locate_wiki()
    assert source.source == "cache" and notice is None and "train" in source.files


def test_interrupted_download_resumes_with_range(server, archives, home):
    root, sha1s, _ = archives
    size = os.path.getsize(os.path.join(root, "snli_1.0.zip"))
    server.mode, server.cut = "cut", size // 3
    url = server.url + "/snli_1.0.zip"
    with pytest.raises(OSError, match="run again to resume"):
        download_data("snli", url=url, sha1=sha1s["snli_1.0.zip"], progress=False,
                      verbose=False)
    assert os.path.getsize(home / "snli_1.0.zip.part") == size // 3
    assert _complete_looking(home) == []
    with pytest.raises(DataNotFoundError):
        locate("snli", ["train"])
    server.mode = "ok"
    download_data("snli", url=url, sha1=sha1s["snli_1.0.zip"], progress=False, verbose=False)
    assert server.log[-1] == ("/snli_1.0.zip", f"bytes={size // 3}-")  # asked for the rest
    assert _sha1(home / "snli_1.0.zip") == sha1s["snli_1.0.zip"]
    assert not (home / "snli_1.0.zip.part").exists()
    assert locate("snli", ["train", "dev", "test"]).source == "cache"


def test_server_ignoring_range_still_works(server, archives, home):
    _, sha1s, _ = archives
    home.mkdir()
    (home / "snli_1.0.zip.part").write_bytes(b"not the archive's first bytes" * 50)
    server.mode = "norange"
    download_data("snli", url=server.url + "/snli_1.0.zip", sha1=sha1s["snli_1.0.zip"],
                  progress=False, verbose=False)
    assert server.log[-1][1] == f"bytes={29 * 50}-"  # asked for a range, got the whole file
    assert _sha1(home / "snli_1.0.zip") == sha1s["snli_1.0.zip"]
    assert locate("snli", ["train"]).source == "cache"


def test_sha1_mismatch_leaves_nothing(server, home):
    with pytest.raises(ValueError, match="sha1 mismatch .* expected 0{40}, got [0-9a-f]{40}"):
        download_data("snli", url=server.url + "/snli_1.0.zip", sha1="0" * 40,
                      progress=False, verbose=False)
    assert os.listdir(home) == []
    with pytest.raises(OSError, match="could not download .*missing.zip.*HTTP Error 404"):
        download_data("snli", url=server.url + "/missing.zip", sha1="0" * 40, progress=False,
                      verbose=False)
    assert os.listdir(home) == []


def test_incomplete_archive_is_not_extracted(server, archives, home):
    _, sha1s, _ = archives
    with pytest.raises(ValueError, match="lacks wikitext-2/wiki.valid.tokens"):
        download_data("wikitext-2", url=server.url + "/broken.zip", sha1=sha1s["broken.zip"],
                      progress=False, verbose=False)
    assert sorted(os.listdir(home)) == ["broken.zip"]  # the verified archive, no folder


def test_cli_download_flag(server, archives, home, monkeypatch, capsys, one_thread):  # noqa: F811
    from fastbert import hub
    _, sha1s, _ = archives
    monkeypatch.setitem(hub.DATA_HUB, "SNLI", (server.url + "/snli_1.0.zip",
                                               sha1s["snli_1.0.zip"]))
    args = ["finetune", "--download", "--train-split", "train", "--train-limit", "64",
            "--test-limit", "32", "--epochs", "1", "--batch-size", "32", "--max-len", "64",
            "--backend", "reference", "--no-progress", "--num-hiddens", "32",
            "--ffn-num-hiddens", "64", "--num-heads", "2", "--num-layers", "1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "extracted to " + str(home / "snli_1.0") in out
    assert "data: SNLI from the cache (FASTBERT_HOME): train: " + str(
        home / "snli_1.0" / "snli_1.0_train.txt") in out
    assert "test acc" in out
