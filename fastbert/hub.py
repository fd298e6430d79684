"""The book's pretrained BERT weights: ``DATA_HUB``, ``download``, ``download_extract`` and
the fine-tuning chapter's ``load_pretrained_model``.

Differences from d2l, all on the safe side: downloads stream to a ``.part`` file (an
interrupted one resumes with an HTTP Range request) and are sha1-checked before they enter
the cache (a mismatch raises and leaves nothing behind); extraction is atomic per folder;
``file://`` URLs work (offline mirrors, tests); archives are extracted only inside their
folder; ``load_pretrained_model`` also takes a local folder or ``.zip`` path.
"""
from __future__ import annotations

import os
import zipfile
from typing import Dict, Optional, Sequence, Tuple

import torch

from .bert import BERTModel
from .data.download import extract_atomic, fetch, sha1_of
from .data.paths import fastbert_home
from .data.vocab import Vocab

__all__ = ["DATA_URL", "DATA_HUB", "default_cache_dir", "sha1_of", "download",
           "download_extract", "resolve_pretrained_dir", "load_pretrained_model",
           "infer_bert_config"]

DATA_URL = "http://d2l-data.s3-accelerate.amazonaws.com/"
DATA_HUB: Dict[str, Tuple[str, str]] = {
    "bert.base": (DATA_URL + "bert.base.torch.zip", "225d66f04cae318b841a13d32af3acc165f253ac"),
    "bert.small": (DATA_URL + "bert.small.torch.zip", "c72329e68a732bef0452e4b96a1c341c8910f81f"),
    "SNLI": ("https://nlp.stanford.edu/projects/snli/snli_1.0.zip",
             "9fcde07509c7e87ec61c640c1b2753d9041758e4"),
    "wikitext-2": ("https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-2-v1.zip",
                   "3c914d17d80b1459be871a5039ac23e752a53cbe"),
}


def default_cache_dir() -> str:
    """The cache root, shared with the data downloads: ``FASTBERT_HOME``, else
    ``FASTBERT_CACHE`` (the older name), else ``~/.cache/fastbert`` (the book uses
    ``../data``)."""
    return fastbert_home()


def _fetch(url: str, dest: str, sha1_hash: Optional[str]) -> None:
    """Download ``url`` to ``dest``: resumable through ``dest.part``, sha1-checked before
    it enters the cache (see :func:`fastbert.data.download.fetch`)."""
    fetch(url, dest, sha1_hash)


def download(name: str, cache_dir: Optional[str] = None) -> str:
    """Download a ``DATA_HUB`` entry (or use the cached copy whose sha1 matches) and return
    the local file name (d2l)."""
    if name not in DATA_HUB:
        raise KeyError(f"{name!r} is not in DATA_HUB (known: {sorted(DATA_HUB)})")
    url, sha1_hash = DATA_HUB[name]
    cache_dir = cache_dir or default_cache_dir()
    os.makedirs(cache_dir, exist_ok=True)
    fname = os.path.join(cache_dir, url.split("/")[-1])
    if os.path.exists(fname) and sha1_of(fname) == sha1_hash:
        return fname  # cache hit
    print(f"Downloading {fname} from {url}...")
    _fetch(url, fname, sha1_hash)
    return fname


def download_extract(name: str, folder: Optional[str] = None,
                     cache_dir: Optional[str] = None) -> str:
    """Download and extract a zip/tar ``DATA_HUB`` entry next to the archive; return
    ``<cache>/<folder>`` or the archive name without its extension (d2l)."""
    fname = download(name, cache_dir)
    base_dir = os.path.dirname(fname)
    data_dir, ext = os.path.splitext(fname)
    if ext not in (".zip", ".tar", ".gz"):
        raise ValueError(f"only zip/tar files can be extracted, got {fname}")
    extract_atomic(fname, base_dir)  # each top-level folder appears complete or not at all
    return os.path.join(base_dir, folder) if folder else data_dir


def _find_book_folder(root: str) -> Optional[str]:
    for dirpath, _, files in os.walk(root):
        if "vocab.json" in files and "pretrained.params" in files:
            return dirpath
    return None


def resolve_pretrained_dir(pretrained_model: str, cache_dir: Optional[str] = None) -> str:
    """The folder holding ``vocab.json`` and ``pretrained.params`` for a ``DATA_HUB`` name,
    a local folder, or a local ``.zip`` (extracted into the cache, keyed by its sha1)."""
    if pretrained_model in DATA_HUB:
        path = download_extract(pretrained_model, cache_dir=cache_dir)
    elif os.path.isdir(pretrained_model):
        path = pretrained_model
    elif os.path.isfile(pretrained_model) and zipfile.is_zipfile(pretrained_model):
        dest = os.path.join(cache_dir or default_cache_dir(), "extracted",
                            sha1_of(pretrained_model))
        if _find_book_folder(dest) is None:
            os.makedirs(dest, exist_ok=True)
            extract_atomic(pretrained_model, dest)
        path = dest
    else:
        raise FileNotFoundError(
            f"pretrained model {pretrained_model!r} is neither a DATA_HUB name "
            f"({', '.join(n for n in DATA_HUB if n.startswith('bert'))}), a folder nor a .zip")
    found = _find_book_folder(path)
    if found is None:
        raise FileNotFoundError(f"{path} holds no vocab.json and pretrained.params "
                                "(the book's pretrained format)")
    return found


def infer_bert_config(state_dict) -> dict:
    """Sizes of a d2l ``BERTModel`` state_dict (heads are not stored: ``num_hiddens // 64``,
    which is right for bert.small (4) and bert.base (12))."""
    try:
        vocab_size, num_hiddens = state_dict["encoder.token_embedding.weight"].shape
        max_len = state_dict["encoder.pos_embedding"].shape[1]
        ffn = state_dict["encoder.blks.0.ffn.dense1.weight"].shape[0]
    except KeyError as e:
        raise ValueError(f"not a d2l BERTModel state_dict: missing {e}") from None
    num_layers = len({k.split(".")[2] for k in state_dict if k.startswith("encoder.blks.")})
    return dict(vocab_size=vocab_size, num_hiddens=num_hiddens, ffn_num_hiddens=ffn,
                num_heads=max(1, num_hiddens // 64), num_layers=num_layers, max_len=max_len)


def load_pretrained_model(pretrained_model: str, num_hiddens: int, ffn_num_hiddens: int,
                          num_heads: int, num_layers: int, dropout: float, max_len: int,
                          devices: Sequence[torch.device] = (), *, book_dropout: bool = True,
                          cache_dir: Optional[str] = None, **model_options):
    """The fine-tuning chapter's ``load_pretrained_model``: returns ``(bert, vocab)``.

    Like the book, the ``dropout`` argument is ignored and 0.2 is used (the book passes 0.1
    and hard-codes 0.2); ``book_dropout=False`` honours the argument.  The book also
    hard-codes the bert.small sizes (256, 4 heads, 2 layers); here the arguments are used,
    which is the same model for the book's bert.small call and lets bert.base load.  The
    model stays on the CPU, as in the book (``train_ch13`` moves it).  ``devices`` is
    accepted for signature compatibility.
    """
    data_dir = resolve_pretrained_dir(pretrained_model, cache_dir)
    vocab = Vocab.load_json(os.path.join(data_dir, "vocab.json"))
    bert = BERTModel(len(vocab), num_hiddens, norm_shape=[num_hiddens],
                     ffn_num_input=num_hiddens, ffn_num_hiddens=ffn_num_hiddens,
                     num_heads=num_heads, num_layers=num_layers,
                     dropout=0.2 if book_dropout else dropout, max_len=max_len,
                     key_size=num_hiddens, query_size=num_hiddens, value_size=num_hiddens,
                     hid_in_features=num_hiddens, mlm_in_features=num_hiddens,
                     nsp_in_features=num_hiddens, **model_options)
    params = os.path.join(data_dir, "pretrained.params")
    try:
        state = torch.load(params, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read {params} as a PyTorch state_dict: {e}") from e
    try:
        bert.load_state_dict(state, strict=True)
    except RuntimeError as e:
        got = infer_bert_config(state) if isinstance(state, dict) else "not a state_dict"
        raise ValueError(f"{params} does not fit a BERTModel(num_hiddens={num_hiddens}, "
                         f"ffn_num_hiddens={ffn_num_hiddens}, num_layers={num_layers}, "
                         f"max_len={max_len}, vocab={len(vocab)}); the file holds {got}.\n{e}"
                         ) from e
    return bert, vocab
