"""Atomic checkpoints of a training run, and finding the one to resume from.

Layout of ``<run_dir>/checkpoints/step_000050/``:

* ``policy/``            the policy (``save_pretrained``) and its tokenizer: loadable with ``--model``;
* ``value/``             the critic (``ValueModel.save_pretrained``), absent for GRPO;
* ``trainer_state.pt``   step, data position, optimiser / scheduler states, RNG states of every
                         process (torch, python, numpy) and of the reward-noise model.

A checkpoint is written to ``step_000050.tmp`` and renamed into place with ``os.replace``; the file
``checkpoints/latest`` (also replaced atomically) names the newest complete one. A run killed while
saving therefore leaves the previous checkpoint intact and never a half-written "latest".
"""
from __future__ import annotations

import json
import os
import random
import shutil
from typing import Any, Callable, Dict, Optional

import numpy as np
import torch

CHECKPOINTS = "checkpoints"
LATEST = "latest"
TRAINER_STATE = "trainer_state.pt"


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_directory(final_dir: str, write: Callable[[str], None]) -> str:
    """Call ``write(tmp_dir)``, then move ``tmp_dir`` to ``final_dir`` (replacing an older one)."""
    tmp = f"{final_dir}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    write(tmp)
    if os.path.exists(final_dir):
        # os.replace cannot replace a non-empty directory: move the old one aside first
        old = f"{final_dir}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final_dir, old)
        os.replace(tmp, final_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final_dir)
    return final_dir


def rng_state() -> Dict[str, Any]:
    """This process's RNG states (torch CPU, CUDA if any, python, numpy)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save(model, path: str, state_dict) -> None:
    """``model.save_pretrained(path)``, with the weights ``state_dict`` when given (gathered under FSDP)."""
    if state_dict is None:
        model.save_pretrained(path)
    else:
        model.save_pretrained(path, state_dict=state_dict)


def save_checkpoint(run_dir: str, step: int, *, policy, tokenizer, value_model=None,
                    trainer_state: Dict[str, Any], keep: int = 2, policy_state=None, value_state=None) -> str:
    """Write checkpoint ``step`` atomically, point ``latest`` at it, keep the newest ``keep``.

    ``policy_state`` / ``value_state``: full weights gathered elsewhere (FSDP), written instead of the
    modules' own (sharded) tensors.
    """
    root = os.path.join(run_dir, CHECKPOINTS)
    os.makedirs(root, exist_ok=True)

    def write(tmp: str) -> None:
        _save(policy, os.path.join(tmp, "policy"), policy_state)
        tokenizer.save_pretrained(os.path.join(tmp, "policy"))
        if value_model is not None:
            _save(value_model, os.path.join(tmp, "value"), value_state)
        torch.save(trainer_state, os.path.join(tmp, TRAINER_STATE))

    path = atomic_directory(os.path.join(root, checkpoint_name(step)), write)
    atomic_write_text(os.path.join(root, LATEST), checkpoint_name(step) + "\n")
    _prune(root, keep)
    return path


def _prune(root: str, keep: int) -> None:
    names = sorted(n for n in os.listdir(root) if n.startswith("step_") and n[5:].isdigit())
    for name in names[:-max(keep, 1)]:
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def latest_checkpoint(run_dir: str) -> Optional[str]:
    """The newest complete checkpoint directory of a run, or None."""
    pointer = os.path.join(run_dir, CHECKPOINTS, LATEST)
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        path = os.path.join(run_dir, CHECKPOINTS, f.read().strip())
    return path if os.path.isfile(os.path.join(path, TRAINER_STATE)) else None


def load_trainer_state(checkpoint_dir: str) -> Dict[str, Any]:
    # our own file: it holds numpy / python RNG states, which weights_only loading rejects
    return torch.load(os.path.join(checkpoint_dir, TRAINER_STATE), map_location="cpu", weights_only=False)
