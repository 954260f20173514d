"""Loading a user's task data from JSON Lines, with errors that name the file and the line."""
from __future__ import annotations

import json
import os
import random
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, TypeVar

T = TypeVar("T")


class JsonlError(ValueError):
    """A malformed line in a task JSONL file; the message starts with ``path:line:``."""

    def __init__(self, path: str, lineno: int, reason: str):
        self.path, self.lineno, self.reason = str(path), int(lineno), reason
        super().__init__(f"{path}:{lineno}: {reason}")


# Longest line read from a task file, in bytes: a record longer than this is refused (naming
# file:line) before it is parsed, so one huge line cannot grow memory without bound. The trainer sets
# it from --max-prompt-tokens (64 bytes per token: no tokenizer's token is longer) with line_limit().
_LINE_LIMIT: ContextVar[int] = ContextVar("vrpo_fast_jsonl_line_limit", default=64 * 2048)


@contextmanager
def line_limit(max_bytes: int):
    """Within this block, :func:`iter_jsonl` refuses lines longer than ``max_bytes`` bytes."""
    token = _LINE_LIMIT.set(int(max_bytes))
    try:
        yield
    finally:
        _LINE_LIMIT.reset(token)


def _lines(path: str, limit: int) -> Iterator[Tuple[int, str]]:
    """(line number, decoded line) of a UTF-8 file (a leading BOM is accepted), reading at most
    ``limit`` bytes of any line."""
    with open(path, "rb") as f:
        lineno = 0
        while True:
            raw = f.readline(limit + 1)
            if not raw:
                return
            lineno += 1
            if len(raw) > limit and not raw.endswith(b"\n"):
                raise JsonlError(path, lineno, f"line longer than {limit} bytes (the cap set by --max-prompt-tokens "
                                               f"x 64 bytes): a prompt or answer that long is refused")
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise JsonlError(path, lineno, f"invalid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                                               f"task files must be UTF-8") from None


def iter_jsonl(path: str, required: Sequence[str] = ()) -> Iterator[Tuple[int, Dict[str, Any]]]:
    """Yield ``(line_number, record)`` for every non-blank line of ``path`` (1-based line numbers).

    Raises :class:`JsonlError` (a ValueError) for a line that is not UTF-8, not JSON, not a JSON
    object, longer than the line limit (:func:`line_limit`), or lacking one of the ``required`` keys,
    and FileNotFoundError if ``path`` does not exist. A UTF-8 byte-order mark is accepted.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"task data file not found: {path}")
    for lineno, line in _lines(path, _LINE_LIMIT.get()):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise JsonlError(path, lineno, f"invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict):
            raise JsonlError(path, lineno, f"expected a JSON object, got {type(record).__name__}")
        missing = [k for k in required if k not in record]
        if missing:
            raise JsonlError(
                path, lineno, f"missing key(s) {', '.join(map(repr, missing))} (has: {', '.join(map(repr, record))})"
            )
        yield lineno, record


def require_str(path: str, lineno: int, record: Dict[str, Any], key: str, allow_empty: bool = False) -> str:
    """``record[key]`` as a string, or a :class:`JsonlError` saying why it is not one."""
    value = record.get(key)
    if not isinstance(value, str):
        raise JsonlError(path, lineno, f"{key!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise JsonlError(path, lineno, f"{key!r} is empty")
    return value


def split_user_examples(
    path: str,
    examples: List[T],
    eval_examples: Optional[List[T]],
    n_train: Optional[int],
    n_eval: Optional[int],
    seed: int,
    default_n_eval: int,
) -> Tuple[List[T], List[T]]:
    """Train/eval split of user data.

    With a separate eval file (``eval_examples`` not None) the splits are the two files, each cut to
    ``n_train`` / ``n_eval`` when given. Otherwise the examples are shuffled with ``seed`` and
    ``n_eval`` of them (default ``default_n_eval``, at most half the file) are held out.
    """
    if not examples:
        raise ValueError(f"{path}: no examples (the file is empty)")
    if eval_examples is not None:
        train, held = list(examples), list(eval_examples)
    else:
        if len(examples) < 2:
            raise ValueError(f"{path}: need at least 2 examples to hold some out for evaluation")
        order = list(range(len(examples)))
        random.Random(seed).shuffle(order)
        k = default_n_eval if n_eval is None else int(n_eval)
        k = max(1, min(k, len(examples) // 2))
        held = [examples[i] for i in sorted(order[:k])]
        train = [examples[i] for i in sorted(order[k:])]
        n_eval = None
    if n_train is not None:
        train = train[: int(n_train)]
    if n_eval is not None:
        held = held[: int(n_eval)]
    return train, held


__all__ = ["JsonlError", "iter_jsonl", "line_limit", "require_str", "split_user_examples"]


def build_splits(
    *,
    path: Optional[str],
    eval_path: Optional[str],
    load: Callable[[str], List[T]],
    generate: Callable[[int, int], Tuple[List[T], List[T]]],
    n_train: Optional[int],
    n_eval: Optional[int],
    num_train: Optional[int],
    num_eval: Optional[int],
    seed: int,
    default_n_eval: int,
    default_n_train: int = 2000,
) -> Tuple[List[T], List[T]]:
    """(train, eval) for a task: from the user's file(s) when ``path`` is given, else generated.

    ``num_train`` / ``num_eval`` are aliases of ``n_train`` / ``n_eval`` (the spelling ArithTask uses).
    """
    n_train = n_train if n_train is not None else num_train
    n_eval = n_eval if n_eval is not None else num_eval
    if path is not None:
        eval_examples = load(eval_path) if eval_path is not None else None
        return split_user_examples(path, load(path), eval_examples, n_train, n_eval, seed, default_n_eval=default_n_eval)
    if eval_path is not None:
        raise ValueError("eval_path needs path (the training file) as well")
    n_train = default_n_train if n_train is None else int(n_train)
    n_eval = default_n_eval if n_eval is None else int(n_eval)
    if n_train < 0 or n_eval < 1:
        raise ValueError(f"need n_train >= 0 and n_eval >= 1, got {n_train}, {n_eval}")
    return generate(n_train, n_eval)
