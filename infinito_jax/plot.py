"""Training curves of runs: loss and perplexity against step, read from their history.jsonl."""

import argparse
import json
import math
import os
import sys
import warnings
import zlib

import numpy as np
from matplotlib import ticker
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from infinito_jax import lifecycle
from infinito_jax.errors import ConfigError, DataError, DiskFullError, InfinitoError
from infinito_jax.errors import WorkdirError, is_disk_full

FIGSIZE = (13.0, 4.8)  # inches; the PNG is FIGSIZE * DPI pixels (no tight bbox, a fixed size)
DPI = 100


def read_history(workdir: str) -> list[dict]:
  """The records of `workdir`/history.jsonl, in file order.

  A damaged last line (the process was killed mid-write) is skipped with a warning; a damaged
  line anywhere else is a damaged file (History rewrites the file whole on a resume, so a kill
  cannot leave one there) and raises.

  Args:
    workdir: a train.py --workdir.

  Returns:
    The JSON objects, one per non-empty line.

  Raises:
    WorkdirError: the workdir does not exist, is not a folder, or has no history.jsonl.
    DataError: a line other than the last is not a JSON object.
  """
  if not os.path.exists(workdir):
    raise WorkdirError(f"workdir {workdir} does not exist: pass the --workdir of a training run.")
  if not os.path.isdir(workdir):
    raise WorkdirError(f"{workdir} is a file, not a workdir: pass the --workdir of a training run.")
  path = os.path.join(workdir, "history.jsonl")
  if not os.path.isfile(path):
    raise WorkdirError(f"no history.jsonl in {workdir}: is it a train.py --workdir?")
  with open(path, encoding="utf-8", errors="replace") as f:
    lines = [(i, line) for i, line in enumerate(f, 1) if line.strip()]
  records = []
  for k, (i, line) in enumerate(lines):
    try:
      rec = json.loads(line)
      if not isinstance(rec, dict):
        raise ValueError("not a JSON object")
    except ValueError:
      if k == len(lines) - 1:
        warnings.warn(f"{path}: skipped the damaged last line {i} (a write cut short?)",
                      stacklevel=2)
        continue
      raise DataError(f"{path} is damaged at line {i} of {len(lines)} (not a JSON object): "
                      "resuming the run rewrites it from the last checkpoint.") from None
    records.append(rec)
  return records


def read_oracle(workdir: str) -> float | None:
  """summary.json's corpus.oracle_perplexity (runs on the embedded corpus), else None.

  summary.json is optional (a run still training may not have written it); an unreadable one
  only costs the oracle line, so it is a warning, not an error.
  """
  path = os.path.join(workdir, "summary.json")
  if not os.path.isfile(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      summary = json.load(f)
  except (OSError, ValueError) as e:
    warnings.warn(f"{path} cannot be read ({e}); drawing no oracle line for it", stacklevel=2)
    return None
  corpus = summary.get("corpus") if isinstance(summary, dict) else None
  oracle = corpus.get("oracle_perplexity") if isinstance(corpus, dict) else None
  return float(oracle) if isinstance(oracle, (int, float)) and oracle > 0 else None


# a diverged run's perplexity and loss are drawn at most here: beyond about 1e300 matplotlib's
# axis margins overflow and the panel comes out empty
PPL_MAX = 1e30
LOSS_MAX = 1e30


def _finite(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _loss(x) -> float | None:
  """A record's loss as drawn: a number, +inf (a diverged value) clipped to LOSS_MAX; None
  for NaN, -inf or anything that is not a number."""
  if not isinstance(x, (int, float)) or isinstance(x, bool) or math.isnan(x) or x == -math.inf:
    return None
  return min(float(x), LOSS_MAX)


def curves(records: list[dict]) -> dict:
  """The plotted numbers of one run's records, sorted by step.

  A train or validation record whose loss is NaN, -inf or not a number is not drawn; its step
  is listed in "skipped" (the caller warns). +inf is drawn at LOSS_MAX like any diverged value.

  Returns:
    {"train_step", "train_loss"}: the train records' mean loss per logging window (already
    the mean over replicas); {"val_step", "val_loss", "val_ppl"} the mean over replicas at each
    validation step (loss at most LOSS_MAX, perplexity at most PPL_MAX: a diverged run),
    with "val_loss_min/max" and "val_ppl_min/max" over replicas, and "replicas" the most
    replicas seen at one validation, "skipped" the steps of records not drawn. Numpy arrays;
    empty when there is none.
  """
  train = {}  # step -> loss; a repeated step keeps its last record
  skipped = []
  for r in records:
    if r.get("kind") == "train" and _finite(r.get("step")) and "loss" in r:
      loss = _loss(r["loss"])
      if loss is None:
        skipped.append(int(r["step"]))
      else:
        train[int(r["step"])] = loss
  val = {}  # step -> {replica: (loss, perplexity)}
  for r in records:
    replica = r.get("replica", 0)
    if (r.get("kind") == "validation" and _finite(r.get("step")) and "loss" in r
        and isinstance(replica, int) and not isinstance(replica, bool)):
      loss = _loss(r["loss"])
      if loss is None:
        skipped.append(int(r["step"]))
        continue
      ppl = r.get("perplexity")
      ppl = float(ppl) if _finite(ppl) else math.exp(min(loss, math.log(PPL_MAX)))
      val.setdefault(int(r["step"]), {})[replica] = (loss, min(ppl, PPL_MAX))
  ts = sorted(train)
  vs = sorted(val)
  per = [np.array(list(val[s].values()), np.float64) for s in vs]  # [replicas, 2] per step
  stat = lambda f, j: np.array([f(p[:, j]) for p in per], np.float64)
  return {"train_step": np.array(ts, np.float64),
          "train_loss": np.array([train[s] for s in ts], np.float64),
          "val_step": np.array(vs, np.float64),
          "val_loss": stat(np.mean, 0), "val_loss_min": stat(np.min, 0),
          "val_loss_max": stat(np.max, 0),
          "val_ppl": stat(np.mean, 1), "val_ppl_min": stat(np.min, 1),
          "val_ppl_max": stat(np.max, 1),
          "replicas": max((len(p) for p in per), default=0),
          "skipped": sorted(set(skipped))}


def _labels(workdirs: list[str], labels: list[str] | None) -> list[str]:
  if labels is not None:
    if any(not str(x).strip() for x in labels):
      raise ConfigError(f"empty label in {list(labels)}: give every run a name.")
    if len(labels) != len(workdirs):
      raise ConfigError(f"{len(labels)} labels ({', '.join(labels)}) for {len(workdirs)} "
                        "workdirs: give one label per workdir, in the same order.")
    labels = [str(x) for x in labels]
  else:
    names = [os.path.basename(os.path.normpath(os.path.abspath(w))) for w in workdirs]
    # two runs named alike (a/run, b/run) keep the path given, so the legend tells them apart
    labels = [w if names.count(n) > 1 else n for w, n in zip(workdirs, names)]
  # matplotlib leaves a label starting with '_' out of the legend (a study's _values-* runs),
  # and reads text between two '$' as math: a name is shown as written
  return [("\u2009" + x if x.startswith("_") else x).replace("$", r"\$") for x in labels]


def make_figure(workdirs: list[str], labels: list[str] | None = None) -> Figure:
  """Loss (left) and perplexity (right, log scale) against step, one colour per run.

  Each run draws its training loss (a line: the mean over replicas of each logging window)
  and its validation loss (markers; with several replicas the mean over them and a min-max
  band); the perplexity panel shows exp(train loss) and the validation perplexity the same
  way. A run on the embedded corpus (summary.json's corpus.oracle_perplexity) adds a dashed
  "oracle <name>" line: the best possible perplexity, and its log on the loss panel (runs with
  the same oracle share one grey line, "oracle <name>, <name>").

  The figure is a plain `matplotlib.figure.Figure` on an Agg canvas, outside pyplot, so this
  never changes the backend of the caller (a notebook's) and needs no display.

  Args:
    workdirs: train.py --workdir folders, each with history.jsonl.
    labels: the legend name of each run (default: the folder's name).

  Returns:
    The figure; its axes are `fig.axes[0]` (loss) and `fig.axes[1]` (perplexity).

  Raises:
    WorkdirError: a workdir is missing or has no history.jsonl.
    DataError: a history is damaged, or no run has a train or validation record yet.
    ConfigError: no workdir, or as many labels as workdirs are not given.
  """
  if not workdirs:
    raise ConfigError("no workdir to plot: pass at least one train.py --workdir.")
  names = _labels(workdirs, labels)
  seen = [os.path.realpath(w) for w in workdirs]
  for w in sorted({w for w, r in zip(workdirs, seen) if seen.count(r) > 1}):
    warnings.warn(f"{w} is given more than once: its curves are drawn once per mention",
                  stacklevel=2)
  runs = [(name, curves(read_history(w)), read_oracle(w)) for w, name in zip(workdirs, names)]
  empty = lambda c: c["train_step"].size == 0 and c["val_step"].size == 0
  if all(empty(c) for _, c, _ in runs):
    if any(c["skipped"] for _, c, _ in runs):  # records there are, none with a drawable loss
      raise DataError(f"nothing to plot: every train and validation loss in the history.jsonl "
                      f"of {', '.join(w for w, (_, c, _) in zip(workdirs, runs) if c['skipped'])}"
                      " is NaN, -inf or not a number (a run that diverged from its first "
                      "record: lower train.learning_rate or raise train.warmup_steps, then "
                      "train it again with --fresh).")
    raise DataError(f"nothing to plot yet: no train or validation record in the history.jsonl "
                    f"of {', '.join(workdirs)} (a run logs its first record after "
                    "train.log_every steps).")
  fig = Figure(figsize=FIGSIZE, dpi=DPI)
  FigureCanvasAgg(fig)  # savefig renders with Agg whatever pyplot's backend is
  ax_loss, ax_ppl = fig.subplots(1, 2)
  for i, (name, c, _) in enumerate(runs):
    color = f"C{i % 10}"
    if c["skipped"]:
      steps = ", ".join(map(str, c["skipped"][:5])) + (", ..." if len(c["skipped"]) > 5 else "")
      warnings.warn(f"{workdirs[i]}: {len(c['skipped'])} step(s) with a train or validation "
                    f"loss that is NaN, -inf or not a number are not drawn (step {steps})",
                    stacklevel=2)
    if empty(c) and not c["skipped"]:  # (one whose every loss is NaN was just named)
      warnings.warn(f"{workdirs[i]} has no train or validation record yet; it is not drawn",
                    stacklevel=2)
    if c["train_step"].size:
      # exp of a diverging loss overflows; clipping keeps the log axis drawable
      train_ppl = np.exp(np.minimum(c["train_loss"], math.log(PPL_MAX)))
      style = "-" if c["train_step"].size > 1 else "."  # one record: a line would not show
      ax_loss.plot(c["train_step"], c["train_loss"], style, color=color, lw=1.0, alpha=0.6,
                   label=f"{name} train")
      ax_ppl.plot(c["train_step"], train_ppl, style, color=color, lw=1.0, alpha=0.6,
                  label=f"{name} train")
    if c["val_step"].size:
      many = c["replicas"] > 1
      suffix = f" validation (mean of {c['replicas']})" if many else " validation"
      for ax, key in ((ax_loss, "val_loss"), (ax_ppl, "val_ppl")):
        ax.plot(c["val_step"], c[key], "o-", color=color, ms=5, lw=1.6, label=name + suffix)
        if many:  # the spread of the population, not an interval
          ax.fill_between(c["val_step"], c[key + "_min"], c[key + "_max"], color=color,
                          alpha=0.2, lw=0)
  # runs on one corpus share its oracle: one line for them (in grey), not lines hiding each other
  oracles = {}  # oracle -> [(run index, name)]
  for i, (name, _, oracle) in enumerate(runs):
    if oracle is not None:
      same = next((o for o in oracles if math.isclose(o, oracle, rel_tol=1e-9)), oracle)
      oracles.setdefault(same, []).append((i, name))
  for oracle, who in oracles.items():
    color = f"C{who[0][0] % 10}" if len(who) == 1 else "0.35"
    label = "oracle " + ", ".join(name for _, name in who)
    ax_loss.axhline(math.log(oracle), color=color, ls="--", lw=1.2, label=label)
    ax_ppl.axhline(oracle, color=color, ls="--", lw=1.2, label=label)
  ax_loss.set(xlabel="step", ylabel="loss (nats per word)", title="Loss")
  ax_ppl.set(xlabel="step", ylabel="perplexity", title="Perplexity (log scale)")
  ax_ppl.set_yscale("log")
  # plain numbers (20, 300) rather than 2x10^1 on the log axis (set after set_yscale resets them)
  ax_ppl.yaxis.set_major_formatter(ticker.LogFormatter())
  ax_ppl.yaxis.set_minor_formatter(ticker.LogFormatter(labelOnlyBase=False))
  for ax in (ax_loss, ax_ppl):
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize="small")
  fig.tight_layout()
  return fig


def is_plot(path: str) -> bool:
  """Whether a file bears matplotlib's mark where its format keeps the maker's name (PNG's
  Software text, SVG's and SVGZ's metadata, EPS's and PS's %%Creator in their first bytes,
  PDF's /Creator near the end; JPEG, TIFF, WebP, GIF, AVIF and raw pixels carry none): a plot
  this tool may overwrite. A file of another format that merely mentions matplotlib is not."""
  try:
    with open(path, "rb") as f:
      head = f.read(65536)
      if head[:2] == b"\x1f\x8b":  # SVGZ: gzip-compressed SVG
        head = zlib.decompressobj(zlib.MAX_WBITS | 16).decompress(head, 65536)
      low = head.lower()
      if head.startswith(b"\x89PNG\r\n\x1a\n"):  # its tEXt chunk: Software\0Matplotlib ...
        return b"software\x00matplotlib" in low
      if head.startswith(b"%!PS"):  # PS and EPS: a DSC comment
        return b"%%creator: matplotlib" in low
      if head.lstrip().startswith((b"<?xml", b"<svg")):  # SVG's metadata (or an old comment)
        return b"<dc:title>matplotlib v" in low or b"created with matplotlib" in low
      if head[:5] != b"%PDF-":
        return False
      size = os.fstat(f.fileno()).st_size
      f.seek(max(0, size - 8 * 2**20))  # the Info object precedes the cross-reference table
      return b"/Creator (Matplotlib" in f.read()
  except (OSError, zlib.error):
    return False


_RUN_MARKS = ("history.jsonl", "summary.json")  # what a run's folder holds once it trains
ORBAX_STEP_MARK = "_CHECKPOINT_METADATA"  # in each step folder Orbax writes


def _checkpoints_above(path: str) -> str | None:
  """The run's checkpoints folder `path` lies in, of any run, as given or through links: a
  folder named checkpoints beside a run's files (checkpoint.checkpoint_dir's), or a step
  folder Orbax wrote (a linked checkpoints folder's target); None where it lies in none."""
  for folder in (os.path.dirname(os.path.abspath(path)), os.path.dirname(os.path.realpath(path))):
    while True:
      if (os.path.basename(folder) == "checkpoints" and any(
          os.path.exists(os.path.join(os.path.dirname(folder), m)) for m in _RUN_MARKS)
          or os.path.exists(os.path.join(folder, ORBAX_STEP_MARK))):
        return folder
      parent = os.path.dirname(folder)
      if parent == folder:
        break
      folder = parent
  return None


def _check_out(out: str, workdirs: list[str], given: bool = True) -> None:
  """An `out` (--out where `given`, else the default path) that is neither a file of the user's
  nor inside a run's checkpoints (a plotted run's, through its links, or any run's)."""
  named = f"--out {out}" if given else f"{out} (the plot's default path)"
  inside = _checkpoints_above(out)
  for w in workdirs:
    folder = os.path.join(os.path.abspath(w), "checkpoints")  # checkpoint.checkpoint_dir's
    ckpts = os.path.realpath(folder)  # through links: a step folder's link too (no Orbax import)
    if os.path.commonpath([os.path.realpath(out), ckpts]) == ckpts:
      inside = folder
  if inside:
    raise WorkdirError(f"{named} lies inside the run's checkpoints folder {inside}, whose step "
                       "folders Orbax removes when it prunes them: write it elsewhere, e.g. the "
                       "default, the workdir.")
  if os.path.isfile(out) and not is_plot(out):
    raise WorkdirError(f"{named} exists and is not a plot written by matplotlib (a file of "
                       "yours?): it is left as it is. "
                       + ("Give a new file name, or delete it first" if given else
                          "Move it away, or write the plot elsewhere (the plot command's --out)")
                       + " (a JPEG, TIFF, WebP, GIF, AVIF or raw plot carries no such mark: "
                       "replace it so).")


def default_out(workdirs: list[str]) -> str:
  """Where write_plot writes without `out`."""
  return os.path.join(workdirs[0], "curves.png" if len(workdirs) == 1 else "compare.png")


def write_plot(workdirs: list[str], out: str | None = None,
               labels: list[str] | None = None) -> str:
  """Saves `make_figure(workdirs, labels)` atomically (PNG, or the format of `out`'s suffix:
  pdf, svg...); returns its path.

  Args:
    workdirs: train.py --workdir folders.
    out: the PNG's path (default: curves.png in the workdir of a single run; compare.png in
      the first workdir of several, whose own curves.png stays as it is).
    labels: the legend name of each run (default: the folder's name).

  Returns:
    The path written.

  Raises:
    The errors of `make_figure`; WorkdirError when `out` cannot be written (its folder is
    missing or read-only, or it is a folder) or may not be (a file that is no plot, a path
    inside a run's checkpoints folder); DiskFullError on a full disk.
  """
  for w in workdirs:  # part of a run (a killed --fresh): a plot there would block the move's end
    if isinstance(w, (str, os.PathLike)) and (split := lifecycle.split_run(w, reader=True)):
      raise WorkdirError(split)
  given = out is not None
  # one run: its curves.png; several: compare.png beside it, so the run's own plot stays
  out = out if given else default_out(workdirs)
  _check_out(out, workdirs, given)
  if os.path.isdir(out):
    raise WorkdirError(f"--out {out} is a folder; give a file path, e.g. "
                       f"{os.path.join(out, 'curves.png')}." if given else
                       f"{out} (the plot's default path) is a folder: move it away, or give "
                       "--out another file name.")
  fig = make_figure(workdirs, labels)
  folder = os.path.dirname(os.path.abspath(out))
  if not os.path.isdir(folder):
    raise WorkdirError(f"cannot write {out}: the folder {folder} does not exist; create it or "
                       "write elsewhere.")
  try:
    # written whole then renamed, so a viewer refreshing the file never sees half a PNG
    fmt = os.path.splitext(out)[1].lstrip(".").lower() or "png"  # x.pdf is a PDF, x.svg an SVG
    if fmt not in fig.canvas.get_supported_filetypes():
      raise WorkdirError(f"cannot write {out}: matplotlib writes "
                         f"{', '.join(sorted(fig.canvas.get_supported_filetypes()))}; "
                         "name the file with one of these suffixes.")
    lifecycle.write_atomically([(out, lambda tmp: fig.savefig(tmp, format=fmt, dpi=DPI))])
  except OSError as e:
    if is_disk_full(e):
      raise DiskFullError(f"no space left on the device to write {out}.") from None
    raise WorkdirError(f"cannot write {out}: {e.strerror or e}.") from None
  finally:
    fig.clear()  # the figure is outside pyplot: clearing it frees its artists, nothing to close
  return out


def main(argv: list[str] | None = None) -> int:
  """`python -m infinito_jax.plot WORKDIR [WORKDIR ...] [--out PNG] [--labels a,b]`."""
  parser = argparse.ArgumentParser(
      prog="python -m infinito_jax.plot",
      description="Plot the loss and perplexity curves of training runs from their "
                  "history.jsonl (several runs are overlaid).")
  parser.add_argument("workdirs", nargs="+", metavar="WORKDIR", help="a train.py --workdir")
  parser.add_argument("--out", default=None,
                      help="the PNG to write (default: curves.png in the WORKDIR of one run; "
                           "compare.png in the first WORKDIR of several)")
  parser.add_argument("--labels", default=None,
                      help="comma-separated legend names, one per WORKDIR (default: folder names)")
  args = parser.parse_args(argv)
  labels = [s.strip() for s in args.labels.split(",")] if args.labels is not None else None
  path, error = None, None
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    try:
      path = write_plot(args.workdirs, args.out, labels)
    except InfinitoError as e:
      error = e
  for w in caught:  # one line each, not warnings' "file:line: UserWarning:" form
    print(f"warning: {w.message}", file=sys.stderr)
  if error is not None:
    print(f"error: {error}", file=sys.stderr)
    return 1
  print(f"Wrote {path}")
  return 0


if __name__ == "__main__":
  from infinito_jax import cli  # pylint: disable=g-import-not-at-top
  cli.survive_closed_output()
  sys.exit(main())
