"""Build script: the pybind11 extension `fastrl._C` from csrc/, and the Triton kernels in
kernels/ shipped as `fastrl.kernels` (never as a top-level `kernels` module, which would shadow
Hugging Face's `kernels` package)."""
from glob import glob

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

ext_modules = [
    Pybind11Extension(
        "fastrl._C",
        sorted(glob("csrc/*.cpp")),
        include_dirs=["csrc"],
        cxx_std=17,
        extra_compile_args=["-O3"],
    )
]

setup(
    packages=find_packages(include=["fastrl", "fastrl.*"]) + ["fastrl.kernels"],
    package_dir={"fastrl.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
    zip_safe=False,
)
