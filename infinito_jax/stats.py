"""The statistics of a study: intervals over seeds, Welch's test, Holm's correction, Cohen's d.

Plain numpy + scipy.stats on small samples (one number per seed); nothing here touches JAX.
"""

import math
from typing import Sequence

import numpy as np
from scipy import stats as sps


def scaled(*samples) -> tuple[list, float]:
  """The samples as float64, divided by a power of two near their largest finite magnitude where
  that exceeds 1e150 (else 1), and that scale: squares of values near float64's limit (a
  diverging run's perplexity, up to exp(700)) overflow, while t, df and Cohen's d do not change
  with the scale, and dividing by a power of two rounds nothing."""
  xs = [np.asarray(s, np.float64) for s in samples]
  top = max((float(np.max(np.abs(x[np.isfinite(x)]))) for x in xs if np.isfinite(x).any()),
            default=0.0)
  scale = 2.0 ** math.floor(math.log2(top)) if top > 1e150 else 1.0
  return [x / scale for x in xs], scale


# the largest perplexity reported: exp(700), that of a loss of 700 nats or more (a run gone
# astray whose loss stays finite), so that every report holds finite numbers (exp overflows
# float64 past 709.78 nats) and the statistics over replicas stay finite
# (train.perplexity)
PERPLEXITY_CAP = math.exp(700.0)


def num(x: float) -> str:
  """A perplexity for a line of text: 2 decimals, or 4 significant digits for a run gone
  astray (up to exp(700): 300 digits otherwise), said to be the cap where it is."""
  if x >= PERPLEXITY_CAP:
    return f"{x:.4g} (the cap: a loss of 700 nats or more)"
  return f"{x:.2f}" if abs(x) < 1e7 else f"{x:.4g}"


def mean_std(values, axis=None) -> tuple:
  """Mean and sample std (ddof=1; 0 for one value) over `axis`, finite for values up to
  float64's limit (scaled)."""
  (x,), scale = scaled(values)
  n = x.size if axis is None else x.shape[axis]
  std = x.std(axis=axis, ddof=1) if n > 1 else np.zeros_like(x.mean(axis=axis))
  return x.mean(axis=axis) * scale, std * scale


def population(values, name: str) -> dict:
  """A population's numbers `values` (one per replica, at least one): how many, and their
  mean, sample std, min and max as `<name>_mean`, ... (finite up to float64's limit). The
  std of one value is None, as describe's: one replica says nothing about the spread (0.0
  would read as replicas that agree)."""
  x = np.asarray(values, float)
  mean, std = mean_std(x)
  return {"replicas": int(x.size), f"{name}_mean": float(mean),
          f"{name}_std": float(std) if x.size > 1 else None,
          f"{name}_min": float(x.min()), f"{name}_max": float(x.max())}


def describe(values: Sequence[float], confidence: float = 0.95,
             bounds: tuple[float | None, float | None] | None = None) -> dict:
  """Mean, sample std (ddof=1), n, and the two-sided t interval of the mean.

  With n < 2 the std and interval are None (one seed says nothing about the spread). With a
  std of exactly 0 (replicas of one key) the interval is the point itself. `bounds`: the
  range the quantity cannot leave (e.g. (0, 1) for a rate, (1, None) for a perplexity); the interval is cut to it (its
  coverage is unchanged, as the mean lies in the range), and `bounds` and the uncut
  `t_low`/`t_high` are kept beside it where the cut changed something.
  """
  x = np.asarray(values, np.float64)
  n = int(x.size)
  mean, sd = mean_std(x) if n else (None, None)
  out = {"n": n, "mean": float(mean) if n else None, "std": None, "ci_low": None,
         "ci_high": None, "min": float(x.min()) if n else None,
         "max": float(x.max()) if n else None, "confidence": confidence}
  if n >= 2:
    sd = float(sd)
    half = float(sps.t.ppf(0.5 + confidence / 2, n - 1) * (sd / math.sqrt(n)))
    low, high = out["mean"] - half, out["mean"] + half
    out.update(std=sd, ci_low=low, ci_high=high)
    lo, hi = (-math.inf, math.inf) if bounds is None else (
        -math.inf if bounds[0] is None else bounds[0], math.inf if bounds[1] is None else bounds[1])
    if low < lo or high > hi:
      out.update(ci_low=max(low, lo), ci_high=min(high, hi), bounds=list(bounds),
                 t_low=low, t_high=high)
  return out


def welch(a: Sequence[float], b: Sequence[float]) -> dict:
  """Welch's two-sided t-test of mean(a) != mean(b) (unequal variances): t, df, p.

  Two samples with no spread at all give p = 1 when their means are equal and 0 otherwise.
  """
  (x, y), _ = scaled(a, b)  # t, df and p are the same in any unit
  if len(x) < 2 or len(y) < 2:
    raise ValueError(f"Welch's test needs at least 2 values per group, got {len(x)} and {len(y)}")
  vx, vy = x.var(ddof=1) / len(x), y.var(ddof=1) / len(y)
  if vx + vy == 0:
    same = float(x.mean()) == float(y.mean())
    return {"t": 0.0 if same else math.copysign(math.inf, x.mean() - y.mean()),
            "df": float(len(x) + len(y) - 2), "p": 1.0 if same else 0.0}
  t = (x.mean() - y.mean()) / math.sqrt(vx + vy)
  df = (vx + vy) ** 2 / (vx ** 2 / (len(x) - 1) + vy ** 2 / (len(y) - 1))
  return {"t": float(t), "df": float(df), "p": float(2 * sps.t.sf(abs(t), df))}


def holm(pvalues: Sequence[float]) -> list[float]:
  """Holm-Bonferroni adjusted p-values (step-down, monotone, capped at 1), in input order. An
  undefined p-value (NaN: no test was possible) stays NaN and is not counted among the tests."""
  p = np.asarray(pvalues, np.float64)
  adjusted = np.full(len(p), np.nan)
  tested = np.flatnonzero(~np.isnan(p))
  m = len(tested)
  order = tested[np.argsort(p[tested], kind="stable")]
  running = 0.0
  for rank, i in enumerate(order):
    running = max(running, min(1.0, (m - rank) * p[i]))
    adjusted[i] = running
  return adjusted.tolist()


def cohens_d(a: Sequence[float], b: Sequence[float]) -> float:
  """(mean(a) - mean(b)) / pooled sample std; inf-signed when there is no spread, 0 if equal."""
  (x, y), _ = scaled(a, b)  # d is the same in any unit
  nx, ny = len(x), len(y)
  pooled = math.sqrt(((nx - 1) * x.var(ddof=1) + (ny - 1) * y.var(ddof=1)) / (nx + ny - 2))
  diff = float(x.mean() - y.mean())
  if pooled == 0:
    return 0.0 if diff == 0 else math.copysign(math.inf, diff)
  return diff / pooled


def area_under_curve(steps: Sequence[float], values: Sequence[float]) -> float:
  """Trapezoidal area under a validation curve per unit of the step axis (its mean height):
  lower means a run was better earlier as well as at the end."""
  s, v = np.asarray(steps, np.float64), np.asarray(values, np.float64)
  if len(s) == 1:
    return float(v[0])
  return float(np.trapezoid(v, s) / (s[-1] - s[0])) if hasattr(np, "trapezoid") else float(
      np.trapz(v, s) / (s[-1] - s[0]))


def steps_to_reach(steps: Sequence[int], values: Sequence[float], target: float) -> int | None:
  """The first evaluated step whose value is <= target (None: never reached)."""
  for s, v in zip(steps, values):
    if v <= target:
      return int(s)
  return None
