"""Statistics for the robustness study: intervals over seeds, paired differences and power.

Pure functions of plain numbers (no scipy needed): Student-t quantiles from the regularized incomplete
beta function, means with t intervals, paired differences between two arms over seeds, the minimum
detectable effect of a paired design, and the robustness contrast (the difference between two arms
under noise minus the same difference without noise, paired by seed).
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

__all__ = ["t_cdf", "t_quantile", "mean_ci", "paired_difference", "minimum_detectable_effect", "contrast",
           "eval_standard_error"]


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz), converges for x < (a+1)/(a+b+2)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"df must be > 0, got {df}")
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t (bisection on :func:`t_cdf`; |error| < 1e-10)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12:
            break
    return 0.5 * (lo + hi)


def _finite(values: Iterable[float]) -> List[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def mean_ci(values: Sequence[float], level: float = 0.95) -> Dict[str, float]:
    """Mean, sample sd (ddof 1), n, and the t interval ``mean +- t_{(1+level)/2, n-1} * sd / sqrt(n)``
    (``lo``/``hi`` nan with fewer than 2 values)."""
    v = _finite(values)
    n = len(v)
    if n == 0:
        return {"mean": math.nan, "sd": math.nan, "n": 0, "half_width": math.nan, "lo": math.nan, "hi": math.nan}
    mean = sum(v) / n
    if n < 2:
        return {"mean": mean, "sd": math.nan, "n": 1, "half_width": math.nan, "lo": math.nan, "hi": math.nan}
    sd = math.sqrt(sum((x - mean) ** 2 for x in v) / (n - 1))
    half = t_quantile(0.5 + level / 2.0, n - 1) * sd / math.sqrt(n)
    return {"mean": mean, "sd": sd, "n": n, "half_width": half, "lo": mean - half, "hi": mean + half}


def minimum_detectable_effect(sd: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest true mean difference a paired two-sided t test at ``alpha`` detects with ``power``:
    ``(t_{1-alpha/2, n-1} + t_{power, n-1}) * sd / sqrt(n)`` (``sd`` of the per-seed differences)."""
    if n < 2 or not math.isfinite(sd):
        return math.nan
    return (t_quantile(1.0 - alpha / 2.0, n - 1) + t_quantile(power, n - 1)) * sd / math.sqrt(n)


def paired_difference(a: Mapping[int, float], b: Mapping[int, float], level: float = 0.95) -> Dict[str, float]:
    """``a - b`` over the seeds both have (``{seed: value}``): mean with t interval, sd, n, p-value of a
    two-sided paired t test, and the minimum detectable effect at 80% power."""
    seeds = sorted(s for s in a if s in b and math.isfinite(a[s]) and math.isfinite(b[s]))
    diffs = [a[s] - b[s] for s in seeds]
    out = mean_ci(diffs, level)
    out["mde80"] = minimum_detectable_effect(out["sd"], out["n"], alpha=1.0 - level)
    if out["n"] >= 2 and out["sd"] > 0:
        t = out["mean"] / (out["sd"] / math.sqrt(out["n"]))
        out["p"] = 2.0 * (1.0 - t_cdf(abs(t), out["n"] - 1))
    else:
        out["p"] = math.nan
    return out


def contrast(a_noise: Mapping[int, float], b_noise: Mapping[int, float], a_clean: Mapping[int, float],
             b_clean: Mapping[int, float], level: float = 0.95) -> Dict[str, float]:
    """The robustness contrast ``(a - b under noise) - (a - b without noise)``, paired by seed."""
    seeds = [s for s in a_noise if s in b_noise and s in a_clean and s in b_clean]
    per_seed = {s: (a_noise[s] - b_noise[s]) - (a_clean[s] - b_clean[s]) for s in seeds}
    return paired_difference(per_seed, {s: 0.0 for s in seeds}, level)


def eval_standard_error(p: float, prompts: int, samples: int, within_prompt_corr: float = 0.0) -> float:
    """Standard error of a held-out mean of binary rewards: ``prompts x samples`` draws at success rate
    ``p``, the ``samples`` of one prompt correlated by ``within_prompt_corr`` (design effect
    ``1 + (samples - 1) * corr``)."""
    if prompts < 1 or samples < 1:
        raise ValueError("prompts and samples must be >= 1")
    design = 1.0 + (samples - 1) * within_prompt_corr
    return math.sqrt(p * (1.0 - p) * design / (prompts * samples))


def by_seed(rows: Iterable[Mapping[str, object]], metric: str, **match: object) -> Dict[int, float]:
    """``{seed: float(row[metric])}`` for the rows whose fields equal ``match`` (status ok)."""
    out: Dict[int, float] = {}
    for r in rows:
        if r.get("status", "ok") != "ok" or any(str(r.get(k)) != str(v) for k, v in match.items()):
            continue
        try:
            out[int(float(r["seed"]))] = float(r[metric])
        except (TypeError, ValueError, KeyError):
            continue
    return out


def cells(rows: Iterable[Mapping[str, object]], keys: Sequence[str]) -> List[Tuple[str, ...]]:
    """The distinct values of ``keys`` in ``rows``, in order of first appearance."""
    seen: Dict[Tuple[str, ...], None] = {}
    for r in rows:
        seen.setdefault(tuple(str(r.get(k)) for k in keys), None)
    return list(seen)


def fmt_ci(stats: Mapping[str, float], digits: int = 3) -> str:
    """``0.123 [0.100, 0.146]`` (or the mean alone without an interval)."""
    m = stats.get("mean", math.nan)
    if not math.isfinite(m):
        return "-"
    if not math.isfinite(stats.get("lo", math.nan)):
        return f"{m:.{digits}f}"
    return f"{m:+.{digits}f} [{stats['lo']:+.{digits}f}, {stats['hi']:+.{digits}f}]" if stats.get("signed") else \
        f"{m:.{digits}f} [{stats['lo']:.{digits}f}, {stats['hi']:.{digits}f}]"


def optional(x: Optional[float]) -> float:
    return math.nan if x is None else float(x)
