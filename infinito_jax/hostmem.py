"""The host allocator under XLA:CPU: keep a step's buffers mapped from one step to the next.

XLA:CPU allocates each execution's temporary buffer (392 MiB for the demo train step, 83 MiB
for its eval step) with posix_memalign on one of its worker threads and frees it when the step
ends. glibc serves a request that large from a worker thread's arena with a fresh mmap and
gives it back with munmap, so every step faults in and zeroes the whole buffer again: on a
2-core VM about 100k page faults and a fifth of the step's CPU time in the kernel.
`tune_malloc()` sets glibc (with `mallopt`) to one arena that neither maps nor trims, so the
freed buffer stays and the next step reuses it. train.py, evaluate.py and the study call it
at start-up, before JAX starts its threads (a thread that already owns an arena keeps it).

Demo train step on 2 cores (`python bench/host_malloc.py`, figures in the README): 1063 ms
with glibc as it is (103k page faults), 890 ms tuned (none). A preloaded tcmalloc keeps freed
memory too (926 ms; `LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4`), jemalloc
with its default decay does not (1053 ms); with either preloaded, tune_malloc changes nothing.
The cost of tuning: freed memory stays with the process (up to 2 GiB above its peak in use).

INFINITO_MALLOC chooses: 'auto' (default) tunes glibc where JAX will compute on the CPU (no
GPU or TPU plugin installed, or JAX_PLATFORMS=cpu), 'tuned' tunes it anyway, 'system' leaves
the allocator as it is.
"""

import ctypes
import ctypes.util
import importlib.util
import os
import sys

# mallopt parameters (glibc's malloc.h): one arena, no mmap, no trimming, 64 MiB of top pad
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX, M_ARENA_MAX = -1, -2, -4, -8
SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1),
            (M_TOP_PAD, 64 << 20))
MODES = ("auto", "tuned", "system")
ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin",
                       "jax_rocm7_plugin", "libtpu", "jax_plugins.xla_cuda12")
_done: list[str] = []


def preloaded_allocator() -> str | None:
  """'tcmalloc' or 'jemalloc' where one is loaded in this process (LD_PRELOAD), else None.

  Read from /proc/self/maps where there is one (a preload that failed to load is not counted),
  else from LD_PRELOAD."""
  try:
    with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
      loaded = f.read()
  except OSError:
    loaded = os.environ.get("LD_PRELOAD", "")
  return next((name for name in ("tcmalloc", "jemalloc") if f"lib{name}" in loaded), None)


def computes_on_cpu() -> bool:
  """Whether JAX will compute on the CPU, judged without starting it: JAX_PLATFORMS says so,
  or no accelerator plugin is installed."""
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  for name in ACCELERATOR_PLUGINS:
    try:
      if importlib.util.find_spec(name) is not None:
        return False
    except (ImportError, ValueError):
      continue
  return True


def tune_malloc() -> str:
  """Applies the settings above, once per process, as INFINITO_MALLOC says. Returns what the
  host allocator now is: 'glibc, tuned' (with a warning appended where other threads already
  ran: their arenas are chosen), 'glibc', 'glibc (tuning refused)', 'tcmalloc (preloaded)',
  'jemalloc (preloaded)' or 'not glibc'.

  Raises:
    ValueError: an unknown INFINITO_MALLOC value.
  """
  if _done:
    return _done[0]
  mode = os.environ.get("INFINITO_MALLOC", "auto") or "auto"
  if mode not in MODES:
    raise ValueError(f"INFINITO_MALLOC={mode!r}: use one of {MODES} (or leave it unset).")
  mallopt = None
  if sys.platform.startswith("linux"):
    try:
      mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
      mallopt = None
  other = preloaded_allocator()
  if other:
    result = f"{other} (preloaded)"
  elif mallopt is None:
    result = "not glibc"
  elif mode == "system" or (mode == "auto" and not computes_on_cpu()):
    result = "glibc"
  else:
    ok = [mallopt(key, value) == 1 for key, value in SETTINGS]
    result = "glibc, tuned" if all(ok) else "glibc (tuning refused)"
    threads = _threads()
    if all(ok) and threads > 1:  # their arenas are chosen: a thread that has one keeps mapping
      result += f" after {threads - 1} other thread(s) started (theirs may keep glibc's)"
  _done.append(result)
  return result


def _threads() -> int:
  """This process's thread count (1 where /proc is absent)."""
  try:
    return len(os.listdir("/proc/self/task"))
  except OSError:
    return 1


def status() -> str:
  """What tune_malloc made of the allocator in this process ('as it was' where it never ran)."""
  return _done[0] if _done else "as it was (hostmem.tune_malloc() not called)"


def at_startup() -> str:
  """tune_malloc() for a command's start-up: a bad INFINITO_MALLOC is one line and exit code 1."""
  try:
    return tune_malloc()
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
