"""Where the data lives by default: ``FASTBERT_DATA`` or ``<repo>/../shared/data``."""
from __future__ import annotations

import os

__all__ = ["default_data_dir"]


def default_data_dir() -> str:
    env = os.environ.get("FASTBERT_DATA")
    if env:
        return env
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return os.path.normpath(os.path.join(repo, "..", "shared", "data"))
