"""The benchmark the original's report names but never ran: V5.1 vs V5.2 after training.

Demo settings (vocab 5000, D 256, 3 layers, 4 heads, batch 16, seq 128, 3 epochs), trained on
WikiText-2 test.txt and validated on valid.txt (from ../shared/data/wikitext-2, or set
--config.base.data.files.train / .validation), 5 seeds per variant:
  v5.2             the defaults: causal, exploration on, the memory read discarded
  v5.1-equivalent  exploration off (the original's use_stochastic_exploration=False)
  memory-fused     fuse_memory: the only variant in which the memory changes predictions
  no-dropout       dropout 0
  lr-1e-3-warmup   the recipe question: lr 1e-3, 100 warmup steps, a cosine over the 3 epochs
python -m infinito_jax.study --config configs/study_v51_v52.py --workdir runs/study_v51_v52
"""

import os

import ml_collections

from configs import demo

WIKITEXT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data",
                        "wikitext-2")


def get_config():
  c = ml_collections.ConfigDict()
  c.base = b = demo.get_config()
  b.data.source = "files"
  b.data.files.train = os.path.normpath(os.path.join(WIKITEXT, "test.txt"))
  b.data.files.validation = os.path.normpath(os.path.join(WIKITEXT, "valid.txt"))
  b.train.eval_every_steps = 60  # about half-epochs: 6 points per validation curve
  c.variants = (
      ("v5.2", {}),
      ("v5.1-equivalent", {"model.exploration": False}),
      ("memory-fused", {"model.fuse_memory": True}),
      ("no-dropout", {"model.dropout": 0.0}),
      ("lr-1e-3-warmup", {"train.learning_rate": 1e-3, "train.warmup_steps": 100,
                          "train.cosine_epochs": 3, "train.min_learning_rate": 1e-5}),
  )
  c.baseline = "v5.2"
  c.seeds = 5
  c.target_perplexity = 300.0
  c.prompts = ("the", "in the early", "he was", "the city of")
  c.sample_tokens = 40
  c.sample_seeds = (0, 1)
  c.temperature = 1.0
  c.top_k = 0
  c.same_key_replicas = 2
  c.same_key_epochs = 1
  c.shown_samples = 2
  c.together = True  # value-only variants train as one population (runs/_values-*)
  # a variant whose training loss becomes NaN/inf is reported as diverged (its step and seeds)
  # and left out of the statistics; "stop" ends the study there instead
  c.on_divergence = "record"
  return c
