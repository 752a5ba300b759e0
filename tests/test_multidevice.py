"""Data parallelism: 4 simulated CPU devices train like 1 device (to float rounding)."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from configs import tiny
    from infinito_jax import data as data_lib
    from infinito_jax.model import model_config
    from infinito_jax.train import Trainer, train_and_evaluate

    assert jax.device_count() == 4, jax.devices()
    config = tiny.get_config()
    config.train.learning_rate = 1e-4  # the original's
    mc = model_config(config.model)
    data = data_lib.prepare(config, mc)
    batches = data.batches("train", config.train.batch_size, config.seed, shuffle=True)
    runs = {}
    for n in (1, 4):
        config.train.num_devices = n
        trainer = Trainer(config, mc, len(batches))
        state = trainer.new_state()
        losses = []
        for i in range(12):
            state, m = trainer.train_step(state, trainer.put(batches.batch(0, i)))
            losses.append(float(m["loss"]))
        leaf = jax.tree_util.tree_leaves(state.params)[0]
        runs[n] = (losses, jax.device_get(state), len(leaf.sharding.device_set),
                   trainer.evaluate(state, data.batches("validation", 8))["loss"])
    l1, s1, d1, v1 = runs[1]
    l4, s4, d4, v4 = runs[4]
    diffs = {jax.tree_util.keystr(p): float(np.max(np.abs(np.asarray(a, np.float64) - b)))
             for (p, a), b in zip(jax.tree_util.tree_leaves_with_path(s1.params),
                                  jax.tree_util.tree_leaves(s4.params))}
    # the key bias cannot change attention (softmax ignores a shift per query): its gradient is
    # rounding noise, which Adam scales up to a full step whatever the reduction order did
    diff = max(v for k, v in diffs.items() if "k_proj']['bias" not in k)
    key_bias = max(v for k, v in diffs.items() if "k_proj']['bias" in k)
    mem = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
              for a, b in zip(jax.tree_util.tree_leaves(s1.memory), jax.tree_util.tree_leaves(s4.memory)))
    config.train.num_devices = 0
    config.train.epochs = 1
    summary = train_and_evaluate(config, sys.argv[1])
    print("RESULT " + json.dumps(dict(loss_diff=max(abs(a - b) for a, b in zip(l1, l4)),
          param_diff=diff, key_bias_diff=key_bias, memory_diff=mem, val_diff=abs(v1 - v4), devices=[d1, d4],
          losses=l4, summary_devices=summary["devices"], summary_loss=summary["best_val_loss"])))
""")


@pytest.mark.slow
def test_four_devices_equal_one_device(tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "run")], env=env,
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
  lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
  assert lines, out.stderr[-3000:]
  r = json.loads(lines[0][len("RESULT "):])
  assert r["devices"] == [1, 4]  # the 4-device state really lives on 4 devices
  assert r["loss_diff"] < 1e-5 and r["param_diff"] < 1e-5 and r["memory_diff"] < 1e-5, r
  assert r["val_diff"] < 1e-5
  assert r["key_bias_diff"] < 12 * 1e-4  # at most one Adam step of noise per step
  assert r["losses"][-1] < r["losses"][0]  # and it trained
  assert r["summary_devices"] == 4 and r["summary_loss"] is not None
