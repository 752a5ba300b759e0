"""The host allocator setting (infinito_jax/hostmem.py): each case in a fresh process, since
glibc's arenas are chosen once, when a thread first allocates."""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"

# A worker thread (as XLA:CPU's are) allocates, touches and frees a 64 MiB buffer 8 times, as
# a step's temporaries are; prints the allocator's status and the page faults it took.
CHURN = r"""
import ctypes, resource, sys, threading
from infinito_jax import hostmem
status = hostmem.tune_malloc()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
SIZE, TIMES = 64 << 20, 8
faults = []
def churn():
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  for _ in range(TIMES):
    p = libc.malloc(SIZE)
    ctypes.memset(p, 1, SIZE)
    libc.free(p)
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
t = threading.Thread(target=churn)
t.start(); t.join()
print(status, "|", faults[0])
"""


def churn(**env):
  full = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "INFINITO_MALLOC")}
  full.update(env)
  out = subprocess.run([sys.executable, "-c", CHURN], cwd=ROOT, env=full, capture_output=True,
                       text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  status, faults = out.stdout.strip().rsplit("|", 1)
  return status.strip(), int(faults)


needs_glibc = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")


@needs_glibc
def test_tuned_glibc_reuses_a_freed_step_buffer_instead_of_faulting_it_in_again():
  """What the tuning is for: glibc's default maps and unmaps a large buffer freed on a worker
  thread, so every reuse faults all its pages in again; tuned, the pages stay."""
  pages = (64 << 20) // os.sysconf("SC_PAGE_SIZE")
  status, faults = churn(INFINITO_MALLOC="system", JAX_PLATFORMS="cpu")
  assert status == "glibc"
  assert faults >= 7 * pages, faults  # every one of the 8 buffers faulted in anew
  status, faults = churn(INFINITO_MALLOC="auto", JAX_PLATFORMS="cpu")
  assert status == "glibc, tuned"
  assert faults <= 2 * pages, faults  # the first buffer's pages, then reused


@needs_glibc
def test_auto_leaves_glibc_alone_where_jax_computes_on_an_accelerator_and_tuned_forces_it():
  assert churn(INFINITO_MALLOC="auto", JAX_PLATFORMS="cuda")[0] == "glibc"
  assert churn(INFINITO_MALLOC="tuned", JAX_PLATFORMS="cuda")[0] == "glibc, tuned"
  assert churn(JAX_PLATFORMS="cpu")[0] == "glibc, tuned"  # unset means auto


@pytest.mark.skipif(not os.path.exists(TCMALLOC), reason=f"{TCMALLOC} is not installed")
def test_a_preloaded_tcmalloc_is_reported_and_left_as_it_is():
  status, faults = churn(LD_PRELOAD=TCMALLOC, JAX_PLATFORMS="cpu")
  assert status == "tcmalloc (preloaded)"
  assert faults <= 2 * (64 << 20) // os.sysconf("SC_PAGE_SIZE"), faults


def test_a_preload_that_failed_to_load_is_not_reported_as_loaded():
  status, _ = churn(LD_PRELOAD="/nonexistent/libtcmalloc.so", JAX_PLATFORMS="cpu")
  assert "tcmalloc" not in status, status


def test_a_bad_infinito_malloc_is_one_error_line_before_any_work(tmp_path):
  env = dict(os.environ, INFINITO_MALLOC="fast", JAX_PLATFORMS="cpu")
  for cmd in (["train.py", "--config", "configs/tiny.py", "--workdir", str(tmp_path / "run")],
              ["evaluate.py", "--ckpt", str(tmp_path / "run")]):
    out = subprocess.run([sys.executable, *cmd], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    lines = [l for l in out.stderr.splitlines() if l.strip()]
    assert out.returncode == 1 and len(lines) == 1, out.stderr[-2000:]
    assert lines[0].startswith("error: INFINITO_MALLOC='fast'") and "'system'" in lines[0]
  assert not (tmp_path / "run").exists()


@needs_glibc
def test_tuning_after_other_threads_started_says_so():
  """A thread that already has an arena keeps glibc's behaviour: the status must not claim
  more than was done."""
  code = ("import threading; e = threading.Event(); t = threading.Thread(target=e.wait); "
          "t.start(); from infinito_jax import hostmem; print(hostmem.tune_malloc()); e.set()")
  env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "INFINITO_MALLOC")}
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(env, JAX_PLATFORMS="cpu"),
                       capture_output=True, text=True, timeout=60)
  assert out.returncode == 0, out.stderr
  assert out.stdout.startswith("glibc, tuned after 1 other thread(s) started"), out.stdout


@pytest.mark.parametrize("tool", ["figures.py", "compile_time.py", "ema_probe.py", "step_speed.py",
                                  "population.py", "kernel_profile.py"])
def test_every_benchmark_that_computes_sets_the_host_allocator_as_train_py_does(tool):
  """A benchmark's CPU wall times are train.py's only under the same allocator: each tool reads
  INFINITO_MALLOC at its start, before JAX (a bad value is its one error line, nothing run)."""
  env = dict(os.environ, INFINITO_MALLOC="fast", JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, f"bench/{tool}", "--help"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 1, (out.returncode, out.stdout[-500:], out.stderr[-2000:])
  assert out.stderr.strip().startswith("error: INFINITO_MALLOC='fast'"), out.stderr[-2000:]
