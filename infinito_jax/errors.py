"""The project's error classes: what the command-line scripts turn into one line and exit code 1.

Everything the library raises on purpose for a user's mistake or a damaged run derives from
`InfinitoError`, and its message names the problem and the fix. Anything else is a bug and keeps
its traceback.
"""

import contextlib
import contextvars
import functools


class InfinitoError(Exception):
  """Base of the errors a user can act on; the message says what to do."""


class ConfigError(InfinitoError, ValueError):
  """A config (or flag) that cannot work: a bad value, an unknown field, a refused change."""


class DataError(InfinitoError):
  """A data source that cannot be loaded or used; the message names the file and the fix."""


class CheckpointError(InfinitoError):
  """A checkpoint that is missing, damaged or does not fit the config; the message says which."""


class DamagedCheckpointError(CheckpointError):
  """The newest checkpoint cannot be read; `flag` is what resumes from the newest intact one."""

  def __init__(self, message: str, flag: str = "--config.checkpoint.on_damage=previous"):
    super().__init__(message)
    self.flag = flag


class StepVanishedError(CheckpointError):
  """A step a reader chose was deleted (pruned by the run training there) before it was read."""


class IncompatibleCheckpointError(CheckpointError):
  """A readable checkpoint written in another version's layout."""


class WorkdirError(InfinitoError):
  """A workdir that cannot be used: a file in the way, no permission, a read-only disk."""


class WorkdirLostError(WorkdirError):
  """The workdir, or the lock this run holds on it, was removed or replaced while the run used
  it (rm -rf, or a second process that took a new lock): nothing more may be written there."""


class WorkdirBusyError(WorkdirError):
  """Another process holds the workdir's lock (it is training there)."""


class DiskFullError(InfinitoError):
  """No space left on the device while writing; what was saved before is intact."""


class NonFiniteLossError(InfinitoError):
  """The training loss became NaN or infinite; the message names the step. Raised by a run,
  it carries `replicas` (the population indices whose loss it was) and `step` (a study adds
  `seconds`: the run's training time up to it)."""
  replicas: list = []
  step: int = 0
  seconds: float = 0.0


def short(e: BaseException, limit: int = 240) -> str:
  """`Type: first line of the message`, cut to `limit` characters (never a multi-line dump)."""
  text = str(e).strip().splitlines()[0] if str(e).strip() else ""
  for noise in (" [tensorstore_spec", " See full TensorStore details", " [source locations"):
    text = text.split(noise)[0]
  if len(text) > limit:
    text = text[:limit - 3] + "..."
  return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _raised_from(e: BaseException, errnos: tuple, says) -> bool:
  """True if `e` or anything it was raised from is an OSError with one of `errnos`, or its
  text `says` so (TensorStore's errors carry the OS's words, not its errno)."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if (isinstance(e, OSError) and e.errno in errnos) or says(str(e)):
      return True
    e = e.__cause__ or e.__context__
  return False


def is_disk_full(e: BaseException) -> bool:
  """True if `e` or anything it was raised from is ENOSPC / EDQUOT (no space, quota)."""
  import errno  # pylint: disable=g-import-not-at-top
  return _raised_from(e, (errno.ENOSPC, errno.EDQUOT), is_disk_full_text)


def is_unwritable(e: BaseException) -> bool:
  """True if `e` or anything it was raised from says the disk or folder cannot be written
  (EROFS, EACCES, EPERM, or TensorStore's PERMISSION_DENIED wording)."""
  import errno  # pylint: disable=g-import-not-at-top
  return _raised_from(e, (errno.EROFS, errno.EACCES, errno.EPERM), lambda text: any(
      w in text for w in ("Read-only file system", "PERMISSION_DENIED", "Errno 30")))


def is_disk_full_text(text: str) -> bool:
  """True if an error text (TensorStore's and the OS's wording) says the disk is full."""
  return any(w in text for w in ("No space left on device", "Disk quota exceeded",
                                 "OS error 28", "errno 28", "Errno 28"))


def article(noun: str) -> str:
  """'a dict', 'an int'."""
  return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


def check_config_dict(config, what: str, example: str) -> None:
  """Refuses, by name, a `config` that is no ml_collections.ConfigDict (`what`: how the message
  names it; `example`: a shipped config file whose get_config() gives one)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"{what} is {article(type(config).__name__)}, not an "
                      f"ml_collections.ConfigDict: give a config file's get_config() (e.g. "
                      f"{example}'s)" + (", or ml_collections.ConfigDict(this dict)"
                                         if isinstance(config, dict) else "") + ".")


def workdir_path(workdir) -> str:
  """A library call's workdir as a path; '' or None (an unset variable: it meant the current
  folder) and what is no path are refused by name."""
  import os  # pylint: disable=g-import-not-at-top
  if not isinstance(workdir, (str, os.PathLike)) or not os.fspath(workdir):
    raise ConfigError(f"workdir is {workdir!r}: give the run's folder (it is made if need be), "
                      "e.g. 'runs/demo'; '.' is the current folder.")
  return os.fspath(workdir)


def _python_value(value: str) -> str:
  """A command-line flag's value as Python writes it: true -> True, a word -> 'word'; a
  number, a placeholder (PATH) or a quoted value as it is."""
  import re  # pylint: disable=g-import-not-at-top
  low = value.lower()
  if low in ("true", "false", "none"):
    return low.capitalize()
  if not value or not (re.fullmatch(r"[A-Z_]+|[-+\d.eE]+|['\"].*['\"]", value)):
    return repr(value)
  return value


def in_python_terms(text: str, call: str = "train_and_evaluate",
                    args: dict | None = None) -> str:
  """A message that names command-line fixes (--config.FIELD=VALUE, --fresh, --workdir, "the
  same command"), told to a Python caller of `call` instead: config.FIELD = VALUE,
  fresh=True, workdir, `call` again; `args`: {flag: the call's argument} for its other flags
  (evaluate.py's --ckpt is run()'s workdir)."""
  import re  # pylint: disable=g-import-not-at-top
  for flag, arg in (args or {}).items():  # (a flag named with its command stays the command's)
    text = re.sub(rf"(?<!\.py )(?<!export )--{flag}\b", arg, text)

  def assignment(m):
    value, tail = m.group(2), ""
    if value.endswith("."):  # the end of a sentence, not of the value
      value, tail = value[:-1], "."
    return f"config.{m.group(1)} = {_python_value(value)}{tail}"

  text = re.sub(r"--config\.([\w.]+)=([^\s,;)\]]*)", assignment, text)
  # flags side by side (a command line's words) are statements one after the other
  text = re.sub(r"(config\.[\w.]+ = [^\s;,)\]]+) (?=config\.[\w.]+ = )", r"\1; ", text)
  text = re.sub(r"--config\.([\w.]+)", r"config.\1", text)
  text = re.sub(r"(?:python )?train\.py --fresh|--fresh", "fresh=True", text)
  text = re.sub(r"--workdir\b", "workdir", text)
  text = re.sub(r"(?:run )?the same command again with", f"call {call} again on the same "
                "workdir with", text)
  text = re.sub(r"(?:run )?the same command again", f"call {call} again with the same config "
                "and workdir", text)
  return text


_COMMAND_LINE = contextvars.ContextVar("infinito_command_line", default=False)
_TRANSLATING = contextvars.ContextVar("infinito_python_terms", default=False)


@contextlib.contextmanager
def command_line():
  """Inside it (a script's main), errors keep their flags' spelling (python_terms is off)."""
  token = _COMMAND_LINE.set(True)
  try:
    yield
  finally:
    _COMMAND_LINE.reset(token)


def on_command_line(f):
  """Decorates a script's main: errors inside it keep their flags' spelling."""
  @functools.wraps(f)
  def inside(*a, **k):
    with command_line():
      return f(*a, **k)
  return inside


def python_terms(call: str, args: dict | None = None):
  """Decorates a library entry point: the InfinitoErrors it raises to a Python caller name
  their fixes in Python's terms (in_python_terms, with `call` and `args`), outside a script's
  command_line(); once, at the outermost such call."""
  def wrap(f):
    @functools.wraps(f)
    def translated(*a, **k):
      if _COMMAND_LINE.get() or _TRANSLATING.get():
        return f(*a, **k)
      token = _TRANSLATING.set(True)
      try:
        return f(*a, **k)
      except InfinitoError as e:
        e.args = (in_python_terms(str(e), call, args),) + e.args[1:]
        if isinstance(e, DamagedCheckpointError):
          e.flag = in_python_terms(e.flag, call, args)
        raise
      finally:
        _TRANSLATING.reset(token)
    return translated
  return wrap
