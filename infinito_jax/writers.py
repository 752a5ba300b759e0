"""Where a run's records go besides history.jsonl (the truth): TensorBoard and Weights & Biases.

Every record the loop appends to the history is mirrored here as it is written: `train`
records as `train/...` scalars, `validation` records as `validation/...` scalars (per replica
under `validation/replica_<r>/...` in a population, with the mean over replicas), `sample`
records as text. The run's config goes to TensorBoard's hparams plugin and to W&B's config.

TensorBoard files are written with tensorboardX (no TensorFlow) into `<workdir>/tensorboard`;
a resumed run opens them with `purge_step` just past its step, so TensorBoard hides what the
killed process logged after its last checkpoint. W&B (`log.wandb_project`) resumes the same W&B run:
its id is kept in the run record, saved with every checkpoint.
"""

import math
import os
import uuid

import ml_collections
import numpy as np

from infinito_jax import config as config_lib
from infinito_jax.errors import ConfigError

TENSORBOARD_DIR = "tensorboard"
_SCALARS = {
    "train": ("loss", "learning_rate", "grad_norm", "tokens_per_s"),
    "validation": ("loss", "perplexity", "integration_phi", "coherence", "complexity",
                   "pattern_diversity", "memory_utilization"),
}


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
               replicas: int):
    self.replicas = replicas
    self.tb = self.wandb = None
    self._pending_validation: list[dict] = []
    if config.log.tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      from tensorboardX.summary import hparams  # pylint: disable=g-import-not-at-top
      # TensorBoard hides what earlier files logged from this step on: for a resumed run
      # what a killed process logged after its checkpoint (the checkpoint's own step was
      # logged before it was saved), for a new run everything a process killed before its
      # first checkpoint logged
      self.tb = SummaryWriter(os.path.join(workdir, TENSORBOARD_DIR),
                              purge_step=record.step + 1 if record.step > 0 else 0,
                              flush_secs=30)
      metrics = {"validation/loss": math.nan, "validation/perplexity": math.nan}
      if replicas > 1:
        metrics = {"validation/perplexity_mean": math.nan, "validation/loss_mean": math.nan}
      for summary in hparams(hparams_of(config), metrics):
        self.tb.file_writer.add_summary(summary)
      self.tb.add_text("config", "```\n" + str(config) + "\n```", record.step)
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

  def write(self, rec: dict) -> None:
    """One history record (as History.append returns it)."""
    kind = rec["kind"]
    if kind == "train":
      values = {f"train/{k}": rec[k] for k in _SCALARS["train"] if k in rec}
      for r, loss in enumerate(rec.get("replica_losses", [])):
        values[f"train/replica_{r}/loss"] = loss
      self._scalars(rec["step"], values)
    elif kind == "validation":
      step, r = rec["step"], rec.get("replica", 0)
      if self.replicas == 1:
        self._scalars(step, {f"validation/{k}": rec[k] for k in _SCALARS["validation"]
                             if k in rec})
        return
      self._scalars(step, {f"validation/replica_{r}/{k}": rec[k]
                           for k in _SCALARS["validation"] if k in rec})
      self._pending_validation.append(rec)
      if len(self._pending_validation) == self.replicas:  # the population's validation
        recs, self._pending_validation = self._pending_validation, []
        self._scalars(step, {f"validation/{k}_mean": float(np.mean([x[k] for x in recs]))
                             for k in ("loss", "perplexity")})
    elif kind == "sample":
      text = f"{rec['prompt']} >>> {rec['text']}"
      tag = "samples" if self.replicas == 1 else f"samples/replica_{rec.get('replica', 0)}"
      if self.tb is not None:
        self.tb.add_text(tag, text, rec["step"])
      if self.wandb is not None:
        self.wandb.log({tag: text}, step=rec["step"])

  def _scalars(self, step: int, values: dict) -> None:
    values = {k: float(v) for k, v in values.items() if v is not None}
    if self.tb is not None:
      for k, v in values.items():
        self.tb.add_scalar(k, v, step)
    if self.wandb is not None and values:
      self.wandb.log(values, step=step)

  def flush(self) -> None:
    if self.tb is not None:
      self.tb.flush()

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()
      self.tb = None
    if self.wandb is not None:
      self.wandb.finish()
      self.wandb = None
