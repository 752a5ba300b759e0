"""How the benchmarks end: a bad flag is the parser's usage and `error:` line (exit 2), a
setting that cannot work (an InfinitoError) one `error:` line (exit 1); Ctrl-C or SIGTERM (a
scheduler's) is one line too (exit 130 / 143), and a subprocess running at that moment (the
PyTorch peer, a child benchmark) is killed with it, not left to run on its own.

The process ends with os._exit once its output is flushed: an interpreter shutting down while
XLA's threads still compile crashed (exit 139 after the line)."""

import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project
from infinito_jax.errors import InfinitoError  # noqa: E402

_SIGNALS = {signal.SIGINT: ("Ctrl-C", 130), signal.SIGTERM: ("SIGTERM", 143)}


class Stopped(KeyboardInterrupt):
  """A stop signal, raised in the main thread: `subprocess.run` kills its child on any
  exception, and `with Popen(...)` waits for it."""

  def __init__(self, signum: int):
    super().__init__(_SIGNALS[signum][0])
    self.signum = signum


def _raise(signum, frame):  # pylint: disable=unused-argument
  raise Stopped(signum)


def run_main(main, *args, **kwargs):
  """Calls main(*args, **kwargs) with the endings above; returns what it returns."""
  for signum in _SIGNALS:
    signal.signal(signum, _raise)
  try:
    return main(*args, **kwargs)
  except KeyboardInterrupt as e:  # (subprocess.run has killed and waited for its child)
    signum = getattr(e, "signum", signal.SIGINT)
    name, code = _SIGNALS[signum]
    _exit(f"Stopped by {name}: the rows printed so far are complete, no more follow.", code)
  except InfinitoError as e:
    _exit(f"error: {e}", 1)


def _exit(line: str, code: int):
  for signum in _SIGNALS:  # a second signal now changes nothing
    signal.signal(signum, signal.SIG_IGN)
  print(line, file=sys.stderr, flush=True)
  sys.stdout.flush()
  os._exit(code)
