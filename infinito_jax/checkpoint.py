"""Orbax checkpoints of a run: arrays and JSON items per step; the latest and the best are kept.

Layout: <workdir>/checkpoints/<step>/ with the items
  params, memory   the model's variables (what evaluate.py restores)
  optimizer        {'opt_state', 'step', 'rng'}: what only training needs
  progress         JSON: {'record': RunRecord, 'history': [...]}
  meta             JSON: {'format', 'config', 'tokenizer', 'data_info'}
A step is written under a temporary name and renamed when complete (Orbax), so a killed save
leaves no half step. Which steps are kept is decided here, not by an Orbax policy: the latest
and the best named by the run's own record, deleted only once a newer save is committed, so a
restart (which Orbax's BestN does not survive) never loses the best checkpoint.
"""

import contextlib
import datetime
import fcntl
import functools
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import time
from typing import Any

import numpy as np
import orbax.checkpoint as ocp

from infinito_jax import distributed
from infinito_jax.lifecycle import (COMPLETED, DIVERGED, EARLY_STOPPED, HELD_LOCKS, INTERRUPTED,
                                    LOCK_FILE, STOPPED, split_run,
                                    uninterruptible, write_atomically)
from infinito_jax.errors import (CheckpointError, DiskFullError, IncompatibleCheckpointError,
                                 InfinitoError, StepVanishedError, WorkdirError,
                                 WorkdirLostError, is_disk_full, is_unwritable,
                                 is_disk_full_text, short)

FORMAT = 3  # layout version in meta['format']: 3 stacks every array on a leading replica axis
ARRAY_ITEMS = ("params", "memory", "optimizer")
JSON_ITEMS = ("progress", "meta")
ITEMS = ARRAY_ITEMS + JSON_ITEMS
TMP_MARK = ".orbax-checkpoint-tmp"
DAMAGED_DIR = "damaged_checkpoints"
READERS_DIR = ".readers"  # the steps evaluate.py reads meanwhile: the run does not delete them

__all__ = ["CheckpointError", "Checkpointer", "checkpoint_dir", "dump_json", "FORMAT"]


_MIX = 0x9E3779B1  # checksum = sum(w_i * (2 i + 1)) + sum(w_i) * _MIX  (mod 2^32)


# the two JSON items of a step vouch for each other: progress holds the digest of meta (the
# config, the tokenizer, the data's fingerprints), meta the digest of progress (the record,
# the history, the arrays' checksums); a step saved before them has neither
_JSON_DIGESTS = {"meta": ("progress", "meta_sha256"), "progress": ("meta", "progress_sha256")}


def json_digest(obj) -> str:
  """sha256 of a JSON item as it reads back (keys as strings, sorted; tuples as lists)."""
  text = json.dumps(json.loads(json.dumps(obj)), sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(text.encode()).hexdigest()


def checksums(arrays: dict[str, Any], on_devices: bool | None = None) -> dict[str, dict[str, int]]:
  """{item: {leaf path: checksum}} of array items: a position-weighted sum of each array's
  32-bit words (2^32 wrap-around; narrower elements widened to a word each). Any single
  changed element changes its array's checksum (the weights are odd), so bytes damaged on disk
  after a complete save are caught when they are read.

  Where every array is whole in this process (one process: Orbax copies them to the host for
  writing anyway) it is computed with numpy, with no compilation; arrays spread over several
  processes are summed on the devices in one jitted program (`on_devices` forces either; the
  two give the same numbers, tested)."""
  import jax  # pylint: disable=g-import-not-at-top
  names, leaves = [], []
  for item, tree in arrays.items():
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
      names.append((item, jax.tree_util.keystr(path)))
      leaves.append(jax.random.key_data(leaf) if jax.dtypes.issubdtype(
          getattr(leaf, "dtype", None), jax.dtypes.prng_key) else leaf)
  if not leaves:
    return {}
  if on_devices is None:
    on_devices = not all(getattr(x, "is_fully_addressable", True) for x in leaves)
  if on_devices:
    from jax.sharding import NamedSharding, PartitionSpec  # pylint: disable=g-import-not-at-top
    sharding = getattr(leaves[0], "sharding", None)
    out = (NamedSharding(sharding.mesh, PartitionSpec()) if isinstance(sharding, NamedSharding)
           else None)  # replicated: every process reads the numbers
    sums = _checksum_program(out)(leaves)
    values = np.asarray(sums.addressable_data(0)).tolist()
  else:
    values = [_host_checksum(np.asarray(x)) for x in leaves]
  result = {}
  for (item, name), v in zip(names, values):
    result.setdefault(item, {})[name] = int(v)
  return result


def _words(x: np.ndarray) -> np.ndarray:
  """The array's bits as unsigned words (bool and 1- and 2-byte elements one word each)."""
  x = np.ascontiguousarray(x)
  if x.dtype == np.bool_:
    x = x.astype(np.uint8)
  unsigned = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint32}[x.dtype.itemsize]
  return x.view(unsigned).ravel()


def _host_checksum(x: np.ndarray) -> int:
  w = _words(x).astype(np.uint64)  # products and sums wrap mod 2^64, a multiple of 2^32
  weights = np.arange(w.size, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
  with np.errstate(over="ignore"):
    total = int(np.sum(w * weights, dtype=np.uint64)) + int(np.sum(w, dtype=np.uint64)) * _MIX
  return total & 0xFFFFFFFF


@functools.lru_cache(maxsize=None)
def _checksum_program(out_sharding):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  def words(x):
    x = jnp.asarray(x)
    if x.dtype == jnp.bool_:
      x = x.astype(jnp.uint8)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32).ravel()

  def one(x):
    w = words(x)
    weights = jnp.arange(w.size, dtype=jnp.uint32) * jnp.uint32(2) + jnp.uint32(1)
    return jnp.sum(w * weights, dtype=jnp.uint32) + jnp.sum(w, dtype=jnp.uint32) * jnp.uint32(
        _MIX)

  return jax.jit(lambda leaves: jnp.stack([one(x) for x in leaves]), out_shardings=out_sharding)


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


class _QuietOrbax(logging.Filter):
  """Drops Orbax's log lines about a read-only manager, its traceback of a KeyboardInterrupt
  that interrupted its wait (the caller gets the interrupt itself), and, once a failed save has
  been reported (`silenced`), the tracebacks its background threads log while shutting down."""

  silenced = False

  def filter(self, record):
    msg = record.getMessage()
    if self.silenced and "orbax" in record.pathname:
      return False
    if record.exc_info and isinstance(record.exc_info[1], KeyboardInterrupt):
      return False  # a second stop signal during a wait for a save: raised to the caller anyway
    return not ("read only" in msg or "read_only" in msg or _disk_full_record(record)
                # a step folder without its metadata file: reported as damage by this module
                or "Metadata file does not exist" in msg
                # the same, or a step being written or pruned by the run a reader watches
                or "Failed to read Metadata file" in msg
                # Orbax's own metadata (a commit time) damaged: logged with the file's whole
                # text at each of a dozen reads; the step's items are checked by checksums
                or "Failed to json parse Metadata file" in msg)


def _disk_full_record(record) -> bool:
  """A log record of a write that failed for lack of space: Orbax's save raises it again in
  the main thread, where it becomes one DiskFullError line; the background copies are noise."""
  exc = record.exc_info[1] if record.exc_info else None
  return is_disk_full_text(record.getMessage()) or (exc is not None and is_disk_full(exc))


@contextlib.contextmanager
def _quiet():
  """Silences absl/Orbax ERROR logs (tracebacks, TensorStore dumps) while a read may fail."""
  logger = logging.getLogger("absl")
  level = logger.level
  logger.setLevel(logging.CRITICAL)
  try:
    yield
  finally:
    logger.setLevel(level)


class _QuietTensorStoreTasks(logging.Filter):
  """After a failed read, the sibling reads' asyncio tasks are garbage-collected with their
  TensorStore errors 'never retrieved': asyncio logs each with a traceback and the whole
  TensorStore spec. The error this module raises already names the damage; drop those."""

  # TensorStore's errors carry an absl status code first ('OUT_OF_RANGE: Error reading ...')
  _STATUS = re.compile(r"exception=\w+\(['\"](OUT_OF_RANGE|DATA_LOSS|INVALID_ARGUMENT|NOT_FOUND|"
                       r"FAILED_PRECONDITION|UNKNOWN|INTERNAL|UNAVAILABLE|ABORTED):")

  def filter(self, record):
    msg = record.getMessage()
    if _disk_full_record(record):
      return False
    return not ("exception was never retrieved" in msg
                and ("tensorstore" in msg.lower() or self._STATUS.search(msg)))


logging.getLogger("absl").addFilter(_QuietOrbax())
logging.getLogger("asyncio").addFilter(_QuietTensorStoreTasks())


def _drop_closed_loop_reports(previous):
  """After a failed read, TensorStore's pending callbacks hit Orbax's closed asyncio loop and
  each prints 'RuntimeError: Event loop is closed' (dozens of tracebacks, nothing to act on).
  Likewise the array reads still pending when a read failed (a step pruned under a reader,
  which then reads again) each report their own error from a coroutine nobody awaits. This
  hook drops exactly those two; every other unraisable exception is reported as before."""

  def hook(unraisable):
    e = unraisable.exc_value
    if isinstance(e, RuntimeError) and str(e) == "Event loop is closed":
      return
    if getattr(unraisable.object, "__name__", None) == "_read_array_index_and_device_put":
      return
    previous(unraisable)

  hook.infinito_filter = True
  return hook


if not getattr(sys.unraisablehook, "infinito_filter", False):
  sys.unraisablehook = _drop_closed_loop_reports(sys.unraisablehook)


def _while_steps_vanish(fn, tries: int = 20):
  """Runs an Orbax listing of the steps again when a step it saw was deleted before it could
  stat it: a training run prunes superseded steps while evaluate.py reads the folder (Orbax
  then says FileNotFoundError, or NotADirectoryError for a folder removed under its check)."""
  for attempt in range(tries):
    try:
      return fn()
    except (FileNotFoundError, NotADirectoryError):
      if attempt == tries - 1:
        raise
      time.sleep(0.05)


def file_id(path: str) -> tuple[int, int] | None:
  """(device, inode) of the file at `path`, or None where there is none."""
  try:
    st = os.stat(path)
  except OSError:
    return None
  return st.st_dev, st.st_ino


def _saved_by_summary(workdir: str) -> int | None:
  """The last step summary.json says its run saved (it ended: every end saves), or None."""
  try:
    with open(os.path.join(workdir, "summary.json")) as f:
      summary = json.load(f)
    steps = summary["steps"]
    ended = summary["status"] in (COMPLETED, EARLY_STOPPED, INTERRUPTED, STOPPED)
  except (OSError, ValueError, KeyError, TypeError):
    return None
  return steps if ended and isinstance(steps, int) and steps > 0 else None


def runs_in(folder: str) -> list[str]:
  """The run folders directly inside `folder` (sorted paths), for a folder that is not a run."""
  from infinito_jax import lifecycle  # pylint: disable=g-import-not-at-top
  try:
    names = sorted(os.listdir(folder))
  except OSError:
    return []
  paths = [os.path.join(folder, n) for n in names]
  return [p for p in paths if os.path.isdir(p) and lifecycle.holds_run(p)]


def no_checkpoint_yet(workdir: str) -> str:
  """Why a run's workdir holds no checkpoint, and what to do: a run that diverged before its
  first save never will (summary.json says so); otherwise one comes at its next save. A
  study's folder holds runs, not a run."""
  from infinito_jax import lifecycle  # pylint: disable=g-import-not-at-top
  if lifecycle.is_study_folder(workdir):
    runs = os.path.join(workdir, "runs")
    names = runs_in(runs)
    return (f"{workdir} is a study's folder, not a run's: give one of its runs, "
            + (", ".join(names) if names else f"under {runs} (none trained yet)") + ".")
  try:
    with open(os.path.join(workdir, "summary.json")) as f:
      summary = json.load(f)
    diverged = summary.get("status") == DIVERGED and summary.get("diverged", {}).get("step")
  except (OSError, ValueError, AttributeError):
    diverged = None
  if diverged:
    return (f"{workdir} holds no checkpoint: its run diverged at step {diverged} before its "
            "first save (summary.json), so nothing was saved. Train again with train.py "
            "--fresh, with a lower learning rate.")
  return (f"{workdir} has no checkpoint yet: its run saves at the end of each epoch (and "
          "every checkpoint.every_steps); try again then.")


class Checkpointer:
  """Saves and restores the items of a run's steps; keeps the latest and the best step."""

  def __init__(self, workdir: str, *, read_only: bool = False):
    self.workdir = os.path.abspath(workdir)
    self.directory = checkpoint_dir(workdir)
    if read_only and (split := split_run(self.workdir, reader=True)):
      raise CheckpointError(split)  # part of a run: its steps are not all its own
    if read_only and not os.path.isdir(self.directory):
      if os.path.lexists(self.directory) and not os.path.isdir(self.directory):
        raise CheckpointError(f"{self.directory} is not a folder: a run keeps its checkpoints "
                              "in a folder of that name; move that file away and put the run's "
                              "checkpoints folder back (or train again with train.py --fresh).")
      saved = _saved_by_summary(self.workdir)
      if saved:
        raise CheckpointError(f"{self.workdir}'s checkpoints folder is gone: its summary.json "
                              f"says the run saved step {saved} ({self.directory} was deleted "
                              "or moved). Put it back, or train again with train.py --fresh.")
      if os.path.exists(os.path.join(self.workdir, "history.jsonl")) or os.path.exists(
          os.path.join(self.workdir, LOCK_FILE)):
        raise CheckpointError(no_checkpoint_yet(self.workdir))
      runs = runs_in(self.workdir)
      if runs:  # a folder of runs (runs/, a study's runs/): which ones
        raise CheckpointError(
            f"{self.workdir} is not a run but holds {len(runs)} run folder"
            f"{'s' if len(runs) > 1 else ''}: give one of them, "
            + ", ".join(runs[:8]) + (f" (and {len(runs) - 8} more)" if len(runs) > 8 else "")
            + ".")
      raise CheckpointError(f"no checkpoints in {self.directory}: pass the --workdir of a "
                            f"training run (train.py prints it).")
    self.read_only = read_only
    options = ocp.CheckpointManagerOptions(create=not read_only, read_only=read_only)
    self.manager = _while_steps_vanish(lambda: ocp.CheckpointManager(
        self.directory, options=options, item_names=ITEMS))
    self._last: int | None = None  # the step of the last save started
    self._keep: set[int] = set()  # what to keep once it is on disk: it and the best
    self._failed = False  # a save failed: nothing more is waited for or deleted
    self._lock = os.path.join(self.workdir, LOCK_FILE)  # held by train.py while it writes
    # which file: a lock removed and made anew is another (train.py holds its lock open, so
    # its inode is not reused while the run lives); the one this process took, where it took
    # one (a lock removed during start-up, before this, counts too)
    self._lock_id = HELD_LOCKS.get(self.workdir) or file_id(self._lock)

  def steps(self) -> list[int]:
    """Committed steps, oldest first (a save in progress is not listed)."""
    if self.read_only:  # another process may be writing: look at the disk again
      _while_steps_vanish(self.manager.reload)
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    steps = self.steps()
    return steps[-1] if steps else None

  def path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  # ----- writing -----

  def save(self, step: int, *, arrays: dict[str, Any], jsons: dict[str, dict],
           keep: set[int], wait: bool = False) -> None:
    """Saves `step` (asynchronously unless `wait`); then only the steps in `keep` (this one
    and the best of each replica) are kept.

    The previous latest is deleted only once this save is on disk (checked at the next save,
    `wait()` or `close()`), so a crash or a failed save at any moment leaves a complete latest
    and the best.
    """
    self.wait()  # the previous save is committed (or its error is raised here)
    if "progress" in jsons:  # written with the arrays, checked when they are read back
      jsons = {**jsons, "progress": {**jsons["progress"], "checksums": checksums(arrays)}}
      if "meta" in jsons:  # and the JSON items vouch for each other (_JSON_DIGESTS)
        progress = {**jsons["progress"], "meta_sha256": json_digest(jsons["meta"])}
        jsons = {**jsons, "progress": progress,
                 "meta": {**jsons["meta"], "progress_sha256": json_digest(progress)}}
    with self._disk_full_is_an_error(step), uninterruptible():
      self.manager.save(step, args=ocp.args.Composite(
          **{k: ocp.args.StandardSave(v) for k, v in arrays.items()},
          **{k: ocp.args.JsonSave(v) for k, v in jsons.items()}), force=True)
      self._last, self._keep = step, {step} | set(keep)  # (before a held-back interrupt)
    if wait:
      self.wait()

  def wait(self) -> None:
    """Blocks until the last save is done; once it is on disk, deletes what it superseded."""
    with self._disk_full_is_an_error(self._last):
      self.manager.wait_until_finished()
    if self._last is not None:  # every process sees the same committed folders below
      distributed.barrier("infinito:save_committed")
    if self._last is not None and os.path.isdir(self.path(self._last)):
      self._prune(self._keep)

  def close(self, failing: bool = False) -> None:
    """Waits for the save in flight, then closes. `failing`: the run is ending on an error
    already (which says what happened), so a save that cannot finish is one warning line, not
    a second traceback chained to the first."""
    try:
      if not self.read_only and not self._failed:
        try:
          self.wait()
        except Exception as e:  # pylint: disable=broad-except
          if not failing:
            raise
          self._failed = True
          _QuietOrbax.silenced = True
          print(f"warning: the checkpoint save in progress did not finish ({short(e)}); "
                "the steps saved before it are intact.", file=sys.stderr)
    finally:
      with contextlib.suppress(Exception) if self._failed else contextlib.nullcontext():
        self.manager.close()

  def workdir_removed(self) -> bool:
    """Whether the workdir was removed under the run (rm -rf) or its lock replaced: its
    checkpoints folder is gone, or the lock it was opened with is no longer the file at that
    path (removed, or removed and made anew by another train.py, which then holds it: Orbax's
    threads may make folders again, and a second writer makes a new lock file)."""
    return not os.path.isdir(self.directory) or (
        self._lock_id is not None and file_id(self._lock) != self._lock_id)

  def lost_message(self, doing: str) -> str:
    """The error of a run whose workdir_removed(): what happened, while it did `doing`."""
    if self.lock_replaced():
      return (f"the lock file of the workdir {self.workdir} was removed and another process "
              f"took a new one while this run {doing}: that process may be writing there now, "
              "so this run stops and writes nothing more (its steps since its last save are "
              "lost; what it saved is there). One train.py per workdir: do not delete .lock.")
    return (f"the workdir {self.workdir} (or its lock file) was removed while this run "
            f"{doing}: nothing more can be saved there. Restore it from a copy, or start again.")

  def unwritable_message(self) -> str:
    return (f"cannot write in {self.directory} any more (a read-only disk, or no permission): "
            "it became read-only or unwritable while this run used it. The checkpoints saved "
            "before are intact; make it writable and run the same command again to resume.")

  def lock_replaced(self) -> bool:
    """Whether another file now holds the lock's path (a second process's lock)."""
    now = file_id(self._lock)
    return self._lock_id is not None and now is not None and now != self._lock_id

  def abandon(self) -> None:
    """The run cannot save here any more (its folder was removed): a save in flight is left to
    fail quietly, and close() waits for nothing it could finish."""
    self._failed = True
    _QuietOrbax.silenced = True

  def keep_only(self, steps: set[int]) -> None:
    """Deletes every committed step not in `steps` (a resumed run's leftovers)."""
    self._keep = set(steps)
    self._prune(self._keep)

  def _prune(self, keep: set[int]) -> None:
    """Deletes the steps not in `keep`, but not one a reader is reading (a later prune does)."""
    if not keep:
      return
    for s in self.steps():
      # a step Orbax lists but has not committed (a save an interrupt cut short in a library
      # call) is not deleted under its writing threads
      if s not in keep and os.path.isdir(self.path(s)):
        with self._deletable(s) as free:
          if free:
            try:
              self.manager.delete(s)
            except (FileNotFoundError, NotADirectoryError):
              if self.workdir_removed():  # rm -rf of the workdir while this run pruned
                self.abandon()
                raise WorkdirLostError(self.lost_message("deleted an old step")) from None
              # else the step went away by itself (another hand): nothing left to delete
            except OSError as e:
              if not is_unwritable(e):
                raise
              self.abandon()
              raise WorkdirError(self.unwritable_message()) from None

  def _pin_path(self, step: int) -> str:
    return os.path.join(self.workdir, READERS_DIR, str(step))

  def _open_pin(self, step: int) -> int:
    """The file descriptor of `step`'s pin file, made if need be (OSError where it cannot be)."""
    os.makedirs(os.path.dirname(self._pin_path(step)), exist_ok=True)
    return os.open(self._pin_path(step), os.O_RDWR | os.O_CREAT, 0o666)

  @contextlib.contextmanager
  def _deletable(self, step: int):
    """Yields whether `step` may be deleted now: no reader pins it (see `pinned`). Where it
    may, no reader can pin it until it is deleted (its pin file is locked, then removed)."""
    fd, free = None, True
    if distributed.is_primary():  # one host's readers, one decision for every process
      try:
        fd = self._open_pin(step)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        free = False
      except OSError:  # no pin file can be made here: no reader could have made one either
        pass
    if distributed.active():
      free = not distributed.any_process(not free)
    try:
      yield free
      if free and fd is not None:
        with contextlib.suppress(OSError):
          os.remove(self._pin_path(step))
    finally:
      if fd is not None:
        os.close(fd)

  @contextlib.contextmanager
  def pinned(self, steps):
    """Keeps a run training in this workdir from deleting `steps` while they are read: a
    shared lock on WORKDIR/.readers/STEP, which the run's prune will not take (it deletes the
    step at a later save). Best effort where the workdir is not writable.

    Raises:
      StepVanishedError: a step was deleted before it was pinned (choose again).
    """
    fds = []
    try:
      for s in sorted(set(steps)):
        with contextlib.suppress(OSError):
          fd = self._open_pin(s)
          fds.append(fd)
          fcntl.flock(fd, fcntl.LOCK_SH)  # waits while the run deletes it
        if not os.path.isdir(self.path(s)):
          with contextlib.suppress(OSError):  # no one can pin what is gone: no file left
            os.remove(self._pin_path(s))
          raise StepVanishedError(f"no checkpoint for step {s} in {self.directory} (the run "
                                  "training there replaced it); available: "
                                  f"{self.steps() or 'none'}.")
      yield
    finally:
      for fd in fds:
        os.close(fd)

  def remove_tmp(self) -> list[str]:
    """Deletes the temporary folders of saves that a killed process left; returns their names."""
    removed = []
    if os.path.isdir(self.directory):
      for name in os.listdir(self.directory):
        if TMP_MARK in name:
          if distributed.is_primary():  # one process deletes; all of them saw the names
            shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
          removed.append(name)
    distributed.barrier("infinito:removed_tmp")
    if removed or distributed.active():
      self.manager.reload()
    return removed

  def move_aside(self, step: int) -> str:
    """Moves a damaged step out of the checkpoints folder (kept for inspection)."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    dest = os.path.join(self.workdir, DAMAGED_DIR, f"{step}-{stamp}")
    if distributed.is_primary():
      os.makedirs(os.path.dirname(dest), exist_ok=True)
      os.replace(self.path(step), dest)
    distributed.barrier("infinito:moved_aside")
    self.manager.reload()
    return dest

  @contextlib.contextmanager
  def _disk_full_is_an_error(self, step: int | None):
    try:
      yield
    except InfinitoError:
      self._failed = True
      raise
    except Exception as e:  # Orbax wraps the OSError of its writer threads
      self._failed = True
      if self.workdir_removed():
        self.abandon()
        raise WorkdirLostError(self.lost_message(
            f"saved{f' step {step}' if step is not None else ''}")) from None
      if is_unwritable(e) and not is_disk_full(e):
        self.abandon()
        raise WorkdirError(self.unwritable_message()) from None
      if not is_disk_full(e):
        raise
      intact = [s for s in self.steps() if s != step]
      _QuietOrbax.silenced = True  # the message below says it all; Orbax's threads may repeat it
      if step is not None and distributed.is_primary():
        # the half-written step is discarded at the next start anyway; gone now, its space
        # lets the run's last words (summary.json: 'aborted') reach the disk
        for partial in glob.glob(os.path.join(glob.escape(self.directory),
                                              f"{step}.orbax-checkpoint-tmp*")):
          shutil.rmtree(partial, ignore_errors=True)
      raise DiskFullError(
          f"no space left on the device of {self.directory} while saving"
          f"{f' step {step}' if step is not None else ''}. The checkpoints saved before are "
          f"intact ({intact or 'none yet'}); free space (df -h {self.workdir}) and run the same "
          "command again to resume.") from None

  # ----- reading -----

  def _check_step(self, step: int) -> None:
    if step not in self.steps():
      raise CheckpointError(f"no checkpoint for step {step} in {self.directory}; "
                            f"available: {self.steps() or 'none'}.")

  def read_json(self, step: int, item: str) -> dict:
    """One JSON item of `step` (cheap: no arrays are read), checked against the digest the
    step's other JSON item holds of it (where that item reads: otherwise it cannot vouch).

    Raises:
      CheckpointError: the step does not exist, or the item is missing, not valid JSON, or
        other than written (its digest differs).
    """
    out = self._read_json(step, item)
    if item in _JSON_DIGESTS:
      partner, key = _JSON_DIGESTS[item]
      try:
        saved = self._read_json(step, partner).get(key)
      except CheckpointError:
        saved = None
      # meta's digest was taken before progress's was added to it
      mine = {k: v for k, v in out.items() if k != "progress_sha256"} if item == "meta" else out
      if saved is not None and saved != json_digest(mine):
        raise CheckpointError(f"checkpoint {self.path(step)}/{item} differs from the digest "
                              f"written with it (in {partner}): the file was changed on disk, "
                              "it is damaged.")
    return out

  def _read_json(self, step: int, item: str) -> dict:
    self._check_step(step)
    try:
      with _quiet():
        out = self.manager.restore(step, args=ocp.args.Composite(
            **{item: ocp.args.JsonRestore()}))[item]
      if not isinstance(out, dict):
        raise ValueError(f"holds {type(out).__name__}, not a JSON object")
      return dict(out)
    except Exception as e:
      raise CheckpointError(f"checkpoint {self.path(step)}/{item} cannot be read "
                            f"({short(e)}): it is damaged.") from None

  def restore_arrays(self, step: int, targets: dict[str, Any],
                     progress: dict | None = None) -> dict[str, Any]:
    """Restores the array items named in `targets` into their shapes, dtypes and shardings,
    and checks them against the checksums saved with them.

    Args:
      step: the step to read.
      targets: {item: abstract pytree (jax.ShapeDtypeStruct leaves with shardings)}; items
        not named are not read (evaluation reads params and memory only).
      progress: the step's `progress` item where the caller has read it already (it holds the
        checksums); read here otherwise.

    Raises:
      CheckpointError: an item is missing, unreadable, or of other shapes than asked.
    """
    import jax  # pylint: disable=g-import-not-at-top
    self._check_step(step)
    try:
      with _quiet():
        out = self.manager.restore(step, args=ocp.args.Composite(
            **{k: ocp.args.StandardRestore(v) for k, v in targets.items()}))
    except Exception as e:
      raise CheckpointError(f"checkpoint {self.path(step)} cannot be restored ({short(e)}): "
                            "it is damaged, or it was written for another model "
                            "config.") from None
    result = {}
    for item, target in targets.items():
      got = out[item]
      for (p, want), leaf in zip(jax.tree_util.tree_leaves_with_path(target),
                                 jax.tree_util.tree_leaves(got)):
        if tuple(want.shape) != tuple(leaf.shape):
          raise CheckpointError(f"checkpoint {self.path(step)}/{item}: "
                                f"{jax.tree_util.keystr(p)} has shape {tuple(leaf.shape)}, "
                                f"the config needs {tuple(want.shape)}.")
      result[item] = got
    self._verify(step, result, progress)
    return result

  def _verify(self, step: int, items: dict[str, Any], progress: dict | None = None) -> None:
    """Compares restored arrays with the checksums saved with them (a step saved before
    checksums existed has none: nothing to compare)."""
    if progress is None:
      progress = self.read_json(step, "progress")
    saved = progress.get("checksums") or {}
    if not saved:
      return
    now = checksums({k: v for k, v in items.items() if k in saved})
    for item, sums in now.items():
      bad = [name for name, v in sums.items() if name in saved[item] and saved[item][name] != v]
      if bad:
        raise CheckpointError(
            f"checkpoint {self.path(step)}/{item}: {', '.join(bad[:3])}"
            f"{f' and {len(bad) - 3} more' if len(bad) > 3 else ''} "
            f"{'differs' if len(bad) == 1 else 'differ'} from the checksum"
            f"{'' if len(bad) == 1 else 's'} written with {'it' if len(bad) == 1 else 'them'}: "
            "the files are damaged.")

  def read_meta(self, step: int) -> dict:
    """The meta item of `step`, refusing layouts of other versions."""
    meta = self.read_json(step, "meta")
    if meta.get("format") != FORMAT:
      raise IncompatibleCheckpointError(
          f"checkpoint {self.path(step)} has layout version {meta.get('format', 1)}, this "
          f"version reads version {FORMAT}; retrain in a new --workdir (or with --fresh).")
    return meta


def dump_json(path: str, obj) -> None:
  """Writes JSON atomically (write_atomically); a full disk is an error."""
  def write(tmp):
    with open(tmp, "w") as f:
      json.dump(obj, f, indent=1)

  try:
    write_atomically([(path, write)])
  except OSError as e:
    if is_disk_full(e):
      raise DiskFullError(f"no space left on the device to write {path}: free space and run "
                          "again; nothing saved before is lost.") from None
    raise CheckpointError(f"cannot write {path} ({e.strerror}); choose a path you can write "
                          "to.") from None
