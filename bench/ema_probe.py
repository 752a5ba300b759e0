"""Would an exponential moving average (EMA) of the weights lower a recipe's validation
perplexity? A probe, not a feature: it trains the recipe exactly as train.py does (the same
Trainer, batches and keys: the 'raw' column is train.py's run) and keeps, beside it, an EMA of
the parameters, scored on the validation split after every epoch with the run's memory state.

  python bench/ema_probe.py                                   # configs/wikitext2_recipe.py
  python bench/ema_probe.py --decay 0.995 train.epochs=7 train.cosine_epochs=7

The decay ramps up as min(decay, (1 + t) / (10 + t)) at step t, so early weights fade fast.
Data: train on ../shared/data/wikitext-2/test.txt, validate on valid.txt (--train/--valid).
Prints one JSON line per epoch: {"epoch", "s", "raw", "ema"} (perplexities).
"""

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from configs import wikitext2_recipe  # noqa: E402
from infinito_jax import data as data_lib  # noqa: E402
from infinito_jax.model import model_config  # noqa: E402
from infinito_jax.train import Trainer  # noqa: E402


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--decay", type=float, default=0.99)
  p.add_argument("--train", default="../shared/data/wikitext-2/test.txt")
  p.add_argument("--valid", default="../shared/data/wikitext-2/valid.txt")
  p.add_argument("overrides", nargs="*", help="FIELD=VALUE on configs/wikitext2_recipe.py")
  a = p.parse_args()
  c = wikitext2_recipe.get_config()
  c.data.source = "files"
  c.data.files.train, c.data.files.validation = a.train, a.valid
  for item in a.overrides:
    key, _, value = item.partition("=")
    *path, last = key.split(".")
    node = c
    for name in path:
      node = node[name]
    old = node[last]
    node[last] = value if isinstance(old, str) else type(old)(float(value))
  mc = model_config(c.model)
  data = data_lib.prepare(c, mc)
  steps_per_epoch = math.ceil(len(data.windows["train"]) / c.train.batch_size)
  trainer = Trainer(c, mc, steps_per_epoch)
  batches = trainer.train_batches(data)
  valid = data.batches("validation", trainer.eval_batch_size)
  state = trainer.new_state()
  ema = jax.tree_util.tree_map(jnp.copy, state.params)  # the step donates state.params
  update = jax.jit(lambda e, q, d: jax.tree_util.tree_map(lambda x, y: d * x + (1 - d) * y, e, q))
  t0, step = time.time(), 0
  for epoch in range(c.train.epochs):
    for i in range(steps_per_epoch):
      state, _ = trainer.train_step(state, trainer.train_batch(batches, epoch, i))
      step += 1
      ema = update(ema, state.params, jnp.float32(min(a.decay, (1 + step) / (10 + step))))
    raw = trainer.evaluate(state, valid)[0]["perplexity"]
    averaged = trainer.evaluate(state.replace(params=ema), valid)[0]["perplexity"]
    print(json.dumps({"epoch": epoch + 1, "s": round(time.time() - t0), "raw": round(raw, 2),
                      "ema": round(averaged, 2)}), flush=True)


if __name__ == "__main__":
  main()
