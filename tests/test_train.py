"""Training: the loss falls, steps compile once, eval is token-weighted, resume is exact, errors help."""

import json
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import tiny
from infinito_jax import checkpoint as ckpt_lib
from infinito_jax import data as data_lib
from infinito_jax.loss import token_cross_entropy
from infinito_jax.model import model_config
from infinito_jax.train import (NonFiniteLossError, Trainer, make_schedule, replica, state_from_items,
                                state_items, train_and_evaluate)


def tiny_config(**train):
  c = tiny.get_config()
  for k, v in train.items():
    c.train[k] = v
  return c


@pytest.fixture(scope="module")
def tiny_setup():
  config = tiny_config()
  mc = model_config(config.model)
  data = data_lib.prepare(config, mc)
  steps = len(data.batches("train", config.train.batch_size))
  trainer = Trainer(config, mc, steps)
  return config, data, trainer.train_batches(data), trainer  # a population of one


def leaves_equal(a, b):
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y))
                                    for x, y in zip(la, lb))


def test_random_offsets_reach_the_trainers_batches(tiny_setup):
  """--config.data.random_offsets=true: each replica's training batches come from windows
  shifted by its seed's offset per epoch (data.Batches), not the fixed windows; off, the
  batches are the fixed windows (today's runs unchanged)."""
  config, data, batches, _ = tiny_setup
  c = tiny_config(replicas=2)
  c.data.random_offsets = True
  shifted = Trainer(c, model_config(c.model), len(batches)).train_batches(data)
  for r, member in enumerate(shifted.members):
    assert member.seed == config.seed + r and member.ids is data.ids["train"]
  offsets = [m.offset(e) for m in shifted.members for e in range(4)]
  assert any(offsets), offsets
  e = next(e for e in range(4) if shifted.members[0].offset(e))
  got = shifted.batch(e, 0)["inputs"][0]
  want = batches.members[0].epoch_windows(e)[batches.members[0].order(e)[:len(got)], :-1]
  assert batches.members[0].ids is None and not np.array_equal(got, want)
  np.testing.assert_array_equal(got, shifted.members[0].epoch_windows(e)[
      shifted.members[0].order(e)[:len(got)], :-1])


def test_a_few_steps_lower_the_validation_loss_and_compile_once(tiny_setup):
  config, data, batches, trainer = tiny_setup
  valid = data.batches("validation", trainer.eval_batch_size)
  state = trainer.new_state()
  before = trainer.evaluate(state, valid)[0]["loss"]
  for epoch in range(2):
    for i in range(len(batches)):  # includes the padded last batch
      state, metrics = trainer.train_step(state, trainer.put(batches.batch(epoch, i)))
  after = trainer.evaluate(state, valid)[0]["loss"]
  assert state.step.tolist() == [2 * len(batches)]
  assert after < before - 0.5, (before, after)
  assert trainer.train_step._cache_size() == 1  # one shape, one compilation
  assert trainer.eval_step._cache_size() == 1
  # memory state is carried: the write changed the slots and the ages
  assert float(jnp.max(state.memory["memory"]["age"])) > 0
  assert math.isfinite(float(metrics["grad_norm"][0]))


def test_schedule_is_torch_cosine_annealing_per_batch():
  config = tiny_config(learning_rate=1e-4, min_learning_rate=1e-6, cosine_epochs=20)
  schedule = make_schedule(config, steps_per_epoch=7)
  t_max = 7 * 20
  for t in [0, 1, 50, 139, 140]:
    torch_lr = 1e-6 + (1e-4 - 1e-6) * (1 + math.cos(math.pi * t / t_max)) / 2
    assert abs(float(schedule(t)) - torch_lr) < 1e-10, t


def test_warmup_then_cosine():
  config = tiny_config(learning_rate=1e-3, min_learning_rate=0.0, warmup_steps=10)
  schedule = make_schedule(config, steps_per_epoch=10)
  assert float(schedule(0)) == 0.0
  assert abs(float(schedule(5)) - 5e-4) < 1e-9 and abs(float(schedule(10)) - 1e-3) < 1e-9


def test_eval_perplexity_is_token_weighted(tiny_setup):
  config, data, _, trainer = tiny_setup
  state = trainer.new_state()
  valid = data.batches("validation", trainer.eval_batch_size)
  report, = trainer.evaluate(state, valid)
  one = replica(state, 0)
  total = count = 0.0
  batch_means = []
  for batch in valid:
    logits, _ = trainer.model.apply({"params": one.params, "memory": one.memory},
                                    batch["inputs"])
    t, c = token_cross_entropy(logits, batch["targets"])
    total, count = total + float(t), count + float(c)
    batch_means.append(float(t) / float(c))
  assert report["tokens"] == int(count) == data.windows["validation"][:, 1:].size
  assert abs(report["loss"] - total / count) < 1e-5
  assert abs(report["perplexity"] - math.exp(total / count)) < 1e-3 * report["perplexity"]
  assert abs(np.mean(batch_means) - total / count) > 1e-6  # the per-batch mean would differ


def test_save_restore_round_trip(tiny_setup, tmp_path):
  config, _, batches, trainer = tiny_setup
  state = trainer.new_state()
  for i in range(3):
    state, _ = trainer.train_step(state, trainer.put(batches.batch(0, i)))
  progress = {"record": {"step": 3}, "history": [{"kind": "train", "step": 3}]}
  meta = {"format": ckpt_lib.FORMAT, "tokenizer": "x", "config": config.to_dict()}
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path))
  checkpointer.save(3, arrays=state_items(state), jsons={"progress": progress, "meta": meta},
                    keep=set())
  checkpointer.close()
  back = ckpt_lib.Checkpointer(str(tmp_path))
  restored = state_from_items(back.restore_arrays(3, state_items(trainer.abstract_state())))
  assert leaves_equal(state, restored)
  saved, meta_back = back.read_json(3, "progress"), back.read_meta(3)
  assert {k: v for k, v in meta_back.items() if k != "progress_sha256"} == meta
  assert {k: v for k, v in saved.items() if k not in ("checksums", "meta_sha256")} == progress
  # the JSON items hold each other's digests (meta's taken before progress's was added to it)
  assert saved["meta_sha256"] == ckpt_lib.json_digest(meta)
  assert meta_back["progress_sha256"] == ckpt_lib.json_digest(saved)
  # each array's checksum was written with it, and the restored arrays give the same
  assert saved["checksums"] == ckpt_lib.checksums(state_items(restored))
  assert set(saved["checksums"]) == {"params", "memory", "optimizer"}
  assert type(restored.opt_state) is type(state.opt_state)  # optax states, not plain lists
  assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(state)
  # and it trains on identically
  a, _ = trainer.train_step(state, trainer.put(batches.batch(0, 3)))
  b, _ = trainer.train_step(restored, trainer.put(batches.batch(0, 3)))
  assert leaves_equal(a, b)


def final_state(workdir):
  """The latest checkpoint of a run, restored whole (optimizer included), and its history."""
  c = ckpt_lib.Checkpointer(str(workdir), read_only=True)
  step = c.latest_step()
  config = ml_collections.ConfigDict(c.read_meta(step)["config"])
  mc = model_config(config.model)
  trainer = Trainer(config, mc, steps_per_epoch=1)
  state = state_from_items(c.restore_arrays(step, state_items(trainer.abstract_state())))
  history = c.read_json(step, "progress")["history"]
  c.close()
  return state, history


def validation_losses(history):
  return [r["loss"] for r in history if r["kind"] == "validation"]


def train_records(history):
  """The train records without their timing (tokens_per_s differs from run to run)."""
  return [{k: v for k, v in r.items() if k != "tokens_per_s"}
          for r in history if r["kind"] == "train"]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("straight")
  config = tiny_config(epochs=2)
  summary = train_and_evaluate(config, str(workdir))
  return workdir, summary


def test_straight_run_writes_history_summary_and_keeps_latest_and_best(straight_run):
  workdir, summary = straight_run
  assert summary["status"] == "completed" and summary["epochs_completed"] == 2
  lines = [json.loads(l) for l in (workdir / "history.jsonl").read_text().splitlines()]
  assert [r["epoch"] for r in lines if r["kind"] == "validation"] == [1, 2]
  assert json.loads((workdir / "summary.json").read_text())["best_val_loss"] == summary["best_val_loss"]
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert summary["best_step"] in steps and summary["steps"] in steps and len(steps) <= 2


@pytest.mark.slow
def test_resume_after_an_epoch_is_bitwise_identical(straight_run, tmp_path):
  workdir, _ = straight_run
  train_and_evaluate(tiny_config(epochs=1), str(tmp_path))
  summary = train_and_evaluate(tiny_config(epochs=2), str(tmp_path))
  assert summary["epochs_completed"] == 2
  a, meta_a = final_state(workdir)
  b, meta_b = final_state(tmp_path)
  assert a.step.tolist() == b.step.tolist()
  assert leaves_equal(a, b)  # params, optimizer state, memory, step, key
  assert validation_losses(meta_a) == validation_losses(meta_b)


@pytest.mark.slow
def test_resume_after_a_stop_mid_epoch_is_bitwise_identical(straight_run, tmp_path):
  workdir, _ = straight_run
  stopped = train_and_evaluate(tiny_config(epochs=2, stop_after_steps=17), str(tmp_path))
  assert stopped["status"] == "stopped" and stopped["steps"] == 17
  assert ckpt_lib.Checkpointer(str(tmp_path)).latest_step() == 17
  # step 17 is inside a logging window (log_every 5): its record says it is partial
  last = json.loads((tmp_path / "history.jsonl").read_text().splitlines()[-1])
  assert last["kind"] == "train" and last["step"] == 17 and last["partial"] is True
  before = (tmp_path / "history.jsonl").read_text()  # a command with nothing to do keeps it
  train_and_evaluate(tiny_config(epochs=2, stop_after_steps=17), str(tmp_path))
  assert (tmp_path / "history.jsonl").read_text() == before
  train_and_evaluate(tiny_config(epochs=2), str(tmp_path))
  a, meta_a = final_state(workdir)
  b, meta_b = final_state(tmp_path)
  assert leaves_equal(a, b)
  assert validation_losses(meta_a) == validation_losses(meta_b)
  # the resumed run logs windows 16..20 whole, as the straight run does: the same records
  assert train_records(meta_a) == train_records(meta_b)
  on_disk = [json.loads(l) for l in (tmp_path / "history.jsonl").read_text().splitlines()]
  assert train_records(on_disk) == train_records(meta_a)


def test_a_resume_with_another_log_every_keeps_the_partial_record_and_starts_new_windows(
    straight_run, tmp_path):
  """A stopped window cannot go on in windows of another length: its partial record stays, and
  the resumed run's first record covers only its own steps (not the stopped window's too)."""
  workdir, _ = straight_run
  train_and_evaluate(tiny_config(epochs=2, stop_after_steps=17), str(tmp_path))  # log_every 5
  summary = train_and_evaluate(tiny_config(epochs=2, log_every=1), str(tmp_path))
  assert summary["status"] == "completed"
  on_disk = [json.loads(l) for l in (tmp_path / "history.jsonl").read_text().splitlines()]
  train = {r["step"]: r for r in on_disk if r["kind"] == "train"}
  assert train[17]["partial"] is True  # steps 16 and 17, kept
  # then one record per step (log_every 1), none partial: no window spans the two settings
  assert [s for s in sorted(train) if s > 15] == list(range(17, summary["steps"] + 1))
  assert not any(r.get("partial") for s, r in train.items() if s != 17)
  # the straight run's window 16..20 is the same five losses: 2 in the partial record, 3 after
  _, straight_history = final_state(workdir)
  straight = {r["step"]: r for r in train_records(straight_history)}
  five = 2 * train[17]["loss"] + sum(train[s]["loss"] for s in (18, 19, 20))
  np.testing.assert_allclose(five / 5, straight[20]["loss"], rtol=1e-6)
  # and the training itself is the straight run's: the same validation losses, bitwise
  assert validation_losses(final_state(tmp_path)[1]) == validation_losses(straight_history)


def test_early_stopping_keeps_the_best_and_the_latest(tmp_path, capsys):
  # a learning rate too small to change float32 params: validation loss stays put
  config = tiny_config(epochs=6, patience=2, learning_rate=1e-30, min_learning_rate=1e-31,
                       weight_decay=0.0)
  summary = train_and_evaluate(config, str(tmp_path))
  assert summary["epochs_completed"] == 3  # best at 1, two epochs without improvement
  assert summary["best_epoch"] == 1
  steps = ckpt_lib.Checkpointer(str(tmp_path)).steps()
  assert steps == [summary["best_step"], summary["steps"]]
  # run again: nothing to do, and the advice names a value that trains on (patience 3 does)
  capsys.readouterr()
  assert train_and_evaluate(config, str(tmp_path))["steps"] == summary["steps"]
  assert "raise config.train.patience above 2 (now 2)" in capsys.readouterr().out
  config.train.patience = 3
  assert train_and_evaluate(config, str(tmp_path))["steps"] > summary["steps"]


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(tmp_path):
  train_and_evaluate(tiny_config(epochs=1), str(tmp_path))
  before = ckpt_lib.Checkpointer(str(tmp_path)).steps()
  with pytest.raises(NonFiniteLossError,
                     match=r"at step 3[1-9]\b. Training stopped; step 30, the last saved, "
                           r"is kept. .*resume from it: call train_and_evaluate again on "
                           r"the same workdir with the new values and "
                           r"config.train.allow_changes = True"):
    train_and_evaluate(tiny_config(epochs=2, learning_rate=1e30, min_learning_rate=1e29,
                                   allow_changes=True), str(tmp_path))
  assert ckpt_lib.Checkpointer(str(tmp_path)).steps() == before
  # summary.json says the run diverged, and where, not the 'completed' of the run it resumed;
  # its other fields stay those of the last evaluation, which the checkpoints hold
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["status"] == "diverged"
  assert summary["diverged"]["replicas"] == [0] and 31 <= summary["diverged"]["step"] <= 39
  assert summary["steps"] == max(before)
  state, _ = final_state(tmp_path)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(state.params))


def _finite_leaves(state) -> bool:
  return all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(state.params))


def test_a_diverging_run_never_saves_non_finite_weights(tmp_path):
  """A step whose loss is still finite can make the weights non-finite: by its gradient norm
  (NaN: the update is NaN), or by an update that overflows. Saving every step, such a step
  was saved and the last finite one deleted (the next step's loss said so one step late).
  The run now stops at that step on its gradient norm, or on a check of the weights before
  each save, and keeps the last finite step."""
  config = tiny_config(epochs=1, learning_rate=1e8, clip_norm=1e30)
  config.checkpoint.every_steps = 1
  with pytest.raises(NonFiniteLossError, match=r"the gradient norm became nan at step (\d+)") as e:
    train_and_evaluate(config, str(tmp_path / "a"))
  steps = ckpt_lib.Checkpointer(str(tmp_path / "a")).steps()
  assert steps == [e.value.step - 1]  # every step before it was saved; the latest is kept
  assert _finite_leaves(final_state(tmp_path / "a")[0])
  summary = json.loads((tmp_path / "a" / "summary.json").read_text())
  assert summary["diverged"] == {"step": e.value.step, "replicas": [0]}
  # diverged before the first checkpoint: nothing to resume from, and the error says so
  config.checkpoint.every_steps = 0
  with pytest.raises(NonFiniteLossError, match=r"before its first checkpoint: nothing was "
                                               r"saved. .*train again with fresh=True") as e:
    train_and_evaluate(config, str(tmp_path / "c"))
  from infinito_jax import evaluate  # pylint: disable=import-outside-toplevel
  with pytest.raises(ckpt_lib.CheckpointError, match=rf"its run diverged at step {e.value.step} "
                                                     r"before its first save"):  # not "yet"
    evaluate.restore_run(str(tmp_path / "c"))
  # one group of a sweep diverges (train.on_divergence='stop'; 'freeze' trains the others on:
  # test_population.py): the error names the replica, its values, and what to lower where
  # the group sets it (train.replica_hparams), not the train.* value it overrides
  config = tiny_config(epochs=1, replicas=2, on_divergence="stop",
                       replica_hparams="learning_rate=3e-3;learning_rate=1e8,clip_norm=1e30")
  with pytest.raises(NonFiniteLossError, match=r"of replica 1 \(train.replica_hparams values "
                                               r"\{'learning_rate': 100000000.0, .*Lower its group's "
                                               r"learning_rate, clip_norm or weight_decay in "
                                               r"train.replica_hparams") as e:
    train_and_evaluate(config, str(tmp_path / "d"))
  assert e.value.replicas == [1]
  # an update that overflows while the step's loss and gradient norm stay finite: AdamW's
  # first step moves each weight by lr * (about 1 + weight_decay * |w|), past float32's range
  train_and_evaluate(tiny_config(epochs=1), str(tmp_path / "b"))
  before = ckpt_lib.Checkpointer(str(tmp_path / "b")).steps()
  config = tiny_config(epochs=2, learning_rate=3.4e38, min_learning_rate=0.0, weight_decay=0.6,
                       allow_changes=True)
  config.checkpoint.every_steps = 1
  with pytest.raises(NonFiniteLossError, match=rf"the parameters became non-finite at step "
                                               rf"{max(before) + 1}\b") as e:
    train_and_evaluate(config, str(tmp_path / "b"))
  assert e.value.step == max(before) + 1 and e.value.replicas == [0]
  assert ckpt_lib.Checkpointer(str(tmp_path / "b")).steps() == before
  assert _finite_leaves(final_state(tmp_path / "b")[0])


def test_non_finite_weights_are_found_per_replica(tiny_setup):
  """Trainer.non_finite names the replicas whose weights or memory hold a NaN or infinity."""
  config, data, batches, _ = tiny_setup
  trainer = Trainer(tiny_config(replicas=3), model_config(config.model), len(batches))
  state = trainer.new_state()
  assert trainer.non_finite(state).tolist() == []
  path = jax.tree_util.tree_flatten_with_path(state.params)[0][0][0]  # one leaf of replica 1
  poisoned = jax.tree_util.tree_map_with_path(
      lambda p, x: x.at[1].set(jnp.inf) if p == path else x, state.params)
  assert trainer.non_finite(state.replace(params=poisoned)).tolist() == [1]
  memory = jax.tree_util.tree_map(
      lambda x: x.at[2].set(jnp.nan) if jnp.issubdtype(x.dtype, jnp.floating) else x,
      state.memory)
  assert trainer.non_finite(state.replace(memory=memory)).tolist() == [2]


def test_every_n_steps_saves_inside_epochs_and_keeps_only_latest_and_best(tmp_path, monkeypatch):
  saved = []
  real_save = ckpt_lib.Checkpointer.save

  def recording_save(self, step, **kw):  # the real save, recorded
    saved.append((step, kw["jsons"]["progress"]["record"]["replicas"][0]["best_step"], kw["wait"]))
    return real_save(self, step, **kw)

  monkeypatch.setattr(ckpt_lib.Checkpointer, "save", recording_save)
  config = tiny_config(epochs=1)
  config.checkpoint.every_steps = 7
  summary = train_and_evaluate(config, str(tmp_path))
  assert [s[0] for s in saved] == [7, 14, 21, 28, 30]
  assert saved[0][1:] == (None, False)  # mid-epoch: no validation yet, asynchronous
  assert saved[-1][1:] == (30, True)  # epoch end: validated, the best, waited for
  assert ckpt_lib.Checkpointer(str(tmp_path)).steps() == [summary["steps"]]
  # each save ends a logging window early (log_every 5): its record says over how many steps
  # its loss is the mean
  records = [r for r in final_state(tmp_path)[1] if r["kind"] == "train"]
  steps = [r["step"] for r in records]
  assert steps == [5, 7, 10, 14, 15, 20, 21, 25, 28, 30]
  assert [r["steps_averaged"] for r in records] == list(np.diff([0] + steps))


def test_a_diverged_but_finite_run_ends_with_a_summary(tmp_path, capsys):
  """A learning rate of 50 drives the validation loss far above 700 nats while it stays finite:
  the run finishes and its summary reads the perplexity as exp(700), instead of an OverflowError
  in every summary of that run (each resume crashed again at the same place); the validation
  line says that number is the cap, not a measured perplexity."""
  config = tiny_config(epochs=1, learning_rate=50.0)
  config.model.exploration = False
  summary = train_and_evaluate(config, str(tmp_path))
  assert summary["status"] == "completed"
  assert summary["best_val_loss"] > 700 and math.isfinite(summary["best_val_loss"])
  assert summary["best_val_perplexity"] == math.exp(700.0)
  assert "perplexity 1.014e+304 (the cap: a loss of 700 nats or more)" in capsys.readouterr().out


def test_tokens_per_s_leaves_out_what_precedes_a_clock_restart():
  """train records' tokens_per_s is training throughput: the steps before a restart of the
  clock (the compiling step, a validation, a save) and the time they took are left out; a
  window of untimed steps alone has no rate."""
  import time  # pylint: disable=g-import-not-at-top
  from infinito_jax.train import TrainMetrics  # pylint: disable=g-import-not-at-top

  def step(tokens):
    return {"loss": jnp.ones(1), "learning_rate": jnp.ones(1), "grad_norm": jnp.ones(1),
            "tokens": jnp.full(1, tokens)}

  m = TrainMetrics()
  m.add(0, step(1000.0))
  time.sleep(0.3)  # a compile, say
  m.restart_clock(after=jnp.ones(1))
  t0 = time.time()
  for i in (1, 2):
    m.add(i, step(100.0))
  time.sleep(0.1)
  rec = m.fetch()
  elapsed = time.time() - t0
  assert rec["step"] == 3
  assert 200.0 / elapsed <= rec["tokens_per_s"] <= 200.0 / 0.1  # the two timed steps only
  m.add(3, step(100.0))
  m.restart_clock()
  assert "tokens_per_s" not in m.fetch()  # only a step before the restart: no rate
  m.add(4, step(100.0))
  time.sleep(0.05)
  assert 0 < m.fetch()["tokens_per_s"] <= 100.0 / 0.05  # the next window counts again


def test_keep_best_false_resumes_with_the_records_best_and_patience(tmp_path):
  """checkpoint.keep_best=false keeps no checkpoint of the best step, by design: a resumed run
  keeps the record's best loss and step and counts its patience from them, so it stops where
  the uninterrupted run stops (it used to take the absent checkpoint for a lost one, drop the
  best, and train on past the early stop with a worse 'best')."""
  def cfg(**train):
    c = tiny_config(epochs=12, patience=3, learning_rate=1e-2, **train)
    c.data.corpus.train_words = 800  # 6 steps an epoch, over-fitted from epoch 3 on
    c.checkpoint.keep_best = False
    c.log.plot = c.log.tensorboard = False
    return c

  whole = train_and_evaluate(cfg(), str(tmp_path / "whole"))
  assert whole["status"] == "early_stopped" and whole["best_step"] < whole["steps"]
  train_and_evaluate(cfg(stop_after_steps=whole["best_step"] + 3), str(tmp_path / "split"))
  assert ckpt_lib.Checkpointer(str(tmp_path / "split")).steps() == [whole["best_step"] + 3]
  split = train_and_evaluate(cfg(), str(tmp_path / "split"))
  for k in ("status", "steps", "best_step", "best_val_loss"):
    assert split[k] == whole[k], k


def test_progress_numbers_of_a_run_gone_astray_are_short():
  """A population's validation line printed a perplexity of exp(699) with its 300 digits and
  its spread as 'inf'."""
  from infinito_jax import stats  # pylint: disable=import-outside-toplevel
  _num = stats.num
  assert _num(48.123) == "48.12" and _num(5.0712e303) == "5.071e+303"
  big = np.array([5.07e303, 1.2e138, 4.9e303, 5.1e303])
  mean, std = stats.mean_std(big)  # np.std overflows to inf here
  unit = 2.0 ** 1000
  assert _num(std) == _num(np.std(big / unit, ddof=1) * unit) == "2.513e+303", (mean, std)


def test_a_population_asked_to_end_when_its_groups_diverge_ends_once_each_group_has_one():
  """train_and_evaluate(end_when_groups_diverge=True) (a study's runs): with
  train.on_divergence='freeze' a replica that diverges is frozen and the run trains on while
  some group of train.replica_hparams has none; the fetch that finds the last group's first
  divergence raises the divergence error with every frozen replica and the step of each, and
  nothing before it. Without `ends`, only every replica frozen ends the run."""
  from infinito_jax.errors import NonFiniteLossError  # pylint: disable=g-import-not-at-top
  from infinito_jax.train import TrainMetrics  # pylint: disable=g-import-not-at-top

  def step(live, loss):  # 4 replicas in 2 groups: 0, 1 | 2, 3
    return {"loss": np.asarray(loss, np.float32), "grad_norm": np.ones(4, np.float32),
            "learning_rate": np.ones(4, np.float32), "tokens": np.ones(4, np.float32),
            "live": np.asarray(live)}

  nan = float("nan")
  for ends in ([0, 0, 1, 1], None):
    m = TrainMetrics(diverged=[None] * 4, ends=ends)
    m.add(0, step([True, True, False, True], [1.0, 1.0, nan, 1.0]))  # group 1: frozen at 1
    m.add(1, step([True, True, False, False], [1.0, 1.0, 1.0, nan]))  # group 1 again
    rec = m.fetch()
    assert m.diverged == [None, None, 1, 2] and [f["replica"] for f in m.frozen] == [2, 3]
    assert rec["replica_losses"] == [1.0, 1.0, None, 1.0]  # 3's step before it froze
    m.frozen.clear()
    m.add(2, step([False, True, False, False], [nan, 1.0, 1.0, 1.0]))  # group 0: replica 0
    if ends is None:  # replica 1 still trains: the run goes on
      assert m.fetch()["replica_losses"] == [None, 1.0, None, None]
      assert m.diverged == [3, None, 1, 2]
      continue
    with pytest.raises(NonFiniteLossError, match=r"every group of the population has a "
                                                 r"diverged replica \(replica 2 at step 1, "
                                                 r"replica 3 at step 2, replica 0 at step 3\)"
                       ) as info:
      m.fetch()
    assert (info.value.replicas, info.value.replica_steps, info.value.step) == (
        [0, 2, 3], [3, None, 1, 2], 3)
