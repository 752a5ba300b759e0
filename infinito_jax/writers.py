"""Where a run's records go besides history.jsonl (the truth): TensorBoard and Weights & Biases.

Every record the loop appends to the history is mirrored here as it is written: `train`
records as `train/...` scalars, `validation` records as `validation/...` scalars (per replica
under `validation/replica_<r>/...` in a population, with the mean over replicas), `sample`
records as text. The run's config goes to TensorBoard's hparams plugin and to W&B's config.

TensorBoard files are written with tensorboardX (no TensorFlow) into `<workdir>/tensorboard`;
a resumed run hides every earlier file's events (`purge_step=0`) and writes its history again
(the checkpoint's: the truth), so TensorBoard shows exactly history.jsonl: not what a killed
process logged after its last checkpoint, and not less either (tensorboardX writes from a
queue, whose last events a kill -9 loses even where they came before the checkpoint).
W&B (`log.wandb_project`) resumes the same W&B run: its id is kept in the run record, saved
with every checkpoint.
"""

import contextlib
import math
import os
import sys
import threading
import uuid
import weakref

import ml_collections
import numpy as np

from infinito_jax import config as config_lib
from infinito_jax.errors import ConfigError, is_disk_full

TENSORBOARD_DIR = "tensorboard"
_SCALARS = {
    "train": ("loss", "learning_rate", "grad_norm", "tokens_per_s"),
    "validation": ("loss", "perplexity", "integration_phi", "coherence", "complexity",
                   "pattern_diversity", "memory_utilization"),
}


# tensorboardX writes events on a thread of its own; an error there (a full disk) ends that
# thread with a traceback, after which its queue of 10 events fills and the next record blocks
# the loop forever. A long queue never blocks; the loop notices the thread's end at its next
# record or flush and turns TensorBoard off with one warning (history.jsonl is the record).
_TB_QUEUE = 100_000
_TB_THREAD_ERRORS: "weakref.WeakKeyDictionary[threading.Thread, BaseException]" = (
    weakref.WeakKeyDictionary())


def _keep_writer_thread_errors() -> None:
  """The writer thread's error is kept for the warning instead of printed as a traceback."""
  previous = threading.excepthook
  if getattr(previous, "infinito_tensorboard", False):
    return

  def hook(args):
    if type(args.thread).__name__ == "_EventLoggerThread" and args.exc_value is not None:
      _TB_THREAD_ERRORS[args.thread] = args.exc_value
      return
    previous(args)

  hook.infinito_tensorboard = True
  threading.excepthook = hook


def hparams_of(config: ml_collections.ConfigDict) -> dict:
  """The config as TensorBoard hparams: flat names, values int/float/str/bool."""
  out = {}
  for k, v in config_lib.flatten(config.to_dict()).items():
    out[k] = v if isinstance(v, (bool, int, float, str)) else str(v)
  return out


def check_available(config: ml_collections.ConfigDict) -> None:
  """Refuses, before a run writes anything, a writer whose package is missing."""
  if config.log.wandb_project:
    try:
      import wandb  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    except ImportError:
      raise ConfigError("log.wandb_project is set but wandb is not installed: "
                        "pip install -e \".[wandb]\" (or leave log.wandb_project empty)."
                        ) from None


class Writers:
  """Mirrors history records to TensorBoard and W&B (each optional, per `config.log`)."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, record, *,
               replicas: int, history: list[dict] = ()):
    self.replicas = replicas
    self.tb = self.wandb = None
    self._pending_validation: list[dict] = []
    self._frozen: set = set()  # replicas frozen by a divergence: validated no more
    self._tb_dir = None
    self._dropped: str | None = None  # the warning that TensorBoard was turned off, if unsaid
    if config.log.tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      from tensorboardX.summary import hparams  # pylint: disable=g-import-not-at-top
      # TensorBoard hides everything earlier files logged; the history is written again below
      _keep_writer_thread_errors()
      self._tb_dir = os.path.join(workdir, TENSORBOARD_DIR)
      try:
        self.tb = SummaryWriter(self._tb_dir, purge_step=0, flush_secs=30, max_queue=_TB_QUEUE)
      except OSError as e:  # its folder or first file cannot be made: a full disk, read-only
        self._drop_tensorboard(e)
      metrics = {"validation/loss": math.nan, "validation/perplexity": math.nan}
      if replicas > 1:
        metrics = {"validation/perplexity_mean": math.nan, "validation/loss_mean": math.nan}

      def header():
        for summary in hparams(hparams_of(config), metrics):
          self.tb.file_writer.add_summary(summary)
        self.tb.add_text("config", "```\n" + str(config) + "\n```", record.step)

      self._guard(header)
      for rec in history:  # (W&B resumes its own run, which has them)
        self.write(rec, wandb=False)
    if config.log.wandb_project:
      check_available(config)
      import wandb  # pylint: disable=g-import-not-at-top
      if not record.wandb_run_id:
        record.wandb_run_id = uuid.uuid4().hex[:12]  # saved with the next checkpoint
      self.wandb = wandb.init(project=config.log.wandb_project,
                              entity=config.log.wandb_entity or None,
                              id=record.wandb_run_id, resume="allow", dir=workdir,
                              name=os.path.basename(os.path.abspath(workdir)),
                              config=config.to_dict())

  def _event_writer(self):
    return getattr(getattr(self.tb, "file_writer", None), "event_writer", None)

  def _guard(self, write) -> None:
    """Runs `write` (TensorBoard calls); if it fails with an OSError, or TensorBoard's writer
    thread has ended, TensorBoard is turned off with one warning and the run goes on."""
    if self.tb is None:
      return
    try:
      write()
      worker = getattr(self._event_writer(), "_worker", None)
      error = None
      if worker is not None and not worker.is_alive():
        error = _TB_THREAD_ERRORS.get(worker) or RuntimeError("its writer thread has ended")
    except OSError as e:
      error = e
    if error is not None:
      self._drop_tensorboard(error)

  def _drop_tensorboard(self, error: BaseException) -> None:
    writer = self._event_writer()
    if writer is not None:
      queue = getattr(writer, "_event_queue", None)
      if queue is not None:  # events left in it must not hold the process at exit
        queue.cancel_join_thread()
      with contextlib.suppress(Exception):  # its file is closed even where the flush fails
        writer._ev_writer.close()  # pylint: disable=protected-access
      for name in ("add_event", "flush", "close"):  # tensorboardX's own close at exit, too
        setattr(writer, name, lambda *args, **kwargs: None)
    self.tb = None
    self._dropped = (f"warning: TensorBoard files could no longer be written in {self._tb_dir} "
                     f"({type(error).__name__}: {error}); TensorBoard was off from then on in "
                     "this process. history.jsonl keeps every record (python -m "
                     "infinito_jax.plot draws them), and a resumed run writes TensorBoard again.")
    if not is_disk_full(error):  # a full disk fails the next save too: its one error line is
      self._say_dropped()        # the message then; where the run goes on, it is said at close

  def _say_dropped(self) -> None:
    if self._dropped:
      print(self._dropped, file=sys.stderr, flush=True)
      self._dropped = None

  def write(self, rec: dict, wandb: bool = True) -> None:
    """One history record (as History.append returns it); to TensorBoard only if not `wandb`."""
    kind = rec["kind"]
    if kind == "train":
      values = {f"train/{k}": rec[k] for k in _SCALARS["train"] if k in rec}
      for r, loss in enumerate(rec.get("replica_losses", [])):
        values[f"train/replica_{r}/loss"] = loss
      self._scalars(rec["step"], values, wandb)
    elif kind == "validation":
      step, r = rec["step"], rec.get("replica", 0)
      if self.replicas == 1:
        self._scalars(step, {f"validation/{k}": rec[k] for k in _SCALARS["validation"]
                             if k in rec}, wandb)
        return
      self._scalars(step, {f"validation/replica_{r}/{k}": rec[k]
                           for k in _SCALARS["validation"] if k in rec}, wandb)
      self._pending_validation.append(rec)
      # the population's validation: every replica that still trains
      if len(self._pending_validation) == self.replicas - len(self._frozen):
        recs, self._pending_validation = self._pending_validation, []
        self._scalars(step, {  # a non-finite validation is null in the history: left out
            f"validation/{k}_mean": float(np.mean(finite)) if (
                finite := [x[k] for x in recs if x.get(k) is not None]) else None
            for k in ("loss", "perplexity")}, wandb)
    elif kind == "diverged":  # train.on_divergence='freeze': its validations end here
      self._frozen.add(rec.get("replica"))
    elif kind == "sample":
      text = f"{rec.get('prompt_as_seen', rec['prompt'])} >>> {rec['text']}"  # as evaluate.py
      tag = "samples" if self.replicas == 1 else f"samples/replica_{rec.get('replica', 0)}"
      self._guard(lambda: self.tb.add_text(tag, text, rec["step"]))
      if self.wandb is not None and wandb:
        self.wandb.log({tag: text}, step=rec["step"])

  def _scalars(self, step: int, values: dict, wandb: bool = True) -> None:
    values = {k: float(v) for k, v in values.items() if v is not None}

    def add():
      for k, v in values.items():
        self.tb.add_scalar(k, v, step)

    self._guard(add)
    if self.wandb is not None and values and wandb:
      self.wandb.log(values, step=step)

  def flush(self) -> None:
    self._guard(lambda: self.tb.flush())

  def close(self, failing: bool = False) -> None:
    """Closes the writers; says if TensorBoard was turned off, unless the run is failing (its
    own error is the one to report)."""
    tb = self.tb
    self._guard(lambda: tb.close())
    self.tb = None
    if failing:
      self._dropped = None
    self._say_dropped()
    if self.wandb is not None:
      self.wandb.finish()
      self.wandb = None
