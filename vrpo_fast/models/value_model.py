"""The critic of PPO / VRPO: a transformer backbone, a value head (VIB or scalar) and auxiliary heads.

``ValueModel(backbone, head="vib")`` is VRPO's critic: the backbone's last hidden state h_t goes
through a variational information bottleneck (:class:`vrpo_fast.models.vib_head.VIBValueHead`,
z_t ~ N(mu(h_t), diag(exp(logvar(h_t))))) to the value V_t = dec(z_t); two small auxiliary heads on
z_t (or h_t) regress the frozen LM's per-token entropy and NLL. ``head="scalar", aux_heads=False`` is
PPO's plain critic. Losses live in :mod:`vrpo_fast.algorithms.losses`; this module only computes.

Alignment (the one rule to remember): every [B, T] output at position t is computed from the hidden
state of token t, i.e. it belongs to the state *after* reading tokens 0..t, the state in which token
t + 1 is generated. Slice it exactly like the LM's logits: the value (and entropy / NLL prediction)
paired with the token at position t is ``out.values[:, t - 1]``, just as that token's log-prob comes
from ``logits[:, t - 1]``. ``forward(..., align_to_tokens=True)`` does that shift for you (entry t then
belongs to token t; entry 0 is 0), so the outputs line up with per-token log-probs and a response mask
over ``input_ids`` positions.
"""
from __future__ import annotations

import inspect
import json
import os
from typing import NamedTuple, Optional, Tuple

import torch
from torch import nn

from .vib_head import ScalarValueHead, VIBValueHead

__all__ = ["ValueModel", "ValueOutput", "AuxiliaryHead", "hidden_size_of"]

HEAD_CONFIG_NAME = "value_head_config.json"
HEAD_WEIGHTS_NAME = "value_head.safetensors"


class ValueOutput(NamedTuple):
    """Outputs of :meth:`ValueModel.forward`; all [B, T] tensors are float32."""

    values: torch.Tensor  # [B, T]
    kl: torch.Tensor  # 0-d: masked mean over tokens of the VIB KL (sum over latent dims); 0 for the scalar head
    ent_pred: Optional[torch.Tensor]  # [B, T] predicted frozen-LM entropy, or None without auxiliary heads
    nll_pred: Optional[torch.Tensor]  # [B, T] predicted frozen-LM surprisal target, or None
    values_mean: Optional[torch.Tensor] = None  # [B, T] the value at z = mu (= values in eval / scalar head)


def hidden_size_of(config) -> int:
    """Width of a Hugging Face model's hidden states (``hidden_size``, else ``n_embd`` / ``d_model``)."""
    candidates = [config]
    get_text_config = getattr(config, "get_text_config", None)
    if callable(get_text_config):
        candidates.append(get_text_config())
    for cfg in candidates:
        for name in ("hidden_size", "n_embd", "d_model"):
            value = getattr(cfg, name, None)
            if isinstance(value, int) and value > 0:
                return value
    raise ValueError(f"cannot read the hidden size from {type(config).__name__}: no hidden_size / n_embd / d_model")


class AuxiliaryHead(nn.Module):
    """Per-token scalar regressor: ``Linear(in, 1)`` (``hidden=0``) or ``Linear -> GELU -> Linear``."""

    def __init__(self, in_features: int, hidden: int = 64):
        super().__init__()
        if hidden and hidden > 0:
            self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.GELU(), nn.Linear(hidden, 1))
        else:
            self.net = nn.Linear(in_features, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        weight = next(self.parameters())
        return self.net(features.to(weight.dtype)).squeeze(-1).float()


def _shift_right(x: torch.Tensor) -> torch.Tensor:
    """out[:, t] = x[:, t - 1], out[:, 0] = 0 (state-aligned -> token-aligned)."""
    out = torch.zeros_like(x)
    out[:, 1:] = x[:, :-1]
    return out


def _shift_left(mask: torch.Tensor) -> torch.Tensor:
    """out[:, t] = mask[:, t + 1], out[:, -1] = 0 (token mask -> mask of the states that generate them)."""
    out = torch.zeros_like(mask)
    out[:, :-1] = mask[:, 1:]
    return out


class ValueModel(nn.Module):
    """Critic: backbone -> last hidden state -> value head (+ entropy / NLL auxiliary heads).

    Args:
        backbone: a Hugging Face model, bare (``AutoModel``) or with an LM head
            (``AutoModelForCausalLM``; its ``base_model`` is called so no vocabulary logits are computed).
        head: ``"vib"`` (VRPO) or ``"scalar"`` (PPO).
        latent_dim, beta, decoder, logvar_clamp: passed to :class:`VIBValueHead` (``beta`` is stored
            on the head for reference; the loss weight is applied in ``vrpo_value_loss``).
        aux_heads: add the entropy and NLL heads (VRPO's auxiliary losses).
        aux_input: ``"z"`` (the VIB latent; VIB head only) or ``"h"`` (the backbone hidden state).
        aux_hidden: width of the auxiliary MLPs; 0 makes them single linear layers.
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        head: str = "vib",
        latent_dim: int = 64,
        beta: float = 1e-3,
        aux_heads: bool = True,
        aux_input: str = "z",
        logvar_clamp: Optional[Tuple[float, float]] = (-20.0, 10.0),
        decoder: str = "linear",
        aux_hidden: int = 64,
        logvar_init: float = -5.0,
    ):
        super().__init__()
        if head not in ("vib", "scalar"):
            raise ValueError(f"head must be 'vib' or 'scalar', got {head!r}")
        if aux_input not in ("z", "h"):
            raise ValueError(f"aux_input must be 'z' or 'h', got {aux_input!r}")
        if aux_heads and aux_input == "z" and head != "vib":
            raise ValueError("aux_input='z' needs head='vib' (the scalar head has no latent z); "
                             "use aux_input='h' or aux_heads=False")
        self.backbone = backbone
        self.config = backbone.config
        hidden_size = hidden_size_of(backbone.config)
        self.hidden_size = hidden_size
        self.head_config = {
            "head": head,
            "latent_dim": int(latent_dim),
            "beta": float(beta),
            "aux_heads": bool(aux_heads),
            "aux_input": aux_input,
            "logvar_clamp": list(logvar_clamp) if logvar_clamp is not None else None,
            "decoder": decoder,
            "aux_hidden": int(aux_hidden),
            "logvar_init": float(logvar_init),
        }
        if head == "vib":
            self.value_head = VIBValueHead(
                hidden_size, latent_dim=latent_dim, beta=beta, decoder=decoder,
                logvar_clamp=tuple(logvar_clamp) if logvar_clamp is not None else None, logvar_init=logvar_init,
            )
        else:
            self.value_head = ScalarValueHead(hidden_size)
        if aux_heads:
            aux_in = latent_dim if aux_input == "z" else hidden_size
            self.entropy_head = AuxiliaryHead(aux_in, aux_hidden)
            self.nll_head = AuxiliaryHead(aux_in, aux_hidden)
        else:
            self.entropy_head = None
            self.nll_head = None
        # the module that computes hidden states is looked up, not stored: assigning a submodule here
        # would register the backbone's weights twice in state_dict()
        body, _ = self._find_body(backbone)
        self._body_takes_position_ids = "position_ids" in inspect.signature(body.forward).parameters

    # ------------------------------------------------------------------ backbone
    @staticmethod
    def _find_body(backbone: nn.Module) -> Tuple[nn.Module, bool]:
        """The module that returns hidden states without the LM head, and whether it still has one."""
        body = getattr(backbone, "base_model", None)
        if isinstance(body, nn.Module) and body is not backbone:
            return body, False
        get_decoder = getattr(backbone, "get_decoder", None)
        if callable(get_decoder):
            try:
                decoder = get_decoder()
            except Exception:  # some models raise instead of returning None
                decoder = None
            if isinstance(decoder, nn.Module) and decoder is not backbone:
                return decoder, False
        get_out = getattr(backbone, "get_output_embeddings", None)
        has_lm_head = callable(get_out) and get_out() is not None
        return backbone, has_lm_head

    def last_hidden_state(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Backbone's final hidden states [B, T, H] (after its final norm)."""
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
        if attention_mask is not None and self._body_takes_position_ids:
            # positions count real tokens only, so a left-padded row sees the positions it would unpadded
            kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        body, body_is_lm = self._find_body(self.backbone)
        if body_is_lm:
            out = body(**kwargs, output_hidden_states=True)
            return out.hidden_states[-1]
        out = body(**kwargs)
        hidden = getattr(out, "last_hidden_state", None)
        if hidden is None:
            hidden = out[0] if isinstance(out, tuple) else out.hidden_states[-1]
        return hidden

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        *,
        response_mask: Optional[torch.Tensor] = None,
        seed: Optional[int] = None,
        noise_ids: Optional[torch.Tensor] = None,
        align_to_tokens: bool = False,
    ) -> ValueOutput:
        """Values (and auxiliary predictions) for every position of ``input_ids`` [B, T].

        ``values[:, t]`` is the value of the state after token t (see the module docstring for how to
        slice it); ``align_to_tokens=True`` shifts every [B, T] output right by one so entry t belongs
        to token t. Outputs at padding (``attention_mask == 0``) are 0. ``response_mask`` [B, T] marks
        the response tokens of ``input_ids``; the VIB KL is averaged over the positions whose outputs
        score them (t - 1 for each response token t), or over the ``attention_mask`` positions when it
        is None. ``seed`` makes the VIB noise reproducible in training mode; in eval mode the VIB head
        uses z = mu (deterministic). ``noise_ids`` [B, T] (int32/int64, non-negative): ids of each
        position's VIB noise; give the same id to the same (sequence, position) to get the same noise
        however rows are batched or sharded (e.g. ``global_row * T + t``, with one ``seed`` on every
        rank). None keys the noise by the position in this batch. Ignored by the scalar head.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                             f"got {tuple(attention_mask.shape)}")
        if response_mask is not None:
            if response_mask.shape != input_ids.shape:
                raise ValueError(f"response_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                                 f"got {tuple(response_mask.shape)}")
            state_mask = _shift_left(response_mask.bool()) & attention_mask.bool()
        else:
            state_mask = attention_mask.bool()
        if noise_ids is not None:
            if not isinstance(noise_ids, torch.Tensor) or noise_ids.dtype not in (torch.int32, torch.int64):
                got = noise_ids.dtype if isinstance(noise_ids, torch.Tensor) else type(noise_ids).__name__
                raise TypeError(f"noise_ids must be an int32/int64 torch.Tensor, got {got}")
            if noise_ids.shape != input_ids.shape:
                raise ValueError(f"noise_ids must have the shape of input_ids {tuple(input_ids.shape)}, "
                                 f"got {tuple(noise_ids.shape)}")

        hidden = self.last_hidden_state(input_ids, attention_mask)
        # the head casts to its own dtype
        head_out = self.value_head(hidden, mask=state_mask, seed=seed, row_ids=noise_ids)
        values = head_out.values.float()
        kl = head_out.kl
        if kl is None:
            kl = values.new_zeros(())
        kl = kl.float()

        ent_pred = nll_pred = None
        if self.entropy_head is not None:
            features = head_out.z if self.head_config["aux_input"] == "z" else hidden
            ent_pred = self.entropy_head(features)
            nll_pred = self.nll_head(features)
        # outputs at padding are meaningless, and can be NaN where a backbone's attention sees no key;
        # zero them (select, not multiply: NaN * 0 is NaN) so masked reductions downstream stay finite
        attended = attention_mask.bool()
        values = torch.where(attended, values, torch.zeros_like(values))
        values_mean = head_out.values_mean.float() if head_out.values_mean is not None else values
        values_mean = torch.where(attended, values_mean, torch.zeros_like(values_mean))
        if ent_pred is not None:
            ent_pred = torch.where(attended, ent_pred, torch.zeros_like(ent_pred))
            nll_pred = torch.where(attended, nll_pred, torch.zeros_like(nll_pred))
        if align_to_tokens:
            values = _shift_right(values)
            values_mean = _shift_right(values_mean)
            ent_pred = _shift_right(ent_pred) if ent_pred is not None else None
            nll_pred = _shift_right(nll_pred) if nll_pred is not None else None
        return ValueOutput(values=values, kl=kl, ent_pred=ent_pred, nll_pred=nll_pred, values_mean=values_mean)

    # ------------------------------------------------------------------ training helpers
    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, **kwargs):
        """Pass-through to the backbone's Hugging Face gradient (activation) checkpointing.

        Non-reentrant checkpointing by default (works when the embeddings are frozen). Uses
        ``activation_checkpointing_enable`` where transformers has it (>= 5.x, where the old name is
        deprecated), else ``gradient_checkpointing_enable``.
        """
        if gradient_checkpointing_kwargs is None:
            gradient_checkpointing_kwargs = {"use_reentrant": False}
        enable = getattr(self.backbone, "activation_checkpointing_enable", None)
        if callable(enable):
            return enable(activation_checkpointing_kwargs=gradient_checkpointing_kwargs, **kwargs)
        return self.backbone.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs=gradient_checkpointing_kwargs, **kwargs
        )

    def gradient_checkpointing_disable(self):
        disable = getattr(self.backbone, "activation_checkpointing_disable", None)
        if callable(disable):
            return disable()
        return self.backbone.gradient_checkpointing_disable()

    def head_state_dict(self) -> dict:
        """Weights of everything but the backbone (value head and auxiliary heads)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}

    # ------------------------------------------------------------------ checkpoints
    def save_pretrained(self, save_directory: str, state_dict: Optional[dict] = None, **kwargs) -> None:
        """Save the backbone (Hugging Face format) and the heads into ``save_directory``.

        Heads go to ``value_head.safetensors`` with their constructor arguments in
        ``value_head_config.json``; :meth:`from_pretrained` restores both. ``state_dict``: this
        model's full weights gathered elsewhere (FSDP), written instead of the module's own tensors.
        """
        from safetensors.torch import save_file

        os.makedirs(save_directory, exist_ok=True)
        backbone_state = None if state_dict is None else \
            {k[len("backbone."):]: v for k, v in state_dict.items() if k.startswith("backbone.")}
        self.backbone.save_pretrained(save_directory, state_dict=backbone_state, **kwargs)
        config = dict(self.head_config)
        config["backbone_class"] = "causal_lm" if self._has_lm_head(self.backbone) else "base"
        with open(os.path.join(save_directory, HEAD_CONFIG_NAME), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        heads = self.head_state_dict() if state_dict is None else \
            {k: v for k, v in state_dict.items() if not k.startswith("backbone.")}
        tensors = {k: v.detach().contiguous().cpu() for k, v in heads.items()}
        save_file(tensors, os.path.join(save_directory, HEAD_WEIGHTS_NAME))

    @staticmethod
    def _has_lm_head(backbone: nn.Module) -> bool:
        get_out = getattr(backbone, "get_output_embeddings", None)
        return callable(get_out) and get_out() is not None

    @classmethod
    def from_pretrained(cls, path: str, *, backbone_class: Optional[str] = None, **kwargs) -> "ValueModel":
        """Load a value model from a local directory (never the network: ``local_files_only=True``).

        ``path`` is either a directory written by :meth:`save_pretrained` (backbone, heads and their
        config are restored; keyword arguments override the saved config) or any Hugging Face model
        directory (the backbone is loaded and the heads are freshly initialised). ``backbone_class``:
        ``"base"`` (``AutoModel``, no LM head: the default for fresh value models), ``"causal_lm"``
        (``AutoModelForCausalLM``), or None for the saved choice. Keyword arguments of
        :class:`ValueModel` configure the heads; all others (``dtype``, ``attn_implementation``, ...)
        go to the backbone's ``from_pretrained``.
        """
        from transformers import AutoModel, AutoModelForCausalLM

        saved = {}
        config_path = os.path.join(path, HEAD_CONFIG_NAME)
        if os.path.isfile(config_path):
            with open(config_path) as f:
                saved = json.load(f)
        init_names = set(inspect.signature(cls.__init__).parameters) - {"self", "backbone"}
        init_kwargs = {k: v for k, v in saved.items() if k in init_names}
        init_kwargs.update({k: v for k, v in kwargs.items() if k in init_names})
        backbone_kwargs = {k: v for k, v in kwargs.items() if k not in init_names}
        backbone_kwargs.setdefault("local_files_only", True)

        kind = backbone_class or saved.get("backbone_class", "base")
        if kind not in ("base", "causal_lm"):
            raise ValueError(f"backbone_class must be 'base', 'causal_lm' or None, got {kind!r}")
        if kind == "causal_lm":
            backbone = AutoModelForCausalLM.from_pretrained(path, **backbone_kwargs)
        else:
            try:
                backbone = AutoModel.from_pretrained(path, **backbone_kwargs)
            except ValueError:  # a config with no bare-model mapping: take the LM and skip its head
                backbone = AutoModelForCausalLM.from_pretrained(path, **backbone_kwargs)
        if init_kwargs.get("logvar_clamp") is not None:
            init_kwargs["logvar_clamp"] = tuple(init_kwargs["logvar_clamp"])
        model = cls(backbone, **init_kwargs)

        weights_path = os.path.join(path, HEAD_WEIGHTS_NAME)
        if os.path.isfile(weights_path):
            from safetensors.torch import load_file

            state = load_file(weights_path)
            expected = set(model.head_state_dict())
            missing, unexpected = expected - set(state), set(state) - expected
            if missing or unexpected:
                raise ValueError(
                    f"head weights in {weights_path} do not match this head configuration "
                    f"(missing {sorted(missing)}, unexpected {sorted(unexpected)}); "
                    "did a keyword argument override the saved head/aux settings?"
                )
            model.load_state_dict(state, strict=False)
        return model
