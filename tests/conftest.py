"""Shared test helpers: the original's fixture and small model configs.

The suite compiles the same tiny programs again and again (every Trainer, every subprocess),
so it shares one JAX persistent compilation cache, fresh for each session (made here in
pytest's main process before it starts the xdist workers, so the workers and their subprocesses
share it): a real cache, the same executables. Tests about compilation itself (a signal during the first compile) run
without it (see test_processes.NO_CACHE). It also compiles with XLA's back-end optimisation off
(below).
"""

import atexit
import json
import os
import pathlib
import shutil
import tempfile

# XLA:CPU's LLVM back end without optimisation: the suite's programs compile 1.5 - 2.5x faster
# (a tiny train.py run from an empty cache: 28 against 45 s on 2 cores) and compute the same
# numbers (test_compile_setting.py checks it against the default users get). For the suite as
# users compile: INFINITO_TEST_XLA=default python -m pytest.
SUITE_XLA_FLAGS = "--xla_backend_optimization_level=0"
if os.environ.get("INFINITO_TEST_XLA", "fast") == "fast":
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {SUITE_XLA_FLAGS}".strip()


def xla_flags(*flags: str) -> str:
  """XLA_FLAGS for a test's subprocess: the suite's (above) and `flags`."""
  return " ".join((os.environ.get("XLA_FLAGS", ""), *flags)).strip()


if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # before jax is imported
  _CACHE = tempfile.mkdtemp(prefix="infinito_test_jax_cache_")
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
  os.environ.update(JAX_COMPILATION_CACHE_DIR=_CACHE,
                    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")

# The suite runs on pytest-xdist workers (pyproject's addopts: -n auto): several processes may
# share one accelerator, so none takes 75% of its memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import numpy as np
import pytest


def pytest_xdist_auto_num_workers(config):
  """-n auto: a worker per core, at most 4. Most of a test is single-threaded (imports,
  tracing, XLA compiles, Orbax I/O: the suite kept 1.15 of 2 cores busy in one process), so 2
  workers on 2 cores finish it 1.4x sooner; beyond 4 the longest test file bounds the time, and
  each worker's XLA already uses every core."""
  del config
  return max(1, min(4, len(os.sched_getaffinity(0))))

from infinito_jax.convert import from_torch_state_dict
from infinito_jax.model import ModelConfig

SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared"
FIXTURES = SHARED / "fixtures"  # numbers from the original code (read, never copied here)


def bench_module(name: str):
  """A benchmark script of bench/ imported as a module (bench/ is not a package)."""
  import sys  # pylint: disable=g-import-not-at-top
  folder = str(pathlib.Path(__file__).resolve().parents[1] / "bench")
  sys.path.insert(0, folder)
  try:
    return __import__(name)
  finally:
    sys.path.remove(folder)


def need_fixture(name: str) -> pathlib.Path:
  path = FIXTURES / name
  if not path.exists():
    pytest.skip(f"{path} is absent: the original's fixtures live in ../shared/fixtures")
  return path


@pytest.fixture(scope="session")
def reference():
  """The original's numbers (npz arrays, JSON scalars) and the matching non-causal config."""
  need_fixture("reference_v52_small.npz")
  arrays = dict(np.load(FIXTURES / "reference_v52_small.npz"))
  meta = json.loads((FIXTURES / "reference_v52_small.json").read_text())
  config = ModelConfig(vocab_size=meta["vocab_size"], hidden_dim=meta["hidden_dim"],
                       num_layers=meta["num_layers"], num_heads=meta["num_heads"],
                       memory_slots=meta["memory_slots"], slot_size=meta["slot_size"],
                       max_len=meta["max_len"], causal=False)
  state = {k[len("state/"):]: v for k, v in arrays.items() if k.startswith("state/")}
  return dict(arrays=arrays, meta=meta, config=config, state=state,
              variables=from_torch_state_dict(state, config))


@pytest.fixture
def small_config():
  return ModelConfig(vocab_size=97, hidden_dim=32, num_layers=2, num_heads=4, memory_slots=8)
