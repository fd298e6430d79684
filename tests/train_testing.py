"""Shared helpers for the data/hub/training tests: where the real data lives (the repo's
``../shared/data``, or ``FASTBERT_DATA``), skipping cleanly when it is absent, and a
single-thread setting (tiny models are dominated by thread hand-offs on a shared CPU)."""
import os

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.environ.get("FASTBERT_DATA") or os.path.normpath(
    os.path.join(REPO, "..", "shared", "data"))
SNLI = os.path.join(DATA, "snli")
SNLI_SAMPLES = os.path.join(SNLI, "samples")
WIKI = os.path.join(DATA, "wikitext-2")

# A tiny model for training tests (bert.small's layout, much smaller).
TINY = dict(num_hiddens=32, ffn_num_hiddens=64, num_heads=2, num_layers=1)


def need(path: str) -> str:
    """``path`` if it exists, else skip the test with the reason."""
    if not os.path.exists(path):
        pytest.skip(f"real data not found at {path} (set FASTBERT_DATA or provide "
                    f"../shared/data next to the repo)")
    return path


@pytest.fixture
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
