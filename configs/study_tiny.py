"""A tiny study (2 variants x 2 seeds of configs/tiny.py): the study machinery end to end in
under a minute on 2 CPU cores.  python -m infinito_jax.study --config configs/study_tiny.py --workdir runs/study_tiny"""

import ml_collections

from configs import tiny


def get_config():
  c = ml_collections.ConfigDict()
  c.base = tiny.get_config()
  c.base.train.epochs = 2
  c.base.train.eval_every_steps = 15  # half-epochs: a curve of 4 points
  c.base.data.corpus.seed = 42  # the data stays the same whatever the seed
  c.variants = (("v5.2", {}), ("v5.1-equivalent", {"model.exploration": False}))
  c.baseline = "v5.2"
  c.seeds = 2
  c.target_perplexity = 60.0  # convergence: steps until validation perplexity <= this
  c.prompts = ("zu", "noun chai")  # words of the embedded corpus
  c.sample_tokens = 12
  c.sample_seeds = (0, 1)
  c.temperature = 1.0
  c.top_k = 0
  c.same_key_replicas = 2  # reproducibility: replicas of one key are bitwise identical
  c.same_key_epochs = 1
  c.shown_samples = 1
  c.on_divergence = "record"  # a variant whose loss becomes NaN/inf: reported as diverged
  c.together = True  # value-only variants train as one population (runs/_values-*)
  return c
