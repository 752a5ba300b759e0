"""What train.py and `python -m infinito_jax.study` share on the command line: a mistake in the
flags or the --config file is one line `error: ...` with exit code 1, never absl's FATAL
output or a traceback. Nothing here imports jax."""

import errno
import os
import re
import sys


def fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(1)


def script(name: str) -> str:
  """The project's script `name` (train.py, evaluate.py) as a command given in the current
  folder: `name` in the project's root, else its path (relative below this folder, else
  absolute), so that a printed command runs where it was printed."""
  import shlex  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), name)
  if not os.path.isfile(path):  # an installed package without the project's scripts
    return name
  rel = os.path.relpath(path)
  return shlex.quote(path if rel.startswith("..") else rel)


def check_config_file(path: str, examples: str) -> None:
  file = path.split(":", 1)[0]
  if not os.path.isfile(file):
    fail(f"--config {path}: no such file; the configs are in configs/ ({examples}).")
  if not file.endswith(".py"):
    fail(f"--config {path}: a config is a Python file with get_config(), like configs/"
         f"{examples.split(',')[0].strip()}.")


def check_config_fields(argv, fields) -> None:
  """Refuses a --config.NAME=VALUE whose NAME is no field of the run config, naming the fields
  of its group (absl would raise an AttributeError with the bare name)."""
  for arg in argv[1:]:
    if arg.startswith(("--config.", "-config.")):  # absl takes one dash or two
      name = arg.split("config.", 1)[1].split("=", 1)[0]
      if name not in fields:
        group = name.rsplit(".", 1)[0] + "." if "." in name else ""
        near = sorted(f for f in fields if f.startswith(group)) if group else []
        fail(f"{arg}: the config has no field {name!r}"
             + (f"; fields of {group[:-1]}: {', '.join(f[len(group):] for f in near)}"
                if near else "; see configs/default.py for every field") + ".")


HELP = ("--help", "-h", "-?", "--helpshort", "--helpfull", "--helpxml")


def asked_for_help(argv) -> bool:
  return any(a in HELP for a in argv[1:])


NONE_WORDS = ("none", "null")  # any case
_NONE_FIELDS: list[str] = []  # --config.NAME=None overrides taken out of argv, set by load_config


def _override(argv, i: int):
  """(name, value, how many arguments) of a --config.NAME=VALUE or --config.NAME VALUE override
  at argv[i] (one dash or two, as absl takes them), else None."""
  for prefix in ("--config.", "-config."):
    if argv[i].startswith(prefix):
      rest = argv[i][len(prefix):]
      if "=" in rest:
        return (*rest.split("=", 1), 1)
      if i + 1 < len(argv) and not argv[i + 1].startswith("-"):
        return rest, argv[i + 1], 2
      return rest, "", 1
  return None


def take_none_overrides(argv, nullable) -> list:
  """argv without the --config.NAME=None overrides of fields that may be None (`nullable`, e.g.
  model.attention_dropout: None means model.dropout; None, none or null in any case); absl's
  parser cannot give None to a typed field, so load_config sets them. The last override of a
  field wins, as in absl: a later value over None (absl parses it), None over an earlier value.
  Without a --config file there are no overrides to take (absl refuses them)."""
  _NONE_FIELDS[:] = []
  if not any(re.match(r"--?config(=|$)", a) for a in argv[1:]):
    return list(argv)
  last, drop, i = {}, set(), 1
  while i < len(argv):
    found = _override(argv, i)
    if found is None:
      i += 1
      continue
    name, value, width = found
    last[name] = value.strip().lower() in NONE_WORDS
    if last[name] and name in nullable:
      drop.update(range(i, i + width))
    i += width
  _NONE_FIELDS[:] = sorted(n for n, none in last.items() if none and n in nullable)
  return [a for j, a in enumerate(argv) if j not in drop]


def parse_flags(argv, prog: str, examples: str, what: str, nullable=()):
  """absl's flag parsing with every mistake as one line (the --config overrides' own field
  checks come first, in the caller). `prog` is the command (for --help), `what` says what a
  config file is, for its load errors; `nullable`: the --config fields that take None."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  argv = take_none_overrides(argv, nullable)
  config_path = ""
  for i, arg in enumerate(argv[1:], 1):
    path = (arg.split("=", 1)[1] if arg.startswith("--config=") else
            argv[i + 1] if arg == "--config" and i + 1 < len(argv) else None)
    if path is not None:
      check_config_file(path, examples)
      config_path = path
  import logging  # pylint: disable=g-import-not-at-top
  logging.disable(logging.WARNING)  # config_flags' own warning (a get_config() that returned
  try:  # None) before absl's logging is set up: its error line says it
    return flags.FLAGS(argv)
  except SystemExit as e:  # absl's --help / --helpfull print the usage, then exit 1
    raise SystemExit(0 if asked_for_help(argv) and e.code == 1 else e.code) from None
  except flags.Error as e:
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    # a config file whose own code raised: absl puts the traceback under its first line; the
    # cause is its last line
    cause = f" ({lines[-1]})" if len(lines) > 1 and "Traceback" in str(e) else ""
    bad = re.match(r"flag -?-config\.([\w.]+)=(.*?): ", lines[0] if lines else "")
    if bad and not bad.group(2).strip():
      fail(f"--config.{bad.group(1)}= is empty: give it a value"
           + (" (or None)" if bad.group(1) in nullable else "") + f". See {prog} --help.")
    if bad and bad.group(2).strip().lower() in NONE_WORDS:
      fail(f"--config.{bad.group(1)}={bad.group(2)}: {bad.group(1)} cannot be None"
           + (f" (the fields that may be: {', '.join(nullable)})" if nullable else "")
           + f"; give it a value. See {prog} --help.")
    fail(f"{lines[0].rstrip(':.') if lines else 'bad flags'}{cause}. See {prog} --help.")
  except Exception as e:  # pylint: disable=broad-except
    # raised by the --config file's own code, which absl runs while parsing, by an override
    # of a field the file's config lacks (a config written before the field was added), or by
    # an override applied to what is no config (a get_config() that returned an int: KeyError)
    key = str(e).strip("\"'") if isinstance(e, AttributeError) else None
    lacking = [o[0] for i in range(1, len(argv)) if (o := _override(argv, i))
               and o[0].rsplit(".", 1)[-1] == key]
    if lacking:
      fail(f"--config.{lacking[0]}: the config {config_path} has no field {key!r} (written "
           f"before the field was added?): add it to its get_config(), e.g. "
           f"`c.{lacking[0]} = ...` as in the shipped configs ({examples}), or leave the flag "
           f"out. See {prog} --help.")
    returned = _returned(config_path) if any(
        _override(argv, i) for i in range(1, len(argv))) else None
    if returned is not None:  # an override applied to what is no ConfigDict (KeyError, ...)
      example = examples.split(",")[0].strip()
      fail(f"--config {config_path}: its get_config() returned {returned}, not an "
           f"ml_collections.ConfigDict: return one, as configs/{example} does.")
    if isinstance(e, AttributeError) and str(e).endswith("has no attribute 'get_config'"):
      fail(f"--config {config_path} defines no get_config(). {what}")
    where = f" (line {e.lineno})" if isinstance(e, SyntaxError) else ""
    text = (str(e).splitlines() or [""])[0]
    text = text.strip("\"'") if isinstance(e, KeyError) else text
    fail(f"--config {config_path} could not be loaded"
         f"{where}: {type(e).__name__}: {text}. {what}")
  finally:
    logging.disable(logging.NOTSET)


_UNLOADABLE = object()


def config_returned(config_path: str):
  """What the config file's get_config() returns (the file is run: a config file is cheap and
  pure), or _UNLOADABLE where that raises (absl's parsing then says why)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  path, arg = config_path, None
  if not os.path.exists(path) and ":" in path:  # file.py:argument, as config_flags takes it
    path, arg = path.split(":", 1)
  try:
    spec = importlib.util.spec_from_file_location("infinito_config_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg is not None else module.get_config()
  except Exception:  # pylint: disable=broad-except
    return _UNLOADABLE


def _returned(config_path: str) -> str | None:
  """The type of what the config file's get_config() returns where that is no ConfigDict (an
  override failed on it), else None."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  config = config_returned(config_path)
  return (None if config is _UNLOADABLE or isinstance(config, ml_collections.ConfigDict)
          else type_name(config))


def config_path(argv) -> str | None:
  """The --config file named in argv (either spelling), or None."""
  for i, arg in enumerate(argv[1:], 1):
    if arg.startswith(("--config=", "-config=")):
      return arg.split("=", 1)[1]
    if arg in ("--config", "-config") and i + 1 < len(argv):
      return argv[i + 1]
  return None


def type_name(value) -> str:
  return "None" if value is None else type(value).__name__


def load_config(config_flag, prog: str, example: str):
  """The --config file's ConfigDict; a file that is not a config is one line, not a traceback."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS["config"].present:
    fail(f"pass --config, e.g. --config {example} (see {prog} --help).")
  path = flags.FLAGS["config"].config_filename
  try:
    config = config_flag.value
  except OSError as e:  # ml_collections' "earlier failure to load", with the cause inside
    cause = [l for l in str(e).splitlines() if l.strip()][-1].strip()
    fail(f"--config {path} could not be loaded ({cause}).")
  import ml_collections  # pylint: disable=g-import-not-at-top
  if not isinstance(config, ml_collections.ConfigDict):
    fail(f"--config {path}: its get_config() returned {type_name(config)}, not an "
         f"ml_collections.ConfigDict: return one, as {example} does.")
  for name in _NONE_FIELDS:  # take_none_overrides: --config.NAME=None
    *groups, leaf = name.split(".")
    where = config
    for g in groups:
      where = where[g]
    where[leaf] = None
  return config


class _ClosedSafe:
  """A text stream that outlives its reader: a write or flush to a closed pipe (`| head`, a
  closed terminal's pipe) or a hung-up terminal (EIO) sends this and every later write to
  os.devnull instead of raising, so a run whose output nobody reads any more trains and saves
  on."""

  def __init__(self, stream):
    self._stream = stream

  def _lost(self, error: Exception):
    if isinstance(error, ValueError) and not getattr(self._stream, "closed", False):
      raise error  # not a closed stream (e.g. UnicodeEncodeError): the caller's to see
    if isinstance(error, OSError) and not isinstance(error, BrokenPipeError) and (
        error.errno != errno.EIO):
      raise error  # EIO: the terminal has hung up (SIGHUP); anything else is the caller's
    try:  # the descriptor too: C++ logging and the exit-time flush of the old stream go quiet
      null = os.open(os.devnull, os.O_WRONLY)
      os.dup2(null, self._stream.fileno())
      os.close(null)
    except (OSError, ValueError, AttributeError):
      pass
    self._stream = open(os.devnull, "w", encoding="utf-8")  # pylint: disable=consider-using-with

  def write(self, text):
    try:
      return self._stream.write(text)
    except (OSError, ValueError) as e:  # ValueError: the stream itself was closed
      self._lost(e)
      return len(text)

  def flush(self):
    try:
      self._stream.flush()
    except (OSError, ValueError) as e:
      self._lost(e)

  def __getattr__(self, name):
    return getattr(self._stream, name)


def survive_closed_output() -> None:
  """sys.stdout and sys.stderr keep working (into os.devnull) once their reader has gone: a
  command's output piped into `head`, or a pipe closed under it, never stops the command."""
  for name in ("stdout", "stderr"):
    stream = getattr(sys, name)
    if stream is not None and not isinstance(stream, _ClosedSafe):
      setattr(sys, name, _ClosedSafe(stream))
