"""Experiments built on the trainer (``python -m vrpo_fast.experiments.robustness``)."""
