"""Pure loss and advantage functions over [B, T] token tensors with masks (no trainer state).

Pick them by name from the registries (``POLICY_LOSSES``, ``VALUE_LOSSES``, ``ADVANTAGE_ESTIMATORS``,
``KL_ESTIMATORS``) or import them directly; the trainer only wires them together.
"""
from .advantages import ADVANTAGE_ESTIMATORS, gae_advantages, grpo_advantages, token_level_rewards, whiten
from .losses import (
    KL_ESTIMATORS,
    LOSS_AGGREGATIONS,
    POLICY_LOSSES,
    VALUE_LOSSES,
    aggregate_loss,
    aux_regression_loss,
    explained_variance,
    grpo_policy_loss,
    kl_penalty,
    policy_loss,
    value_loss,
    vrpo_value_loss,
)

__all__ = [
    "policy_loss",
    "grpo_policy_loss",
    "value_loss",
    "vrpo_value_loss",
    "aux_regression_loss",
    "kl_penalty",
    "explained_variance",
    "aggregate_loss",
    "token_level_rewards",
    "gae_advantages",
    "grpo_advantages",
    "whiten",
    "POLICY_LOSSES",
    "VALUE_LOSSES",
    "ADVANTAGE_ESTIMATORS",
    "KL_ESTIMATORS",
    "LOSS_AGGREGATIONS",
]
