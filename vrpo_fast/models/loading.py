"""Load the policy / reference / critic from local directories, with errors a user can act on.

* ``load_causal_lm(path)``: any local Hugging Face causal-LM directory; a directory that holds some
  other kind of model (an encoder, a seq2seq model, ...) raises :class:`NotACausalLMError` saying so.
* ``ensure_pad_token(tokenizer)``: batched generation needs padding; a tokenizer without a pad token
  gets ``pad = eos`` and a warning (the response mask never relies on pad != eos).
* ``resolve_attn_implementation("auto", device)``: flash_attention_2 when the flash_attn package is
  installed and the model runs on CUDA, else sdpa.
"""
from __future__ import annotations

import copy
import importlib.util
import logging
import os
from typing import Optional

import torch

logger = logging.getLogger("vrpo_fast")

ATTN_IMPLEMENTATIONS = ("auto", "eager", "sdpa", "flash_attention_2")


class NotACausalLMError(ValueError):
    """The directory given as a policy does not hold a causal language model."""


def resolve_attn_implementation(name: str, device: torch.device | str) -> str:
    if name not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, got {name!r}")
    if name != "auto":
        return name
    on_cuda = torch.device(device).type == "cuda"
    return "flash_attention_2" if on_cuda and importlib.util.find_spec("flash_attn") is not None else "sdpa"


def _check_model_dir(path: str, what: str) -> None:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what} {path!r} is not a directory (a local Hugging Face model directory is "
                                f"expected; nothing is downloaded)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise NotACausalLMError(f"{what} {path!r} has no config.json: it is not a Hugging Face model directory")


def load_causal_lm(path: str, *, attn_implementation: str = "sdpa", dtype: Optional[torch.dtype] = None,
                   what: str = "--model"):
    """``AutoModelForCausalLM.from_pretrained(path)`` from local files, or a clear error."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    _check_model_dir(path, what)
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (ValueError, OSError, KeyError) as err:
        raise NotACausalLMError(f"{what} {path!r}: cannot read its config.json as a Hugging Face model "
                                f"config ({err})") from err
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        archs = ", ".join(getattr(config, "architectures", None) or []) or "unknown architecture"
        raise NotACausalLMError(
            f"{what} {path!r} holds a {config.model_type!r} model ({archs}), which is not a causal language "
            f"model: give a decoder-only LM that AutoModelForCausalLM can load (Llama, Qwen2, Mistral, GPT-2, ...)"
        )
    kwargs = {"local_files_only": True, "attn_implementation": attn_implementation}
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except ImportError as err:  # e.g. flash_attention_2 requested without the package
        raise ValueError(f"{what} {path!r}: cannot load with attn_implementation={attn_implementation!r}: {err}") from err


def ensure_pad_token(tokenizer, model=None, *, source: str = "the tokenizer"):
    """Give a tokenizer without a pad token ``pad = eos`` (logged as a warning); no eos either: error."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"{source} has neither a pad token nor an eos token: batched generation needs one; "
                             f"set tokenizer.pad_token before training")
        tokenizer.pad_token = tokenizer.eos_token
        logger.warning("%s has no pad token: using its eos token %r as the pad token", source, tokenizer.eos_token)
    if model is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = tokenizer.pad_token_id
    return tokenizer


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ValueError(f"--model {path!r}: cannot load a tokenizer from it ({err})") from err
    return ensure_pad_token(tokenizer, source=f"the tokenizer of {path!r}")


def load_policy(model_path: Optional[str], *, attn_implementation: str = "sdpa", seed: int = 0,
                tiny_hidden_size: int = 128, tiny_layers: int = 2, gguf_file: Optional[str] = None):
    """``(model, tokenizer)``: from ``model_path``, or the embedded tiny model when it is None.

    ``model_path`` may be a preset name (``smollm2-135m``), a directory with ``gguf_file`` in it, or a
    ``.gguf`` file: these load through :mod:`vrpo_fast.models.presets` (from the de-quantised cache,
    built on first use). A plain Hugging Face directory loads directly.
    """
    if model_path is None:
        from .tiny import TinyModelConfig, build_char_tokenizer, build_tiny_model

        tokenizer = build_char_tokenizer()
        shape = TinyModelConfig(hidden_size=tiny_hidden_size, num_hidden_layers=tiny_layers,
                                intermediate_size=2 * tiny_hidden_size)
        model = build_tiny_model(tokenizer, shape, seed=seed, attn_implementation=attn_implementation)
        return model, tokenizer
    from .presets import is_preset, load_model_and_tokenizer, resolve_model_source

    if gguf_file is None and not model_path.endswith(".gguf") and not is_preset(model_path):
        only_gguf = (os.path.isdir(model_path) and not os.path.isfile(os.path.join(model_path, "config.json"))
                     and any(f.endswith(".gguf") for f in os.listdir(model_path)))
        if not only_gguf:  # a Hugging Face directory (or a missing path: load_causal_lm says so)
            model = load_causal_lm(model_path, attn_implementation=attn_implementation)
            tokenizer = load_tokenizer(model_path)
            ensure_pad_token(tokenizer, model)
            return model, tokenizer
    source = resolve_model_source(model_path, gguf_file)
    return load_model_and_tokenizer(source, attn_implementation=attn_implementation)


def frozen_copy(model):
    """A deep copy with gradients off and in eval mode (the reference LM)."""
    ref = copy.deepcopy(model)
    ref.requires_grad_(False)
    ref.eval()
    return ref


def build_value_model(policy, *, algo: str, critic_path: Optional[str] = None, latent_dim: int = 64,
                      beta: float = 1e-3, aux_input: str = "h", attn_implementation: str = "sdpa",
                      aux_heads: bool = True, logvar_init: float = -5.0):
    """The critic: VIB head (+ auxiliary heads when ``aux_heads``) for vrpo, a scalar head for ppo.

    Its backbone is a copy of ``policy``'s body (standard practice: start from the warmed-up policy)
    unless ``critic_path`` names a directory (a saved ValueModel, or any HF model used as backbone).
    """
    from .value_model import ValueModel

    head_kwargs = dict(head="vib", latent_dim=latent_dim, beta=beta, aux_heads=aux_heads, aux_input=aux_input,
                       logvar_init=logvar_init)
    if algo == "ppo":
        head_kwargs = dict(head="scalar", aux_heads=False)
    if critic_path is not None:
        _check_model_dir(critic_path, "--critic")
        return ValueModel.from_pretrained(critic_path, attn_implementation=attn_implementation, **head_kwargs)
    backbone = copy.deepcopy(policy.base_model)
    backbone.requires_grad_(True)
    return ValueModel(backbone, **head_kwargs)
