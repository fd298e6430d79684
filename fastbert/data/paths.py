"""Where the data comes from: one resolution order for every command and helper.

1. ``--data-dir`` (``data_dir=``): when given, the only place looked;
2. ``FASTBERT_DATA``;
3. a full copy in the cache (``FASTBERT_HOME``, default ``~/.cache/fastbert``; what
   ``--download`` / :func:`fastbert.data.download_data` writes);
4. the splits packaged with fastbert (SNLI dev and test, WikiText-2 valid).

Sources 2-4 are tried in order; the first that holds every requested split is used, so a
run's splits always come from one copy.  Nothing here looks beside the repository.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = ["PACKAGED_DIR", "DataSource", "DataNotFoundError", "fastbert_home", "locate",
           "locate_wiki", "packaged_manifest", "verify_packaged", "not_found_hint"]

PACKAGED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "packaged")

# Per dataset: a display name, the command that uses it, the splits that ship, the license.
DATASETS = {
    "snli": dict(label="SNLI", command="finetune", packaged=("dev", "test"),
                 license="CC BY-SA 4.0"),
    "wikitext-2": dict(label="WikiText-2", command="pretrain", packaged=("valid",),
                       license="CC BY-SA 3.0"),
}

SOURCE_NAMES = {"argument": "--data-dir", "FASTBERT_DATA": "FASTBERT_DATA",
                "cache": "the cache (FASTBERT_HOME)", "packaged": "the data packaged with fastbert"}


class DataNotFoundError(FileNotFoundError):
    """A dataset split is in none of the places looked; the message says where it looked and
    how to get it."""


def fastbert_home() -> str:
    """The cache root: ``FASTBERT_HOME``, else ``FASTBERT_CACHE`` (older name, same meaning),
    else ``~/.cache/fastbert``.  Downloads (data archives, pretrained weights) and their
    extracted folders live here."""
    return (os.environ.get("FASTBERT_HOME") or os.environ.get("FASTBERT_CACHE")
            or os.path.join(os.path.expanduser("~"), ".cache", "fastbert"))


def _dataset(dataset: str) -> dict:
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r} (known: {', '.join(DATASETS)})")
    return DATASETS[dataset]


def _find(dataset: str, root: str, split: str) -> Optional[str]:
    # The readers' own finders, so resolution accepts exactly the layouts they read.
    from .snli import snli_file_candidates
    from .wiki import wiki_file_candidates
    candidates = (snli_file_candidates if dataset == "snli" else wiki_file_candidates)(root, split)
    return next((p for p in candidates if os.path.isfile(p)), None)


def not_found_hint(dataset: str) -> str:
    """How to get a dataset: the text every 'data not found' error ends with."""
    d = _dataset(dataset)
    packaged = " and ".join(repr(s) for s in d["packaged"])
    return (f"To use other data, pass --data-dir DIR (data_dir=) or set FASTBERT_DATA=DIR; "
            f"`python -m fastbert {d['command']} --download` (fastbert.data.download_data("
            f"{dataset!r})) fetches the full {d['label']} into the cache ({fastbert_home()}). "
            f"Packaged with fastbert: {d['label']} {packaged} only.")


# ----------------------------------------------------------------------------- packaged
_VERIFIED: Dict[Tuple[str, int, int], bool] = {}


def packaged_manifest() -> Dict[str, str]:
    """``{relative path: sha256}`` of the packaged files (``packaged/SHA256SUMS``)."""
    path = os.path.join(PACKAGED_DIR, "SHA256SUMS")
    out = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2 or len(parts[0]) != 64:
                raise ValueError(f"{path}:{lineno}: expected '<sha256>  <path>'")
            out[parts[1].lstrip("*")] = parts[0]
    return out


def verify_packaged(path: str) -> str:
    """``path`` (a packaged file) after checking its sha256 against the manifest (once per
    process and file version); a damaged or unlisted file is an error."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key in _VERIFIED:
        return path
    rel = os.path.relpath(os.path.abspath(path), PACKAGED_DIR).replace(os.sep, "/")
    expected = packaged_manifest().get(rel)
    if expected is None:
        raise ValueError(f"{path} is not listed in {os.path.join(PACKAGED_DIR, 'SHA256SUMS')}")
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    if sha.hexdigest() != expected:
        raise ValueError(f"the packaged file {path} is damaged: sha256 {sha.hexdigest()}, "
                         f"expected {expected}; reinstall fastbert")
    _VERIFIED[key] = True
    return path


# ----------------------------------------------------------------------------- resolution
@dataclasses.dataclass(frozen=True)
class DataSource:
    """Where a run's data comes from: ``source`` is ``argument``, ``FASTBERT_DATA``,
    ``cache`` or ``packaged``; ``root`` the folder; ``files`` one path per split."""
    dataset: str
    source: str
    root: str
    files: Dict[str, str]

    def describe(self) -> str:
        d = DATASETS[self.dataset]
        where = SOURCE_NAMES[self.source]
        if self.source == "packaged":
            where += f" ({d['license']})"
        splits = ", ".join(f"{s}: {p}" for s, p in self.files.items())
        return f"data: {d['label']} from {where}: {splits}"


def _candidates(data_dir: Optional[str]) -> List[Tuple[str, str]]:
    if data_dir:
        return [("argument", data_dir)]
    out = []
    env = os.environ.get("FASTBERT_DATA")
    if env:
        if not os.path.isdir(env):
            raise DataNotFoundError(f"FASTBERT_DATA={env!r} is not a folder (unset it, or point "
                                    "it at a folder holding the data)")
        out.append(("FASTBERT_DATA", env))
    out.append(("cache", fastbert_home()))
    out.append(("packaged", PACKAGED_DIR))
    return out


def _looked(dataset: str, tried: List[Tuple[str, str]], data_dir: Optional[str]) -> str:
    lines = [f"  {SOURCE_NAMES[src]}: {root}" for src, root in tried]
    if data_dir:
        lines.append("  (only --data-dir is searched when it is given)")
    elif not os.environ.get("FASTBERT_DATA"):
        lines.insert(0, "  FASTBERT_DATA: not set")
    files = ("snli_1.0_<split>.txt or snli_1.0_<split>.tokenized.tsv[.gz], also in snli_1.0/ "
             "or snli/" if dataset == "snli" else "wiki.<split>.tokens[.gz], also in wikitext-2/")
    return f"Looked for {files} in:\n" + "\n".join(lines)


def locate(dataset: str, splits: Sequence[str], data_dir: Optional[str] = None) -> DataSource:
    """The first source (see the module docstring) holding every split in ``splits``;
    :class:`DataNotFoundError` naming where it looked and how to get the data otherwise."""
    d = _dataset(dataset)
    splits = list(dict.fromkeys(splits))
    tried = _candidates(data_dir)
    for source, root in tried:
        files = {s: _find(dataset, root, s) for s in splits}
        if all(files.values()):
            if source == "packaged":
                for p in files.values():
                    verify_packaged(p)
            return DataSource(dataset, source, os.path.abspath(root),
                              {s: os.path.abspath(p) for s, p in files.items()})
    found_somewhere = {s for source, root in tried for s in splits if _find(dataset, root, s)}
    missing = [s for s in splits if s not in found_somewhere]
    what = " and ".join(repr(s) for s in splits)
    noun = "split" if len(splits) == 1 else "splits"
    detail = (f" (no {' or '.join(repr(s) for s in missing)} anywhere)"
              if missing and len(splits) > 1 else
              "" if missing else " (in one place together)")
    raise DataNotFoundError(f"no {d['label']} {what} {noun} found{detail}. "
                            f"{_looked(dataset, tried, data_dir)}\n{not_found_hint(dataset)}")


def locate_wiki(split: Optional[str] = None,
                data_dir: Optional[str] = None) -> Tuple[DataSource, Optional[str]]:
    """WikiText-2 for pretraining: ``(source, notice)``.  ``split=None`` means the book's
    ``train``; when no source has it and ``data_dir`` is not given, the packaged ``valid``
    split is used and ``notice`` says so (an explicitly named split is never replaced)."""
    if split is not None or data_dir:
        return locate("wikitext-2", [split or "train"], data_dir), None
    try:
        return locate("wikitext-2", ["train"]), None
    except DataNotFoundError:
        valid = verify_packaged(_find("wikitext-2", PACKAGED_DIR, "valid"))  # always ships
        src = DataSource("wikitext-2", "packaged", PACKAGED_DIR, {"valid": valid})
        notice = ("note: no WikiText-2 'train' split in FASTBERT_DATA, the cache or the package; "
                  f"pretraining on the 'valid' split from {SOURCE_NAMES[src.source]} instead "
                  "(about 1/10 of train: not the book's run). For the book's run: "
                  "`python -m fastbert pretrain --download`, or --data-dir / FASTBERT_DATA.")
        return src, notice
