"""Would an exponential moving average (EMA) of the weights lower a recipe's validation
perplexity? A probe, not a feature: it trains the recipe exactly as train.py does (the same
Trainer, batches and keys: the 'raw' column is train.py's run) and keeps, beside it, an EMA of
the parameters, scored on the validation split after every epoch with the run's memory state.

  python bench/ema_probe.py                                   # configs/wikitext2_recipe.py
  python bench/ema_probe.py --decay 0.995 train.epochs=7 train.cosine_epochs=7

The decay (in [0, 1)) ramps up as min(decay, (1 + t) / (10 + t)) at step t, so early weights
fade fast. Data: train on ../shared/data/wikitext-2/test.txt, validate on valid.txt, beside the
repository (--train/--valid; given paths are relative to the current folder). FIELD=VALUE sets
an existing field of the config as train.py's --config.FIELD=VALUE does (true/false or 1/0 for
a boolean, an integer, a number, a string); the result is checked as train.py checks its
config, and a mistake is one error line naming the field, before anything is built.
Prints one JSON line per epoch: {"epoch", "s", "raw", "ema"} (perplexities).
"""

import argparse
import ast
import json
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

if __name__ == "__main__":  # the host allocator as train.py sets it, before JAX starts threads
  from infinito_jax import hostmem as _hostmem  # noqa: E402  pylint: disable=g-import-not-at-top
  _hostmem.at_startup()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402

import _cli  # noqa: E402
from configs import wikitext2_recipe  # noqa: E402
from infinito_jax import config as config_lib  # noqa: E402
from infinito_jax import data as data_lib  # noqa: E402
from infinito_jax.errors import ConfigError  # noqa: E402
from infinito_jax.model import model_config  # noqa: E402
from infinito_jax.train import Trainer, check_platform  # noqa: E402

WIKITEXT = os.path.normpath(os.path.join(ROOT, "..", "shared", "data", "wikitext-2"))
_BOOLS = {"true": True, "1": True, "false": False, "0": False}


class OverrideError(ValueError):
  """A FIELD=VALUE that names no field of the config or whose value is not of its type."""


def parse_value(field: str, old, text: str):
  """`text` as a value of `field`, whose value now is `old`, as ml_collections' config flags
  parse it: true/false (or 1/0) for a boolean, an integer, a number (an integer too), a string
  as it is; for a field without a value (None) a Python literal, else the text."""
  if isinstance(old, bool):
    if text.lower() not in _BOOLS:
      raise OverrideError(f"{field}={text!r}: {field} takes true or false (or 1 or 0)")
    return _BOOLS[text.lower()]
  try:
    if isinstance(old, int):
      return int(text)
    if isinstance(old, float):
      return float(text)
  except ValueError:
    kind = "an integer" if isinstance(old, int) else "a number"
    raise OverrideError(f"{field}={text!r}: {field} takes {kind}") from None
  if isinstance(old, str):
    return text
  if old is None:
    try:
      return ast.literal_eval({"true": "True", "false": "False"}.get(text, text))
    except (SyntaxError, ValueError):
      return text
  raise OverrideError(f"{field}: a field of type {type(old).__name__} cannot be set here")


def apply_override(c: ml_collections.ConfigDict, item: str) -> None:
  """Sets one FIELD=VALUE on `c` (an existing field only), or raises OverrideError."""
  key, eq, value = item.partition("=")
  if not eq or not key:
    raise OverrideError(f"{item!r}: write FIELD=VALUE, e.g. train.epochs=7")
  *path, last = key.split(".")
  node, where = c, "the config"
  for i, name in enumerate(path):
    child = node.get(name) if isinstance(node, ml_collections.ConfigDict) else None
    if not isinstance(child, ml_collections.ConfigDict):
      raise OverrideError(f"{key}: no such field: {where} has {sorted(node)}")
    node, where = child, ".".join(path[:i + 1])
  if last not in node:
    raise OverrideError(f"{key}: no such field: {where} has {sorted(node)}")
  old = node[last]
  if isinstance(old, ml_collections.ConfigDict):
    raise OverrideError(f"{key} is a section, not a field: set one of its fields "
                        f"{sorted(old)}")
  try:
    node[last] = parse_value(key, old, value)
  except TypeError as e:  # ConfigDict's own type check
    raise OverrideError(f"{key}={value!r}: {e}") from None


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--decay", type=float, default=0.99, help="the EMA's decay, in [0, 1)")
  p.add_argument("--train", default=os.path.join(WIKITEXT, "test.txt"))
  p.add_argument("--valid", default=os.path.join(WIKITEXT, "valid.txt"))
  p.add_argument("overrides", nargs="*", help="FIELD=VALUE on configs/wikitext2_recipe.py")
  a = p.parse_args()
  if not 0 <= a.decay < 1:
    p.error(f"--decay must be in [0, 1) (the weight of the average so far), got {a.decay}")
  c = wikitext2_recipe.get_config()
  c.data.source = "files"
  c.data.files.train, c.data.files.validation = a.train, a.valid
  for item in a.overrides:
    try:
      apply_override(c, item)
    except OverrideError as e:
      p.error(str(e))
  try:  # as train.py checks its config, before anything is built
    config_lib.validate(c)
    check_platform(c)
  except ConfigError as e:  # train.py's flag --config.FIELD=VALUE is FIELD=VALUE here
    p.error(str(e).replace("--config.", ""))
  if c.data.source == "files":
    for split, flag in (("train", "--train"), ("validation", "--valid")):
      if not os.path.isfile(c.data.files[split]):
        p.error(f"{flag} {c.data.files[split]}: no such file (data.files.{split}: WikiText-2's "
                f"test.txt is trained on, valid.txt validated on)")
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
  _cli.run_main(main)
