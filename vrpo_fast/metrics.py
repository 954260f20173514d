"""Per-step metrics: one JSON line per RL step in ``metrics.jsonl``, and ``curves.png`` from it."""
from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, Iterable, List, Optional

# keys whose values depend on the machine's speed, not on the computation (ignored when comparing runs)
TIMING_KEYS = ("step_time_s", "tokens_per_s", "wall_time_s", "diagnostics_time_s")


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item") and getattr(value, "numel", lambda: 1)() == 1:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # strict JSON has no NaN / inf; "undefined this step"
    return value


class MetricsWriter:
    """Appends one JSON object per line. ``resume_step``: drop lines logged after that step first.

    A run stopped between two checkpoints may have logged steps that the resumed run will redo;
    cutting them keeps ``metrics.jsonl`` one line per step. A torn last line (the disk filled, or the
    process died, in the middle of an append) is dropped with a message; the lines before it are kept.
    """

    def __init__(self, path: str, *, resume_step: Optional[int] = None):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if resume_step is None:
            open(path, "w").close()
        else:
            kept = [r for r in read_metrics(path, drop_torn_tail=True, say=print) if r.get("step", 0) <= resume_step] \
                if os.path.exists(path) else []
            tmp = f"{path}.tmp-{os.getpid()}"
            with open(tmp, "w", encoding="utf-8") as f:
                for record in kept:
                    f.write(json.dumps(record) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)

    def log(self, record: Dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")


def read_metrics(path: str, *, drop_torn_tail: bool = False, say=None) -> List[Dict[str, Any]]:
    """The records of a ``metrics.jsonl``. A line that is not a JSON object raises ValueError naming
    ``path:line``, except, with ``drop_torn_tail``, an unparsable LAST line (a torn append), which is
    dropped (and reported through ``say``)."""
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    records = []
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            if drop_torn_tail and i == last:
                if say is not None:
                    say(f"[vrpo_fast] {path}:{i + 1}: dropped a torn last line ({len(raw)} bytes; the steps before "
                        f"it are kept)")
                break
            raise ValueError(f"{path}:{i + 1}: not a metrics record ({err})") from None
        records.append(record)
    return records


def without_timings(records: Iterable[Dict[str, Any]]) -> List[Dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def _series(records, key):
    pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_curves(metrics_path: str, out_path: str, *, title: str = "") -> Optional[str]:
    """Clean / noisy reward and the losses over steps; returns the path, or None with no metrics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path) if os.path.exists(metrics_path) else []
    if not records:
        return None
    panels = [
        ("reward", [("clean_reward", "clean (true)"), ("noisy_reward", "noisy (seen by the learner)")]),
        ("losses", [("policy_loss", "policy"), ("value_loss", "value (clipped MSE)"), ("critic_loss", "critic total")]),
        ("critic regularisers / KL", [("vib_kl", "VIB KL (nats/token)"), ("ent_loss", "aux entropy"),
                                      ("ppl_loss", "aux surprisal"), ("kl_ref", "KL to reference")]),
        ("noise diagnostics", [("adv_clean_corr", "corr(adv, clean-reward adv)"),
                               ("value_clean_corr", "corr(V_first, clean reward)"),
                               ("value_noisy_corr", "corr(V_first, noisy reward)")]),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6))
    for ax, (name, keys) in zip(axes, panels):
        for key, label in keys:
            xs, ys = _series(records, key)
            if xs:
                ax.plot(xs, ys, label=label)
        ax.set_title(name)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    tmp = out_path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out_path)
    return out_path
