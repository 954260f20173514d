"""vrpo-fast: VRPO (value-model-centred PPO) for RL post-training under noisy rewards.

Public surface:
  * :mod:`vrpo_fast.ops`        -- fused, kernel-backed building blocks (import one by one).
  * :mod:`vrpo_fast.models`     -- value heads (VIB) and value models.
  * :mod:`vrpo_fast.algorithms` -- pure loss / advantage functions over [B, T] tensors.
  * :mod:`vrpo_fast.train`      -- the trainer (``python -m vrpo_fast.train``).
"""
__version__ = "0.1.0"
