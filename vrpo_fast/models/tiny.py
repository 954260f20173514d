"""The embedded default model: a small Llama-style causal LM and a character-level tokenizer.

Everything is built in code (no download): ``python -m vrpo_fast.train`` with no arguments trains
this model from scratch on the synthetic arithmetic task, so the whole pipeline runs on a laptop CPU.
The tokenizer is a real ``PreTrainedTokenizerFast`` (``tokenizers`` WordLevel over single characters),
so ``save_pretrained`` / ``AutoTokenizer.from_pretrained`` round-trip like any Hugging Face tokenizer.
"""
from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Sequence

import torch

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
# printable ASCII without the vertical tab / form feed (never useful, awkward to display)
CHARACTERS = tuple(c for c in string.printable if c not in "\x0b\x0c")


def char_tokenizer(specials: Sequence[str], *, single: str, pair: str, padding_side: str,
                   truncation_side: str = "right", **roles: str):
    """A character-level ``PreTrainedTokenizerFast``: ``specials`` first (ids 0, 1, ...), then one id per
    entry of :data:`CHARACTERS` (anything else is the ``unk_token``).

    ``single`` / ``pair`` are ``tokenizers`` templates (e.g. ``"<bos> $A"``) and ``roles`` name the
    special tokens (``pad_token=..., bos_token=..., eos_token=..., unk_token=..., sep_token=...``).
    Decoding concatenates characters. The embedded policy's tokenizer and the tiny reward models'
    are both built here.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(tuple(specials) + CHARACTERS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=roles["unk_token"]))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one token per char
    core.decoder = decoders.Fuse()
    in_templates = [t for t in specials if t in single.split() or t in pair.split()]
    core.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=[(t, vocab[t]) for t in in_templates])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, padding_side=padding_side, truncation_side=truncation_side,
        clean_up_tokenization_spaces=False, model_max_length=512, **roles)


def build_char_tokenizer():
    """Character-level tokenizer: special tokens first (pad=0, bos=1, eos=2, unk=3), then one id per char.

    Encoding prepends ``<bos>`` (as Llama tokenizers do); decoding concatenates characters.
    """
    return char_tokenizer(SPECIAL_TOKENS, single=f"{BOS} $A", pair=f"{BOS} $A $B", padding_side="left",
                          pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK)


@dataclass
class TinyModelConfig:
    """Shape of the embedded Llama-style model (~0.1M parameters with the defaults)."""

    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    intermediate_size: int = 128
    max_position_embeddings: int = 128


def build_tiny_model(tokenizer, config: TinyModelConfig | None = None, *, seed: int = 0,
                     attn_implementation: str = "sdpa"):
    """A freshly initialised ``LlamaForCausalLM`` sized by ``config``, vocabulary from ``tokenizer``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = config or TinyModelConfig()
    llama_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_attention_heads,
        max_position_embeddings=config.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
        attn_implementation=attn_implementation,
    )
    # the initialisation must not depend on whatever consumed the global RNG before
    devices = []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(llama_config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model
