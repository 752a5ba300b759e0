"""The suite compiles with XLA's back-end optimisation off (conftest.SUITE_XLA_FLAGS); users
compile with the default. The numbers must not depend on it, or the suite would not test what
users run."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from conftest import SUITE_XLA_FLAGS

ROOT = pathlib.Path(__file__).resolve().parents[1]


def twelve_steps() -> dict:
  """12 train steps of the tiny config (dropout, exploration, memory) and one validation."""
  import jax  # pylint: disable=import-outside-toplevel
  from configs import tiny  # pylint: disable=import-outside-toplevel
  from infinito_jax import data as data_lib  # pylint: disable=import-outside-toplevel
  from infinito_jax.model import model_config  # pylint: disable=import-outside-toplevel
  from infinito_jax.train import Trainer  # pylint: disable=import-outside-toplevel
  config = tiny.get_config()
  mc = model_config(config.model)
  data = data_lib.prepare(config, mc)
  trainer = Trainer(config, mc, len(data.batches("train", config.train.batch_size)))
  batches, state, losses = trainer.train_batches(data), trainer.new_state(), []
  for i in range(12):
    state, m = trainer.train_step(state, trainer.put(batches.batch(0, i)))
    losses.append(float(np.asarray(m["loss"]).ravel()[0]))
  leaves = jax.tree_util.tree_leaves_with_path(jax.device_get((state.params, state.memory)))
  return dict(losses=losses,
              leaves={jax.tree_util.keystr(k): np.asarray(x, np.float64).ravel().tolist()
                      for k, x in leaves},
              validation=[v["loss"] for v in trainer.evaluate(state, data.batches("validation", 8))],
              xla_flags=os.environ.get("XLA_FLAGS", ""))


@pytest.mark.slow
def test_the_suites_compile_setting_gives_the_numbers_of_the_default_one():
  here = twelve_steps()
  assert SUITE_XLA_FLAGS in here["xla_flags"] or os.environ.get("INFINITO_TEST_XLA") == "default"
  default_flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                           if f != SUITE_XLA_FLAGS)
  env = dict(os.environ, XLA_FLAGS=default_flags, JAX_PLATFORMS="cpu",
             INFINITO_TEST_XLA="default", PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
  out = subprocess.run([sys.executable, "-c", "import json, test_compile_setting as t; "
                        "print('RESULT ' + json.dumps(t.twelve_steps()))"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
  assert lines, out.stderr[-3000:]
  there = json.loads(lines[0][len("RESULT "):])
  assert SUITE_XLA_FLAGS not in there["xla_flags"]
  # float rounding apart (LLVM orders some sums differently): the same run
  loss = float(np.max(np.abs(np.subtract(here["losses"], there["losses"]))))
  diffs = {k: float(np.max(np.abs(np.subtract(v, there["leaves"][k]))))
           for k, v in here["leaves"].items()}
  # the key bias cannot change attention (softmax ignores a shift per query): its gradient is
  # rounding noise, which Adam scales up to a full step (test_multidevice says the same)
  worst = max(v for k, v in diffs.items() if "k_proj']['bias" not in k)
  val = float(np.max(np.abs(np.subtract(here["validation"], there["validation"]))))
  print(f"worst differences: loss {loss:.2e}, parameters and memory {worst:.2e}, "
        f"validation {val:.2e}")
  assert loss < 1e-5 and val < 1e-5, (loss, val)
  # parameters and memory after 12 AdamW steps (measured: 8.8e-6 at most, in a query kernel,
  # which sees the key bias's noise; every other leaf within 1e-6)
  assert worst < 3e-5, worst
  assert here["losses"][-1] < here["losses"][0] - 0.1  # it trained
