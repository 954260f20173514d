"""Errors the trainer stops with; ``python -m vrpo_fast.train`` turns each into one line and an exit code."""
from __future__ import annotations

from typing import Optional


def _where(last_checkpoint: Optional[str]) -> str:
    return f"last good checkpoint: {last_checkpoint}" if last_checkpoint else "no checkpoint was written yet"


class NonFiniteLossError(RuntimeError):
    """A loss or a gradient norm became NaN / inf: training stopped before the optimiser step, so the
    bad update was never applied and no checkpoint holds it (exit code 3)."""

    def __init__(self, loss_name: str, step: int, value: float, last_checkpoint: Optional[str] = None, *,
                 quantity: str = "loss", phase: str = "RL step"):
        self.loss_name, self.step, self.value, self.last_checkpoint = loss_name, step, value, last_checkpoint
        self.quantity, self.phase = quantity, phase
        super().__init__(f"the {loss_name} {quantity} is {value} at {phase} {step}: training stopped before applying "
                         f"it ({_where(last_checkpoint)}). Try a lower learning rate or --max-grad-norm.")


class TrainingInterrupted(Exception):
    """Ctrl-C (SIGINT) or SIGTERM: the current step was abandoned; ``--resume`` continues from the checkpoint."""

    def __init__(self, signum: int, step: int, last_checkpoint: Optional[str]):
        self.signum, self.step, self.last_checkpoint = signum, step, last_checkpoint
        from .checkpoint import checkpoint_step
        import os

        saved = checkpoint_step(os.path.basename(last_checkpoint)) if last_checkpoint else None
        latest = f"the latest checkpoint is step {saved}" if saved is not None else "no checkpoint was written yet"
        super().__init__(f"interrupted at step {step}; {latest}: rerun with --resume to continue")
