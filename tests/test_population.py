"""Populations: N replicas trained in one vmapped program are N single runs, seed + r each."""

import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import tiny
from infinito_jax import evaluate
from infinito_jax.errors import ConfigError, NonFiniteLossError
from infinito_jax import train as train_lib
from infinito_jax.train import replica, train_and_evaluate
from test_train import final_state, leaves_equal, tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[1]

SEED = 42


def population_config(replicas=3, **train):
  # the original's learning rate: at 3e-3 Adam's sign-like steps turn the rounding of batched
  # matmuls (vmap) into ~2e-5 differences in a few near-zero-gradient weights within 30 steps
  c = tiny_config(epochs=1, replicas=replicas, **{"learning_rate": 1e-4, **train})
  c.seed = SEED
  c.data.corpus.seed = SEED  # the population's corpus: single runs of seed + r read the same text
  return c


def max_diff(a, b, skip=()):
  """Largest absolute difference over the leaves of two trees (paths containing `skip` left out)."""
  out = 0.0
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)):
    if not any(s in jax.tree_util.keystr(path) for s in skip):
      out = max(out, float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y)))))
  return out


@pytest.fixture(scope="module")
def population(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("population")
  summary = train_and_evaluate(population_config(), str(workdir))
  return workdir, summary


def history_of(workdir):
  return [json.loads(line) for line in (workdir / "history.jsonl").read_text().splitlines()]


def test_replica_r_equals_the_single_run_of_seed_plus_r(population, tmp_path):
  workdir, summary = population
  pop_state, _ = final_state(workdir)
  pop_val = {r["replica"]: r["loss"] for r in history_of(workdir) if r["kind"] == "validation"}
  for r in (0, 2):
    single = population_config(replicas=1)
    single.seed = SEED + r
    train_and_evaluate(single, str(tmp_path / f"seed{SEED + r}"))
    one, history = final_state(tmp_path / f"seed{SEED + r}")
    mine = replica(pop_state, r)
    # the key projection's bias cannot change attention (softmax ignores a shift per query):
    # its gradient is rounding noise, which Adam scales up to a full step whatever the batching
    assert max_diff(mine.params, replica(one.params, 0), skip=("k_proj']['bias",)) < 1e-5
    assert max_diff(mine.params, replica(one.params, 0)) < 30 * single.train.learning_rate  # Adam: <= lr a step
    assert max_diff(mine.memory, replica(one.memory, 0)) < 1e-5
    assert np.array_equal(np.asarray(mine.rng), np.asarray(one.rng[0]))  # the same key, bitwise
    single_val = [h["loss"] for h in history if h["kind"] == "validation"][-1]
    assert abs(pop_val[r] - single_val) < 1e-5
    assert summary["replicas"][r]["seed"] == SEED + r
  # and the replicas are different runs
  assert max_diff(replica(pop_state.params, 0), replica(pop_state.params, 1)) > 1e-2
  assert len({round(v, 6) for v in pop_val.values()}) == 3


def test_summary_and_history_hold_every_replica(population):
  workdir, summary = population
  on_disk = json.loads((workdir / "summary.json").read_text())
  assert [r["replica"] for r in on_disk["replicas"]] == [0, 1, 2]
  vals = [r for r in history_of(workdir) if r["kind"] == "validation"]
  for r, rep in enumerate(on_disk["replicas"]):
    mine = [v["loss"] for v in vals if v["replica"] == r]
    assert rep["best_val_loss"] == min(mine) and rep["final_val_loss"] == mine[-1]
    assert rep["best_step"] == 30
  best = int(np.argmin([r["best_val_loss"] for r in on_disk["replicas"]]))
  assert on_disk["best_replica"] == best
  assert on_disk["best_val_loss"] == on_disk["replicas"][best]["best_val_loss"]
  ppl = [r["best_val_perplexity"] for r in on_disk["replicas"]]
  assert abs(on_disk["population"]["best_val_perplexity_std"] - np.std(ppl, ddof=1)) < 1e-9
  assert on_disk["parameters"] == summary["parameters"] < 50_000  # one replica's count


def test_evaluate_scores_every_replica_or_the_one_asked_for(population, tmp_path):
  """Every replica is scored at its own best step; the top level is the best replica's, and
  says so ('lead'); a population with no validation yet leads with replica 0 and says that
  nothing ranks them (it was labelled 'best in training'). Whether the oracle is exact for the
  scored text is reported as training reports it."""
  workdir, summary = population
  report = evaluate.run(str(workdir))
  assert report["lead"] == "the best in training"
  on_disk = json.loads((workdir / "summary.json").read_text())
  assert report["oracle_applies"] == on_disk["corpus"]["oracle_applies"]
  assert [r["replica"] for r in report["replicas"]] == [0, 1, 2]
  for r, row in enumerate(report["replicas"]):  # the validation split, as in training
    assert abs(row["loss"] - summary["replicas"][r]["best_val_loss"]) < 1e-6
  assert report["replica"] == summary["best_replica"]
  assert abs(report["population"]["perplexity_mean"]
             - np.mean([r["perplexity"] for r in report["replicas"]])) < 1e-9
  one = evaluate.run(str(workdir), replica=1)
  assert one["replica"] == 1 and "replicas" not in one and one["lead"] == "the one asked for"
  asked = evaluate.run(str(workdir), replica=summary["best_replica"])  # the best, yet asked for
  assert asked["lead"] == "the one asked for"
  assert abs(one["loss"] - report["replicas"][1]["loss"]) < 1e-6
  with pytest.raises(ConfigError, match=r"replica 3: the run has 3 replica\(s\), 0..2"):
    evaluate.run(str(workdir), replica=3)
  train_and_evaluate(population_config(stop_after_steps=5), str(tmp_path / "young"))
  young = evaluate.run(str(tmp_path / "young"))
  assert young["replica"] == 0 and young["lead"] == "the first: no validation yet to rank them"


def test_a_population_resumed_after_a_stop_equals_the_uninterrupted_one(population, tmp_path):
  workdir, _ = population
  config = population_config(stop_after_steps=17)  # mid-epoch
  train_and_evaluate(config, str(tmp_path))
  config.train.stop_after_steps = 0
  train_and_evaluate(config, str(tmp_path))
  a, history_a = final_state(tmp_path)
  b, history_b = final_state(workdir)
  assert leaves_equal(a, b)  # bitwise: parameters, optimizer, memory and keys of every replica
  val = lambda h: [(r["replica"], r["loss"]) for r in h if r["kind"] == "validation"]
  assert val(history_a) == val(history_b)


def test_replicas_of_one_key_are_bitwise_identical(tmp_path):
  """seed_stride=0: every replica is the run of the same seed; explicit keys make them equal."""
  train_and_evaluate(population_config(replicas=2, seed_stride=0), str(tmp_path))
  state, history = final_state(tmp_path)
  assert leaves_equal(replica(state, 0), replica(state, 1))
  val = [r["loss"] for r in history if r["kind"] == "validation"]
  assert len(val) == 2 and val[0] == val[1]


def test_replica_settings_that_cannot_work_are_refused(tmp_path):
  for field, value, message in [("replicas", 0, "must be an integer >= 1"),
                                ("seed_stride", -1, "must be an integer >= 0")]:
    with pytest.raises(ConfigError, match=message):
      train_and_evaluate(population_config(**{field: value}), str(tmp_path / field))
    assert not (tmp_path / field).exists()


@pytest.mark.slow
def test_evaluate_py_writes_one_replica_beside_the_population_report(population):
  import os, subprocess, sys  # pylint: disable=g-import-not-at-top,multiple-imports
  workdir, summary = population
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  for extra in ([], ["--replica", "1"]):
    out = subprocess.run([sys.executable, "evaluate.py", "--ckpt", str(workdir), *extra], cwd=root,
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
  everyone = json.loads((workdir / "eval_validation_step30.json").read_text())
  one = json.loads((workdir / "eval_validation_step30_replica1.json").read_text())
  assert len(everyone["replicas"]) == 3 and one["replica"] == 1 and "replicas" not in one
  assert "Scored replica 1 (seed 43)" in out.stdout
  assert abs(one["loss"] - summary["replicas"][1]["best_val_loss"]) < 1e-6


def test_replica_hparams_groups_equal_their_single_runs(tmp_path):
  """train.replica_hparams: 2 groups of optimisation values x 2 seeds in one population; replica
  (group g, seed s) equals the single run of seed s with group g's values (parameters, memory
  and validation loss within 1e-5), the summary names each replica's values, and the two
  groups' runs really differ. The population is stopped mid-epoch and resumed on the way."""
  groups = "learning_rate=1e-4;learning_rate=3e-4,warmup_steps=5,weight_decay=0.1,b2=0.99"
  config = population_config(replicas=4, replica_hparams=groups, stop_after_steps=17)
  train_and_evaluate(config, str(tmp_path / "pop"))  # stopped mid-epoch, then resumed
  config.train.stop_after_steps = 0
  summary = train_and_evaluate(config, str(tmp_path / "pop"))
  assert [r["seed"] for r in summary["replicas"]] == [SEED, SEED + 1, SEED, SEED + 1]
  assert [r["hparams"]["learning_rate"] for r in summary["replicas"]] == [1e-4, 1e-4, 3e-4, 3e-4]
  pop_state, pop_history = final_state(tmp_path / "pop")
  pop_val = {r["replica"]: r["loss"] for r in pop_history if r["kind"] == "validation"}
  # replica 2: the second group's first seed (the first group's replicas are the plain
  # population's, checked against their single runs above)
  for r, seed, values in ((2, SEED, dict(learning_rate=3e-4, warmup_steps=5, weight_decay=0.1,
                                         b2=0.99)),):
    single = population_config(replicas=1, **values)
    single.seed = seed
    train_and_evaluate(single, str(tmp_path / f"single{r}"))
    one, history = final_state(tmp_path / f"single{r}")
    mine = replica(pop_state, r)
    assert max_diff(mine.params, replica(one.params, 0), skip=("k_proj']['bias",)) < 1e-5
    assert max_diff(mine.memory, replica(one.memory, 0)) < 1e-5
    assert abs(pop_val[r] - [h["loss"] for h in history if h["kind"] == "validation"][-1]) < 1e-5
    lr = {h["step"]: h["learning_rate"] for h in history if h["kind"] == "train"}
    pop_lr = {h["step"]: h["replica_learning_rates"][r] for h in pop_history
              if h["kind"] == "train" and h["step"] in lr}  # the resumed run logs step 17 too
    assert len(pop_lr) == len(lr) >= 5
    np.testing.assert_allclose([pop_lr[k] for k in lr], list(lr.values()), rtol=1e-5)
  # the same seed under the two groups' values: different runs
  assert max_diff(replica(pop_state.params, 0), replica(pop_state.params, 2)) > 1e-3
  # evaluate.py's report names each replica's values too: the seeds alone repeat per group
  report = evaluate.run(str(tmp_path / "pop"), replica=2)
  assert report["seed"] == SEED and report["hparams"] == summary["replicas"][2]["hparams"]
  assert report["hparams"]["learning_rate"] == 3e-4
  # the population's statistics group by group too (the pooled ones mix two recipes)
  best = [r["best_val_perplexity"] for r in summary["replicas"]]
  for g, (group, mine) in enumerate(zip(summary["population"]["groups"], ([0, 1], [2, 3]))):
    assert group["of_replicas"] == mine and group["replicas"] == 2
    assert group["hparams"] == summary["replicas"][mine[0]]["hparams"]
    assert group["best_val_perplexity_mean"] == pytest.approx(np.mean([best[r] for r in mine]))
    assert group["best_val_perplexity_std"] == pytest.approx(np.std([best[r] for r in mine],
                                                                    ddof=1))
  whole = evaluate.run(str(tmp_path / "pop"))
  ppl = [r["perplexity"] for r in whole["replicas"]]
  assert [(g["of_replicas"], g["hparams"]["learning_rate"], g["perplexity_max"])
          for g in whole["population"]["groups"]] == [
              ([0, 1], 1e-4, max(ppl[:2])), ([2, 3], 3e-4, max(ppl[2:]))]


def test_replica_hparams_that_cannot_work_are_refused(tmp_path):
  for groups, replicas, message in [
      ("learning_rate=1e-3;dropout=0.2", 2, "'dropout' cannot differ between replicas: it "
                                            "changes the model"),
      ("learning_rate=1e-3;epochs=2", 2, "'epochs' cannot differ between replicas: it is not a "
                                         "value of the optimiser. The keys that can are"),
      ("learning_rate;", 2, "'learning_rate' is not KEY=VALUE with KEY one of"),
      ("train.learning_rate=1e-3;", 2, "write 'learning_rate', not 'train.learning_rate'"),
      ("learning_rate=fast", 2, "is not a finite decimal number"),
      ("learning_rate=1e-3;learning_rate=2e-3", 3, "is not a multiple of it"),
      ("b2=1.5", 2, "b2=1.5 must be in \\[0, 1\\)"),
      ("learning_rate=1e-3,learning_rate=2e-3;", 2, "sets learning_rate twice"),
      ("learning_rate=inf;", 2, "is not a finite decimal number"),
      ("learning_rate=1_0;", 2, "is not a finite decimal number"),
      ("warmup_steps=2.5;", 2, "must be a whole number"),
      ("min_learning_rate=1;learning_rate=2e-3", 2, "must be in \\[0, learning_rate\\]"),
      # groups that merge to the same values: replicas of the same seeds, bitwise alike
      ("learning_rate=1e-3;learning_rate=0.001", 2, "groups 0 .* and 1 .* give the same values"),
      # equal as the float32 step holds them
      ("learning_rate=1e-3;learning_rate=1.00000000001e-3", 2, "groups 0 .* and 1 .* give the "
                                                              "same values"),
      ("learning_rate=1e-4;", 2, "groups 0 .* and 1 \\(empty: the train.\\* values\\) give the "
                                 "same values")]:
    with pytest.raises(ConfigError, match=message):
      train_and_evaluate(population_config(replicas=replicas, replica_hparams=groups),
                         str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()


def test_the_number_of_replica_hparams_groups_cannot_change_on_resume(tmp_path):
  """The number of groups decides each replica's seed (and data order): a resume with another
  number is refused even with allow_changes, and nothing saved is touched."""
  config = population_config(replicas=4, replica_hparams="learning_rate=1e-4;learning_rate=3e-4",
                             stop_after_steps=5)
  train_and_evaluate(config, str(tmp_path))
  before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
  config.train.replica_hparams = "learning_rate=1e-4;learning_rate=3e-4;learning_rate=5e-4;b1=0.8"
  config.train.allow_changes, config.train.stop_after_steps = True, 0
  with pytest.raises(ConfigError, match="trained with 2 group.* asked for 4"):
    train_and_evaluate(config, str(tmp_path))
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before


def test_group_statistics_count_and_name_each_group_by_the_replicas_it_counts():
  """The per-group statistics of a population with train.replica_hparams: each group's mean,
  sample std, min and max over the replicas it counts (None: left out, e.g. frozen), labelled
  with the values those replicas were trained with: not a left-out one's, and none where the
  counted ones differ (a resume changed them between their steps), each one's then listed."""
  from infinito_jax.train import group_statistics  # pylint: disable=import-outside-toplevel
  config = population_config(replicas=4, replica_hparams="learning_rate=1e-3;learning_rate=3e-3")
  a, b, c = ({"learning_rate": x} for x in (1e-3, 3e-3, 5e-3))
  g0, g1 = group_statistics(config, [10.0, 12.0, None, 20.0], "ppl", labels=[a, a, b, c])
  assert g0 == {"hparams": a, "of_replicas": [0, 1], "replicas": 2, "ppl_mean": 11.0,
                "ppl_std": pytest.approx(2 ** 0.5), "ppl_min": 10.0, "ppl_max": 12.0}
  assert (g1["hparams"], g1["replicas"], g1["ppl_mean"]) == (c, 1, 20.0)  # not b's: frozen
  (g1,) = group_statistics(config, [19.0, 20.0], "ppl", [2, 3], labels=[b, c])
  assert g1["hparams"] is None and g1["hparams_of_replicas"] == [b, c] and g1["replicas"] == 2
  (g0,) = group_statistics(config, [None, None], "ppl", [0, 1])  # none counted: the config's
  assert g0 == {"hparams": train_lib.replica_groups(config)[0], "of_replicas": [0, 1],
                "replicas": 0}


@pytest.mark.slow
def test_values_changed_on_resume_are_reported_beside_the_best_they_did_not_train(tmp_path):
  """A resume with allow_changes that changes a group's values: summary.json's `hparams` are
  the values each replica trains with now, and `best_hparams` those its best step was trained
  with where they differ; evaluate.py's rows give the values of the step each one scores (its
  best, trained before the change), not the latest config's."""
  config = population_config(replicas=2, replica_hparams="learning_rate=1e-3;learning_rate=3e-3")
  config.train.epochs = 2
  first = train_and_evaluate(config, str(tmp_path))  # to learn the steps per epoch
  spe = first["steps_per_epoch"]
  where = tmp_path / "resumed"
  config.train.stop_after_steps = spe
  train_and_evaluate(config, str(where))
  config.train.stop_after_steps, config.train.allow_changes = 0, True
  config.train.replica_hparams = "learning_rate=1e-3;learning_rate=3.0"  # far worse: no new best
  summary = train_and_evaluate(config, str(where))
  r0, r1 = summary["replicas"]
  assert r1["best_step"] == spe and r0["best_step"] == 2 * spe, summary
  assert r1["hparams"]["learning_rate"] == 3.0 and r1["best_hparams"]["learning_rate"] == 3e-3
  assert {k: v for k, v in r1["best_hparams"].items() if k != "learning_rate"} == {
      k: v for k, v in r1["hparams"].items() if k != "learning_rate"}
  assert "best_hparams" not in r0 and r0["hparams"]["learning_rate"] == 1e-3  # unchanged
  assert first["replicas"][1].get("best_hparams") is None  # no change, none said
  report = evaluate.run(str(where))
  assert [(r["step"], r["hparams"]["learning_rate"]) for r in report["replicas"]] == [
      (2 * spe, 1e-3), (spe, 3e-3)]
  one = evaluate.run(str(where), replica=1)
  assert (one["step"], one["hparams"]["learning_rate"]) == (spe, 3e-3)


def test_population_forms_vmap_and_map_compute_the_same_steps(monkeypatch):
  """INFINITO_POPULATION: a population's train and eval steps compiled as a loop over the
  replicas ('map', the CPU default, and 'map_stacked', the whole step in a lax.map) compute
  what the batched vmap ('vmap') computes, to float rounding, and each replica keeps its own
  numbers; 'map' updates the donated population state outside its loop, where 'map_stacked'
  copies at least the whole state every step; the replica axis sharded over devices keeps
  vmap; an unknown form is refused by name."""
  import sys
  from infinito_jax.model import model_config
  from infinito_jax.train import Trainer, population_form
  sys.path.insert(0, str(__import__("pathlib").Path(__file__).parents[1] / "bench"))
  try:
    import step_speed
  finally:
    sys.path.pop(0)
  results, programs, copies = {}, {}, {}
  forms = ("vmap", "map", "map_stacked")
  for form in forms:
    monkeypatch.setenv("INFINITO_POPULATION", form)
    config = step_speed.make_config("tiny", False, replicas=2)
    trainer = Trainer(config, model_config(config.model), steps_per_epoch=100)
    rng = np.random.default_rng(0)
    batch = trainer.put({k: rng.integers(3, 1000, (2, 8, 64)).astype(np.int32)
                         for k in ("inputs", "targets")})
    state = trainer.new_state()
    programs[form] = str(jax.make_jaxpr(trainer.train_step)(state, batch))
    copies[form] = step_speed.copy_mib(trainer.train_step.lower(state, batch).compile().as_text())
    state_mib = sum(x.nbytes for x in jax.tree_util.tree_leaves(state)) / 2**20
    params_mib = sum(x.nbytes for x in jax.tree_util.tree_leaves(state.params)) / 2**20
    losses = []
    for _ in range(3):
      state, metrics = trainer.train_step(state, batch)
      losses.append(np.asarray(metrics["loss"]))
    scores = trainer.scorer.step(state.params, state.memory,
                                 jax.device_put({k: v[0] for k, v in batch.items()}))
    results[form] = (np.stack(losses), jax.tree_util.tree_leaves(state.params),
                     jax.tree_util.tree_leaves(state.memory), jax.tree_util.tree_leaves(scores))
  # both loops are scans in the program; vmap has none
  assert all(" scan[" in programs[f] for f in forms[1:]) and " scan[" not in programs["vmap"]
  assert copies["map_stacked"] >= 0.9 * state_mib > 1.0, (copies, state_mib)
  # 'map' copies at most the zero starts of its stacked gradients, never parameters or moments
  assert copies["map"] < params_mib, (copies, params_mib)
  assert programs["map"] != programs["map_stacked"]
  l1, p1, m1, s1 = results["vmap"]
  for form in forms[1:]:
    l2, p2, m2, s2 = results[form]
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    for a, b in zip(p1 + m1 + s1, p2 + m2 + s2):
      assert a.shape == b.shape
      np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                                 rtol=1e-4, atol=1e-5)
  assert l1[0, 0] != l1[2, 0] and l1[2, 0] != l1[2, 1]  # trained, and two different replicas
  monkeypatch.delenv("INFINITO_POPULATION")
  assert population_form(sharded=False) == "map" and population_form(sharded=True) == "vmap"
  monkeypatch.setenv("INFINITO_POPULATION", "batched")
  with pytest.raises(ConfigError, match="INFINITO_POPULATION='batched'"):
    population_form()


def test_a_population_too_large_for_the_memory_is_refused_before_anything_is_made(tmp_path):
  """train.replicas whose training state alone exceeds the devices' (here the host's) memory:
  one ConfigError naming the sizes and a count that fits, and no workdir left behind."""
  from infinito_jax.train import device_memory_bytes, train_and_evaluate  # noqa: PLC0415
  from infinito_jax.train import make_mesh  # noqa: PLC0415
  config = tiny.get_config()
  available, _ = device_memory_bytes(make_mesh(0))
  config.train.replicas = int(available // (100 * 1024)) + 1  # > memory / 100 KiB
  with pytest.raises(ConfigError, match=rf"train.replicas={config.train.replicas}: the training "
                     r"state alone .* MiB per replica, .* GiB in all, more than .* Use at most "
                     r"\d+ replicas"):
    train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()
  # also a count far past any memory: refused before anything of that length is made (the
  # seeds' list of 10**9 was made first once, and the command hung instead)
  out = subprocess.run([sys.executable, "train.py", "--config", "configs/tiny.py", "--workdir",
                        str(tmp_path / "huge"), "--config.train.replicas=1000000000"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode == 1 and "train.replicas=1000000000: the training state" in out.stderr
  assert not (tmp_path / "huge").exists()


@pytest.mark.parametrize("rng_impl", ["rbg", "unsafe_rbg"])
def test_rbg_replica_r_is_the_run_of_seed_plus_r_in_either_form(rng_impl, monkeypatch):
  """train.rng_impl='rbg'/'unsafe_rbg': JAX's batching rule for XLA's RngBitGenerator draws a
  whole vmapped batch from the first key, which made replica r >= 1 of a population another
  run than seed + r (its init, and its dropout and noise in the 'vmap' form) and replicas of
  one key differ; infinito_jax.prng draws from each key. Replica r's initial parameters are
  bitwise those of the single run of seed + r, and its losses over three steps equal that
  run's in both population forms; replicas of one key stay bitwise equal under vmap."""
  from infinito_jax.model import model_config
  from infinito_jax.train import Trainer
  sys.path.insert(0, str(ROOT / "bench"))
  try:
    import step_speed
  finally:
    sys.path.pop(0)
  rng = np.random.default_rng(0)
  batch = {k: rng.integers(3, 1000, (2, 4, 32)).astype(np.int32) for k in ("inputs", "targets")}

  def run(replicas, seed, rows, form="vmap", stride=1):
    monkeypatch.setenv("INFINITO_POPULATION", form)
    config = step_speed.make_config("tiny", False, replicas=replicas, rng_impl=rng_impl)
    config.seed, config.train.seed_stride, config.data.seq_len = seed, stride, 32
    trainer = Trainer(config, model_config(config.model), steps_per_epoch=100)
    state = trainer.new_state()
    init = [np.asarray(x) for x in jax.tree_util.tree_leaves(state.params)]  # before donation
    placed = trainer.put({k: v[rows] for k, v in batch.items()})
    losses = []
    for _ in range(3):
      state, metrics = trainer.train_step(state, placed)
      losses.append(np.asarray(metrics["loss"]))
    return init, np.stack(losses)

  singles = [run(1, SEED + r, slice(r, r + 1)) for r in range(2)]
  for form in ("vmap", "map"):
    init, losses = run(2, SEED, slice(0, 2), form)
    for r, (one_init, one_losses) in enumerate(singles):
      for x, y in zip(init, one_init):
        np.testing.assert_array_equal(x[r], y[0])
      np.testing.assert_allclose(losses[:, r], one_losses[:, 0], rtol=2e-6)
  assert abs(singles[0][1][0, 0] - singles[1][1][0, 0]) > 1e-4  # the replicas are other runs
  _, same = run(2, SEED, [0, 0], "vmap", stride=0)  # one key, one batch
  np.testing.assert_array_equal(same[:, 0], same[:, 1])


def test_rbg_keys_under_nested_vmaps_are_each_keys_own():
  """infinito_jax.prng: a [2, 10] grid of RBG keys, under two vmaps (the outer one unrolled,
  the inner one, over more than prng.UNROLL_UP_TO keys, a lax.map), gives every key the bits,
  splits and fold-ins it gives alone (JAX's rule gave all twenty rows of the first key's
  draws: bits for 'rbg', and for 'unsafe_rbg', whose split and fold_in draw too, everything)."""
  from infinito_jax.prng import UNROLL_UP_TO, make_key
  stack = jax.numpy.stack
  n = 10
  assert 2 <= UNROLL_UP_TO < n

  def draws(k, i):
    a, b = jax.random.split(k)
    return (jax.random.bits(k, (5, 7), np.uint32), jax.random.key_data(a),
            jax.random.key_data(jax.random.fold_in(b, i)))

  for impl in ("rbg", "unsafe_rbg"):
    keys = stack([stack([make_key(n * i + j, impl) for j in range(n)]) for i in range(2)])
    data = np.arange(2 * n, dtype=np.uint32).reshape(2, n)
    grid = jax.jit(jax.vmap(jax.vmap(draws)))(keys, data)
    for i in range(2):
      for j in range(n):
        for got, alone in zip(grid, draws(keys[i, j], data[i, j])):
          np.testing.assert_array_equal(got[i, j], alone)
    assert not np.array_equal(grid[0][0, 0], grid[0][0, 1])


@pytest.mark.slow
def test_a_replica_gone_astray_leaves_finite_population_statistics(tmp_path):
  """A replica whose loss stays finite but whose perplexity nears exp(700): evaluate.py's
  population std overflowed to inf (np.std squares 1e240), where summary.json's was finite."""
  config = tiny_config(epochs=3, replicas=2, learning_rate=3e-3,
                       replica_hparams="learning_rate=3e-3;learning_rate=1e2,warmup_steps=200")
  summary = train_and_evaluate(config, str(tmp_path))
  ppl = [r["final_val_perplexity"] for r in summary["replicas"]]
  assert ppl[1] > 1e100 > ppl[0], ppl  # astray, yet finite
  pop = evaluate.run(str(tmp_path))["population"]
  # at the best step of each replica: two values, so the std is their distance over sqrt(2)
  best = [r["best_val_perplexity"] for r in summary["replicas"]]
  np.testing.assert_allclose(pop["perplexity_std"], abs(best[1] - best[0]) / np.sqrt(2), rtol=1e-6)
  np.testing.assert_allclose(pop["perplexity_std"],
                             summary["population"]["best_val_perplexity_std"], rtol=1e-6)
  np.testing.assert_allclose(pop["perplexity_mean"], (best[0] + best[1]) / 2, rtol=1e-6)


def _frozen_run(tmp_path, name, **train):
  """A population of 2 whose second replica (learning rate 1e8) diverges at its second step."""
  config = population_config(replicas=2, **{
      "replica_hparams": "learning_rate=1e-4;learning_rate=1e8,clip_norm=1e30", **train})
  return config, train_and_evaluate(config, str(tmp_path / name))


def test_a_diverging_replica_is_frozen_and_the_others_train_on(tmp_path):
  """train.on_divergence='freeze' (the default): a replica whose gradient norm becomes NaN
  keeps the state it had before that step and trains no more, while the others train on as if
  it were not there (replica 0 equals its single run); the run completes, and summary.json,
  history.jsonl, the validation lines and evaluate.py say who diverged where, leaving it out
  of the population's statistics. A run resumed after the divergence keeps it frozen and
  equals the uninterrupted one bitwise."""
  config, summary = _frozen_run(tmp_path, "pop")
  assert summary["status"] == "completed" and summary["diverged_replicas"] == [1]
  assert summary["replicas"][1]["diverged"] == {"step": 2, "what": "gradient norm",
                                                "value": "nan"}
  assert summary["replicas"][0]["diverged"] is None
  assert summary["population"]["replicas"] == 1 and summary["population"]["diverged"] == [1]
  assert summary["population"]["best_val_perplexity_mean"] == summary["replicas"][0][
      "best_val_perplexity"]
  # frozen before its first validation: it has none (a frozen replica is validated no more)
  assert summary["replicas"][1]["best_step"] is None
  assert summary["replicas"][1]["final_val_loss"] is None
  pop, history = final_state(tmp_path / "pop")
  # replica 0 trains as its single run does, untouched by its neighbour's NaNs
  train_and_evaluate(population_config(replicas=1), str(tmp_path / "single"))
  one, single_history = final_state(tmp_path / "single")
  assert max_diff(replica(pop.params, 0), replica(one.params, 0), skip=("k_proj']['bias",)) < 1e-5
  assert max_diff(replica(pop.memory, 0), replica(one.memory, 0)) < 1e-5
  def val(h, r):
    return [x["loss"] for x in h if x["kind"] == "validation" and x.get("replica", 0) == r]

  np.testing.assert_allclose(val(history, 0), val(single_history, 0), atol=1e-5)
  # replica 1 kept the finite state it had after step 1: the same at the end as at step 10
  train_and_evaluate(population_config(replicas=2, replica_hparams=config.train.replica_hparams,
                                       stop_after_steps=10), str(tmp_path / "resumed"))
  at10, _ = final_state(tmp_path / "resumed")
  assert leaves_equal(replica(at10, 1).params, replica(pop, 1).params)
  assert leaves_equal(replica(at10, 1).opt_state, replica(pop, 1).opt_state)
  assert leaves_equal(replica(at10, 1).memory, replica(pop, 1).memory)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(pop.params))
  assert not leaves_equal(replica(at10, 0).params, replica(pop, 0).params)  # replica 0 trained
  # ... and resumed from step 10, the run equals the uninterrupted one, replica 1 still frozen
  resumed = train_and_evaluate(config, str(tmp_path / "resumed"))
  assert resumed["diverged_replicas"] == [1] and resumed["replicas"] == summary["replicas"]
  again, resumed_history = final_state(tmp_path / "resumed")
  assert leaves_equal(again, pop)
  assert val(resumed_history, 1) == val(history, 1) and val(resumed_history, 0) == val(history, 0)
  # switched to 'stop' on resume, the frozen replica stays frozen (the record says it
  # diverged) and the run trains on to the same end
  _frozen_run(tmp_path, "switched", stop_after_steps=3)
  config.train.on_divergence = "stop"
  assert train_and_evaluate(config, str(tmp_path / "switched"))["diverged_replicas"] == [1]
  assert leaves_equal(final_state(tmp_path / "switched")[0], pop)
  config.train.on_divergence = "freeze"
  # the record: one 'diverged' entry; the frozen replica's losses are left out of the training
  # records (None), and it has no validation records after it froze
  diverged = [h for h in history if h["kind"] == "diverged"]
  assert [(h["step"], h["replica"], h["what"]) for h in diverged] == [(2, 1, "gradient norm")]
  assert diverged[0]["hparams"]["learning_rate"] == 1e8
  train = [h for h in history if h["kind"] == "train"]
  assert all(h["replica_losses"][1] is None for h in train[1:]) and train[0]["replica_losses"][1]
  assert train[1]["loss"] == train[1]["replica_losses"][0]
  # the window it froze in lists its losses before, and leaves them out of the mean (they are
  # often already exploding: the curve of the population is that of the replicas training)
  assert train[0]["loss"] == train[0]["replica_losses"][0] != train[0]["replica_losses"][1]
  assert val(history, 1) == [] and len(val(history, 0)) == 1
  # evaluate.py scores it (its frozen weights: no best step) and leaves it out of the
  # population's numbers
  report = evaluate.run(str(tmp_path / "pop"))
  assert report["replicas"][1]["diverged"]["step"] == 2 and "diverged" not in report["replicas"][0]
  assert report["population"]["diverged"] == [1] and report["population"]["replicas"] == 1
  assert report["replica"] == 0 and report["lead"] == "the best in training"
  assert [(g["of_replicas"], g["replicas"], g["hparams"]["learning_rate"])
          for g in report["population"]["groups"]] == [([0], 1, 1e-4), ([1], 0, 1e8)]
  one = evaluate.run(str(tmp_path / "pop"), replica=1)
  assert one["diverged"]["step"] == 2 and one["step"] == 30
  # export writes a replica still training by default, and says when the one asked for diverged
  from infinito_jax import convert  # pylint: disable=import-outside-toplevel
  assert convert.export_original(str(tmp_path / "pop"), str(tmp_path / "a.npz"),
                                 "npz")["replica"] == 0
  frozen = convert.export_original(str(tmp_path / "pop"), str(tmp_path / "b.npz"), "npz",
                                   replica=1)
  assert "diverged at step 2" in frozen["chosen"]


def test_a_population_whose_replicas_all_diverge_stops_and_saves_nothing_non_finite(tmp_path):
  """Once every replica is frozen the run stops with the divergence error, naming them all;
  the checkpoints saved up to then are finite. With train.on_divergence='stop' the first
  divergence stops the run, as a single run's does. Weights that overflowed before any loss
  said so cannot be frozen: the run stops, saying so."""
  config = population_config(replicas=2, replica_hparams="learning_rate=1e8,clip_norm=1e30;"
                                                         "learning_rate=1e7,clip_norm=1e30")
  config.checkpoint.every_steps = 1
  with pytest.raises(NonFiniteLossError, match=r"every replica of the population has diverged: "
                                               r"replica 0 at step 2 \(frozen, .*\), then the "
                                               r"others\. The training loss of replica 1 .* at "
                                               r"step 3\. .* Resumed, the run keeps replica 0 "
                                               r"frozen \(diverged by step 2\)") as e:
    train_and_evaluate(config, str(tmp_path / "all"))
  assert "Lower those groups' learning_rate" in str(e.value) and "its group" not in str(e.value)
  assert sorted(e.value.replicas) == [0, 1]
  summary = json.loads((tmp_path / "all" / "summary.json").read_text())
  assert summary["status"] == "diverged"
  assert summary["diverged"] == {"step": 3, "replicas": [0, 1], "replica_steps": [2, 3]}
  # each replica's entry says it too (the rest is the last validation's, as any diverged run's)
  assert [(r["diverged"]["step"], r["diverged"]["what"]) for r in summary["replicas"]] == [
      (2, "gradient norm"), (3, "training loss")] and summary["diverged_replicas"] == [0, 1]
  state, _ = final_state(tmp_path / "all")
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(state.params))
  with pytest.raises(NonFiniteLossError, match=r"of replica 1 \(train.replica_hparams values "
                                               r"\{'learning_rate': 100000000.0") as e:
    _frozen_run(tmp_path, "stop", on_divergence="stop")
  assert e.value.replicas == [1] and e.value.step == 2
  # an update that overflows the weights while its loss and gradient norm are still finite:
  # the next step freezes the replica with them, and the check before the save names both
  config = population_config(replicas=2, replica_hparams="learning_rate=1e-4;learning_rate=1e30,"
                                                         "weight_decay=1e10,clip_norm=1e30")
  with pytest.raises(NonFiniteLossError, match=r"the parameters of replica 1 .* became "
                                               r"non-finite at step 1, by an update that "
                                               r"overflowed float32 .* the next step's training "
                                               r"loss froze the replica with those weights") as e:
    train_and_evaluate(config, str(tmp_path / "overflow"))
  assert e.value.replicas == [1] and e.value.step == 1
  summary = json.loads((tmp_path / "overflow" / "summary.json").read_text())
  assert summary["diverged"]["replica_steps"] == [None, 1]
  assert [r["diverged"] and r["diverged"]["step"] for r in summary["replicas"]] == [None, 2]


def test_a_nan_validation_before_a_freeze_is_null_and_the_numbers_follow_the_live_replicas(
    tmp_path):
  """Finite weights just before a divergence can give a NaN validation loss (replica 0 at
  step 2, frozen at step 3): it is null in history.jsonl and summary.json (strict JSON: no NaN
  token), it is no best, TensorBoard's mean leaves it out, and once replica 0 is frozen the
  training records' learning rate is the live replica's, not the frozen one's schedule."""
  config = population_config(replicas=2, log_every=100, eval_every_steps=1,
                             replica_hparams="learning_rate=1e7,clip_norm=1e30;learning_rate=1e-3")
  config.log.tensorboard = True
  with pytest.warns(UserWarning, match=r"are not drawn \(step 2\)"):  # the plot says so
    summary = train_and_evaluate(config, str(tmp_path))
  assert summary["diverged_replicas"] == [0] and summary["replicas"][0]["diverged"]["step"] == 3

  def strict(text):
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))

  history = [strict(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
  strict((tmp_path / "summary.json").read_text())
  val0 = {h["step"]: h["loss"] for h in history if h["kind"] == "validation" and h["replica"] == 0}
  assert val0 == {1: val0[1], 2: None} and np.isfinite(val0[1])
  first = summary["replicas"][0]
  assert first["best_step"] == 1 and first["final_val_loss"] is None
  assert summary["best_replica"] == 1
  rates = {h["step"]: h["learning_rate"] for h in history if h["kind"] == "train"}
  assert rates[1] > 1e6 and all(r < 1.1e-3 for s, r in rates.items() if s >= 3)
