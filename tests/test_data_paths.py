"""Where the data comes from (fastbert.data.paths): the packaged splits and their manifest,
the resolution order --data-dir > FASTBERT_DATA > cache > packaged, the pretraining
fallback to the packaged valid split, the errors, and the no-argument commands run from
outside the repository."""
import gzip
import hashlib
import os
import shutil
import subprocess
import sys

import pytest

from fastbert import hub
from fastbert.cli import main
from fastbert.data import paths
from fastbert.data import DataNotFoundError, fastbert_home, locate, locate_wiki
from train_testing import REPO, TINY, one_thread  # noqa: F401


@pytest.fixture
def env(tmp_path, monkeypatch):
    """An empty cache, no FASTBERT_DATA: only the packaged data is there."""
    monkeypatch.setenv("FASTBERT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("FASTBERT_DATA", raising=False)
    monkeypatch.delenv("FASTBERT_CACHE", raising=False)
    return tmp_path


def _copy_snli(dest, splits=("dev", "test")):
    os.makedirs(dest, exist_ok=True)
    for s in splits:
        shutil.copy(os.path.join(paths.PACKAGED_DIR, "snli", f"snli_1.0_{s}.tokenized.tsv.gz"),
                    dest)
    return str(dest)


def test_packaged_files_match_manifest_and_carry_licenses():
    manifest = paths.packaged_manifest()
    shipped = sorted(f"{d}/{n}" for d in ("snli", "wikitext-2")
                     for n in os.listdir(os.path.join(paths.PACKAGED_DIR, d)))
    assert sorted(manifest) == shipped == [
        "snli/snli_1.0_dev.tokenized.tsv.gz", "snli/snli_1.0_test.tokenized.tsv.gz",
        "wikitext-2/wiki.valid.tokens.gz"]
    for rel, sha in manifest.items():
        data = open(os.path.join(paths.PACKAGED_DIR, rel), "rb").read()
        assert hashlib.sha256(data).hexdigest() == sha, rel
    # The data README's figures: rows (plus header) and lines.
    with gzip.open(os.path.join(paths.PACKAGED_DIR, "snli/snli_1.0_dev.tokenized.tsv.gz"), "rt") as f:
        assert sum(1 for _ in f) == 9842 + 1
    with gzip.open(os.path.join(paths.PACKAGED_DIR, "wikitext-2/wiki.valid.tokens.gz"), "rt") as f:
        assert sum(1 for _ in f) == 3760
    readme = open(os.path.join(paths.PACKAGED_DIR, "README.md")).read()
    license_ = open(os.path.join(paths.PACKAGED_DIR, "LICENSE")).read()
    for text in (readme, license_):
        assert "CC BY-SA 4.0" in text or "Attribution-ShareAlike 4.0" in text
        assert "CC BY-SA 3.0" in text or "Attribution-ShareAlike 3.0" in text
    assert "Bowman" in readme and "Merity" in readme and "What was changed" in readme


def test_damaged_packaged_file_is_refused(env, monkeypatch):
    copy = env / "packaged"
    shutil.copytree(paths.PACKAGED_DIR, copy)
    path = copy / "snli" / "snli_1.0_test.tokenized.tsv.gz"
    data = bytearray(path.read_bytes())
    data[100] ^= 1
    path.write_bytes(bytes(data))
    monkeypatch.setattr(paths, "PACKAGED_DIR", str(copy))
    with pytest.raises(ValueError, match="packaged file .*snli_1.0_test.* is damaged"):
        locate("snli", ["dev", "test"])
    assert locate("snli", ["dev"]).source == "packaged"  # the intact one still reads


def test_resolution_order(env, monkeypatch):
    # Nothing named: the packaged splits, never a folder beside the repository.
    src = locate("snli", ["dev", "test"])
    assert src.source == "packaged" and src.root == paths.PACKAGED_DIR
    assert all(p.startswith(paths.PACKAGED_DIR) for p in src.files.values())
    # A complete copy in the cache comes before them.
    cache = _copy_snli(env / "home" / "snli")
    assert locate("snli", ["dev", "test"]).source == "cache"
    # FASTBERT_DATA before the cache.
    data = _copy_snli(env / "data" / "snli")
    monkeypatch.setenv("FASTBERT_DATA", str(env / "data"))
    src = locate("snli", ["dev", "test"])
    assert src.source == "FASTBERT_DATA" and src.files["dev"].startswith(data)
    assert src.describe().startswith("data: SNLI from FASTBERT_DATA: dev: " + data)
    # --data-dir before everything.
    arg = _copy_snli(env / "arg", ["test"])
    assert locate("snli", ["test"], data_dir=arg).source == "argument"
    # A source without every split is passed over: the splits come from one copy.
    os.remove(os.path.join(data, "snli_1.0_dev.tokenized.tsv.gz"))
    src = locate("snli", ["dev", "test"])
    assert src.source == "cache" and all(p.startswith(cache) for p in src.files.values())


def test_data_dir_is_the_only_place_looked(env):
    arg = _copy_snli(env / "arg", ["test"])
    with pytest.raises(DataNotFoundError) as e:
        locate("snli", ["dev", "test"], data_dir=arg)
    msg = str(e.value)
    assert msg.startswith("no SNLI 'dev' and 'test' splits found")
    assert f"--data-dir: {arg}" in msg and "only --data-dir is searched" in msg
    assert "the cache" not in msg.split("To use")[0]
    for name in ("--data-dir", "FASTBERT_DATA", "--download", "download_data('snli')",
                 "Packaged with fastbert: SNLI 'dev' and 'test' only"):
        assert name in msg, name


def test_missing_split_error_lists_every_place(env, monkeypatch):
    with pytest.raises(DataNotFoundError) as e:
        locate("snli", ["train", "test"])
    msg = str(e.value)
    assert "(no 'train' anywhere)" in msg and "FASTBERT_DATA: not set" in msg
    assert f"the cache (FASTBERT_HOME): {env / 'home'}" in msg
    assert f"the data packaged with fastbert: {paths.PACKAGED_DIR}" in msg
    assert "python -m fastbert finetune --download" in msg
    monkeypatch.setenv("FASTBERT_DATA", str(env / "nowhere"))
    with pytest.raises(DataNotFoundError, match="FASTBERT_DATA=.*nowhere.* is not a folder"):
        locate("snli", ["dev"])


def test_wiki_default_split_falls_back_to_packaged_valid(env, monkeypatch):
    src, notice = locate_wiki()
    assert src.source == "packaged" and list(src.files) == ["valid"]
    assert "no WikiText-2 'train' split" in notice and "'valid' split" in notice
    assert "--download" in notice
    with pytest.raises(DataNotFoundError, match="no WikiText-2 'train' split found"):
        locate_wiki("train")  # a named split is never replaced
    with pytest.raises(DataNotFoundError, match="no WikiText-2 'train' split found"):
        locate_wiki(None, data_dir=str(env))  # nor is a named folder's
    wiki = env / "data" / "wikitext-2"
    wiki.mkdir(parents=True)
    shutil.copy(os.path.join(paths.PACKAGED_DIR, "wikitext-2", "wiki.valid.tokens.gz"),
                wiki / "wiki.train.tokens.gz")
    monkeypatch.setenv("FASTBERT_DATA", str(env / "data"))
    src, notice = locate_wiki()
    assert notice is None and src.source == "FASTBERT_DATA" and list(src.files) == ["train"]


def test_one_cache_root_and_its_alias(monkeypatch, tmp_path):
    monkeypatch.delenv("FASTBERT_HOME", raising=False)
    monkeypatch.delenv("FASTBERT_CACHE", raising=False)
    assert fastbert_home() == os.path.join(os.path.expanduser("~"), ".cache", "fastbert")
    monkeypatch.setenv("FASTBERT_CACHE", str(tmp_path / "old"))
    assert fastbert_home() == hub.default_cache_dir() == str(tmp_path / "old")
    monkeypatch.setenv("FASTBERT_HOME", str(tmp_path / "new"))
    assert fastbert_home() == hub.default_cache_dir() == str(tmp_path / "new")


def test_pretrain_without_arguments_says_it_uses_packaged_valid(env, capsys, one_thread):  # noqa: F811
    assert main(["pretrain", "--backend", "reference", "--max-paragraphs", "40",
                 "--max-steps", "2", "--batch-size", "16", "--num-hiddens", "32",
                 "--ffn-num-hiddens", "64", "--max-len", "32", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "note: no WikiText-2 'train' split" in out
    assert ("data: WikiText-2 from the data packaged with fastbert (CC BY-SA 3.0): valid: "
            + os.path.join(paths.PACKAGED_DIR, "wikitext-2", "wiki.valid.tokens.gz")) in out
    assert "MLM loss" in out
    assert main(["pretrain", "--split", "train", "--max-steps", "1"]) == 2
    assert "no WikiText-2 'train' split found" in capsys.readouterr().err


def test_finetune_without_data_arguments_from_another_directory(env):
    # Run where the repository is not the working directory: only PYTHONPATH finds fastbert.
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    p = subprocess.run([sys.executable, "-m", "fastbert", "finetune", "--train-limit", "64",
                        "--test-limit", "32", "--epochs", "1", "--batch-size", "32",
                        "--max-len", "64", "--backend", "reference", "--no-progress",
                        *sum(([f"--{k.replace('_', '-')}", str(v)] for k, v in TINY.items()),
                             [])],
                       cwd=env, env=e, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    snli = os.path.join(paths.PACKAGED_DIR, "snli")
    assert ("data: SNLI from the data packaged with fastbert (CC BY-SA 4.0): dev: "
            f"{snli}/snli_1.0_dev.tokenized.tsv.gz, test: {snli}/snli_1.0_test.tokenized.tsv.gz"
            in p.stdout)
    assert "test acc" in p.stdout
