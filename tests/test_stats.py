"""The study's statistics equal scipy's (and hand-computed Holm) on known numbers."""

import math

import numpy as np
import pytest
from scipy import stats as sps

from infinito_jax import stats

A = [143.2, 150.1, 139.8, 147.5, 145.0]
B = [160.3, 151.7, 158.8, 171.2, 149.9, 155.0]


def test_t_interval_equals_scipy():
  d = stats.describe(A)
  lo, hi = sps.t.interval(0.95, len(A) - 1, loc=np.mean(A), scale=sps.sem(A))
  assert d["n"] == 5 and d["mean"] == pytest.approx(np.mean(A), abs=1e-12)
  assert d["std"] == pytest.approx(np.std(A, ddof=1), abs=1e-12)
  assert (d["ci_low"], d["ci_high"]) == pytest.approx((lo, hi), abs=1e-9)
  assert stats.describe([3.0])["std"] is None  # one seed: no spread, no interval
  zero = stats.describe([2.5, 2.5, 2.5])  # replicas of one key
  assert zero["std"] == 0.0 and zero["ci_low"] == zero["ci_high"] == 2.5


def test_a_perplexity_at_the_cap_is_printed_as_the_cap():
  """A loss of 700 nats or more reads as exp(700) (kept finite for JSON and statistics): the
  lines printed say it is the cap, not a measured value; below it, a plain number."""
  from infinito_jax.train import perplexity  # pylint: disable=import-outside-toplevel
  assert perplexity(3.9e8) == perplexity(5.4e8) == perplexity(700.0) == math.exp(700.0)
  assert stats.num(perplexity(3.9e8)) == "1.014e+304 (the cap: a loss of 700 nats or more)"
  assert stats.num(perplexity(699.0)) == f"{math.exp(699.0):.4g}"
  assert stats.num(45.5879) == "45.59" and stats.num(2.5e7) == "2.5e+07"


def test_population_statistics_equal_numpys_and_say_nothing_of_one_replicas_spread():
  """summary.json's and evaluate.py's population blocks: a sample std (ddof=1) as numpy's;
  over one replica (the others frozen, or a group of one) the std is None, not 0.0, which
  would read as replicas that agree (as describe's)."""
  p = stats.population(A, "ppl")
  assert p == {"replicas": 5, "ppl_mean": pytest.approx(np.mean(A), abs=1e-12),
               "ppl_std": pytest.approx(np.std(A, ddof=1), abs=1e-12), "ppl_min": min(A),
               "ppl_max": max(A)}
  assert stats.population([141.0], "ppl") == {"replicas": 1, "ppl_mean": 141.0,
                                              "ppl_std": None, "ppl_min": 141.0,
                                              "ppl_max": 141.0}
  assert stats.population([2.5, 2.5], "ppl")["ppl_std"] == 0.0  # replicas of one key


def test_interval_of_a_bounded_quantity_is_cut_to_its_range():
  """A rate in [0, 1] from two seeds has a t interval reaching past 1; with bounds=(0, 1) the
  interval ends at 1 and the uncut one is kept beside it; inside the range nothing changes."""
  rates = [0.91, 0.99]
  lo, hi = sps.t.interval(0.95, 1, loc=np.mean(rates), scale=sps.sem(rates))
  assert hi > 1.0  # the uncut interval leaves the range
  d = stats.describe(rates, bounds=(0.0, 1.0))
  assert (d["ci_low"], d["ci_high"]) == (pytest.approx(max(lo, 0.0), abs=1e-9), 1.0)
  assert (d["t_low"], d["t_high"]) == pytest.approx((lo, hi), abs=1e-9)
  assert d["bounds"] == [0.0, 1.0]
  inside = stats.describe(A, bounds=(1.0, math.inf))
  assert inside == stats.describe(A)  # nothing to cut: the same record
  # a perplexity is at least 1 and has no upper bound (None: JSON has no infinity)
  ppl = [1.2, 9.0]
  lo, hi = sps.t.interval(0.95, 1, loc=np.mean(ppl), scale=sps.sem(ppl))
  d = stats.describe(ppl, bounds=(1.0, None))
  assert lo < 1.0 and (d["ci_low"], d["ci_high"]) == (1.0, pytest.approx(hi, abs=1e-9))
  assert d["bounds"] == [1.0, None] and d["t_low"] == pytest.approx(lo, abs=1e-9)


def test_welch_equals_scipy():
  w = stats.welch(A, B)
  ref = sps.ttest_ind(A, B, equal_var=False)
  assert w["t"] == pytest.approx(ref.statistic, rel=1e-10)
  assert w["p"] == pytest.approx(ref.pvalue, rel=1e-8)
  assert w["p"] < 0.05  # these groups differ
  assert stats.welch([1.0, 1.0], [1.0, 1.0])["p"] == 1.0
  assert stats.welch([1.0, 1.0], [2.0, 2.0])["p"] == 0.0
  with pytest.raises(ValueError, match="at least 2"):
    stats.welch([1.0], B)


def test_holm_on_known_numbers():
  # sorted 0.01, 0.02, 0.03, 0.04 with m=4: 0.04, 0.06, 0.06 (monotone), 0.06
  assert stats.holm([0.03, 0.01, 0.04, 0.02]) == pytest.approx([0.06, 0.04, 0.06, 0.06])
  assert stats.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
  assert stats.holm([0.001]) == [0.001]
  # an undefined test (NaN p) stays undefined and does not count among the tests
  got = stats.holm([0.01, float("nan"), 0.02])
  assert got[0] == pytest.approx(0.02) and got[2] == pytest.approx(0.02)
  assert np.isnan(got[1])
  if hasattr(sps, "false_discovery_control"):  # a different correction: Holm is more strict
    assert all(h >= f - 1e-12 for h, f in zip(stats.holm([0.01, 0.02, 0.03]),
                                               sps.false_discovery_control([0.01, 0.02, 0.03])))


def test_cohens_d_pooled_std():
  nx, ny = len(A), len(B)
  pooled = math.sqrt(((nx - 1) * np.var(A, ddof=1) + (ny - 1) * np.var(B, ddof=1)) / (nx + ny - 2))
  assert stats.cohens_d(A, B) == pytest.approx((np.mean(A) - np.mean(B)) / pooled, rel=1e-12)
  assert stats.cohens_d(B, A) == pytest.approx(-stats.cohens_d(A, B))
  assert stats.cohens_d([1.0, 1.0], [1.0, 1.0]) == 0.0


def test_convergence_measures():
  steps, ppl = [10, 20, 30, 40], [300.0, 200.0, 150.0, 140.0]
  assert stats.steps_to_reach(steps, ppl, 200.0) == 20
  assert stats.steps_to_reach(steps, ppl, 100.0) is None
  # trapezoids: (250 + 175 + 145) * 10 / 30
  assert stats.area_under_curve(steps, ppl) == pytest.approx(190.0)


def test_values_near_float64s_limit_give_finite_statistics_equal_to_the_same_values_scaled():
  """A run gone astray reports perplexities up to exp(700) ~ 1e304: squared, they overflowed
  (std inf, Welch's p NaN). The statistics are computed in a power-of-two unit instead: t, df,
  p and d do not change with the unit, mean and std scale with it."""
  big, base = [5.07e303, 4.9e303, 5.3e303], [48.0, 48.1, 47.7]
  unit = 2.0 ** 1000  # exact: dividing by it rounds nothing
  small = [x / unit for x in big]
  d, ref = stats.describe(big), stats.describe(small)
  for k in ("mean", "std", "ci_low", "ci_high", "min", "max"):
    assert math.isfinite(d[k]) and d[k] == pytest.approx(ref[k] * unit, rel=1e-12), k
  assert d["std"] == pytest.approx(np.std(small, ddof=1) * unit, rel=1e-12)
  w = stats.welch(big, base)
  ref_w = sps.ttest_ind(small, [x / unit for x in base], equal_var=False)
  assert math.isfinite(w["p"]) and w["t"] == pytest.approx(ref_w.statistic, rel=1e-9)
  assert w["p"] == pytest.approx(ref_w.pvalue, rel=1e-9)
  assert stats.cohens_d(big, base) == pytest.approx(
      stats.cohens_d(small, [x / unit for x in base]), rel=1e-12)
  mean, std = stats.mean_std(np.array([big, big]), axis=1)
  assert np.allclose(mean, d["mean"], rtol=1e-12) and np.allclose(std, d["std"], rtol=1e-12)
  assert stats.mean_std([4.0]) == (4.0, 0.0)
  # ordinary values are computed as before, bitwise
  x = [209.4, 208.7, 210.1, 209.9]
  assert stats.describe(x)["std"] == float(np.asarray(x).std(ddof=1))
