"""configs/study_tiny.py with a variant at the edge of diverging: how a study reports a variant
whose loss becomes non-finite in some seeds, and what it costs (under a minute on 2 CPU cores).

  python -m infinito_jax.study --config configs/study_tiny_divergence.py --workdir runs/study_div

`div` (learning rate 205.8, clipping off) trains together with `v5.2` and `wd` in one
population (value-only variants); on a 2-core CPU with JAX 0.10 its seed 43 diverges at step 50
of 60 and is frozen there, and its seed 42 and the other variants train on in the same run (the
step depends on the platform and JAX version: float rounding decides an edge like this one).
"""

from configs import study_tiny


def get_config():
  c = study_tiny.get_config()
  c.variants = (("v5.2", {}), ("div", {"train.learning_rate": 205.8, "train.clip_norm": 1e9}),
                ("wd", {"train.weight_decay": 0.0}))
  c.same_key_replicas = 0  # not what this config shows
  return c
