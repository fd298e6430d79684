"""Downloads into the cache: resumable, sha1-checked, atomic.

* :func:`fetch` streams a URL to ``dest.part``.  An interrupted transfer keeps the part
  and the next call asks the server for the rest (HTTP ``Range``); a server that answers
  with the whole file instead is read from the start.  The whole file's sha1 is checked,
  then the part is fsynced and renamed to ``dest``: a file under its final name is complete.
* :func:`extract_atomic` extracts an archive into a temporary folder beside the target and
  renames the finished folders into place, so a half-extracted folder never has the name
  of a complete one.
* :func:`download_data` fetches the book's SNLI or WikiText-2 archive (``DATA_HUB``) into
  ``FASTBERT_HOME``, where :func:`fastbert.data.paths.locate` finds it.  ``url=`` or the
  ``FASTBERT_DATA_URL`` environment variable (a mirror serving the archives under their
  own file names) replaces the original address.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import re
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from typing import Iterable, Optional

from .._fsync import fsync_dir as _fsync_dir

__all__ = ["fetch", "extract_atomic", "download_data", "download_data_once", "DATASET_ARCHIVES",
           "sha1_of"]

_CHUNK = 1 << 20

# dataset -> (DATA_HUB key, folder in the archive, files that make the folder complete)
DATASET_ARCHIVES = {
    "snli": ("SNLI", "snli_1.0", tuple(f"snli_1.0_{s}.txt" for s in ("train", "dev", "test"))),
    "wikitext-2": ("wikitext-2", "wikitext-2",
                   tuple(f"wiki.{s}.tokens" for s in ("train", "valid", "test"))),
}


def sha1_of(path: str) -> str:
    sha1 = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            sha1.update(block)
    return sha1.hexdigest()


def _bar(total: Optional[int], initial: int, name: str, enabled: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024,
                desc=name, disable=not enabled, leave=False)


def _open(url: str, offset: int):
    """``(response, offset)``: the response to a request for ``url`` from byte ``offset``
    and the offset it really starts at (0 when the server sent the whole file)."""
    headers = {"User-Agent": "fastbert"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # the part already holds the whole file (or more)
            e.close()
            return None, offset
        raise
    if offset and getattr(resp, "status", None) == 206:
        m = re.match(r"bytes (\d+)-", resp.headers.get("Content-Range", ""))
        if m and int(m.group(1)) == offset:
            return resp, offset
        resp.close()  # a range we did not ask for: start over
        return _open(url, 0)
    return resp, 0


def fetch(url: str, dest: str, sha1_hash: Optional[str] = None, *,
          progress: bool = True) -> str:
    """Download ``url`` to ``dest`` (resuming ``dest.part``), check its sha1, and rename
    it into place; returns ``dest``.  ``OSError`` when the transfer fails (the bytes
    received stay in ``dest.part`` for the next call), ``ValueError`` on a sha1 mismatch
    (the part is deleted: nothing is left that looks complete)."""
    part = dest + ".part"
    have = os.path.getsize(part) if os.path.exists(part) else 0
    try:
        resp, start = _open(url, have)
        if resp is not None:
            with resp:
                length = resp.headers.get("Content-Length")
                total = start + int(length) if length and length.isdigit() else None
                bar = _bar(total, start, os.path.basename(dest), progress)
                try:
                    with open(part, "ab" if start else "wb") as out:
                        for block in iter(lambda: resp.read(_CHUNK), b""):
                            out.write(block)
                            if bar is not None:
                                bar.update(len(block))
                finally:
                    if bar is not None:
                        bar.close()
                got = os.path.getsize(part)
                if total is not None and got < total:  # http.client's read() ends quietly
                    raise http.client.IncompleteRead(b"", total - got)
    except (OSError, http.client.HTTPException, ValueError) as e:
        got = os.path.getsize(part) if os.path.exists(part) else 0
        if not got and os.path.exists(part):
            os.remove(part)
        kept = (f"; {got} bytes kept in {part}: run again to resume" if got else "")
        raise OSError(f"could not download {url} to {dest}: {type(e).__name__}: {e}{kept}") from e
    if sha1_hash is not None:
        got_sha1 = sha1_of(part)
        if got_sha1 != sha1_hash:
            os.remove(part)
            raise ValueError(f"sha1 mismatch for {url}: expected {sha1_hash}, got {got_sha1}; "
                             "the download is corrupt or the file changed (nothing was cached; "
                             "the partial file was deleted)")
    with open(part, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(part, dest)
    _fsync_dir(os.path.dirname(os.path.abspath(dest)))
    return dest


def _members_inside(archive: str, dest: str, names: Iterable[str]) -> None:
    dest_real = os.path.realpath(dest)
    for name in names:
        target = os.path.realpath(os.path.join(dest, name))
        if target != dest_real and not target.startswith(dest_real + os.sep):
            raise ValueError(f"{archive}: member {name!r} would extract outside {dest}")


def _extract(archive: str, dest: str) -> None:
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            _members_inside(archive, dest, zf.namelist())
            zf.extractall(dest)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            _members_inside(archive, dest, (m.name for m in tf.getmembers()))
            tf.extractall(dest)
    else:
        raise ValueError(f"{archive} is neither a zip nor a tar archive")


def extract_atomic(archive: str, dest_dir: str, keep: Optional[Iterable[str]] = None,
                   expect: Iterable[str] = ()) -> None:
    """Extract ``archive`` and move its top-level entries (only those in ``keep``, if given)
    into ``dest_dir``, each by one rename, after checking that every path in ``expect``
    (relative to the archive root) was extracted.  An entry already in ``dest_dir`` is
    replaced."""
    os.makedirs(dest_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".extract-", dir=dest_dir)
    try:
        _extract(archive, tmp)
        missing = [p for p in expect if not os.path.exists(os.path.join(tmp, p))]
        if missing:
            raise ValueError(f"{archive} lacks {', '.join(missing)}; is it the right archive?")
        names = sorted(os.listdir(tmp)) if keep is None else list(keep)
        for name in names:
            target = os.path.join(dest_dir, name)
            if os.path.lexists(target):  # move the old copy aside, then swap in the new one
                old = tempfile.mkdtemp(prefix=".old-", dir=dest_dir)
                os.replace(target, os.path.join(old, name))
                os.replace(os.path.join(tmp, name), target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(os.path.join(tmp, name), target)
        _fsync_dir(dest_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _archive_url(name: str, url: Optional[str]) -> str:
    from ..hub import DATA_HUB
    official = DATA_HUB[DATASET_ARCHIVES[name][0]][0]
    if url:
        return url
    mirror = os.environ.get("FASTBERT_DATA_URL")
    if mirror:
        return mirror.rstrip("/") + "/" + official.rsplit("/", 1)[-1]
    return official


def download_data(name: str, *, cache_dir: Optional[str] = None, url: Optional[str] = None,
                  sha1: Optional[str] = None, progress: bool = True,
                  verbose: bool = True) -> str:
    """Fetch the full ``"snli"`` or ``"wikitext-2"`` archive of the book's ``DATA_HUB`` into
    the cache (``cache_dir``, default ``FASTBERT_HOME``) and extract it there; returns the
    extracted folder.  Does nothing when a complete copy is already there.  ``url``
    (or ``FASTBERT_DATA_URL``, a mirror folder) and ``sha1`` override the book's address
    and checksum."""
    from ..hub import DATA_HUB
    from .paths import fastbert_home
    key = name.lower()
    if key not in DATASET_ARCHIVES:
        raise ValueError(f"unknown dataset {name!r}; download_data knows "
                         f"{', '.join(map(repr, DATASET_ARCHIVES))}")
    hub_key, folder, files = DATASET_ARCHIVES[key]
    root = cache_dir or fastbert_home()
    target = os.path.join(root, folder)
    if all(os.path.isfile(os.path.join(target, f)) for f in files):
        if verbose:
            print(f"{key}: a complete copy is already in {target}")
        return target
    src = _archive_url(key, url)
    sha1 = sha1 or DATA_HUB[hub_key][1]
    os.makedirs(root, exist_ok=True)
    archive = os.path.join(root, urllib.parse.urlparse(src).path.rsplit("/", 1)[-1]
                           or f"{folder}.zip")
    if not (os.path.isfile(archive) and sha1_of(archive) == sha1):
        if verbose:
            print(f"downloading {src} to {archive}")
        fetch(src, archive, sha1, progress=progress)
    extract_atomic(archive, root, keep=[folder], expect=[f"{folder}/{f}" for f in files])
    if verbose:
        print(f"{key}: extracted to {target}")
    return target


def download_data_once(name: str, **kwargs) -> str:
    """:func:`download_data` on rank 0 of a ``torch.distributed`` run while the other ranks
    wait (every process sharing one cache would otherwise fetch the same archive); a failure
    on rank 0 raises on every rank."""
    import torch.distributed as tdist
    if not (tdist.is_available() and tdist.is_initialized()):
        return download_data(name, **kwargs)
    status, error = [None], None
    if tdist.get_rank() == 0:
        try:
            status[0] = ("ok", download_data(name, **kwargs))
        except Exception as e:  # noqa: BLE001 - every rank raises it below
            status[0], error = ("error", f"{type(e).__name__}: {e}"), e
    tdist.broadcast_object_list(status, src=0)
    kind, value = status[0]
    if error is not None:
        raise error
    if kind == "error":
        raise OSError(f"--download failed on rank 0: {value}")
    return value
