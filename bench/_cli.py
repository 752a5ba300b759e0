"""How the benchmarks end: a mistake is one `error:` line (exit 1); Ctrl-C or SIGTERM (a
scheduler's) is one line too (exit 130 / 143), and a subprocess running at that moment (the
PyTorch peer, a child benchmark) is killed with it, not left to run on its own."""

import signal
import sys

from infinito_jax.errors import InfinitoError

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
  except KeyboardInterrupt as e:
    signum = getattr(e, "signum", signal.SIGINT)
    name, code = _SIGNALS[signum]
    print(f"Stopped by {name}: the rows printed so far are complete, no more follow.",
          file=sys.stderr, flush=True)
    sys.exit(code)
  except InfinitoError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)
