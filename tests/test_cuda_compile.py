"""Every CUDA kernel file (csrc/cuda/*.cu, no torch headers) compiles with nvcc for sm_80
and sm_90 machine code plus compute_90 PTX (what setup.py's default TORCH_CUDA_ARCH_LIST
"8.0;9.0+PTX" builds).  They cannot run without a GPU; this at least keeps them building.

The thin bindings (csrc/cuda/*_binding.cpp, and registration.cpp with -DFASTBERT_CUDA) are
syntax-checked with g++ against this torch's headers.  A CPU-only torch ships the c10/cuda
headers but not the one CMake generates for a CUDA build (c10/cuda/impl/cuda_cmake_macros.h,
a single macro): the check then stands it in from a temporary folder and says so in its
name.  That is a syntax check against this torch's API (2.13 here), not a build: the real
CUDAExtension build happens on a CUDA torch (scripts/gpu_check.sh)."""
import glob
import os
import shutil
import subprocess
import sysconfig

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
CU_FILES = sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
BINDINGS = sorted(glob.glob(os.path.join(CSRC, "cuda", "*_binding.cpp")))
NVCC = shutil.which("nvcc")


def test_every_op_has_a_cuda_twin():
    names = {os.path.basename(f)[:-3] for f in CU_FILES}
    assert {"masked_softmax", "add_layernorm", "gather_positions", "pack"} <= names
    for name in ("masked_softmax", "add_layernorm", "gather_positions", "pack"):
        assert os.path.join(CSRC, "cuda", f"{name}_binding.cpp") in BINDINGS


@pytest.mark.parametrize("path", CU_FILES, ids=os.path.basename)
def test_cu_file_has_no_torch_headers(path):
    text = open(path).read()
    for banned in ("<torch/", "<ATen/", "<c10/"):
        assert banned not in text, f"{os.path.basename(path)} includes {banned}"


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("path", CU_FILES, ids=os.path.basename)
def test_nvcc_compiles(path, tmp_path):
    cmd = [NVCC, "-c", "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
           "-gencode", "arch=compute_90,code=compute_90", "-I", CSRC, "-o", str(tmp_path / "x.o"), path]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"nvcc failed on {os.path.basename(path)}:\n{proc.stderr[-4000:]}"
    assert (tmp_path / "x.o").stat().st_size > 0


def _torch_cuda_headers(tmp_path):
    """(include paths, whether the generated CUDA macro header had to be stood in)."""
    from torch.utils.cpp_extension import include_paths
    paths = include_paths()
    generated = os.path.join("c10", "cuda", "impl", "cuda_cmake_macros.h")
    if any(os.path.exists(os.path.join(p, generated)) for p in paths):
        return paths, False
    if not any(os.path.exists(os.path.join(p, "c10", "cuda", "CUDAStream.h")) for p in paths):
        pytest.fail("this torch ships no c10/cuda headers: the CUDA bindings cannot be checked")
    stand_in = tmp_path / "stand_in"
    (stand_in / "c10" / "cuda" / "impl").mkdir(parents=True)
    (stand_in / generated).write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    return paths + [str(stand_in)], True


def _cuda_include() -> str:
    """The toolkit's include folder (cuda_runtime_api.h): from torch's CUDA_HOME (CUDA_HOME,
    CUDA_PATH, /usr/local/cuda or nvcc's folder), else beside nvcc.  nvcc on PATH may be a
    wrapper script (here /usr/local/bin/nvcc execs /usr/local/cuda-13.0/bin/nvcc), so its
    real path alone is not enough."""
    from torch.utils.cpp_extension import CUDA_HOME
    candidates = ([CUDA_HOME] if CUDA_HOME else []) + sorted(glob.glob("/usr/local/cuda*"), reverse=True)
    candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(NVCC))))
    for home in candidates:
        inc = os.path.join(home, "include")
        if os.path.exists(os.path.join(inc, "cuda_runtime_api.h")):
            return inc
    pytest.fail(f"nvcc is at {NVCC} but no CUDA include folder with cuda_runtime_api.h was "
                f"found (looked in {candidates}); set CUDA_HOME")


@pytest.mark.skipif(NVCC is None or shutil.which("g++") is None, reason="needs nvcc and g++")
@pytest.mark.parametrize("path", BINDINGS + [os.path.join(CSRC, "registration.cpp")],
                         ids=os.path.basename)
def test_binding_syntax(path, tmp_path):
    paths, stood_in = _torch_cuda_headers(tmp_path)
    cuda_inc = _cuda_include()
    cmd = ["g++", "-fsyntax-only", "-w", "-std=c++17", "-DFASTBERT_CUDA", "-I", CSRC, "-I", cuda_inc,
           "-I", sysconfig.get_paths()["include"]] + [f"-I{p}" for p in paths] + [path]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    note = " (c10/cuda/impl/cuda_cmake_macros.h stood in: CPU-only torch)" if stood_in else ""
    assert proc.returncode == 0, f"{os.path.basename(path)}{note}:\n{proc.stderr[-4000:]}"


def _setup_function(name):
    """One function of setup.py, without running setup() (it is a script)."""
    import ast
    src = open(os.path.join(ROOT, "setup.py")).read()
    fn = next(n for n in ast.parse(src).body if isinstance(n, ast.FunctionDef) and n.name == name)
    import sys
    ns = {"os": os, "sys": sys, "glob": glob, "shutil": shutil}
    exec(compile(ast.Module([fn], []), "setup.py", "exec"), ns)
    return ns[name]


def _fake_toolkit(root):
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    (root / "include" / "cuda_runtime_api.h").write_text("")
    (root / "bin" / "nvcc").write_text("#!/bin/sh\n")
    (root / "bin" / "nvcc").chmod(0o755)


def test_setup_finds_the_toolkit_past_an_nvcc_link(tmp_path, monkeypatch):
    """nvcc on PATH as a link into a toolkit: setup.py names that toolkit as CUDA_HOME (torch
    would take the link's grandparent, which holds no CUDA headers)."""
    _fake_toolkit(tmp_path / "toolkit")
    (tmp_path / "wrappers" / "bin").mkdir(parents=True)
    (tmp_path / "wrappers" / "bin" / "nvcc").symlink_to(tmp_path / "toolkit" / "bin" / "nvcc")
    monkeypatch.setenv("PATH", str(tmp_path / "wrappers" / "bin"))
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    _setup_function("_cuda_home_past_a_wrapper")()
    assert os.environ["CUDA_HOME"] == str(tmp_path / "toolkit")


def test_setup_leaves_a_right_or_given_cuda_home(tmp_path, monkeypatch):
    _fake_toolkit(tmp_path / "toolkit")
    monkeypatch.setenv("PATH", str(tmp_path / "toolkit" / "bin"))
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    _setup_function("_cuda_home_past_a_wrapper")()
    assert "CUDA_HOME" not in os.environ  # torch's own guess (nvcc's grandparent) is right
    monkeypatch.setenv("CUDA_HOME", "/given")
    _setup_function("_cuda_home_past_a_wrapper")()
    assert os.environ["CUDA_HOME"] == "/given"
