"""Evaluate a trained run: python evaluate.py --ckpt runs/demo [--split test] [--prompt "the" --num_tokens 40 --seed 0]

Restores the best checkpoint of the run (or --step), reports loss, token-weighted perplexity and
the integration metrics on a split, optionally samples text, prints the report and writes it
as JSON (default: <ckpt>/eval_<split>_step<step>[_replica<r>].json).
"""

import glob
import hashlib
import json
import os
import signal
import sys


def _exit_now(signum, frame):
  """Evaluation writes nothing until its report: a signal ends it at once, cleanly."""
  del frame
  message = f"{signal.Signals(signum).name} received: evaluation stopped, nothing written."
  dist = sys.modules.get("infinito_jax.distributed")  # imported after this handler is set
  if dist is not None and dist.active():
    dist.exit_with_error(message, 128 + signum)  # tell all
  print(f"\n{message}", file=sys.stderr, flush=True)
  if dist is not None:
    dist.release_claim()  # os._exit skips atexit: the --process_id claim's lock file goes now
  os._exit(128 + signum)  # pylint: disable=protected-access


for _s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # SIGHUP: a closed terminal
  signal.signal(_s, _exit_now)

from absl import app, flags, logging  # pylint: disable=g-import-not-at-top,g-bad-import-order

_CKPT = flags.DEFINE_string("ckpt", None, "The --workdir of a training run (e.g. runs/demo), "
                            "its checkpoints folder, or one step's folder (runs/demo/"
                            "checkpoints/438: that step).")
_SPLIT = flags.DEFINE_enum("split", "validation", ["train", "validation", "test"],
                           "Which split of the run's data to score.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to restore (default: the best).")
_DATA_FILE = flags.DEFINE_string("data_file", None, "Score this text file instead of a split "
                                 "(tokenized with the run's vocabulary).")
_PROMPT = flags.DEFINE_string("prompt", None, "Also sample a continuation of this text.")
_NUM_TOKENS = flags.DEFINE_integer("num_tokens", 40, "Words to sample after --prompt.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling key: the same seed gives the same text.")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Sampling temperature (0: greedy).")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the k likeliest words (0: all).")
_OUT = flags.DEFINE_string("out", None, "Where to write the JSON report.")
_REPLICA = flags.DEFINE_integer("replica", None, "Score this replica of a population run "
                                "alone (default: every replica, each at its best step).")


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from infinito_jax import cli  # pylint: disable=g-import-not-at-top,wrong-import-position
from infinito_jax import errors  # pylint: disable=g-import-not-at-top,wrong-import-position
from infinito_jax import hostmem  # pylint: disable=g-import-not-at-top,wrong-import-position

hostmem.at_startup()  # before JAX starts its threads (infinito_jax/hostmem.py)
from infinito_jax import distributed  # pylint: disable=g-import-not-at-top,wrong-import-position

distributed.define_flags()  # --coordinator_address, --num_processes, --process_id, --distributed


def fail(message: str) -> int:
  print(f"error: {message}", file=sys.stderr)
  return 1


def parse_flags(argv):
  """absl's parser, with a bad flag as one line instead of a usage dump."""
  try:
    return flags.FLAGS(argv)
  except SystemExit as e:  # absl's --help / --helpfull print the usage, then exit 1
    raise SystemExit(0 if cli.asked_for_help(argv) and e.code == 1 else e.code) from None
  except flags.Error as e:
    sys.exit(fail(f"{str(e).splitlines()[0]}. See python evaluate.py --help."))


def report_path(out: str | None, ckpt: str) -> str | None:
  """Checks, before any work, that the report can be written; returns an error or None."""
  if out is not None:
    if os.path.isdir(out):
      return f"--out {out} is a folder; give a file path, e.g. {os.path.join(out, 'report.json')}."
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
      return f"--out {out}: the folder {folder} does not exist; create it or write elsewhere."
    if os.path.exists(out) and not is_report(out):
      return (f"--out {out} exists and is not a report of evaluate.py (a data file, a run's "
              "record?): it is left as it is. Give a new file name, or delete it first.")
    from infinito_jax.checkpoint import checkpoint_dir  # pylint: disable=g-import-not-at-top
    ckpts = os.path.realpath(checkpoint_dir(ckpt))  # through links: a step folder's link too
    if os.path.commonpath([os.path.realpath(out), ckpts]) == ckpts:
      return (f"--out {out} lies inside the run's checkpoints folder {checkpoint_dir(ckpt)}, "
              "whose step folders Orbax removes when it prunes them (and where a file is no "
              "step): write it elsewhere, e.g. the default, the workdir.")
  else:
    folder = os.path.abspath(ckpt)
  if os.path.isdir(folder) and not os.access(folder, os.W_OK):
    return f"cannot write the report into {folder} (read-only); pass --out PATH elsewhere."
  return None


def is_report(path: str) -> bool:
  """Whether a file is a JSON report written by evaluate.py (which --out may overwrite)."""
  try:
    with open(path, encoding="utf-8") as f:
      report = json.load(f)
  except (OSError, ValueError):
    return False
  return isinstance(report, dict) and {"split", "step", "loss", "perplexity",
                                       "chosen"} <= set(report)


def report_name(report: dict, data_file: str | None, replica: int | None) -> str:
  """eval_<split>_step<N>[_replica<r>].json, or eval_file-<name>-<path hash>_step<N>..."""
  name = _SPLIT.value
  if data_file:  # named after the file, plus its path's hash: never another report's name
    stem = os.path.splitext(os.path.basename(data_file))[0]
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)
    where = hashlib.sha256(os.path.abspath(data_file).encode()).hexdigest()[:6]
    name = f"file-{stem}-{where}"
  which = "" if replica is None else f"_replica{replica}"
  return f"eval_{name}_step{report['step']}{which}.json"


@errors.on_command_line  # its errors name its flags
def main(argv):
  if len(argv) > 1:
    return fail(f"unexpected arguments {argv[1:]}; see python evaluate.py --help.")
  if not _CKPT.value:
    return fail("pass --ckpt, the --workdir of a training run (e.g. --ckpt runs/demo).")
  if flags.FLAGS["split"].present and _DATA_FILE.value:
    return fail(f"--split {_SPLIT.value} and --data_file both say what to score: pass one "
                "(--data_file scores that file; --split, the run's split of its own data).")
  sampling = [f"--{n}" for n in ("num_tokens", "temperature", "top_k", "seed")
              if flags.FLAGS[n].present]
  if sampling and _PROMPT.value is None:
    return fail(f"{', '.join(sampling)} {'sets' if len(sampling) == 1 else 'set'} how words are "
                "sampled after --prompt: pass --prompt \"TEXT\" too (or drop "
                f"{'it' if len(sampling) == 1 else 'them'} to only score).")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from infinito_jax import checkpoint, evaluate  # after absl parsed flags: fast --help
  from infinito_jax.errors import InfinitoError

  out = _OUT.value
  try:
    if distributed.initialize_from_flags():  # before anything touches a device
      # again, for a JAX whose preemption service (SIGTERM) could not be switched off
      for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, _exit_now)
  except InfinitoError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  with distributed.errors_stop_all():  # an error on any process stops all, with its message
    return _evaluate(evaluate, checkpoint, out)


def _replaced_while_read(checkpoint, workdir: str, read_from) -> str | None:
  """Why no report can be filed where `train.py --fresh` (or anything else) replaced the run in
  `workdir` while evaluate.py read it (its checkpoints folder is another folder now): the step
  scored may be either run's, so neither run's folder may hold the report. None where the run
  is the one it was."""
  if read_from is None or checkpoint.file_id(checkpoint.checkpoint_dir(workdir)) == read_from:
    return None
  moved = [old for old in sorted(glob.glob(glob.escape(workdir) + ".old-*"))
           if checkpoint.file_id(checkpoint.checkpoint_dir(old)) == read_from]
  where = f" (moved to {moved[0]})" if moved else ""
  return (f"the run in {workdir} was replaced while evaluate.py read it{where}, as train.py "
          "--fresh does: the step scored may be either run's, so no report was written. Run "
          f"evaluate.py again on {moved[0] if moved else 'the run you meant'} (or on {workdir} "
          "for the new run).")


def _evaluate(evaluate, checkpoint, out) -> int:
  from infinito_jax.errors import (  # pylint: disable=g-import-not-at-top
      CheckpointError, ConfigError, InfinitoError)
  try:
    # every process must score the same thing (only process 0 writes, so --out may differ)
    distributed.check_same("evaluate.py flags", {
        "ckpt": os.path.abspath(_CKPT.value), "split": _SPLIT.value, "step": _STEP.value,
        "data_file": _DATA_FILE.value and os.path.abspath(_DATA_FILE.value),
        "prompt": _PROMPT.value, "num_tokens": _NUM_TOKENS.value, "seed": _SEED.value,
        "temperature": _TEMPERATURE.value, "top_k": _TOP_K.value, "replica": _REPLICA.value})
    workdir, step = evaluate.resolve_ckpt(_CKPT.value, _STEP.value)
    if distributed.is_primary() and (problem := report_path(out, workdir)):
      if distributed.active():
        raise ConfigError(problem)
      return fail(problem)
    read_from = checkpoint.file_id(checkpoint.checkpoint_dir(workdir))  # which run's folder
    sample = _PROMPT.value is not None  # (sampling flags without it were refused above)
    report = evaluate.run(workdir, _SPLIT.value, step, _DATA_FILE.value, _PROMPT.value,
                          *(flag.value if sample else None
                            for flag in (_NUM_TOKENS, _SEED, _TEMPERATURE, _TOP_K)),
                          _REPLICA.value)
    if problem := _replaced_while_read(checkpoint, workdir, read_from):
      raise CheckpointError(problem)
    out = out or os.path.join(workdir, report_name(report, _DATA_FILE.value, _REPLICA.value))
    if distributed.is_primary():  # every process scores; process 0 writes
      checkpoint.dump_json(out, report)
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # written: a signal now would
      signal.signal(s, signal.SIG_IGN)  # say "nothing written", or kill the exit's printing
  except InfinitoError as e:
    if distributed.active():
      raise  # errors_stop_all: all processes stop with the message
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(json.dumps(report, indent=1))
  if "population" in report or _REPLICA.value is not None:
    values = ("" if "hparams" not in report else ", " + ", ".join(
        f"{k}={v:g}" for k, v in report["hparams"].items()))
    frozen = ("" if "diverged" not in report else
              f"; frozen in training after diverging at step {report['diverged']['step']}")
    print(f"Scored replica {report['replica']} (seed {report['seed']}{values}{frozen}): "
          f"{report['chosen']}.")
  else:
    print(f"Scored {report['chosen']}.")
  if "warning" in report:
    print(report["warning"])
  if "note" in report:
    print(f"note: {report['note']}")
  from infinito_jax.stats import num  # pylint: disable=g-import-not-at-top
  line = (f"{report['split']}: loss {report['loss']:.4f}, perplexity {num(report['perplexity'])}")
  if "oracle_perplexity" in report:
    line += f" (oracle {report['oracle_perplexity']:.2f}" + (
        ")" if report.get("oracle_applies", True) else
        f", approximate: {100 * report['unk_rate']:.1f}% of the targets <unk>)")
  if "population" in report:
    p = report["population"]
    line += (f"; replica {report['replica']} ({report['lead']}) of {len(report['replicas'])}"
             + (f": perplexity {num(p['perplexity_mean'])} +- {num(p['perplexity_std'])} "
                f"(min {num(p['perplexity_min'])}, max {num(p['perplexity_max'])})"
                + (f" over {p['replicas']}" if p["replicas"] < len(report["replicas"]) else "")
                if p["replicas"] > 1 else ""))
    if p.get("diverged"):
      line += (f"; left out: replica{'s' * (len(p['diverged']) > 1)} "
               f"{', '.join(map(str, p['diverged']))}, frozen in training after diverging")
  print(line)
  if "generation" in report:
    g = report["generation"]
    if g["unknown_prompt_words"]:
      print(f"note: {g['unknown_prompt_words']} are not in the run's vocabulary and became <unk>")
    print(f"{g['prompt_as_seen']} >>> {g['continuation']}")
  print(f"Report written to {out}")
  return 0


if __name__ == "__main__":
  cli.survive_closed_output()  # `evaluate.py ... | head` still writes its report
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=parse_flags)
