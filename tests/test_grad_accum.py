"""Gradient accumulation (train.grad_accum_steps = K): one step over K strided micro-batches is
the full-batch step (token-weighted), the memory is carried through the micro-batches, K = 1 is
today's step bitwise, and the config refuses a K that does not divide the batch."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from infinito_jax import config as config_lib
from infinito_jax import data as data_lib
from infinito_jax.errors import ConfigError
from infinito_jax.loss import token_cross_entropy
from infinito_jax.memory import MEMORY
from infinito_jax.model import model_config
from infinito_jax.train import (Trainer, _check_accum_divisible, create_state, make_train_step,
                                over_replicas, replica, train_and_evaluate)
from test_train import leaves_equal, tiny_config

K = 4


def deterministic_config(**train):
  """Tiny, no dropout, no exploration noise: the step is a pure function of params and batch.

  At the original's learning rate (1e-4, as tests/test_population.py): on its first step Adam
  moves each weight by about lr * g / (|g| + eps), so the float rounding of a gradient entry
  near eps = 1e-8 becomes an update difference of up to lr (7e-6 at tiny's 3e-3).
  """
  c = tiny_config(**{"learning_rate": 1e-4, **train})
  c.model.dropout = 0.0
  c.model.exploration = False
  return c


def max_diff(a, b, skip=()):
  """Largest absolute difference over the leaves (paths containing `skip` left out)."""
  out = 0.0
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)):
    if not any(s in jax.tree_util.keystr(path) for s in skip):
      out = max(out, float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))))
  return out


# the attention key bias cannot change the output (softmax ignores a shift per query): its
# gradient is 0 up to rounding, which Adam's first step turns into +-lr; its gradient moments
# are compared instead
KEY_BIAS = "['k_proj']['bias']"


@pytest.fixture(scope="module")
def accum_setup():
  """One step with K = 4 and one with K = 1 from the same state on the same padded batch."""
  configs = {k: deterministic_config(grad_accum_steps=k) for k in (1, K)}
  mc = model_config(configs[1].model)
  data = data_lib.prepare(configs[1], mc)
  steps = len(data.batches("train", 8))
  trainers = {k: Trainer(c, mc, steps) for k, c in configs.items()}
  batch = {k: np.array(v) for k, v in trainers[1].train_batches(data).batch(0, 0).items()}
  assert batch["targets"].shape == (1, 8, 16) and (batch["targets"] != 0).all()
  # micro-batch 0 (rows 0 and 4) gets 3 real tokens; the other three keep 32 each
  batch["targets"][0, 0, 3:] = 0
  batch["inputs"][0, 4] = batch["targets"][0, 4] = 0  # a wholly padded row, as in a last batch
  start = jax.device_get(trainers[1].new_state())  # host copy: the steps donate their state
  out = {}
  for k, trainer in trainers.items():
    state, metrics = trainer.train_step(trainer.new_state(), trainer.put(batch))
    out[k] = jax.device_get((state, metrics))
  return dict(trainers=trainers, batch=batch, start=start, out=out)


def test_accumulated_step_equals_the_full_batch_step_token_weighted(accum_setup):
  """K = 4 on 8 rows gives the K = 1 loss (1e-6 relative), gradient norm and updated parameters
  (1e-6 absolute), with micro-batches of unequal token counts (3 against 32), where a mean of
  micro-batch means would differ from the token-weighted loss."""
  (s1, m1), (s4, m4) = accum_setup["out"][1], accum_setup["out"][K]
  l1, l4 = float(m1["loss"][0]), float(m4["loss"][0])
  assert float(m1["tokens"][0]) == float(m4["tokens"][0]) == 3 + 3 * 32
  assert abs(l4 - l1) <= 1e-6 * abs(l1), (l1, l4)
  g1, g4 = float(m1["grad_norm"][0]), float(m4["grad_norm"][0])
  assert abs(g4 - g1) <= 1e-5 * g1, (g1, g4)
  assert float(m4["learning_rate"][0]) == float(m1["learning_rate"][0])
  assert max_diff(s1.params, s4.params, skip=[KEY_BIAS]) <= 1e-6
  mu1 = s1.opt_state[1].inner_state[0].mu  # the accumulated gradient itself, times 1 - b1
  mu4 = s4.opt_state[1].inner_state[0].mu
  assert max_diff(mu1, mu4) <= 1e-6 * max(float(np.max(np.abs(x)))
                                          for x in jax.tree_util.tree_leaves(mu1))
  assert int(s4.step[0]) == 1
  assert max_diff(accum_setup["start"].params, s4.params) > 1e-4  # it did update
  # the naive mean of the K micro-batch means is not the loss: the test can tell them apart
  start, batch = replica(accum_setup["start"], 0), accum_setup["batch"]
  model = accum_setup["trainers"][K].model
  logits, _ = model.apply({"params": start.params, MEMORY: start.memory}, batch["inputs"][0])
  means = []  # the memory does not change the logits (fuse_memory=False)
  for i in range(K):
    total, count = token_cross_entropy(logits[i::K], batch["targets"][0, i::K])
    means.append(float(total) / float(count))
  assert abs(np.mean(means) - l1) > 1e-3, (means, l1)


def test_memory_is_carried_through_the_micro_batches(accum_setup):
  """The memory after a K = 4 step is the memory after 4 sequential training forward passes
  over the strided micro-batches (rows i, i+4), and not the memory after one full-batch pass."""
  start, batch = replica(accum_setup["start"], 0), accum_setup["batch"]
  model = accum_setup["trainers"][K].model
  memory = start.memory
  for i in range(K):
    _, updates = model.apply({"params": start.params, MEMORY: memory}, batch["inputs"][0, i::K],
                             train=True, mutable=[MEMORY])
    memory = updates[MEMORY]
  after_k = replica(accum_setup["out"][K][0], 0).memory
  assert max_diff(memory, after_k) <= 1e-6
  assert jax.tree_util.tree_structure(memory) == jax.tree_util.tree_structure(after_k)
  # four writes into four slots (each write ages every slot by 1 and zeroes the one it fills)
  assert sorted(after_k[MEMORY]["age"].tolist()) == [0, 1, 2, 3, 4, 4, 4, 4]
  _, full = model.apply({"params": start.params, MEMORY: start.memory}, batch["inputs"][0],
                        train=True, mutable=[MEMORY])
  assert max_diff(full[MEMORY], after_k) > 1e-2
  assert sorted(full[MEMORY][MEMORY]["age"].tolist()) == [0] + [1] * 7  # one write
  # and the K = 1 step stores exactly that one full-batch pass
  assert max_diff(full[MEMORY], replica(accum_setup["out"][1][0], 0).memory) <= 1e-6


def _todays_train_step(model, tx, schedule, loss_grad="autodiff"):
  """make_train_step as it was before gradient accumulation: the reference for K = 1 (its loss
  differentiated as `loss_grad` says: the Trainer's form for the numbers)."""

  def train_step(state, batch):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    dropout_key, explore_key = jax.random.split(key)

    def loss_fn(params):
      (logits, _), updates = model.apply(
          {"params": params, MEMORY: state.memory}, batch["inputs"], train=True,
          rngs={"dropout": dropout_key, "explore": explore_key}, mutable=[MEMORY])
      total, count = token_cross_entropy(logits, batch["targets"], loss_grad)
      return total / jnp.maximum(count, 1.0), (updates[MEMORY], count)

    (loss, (memory, count)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "tokens": count,
               "learning_rate": schedule(state.step)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                         memory=memory), metrics

  return train_step


def test_k1_is_todays_step_bitwise(accum_setup):
  """K = 1 is today's step: with dropout and exploration on (so the keys count), the step built
  without the option and the one built with grad_accum_steps=1 trace to today's program (and
  K = 2 to one scan, not K copies); the Trainer's K = 1 step (over replicas, jitted, donated)
  gives bitwise the state and metrics of today's step compiled the same way."""
  config = tiny_config()
  assert config.model.dropout > 0 and config.model.exploration
  trainer = Trainer(config, model_config(config.model), 30)  # builds, compiles nothing
  args = (trainer.model, trainer.tx, trainer.schedule)
  state = jax.eval_shape(
      lambda k: create_state(trainer.model, trainer.tx, k, config.data.seq_len),
      jax.random.key(0))
  batch = {k: jax.ShapeDtypeStruct((8, config.data.seq_len), jnp.int32)
           for k in ("inputs", "targets")}
  trace = lambda f: str(jax.make_jaxpr(f)(state, batch))
  today = trace(_todays_train_step(*args))
  assert "random_fold_in" in today and "random_bits" in today  # the keys are in the program
  assert trace(make_train_step(*args)) == today
  assert trace(make_train_step(*args, grad_accum_steps=1)) == today
  k2 = trace(make_train_step(*args, grad_accum_steps=2))
  assert k2 != today and k2.count("scan[") == 1
  # the numbers, as the Trainer compiles it (the fixture's K = 1 step on the padded batch)
  t1 = accum_setup["trainers"][1]
  step = jax.jit(over_replicas(_todays_train_step(t1.model, t1.tx, t1.schedule, t1.loss_grad),
                               t1.replicas),
                 in_shardings=(t1.state_sharding, t1.batch_sharding),
                 out_shardings=(t1.state_sharding, t1.replicated), donate_argnums=0)
  expected = jax.device_get(step(jax.device_put(accum_setup["start"], t1.state_sharding),
                                 t1.put(accum_setup["batch"])))
  assert leaves_equal(accum_setup["out"][1], expected)


def test_train_and_evaluate_with_k2_and_validate_refuses_bad_k(tmp_path):
  """A real run (train_and_evaluate, dropout and exploration on) with K = 2 takes its steps with
  finite, falling losses; validate refuses K = 3 with batch 8
  naming both fields, and K < 1 or non-integer K; a K that does not divide the rows per device
  is refused naming the devices."""
  config = tiny_config(epochs=1, grad_accum_steps=2, stop_after_steps=6, log_every=1)
  config.log.tensorboard = config.log.plot = False  # not what is tested here; saves seconds
  summary = train_and_evaluate(config, str(tmp_path))
  assert summary["status"] == "stopped" and summary["steps"] == 6
  train = [json.loads(l) for l in (tmp_path / "history.jsonl").read_text().splitlines()]
  train = [r for r in train if r["kind"] == "train"]
  losses = [r["loss"] for r in train]
  assert len(losses) == 6 and all(math.isfinite(x) for x in losses), train
  assert losses[-1] < losses[0] - 0.1, losses

  with pytest.raises(ConfigError, match=r"train\.batch_size=8 .*train\.grad_accum_steps=3"):
    config_lib.validate(tiny_config(grad_accum_steps=3))
  for bad in (0, -2, 2.0, True, "2"):
    config = tiny_config().to_dict()  # a plain dict: ConfigDict itself refuses some of them
    config["train"]["grad_accum_steps"] = bad
    with pytest.raises(ConfigError, match=r"train\.grad_accum_steps=.*integer >= 1"):
      config_lib.validate(config)
  config_lib.validate(tiny_config(grad_accum_steps=8))
  with pytest.raises(ConfigError, match=r"train\.batch_size=8 .*2 devices.*4 rows per device"
                                        r".*train\.grad_accum_steps=8"):
    _check_accum_divisible(8, 8, 2)
  _check_accum_divisible(8, 4, 2)
