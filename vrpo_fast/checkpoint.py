"""Atomic, verifiable checkpoints of a training run, and finding the one to resume from.

Layout of ``<run_dir>/checkpoints/step_000050/``:

* ``policy/``            the policy (``save_pretrained``) and its tokenizer: loadable with ``--model``;
* ``value/``             the critic (``ValueModel.save_pretrained``), absent for GRPO;
* ``trainer_state.pt``   step, data position, optimiser / scheduler states, RNG states of every
                         process (torch, python, numpy) and of the reward-noise model;
* ``MANIFEST.json``      written last: every other file with its size and SHA-256.

What a run can rely on:

* A checkpoint is written to ``step_000050.tmp``; every file and directory is fsync'd, the manifest
  is written, and only then is the directory renamed into place (and its parent fsync'd). A run
  killed while saving, or a power loss, leaves the previous checkpoints intact.
* A checkpoint is *complete* only when its manifest is present and every file it lists has the
  recorded size and checksum; a missing head file or a truncated tensor file makes it incomplete.
  :func:`find_resume_checkpoint` scans ``checkpoints/`` by step number (the ``latest`` file is a
  hint for humans and older tools, not the truth) and returns the newest complete one whose
  ``trainer_state.pt`` loads, with the reasons for skipping any newer ones.
* Pruning keeps the newest ``keep`` checkpoints by step number; it never deletes the one just
  written, and leaves set-aside (``*.broken``) ones alone.
* Left-overs of a killed write (``*.tmp`` directories, ``*.tmp-<pid>`` files, a ``*.old`` directory
  of an interrupted replace) are cleaned up, or put back, by :func:`recover_interrupted_writes`.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

CHECKPOINTS = "checkpoints"
LATEST = "latest"
TRAINER_STATE = "trainer_state.pt"
MANIFEST = "MANIFEST.json"
BROKEN_SUFFIX = ".broken"


class CheckpointError(ValueError):
    """A checkpoint (or another file of a run) cannot be used; the message names the file."""


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def checkpoint_step(name: str) -> Optional[int]:
    """The step of a checkpoint directory name ``step_000050`` -> 50; None for anything else."""
    if name.startswith("step_") and name[5:].isdigit():
        return int(name[5:])
    return None


# ----------------------------------------------------------------------------------------------
# durable writes
# ----------------------------------------------------------------------------------------------
def fsync_dir(path: str) -> None:
    """Make a directory's entries (created / renamed files) durable."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories; nothing more can be done there
        pass
    finally:
        os.close(fd)


def fsync_tree(root: str) -> None:
    """fsync every file below ``root``, then every directory, deepest first."""
    for dirpath, _, files in os.walk(root, topdown=False):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(dirpath)


def atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def atomic_write_json(path: str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _files(root: str) -> List[str]:
    out = []
    for dirpath, _, files in os.walk(root):
        for name in files:
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            if rel != MANIFEST:
                out.append(rel.replace(os.sep, "/"))
    return sorted(out)


def write_manifest(root: str) -> None:
    """Record every file below ``root`` (size, SHA-256) in ``root/MANIFEST.json``; call it last."""
    files = {rel: {"size": os.path.getsize(os.path.join(root, rel)), "sha256": _sha256(os.path.join(root, rel))}
             for rel in _files(root)}
    with open(os.path.join(root, MANIFEST), "w", encoding="utf-8") as f:
        json.dump({"version": 1, "files": files}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def verify_manifest(root: str, checksums: bool = True) -> Optional[str]:
    """None if ``root`` is complete (every file of its manifest present, same size and checksum), else why not."""
    path = os.path.join(root, MANIFEST)
    if not os.path.isfile(path):
        return f"no {MANIFEST} (the write did not finish, or an older vrpo-fast wrote it)"
    try:
        with open(path, encoding="utf-8") as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{MANIFEST} cannot be read ({err})"
    for rel, info in files.items():
        full = os.path.join(root, rel)
        if not os.path.isfile(full):
            return f"{rel} is missing"
        size = os.path.getsize(full)
        if size != info["size"]:
            return f"{rel} has {size} bytes, the manifest says {info['size']}"
        if checksums and _sha256(full) != info["sha256"]:
            return f"{rel} does not match its checksum (corrupted)"
    return None


def atomic_directory(final_dir: str, write: Callable[[str], None]) -> str:
    """Call ``write(tmp_dir)``, add a manifest, make it durable, then move it to ``final_dir``.

    An existing ``final_dir`` is replaced: it is moved to ``final_dir.old`` first (a directory cannot
    be replaced in one rename), and :func:`recover_interrupted_writes` puts it back if the process
    dies between the two renames.
    """
    tmp = f"{final_dir}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        write(tmp)
        write_manifest(tmp)
        fsync_tree(tmp)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)  # give the space back; the previous copy is untouched
        if not isinstance(err, OSError) and "No space left on device" in str(err):  # e.g. safetensors' own error
            raise OSError(errno.ENOSPC, f"No space left on device while writing {final_dir}") from None
        raise
    parent = os.path.dirname(os.path.abspath(final_dir))
    if os.path.exists(final_dir):
        old = f"{final_dir}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final_dir, old)
        os.replace(tmp, final_dir)
        fsync_dir(parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final_dir)
    fsync_dir(parent)
    return final_dir


def recover_interrupted_writes(directory: str) -> List[str]:
    """Undo what a killed write left in ``directory``; returns what was done, one line each.

    ``X.tmp`` directories and ``X.tmp-<pid>`` files are deleted (their write never finished);
    ``X.old`` is moved back to ``X`` when ``X`` is missing (killed between the two renames of a
    replace), else deleted.
    """
    done = []
    if not os.path.isdir(directory):
        return done
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if name.endswith(".tmp") or ".tmp-" in name:
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
            done.append(f"removed the unfinished write {path}")
        elif name.endswith(".old") and os.path.isdir(path):
            final = path[:-len(".old")]
            if os.path.exists(final):
                shutil.rmtree(path)
                done.append(f"removed the replaced copy {path}")
            else:
                os.replace(path, final)
                done.append(f"restored {final} from an interrupted replace")
    return done


# ----------------------------------------------------------------------------------------------
# RNG state
# ----------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------
class _WriteErrors:
    """A file wrapper that keeps the OSError of a failed write: ``torch.save`` reports it only as an
    opaque RuntimeError ("unexpected pos ..."), which would hide a full disk."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except (OSError, KeyboardInterrupt) as err:  # Ctrl-C / SIGTERM in the middle of a write, too
            self.error = err
            raise

    def flush(self):
        return self.f.flush()


def save_torch(obj: Any, path: str) -> None:
    """``torch.save(obj, path)``, raising the real OSError (e.g. ENOSPC, naming ``path``) when a write fails."""
    with open(path, "wb") as f:
        out = _WriteErrors(f)
        try:
            torch.save(obj, out)
        except RuntimeError:
            if isinstance(out.error, KeyboardInterrupt):
                raise out.error from None
            if out.error is not None:
                raise OSError(out.error.errno, out.error.strerror, path) from None
            raise


def _save(model, path: str, state_dict) -> None:
    """``model.save_pretrained(path)``, with the weights ``state_dict`` when given (gathered under FSDP)."""
    if state_dict is None:
        model.save_pretrained(path)
    else:
        model.save_pretrained(path, state_dict=state_dict)


def save_checkpoint(run_dir: str, step: int, *, policy, tokenizer, value_model=None,
                    trainer_state: Dict[str, Any], keep: int = 2, policy_state=None, value_state=None) -> str:
    """Write checkpoint ``step`` atomically and durably, point ``latest`` at it, keep the newest ``keep``.

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
        save_torch(trainer_state, os.path.join(tmp, TRAINER_STATE))

    path = atomic_directory(os.path.join(root, checkpoint_name(step)), write)
    atomic_write_text(os.path.join(root, LATEST), checkpoint_name(step) + "\n")
    prune(root, keep, protect=checkpoint_name(step))
    return path


def _steps_newest_first(root: str) -> List[Tuple[int, str]]:
    if not os.path.isdir(root):
        return []
    found = [(checkpoint_step(n), n) for n in os.listdir(root) if os.path.isdir(os.path.join(root, n))]
    return sorted(((s, n) for s, n in found if s is not None), reverse=True)


def prune(root: str, keep: int, protect: Optional[str] = None) -> None:
    """Delete all but the newest ``keep`` checkpoints by step number (never ``protect``)."""
    for _, name in _steps_newest_first(root)[max(keep, 1):]:
        if name != protect:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def load_trainer_state(checkpoint_dir: str) -> Dict[str, Any]:
    path = os.path.join(checkpoint_dir, TRAINER_STATE)
    try:
        # our own file: it holds numpy / python RNG states, which weights_only loading rejects
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # pickle / zip / EOF errors of a damaged file
        raise CheckpointError(f"{path}: cannot be read ({type(err).__name__}: {err})") from None


def find_resume_checkpoint(run_dir: str, checksums: bool = True
                           ) -> Tuple[Optional[str], Optional[Dict[str, Any]], List[Tuple[str, str]]]:
    """The newest complete, loadable checkpoint: ``(path, trainer_state, skipped)``.

    ``skipped`` lists ``(name, reason)`` for every newer checkpoint that was passed over. ``path`` is
    None when there is no usable checkpoint (``skipped`` then says whether there were unusable ones).
    """
    root = os.path.join(run_dir, CHECKPOINTS)
    skipped = []
    for _, name in _steps_newest_first(root):
        path = os.path.join(root, name)
        reason = verify_manifest(path, checksums=checksums)
        if reason is None:
            try:
                return path, load_trainer_state(path), skipped
            except CheckpointError as err:
                reason = str(err)
        skipped.append((name, reason))
    return None, None, skipped


def latest_checkpoint(run_dir: str) -> Optional[str]:
    """The newest complete checkpoint directory of a run (by step number, checksums checked), or None."""
    root = os.path.join(run_dir, CHECKPOINTS)
    for _, name in _steps_newest_first(root):
        if verify_manifest(os.path.join(root, name)) is None:
            return os.path.join(root, name)
    return None


def set_aside(run_dir: str, names: List[str]) -> List[str]:
    """Rename unusable checkpoints to ``<name>.broken`` (kept for inspection, out of resume and pruning)."""
    root = os.path.join(run_dir, CHECKPOINTS)
    moved = []
    for name in names:
        src, dst = os.path.join(root, name), os.path.join(root, name + BROKEN_SUFFIX)
        if os.path.isdir(src):
            shutil.rmtree(dst, ignore_errors=True)
            os.replace(src, dst)
            moved.append(dst)
    if moved:
        fsync_dir(root)
    return moved
