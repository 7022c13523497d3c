"""Install uniter_fast: ``pip install --no-build-isolation -e .``

``kernels/`` (Triton) installs as ``uniter_fast.kernels``.  The C++ CPU
extension in ``csrc/`` is built here when torch is importable at build time
(hence ``--no-build-isolation``: build isolation would download a second,
CUDA, torch); otherwise ``uniter_fast`` JIT-compiles it on first use.
"""
import glob
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _ext_modules():
    """``uniter_fast._C``: csrc/*.cpp (CPU), plus csrc/*.cu when CUDA is usable.

    Without torch or a compiler nothing is built here and ``uniter_fast._ext``
    JIT-compiles on first use (``UNITER_FAST_NO_EXT=1`` skips the build).
    """
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not cpp_sources or os.environ.get("UNITER_FAST_NO_EXT") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        return [], {}
    cxx = ["-O3", "-fopenmp"]
    with_cuda = (CUDA_HOME is not None and torch.cuda.is_available()
                 and os.environ.get("UNITER_FAST_NO_CUDA") != "1")
    if with_cuda:
        ext = CUDAExtension("uniter_fast._C", cpp_sources + sorted(glob.glob(os.path.join("csrc", "*.cu"))),
                            define_macros=[("UNITER_FAST_WITH_CUDA", None)],
                            extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]},
                            extra_link_args=["-fopenmp"])
    else:
        ext = CppExtension("uniter_fast._C", cpp_sources, extra_compile_args=cxx,
                           extra_link_args=["-fopenmp"])

    class _OptionalBuildExt(BuildExtension.with_options(use_ninja=True)):
        """A failed extension build is not a failed install: _ext.py JITs later."""

        def run(self):
            try:
                super().run()
            except Exception as e:  # no compiler, broken toolchain, ...
                print(f"WARNING: building uniter_fast._C failed ({e}); "
                      "it will be JIT-compiled on first use")

    return [ext], {"build_ext": _OptionalBuildExt}


ext_modules, cmdclass = _ext_modules()

setup(
    name="uniter_fast",
    version="0.1.0",
    description="Fast, trustworthy UNITER: fused Triton attention, batched IPOT kernels, DeepSpeed training",
    packages=find_packages(include=["uniter_fast", "uniter_fast.*"]) + ["uniter_fast.kernels"],
    package_dir={"uniter_fast.kernels": "kernels"},
    package_data={"uniter_fast": ["configs/*.json", "data/ans2label.json"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "tqdm", "lmdb", "lz4", "msgpack", "msgpack-numpy"],
    extras_require={
        "train": ["deepspeed>=0.15"],
        "triton": ["triton>=3.0"],
        "dev": ["pytest", "pytest-benchmark", "hypothesis", "matplotlib", "ninja"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
