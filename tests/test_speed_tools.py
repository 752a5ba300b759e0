"""Start-up and profiling tools of a run: the persistent compilation cache, the profiler window."""

import glob
import gzip
import json
import os
import pathlib
import subprocess
import sys

import pytest

from configs import tiny
from infinito_jax.train import train_and_evaluate

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _train(workdir, *extra):
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  return subprocess.run([sys.executable, "train.py", "--config", "configs/tiny.py", "--workdir",
                         str(workdir), "--config.train.epochs=1", "--config.log.plot=false",
                         *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_second_run_with_the_same_shapes_compiles_nothing_new(tmp_path):
  """train.py fills train.compilation_cache on its first run; a second run of the same shapes
  (another workdir) finds every executable there: the cache does not grow. An empty field
  turns the cache off."""
  cache = tmp_path / "cache"
  first = _train(tmp_path / "a", f"--config.train.compilation_cache={cache}",
                 "--config.model.hidden_dim=48")  # shapes no other test compiles
  assert first.returncode == 0, first.stderr[-3000:]
  entries = sorted(os.listdir(cache))
  assert len(entries) >= 2  # at least the train and eval steps
  second = _train(tmp_path / "b", f"--config.train.compilation_cache={cache}",
                  "--config.model.hidden_dim=48")
  assert second.returncode == 0, second.stderr[-3000:]
  assert sorted(os.listdir(cache)) == entries
  off = _train(tmp_path / "c", "--config.train.compilation_cache=",
               "--config.model.hidden_dim=48")
  assert off.returncode == 0 and sorted(os.listdir(cache)) == entries


def test_profile_steps_writes_a_trace_of_the_window(tmp_path):
  """train.profile_steps='2,4' writes a jax.profiler trace (xplane + Chrome trace JSON with
  events) into <workdir>/profile, and training goes on to the end."""
  c = tiny.get_config()
  c.train.epochs, c.train.stop_after_steps, c.train.profile_steps = 1, 6, "2,4"
  c.log.plot = False
  summary = train_and_evaluate(c, str(tmp_path / "run"))
  assert summary["steps"] == 6
  traces = glob.glob(str(tmp_path / "run" / "profile" / "plugins" / "profile" / "*" /
                         "*.trace.json.gz"))
  assert len(traces) == 1 and glob.glob(os.path.join(os.path.dirname(traces[0]), "*.xplane.pb"))
  events = json.loads(gzip.open(traces[0]).read())["traceEvents"]
  assert len(events) > 10


def test_bad_profile_window_is_refused():
  """A window that is not 'N,M' with N < M names the field."""
  from infinito_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from infinito_jax.errors import ConfigError  # pylint: disable=g-import-not-at-top
  for bad in ("4,2", "3", "a,b", "-1,2"):
    c = tiny.get_config()
    c.train.profile_steps = bad
    with pytest.raises(ConfigError, match="train.profile_steps"):
      config_lib.validate(c)
