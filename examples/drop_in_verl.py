"""vrpo-fast's GAE in place of verl's ``compute_gae_advantage_return``.

verl (volcengine/verl, ``verl/trainer/ppo/core_algos.py``) computes, over ``[bs, response_length]``:

* a reverse GAE recursion in which positions with ``response_mask == 0`` are skipped (their reward
  and value are not used; the next unmasked value and the running advantage carry across them) and
  the position after the last response token is terminal (next value 0);
* ``returns = advantages + values`` (before whitening);
* ``advantages = masked_whiten(advantages, response_mask)`` from ``verl/utils/torch_functional.py``:
  masked mean, **unbiased** masked variance (Bessel ``n / (n - 1)``, ``ValueError`` if the mask holds
  fewer than 2 tokens), ``(adv - mean) * rsqrt(var + 1e-8)``.

:func:`compute_gae_advantage_return` below has the same signature and gives the same advantages and
returns on every ``response_mask`` position. Masked positions are 0 in both outputs (verl leaves the
carried running advantage there; none of verl's losses read them). Recursion and whitening run
fused in :func:`vrpo_fast.ops.gae` (C++ scan on CPU, one Triton launch on CUDA; ``backend=`` forces
one), whose whitening uses the same unbiased variance and eps as verl's ``masked_whiten``.

verl's token scoring (``verl/utils/torch_functional.py``) has drop-ins here too:
``logprobs_from_logits(logits, labels, inplace_backward=True)`` (``log_softmax(logits)`` gathered at
``labels``) and ``entropy_from_logits(logits)`` (``logsumexp(logits) - sum softmax(logits) * logits``),
both through :func:`vrpo_fast.ops.token_logprobs_entropy`: one pass, no ``[.., V]`` softmax temporary,
fp32 out (``out_dtype=None``: the logits' dtype, as verl), any number of leading dims.

Run ``python examples/drop_in_verl.py`` for a CPU check against a plain-PyTorch verl recursion.
"""
from __future__ import annotations

import sys
from typing import Tuple

import torch

from vrpo_fast.ops import gae, token_logprobs_entropy


def compute_gae_advantage_return(token_level_rewards: torch.Tensor, values: torch.Tensor,
                                 response_mask: torch.Tensor, gamma=1.0, lam=1.0, *,
                                 backend: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """Drop-in for verl's ``compute_gae_advantage_return`` (same arguments, same outputs on the mask)."""
    # verl's masked_var raises below 2 tokens (division by n - 1); vrpo-fast's whitening would return 0
    # there. Keep verl's behaviour (one reduction; a host sync on CUDA, as in verl).
    n_tokens = int((response_mask != 0).sum())
    if n_tokens < 2:
        raise ValueError(f"response_mask must hold at least 2 tokens to whiten (unbiased variance), got {n_tokens}")
    # Same statistics as verl's masked_whiten: masked mean, unbiased variance, rsqrt(var + 1e-8).
    return gae(token_level_rewards, values, response_mask, gamma=float(gamma), lam=float(lam), whiten=True,
               backend=backend)


def _rows(logits: torch.Tensor, labels: torch.Tensor, compute_entropy: bool, backend: str, out_dtype):
    lead = logits.shape[:-1]
    lp, h = token_logprobs_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                   compute_entropy=compute_entropy, backend=backend, out_dtype=out_dtype)
    return lp.view(lead), (h.view(lead) if h is not None else None)


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor, inplace_backward: bool = True, *,
                         backend: str = "auto", out_dtype="auto") -> torch.Tensor:
    """verl's ``logprobs_from_logits``: ``log_softmax(logits)[labels]`` per position.

    ``inplace_backward`` is accepted and not used: verl's flash-attn path overwrites the logits with
    their gradient, which corrupts any other consumer of the logits (e.g. an entropy bonus computed
    from the same tensor); here the gradient always gets its own buffer.
    """
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels must have the leading shape of logits {tuple(logits.shape[:-1])}, "
                         f"got {tuple(labels.shape)}")
    return _rows(logits, labels, False, backend, out_dtype)[0]


def entropy_from_logits(logits: torch.Tensor, *, backend: str = "auto", out_dtype="auto") -> torch.Tensor:
    """verl's ``entropy_from_logits``: the entropy of ``softmax(logits)`` at every position (no mask)."""
    labels = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    return _rows(logits, labels, True, backend, out_dtype)[1]


def patch_verl() -> bool:
    """Point verl's GAE (module attribute and the ``"gae"`` registry entry) at the drop-in.

    ``ray_trainer.compute_advantage`` calls ``core_algos.compute_gae_advantage_return`` by attribute,
    so rebinding the module attribute is enough for the PPO trainer. Returns False without verl.
    """
    try:
        from verl.trainer.ppo import core_algos
    except ImportError:
        return False
    core_algos.compute_gae_advantage_return = compute_gae_advantage_return
    registry = getattr(core_algos, "ADV_ESTIMATOR_REGISTRY", None)
    if isinstance(registry, dict) and "gae" in registry:
        registry["gae"] = compute_gae_advantage_return
    return True


def _verl_semantics(rewards, values, mask, gamma, lam):
    """Plain-PyTorch verl recursion + unbiased masked whitening, for the check below."""
    m = mask.to(values.dtype)
    next_value = torch.zeros_like(values[:, 0])
    running = torch.zeros_like(values[:, 0])
    adv = torch.zeros_like(values)
    for t in range(values.shape[1] - 1, -1, -1):
        candidate = rewards[:, t] + gamma * next_value - values[:, t] + gamma * lam * running
        running = m[:, t] * candidate + (1 - m[:, t]) * running
        next_value = m[:, t] * values[:, t] + (1 - m[:, t]) * next_value
        adv[:, t] = running
    ret = adv + values
    n = m.sum()
    mean = (adv * m).sum() / n
    var = ((adv - mean) ** 2 * m).sum() / n * n / (n - 1)
    return (adv - mean) * torch.rsqrt(var + 1e-8), ret


def main() -> int:
    torch.manual_seed(0)
    B, T, gamma, lam = 6, 33, 0.99, 0.95
    lengths = torch.randint(1, T + 1, (B,))
    response_mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    response_mask[0, 3:6] = 0  # a multi-turn "observation" span inside a response
    values = torch.randn(B, T)
    rewards = torch.zeros(B, T)
    rewards[torch.arange(B), lengths - 1] = torch.randn(B)  # sequence reward on the last response token
    # Before (verl): core_algos.compute_gae_advantage_return(rewards, values, response_mask, gamma, lam)
    ref_adv, ref_ret = _verl_semantics(rewards.double(), values.double(), response_mask, gamma, lam)
    # After:
    adv, ret = compute_gae_advantage_return(rewards, values, response_mask, gamma, lam)
    on = response_mask.bool()
    err_adv = (adv.double() - ref_adv)[on].abs().max().item()
    err_ret = (ret.double() - ref_ret)[on].abs().max().item()
    ok = max(err_adv, err_ret) < 1e-4 and bool((adv[~on] == 0).all()) and bool((ret[~on] == 0).all())
    print(f"GAE gamma={gamma} lam={lam} on {int(on.sum())} response tokens: "
          f"max|dadv|={err_adv:.2e} max|dret|={err_ret:.2e}")
    print("verl drop-in:", "OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
