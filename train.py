"""Train INFINITO V5.2: python train.py --config configs/demo.py [--workdir runs/demo] [--config.train.epochs=1]

Trains, validates every epoch, keeps the latest and the best checkpoint, stops early, and
prints where everything went. Run it again with the same --workdir to resume where it stopped;
--fresh starts over (the old run is moved aside). Ctrl-C or SIGTERM finishes the current step,
saves and exits; a second one aborts without saving. One train.py per workdir at a time.
"""

import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from infinito_jax import hostmem  # pylint: disable=g-import-not-at-top
from infinito_jax.lifecycle import StopRequested, StopSignals  # pylint: disable=g-import-not-at-top

hostmem.at_startup()  # before JAX starts its threads (infinito_jax/hostmem.py)

# Before the slow imports: a signal during start-up or the first compilation stops cleanly.
STOP = StopSignals(hard_abort=True).install()

from absl import app, flags, logging  # pylint: disable=g-import-not-at-top,g-bad-import-order
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

from infinito_jax import cli  # pylint: disable=g-import-not-at-top
from infinito_jax import errors  # pylint: disable=g-import-not-at-top
from infinito_jax import config as config_lib  # pylint: disable=g-import-not-at-top
from infinito_jax import distributed  # pylint: disable=g-import-not-at-top

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/demo.py (offline, embedded corpus), "
    "configs/wikitext2.py (the original's full run), configs/tiny.py. Override any field with "
    "--config.FIELD=VALUE, e.g. --config.train.epochs=1 --config.model.hidden_dim=64.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Where checkpoints, history.jsonl and summary.json go (default: "
    "runs/<config name>). An existing workdir is resumed.")
_FRESH = flags.DEFINE_bool(
    "fresh", False, "Start over in a used --workdir: its old run is moved to "
    "<workdir>.old-<time> first (nothing is deleted).")
distributed.define_flags()  # --coordinator_address, --num_processes, --process_id, --distributed


EXAMPLES = "demo.py, tiny.py, wikitext2.py, ..."


fail = cli.fail  # one line `error: ...`, exit code 1


def parse_flags(argv):
  """absl's parser, with mistakes in --config overrides as one line instead of a traceback."""
  cli.check_config_fields(argv, config_lib.FIELDS)
  return cli.parse_flags(argv, "python train.py", EXAMPLES, "A config is a Python file whose "
                         "get_config() returns a ConfigDict built on configs/default.py.",
                         nullable=config_lib.NULLABLE)


def load_config():
  return cli.load_config(_CONFIG, "python train.py", "configs/demo.py")


@errors.on_command_line  # its errors name its flags
def main(argv):
  try:
    return _main(argv)
  finally:  # every way out, early returns too: a signal during the interpreter's exit would
    STOP.ignore()  # find Python's default handler back (exit 143, no line)


def _main(argv):
  if len(argv) > 1:
    fail(f"unexpected arguments {argv[1:]}: config fields are set with --config.FIELD=VALUE.")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO; -v 0 shows them
  config = load_config()
  path = flags.FLAGS["config"].config_filename
  from infinito_jax import train  # pylint: disable=g-import-not-at-top
  from infinito_jax.errors import (  # pylint: disable=g-import-not-at-top
      DamagedCheckpointError, DiskFullError, InfinitoError)

  name = os.path.splitext(os.path.basename(path))[0]
  if _WORKDIR.value is not None and not _WORKDIR.value.strip():  # "$WD" of an unset variable
    fail("--workdir is empty: give a folder, or leave out --workdir for the default "
         f"{os.path.join('runs', name)}.")
  workdir = _WORKDIR.value or os.path.join("runs", name)
  if STOP.requested:  # during the imports: the handler's line said it (nothing was changed)
    return 0
  try:
    with STOP.said_by_caller():  # a signal while the processes join: the join's own line
      joined = distributed.initialize_from_flags(lambda: STOP.requested)  # before device use
    if joined:
      STOP.install()  # again, for a JAX whose preemption service could not be switched off
  except InfinitoError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  if _FRESH.value:  # the same command would start over again, not resume
    STOP.again = "the command again without --fresh"
  try:
    summary = train.train_and_evaluate(config, workdir, fresh=_FRESH.value, stop=STOP,
                                       flags=train.CLI_FLAGS)
  except StopRequested as e:  # the handler said it was stopping; this says it is done
    print(f"Stopped by {e} before training started: nothing was written.")
    return 0
  except DamagedCheckpointError as e:
    command = " ".join(shlex.quote(a) for a in ["python", *sys.argv] if a != "--fresh")
    print(f"error: {e} The command: {command} {e.flag}", file=sys.stderr)
    return 1
  except InfinitoError as e:
    said = str(e)
    if _FRESH.value:  # what resumes the run: the command without --fresh
      said = said.replace("the same command again", "the command again without --fresh")
    print(f"error: {said}", file=sys.stderr)
    if isinstance(e, DiskFullError):
      # A save that failed for space can leave Orbax's write coroutines suspended; at the
      # interpreter's teardown they would print tracebacks after the one line above. The run
      # is closed (lock released, checkpoints as they were), so leave without the teardown.
      STOP.ignore()
      sys.stdout.flush()
      sys.stderr.flush()
      distributed.release_claim()
      os._exit(1)  # pylint: disable=protected-access
    return 1
  finally:
    STOP.ignore()  # the work is over: a late signal must not turn the exit into a traceback
  status = summary["status"].replace("early_stopped", "stopped early (train.patience)")
  print(f"\nRun {status} after {summary['steps']} step"
        f"{'' if summary['steps'] == 1 else 's'} "
        f"({summary['epochs_completed']} epoch{'' if summary['epochs_completed'] == 1 else 's'}), "
        f"{summary['wall_time_s']:.0f} s.")
  if summary["best_val_loss"] is not None:
    from infinito_jax.stats import num  # pylint: disable=g-import-not-at-top
    line = (f"Best validation: loss {summary['best_val_loss']:.4f}, perplexity "
            f"{num(summary['best_val_perplexity'])} (step {summary['best_step']}, epoch "
            f"{summary['best_epoch']:g})")
    corpus = summary.get("corpus")
    if corpus:
      line += (f"; the oracle (best possible) is {corpus['oracle_perplexity']:.2f}, a model "
               f"seeing one word back can reach {corpus['previous_word_only_perplexity']:.2f}")
    print(line)
    if "population" in summary:
      p = summary["population"]
      frozen = summary.get("diverged_replicas", [])
      line = f"That is replica {summary['best_replica']} of {len(summary['replicas'])}"
      if p["replicas"] > 1:
        line += (f"; the best validation perplexity of the {p['replicas']}"
                 f"{' not frozen' if frozen else ''}: {num(p['best_val_perplexity_mean'])} +- "
                 f"{num(p['best_val_perplexity_std'])} (min {num(p['best_val_perplexity_min'])}, "
                 f"max {num(p['best_val_perplexity_max'])})")
      if frozen:
        line += (f"; replica{'s' * (len(frozen) > 1)} {', '.join(map(str, frozen))} diverged "
                 "and stopped training (frozen: summary.json's diverged_replicas)")
      print(line)
  print(f"Checkpoints: {summary['checkpoints']}\nHistory:     {summary['history']}\n"
        f"Summary:     {os.path.join(summary['workdir'], 'summary.json')}")
  from infinito_jax import plot  # pylint: disable=g-import-not-at-top (imported by the run)
  for name, what, on in (("curves.png", "Plot:       ", config.log.plot),
                         ("tensorboard", "TensorBoard:", config.log.tensorboard)):
    path = os.path.join(summary["workdir"], name)
    if on and (plot.is_plot(path) if name == "curves.png" else os.path.exists(path)):
      print(f"{what} {path}")  # this run's (not a folder or a file in its place)
  if summary["steps"] > 0:
    print(f"Evaluate:    python {cli.script('evaluate.py')} --ckpt {shlex.quote(workdir)}")
  return 0


if __name__ == "__main__":
  cli.survive_closed_output()  # `train.py ... | head` must not end the run
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=parse_flags)
