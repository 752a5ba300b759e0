"""Data parallelism: 4 simulated CPU devices train like 1 device (to float rounding), with the
batch split over the devices (one replica) or the replicas of a population."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

from conftest import xla_flags

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
    steps = len(data.batches("train", config.train.batch_size))

    def train(devices, replicas):
        config.train.num_devices, config.train.replicas = devices, replicas
        trainer = Trainer(config, mc, steps)
        batches = trainer.train_batches(data)
        state = trainer.new_state()
        losses = []
        for i in range(12):
            state, m = trainer.train_step(state, trainer.put(batches.batch(0, i)))
            losses.append(np.asarray(m["loss"]).tolist())
        leaf = jax.tree_util.tree_leaves(state.params)[0]
        shard_shape = leaf.sharding.shard_shape(leaf.shape)
        return (losses, jax.device_get(state), len(leaf.sharding.device_set),
                [v["loss"] for v in trainer.evaluate(state, data.batches("validation", 8))],
                shard_shape[0])

    def max_diff(a, b):
        return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y))))
                   for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))

    # a population of 4 on 4 devices (one replica each) equals the same population on one
    p1, p4 = train(1, 4), train(4, 4)
    population = dict(devices=p4[2], replicas_per_device=p4[4], loss_diff=max_diff(p1[0], p4[0]),
                      memory_diff=max_diff(p1[1].memory, p4[1].memory),
                      val_diff=max_diff(p1[3], p4[3]), val_spread=float(np.ptp(p4[3])))
    l1, s1, d1, v1, _ = train(1, 1)
    l4, s4, d4, v4, _ = train(4, 1)
    l1, l4, v1, v4 = [x[0] for x in l1], [x[0] for x in l4], v1[0], v4[0]
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
          losses=l4, summary_devices=summary["devices"], summary_loss=summary["best_val_loss"],
          population=population)))
""")


@pytest.mark.slow
def test_four_devices_equal_one_device(tmp_path):
  env = dict(os.environ, XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=4"),
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
  # replicas on the mesh: each device holds one replica of four, and the result is unchanged
  p = r["population"]
  assert p["devices"] == 4 and p["replicas_per_device"] == 1, p
  assert p["loss_diff"] < 1e-5 and p["memory_diff"] < 1e-5 and p["val_diff"] < 1e-5, p
  assert p["val_spread"] > 1e-3, p  # and the replicas are different runs


FSDP_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from configs import tiny
    from infinito_jax import data as data_lib
    from infinito_jax.evaluate import restore_run
    from infinito_jax.model import model_config
    from infinito_jax.train import Trainer, train_and_evaluate

    assert jax.device_count() == 4
    config = tiny.get_config()
    config.model.hidden_dim = 64
    config.train.learning_rate = 1e-4
    config.log.tensorboard = config.log.plot = False
    mc = model_config(config.model)
    data = data_lib.prepare(config, mc)
    steps = len(data.batches("train", config.train.batch_size))

    def train(sharding):
        config.train.sharding = sharding
        t = Trainer(config, mc, steps)
        b, st, losses = t.train_batches(data), t.new_state(), []
        for i in range(12):
            st, m = t.train_step(st, t.put(b.batch(0, i)))
            losses.append(float(np.asarray(m["loss"])[0]))
        bytes_of = lambda tree: sum(x.addressable_shards[0].data.nbytes
                                    for x in jax.tree_util.tree_leaves(tree))
        specs = [str(x.sharding.spec) for x in jax.tree_util.tree_leaves(st.params)]
        val = [v["loss"] for v in t.evaluate(st, data.batches("validation", 8))][0]
        return losses, jax.device_get(st), bytes_of(st.params), bytes_of(st.opt_state), specs, val

    rep, fsdp = train("replicated"), train("fsdp")
    diffs = [float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for (p, x), y in zip(jax.tree_util.tree_leaves_with_path(rep[1].params),
                                  jax.tree_util.tree_leaves(fsdp[1].params))
             if "k_proj']['bias" not in jax.tree_util.keystr(p)]
    # a stopped and resumed fsdp run equals an uninterrupted one, and evaluate.py reads it
    config.train.epochs, config.train.sharding = 1, "fsdp"
    whole = train_and_evaluate(config, sys.argv[1] + "/whole")
    config.train.stop_after_steps = 7
    train_and_evaluate(config, sys.argv[1] + "/split")
    config.train.stop_after_steps = 0
    split = train_and_evaluate(config, sys.argv[1] + "/split")
    restored = restore_run(sys.argv[1] + "/split")
    print("RESULT " + json.dumps(dict(
        loss_diff=max(abs(a - b) for a, b in zip(rep[0], fsdp[0])), param_diff=max(diffs),
        val_diff=abs(rep[5] - fsdp[5]), param_bytes=[rep[2], fsdp[2]], opt_bytes=[rep[3], fsdp[3]],
        sharded=sum("data" in s for s in fsdp[4]), replicated_specs=sum("data" in s for s in rep[4]),
        whole=whole["best_val_loss"], split=split["best_val_loss"],
        restored_step=restored.step)))
""")


@pytest.mark.slow
def test_fsdp_equals_replicated_with_a_quarter_of_the_parameter_bytes(tmp_path):
  """train.sharding=fsdp on 4 simulated devices: 12 steps give the replicated run's losses,
  parameters and validation loss (1e-5); the large parameters are really sliced over the
  devices (their sharding names the data axis), so each device holds about a quarter of the
  parameter and optimizer bytes; a stopped and resumed fsdp run equals an uninterrupted one
  and evaluate restores it."""
  env = dict(os.environ, XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=4"),
             JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  out = subprocess.run([sys.executable, "-c", FSDP_SCRIPT, str(tmp_path)], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
  lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
  assert lines, out.stderr[-3000:]
  r = json.loads(lines[0][len("RESULT "):])
  assert r["loss_diff"] < 1e-5 and r["param_diff"] < 1e-5 and r["val_diff"] < 1e-5, r
  assert r["sharded"] >= 10 and r["replicated_specs"] == 0, r
  assert r["param_bytes"][0] / r["param_bytes"][1] > 3.0, r  # ~4x less per device
  assert r["opt_bytes"][0] / r["opt_bytes"][1] > 3.0, r
  assert r["split"] == r["whole"] and r["restored_step"] == 30, r


def test_a_batch_the_devices_do_not_divide_names_the_device_counts_that_do(tmp_path):
  """Three devices and a batch of 8: the error named 'change it' first, which a resumed run
  (its batch size fixed) refuses; it names the device counts that divide it."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=3"))
  out = subprocess.run([sys.executable, "train.py", "--config", "configs/tiny.py", "--workdir",
                        str(tmp_path / "run")], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 1, out.stderr[-2000:]
  assert ("train.batch_size=8 must be divisible by the 3 devices of the mesh (or train.replicas "
          "a multiple of it): set train.num_devices to one of [1, 2] (a resumed run keeps its "
          "batch size), or, in a new run, change train.batch_size.") in out.stderr, out.stderr
