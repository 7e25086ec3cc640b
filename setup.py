"""Builds the one native extension, ``cpoc_kernels._C``, from every ``csrc/*.cpp``.

The package works without it (pure torch fallbacks); ``cpoc_kernels._native`` says so once.
"""
import glob

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

# -ffp-contract=off: the RNG's fp32 op order is normative (no FMA contraction across ops).
extra_compile_args = ["-O3", "-ffp-contract=off"]

ext = Pybind11Extension(
    "cpoc_kernels._C",
    sorted(glob.glob("csrc/*.cpp")),
    include_dirs=["csrc"],
    cxx_std=17,
    extra_compile_args=extra_compile_args,
)

setup(ext_modules=[ext], cmdclass={"build_ext": build_ext})
