"""Train INFINITO V5.2: python train.py --config configs/demo.py [--workdir runs/demo] [--config.train.epochs=1]

Trains, validates every epoch, keeps the latest and the best checkpoint, stops early, and
prints where everything went. Run it again with the same --workdir to resume where it stopped.
Ctrl-C finishes the current step, saves and exits.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/demo.py (offline, embedded corpus), "
    "configs/wikitext2.py (the original's full run), configs/tiny.py. Override any field with "
    "--config.FIELD=VALUE, e.g. --config.train.epochs=1 --config.model.hidden_dim=64.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Where checkpoints, history.jsonl and summary.json go (default: "
    "runs/<config name>). An existing workdir is resumed.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; fields are set with --config.FIELD=VALUE")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO; -v 0 shows them
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("pass --config, e.g. --config configs/demo.py")
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from infinito_jax import checkpoint, data, train  # after absl parsed flags: fast --help

  name = os.path.splitext(os.path.basename(flags.FLAGS["config"].config_filename))[0]
  workdir = _WORKDIR.value or os.path.join("runs", name)
  try:
    summary = train.train_and_evaluate(config, workdir)
  except (data.DataError, checkpoint.CheckpointError, train.NonFiniteLossError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"\nRun {summary['status']} after {summary['steps']} steps, "
        f"{summary['epochs_completed']} epochs, {summary['wall_time_s']:.0f} s.")
  if summary["best_val_loss"] is not None:
    line = (f"Best validation: loss {summary['best_val_loss']:.4f}, perplexity "
            f"{summary['best_val_perplexity']:.2f} (epoch {summary['best_epoch']})")
    corpus = summary.get("corpus")
    if corpus:
      line += (f"; the oracle (best possible) is {corpus['oracle_perplexity']:.2f}, a model "
               f"seeing one word back can reach {corpus['previous_word_only_perplexity']:.2f}")
    print(line)
  print(f"Checkpoints: {summary['checkpoints']}\nHistory:     {summary['history']}\n"
        f"Summary:     {os.path.join(summary['workdir'], 'summary.json')}\n"
        f"Evaluate:    python evaluate.py --ckpt {workdir}")
  return 0


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))
