"""vrpo-fast's VIB value head in place of the value head of an OpenRLHF-style critic.

OpenRLHF's critic (OpenRLHF/OpenRLHF, ``openrlhf/models/model.py``, ``_get_critic_model``) puts
``nn.Linear(hidden_size, 1, bias=False)`` (attribute ``score``, formerly ``value_head``) on the last
hidden state and, in ``CriticModel.forward``::

    values = head(last_hidden_state).squeeze(-1)[:, :-1]     # state t values the token t + 1
    if normalize_reward: values = (values - mean) / std
    action_values = values[:, -num_actions:] * action_mask.float()

Two ways to put the VIB head there, with those semantics kept exactly:

* :func:`install_vib_head` swaps the ``score`` Linear for a :class:`VIBScoreHead`; OpenRLHF's own
  forward (slicing, normalisation, masking) runs unchanged. After the forward,
  ``head.kl_loss(action_mask)`` is the VIB KL averaged over the same action states; add
  ``head.beta * head.kl_loss(action_mask)`` to the critic loss.
* :func:`critic_action_values` is the forward's tail as a function that runs the head only on the
  ``num_actions`` action states (not the prompt), for trainers that own their critic forward.

With :class:`vrpo_fast.models.vib_head.ScalarValueHead` (``Linear(H, 1)``) instead of the VIB head,
both give OpenRLHF's values bit for bit (given the same weights).

Run ``python examples/drop_in_openrlhf_critic.py`` for a CPU check.
"""
from __future__ import annotations

import sys
from typing import NamedTuple, Optional, Union

import torch
from torch import nn

from vrpo_fast.models.vib_head import ScalarValueHead, VIBValueHead


def _action_slice(per_state: torch.Tensor, num_actions: int) -> torch.Tensor:
    """OpenRLHF's ``x[:, :-1][:, -num_actions:]``: the states that produced the action tokens."""
    return per_state[:, :-1][:, -num_actions:]


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    keep = mask != 0
    return torch.where(keep, x, 0.0).sum() / keep.sum().clamp_min(1).to(x.dtype)


class VIBScoreHead(nn.Module):
    """Stands in for OpenRLHF's ``score = nn.Linear(hidden_size, 1, bias=False)``.

    ``forward(hidden [B, L, H]) -> [B, L, 1]`` values (fp32), like the Linear it replaces, and keeps the
    per-token KL of that call for :meth:`kl_loss`. ``seed`` (attribute) fixes the VIB noise of the next
    calls; None draws it from torch's RNG. In ``eval()`` the head is deterministic (``z = mu``).
    """

    def __init__(self, hidden_size: int, latent_dim: int = 64, beta: float = 1e-3, decoder="linear",
                 head: Optional[Union[VIBValueHead, ScalarValueHead]] = None):
        super().__init__()
        self.head = head if head is not None else VIBValueHead(hidden_size, latent_dim=latent_dim, beta=beta,
                                                               decoder=decoder)
        self.seed: Optional[int] = None
        self.last_kl_per_token: Optional[torch.Tensor] = None

    @property
    def beta(self) -> float:
        return self.head.beta

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.head(hidden, seed=self.seed)
        self.last_kl_per_token = out.kl_per_token
        return out.values.unsqueeze(-1)

    def kl_loss(self, action_mask: torch.Tensor) -> torch.Tensor:
        """Mean VIB KL over the action states of the last forward (the positions OpenRLHF keeps)."""
        if self.last_kl_per_token is None:
            raise RuntimeError("kl_loss needs a forward pass first (call the critic, then kl_loss)")
        kl = _action_slice(self.last_kl_per_token, action_mask.shape[1])
        if kl.shape != action_mask.shape:
            raise ValueError(f"action_mask {tuple(action_mask.shape)} does not fit the last forward's states "
                             f"{tuple(self.last_kl_per_token.shape)} (packing_samples layouts are not supported)")
        return _masked_mean(kl, action_mask)


def install_vib_head(critic: nn.Module, latent_dim: int = 64, beta: float = 1e-3, decoder="linear") -> VIBScoreHead:
    """Replace an OpenRLHF critic's value head (``critic.<value_head_prefix>``) by a fresh VIB head.

    Call it before the optimizer / DeepSpeed engine is built so the new parameters are trained. The
    VIB head starts at values 0 and KL 0; a pretrained reward-model ``score`` is not carried over.
    """
    prefix = getattr(critic, "value_head_prefix", "score")
    old = getattr(critic, prefix)
    vib = VIBScoreHead(old.in_features, latent_dim=latent_dim, beta=beta, decoder=decoder)
    vib.to(device=old.weight.device, dtype=old.weight.dtype)
    setattr(critic, prefix, vib)
    return vib


class CriticValues(NamedTuple):
    action_values: torch.Tensor  # [B, num_actions] fp32, 0 where action_mask is 0
    kl: torch.Tensor  # scalar: mean VIB KL over the action tokens (0 for ScalarValueHead)


def critic_action_values(last_hidden_state: torch.Tensor, action_mask: torch.Tensor,
                         head: Union[VIBValueHead, ScalarValueHead], *, normalize_reward: bool = False,
                         mean: float = 0.0, std: float = 1.0, seed: Optional[int] = None) -> CriticValues:
    """OpenRLHF's ``CriticModel.forward`` tail with the head run only on the action states.

    The value of action token j comes from hidden state ``L - num_actions - 1 + j`` (OpenRLHF's
    ``[:, :-1][:, -num_actions:]``), so slicing before the per-token head equals slicing after it.
    """
    num_actions = action_mask.shape[1]
    if num_actions >= last_hidden_state.shape[1]:
        raise ValueError(f"action_mask has {num_actions} columns but the sequence only {last_hidden_state.shape[1]} "
                         "positions; the response must follow at least one prompt token")
    states = _action_slice(last_hidden_state, num_actions)
    out = head(states, mask=action_mask, seed=seed)
    values = out.values
    if normalize_reward:
        values = (values - mean) / std
    return CriticValues(values * action_mask.float(), out.kl)


def _openrlhf_tail(last_hidden_state, action_mask, score):
    """OpenRLHF's forward tail with an arbitrary head (no normalisation), for the check below."""
    values = score(last_hidden_state).squeeze(-1)[:, :-1]
    return values[:, -action_mask.shape[1]:] * action_mask.float()


def main() -> int:
    torch.manual_seed(0)
    B, L, H, A = 3, 12, 32, 7
    hidden = torch.randn(B, L, H)
    action_mask = torch.ones(B, A, dtype=torch.long)
    action_mask[1, 4:] = 0  # a shorter response (right padding)
    ok = True

    # 1. Scalar head with the Linear's weights: OpenRLHF's values exactly.
    linear = nn.Linear(H, 1, bias=False)
    scalar = ScalarValueHead(H)
    with torch.no_grad():
        scalar.value.weight.copy_(linear.weight)
    before = _openrlhf_tail(hidden, action_mask, linear)
    after = critic_action_values(hidden, action_mask, scalar).action_values
    err = (before - after).abs().max().item()
    ok &= err < 1e-6
    print(f"scalar head vs OpenRLHF Linear head: max|dV|={err:.2e}")

    # 2. VIB head swapped into the Linear's slot, OpenRLHF's forward unchanged; the sliced path agrees.
    vib_slot = VIBScoreHead(H, latent_dim=16)
    with torch.no_grad():  # non-trivial decoder so the values are not all 0
        vib_slot.head.decoder.weight.normal_()
    vib_slot.eval()
    full = _openrlhf_tail(hidden, action_mask, vib_slot)
    sliced = critic_action_values(hidden, action_mask, vib_slot.head)
    err_v = (full - sliced.action_values).abs().max().item()
    err_kl = (vib_slot.kl_loss(action_mask) - sliced.kl).abs().item()
    ok &= max(err_v, err_kl) < 1e-6
    print(f"VIB head in OpenRLHF's slot vs sliced path: max|dV|={err_v:.2e} |dKL|={err_kl:.2e}")

    # 3. A training step's loss: OpenRLHF's ValueLoss (unclipped here) + beta * KL.
    vib_slot.train()
    vib_slot.seed = 1234
    values = _openrlhf_tail(hidden, action_mask, vib_slot)
    returns = torch.randn(B, A)
    value_loss = 0.5 * _masked_mean((values - returns) ** 2, action_mask)
    loss = value_loss + vib_slot.beta * vib_slot.kl_loss(action_mask)
    loss.backward()
    ok &= all(p.grad is not None for p in vib_slot.parameters())
    print(f"train step: value loss {value_loss.item():.4f}, KL {vib_slot.kl_loss(action_mask).item():.4f}")
    print("OpenRLHF critic drop-in:", "OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
