"""Where vrpo-fast caches what it builds on first use (reward models, de-quantised GGUF weights)."""
from __future__ import annotations

import os

CACHE_ENV = "VRPO_FAST_CACHE"


def cache_root() -> str:
    """``$VRPO_FAST_CACHE``, else ``$XDG_CACHE_HOME/vrpo_fast``, else ``~/.cache/vrpo_fast`` (absolute)."""
    root = os.environ.get(CACHE_ENV)
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
        root = os.path.join(base, "vrpo_fast")
    return os.path.abspath(os.path.expanduser(root))
