"""The original's reproducibility experiment: one key gives one model; keys give variation."""

import math

import numpy as np

from infinito_jax.reproducibility import compare_groups, run_experiment


def test_same_key_groups_have_zero_spread_and_independent_keys_vary():
  report = run_experiment(n=10, seed=0)
  same, indep = report["same_key"], report["independent_keys"]
  assert len(same["values_a"]) == len(same["values_b"]) == 10
  # 20 models from one key: bitwise identical, std exactly 0, t-test undefined ("p = nan")
  assert len(set(same["values_a"] + same["values_b"])) == 1
  assert same["std_a"] == 0.0 and same["std_b"] == 0.0
  assert math.isnan(same["p"]) and math.isnan(same["cohens_d"])
  # different keys: real spread, a defined test and effect size
  assert indep["std_a"] > 1e-4 and indep["std_b"] > 1e-4
  assert 0.0 <= indep["p"] <= 1.0 and math.isfinite(indep["cohens_d"])
  assert len(set(indep["values_a"] + indep["values_b"])) == 20


def test_compare_groups_matches_hand_computed_cohens_d():
  a, b = [1.0, 2.0, 3.0, 4.0], [3.0, 4.0, 5.0, 6.0]
  r = compare_groups(a, b)
  pooled = np.sqrt((np.var(a, ddof=1) + np.var(b, ddof=1)) / 2)
  assert abs(r["cohens_d"] - (-2.0 / pooled)) < 1e-12
  assert r["p"] < 0.1 and r["t"] < 0
