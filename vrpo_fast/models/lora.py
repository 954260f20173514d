"""LoRA adapters (``peft``) on the policy and the value backbone, injected in place.

:func:`apply_lora` puts LoRA layers into a Hugging Face model *without* wrapping it in a
``PeftModel``: the model keeps its class, so ``model.base_model`` is still the transformer body
(what :class:`vrpo_fast.scoring.TokenScorer` and :class:`vrpo_fast.models.ValueModel` call),
``generate`` works unchanged, and only the adapter weights require gradients (AdamW then keeps
state for ~1% of the parameters).

Because the base weights stay frozen, the frozen reference LM does not need its own copy: run the
policy inside :func:`adapters_disabled` and it *is* the base model. After a supervised warm-up on
a LoRA policy, :func:`fold_lora_into_base` makes the warmed-up weights the new base (so the
reference is the warmed-up policy again) and restarts the adapters from zero.

A model with injected adapters must not be saved with ``save_pretrained`` as a plain model (its
weights are then named ``...q_proj.base_layer.weight``, which ``from_pretrained`` does not read):
save :func:`merged_copy` for a loadable model, and :func:`lora_state_dict` for the adapters alone.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Dict, Iterator, List, Optional, Sequence

import torch
from torch import nn

# Llama / Mistral / Qwen2 names of the attention and MLP projections: LoRA on all of them is the
# usual choice for RL fine-tuning (attention-only adapters learn markedly slower).
LLAMA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_NAME = "default"


def _require_peft():
    try:
        import peft  # noqa: F401
    except ImportError as err:
        raise ImportError("LoRA needs the 'peft' package: pip install -e '.[lora]' (or pip install peft)") from err
    return peft


def _tuner_layers(model: nn.Module) -> List[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def has_lora(model: nn.Module) -> bool:
    """Whether ``model`` holds LoRA layers (False when peft is not installed)."""
    try:
        _require_peft()
    except ImportError:
        return False
    return bool(_tuner_layers(model))


def _default_targets(model: nn.Module) -> List[str]:
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    found = [t for t in LLAMA_TARGET_MODULES if t in names]
    if not found:
        linear = sorted(names)
        raise ValueError(f"{type(model).__name__} has none of the Llama projection layers {LLAMA_TARGET_MODULES}: "
                         f"give target_modules (its nn.Linear layers are named {linear[:20]})")
    return found


def apply_lora(model: nn.Module, *, r: int = 8, alpha: float = 16, dropout: float = 0.0,
               target_modules: Optional[Sequence[str]] = None) -> nn.Module:
    """Inject LoRA adapters into ``model`` in place and freeze everything else in it; returns ``model``.

    Args:
        model: a Hugging Face model (``LlamaForCausalLM``, a bare ``LlamaModel`` backbone, ...) or any
            module with ``nn.Linear`` layers. Pass a value model's *backbone*, not the value model:
            every parameter of the module given that is not an adapter is frozen (heads included).
        r: adapter rank.
        alpha: scaling numerator (the update is ``alpha / r * B @ A``).
        dropout: dropout on the adapter input.
        target_modules: names (last component) of the ``nn.Linear`` layers to adapt; default: the
            Llama attention and MLP projections present in the model. Embeddings and the LM head
            are never adapted, so tied input/output embeddings stay tied.

    The adapters start as the identity (``B = 0``): right after this call the model computes
    exactly what it did before.
    """
    _require_peft()
    from peft import LoraConfig, inject_adapter_in_model

    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"r (LoRA rank) must be an integer >= 1, got {r!r}")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    if has_lora(model):
        raise ValueError(f"{type(model).__name__} already holds LoRA adapters")
    if isinstance(target_modules, str):
        target_modules = [t.strip() for t in target_modules.split(",") if t.strip()]
    targets = list(target_modules) if target_modules else _default_targets(model)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")
    try:
        inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    except ValueError as err:  # peft: "Target modules ... not found in the base model"
        raise ValueError(f"apply_lora: cannot adapt {targets} in {type(model).__name__}: {err}") from err
    for name, param in model.named_parameters():
        param.requires_grad_(".lora_" in name)
    return model


def lora_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The adapter parameters (what the optimiser should see when LoRA is on)."""
    return [p for n, p in model.named_parameters() if ".lora_" in n]


def count_parameters(model: nn.Module) -> Dict[str, int]:
    """``{"trainable": ..., "total": ...}`` (shared tensors counted once)."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return {"trainable": trainable, "total": total}


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` as its frozen base (the LoRA updates switched off) inside the block.

    This is how the reference LM shares every weight with a LoRA policy::

        with torch.no_grad(), adapters_disabled(policy_lm):
            ref_stats = reference_stats(TokenScorer(policy_lm), rollout)

    Works through wrappers (DDP, ``accelerate``) since it visits ``model.modules()``. Raises
    ``ValueError`` on a model without adapters: there, "disabled" would silently be the trained
    model itself, not a frozen reference. Each adapter parameter's ``requires_grad`` is restored.
    """
    _require_peft()
    layers = _tuner_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA adapters: disabling them would leave the trained "
                         f"model, not the frozen base (use a separate frozen copy as the reference)")
    grad_flags = [(p, p.requires_grad) for layer in layers for p in layer.parameters()]
    was_disabled = [layer.disable_adapters for layer in layers]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer, disabled in zip(layers, was_disabled):
            layer.enable_adapters(not disabled)
        for p, flag in grad_flags:
            p.requires_grad_(flag)


def _active_adapters(layer) -> List[str]:
    active = layer.active_adapters
    return [active] if isinstance(active, str) else list(active)


@torch.no_grad()
def fold_lora_into_base(model: nn.Module) -> nn.Module:
    """Add every adapter's current update into its frozen base weight, then restart it from zero.

    The model computes the same function before and after; afterwards the base *is* the adapted
    model (so :func:`adapters_disabled` gives it, e.g. as the reference after a LoRA warm-up) and
    the adapters are the identity again (``B = 0``; ``A`` freshly initialised). Optimiser state of
    the adapter parameters is stale afterwards: build the RL optimiser after folding.
    """
    _require_peft()
    layers = _tuner_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA adapters to fold")
    for layer in layers:
        if getattr(layer, "merged", False):
            raise ValueError("fold_lora_into_base: the adapters are merged already (peft merge()); unmerge first")
        base = layer.get_base_layer()
        for name in _active_adapters(layer):
            if name not in getattr(layer, "lora_A", {}):
                continue
            base.weight += layer.get_delta_weight(name).to(base.weight.dtype)
            layer.reset_lora_parameters(name, True)
    return model


@torch.no_grad()
def merged_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with the adapters merged into the weights and the LoRA layers removed.

    The result is the plain model class again: ``save_pretrained`` writes a directory any
    ``from_pretrained`` loads. ``model`` itself is left untouched.
    """
    _require_peft()
    merged = copy.deepcopy(model)
    layers = {id(m) for m in _tuner_layers(merged)}
    if not layers:
        return merged
    for name, module in list(merged.named_modules()):
        if id(module) not in layers:
            continue
        module.merge()
        parent_name, _, child = name.rpartition(".")
        parent = merged.get_submodule(parent_name) if parent_name else merged
        setattr(parent, child, module.get_base_layer())
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if hasattr(merged, attr):
            try:
                delattr(merged, attr)
            except AttributeError:
                pass
    return merged


def lora_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The adapter weights alone (a few MB), keyed by parameter name, detached CPU copies."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if ".lora_" in n}


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, state: Dict[str, torch.Tensor]) -> None:
    """Inverse of :func:`lora_state_dict` on a model with the same adapters (names and shapes must match)."""
    params = {n: p for n, p in model.named_parameters() if ".lora_" in n}
    missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or unexpected:
        raise ValueError(f"LoRA state does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, p in params.items():
        if tuple(state[name].shape) != tuple(p.shape):
            raise ValueError(f"LoRA state {name}: shape {tuple(state[name].shape)} != model {tuple(p.shape)}")
        p.copy_(state[name].to(p.device, p.dtype))


__all__ = [
    "LLAMA_TARGET_MODULES",
    "apply_lora",
    "has_lora",
    "lora_parameters",
    "count_parameters",
    "adapters_disabled",
    "fold_lora_into_base",
    "merged_copy",
    "lora_state_dict",
    "load_lora_state_dict",
]
