"""Figures of the training recipe, printed as JSON lines (a benchmark, not a test).

  python bench/figures.py demo        # configs/demo.py on the embedded corpus: ppl vs oracle, time
  python bench/figures.py demo_better # the same corpus with the better recipe
  python bench/figures.py wikitext    # demo settings, train on wikitext-2 test.txt, validate on valid.txt
  python bench/figures.py better      # the same data with a better recipe
  python bench/figures.py recipe      # the same data with configs/wikitext2_recipe.py (its 6 epochs)
  python bench/figures.py full        # the original's full settings (configs/wikitext2.py), 15 epochs
  python bench/figures.py all         # demo, wikitext, better
  python bench/figures.py wikitext --bf16 --attention_dropout 0   # the fast paths' quality check

The WikiText-2 files come from ../shared/data/wikitext-2 (or --wikitext DIR). The original
PyTorch code with a causal mask added reached validation perplexity 204 on the second figure
and 240 with the full settings after 15 epochs.

A run stopped by a signal (SIGTERM, Ctrl-C), in start-up or while it trains, prints one line
"No figure NAME: ..." and exits 3; the same command with the --workdir it names finishes it.
A config or data problem is one `error:` line (exit 1).
"""

import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

if __name__ == "__main__":  # the host allocator as train.py sets it, before JAX starts threads
  from infinito_jax import hostmem as _hostmem  # noqa: E402  pylint: disable=g-import-not-at-top
  _hostmem.at_startup()

from absl import logging  # noqa: E402

import _cli  # noqa: E402
from configs import demo, wikitext2, wikitext2_recipe  # noqa: E402
from infinito_jax.lifecycle import StopRequested  # noqa: E402
from infinito_jax.train import train_and_evaluate  # noqa: E402


def wikitext_config(directory: str, base=demo):
  c = base.get_config()
  c.data.source = "files"
  c.data.files.train = os.path.join(directory, "test.txt")
  c.data.files.validation = os.path.join(directory, "valid.txt")
  return c


def better(c):
  """A better recipe for this budget: 10x the learning rate with warmup, a cosine over the run."""
  c.train.learning_rate = 1e-3
  c.train.warmup_steps = 100
  c.train.cosine_epochs = c.train.epochs
  c.train.min_learning_rate = 1e-5
  return c


def run(name: str, config, workdir: str) -> dict:
  t0 = time.time()
  try:
    s = train_and_evaluate(config, os.path.join(workdir, name))
  except (StopRequested, _cli.Stopped) as e:  # a signal in start-up: nothing written, no figure
    print(f"No figure {name}: stopped by {e} before training started in "
          f"{os.path.join(workdir, name)}, nothing written; run the same command with "
          f"--workdir {workdir} to make it.", file=sys.stderr)
    sys.exit(3)
  if s["status"] not in ("completed", "early_stopped"):  # stopped by a signal: no figure yet
    print(f"No figure {name}: the run in {os.path.join(workdir, name)} ended {s['status']} at "
          f"step {s['steps']}; run the same command with --workdir {workdir} to finish it.",
          file=sys.stderr)
    sys.exit(3)
  out = {"figure": name, "best_val_perplexity": s["best_val_perplexity"],
         "best_epoch": s["best_epoch"], "epochs": s["epochs_completed"], "steps": s["steps"],
         "wall_s": round(time.time() - t0, 1), "platform": s["platform"],
         "devices": s["devices"], "learning_rate": config.train.learning_rate,
         "dtype": config.model.dtype, "attention_dropout": config.model.attention_dropout}
  if "corpus" in s:
    out["oracle_perplexity"] = s["corpus"]["oracle_perplexity"]
    out["previous_word_only_perplexity"] = s["corpus"]["previous_word_only_perplexity"]
  print("FIGURE " + json.dumps(out), flush=True)
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("which", choices=["demo", "demo_better", "wikitext", "better", "recipe", "full",
                                   "all"])
  p.add_argument("--wikitext", default=os.path.join(ROOT, "..", "shared", "data", "wikitext-2"))
  p.add_argument("--epochs", type=int, default=None,
                 help="epochs of the wikitext figures (default: 3; full: 15; recipe: the config's)")
  p.add_argument("--seed", type=int, default=42, help="the run's seed (default 42, as the demo)")
  p.add_argument("--workdir", default=None, help="keep the runs here (default: a temp dir)")
  p.add_argument("--bf16", action="store_true", help="model.dtype=bfloat16")
  p.add_argument("--attention_dropout", type=float, default=None,
                 help="model.attention_dropout (0: fused attention in training)")
  a = p.parse_args()
  if a.epochs is not None and a.epochs < 1:
    p.error(f"--epochs must be a positive integer, got {a.epochs}")
  if a.which not in ("demo", "demo_better") and not all(
      os.path.isfile(os.path.join(a.wikitext, f)) for f in ("test.txt", "valid.txt")):
    p.error(f"--wikitext {a.wikitext}: needs WikiText-2's test.txt (trained on) and valid.txt "
            "(validated on) there")
  logging.set_verbosity(logging.WARNING)
  workdir = a.workdir or tempfile.mkdtemp(prefix="infinito_figures_")
  suffix = "" if a.seed == 42 else f"_seed{a.seed}"
  suffix += "_bf16" * a.bf16 + ("" if a.attention_dropout is None
                                else f"_attn_dropout{a.attention_dropout:g}")

  def fast_paths(c):
    c.model.dtype = "bfloat16" if a.bf16 else c.model.dtype
    if a.attention_dropout is not None:  # else the config's own (the recipe sets 0)
      c.model.attention_dropout = a.attention_dropout
    return c

  if a.which in ("demo", "all"):
    c = demo.get_config()
    c.seed = a.seed
    run("demo_embedded" + suffix, fast_paths(c), workdir)
  if a.which == "demo_better":
    c = better(demo.get_config())
    c.seed = a.seed
    run("demo_embedded_better" + suffix, fast_paths(c), workdir)
  for name, label, base, epochs, recipe in [
      ("wikitext", "demo", demo, 3, None), ("better", "better", demo, 3, better),
      ("recipe", "best", wikitext2_recipe, None, None), ("full", "full", wikitext2, 15, None)]:
    if a.which == name or (a.which == "all" and name not in ("full", "recipe")):
      c = wikitext_config(a.wikitext, base)
      c.train.epochs = a.epochs or epochs or c.train.epochs  # recipe: the config's own
      c.seed = a.seed
      run(f"wikitext_{label}_recipe" + suffix, fast_paths(recipe(c) if recipe else c), workdir)


if __name__ == "__main__":
  # a config or data problem: one `error:` line (exit 1), as train.py says it; a signal while a
  # run trains or starts: the run's own line (exit 3, above), elsewhere _cli's (exit 130 / 143)
  _cli.run_main(main)
