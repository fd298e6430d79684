"""Load the real ``d2l`` packages (0.17.6 and 1.0.3) side by side, for parity tests.

Both are installed as plain folders (``pip install --no-deps --target .deps/d2l-<version>
d2l==<version>``, done by scripts/setup.sh), because they share the module name ``d2l`` and
pin ancient numpy/pandas.  ``d2l.torch`` imports torchvision, which does not install beside
the CPU torch here and which the BERT code never uses: a stand-in module takes its place in
this process only.  The comparison stays live: the classes under test are d2l's own code.
"""
from __future__ import annotations

import importlib
import os
import sys
import types

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VERSIONS = ("0.17.6", "1.0.3")
_cache: dict = {}


def d2l_dir(version: str) -> str:
    env = os.environ.get("FASTBERT_D2L_" + version.replace(".", "_"))
    return env or os.path.join(REPO, ".deps", f"d2l-{version}")


_STAND_IN_NAMES = ("torchvision", "torchvision.transforms", "torchvision.datasets")


def _install_torchvision_stand_in() -> bool:
    """Put a stand-in torchvision in sys.modules; False if a real one is already there."""
    if "torchvision" in sys.modules:
        return False
    tv = types.ModuleType("torchvision")
    tv.__path__ = []  # a package, so `from torchvision import transforms` works
    tv.transforms = types.ModuleType("torchvision.transforms")
    tv.datasets = types.ModuleType("torchvision.datasets")
    sys.modules.update({"torchvision": tv, "torchvision.transforms": tv.transforms,
                        "torchvision.datasets": tv.datasets})
    return True


def load_d2l(version: str):
    """The ``d2l.torch`` module of that version (skips the test when it is not installed)."""
    if version in _cache:
        return _cache[version]
    path = d2l_dir(version)
    if not os.path.isdir(os.path.join(path, "d2l")):
        pytest.skip(f"d2l {version} is not installed at {path} (run scripts/setup.sh)")
    stand_in = _install_torchvision_stand_in()
    saved = {k: v for k, v in sys.modules.items() if k == "d2l" or k.startswith("d2l.")}
    for k in saved:
        del sys.modules[k]
    sys.path.insert(0, path)
    try:
        module = importlib.import_module("d2l.torch")
    finally:
        sys.path.remove(path)
        # Forget this version's module names so the other version can be imported too; the
        # returned module keeps working (its functions hold their own globals).
        for k in [k for k in sys.modules if k == "d2l" or k.startswith("d2l.")]:
            del sys.modules[k]
        sys.modules.update(saved)
        if stand_in:
            # d2l holds its references now; other libraries (transformers) probe for a real
            # torchvision and must not find the stand-in.
            for k in _STAND_IN_NAMES:
                sys.modules.pop(k, None)
    _cache[version] = module
    return module
