"""Orbax checkpoints of a run: the train state plus JSON metadata, latest and best always kept.

Layout: <workdir>/checkpoints/<step>/{state, meta}. `state` is the TrainState pytree (params,
optax state, memory, step, key data); `meta` is JSON: the config, the vocabulary, the data
position (epoch, batch), the history, the best validation loss and step, the patience counter.
"""

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

# model fields that change parameter shapes: a checkpoint only fits a config that agrees on them
SHAPE_FIELDS = ("vocab_size", "hidden_dim", "num_layers", "num_heads", "memory_slots",
                "slot_size", "max_len")


class CheckpointError(RuntimeError):
  """A checkpoint that is missing, damaged or does not fit the config; the message says which."""


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


class Checkpointer:
  """A CheckpointManager that keeps the latest and the best (lowest validation loss) steps."""

  def __init__(self, workdir: str, keep_best: bool = True, read_only: bool = False):
    self.directory = checkpoint_dir(workdir)
    if read_only and not os.path.isdir(self.directory):
      raise CheckpointError(f"no checkpoints in {self.directory}: pass the --workdir of a "
                            f"training run (train.py prints it).")
    policies = [checkpoint_managers.LatestN(1)]
    if keep_best:
      # lowest loss wins; among equal losses the earliest, as the loop's "best" (strictly better)
      policies.append(checkpoint_managers.BestN(
          get_metric_fn=lambda m: (m["val_loss"], m["step"]), reverse=True, n=1,
          keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
        create=not read_only, read_only=read_only)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "meta"))

  def steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def save(self, step: int, state, meta: dict, val_loss: float | None = None) -> None:
    """Starts an asynchronous save; `wait()` or `close()` makes sure it is on disk."""
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    meta=ocp.args.JsonSave(meta)),
                      metrics=None if val_loss is None else {"val_loss": float(val_loss),
                                                             "step": step},
                      force=True)

  def read_meta(self, step: int) -> dict:
    """The JSON metadata of `step` (cheap: no arrays are read)."""
    self._check_step(step)
    try:
      meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
      return dict(meta["meta"])
    except Exception as e:
      raise CheckpointError(f"checkpoint {self.path(step)}/meta could not be read "
                            f"({type(e).__name__}: {e}); it is damaged. Restore another step "
                            f"(available: {self.steps()}) or start a new --workdir.") from e

  def restore(self, step: int, abstract_state) -> tuple[Any, dict]:
    """Restores (state, meta) of `step` into the shapes and shardings of `abstract_state`."""
    meta = self.read_meta(step)
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state)))
    except Exception as e:
      raise CheckpointError(f"checkpoint {self.path(step)}/state could not be restored "
                            f"({type(e).__name__}: {e}). It is damaged or was written by another "
                            f"model config; restore another step (available: {self.steps()}) "
                            f"or start a new --workdir.") from e
    # a leaf that came back with another shape than asked for is a mismatch too
    for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(abstract_state),
                                 jax.tree_util.tree_leaves(out["state"])):
      if tuple(want.shape) != tuple(got.shape):
        raise CheckpointError(f"checkpoint {self.path(step)}/state: {jax.tree_util.keystr(path)} "
                              f"has shape {tuple(got.shape)}, the config needs {tuple(want.shape)}.")
    return out["state"], meta

  def _check_step(self, step: int) -> None:
    if step not in self.steps():
      raise CheckpointError(f"no checkpoint for step {step} in {self.directory}; "
                            f"available: {self.steps()}.")

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


# fields that fix the batches: resuming with others would not continue the same data order
DATA_FIELDS = ("seed", "data.source", "data.seq_len", "train.batch_size")


def _get(d: dict, dotted: str):
  for part in dotted.split("."):
    d = d.get(part, {}) if isinstance(d, dict) else {}
  return d if d != {} else None


def check_compatible(meta: dict, config: dict, where: str) -> None:
  """Refuses a checkpoint whose model shapes or data order differ from the config's."""
  saved = meta.get("config", {})
  fields = [f"model.{k}" for k in SHAPE_FIELDS] + list(DATA_FIELDS)
  diffs = [f"{k}: checkpoint {_get(saved, k)!r}, config {_get(config, k)!r}"
           for k in fields if _get(saved, k) != _get(config, k)]
  if diffs:
    raise CheckpointError(f"the checkpoint in {where} does not match the config: "
                          + "; ".join(diffs) + ". Use the config it was trained with, or a new "
                          "--workdir to train from scratch.")


def dump_json(path: str, obj) -> None:
  """Writes JSON atomically (a crash never leaves half a file)."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)
