"""The life of a run around its steps: its progress record, stop signals, and the workdir lock.

Nothing here imports jax, so train.py installs the signal handlers before the slow imports:
SIGINT, SIGTERM or SIGHUP at any moment (start-up and the first compilation included) asks for a
clean stop instead of killing the process.
"""

import contextlib
import dataclasses
import datetime
import errno
import fcntl
import json
import os
import signal
import socket
import sys
import tempfile
import threading
import math
import time

from infinito_jax.errors import DiskFullError, WorkdirBusyError, WorkdirError, is_disk_full

# Why a run stopped; the summary's `status`.
COMPLETED = "completed"  # all train.epochs done
EARLY_STOPPED = "early_stopped"  # train.patience epochs without a better validation loss
INTERRUPTED = "interrupted"  # SIGINT / SIGTERM: the step finished and was saved
STOPPED = "stopped"  # train.stop_after_steps reached
ABORTED = "aborted"  # a second signal: the process ended at once; the checkpoints say where
DIVERGED = "diverged"  # a NaN or inf loss, gradient norm or weights: the error ended the run
LOCK_FILE = ".lock"


@dataclasses.dataclass
class ReplicaRecord:
  """One replica's validation progress: its best loss and step, and its patience count."""
  seed: int = 0  # the seed whose single run this replica equals
  best_val_loss: float | None = None  # lowest validation loss seen
  best_step: int | None = None  # the step whose checkpoint holds it (always kept)
  epochs_without_improvement: int = 0  # epoch ends since the best improved (early stopping)
  # train.on_divergence='freeze': where its training diverged ({"step", "what", "value"}: the
  # step whose loss or gradient norm was not finite); it trains no more, keeping its weights
  # from before that step
  diverged: dict | None = None

  def observe(self, step: int, val_loss: float, *, epoch_end: bool,
              steps_per_epoch: int) -> bool:
    """Takes a validation loss measured after `step` steps; returns True if it is the best.

    Patience counts epochs, as the original: an epoch end with no better loss since the
    previous epoch end (evaluations inside the epoch included) adds one.
    """
    # a NaN or inf loss is no best (finite weights can give one just before a divergence)
    improved = math.isfinite(val_loss) and (self.best_val_loss is None
                                            or val_loss < self.best_val_loss)
    if improved:
      self.best_val_loss, self.best_step = float(val_loss), step
    if epoch_end:
      improved_this_epoch = self.best_step is not None and self.best_step > step - steps_per_epoch
      self.epochs_without_improvement = (0 if improved_this_epoch
                                         else self.epochs_without_improvement + 1)
    return improved


@dataclasses.dataclass
class RunRecord:
  """A run's progress, saved with every checkpoint: the loop resumes from it, nothing else.

  A run trains a population of `len(replicas)` replicas (1 by default) for the same steps;
  each keeps its own best validation loss, best step and patience. Early stopping: the run
  stops when every replica has run out of patience (a replica that stopped improving earlier
  keeps its best checkpoint, so nothing it reached is lost).
  The data position is not stored: batch `step` is (epoch, index) = divmod(step, steps_per_epoch).
  """
  step: int = 0  # optimizer steps taken: the checkpoint's step
  replicas: list = dataclasses.field(default_factory=lambda: [ReplicaRecord()])
  stop_reason: str | None = None  # why the last process stopped (one of the names above)
  wall_time_s: float = 0.0  # seconds spent by the processes of the run, up to this step
  wandb_run_id: str | None = None  # the W&B run this run logs into (log.wandb_project)

  @classmethod
  def new(cls, seeds) -> "RunRecord":
    return cls(replicas=[ReplicaRecord(seed=int(s)) for s in seeds])

  def observe(self, step: int, val_losses, *, epoch_end: bool,
              steps_per_epoch: int) -> list[bool]:
    """One validation loss per replica; returns which replicas improved on their best. A
    replica frozen by a divergence is not validated any more: its loss is ignored (its best,
    patience and last validation stay those of before)."""
    if len(val_losses) != len(self.replicas):
      raise ValueError(f"{len(val_losses)} losses for {len(self.replicas)} replicas")
    return [r.diverged is None and r.observe(step, loss, epoch_end=epoch_end,
                                             steps_per_epoch=steps_per_epoch)
            for r, loss in zip(self.replicas, val_losses)]

  @property
  def best(self) -> ReplicaRecord | None:
    """The replica with the lowest validation loss (None before any validation), among those
    still training where any is (a frozen one's weights after its best may be broken: the
    run's best, which evaluate.py and export take by default, is one that trained on)."""
    seen = [r for r in self.training() if r.best_val_loss is not None]
    return min(seen, key=lambda r: r.best_val_loss) if seen else None

  @property
  def best_replica(self) -> int | None:
    best = self.best
    return None if best is None else self.replicas.index(best)

  def best_steps(self) -> set[int]:
    """The steps that hold some replica's best: their checkpoints are kept."""
    return {r.best_step for r in self.replicas if r.best_step is not None}

  def out_of_patience(self, patience: int) -> bool:
    """Every replica that still trains has run out of patience (a frozen one never improves
    again: it does not keep the others training)."""
    return all(r.epochs_without_improvement >= patience for r in self.training())

  def training(self) -> list[ReplicaRecord]:
    """The replicas not frozen by a divergence (all of them where none diverged)."""
    return [r for r in self.replicas if r.diverged is None] or self.replicas

  def done(self, total_steps: int, patience: int) -> str | None:
    """Why the run has nothing left to do under this config, or None (all epochs done comes
    first: then raising patience would not help)."""
    if self.step >= total_steps:
      return COMPLETED
    if self.out_of_patience(patience):
      return EARLY_STOPPED
    return None

  def to_json(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, d: dict) -> "RunRecord":
    known = {f.name for f in dataclasses.fields(cls)}
    d = {k: v for k, v in d.items() if k in known}
    d["replicas"] = [ReplicaRecord(**r) for r in d.get("replicas", [{}])]
    return cls(**d)


class StopRequested(Exception):
  """A stop signal arrived where there is nothing to save (StopSignals.idle_raises, or a
  one-process run's start-up: train_and_evaluate). Its argument is the signal's name."""


_uninterruptible = 0  # depth of uninterruptible() blocks
_deferred: list[str] = []  # a second signal that came inside one: raised at its end


@contextlib.contextmanager
def uninterruptible():
  """Holds back the KeyboardInterrupt of a second stop signal (a library call, no hard abort)
  until the block ends: Orbax starting a save must not be cut short (it leaves its threads,
  its event loop and a half-registered step behind). The process's own errors pass."""
  global _uninterruptible
  _uninterruptible += 1
  try:
    yield
  finally:
    _uninterruptible -= 1
    name = None
    if not _uninterruptible:
      name = _deferred[0] if _deferred else None
      _deferred.clear()
  if name:  # (not reached where the block raised: its error is the one to report)
    raise KeyboardInterrupt(f"second stop signal ({name})")


class StopSignals:
  """SIGINT, SIGTERM and SIGHUP (a closed terminal or ssh session) ask the run to stop after the
  current step (which is then saved).

  Before the step loop (`training` False: start-up, nothing new to save) the process stops at
  its next check; with `hard_abort`, if start-up has not reached one `startup_grace_s` after
  the signal (a long restore or initialisation), it exits there with code 0. With
  `idle_raises` (a study, between and after its runs) a signal outside a step loop makes
  `check()` raise StopRequested: the study calls it between the pieces of its work.

  A second signal aborts without saving that step; what was saved before stays. With
  `hard_abort` (train.py) the process ends at once with exit code 130 (os._exit: no teardown,
  which can crash while XLA compiles or Orbax writes); without it (a notebook, a library
  call) KeyboardInterrupt is raised instead. Use as a context manager; outside the main thread
  it does nothing.

  Python runs a handler only between the main thread's bytecodes, so during a long call into
  C (a restore, a save, a data load) a signal waits, and two signals would reach it as one.
  With `hard_abort` a thread also counts the deliveries (the C-level handler writes a byte per
  signal to the wakeup fd): a signal the handler has not taken within a second is acknowledged
  at once, and a second one aborts at once, whatever the main thread is doing.

  Once the loop has saved its last step (`ended` holds the run's status), a signal only hurries
  the exit: the summary is written, and a second signal exits at once with that status, not
  `aborted`, and with train.py's exit code for it (0), not 130.
  """

  SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
  # what resumes the run, in the messages ("the command again without --fresh", where it had it)
  again = "the same command again"

  @property
  def aborted_message(self) -> str:
    return ("Aborted by a second signal: the checkpoints already on disk are intact; a save "
            f"in progress is discarded. Run {self.again} to resume.")

  def __init__(self, hard_abort: bool = False, idle_raises: bool = False,
               startup_grace_s: float = 10.0):
    self.requested: str | None = None  # the name of the first signal received
    self._training = False
    self._lock = threading.Lock()
    self.hard_abort = hard_abort
    self.idle_raises = idle_raises
    self.startup_grace_s = startup_grace_s
    self.summary_path: str | None = None  # set by the loop: marked `aborted` on a hard abort
    self.ended: str | None = None  # set by the loop once its last step is saved: its status
    # set by the caller during start-up: undoes what the start made (a new run's workdir with
    # its lock file) before a hard exit there (the watchdog's, a second signal's)
    self.before_hard_exit = None
    self._previous = {}
    self._handled = 0  # signals the handler has taken (the counting thread compares)
    self._order: list[str] = []  # the names of the signals delivered, in order (the thread's)
    self._aborting = False
    self._abort_lock = threading.Lock()  # not _lock: the handler may run while _lock is held
    self._wakeup = None  # (reader, writer, the wakeup fd before) while the thread counts
    self._quiet = False  # said_by_caller: the first signal's line is the caller's
    self._unsaid: str | None = None  # a first signal taken quietly, not said yet
    self._noted = False  # the counting thread said a first signal (a long call was under way)

  @property
  def training(self) -> bool:
    """Set when the step loop starts: decides what a signal means."""
    return self._training

  @training.setter
  def training(self, value: bool) -> None:
    with self._lock:  # the start-up watchdog below never exits once the loop has begun
      self._training = value

  def _startup_watchdog(self) -> None:
    time.sleep(self.startup_grace_s)
    from infinito_jax import distributed  # pylint: disable=g-import-not-at-top
    with self._lock:
      if self._training or distributed.active():  # processes stop together, at their checks
        return
      print(f"{'The study' if self.idle_raises else 'Start-up'} did not reach a stopping point "
            f"within {self.startup_grace_s:g} s of {self.requested}: exiting now (nothing new "
            "was saved).", file=sys.stderr, flush=True)
      sys.stdout.flush()
      self._undo_start()
      distributed.release_claim()
      os._exit(0)  # pylint: disable=protected-access

  def install(self) -> "StopSignals":
    try:
      for s in self.SIGNALS:
        self._previous[s] = signal.signal(s, self._handle)
    except ValueError:  # not the main thread: leave the handlers alone
      self._previous = {}
      return self
    if self.hard_abort:
      self._start_counting()
    return self

  def uninstall(self) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous = {}
    self._stop_counting()

  def _start_counting(self) -> None:
    if self._wakeup is not None:
      return
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    try:
      before = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    except (ValueError, OSError):
      reader.close()
      writer.close()
      return
    self._wakeup = (reader, writer, before)
    threading.Thread(target=self._count, args=(reader,), name="infinito-signals",
                     daemon=True).start()

  def _stop_counting(self) -> None:
    if self._wakeup is None:
      return
    reader, writer, before = self._wakeup
    self._wakeup = None
    with contextlib.suppress(ValueError, OSError):
      signal.set_wakeup_fd(before)
    for sock in (writer, reader):  # the thread's recv fails and it ends
      with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
      sock.close()

  def _count(self, reader: socket.socket) -> None:
    """The counting thread: acknowledges a signal the handler has not taken within a second,
    and aborts on a second delivery the handler has not taken within 0.3 s."""
    ours = {int(s) for s in self.SIGNALS}
    waiting_since, told = None, 0
    reader.settimeout(0.1)
    while True:
      try:
        data = reader.recv(64)
        if not data:
          return  # closed: uninstalled
      except socket.timeout:
        data = b""
      except OSError:
        return
      for byte in data:  # a signal whose handler is no longer ours (ignored at exit) is not
        if byte in ours and signal.getsignal(byte) == self._handle:  # this object's business
          name = signal.Signals(byte).name
          self._order.append(name)
      delivered = len(self._order)
      if delivered <= self._handled:
        waiting_since = None
        continue
      waiting_since = waiting_since or time.monotonic()
      waited = time.monotonic() - waiting_since
      if delivered >= 2 and waited >= 0.3:
        self._abort(name)
      if self._handled == 0 and waited >= 1.0 and told < delivered:
        told, self._noted = delivered, True
        print(f"\n{name} received while a long call is under way (a restore, a save, a "
              "compilation): it takes effect when that returns (send it again, or Ctrl-C, to "
              "abort at once).", file=sys.stderr, flush=True)

  def ignore(self) -> None:
    """The work is done: signals during the interpreter's exit are ignored (no tracebacks)."""
    self._previous = {}
    for s in self.SIGNALS:
      with contextlib.suppress(ValueError):
        signal.signal(s, signal.SIG_IGN)

  def _abort(self, name: str) -> None:
    """The second signal with `hard_abort`: exit 130 now (from the handler or the counting
    thread, whichever comes first; the other finds it under way). Where the run had ended
    (its last step saved) the exit code is 0, as the first signal's exit would have been: the
    summary says that status, and the two must agree (a scheduler reads the code). With several
    processes the others exit with the same code (the last save was collective: all saved)."""
    with self._abort_lock:
      if self._aborting:
        return
      self._aborting = True
    first = f"{self._unsaid} and then {name} received. " if self._unsaid else ""  # unsaid yet
    aborted = (self.aborted_message if self.training else
               "Aborted by a second signal during start-up: nothing was changed."
               if self._quiet else  # said_by_caller's block
               "Aborted by a second signal during start-up: no step was trained, and what was "
               "saved before is intact.")
    print("\n" + (f"Exiting at once: the run had ended ({self.ended}) and its last step "
                  "was saved; nothing is lost." if self.ended else first + aborted),
          file=sys.stderr, flush=True)
    sys.stdout.flush()
    if self.training or self.ended:  # a start-up changed no status: summary.json stays
      self.mark_aborted()
    else:
      self._undo_start()
    from infinito_jax import distributed  # pylint: disable=g-import-not-at-top
    code = 0 if self.ended else 130
    if distributed.active():  # the other processes stop too, told why, with the same code
      distributed.exit_with_error(
          f"process {distributed.process_index()} exited at once on a second stop signal "
          f"({name}) after the run had ended ({self.ended}) and was saved; nothing is lost."
          if self.ended else f"process {distributed.process_index()} was aborted by a second "
          f"stop signal ({name}); {self.aborted_message}", code)
    distributed.release_claim()
    os._exit(code)  # pylint: disable=protected-access

  def _undo_start(self) -> None:
    """Runs `before_hard_exit` (best effort: the process is about to end anyway)."""
    if self.before_hard_exit is not None:
      with contextlib.suppress(Exception):
        self.before_hard_exit()

  def _handle(self, signum, frame):
    del frame
    if self._aborting:  # the counting thread is ending the process: nothing more to say
      return
    name = signal.Signals(signum).name
    if self._handled < len(self._order):  # Python runs pending handlers by signal number:
      name = self._order[self._handled]  # the counting thread saw the order they came in
    self._handled += 1
    if self.requested:
      if self.hard_abort:
        self._abort(name)
        while True:  # the counting thread is exiting the process
          time.sleep(1)
      if _uninterruptible:
        _deferred.append(name)
        return
      raise KeyboardInterrupt(f"second stop signal ({name})")
    self.requested = name
    if self._quiet:
      self._unsaid = name
      return
    self._acknowledge(name)

  @contextlib.contextmanager
  def said_by_caller(self):
    """For a start-up step that changes nothing (a multi-process run's join). A first signal
    inside the block is taken without the handler's line: the caller polls `requested` and says
    (and does) what it means there, e.g. leaving at once with its own line; a second one aborts
    saying that nothing was changed. One that came as the block ended, which the caller did not act
    on, is said when the block ends, unless the counting thread said it already (it came
    during a long call)."""
    self._quiet = True
    try:
      yield self
    finally:
      self._quiet = False
      name, self._unsaid = self._unsaid, None
      if name and not self._noted:
        self._acknowledge(name)

  def _acknowledge(self, name: str) -> None:
    """The handler's line for a first stop signal, and the start-up watchdog where it applies."""
    if self.idle_raises and not self.training:
      print(f"\n{name} received: stopping at the next check (nothing new to save; send it "
            "again, or Ctrl-C, to abort at once).", file=sys.stderr, flush=True)
      if self.hard_abort:  # a run's start-up (restore, compilation) can keep the check away
        threading.Thread(target=self._startup_watchdog, daemon=True).start()
      return  # not raised here: XLA's and the garbage collector's callbacks would swallow it
    # a library call (no hard_abort: a notebook's) returns where a command exits
    then = "then exiting" if self.hard_abort else "then returning"
    what = (f"the run has ended ({self.ended}) and is saved: writing its summary, {then}"
            if self.ended else
            f"finishing this step, saving a checkpoint, {then}" if self.training else
            "stopping before training starts (nothing new to save)")
    print(f"\n{name} received: {what} (send it again, or Ctrl-C, to abort at once).",
          file=sys.stderr, flush=True)
    if self.hard_abort and not self.training:
      threading.Thread(target=self._startup_watchdog, daemon=True).start()

  def check(self) -> None:
    """Raises StopRequested where a signal asked to stop outside a run's steps (idle_raises):
    called by the study between the pieces of its work, never from the handler itself."""
    if self.idle_raises and self.requested and not self.training:
      raise StopRequested(self.requested)

  def mark_aborted(self, status: str | None = None, base: dict | None = None,
                   **fields) -> None:
    """summary.json's status becomes `status` (`aborted`), or the run's status where it had
    ended (its other fields stay: they describe the last evaluation, which the checkpoints
    hold), with `fields` added; a summary that cannot be rewritten stays as it is. `base`: the
    summary to write in place of the file's (the run's record at the error: replicas frozen
    since the last evaluation, and the best and the statistics over those still training).
    On a second signal, on an error (DIVERGED for a non-finite loss) and on process 0 when
    another process's error stops it."""
    if not self.summary_path:
      return
    try:
      if base is not None and not self.ended:
        summary = dict(base)
      else:
        with open(self.summary_path) as f:
          summary = json.load(f)
        if not isinstance(summary, dict):  # not a summary's JSON (edited by hand): its status
          summary = {}
      summary["status"] = self.ended or status or ABORTED
      if not self.ended:
        summary.update(fields)

      def write(tmp):
        with open(tmp, "w") as f:
          json.dump(summary, f, indent=1)  # as checkpoint.dump_json (no orbax imported here)

      try:
        write_atomically([(self.summary_path, write)])
      except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
          raise
        # a full disk (what often ends such a run) has no room for the new file beside the
        # old: the status is a few bytes, so rewrite it in place where it is no longer
        text = json.dumps(summary, indent=1).encode()
        with open(self.summary_path, "r+b") as f:
          if len(text) <= os.fstat(f.fileno()).st_size:
            f.write(text)
            f.truncate()
    except (OSError, ValueError):
      pass

  def __enter__(self):
    return self.install()

  def __exit__(self, *exc):
    self.uninstall()


def write_atomically(files) -> None:
  """For each (path, write) of `files`, write(tmp) to a new temporary file beside `path` (a
  name of its own, from mkstemp: a user's `<path>.tmp` is never touched, and two writers of
  one path never share one); once every write succeeded, renames each over its path in order:
  a crash or a failed write leaves every path as it was. The files get the permissions a
  plain open() would give (mkstemp's are the owner's alone)."""
  umask = os.umask(0)
  os.umask(umask)
  temps = []
  try:
    for path, write in files:
      fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp",
                                 dir=os.path.dirname(os.path.abspath(path)))
      os.close(fd)
      temps.append(tmp)
      write(tmp)
      os.chmod(tmp, 0o666 & ~umask)
    for (path, _), tmp in zip(files, temps):
      os.replace(tmp, path)
  finally:
    for tmp in temps:
      if os.path.exists(tmp):
        os.remove(tmp)


def check_writable(*folders: str) -> None:
  """Refuses, before anything is written, a folder the run could not write in (read-only,
  another owner's, a full disk): one line naming it, instead of a traceback at the first
  history record or Orbax waiting minutes for a checkpoint folder it cannot make."""
  import tempfile  # pylint: disable=g-import-not-at-top
  for folder in folders:
    if not os.path.isdir(folder):
      continue
    try:
      fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=folder)
      try:
        os.write(fd, b"x")
      finally:
        os.close(fd)
        os.remove(probe)
    except OSError as e:
      if is_disk_full(e):
        raise DiskFullError(f"no space left on the device of {folder}: free space and run "
                            "again; nothing saved before is lost.") from None
      raise WorkdirError(f"cannot write in {folder} ({e.strerror}): make it writable (e.g. "
                         "chmod u+w) or choose another --workdir; nothing was changed.") from None


RUN_FILES = ("config.json", "history.jsonl", "summary.json")
# what a run, its readers and the project's tools make in its workdir (evaluate.py's reports
# eval_*.json, export's exported/, plot's PNGs, a write's temporary .NAME.*.tmp): --fresh moves
# these aside, and refuses to move anything else
# where a move of the workdir's run (--fresh's move aside, or its undoing) is going: written
# before the first entry moves, removed after the last; one found means a move was killed
MOVE_NOTE = ".moving"
RUN_MADE = RUN_FILES + (LOCK_FILE, MOVE_NOTE, "checkpoints", "damaged_checkpoints", ".readers",
                        "tensorboard", "profile", "exported", "wandb", "curves.png",
                        "compare.png")


def not_made_by_a_run(workdir: str) -> list[str]:
  """The entries of `workdir` that no run (nor evaluate.py, export or plot) makes there: a
  user's own files, or a folder that is not a run's (the current folder, a project)."""
  import re  # pylint: disable=g-import-not-at-top
  return [e for e in sorted(os.listdir(workdir)) if e not in RUN_MADE
          and not re.fullmatch(r"eval_.+\.json|\..+\.tmp", e)]


def check_run_files(workdir: str, profile: bool = False, tensorboard: bool = False,
                    before: set[str] | None = None) -> None:
  """Refuses, before anything is trained, a workdir where one of the run's files is not a
  regular file (a folder named summary.json, a FIFO), or its checkpoints folder (with
  `profile`, train.profile_steps set, its profile folder; with `tensorboard`, its TensorBoard
  folder) not a folder: training would end unable to write it. `before`: the workdir's
  entries before this start took its lock (None: a new workdir), where a study's is told."""
  for name in RUN_FILES:
    path = os.path.join(workdir, name)
    if os.path.lexists(path) and not os.path.isfile(path):
      kind = ("a folder" if os.path.isdir(path) else "a broken link" if os.path.islink(path)
              else "not a regular file")
      raise WorkdirError(f"{path} is {kind}, where the run writes its {name}: move it out of "
                         "the workdir (or choose another --workdir); nothing was changed.")
  path = os.path.join(workdir, "checkpoints")
  if os.path.lexists(path) and not os.path.isdir(path):
    raise WorkdirError(f"{path} is not a folder, where the run keeps its checkpoints: move it "
                       "out of the workdir (or choose another --workdir); nothing was changed.")
  path = os.path.join(workdir, "profile")
  if profile and os.path.lexists(path) and not os.path.isdir(path):
    raise WorkdirError(f"{path} is not a folder, where train.profile_steps writes its trace: "
                       "move it out of the workdir (or leave train.profile_steps empty); "
                       "nothing was changed.")
  path = os.path.join(workdir, "tensorboard")
  if tensorboard and os.path.lexists(path) and not os.path.isdir(path):
    raise WorkdirError(f"{path} is not a folder, where the run writes its TensorBoard files: "
                       "move it out of the workdir (or pass --config.log.tensorboard=false); "
                       "nothing was changed.")
  if is_study_folder(workdir, before or set()):  # its curves.png would be the run's plot,
    # its runs beside it
    raise WorkdirError(f"{workdir} is a study's folder (study.json, runs/): train in another "
                       "--workdir (its runs are trained by python -m infinito_jax.study, or "
                       "run_study); nothing was changed.")


def is_study_folder(workdir: str, entries: set[str] | None = None) -> bool:
  """Whether `workdir` holds a study: its outputs, or its runs/ with the study's lock or plots
  and without a run's own files (a project's runs/ folder alone is not a study's). `entries`:
  what it held before a start made its own lock there (default: what it holds)."""
  if entries is None:
    try:
      entries = set(os.listdir(workdir))
    except OSError:
      return False
  if entries & {"study.json", "study.md"}:
    return True
  return ("runs" in entries and os.path.isdir(os.path.join(workdir, "runs"))
          and not holds_run(workdir) and bool(entries & {LOCK_FILE, "curves.png",
                                                          "perplexity.png"}))


def holds_run(workdir: str) -> bool:
  """Whether `workdir` holds a training run's files (config.json, history.jsonl,
  summary.json, checkpoints/)."""
  return any(os.path.lexists(os.path.join(workdir, f)) for f in RUN_FILES + ("checkpoints",))


def in_the_way(path: str, e: OSError) -> str:
  """Why a folder could not be made at `path`, where something else is there (', ...'): a
  dangling symbolic link (which os.makedirs calls an existing file), or a file."""
  if e.errno not in (errno.EEXIST, errno.ENOTDIR):
    return ""
  link = next((p for p in parents(path) if os.path.islink(p) and not os.path.exists(p)), None)
  if link is not None:
    return f": {link} is a symbolic link to {os.readlink(link)!r}, which does not exist"
  return ": a file is in the way"


def parents(path: str):
  """`path` (made absolute) and each folder above it, up to the root."""
  path = os.path.abspath(path)
  while True:
    yield path
    parent = os.path.dirname(path)
    if parent == path:
      return
    path = parent


# workdir -> (device, inode) of the lock file this process holds on it (WorkdirLock.acquire):
# what the run's checkpointer checks its lock path against, from the moment it was taken
HELD_LOCKS: dict[str, tuple[int, int]] = {}


class WorkdirLock:
  """One writer per workdir: an exclusive flock on <workdir>/.lock, released by the OS on exit.

  The file holds the owner (pid, host, start time, command) so a refused process can say who
  has it. A killed owner's lock is gone with the process; the file itself stays (harmless).
  """

  def __init__(self, workdir: str):
    self.workdir = os.path.abspath(workdir)
    self.path = os.path.join(self.workdir, LOCK_FILE)
    self._fd = None

  def owner(self) -> dict:
    try:
      with open(self.path) as f:
        return json.loads(f.read() or "{}")
    except (OSError, ValueError):
      return {}

  def acquire(self) -> "WorkdirLock":
    try:
      os.makedirs(self.workdir, exist_ok=True)
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      if e.errno in (errno.ENOSPC, errno.EDQUOT):
        raise DiskFullError(f"no space left to create {self.path}: free space on that disk "
                            "and run again.") from None
      raise WorkdirError(f"cannot use {self.workdir} as a workdir ({e.strerror}"
                         f"{in_the_way(self.workdir, e)}); choose a --workdir in a folder you can "
                         "write to.") from None
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      o = self.owner()
      who = (f"process {o.get('pid', '?')} on host {o.get('host', '?')} (since "
             f"{o.get('started', '?')})") if o else "another process"
      raise WorkdirBusyError(
          f"workdir {self.workdir} is in use by {who}: one training run at a time may write "
          "there. Wait for it to finish, stop it (Ctrl-C or kill -TERM: it saves first), or "
          "train in another --workdir. evaluate.py can read the workdir meanwhile.") from None
    owner = {"pid": os.getpid(), "host": socket.gethostname(),
             "started": datetime.datetime.now().isoformat(timespec="seconds"),
             "command": " ".join(sys.argv)}
    try:
      os.ftruncate(fd, 0)
      os.pwrite(fd, json.dumps(owner).encode(), 0)
    except OSError:
      pass  # the owner note is a courtesy; the flock is the lock
    self._fd = fd
    st = os.fstat(fd)  # the file locked: the run's, whatever the path holds later
    HELD_LOCKS[self.workdir] = (st.st_dev, st.st_ino)
    return self

  def release(self) -> None:
    HELD_LOCKS.pop(self.workdir, None)
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


def unfinished_move(workdir: str) -> str | None:
  """The folder a killed move of `workdir`'s run was taking it to (move_aside), or bringing it
  back from (move_back), or None: the run is then split between the two folders until
  move_aside finishes the move."""
  note = _move_note(workdir)
  return note["to"] if note else None


def _read_move_note(workdir: str, key: str) -> dict | str | None:
  """The `.moving` note in `workdir` if it names a folder under `key`, else None; "damaged"
  where the file is there but unreadable."""
  try:
    with open(os.path.join(workdir, MOVE_NOTE), encoding="utf-8") as f:
      note = json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError):
    return "damaged"
  other = note.get(key) if isinstance(note, dict) else None
  return note if isinstance(other, str) and os.path.isdir(other) else None


def _same(a: str, b: str) -> bool:
  return os.path.realpath(a) == os.path.realpath(b)


def _move_note(workdir: str) -> dict | None:
  """The note of a killed move of `workdir`'s run: its own note names the other folder, and
  the other folder's names it back (a copy of the workdir, or a note left after the move
  finished, names a folder that does not name it). A damaged note is replaced by the other
  folder's word: a sibling DIR.old-* whose note names the workdir."""
  note = _read_move_note(workdir, "to")
  if note == "damaged":
    parent, name = os.path.split(os.path.abspath(workdir))
    with contextlib.suppress(OSError):
      for e in sorted(os.listdir(parent)):
        theirs = (_read_move_note(os.path.join(parent, e), "part_of")
                  if e.startswith(f"{name}.old-") else None)
        if isinstance(theirs, dict) and _same(theirs["part_of"], workdir):
          return {"to": os.path.join(parent, e), "back": False}
    return None
  if note is None:
    return None
  theirs = _read_move_note(note["to"], "part_of")
  return note if isinstance(theirs, dict) and _same(theirs["part_of"], workdir) else None


def _moving_into(workdir: str) -> dict | None:
  """The note of the folder whose killed move was taking its run into `workdir` (or bringing it
  back out of it): `workdir` then holds part of that run. None where no move names it."""
  note = _read_move_note(workdir, "part_of")
  if not isinstance(note, dict):
    return None
  theirs = _move_note(note["part_of"])
  if theirs is None or not _same(theirs["to"], workdir):
    return None  # a move since finished (the note is left from a kill after it)
  return {**theirs, "from": note["part_of"]}


def split_run(workdir: str, reader: bool = False) -> str | None:
  """What to say of a run split by a killed move (unfinished_move), or None: to a new start
  (the workdir's run cannot go on), or, with `reader`, to evaluate.py or export (the workdir
  holds only part of it)."""
  note = _move_note(workdir)
  if note is None:
    into = _moving_into(workdir)
    return None if into is None else _split_elsewhere(os.path.abspath(workdir), into, reader)
  workdir, dest = os.path.abspath(workdir), note["to"]
  how = (f"a --fresh start that stopped before training was killed while it moved the previous "
         f"run back from {dest} into {workdir}" if note.get("back") else
         f"a start with --fresh was killed while it moved the previous run in {workdir} to "
         f"{dest}")
  finish = (f"Start a run with --fresh in {workdir} to finish the move (the previous run "
            f"then lies whole in {dest})" if reader else
            f"Start again with --fresh to finish the move (the previous run then lies whole in "
            f"{dest})")
  return (f"{how}: that run lies split between the two folders"
          + (f", and {workdir} holds only part of it" if reader else "") + f". {finish}, or "
          f"move what {dest} holds back into {workdir} and delete "
          f"{os.path.join(workdir, MOVE_NOTE)} to go on with it; nothing was changed.")


def _split_elsewhere(here: str, note: dict, reader: bool) -> str:
  """split_run's words for the other folder of a killed move (`here`, named by the `note` of
  note["from"], the workdir whose run it is)."""
  workdir = note["from"]
  how = (f"a --fresh start in {workdir} that stopped before training was killed while it "
         f"moved the previous run of that folder back out of {here}" if note.get("back") else
         f"a start with --fresh in {workdir} was killed while it moved the previous run of that "
         f"folder into {here}")
  return (f"{how}: {here} holds only part of that run, the rest lying in {workdir}"
          + ("" if reader else ", and is no workdir to start in") + ". Start a run with --fresh "
          f"in {workdir} to finish the move (the previous run then lies whole in {here}), or "
          f"move what {here} holds back into {workdir} and delete "
          f"{os.path.join(workdir, MOVE_NOTE)} to go on with it; nothing was changed.")


def moved_into(workdir: str) -> bool:
  """Whether `workdir` is the other folder of another workdir's killed move (split_run): no
  --fresh there may move its part of that run aside."""
  return _moving_into(workdir) is not None


def _note_move(workdir: str, dest: str, back: bool = False) -> None:
  """Writes the notes that the workdir's run is moving to `dest` (or `back` from it): one in
  the workdir naming `dest`, then one in `dest` naming the workdir (the run is split while the
  two folders name each other); _end_move removes them."""
  def note(content):
    def write(tmp):
      with open(tmp, "w", encoding="utf-8") as f:
        json.dump(content, f)
        f.flush()
        os.fsync(f.fileno())
    return write
  # the other folder's first: a kill between leaves a note there that names a workdir whose
  # note does not name it back (ignored, as a kill between _end_move's removals leaves one)
  write_atomically([(os.path.join(dest, MOVE_NOTE), note({"part_of": workdir}))])
  write_atomically([(os.path.join(workdir, MOVE_NOTE), note({"to": dest, "back": back}))])


def _end_move(workdir: str, dest: str) -> None:
  """Removes _note_move's notes, the other folder's first (a kill between leaves the workdir's,
  naming a folder that does not name it back: ignored, and cleared by the next --fresh)."""
  for folder in (dest, workdir):
    with contextlib.suppress(FileNotFoundError):
      os.remove(os.path.join(folder, MOVE_NOTE))


def _move_all(workdir: str, dest: str) -> None:
  """Moves the workdir's entries (all but the lock and the note) into `dest`, with a note in
  the workdir naming `dest` while it moves: a move killed halfway is finished by the next.
  Refuses, moving nothing, where `dest` already holds an entry of the same name (made there
  since a killed move, e.g. an export of its half of the run): that would overwrite it."""
  entries = [e for e in sorted(os.listdir(workdir)) if e not in (LOCK_FILE, MOVE_NOTE)]
  both = [e for e in entries if os.path.lexists(os.path.join(dest, e))]
  if both:
    raise WorkdirError(
        f"the previous run cannot be moved from {workdir} to {dest} (where a killed --fresh "
        f"was moving it): both hold {', '.join(both[:6])}"
        f"{f' and {len(both) - 6} more' if len(both) > 6 else ''}, made in one of them since. "
        f"Move one of each out of the way (e.g. rename {os.path.join(dest, both[0])}), then "
        "start again with --fresh; nothing was moved.")
  _note_move(workdir, dest)
  for e in entries:
    os.replace(os.path.join(workdir, e), os.path.join(dest, e))
  _end_move(workdir, dest)


def move_aside(workdir: str) -> str | None:
  """Moves a used workdir's contents (all but the lock) into a new sibling folder, or where a
  killed move was taking them (unfinished_move: the old run is whole there again).

  Returns:
    The folder the old run went to, or None when there was nothing to move.
  """
  workdir = os.path.abspath(workdir)
  dest = unfinished_move(workdir)
  entries = [e for e in os.listdir(workdir) if e not in (LOCK_FILE, MOVE_NOTE)]
  if not entries:
    _end_move(workdir, dest or workdir)
    return dest
  if dest is None:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    dest, n = f"{workdir}.old-{stamp}", 1
    while os.path.exists(dest):
      dest, n = f"{workdir}.old-{stamp}-{n}", n + 1
    os.makedirs(dest)
  _move_all(workdir, dest)
  return dest


def _made_by_a_start(workdir: str, before=()) -> list[str] | None:
  """What a start that wrote nothing leaves in `workdir` besides its lock and the entries
  `before` it: empty folders (the checkpoints folder Orbax makes). None where it holds anything
  else."""
  entries = [e for e in os.listdir(workdir) if e != LOCK_FILE and e not in before]
  for e in entries:
    path = os.path.join(workdir, e)
    if os.path.islink(path) or not os.path.isdir(path) or os.listdir(path):
      return None
  return entries


def move_back(workdir: str, old: str) -> bool:
  """Undoes `move_aside(workdir)` (which returned `old`) where the workdir holds nothing a new
  run wrote (a start stopped or failed before training); returns whether it did."""
  with contextlib.suppress(OSError):
    made = _made_by_a_start(workdir)
    if made is None:
      return False
    for e in made:
      os.rmdir(os.path.join(workdir, e))
    # the note in the workdir names `old`: a kill halfway leaves a move aside to finish
    _note_move(workdir, old, back=True)
    for e in sorted(os.listdir(old)):
      if e != MOVE_NOTE:
        os.replace(os.path.join(old, e), os.path.join(workdir, e))
    _end_move(workdir, old)
    os.rmdir(old)
    return True
  return False


def entries(workdir: str) -> set[str] | None:
  """What `workdir` holds before a start (None where it is no folder yet): what
  remove_if_unused leaves in an existing folder."""
  try:
    return set(os.listdir(workdir))
  except OSError:
    return None


def remove_if_unused(workdir: str, before: set[str] | None = None) -> None:
  """Removes what a start that failed left: a workdir it made (`before` None) that holds
  nothing but the lock file and empty folders; in a folder that existed (`before`: its entries
  then), only the lock file and the empty folders the start added, the folder and what it held
  staying. Nothing goes where another process holds that lock: two starts racing for a new
  workdir, the loser must not remove the winner's lock (a third process could then take the
  workdir beside it)."""
  made, before = before is None, before or set()
  if LOCK_FILE in before:
    return  # a workdir used before: its lock file is its own (and harmless)
  with contextlib.suppress(OSError):
    if LOCK_FILE not in os.listdir(workdir) or _made_by_a_start(workdir, before) is None:
      return
    path = os.path.join(workdir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises where it is held: left alone
      added = _made_by_a_start(workdir, before)
      if added is not None:
        for e in added:
          os.rmdir(os.path.join(workdir, e))
        os.remove(path)
        if made:
          os.rmdir(workdir)
    finally:
      os.close(fd)
