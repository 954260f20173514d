"""The run directory: one trainer at a time, one configuration per run, and where to resume.

What a run directory holds and what the trainer guarantees about it (README "Run directory"):

* ``.lock``        an OS lock (``fcntl.flock``) held by the one trainer working in the directory, with
                   its PID; a second trainer exits at once naming that PID. The OS drops the lock when
                   the process dies, however it dies.
* ``config.json``  the run's configuration, written once, after the run's set-up succeeded, and never
                   rewritten. ``--resume`` with options that change what is trained is refused with
                   the list of differences; options that may change (:data:`MAY_CHANGE`) are allowed
                   and appended to ``resumes.jsonl``.
* ``reference/``, ``warmup.json``, ``checkpoints/``, ``metrics.jsonl``, ``curves.png``, ``summary.json``.

A fresh start that fails before ``config.json`` is written (bad option, missing model, ...) removes
the directory it created, so the corrected command is not told that the directory "already holds a
run".
"""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import time
from typing import Any, Dict, List, Optional

from . import checkpoint as ckpt
from .config import TrainConfig

CONFIG = "config.json"
LOCK = ".lock"
RESUMES = "resumes.jsonl"

# options that do not change what is trained: they may differ on --resume (and are recorded)
MAY_CHANGE = frozenset({
    "steps", "save_every", "keep_checkpoints", "progress", "resume", "output_dir", "num_threads",
    "num_eval", "eval_samples", "eval_batch_size", "eval_greedy", "eval_temperature", "max_prompt_tokens",
    "diagnostics_every",
})


class RunDirError(ValueError):
    """The run directory cannot be used as asked (in use, other configuration, nothing to resume)."""


class RunLock:
    """An exclusive ``flock`` on ``<run_dir>/.lock`` for the life of the run; the file holds the PID."""

    def __init__(self, run_dir: str):
        import fcntl

        self.path = os.path.join(run_dir, LOCK)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = _read_pid(self.fd)
            os.close(self.fd)
            self.fd = None
            if err.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                who = f"PID {holder}" if holder else "another process"
                raise RunDirError(f"{run_dir} is in use by another trainer ({who}): wait for it to finish, or stop "
                                  f"it, before starting another one on this directory") from None
            raise
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"{os.getpid()}\n".encode())
        os.fsync(self.fd)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None


def _read_pid(fd: int) -> Optional[str]:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 64).decode(errors="replace").strip()
    except OSError:
        return None
    return text or None


def read_json(path: str) -> Dict[str, Any]:
    """A JSON file of the run; a damaged one is a :class:`~vrpo_fast.checkpoint.CheckpointError` naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as err:
        raise ckpt.CheckpointError(f"{path}: not valid JSON ({err})") from None


def config_differences(saved: Dict[str, Any], wanted: Dict[str, Any]) -> Dict[str, tuple]:
    """``{option: (saved, wanted)}`` for the options that change what is trained."""
    return {k: (saved.get(k), v) for k, v in wanted.items() if k not in MAY_CHANGE and saved.get(k) != v}


def _format_differences(diffs: Dict[str, tuple]) -> str:
    return ", ".join(f"--{k.replace('_', '-')} {old!r} -> {new!r}" for k, (old, new) in sorted(diffs.items()))


@dataclasses.dataclass
class RunDirectory:
    """An opened run directory (on the main process; other processes hold ``lock=None``)."""

    path: str
    main: bool
    created: bool = False        # this start made the directory (removed again if set-up fails)
    has_config: bool = False     # config.json existed: a run was already started here
    lock: Optional[RunLock] = None
    notes: List[str] = dataclasses.field(default_factory=list)
    saved: Optional[Dict[str, Any]] = None  # the flat configuration in config.json, read once at open

    def file(self, *parts: str) -> str:
        return os.path.join(self.path, *parts)

    def commit_config(self, cfg: TrainConfig) -> None:
        """Write ``config.json`` once (a new run), or record the allowed changes of a resume."""
        if not self.main:
            return
        if not self.has_config:
            ckpt.atomic_write_json(self.file(CONFIG), cfg.to_dict())
            self.has_config = True
            return
        changed = {k: [self.saved.get(k), v] for k, v in cfg.flat().items()
                   if self.saved.get(k) != v and k != "resume"}
        if changed:
            with open(self.file(RESUMES), "a", encoding="utf-8") as f:
                f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "changed": changed}) + "\n")

    def close(self, failed_setup: bool) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        if failed_setup and self.created and not self.has_config:
            shutil.rmtree(self.path, ignore_errors=True)


def open_run_directory(cfg: TrainConfig, main: bool) -> RunDirectory:
    """Lock the run directory and check that this start fits what it holds (main process only)."""
    path = cfg.run_dir()
    run = RunDirectory(path, main)
    if not main:
        return run
    run.created = not os.path.exists(path)
    os.makedirs(path, exist_ok=True)
    run.lock = RunLock(path)  # a second trainer stops here, before touching anything
    try:
        run.has_config = os.path.isfile(run.file(CONFIG))
        if run.has_config and not cfg.run.resume:
            raise FileExistsError(f"{path} already holds a run: pass --resume to continue it, or choose another "
                                  f"--output-dir")
        if run.has_config:
            run.saved = TrainConfig.from_dict(read_json(run.file(CONFIG))).flat()
            diffs = config_differences(run.saved, cfg.flat())
            if diffs:
                raise RunDirError(f"--resume with options that change what is trained (the run in {path} was started "
                                  f"with other values): {_format_differences(diffs)}. Resume with the saved values, "
                                  f"or start a new run in another --output-dir")
        run.notes += ckpt.recover_interrupted_writes(path)
        run.notes += ckpt.recover_interrupted_writes(run.file(ckpt.CHECKPOINTS))
    except BaseException:
        run.close(failed_setup=True)
        raise
    return run
