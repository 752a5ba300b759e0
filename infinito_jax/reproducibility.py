"""The original's reproducibility experiment, done with explicit keys.

The original compared two groups of 10 runs with a t-test after fixing global seeds; every run
was then the same run, the groups had zero variance and the test said "p = nan". Here each
model is a pure function of its key: models built from one key are bitwise identical (a standard
deviation of exactly 0, by design), and a real comparison draws each run from its own key.

    python -m infinito_jax.reproducibility            # prints a JSON report
"""

import argparse
import json
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from infinito_jax.model import InfinitoV52, ModelConfig


def phi_fn(config: ModelConfig, ids):
  """A jitted key -> integration_phi of the model initialised from that key, on `ids` (eval)."""
  model = InfinitoV52(config)

  @jax.jit
  def phi(key):
    variables = model.init(key, ids)
    (_, metrics), _ = model.apply(variables, ids, with_metrics=True, mutable=["memory"])
    return metrics["integration_phi"]

  return lambda key: float(phi(key))


def compare_groups(a, b) -> dict:
  """Student's t-test (scipy.stats.ttest_ind) and Cohen's d (pooled SD) of two groups."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)  # zero variance -> nan, as in the original
    t, p = stats.ttest_ind(a, b)
  pooled = math.sqrt(((len(a) - 1) * a.var(ddof=1) + (len(b) - 1) * b.var(ddof=1))
                     / (len(a) + len(b) - 2))
  d = (a.mean() - b.mean()) / pooled if pooled > 0 else float("nan")
  return dict(mean_a=a.mean(), std_a=a.std(ddof=1), mean_b=b.mean(), std_b=b.std(ddof=1),
              t=float(t), p=float(p), cohens_d=float(d))


def run_experiment(config: ModelConfig | None = None, n: int = 10, seed: int = 0,
                   batch: int = 2, seq_len: int = 16) -> dict:
  """Runs both halves of the experiment and returns their statistics.

  same_key: groups A and B are 2n models all built from one key, as the original's global
    seed made them: every run is identical, std is exactly 0 and the t-test is nan.
  independent_keys: groups A and B draw each model from its own key (fold_in of the seed):
    the spread between initialisations is real and the t-test is meaningful.
  """
  config = config or ModelConfig(vocab_size=97, hidden_dim=32, num_layers=2, num_heads=4,
                                 memory_slots=8)
  ids = jax.random.randint(jax.random.key(10_000 + seed), (batch, seq_len), 0,
                           config.vocab_size, jnp.int32)
  phi = phi_fn(config, ids)
  same_a = [phi(jax.random.key(seed)) for _ in range(n)]
  same_b = [phi(jax.random.key(seed)) for _ in range(n)]
  base = jax.random.key(seed)
  indep_a = [phi(jax.random.fold_in(base, i)) for i in range(n)]
  indep_b = [phi(jax.random.fold_in(base, n + i)) for i in range(n)]
  return dict(n=n, same_key=dict(compare_groups(same_a, same_b), values_a=same_a,
                                 values_b=same_b),
              independent_keys=dict(compare_groups(indep_a, indep_b), values_a=indep_a,
                                    values_b=indep_b))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--n", type=int, default=10, help="models per group (default 10)")
  parser.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
  args = parser.parse_args(argv)
  report = run_experiment(n=args.n, seed=args.seed)
  print(json.dumps(report, indent=1, default=float))
  for name in ("same_key", "independent_keys"):
    r = report[name]
    print(f"{name}: std A {r['std_a']:.3g}, std B {r['std_b']:.3g}, t {r['t']:.3g}, "
          f"p {r['p']:.3g}, Cohen's d {r['cohens_d']:.3g}")


if __name__ == "__main__":
  main()
