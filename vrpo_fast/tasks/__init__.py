"""Task families (prompts + clean reward + held-out split) and reward-noise models.

``get_task(name, **kwargs)`` builds a task by name; modules are imported lazily so that a task's
optional dependencies never slow down the others.
"""
from __future__ import annotations

import importlib

from .base import Example, Task

# name -> "module:Class"
TASKS = {
    "arith": "vrpo_fast.tasks.arith:ArithTask",
    "math": "vrpo_fast.tasks.math:MathTask",
    "sciqa": "vrpo_fast.tasks.sciqa:SciQATask",
    "dialogue": "vrpo_fast.tasks.dialogue:DialogueTask",
}


def task_class(name: str) -> type:
    """The class registered as ``name`` (imported on first use), without building a task."""
    if name not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {name!r}")
    module, cls = TASKS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def get_task(name: str, **kwargs) -> Task:
    return task_class(name)(**kwargs)


__all__ = ["Example", "Task", "TASKS", "get_task", "task_class"]
