"""The run lifecycle in one process: best checkpoint kept, damage, changes on resume, bad configs.

Process-level properties (signals, kill -9, two processes on one workdir, the CLI's one-line
errors) are in test_processes.py.
"""

import gc
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from configs import default, tiny
from infinito_jax import checkpoint as ckpt_lib
from infinito_jax import config as config_lib
from infinito_jax import lifecycle
from infinito_jax.errors import (CheckpointError, ConfigError, DamagedCheckpointError, DataError,
                                 StepVanishedError, WorkdirBusyError, WorkdirError)
from infinito_jax.evaluate import restore_run
from infinito_jax.train import train_and_evaluate
from test_train import final_state, leaves_equal, tiny_config, validation_losses


def overfit_config(**train):
  """lr 0.1 on the tiny corpus: validation is best at epoch 2 (step 60), worse at epoch 3."""
  return tiny_config(**{"learning_rate": 0.1, "epochs": 3, **train})


@pytest.fixture(scope="module")
def overfit_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("overfit")
  summary = train_and_evaluate(overfit_config(), str(workdir))
  assert summary["best_step"] < summary["steps"], summary  # the premise of the tests below
  return workdir, summary


def copy_run(src, tmp_path):
  dst = tmp_path / "run"
  shutil.copytree(src, dst)
  return dst


def set_field(config, dotted: str, value) -> None:
  *groups, name = dotted.split(".")
  for g in groups:
    config = config[g]
  config[name] = value


def steps_on_disk(workdir) -> list[int]:
  """The steps of the finished checkpoints on disk (an unfinished save is a tmp folder)."""
  folder = pathlib.Path(workdir) / "checkpoints"
  if not folder.exists():
    return []
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


# ----- the best checkpoint survives every resume -----

@pytest.mark.slow
def test_best_checkpoint_survives_stop_and_resume(overfit_run, tmp_path):
  """Finding 1: a stop, then a resume, kept only the last step and evaluate scored it."""
  workdir, straight = overfit_run
  train_and_evaluate(overfit_config(stop_after_steps=75), str(tmp_path))
  assert steps_on_disk(tmp_path) == [60, 75]  # best (epoch 2) and latest
  summary = train_and_evaluate(overfit_config(), str(tmp_path))
  assert summary["best_step"] == straight["best_step"] == 60
  assert steps_on_disk(tmp_path) == [60, 90]
  on_disk = json.loads((tmp_path / "summary.json").read_text())
  restored = restore_run(str(tmp_path))  # what evaluate.py scores by default
  assert restored.step == on_disk["best_step"] == 60
  assert restored.record.best.best_val_loss == on_disk["best_val_loss"] == straight["best_val_loss"]
  # and the resumed run is the uninterrupted run, bitwise
  a, hist_a = final_state(workdir)
  b, hist_b = final_state(tmp_path)
  assert leaves_equal(a, b) and validation_losses(hist_a) == validation_losses(hist_b)


def test_record_counts_patience_in_epochs_with_evaluations_inside_them():
  record = lifecycle.RunRecord()
  r = record.replicas[0]
  assert r.observe(5, 3.0, epoch_end=False, steps_per_epoch=10)  # first: best
  assert not r.observe(10, 3.5, epoch_end=True, steps_per_epoch=10)
  assert r.epochs_without_improvement == 0  # the best came inside this epoch
  assert not r.observe(20, 3.2, epoch_end=True, steps_per_epoch=10)
  assert (r.best_step, r.best_val_loss, r.epochs_without_improvement) == (5, 3.0, 1)
  assert r.observe(25, 2.0, epoch_end=False, steps_per_epoch=10)
  r.observe(30, 2.5, epoch_end=True, steps_per_epoch=10)
  assert r.epochs_without_improvement == 0 and r.best_step == 25
  assert record.done(total_steps=100, patience=1) is None
  r.observe(40, 2.5, epoch_end=True, steps_per_epoch=10)
  assert record.done(total_steps=100, patience=1) == lifecycle.EARLY_STOPPED
  assert lifecycle.RunRecord.from_json(record.to_json()) == record


def test_a_replica_frozen_after_diverging_does_not_keep_the_others_training():
  """Early stopping in a population waits for every replica that still trains: one frozen
  by train.on_divergence='freeze' can never improve again, so its patience count does not
  hold the run, nor is it the run's best; the record says so through a save (JSON) and back."""
  record = lifecycle.RunRecord.new([1, 2])
  live, frozen = record.replicas
  live.observe(10, 3.0, epoch_end=True, steps_per_epoch=10)
  frozen.observe(10, 2.0, epoch_end=True, steps_per_epoch=10)
  for step in (20, 30):
    live.observe(step, 3.1, epoch_end=True, steps_per_epoch=10)
  frozen.observe(20, 1.9, epoch_end=True, steps_per_epoch=10)  # its best was still coming
  assert (live.epochs_without_improvement, frozen.epochs_without_improvement) == (2, 0)
  assert record.done(total_steps=100, patience=2) is None  # both train: it waits
  assert record.best_replica == 1  # the lower loss
  frozen.diverged = {"step": 25, "what": "training loss", "value": "nan"}
  record = lifecycle.RunRecord.from_json(record.to_json())
  assert record.replicas[1].diverged["step"] == 25
  assert record.done(total_steps=100, patience=2) == lifecycle.EARLY_STOPPED
  # the run's best (evaluate.py's and export's default) is one that trained on; a NaN loss
  # is no best
  assert record.best_replica == 0
  assert not record.replicas[0].observe(40, float("nan"), epoch_end=False, steps_per_epoch=10)
  assert record.replicas[0].best_val_loss == 3.0


@pytest.mark.slow
def test_evaluation_every_n_steps_can_make_a_mid_epoch_step_the_best(tmp_path):
  summary = train_and_evaluate(overfit_config(eval_every_steps=25), str(tmp_path))
  history = [json.loads(l) for l in (tmp_path / "history.jsonl").read_text().splitlines()]
  assert [r["step"] for r in history if r["kind"] == "validation"] == [25, 30, 50, 60, 75, 90]
  losses = {r["step"]: r["loss"] for r in history if r["kind"] == "validation"}
  assert summary["best_step"] == min(losses, key=losses.get)
  assert summary["best_step"] in steps_on_disk(tmp_path)


# ----- damage -----

def damage(step_dir, how: str) -> None:
  if how == "truncated_state":
    files = [f for f in (step_dir / "params").rglob("*") if f.is_file()
             and f.parent.name == "d"]
    assert files
    for f in files:
      with open(f, "r+b") as fh:
        fh.truncate(7)
  elif how == "flipped_bytes":  # a complete, readable file whose bytes changed on disk
    files = sorted((f for f in (step_dir / "params").rglob("*") if f.is_file()
                    and f.parent.name == "d"), key=lambda f: f.stat().st_size)
    data = bytearray(files[-1].read_bytes())
    middle = len(data) // 2
    data[middle:middle + 8] = bytes(b ^ 0xFF for b in data[middle:middle + 8])
    files[-1].write_bytes(bytes(data))
  elif how == "swapped_params":  # readable arrays of the right shapes, other values: only the
    # checksums tell (flipped bytes land in compressed chunks, where they may fail to decode)
    shutil.rmtree(step_dir / "params")
    shutil.copytree(step_dir.parent / "60" / "params", step_dir / "params")
  elif how == "missing_meta":
    shutil.rmtree(step_dir / "meta")
  elif how == "empty_meta":
    (step_dir / "meta" / "metadata").write_text("")
  else:
    raise ValueError(how)


@pytest.mark.parametrize("how", ["truncated_state", "flipped_bytes", "swapped_params",
                                 "missing_meta", "empty_meta"])
def test_damaged_latest_step_is_named_and_nothing_changes_on_disk(overfit_run, tmp_path, how):
  run = copy_run(overfit_run[0], tmp_path)
  damage(run / "checkpoints" / "90", how)
  with pytest.raises(DamagedCheckpointError) as e:
    train_and_evaluate(overfit_config(), str(run))
  msg = str(e.value)
  assert "step 90" in msg and "newest intact step is 60" in msg and "\n" not in msg
  # a Python caller is told the fix in its own terms (train.py's: the flag)
  assert e.value.flag == "config.checkpoint.on_damage = 'previous'"
  assert steps_on_disk(run) == [60, 90]  # nothing moved or deleted without being asked
  # evaluate.py reads only the step it scores: step 60 is intact
  assert restore_run(str(run), step=60).step == 60
  if how == "flipped_bytes":  # undecodable, or decoded to other values: refused either way
    with pytest.raises(CheckpointError, match=r"checkpoints/90.*(damaged|from the checksum)"):
      restore_run(str(run), step=90)
  if how == "swapped_params":  # read without an error, but not what was saved: refused too
    assert "from the checksum" in msg
    with pytest.raises(CheckpointError, match=r"checkpoints/90/params: .* differs? from the "
                       r"checksums? written with"):
      restore_run(str(run), step=90)


@pytest.mark.slow
def test_on_damage_previous_resumes_from_the_newest_intact_step_exactly(overfit_run, tmp_path):
  workdir, _ = overfit_run
  run = copy_run(workdir, tmp_path)
  damage(run / "checkpoints" / "90", "truncated_state")
  (run / "checkpoints" / "95.orbax-checkpoint-tmp-123").mkdir()  # a killed save's leftover
  summary = train_and_evaluate(_on_damage(), str(run))
  assert summary["status"] == "completed" and summary["steps"] == 90
  assert [p.name.split("-")[0] for p in (run / ckpt_lib.DAMAGED_DIR).iterdir()] == ["90"]
  assert not any("tmp" in p.name for p in (run / "checkpoints").iterdir())
  a, hist_a = final_state(workdir)
  b, hist_b = final_state(run)
  assert leaves_equal(a, b) and validation_losses(hist_a) == validation_losses(hist_b)
  # history.jsonl was rewritten from the intact checkpoint: no record of the damaged future
  lines = [json.loads(l) for l in (run / "history.jsonl").read_text().splitlines()]
  assert [r["step"] for r in lines if r["kind"] == "validation"] == [30, 60, 90]


def _on_damage():
  c = overfit_config()
  c.checkpoint.on_damage = "previous"
  return c


def test_evaluate_passes_over_a_damaged_latest_record_and_names_it(overfit_run, tmp_path):
  run = copy_run(overfit_run[0], tmp_path)
  damage(run / "checkpoints" / "90", "empty_meta")
  restored = restore_run(str(run))  # step 90's progress is intact and names the best: 60
  assert restored.step == 60
  shutil.rmtree(run / "checkpoints" / "90" / "progress")
  restored = restore_run(str(run))  # now only step 60's own record is readable
  assert restored.step == 60 and "[90] cannot be read" in restored.note
  with pytest.raises(CheckpointError, match=r"checkpoints/90/meta cannot be read"):
    restore_run(str(run), step=90)


def test_a_damaged_orbax_metadata_file_restores_without_a_dozen_log_dumps(overfit_run,
                                                                         tmp_path, caplog):
  """Orbax's own metadata file of a step (_CHECKPOINT_METADATA, a commit time) damaged: the
  step's items pass their checksums and restore exactly; Orbax logged the file's whole text at
  each of about a dozen reads."""
  run = copy_run(overfit_run[0], tmp_path)
  (run / "checkpoints" / "90" / "_CHECKPOINT_METADATA").write_text("{")
  with caplog.at_level("ERROR"):
    restored = restore_run(str(run), step=90)
  assert restored.step == 90
  assert not [r for r in caplog.records if "Metadata" in r.getMessage()], caplog.text[-2000:]
  intact = restore_run(str(overfit_run[0]), step=90)
  assert leaves_equal(restored.params, intact.params)


def test_tensorstore_errors_of_sibling_reads_are_not_logged_after_the_reported_damage(caplog):
  """After a failed read, the sibling reads' futures are garbage-collected with TensorStore's
  errors 'never retrieved', and asyncio logged them after the one clean error line (seen once
  with a truncated params file: `exception=ValueError('OUT_OF_RANGE: Error reading ...')`).
  Those are dropped; any other never-retrieved exception is still logged."""
  import asyncio  # pylint: disable=import-outside-toplevel

  def lost(exc):
    loop = asyncio.new_event_loop()
    try:
      future = loop.create_future()
      future.set_exception(exc)
      del future
      gc.collect()
    finally:
      loop.close()

  with caplog.at_level("ERROR", logger="asyncio"):
    lost(ValueError("OUT_OF_RANGE: Error reading local file \"/run/checkpoints/60/params/d/x\""))
    lost(ValueError("DATA_LOSS: Error decoding chunk"))
    assert not caplog.records, [r.getMessage() for r in caplog.records]
    lost(ValueError("a bug of ours"))
    assert [r.getMessage() for r in caplog.records if "a bug of ours" in r.getMessage()]


def test_missing_best_checkpoint_is_an_error_not_a_silent_substitute(overfit_run, tmp_path):
  run = copy_run(overfit_run[0], tmp_path)
  shutil.rmtree(run / "checkpoints" / "60")
  with pytest.raises(CheckpointError, match=r"best checkpoint of the run \(step 60\) is missing"
                     r".*choose another step \(evaluate.py --step, python -m "
                     r"infinito_jax.convert export --step, restore_run's step=\) \(available: "
                     r"\[90\]"):
    restore_run(str(run))
  assert restore_run(str(run), step=90).step == 90


def test_a_damaged_best_step_names_the_steps_left_to_choose_or_that_none_is(overfit_run,
                                                                            tmp_path):
  """The message for a damaged best step says how to choose another (a flag both commands
  have, and restore_run's argument) and which steps there are; with none left, it says so
  instead of offering a choice of nothing."""
  run = copy_run(overfit_run[0], tmp_path / "a")
  damage(run / "checkpoints" / "60", "truncated_state")
  with pytest.raises(CheckpointError, match=r"checkpoints/60.*Choose another step \(evaluate.py "
                     r"--step, python -m infinito_jax.convert export --step, restore_run's "
                     r"step=\) \(available: \[90\]\)\.$"):
    restore_run(str(run))
  # the damaged step asked for by its number: the others are named too (they were not)
  with pytest.raises(CheckpointError, match=r"checkpoints/60.*The run's other steps: \[90\]\.$"):
    restore_run(str(run), step=60)
  shutil.rmtree(run / "checkpoints" / "90")
  with pytest.raises(CheckpointError, match=r"checkpoints/60.*No other step is left to choose: "
                     r"train again \(fresh=True moves this run aside\)\.$"):
    restore_run(str(run))


@pytest.fixture(scope="module")
def first_epoch_run(tmp_path_factory):
  """The overfit run as it was after its first epoch: only step 30, its own best."""
  workdir = tmp_path_factory.mktemp("first_epoch")
  train_and_evaluate(overfit_config(epochs=1), str(workdir))
  assert steps_on_disk(workdir) == [30]
  return workdir


@pytest.mark.parametrize("when", [("read_json", 1), ("read_json", 2), ("restore_arrays", 1)],
                         ids=["reading_the_record", "choosing_the_step", "reading_arrays"])
def test_restore_run_follows_a_run_that_prunes_the_step_it_is_reading(
    overfit_run, first_epoch_run, tmp_path, monkeypatch, when):
  """A run training in the workdir saves a better step and prunes the old best (30 -> 60) at
  any moment of an evaluation: while it reads the newest record (the first read_json), while
  it chooses the step (the second) or while it reads the arrays. It must score the new best,
  not fail with "no checkpoint for step 30" (a CI run saw this race with real processes)."""
  later = copy_run(overfit_run[0], tmp_path)
  shutil.rmtree(later / "checkpoints" / "90")  # the run just after its step 60: [60], best 60
  run = tmp_path / "first"
  shutil.copytree(first_epoch_run, run)
  method, nth = when
  original = getattr(ckpt_lib.Checkpointer, method)
  calls = []

  def racing(self, *args, **kwargs):
    calls.append(args)
    if len(calls) == nth:  # the run's next save lands (renamed into place), then its prune
      shutil.copytree(later / "checkpoints" / "60", run / "checkpoints" / "60.tmp-save")
      os.rename(run / "checkpoints" / "60.tmp-save", run / "checkpoints" / "60")
      shutil.rmtree(run / "checkpoints" / "30")
    return original(self, *args, **kwargs)

  monkeypatch.setattr(ckpt_lib.Checkpointer, method, racing)
  restored = restore_run(str(run))
  assert len(calls) >= nth and steps_on_disk(run) == [60]
  monkeypatch.undo()
  assert restored.step == 60 and "best step 60" in restored.note
  expected = restore_run(str(later))
  assert leaves_equal(restored.params, expected.params)
  assert leaves_equal(restored.memory, expected.memory)


def test_a_step_pinned_by_a_reader_outlives_the_runs_prune_until_it_is_released(
    overfit_run, tmp_path):
  """evaluate.py pins the steps it restores (a shared lock per step): the run's prune passes
  over a pinned step and deletes it at its next prune once released; a step deleted before
  the reader pins it is a StepVanishedError (restore_run then chooses again)."""
  run = copy_run(overfit_run[0], tmp_path)
  writer = ckpt_lib.Checkpointer(str(run))
  reader = ckpt_lib.Checkpointer(str(run), read_only=True)
  try:
    with reader.pinned([60, 90]):
      writer.keep_only({90})  # the run's prune: 60 is being read
      assert steps_on_disk(run) == [60, 90]
      assert restore_run(str(run), step=60).step == 60  # a second reader shares the pin
    writer.keep_only({90})
    assert steps_on_disk(run) == [90]
    assert not (run / ckpt_lib.READERS_DIR / "60").exists()  # removed with its step
    vanished = "no checkpoint for step 60 .* available: \\[90\\]"
    with pytest.raises(StepVanishedError, match=vanished):
      with reader.pinned([60]):
        pass
    assert not (run / ckpt_lib.READERS_DIR / "60").exists()  # no pin file outlives its step
  finally:
    reader.close()
    writer.close()


# ----- changes on resume -----

@pytest.mark.parametrize("field,value", [
    ("model.causal", False), ("model.hidden_dim", 64), ("data.corpus.seed", 7), ("seed", 1),
    ("train.batch_size", 4), ("data.seq_len", 8), ("model.exploration", False)])
def test_resume_refuses_changes_to_fixed_fields(overfit_run, tmp_path, field, value):
  run = copy_run(overfit_run[0], tmp_path)
  config = overfit_config(epochs=4, allow_changes=True)  # allow_changes does not cover these
  set_field(config, field, value)
  before = sorted(p.name for p in (run / "checkpoints").iterdir())
  with pytest.raises(ConfigError, match=rf"trained with another config: (.*; )?{field}: "):
    train_and_evaluate(config, str(run))
  assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before


@pytest.mark.slow
def test_resume_refuses_a_training_file_other_than_the_checkpoints(tmp_path):
  text = " ".join(f"w{i % 50}" for i in range(3000))
  for name in ("a.txt", "b.txt", "v.txt"):
    (tmp_path / name).write_text(text + "\n")
  c = tiny_config(epochs=1)
  c.data.source = "files"
  c.data.files.train, c.data.files.validation = str(tmp_path / "a.txt"), str(tmp_path / "v.txt")
  train_and_evaluate(c, str(tmp_path / "run"))
  c.data.files.train = str(tmp_path / "b.txt")
  with pytest.raises(ConfigError, match=r"data.files.train: '.*a.txt' -> '.*b.txt'"):
    train_and_evaluate(c, str(tmp_path / "run"))
  c.data.files.train = str(tmp_path / "a.txt")  # the same path, other text
  (tmp_path / "a.txt").write_text(text.replace("w1 ", "zz ") + "\n")
  c.train.epochs = 2
  with pytest.raises(ConfigError, match=r"trained on other text: data.files.train \(.*a.txt\) "
                                        r"changed since \(sha256"):
    train_and_evaluate(c, str(tmp_path / "run"))


@pytest.mark.slow
@pytest.mark.parametrize("field,value", [
    ("learning_rate", 0.05), ("cosine_epochs", 5), ("dropout", 0.0)])
def test_resume_refuses_recipe_changes_unless_allowed_then_records_them(overfit_run, tmp_path,
                                                                       field, value):
  run = copy_run(overfit_run[0], tmp_path)
  config = overfit_config(epochs=4)
  (config.model if field == "dropout" else config.train)[field] = value
  with pytest.raises(ConfigError, match=rf"changed recipe: .*{field}: .* -> {value}.*"
                                        r"config.train.allow_changes = True"):
    train_and_evaluate(config, str(run))
  config.train.allow_changes = True
  summary = train_and_evaluate(config, str(run))
  assert summary["steps"] == 120
  changes = _changes(run)
  assert len(changes) == 1 and changes[0]["step"] == 90
  key = f"{'model' if field == 'dropout' else 'train'}.{field}"
  assert changes[0]["changes"][key][1] == value


def _changes(run):
  return [json.loads(l) for l in (run / "history.jsonl").read_text().splitlines()
          if '"config_change"' in l]


@pytest.mark.slow
def test_resume_accepts_free_changes_and_prints_them(overfit_run, tmp_path, capsys):
  run = copy_run(overfit_run[0], tmp_path)
  config = overfit_config(epochs=4, patience=5, log_every=3)
  config.checkpoint.every_steps = 50
  summary = train_and_evaluate(config, str(run))
  assert summary["steps"] == 120
  out = capsys.readouterr().out
  assert "config change accepted (free): train.epochs: 3 -> 4" in out
  assert "train.patience: 3 -> 5" in out and "checkpoint.every_steps: 0 -> 50" in out
  assert set(_changes(run)[0]["changes"]) == {"train.epochs", "train.patience",
                                              "train.log_every", "checkpoint.every_steps"}


def test_finished_run_with_nothing_to_do_says_so_and_changes_nothing(overfit_run, tmp_path, capsys):
  run = copy_run(overfit_run[0], tmp_path)
  before = {f: (run / f).read_bytes() for f in ("history.jsonl", "summary.json", "config.json")}
  summary = train_and_evaluate(overfit_config(), str(run))
  assert summary["status"] == "completed" and summary["steps"] == 90
  assert "Nothing to do" in capsys.readouterr().out
  # a smaller stop_after_steps or patience changes nothing either: no history, no summary
  train_and_evaluate(overfit_config(stop_after_steps=50, patience=1), str(run))
  out = capsys.readouterr().out
  assert "raise config.train.epochs above 3 (now 3)" in out
  # nor an accepted change that never trained: config.json keeps the run's own config
  assert "not applied, as nothing was trained" in out and "accepted" not in out
  # train.py's advice is in its command line's terms
  from infinito_jax.train import CLI_FLAGS  # pylint: disable=import-outside-toplevel
  train_and_evaluate(overfit_config(), str(run), flags=CLI_FLAGS)
  assert ("To train on, raise --config.train.epochs above 3 (now 3); to start over, pass "
          "--fresh.") in capsys.readouterr().out
  with pytest.raises(ConfigError, match=r"Set --config.train.allow_changes=true to continue "
                                        r"the run with it .*, or --fresh to start over, or a "
                                        r"new --workdir\.$"):
    train_and_evaluate(overfit_config(learning_rate=0.5), str(run), flags=CLI_FLAGS)
  assert {f: (run / f).read_bytes() for f in before} == before
  # a summary.json that is JSON but no summary's (edited by hand) is rewritten from the
  # checkpoint's record, as an unreadable one is (it raised an AttributeError)
  kept = json.loads(before["summary.json"])
  for bad in ("null", "[]", "5", '"text"'):
    (run / "summary.json").write_text(bad)
    capsys.readouterr()
    train_and_evaluate(overfit_config(), str(run))
    assert f"Rewrote {run / 'summary.json'}, which did not match" in capsys.readouterr().out
    again = json.loads((run / "summary.json").read_text())
    assert {k: again[k] for k in ("status", "steps", "best_step", "best_val_loss", "replicas")
            } == {k: kept[k] for k in ("status", "steps", "best_step", "best_val_loss",
                                       "replicas")}


def test_a_python_caller_is_told_the_fix_in_python_terms():
  """train_and_evaluate called from Python (a notebook) names config.FIELD = VALUE, fresh=True
  and the call itself where train.py's errors name --config.FIELD=VALUE, --fresh and the
  command (errors.in_python_terms, applied to every error the call raises)."""
  from infinito_jax.errors import in_python_terms  # pylint: disable=import-outside-toplevel
  assert in_python_terms(
      "Set --config.train.allow_changes=true to continue the run with it, or --fresh to start "
      "over, or a new --workdir.") == (
          "Set config.train.allow_changes = True to continue the run with it, or fresh=True "
          "to start over, or a new workdir.")
  assert in_python_terms("resume with --config.checkpoint.on_damage=previous.") == (
      "resume with config.checkpoint.on_damage = 'previous'.")
  assert in_python_terms("lower --config.train.learning_rate=1e-3; set --config.data.files."
                         "train=PATH (--config.model.remat=false)") == (
      "lower config.train.learning_rate = 1e-3; set config.data.files.train = PATH "
      "(config.model.remat = False)")
  assert in_python_terms("pass --config.model.hidden_dim=24 --config.model.num_heads=3 (what") == (
      "pass config.model.hidden_dim = 24; config.model.num_heads = 3 (what")
  assert in_python_terms("files (--config.data.source=files [--config.data.files.test=PATH])"
                         ) == "files (config.data.source = 'files' [config.data.files.test = PATH])"
  assert in_python_terms("Train again with train.py --fresh. Free space and run the same "
                         "command again to resume.") == (
      "Train again with fresh=True. Free space and call train_and_evaluate again with the same "
      "config and workdir to resume.")
  assert in_python_terms("resume: run the same command again with the new values") == (
      "resume: call train_and_evaluate again on the same workdir with the new values")
  # a flag named with its script stays the script's
  assert in_python_terms("Score a file with evaluate.py --data_file PATH, or data_file --x",
                         args={"data_file": "data_file"}) == (
      "Score a file with evaluate.py --data_file PATH, or data_file --x")
  # an empty workdir (an unset variable) meant the current folder: refused by every entry point
  from configs import study_tiny  # pylint: disable=import-outside-toplevel
  from infinito_jax import convert, study  # pylint: disable=import-outside-toplevel
  for call in (lambda: study.run_study(study_tiny.get_config(), ""),
               lambda: convert.import_original("x.npz", tiny_config(), ""),
               lambda: train_and_evaluate(tiny_config(), None)):
    with pytest.raises(ConfigError, match=r"^workdir is (''|None): give the run's folder"):
      call()


@pytest.mark.slow
def test_fresh_moves_the_old_run_aside_and_starts_over(overfit_run, tmp_path):
  run = copy_run(overfit_run[0], tmp_path)
  config = overfit_config(epochs=1, learning_rate=0.01)  # a change that would be refused
  summary = train_and_evaluate(config, str(run), fresh=True)
  assert summary["steps"] == 30 and steps_on_disk(run) == [30]
  old = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
  assert len(old) == 1 and steps_on_disk(old[0]) == [60, 90]


def test_fresh_moves_only_a_runs_own_files_and_an_empty_workdir_is_refused(overfit_run, tmp_path,
                                                                           monkeypatch):
  """fresh=True moves the workdir's contents aside: a folder that also holds files no run makes
  (a run trained into the current folder, a project) is refused, naming them, and nothing is
  moved (it moved the user's files too); what a run and the tools make (evaluate.py's reports,
  exports, plots) does not count. An empty workdir ('', an unset variable) is refused: it
  trained into the current folder."""
  run = copy_run(overfit_run[0], tmp_path)
  (run / "eval_test_step90.json").write_text("{}")
  (run / "exported").mkdir()
  (run / "my_notes.txt").write_text("mine")
  (run / "src").mkdir()
  before = sorted(p.name for p in run.iterdir())
  config = overfit_config(epochs=1)
  with pytest.raises(WorkdirError, match=r"also holds what no run makes \(my_notes.txt, src\), "
                                         r"which fresh=True will not move: move those out of it, "
                                         r"or choose another workdir; nothing was moved\.$"):
    train_and_evaluate(config, str(run), fresh=True)
  assert sorted(p.name for p in run.iterdir()) == before and steps_on_disk(run) == [60, 90]
  assert not [p for p in tmp_path.iterdir() if ".old-" in p.name]
  monkeypatch.chdir(run)  # '.' alike
  with pytest.raises(WorkdirError, match=r"my_notes.txt, src"):
    train_and_evaluate(config, ".", fresh=True)
  for bad in ("", None):
    with pytest.raises(ConfigError, match=rf"workdir is {bad!r}: give the run's folder"):
      train_and_evaluate(config, bad)
  assert sorted(p.name for p in run.iterdir()) == before
  with pytest.raises(ConfigError, match=r"config is a dict, not an ml_collections.ConfigDict: "
                                        r".*or ml_collections.ConfigDict\(this dict\)"):
    train_and_evaluate(config.to_dict(), str(tmp_path / "new"))
  assert not (tmp_path / "new").exists()
  # a refused or failed start in a folder of the user's leaves it as it was: no lock file, no
  # empty checkpoints folder (the folder stays, a new one would go)
  project = tmp_path / "project"
  project.mkdir()
  (project / "notes.txt").write_text("mine")
  with pytest.raises(WorkdirError, match=r"\(notes.txt\)"):
    train_and_evaluate(config, str(project), fresh=True)
  assert sorted(p.name for p in project.iterdir()) == ["notes.txt"]
  missing = overfit_config(epochs=1)
  missing.data.source = "files"
  missing.data.files.train = missing.data.files.validation = str(tmp_path / "no_such.txt")
  (tmp_path / "empty").mkdir()
  for folder in (project, tmp_path / "empty"):
    with pytest.raises(DataError, match="no_such.txt"):
      train_and_evaluate(missing, str(folder))
  assert sorted(p.name for p in project.iterdir()) == ["notes.txt"]
  assert not list((tmp_path / "empty").iterdir())
  (run / "my_notes.txt").unlink()
  (run / "src").rmdir()
  assert train_and_evaluate(config, str(run), fresh=True)["steps"] == 30
  old = [p for p in tmp_path.iterdir() if ".old-" in p.name]
  assert len(old) == 1 and (old[0] / "eval_test_step90.json").exists()


# ----- one writer per workdir -----

def test_a_held_workdir_lock_refuses_a_second_writer_naming_the_owner(tmp_path):
  with lifecycle.WorkdirLock(str(tmp_path)):
    with pytest.raises(WorkdirBusyError, match=rf"in use by process {os.getpid()} on host"):
      train_and_evaluate(tiny_config(), str(tmp_path))
  assert not (tmp_path / "checkpoints").exists()  # refused before touching anything


# ----- configs that cannot work -----

@pytest.mark.parametrize("field,value,words", [
    ("train.learning_rate", 0.0, "must be a number > 0"),
    ("train.learning_rate", -1e-3, "must be a number > 0"),
    ("train.batch_size", 0, "must be an integer >= 1"),
    ("train.epochs", 0, "must be an integer >= 1"),
    ("train.min_learning_rate", 1.0, "must lie in [0, train.learning_rate"),
    ("train.patience", 0, "must be an integer >= 1"),
    ("train.log_every", 0, "must be an integer >= 1"),
    ("train.clip_norm", 0.0, "must be a number > 0"),
    # finite in Python, infinite in the float32 step: 1e39 made every weight inf at step 1
    ("train.learning_rate", 1e39, "(and finite in float32, within +-3.4e38)"),
    ("train.weight_decay", 1e300, "(and finite in float32, within +-3.4e38)"),
    ("train.replica_hparams", "learning_rate=1e-3;learning_rate=4e38", "infinite in float32"),
    # within range, yet 1.0 or 0 in float32: Adam divided by zero (NaN at step 2)
    ("train.b2", 0.99999999999, "must lie in [0, 1) in float32"),
    ("train.eps", 1e-46, "must be at least 1.2e-38, float32's smallest normal number"),
    ("train.replica_hparams", "b1=0.99999999999", "must be in [0, 1) in float32"),
    # a step count past int32: it crashed mid-run (an OverflowError in the schedule)
    ("train.warmup_steps", 3_000_000_000, "must be below 2**31"),
    ("train.replica_hparams", "warmup_steps=1e30", "must be in [0, 2**31)"),
    ("train.on_divergence", "maybe", "must be one of ('freeze', 'stop')"),
    ("model.dropout", 1.0, "must lie in [0, 1)"),
    ("model.vocab_size", 3, "must be an integer >= 4"),
    ("data.seq_len", 100, "exceeds model.max_len=64"),
    ("model.max_len", 0, "must be an integer >= 2"),  # was "data.seq_len=16 exceeds ... 0"
    ("checkpoint.on_damage", "ignore", "must be one of"),
    ("data.corpus.num_classes", 1000, "num_words (100) must be >= num_classes"),
    ("seed", -1, "must be an integer in [0, 2**32)"),
    ("data.corpus.seed", -5, "must be an integer in [0, 2**32)"),
])
def test_configs_that_cannot_work_are_refused_naming_the_field(field, value, words, tmp_path):
  c = tiny.get_config()
  set_field(c, field, value)
  with pytest.raises(ConfigError) as e:
    train_and_evaluate(c, str(tmp_path / "w"))
  assert field.split(".")[-1] in str(e.value) and words in str(e.value)
  assert not (tmp_path / "w").exists()  # refused before the workdir is made


def test_unknown_config_field_is_refused():
  c = tiny.get_config()
  c.model.unlock()
  c.model.foo = 1
  with pytest.raises(ConfigError, match=r"unknown config field\(s\) \['model.foo'\]"):
    config_lib.validate(c)


def test_every_default_field_is_classified_once():
  fields = set(config_lib.flatten(default.get_config().to_dict()))
  assert fields == set(config_lib.FIELDS)
  assert len(config_lib.FIELDS) == len(set(config_lib.FIELDS))


def test_a_checkpoint_of_another_layout_version_is_named_not_called_damaged(tmp_path):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  old = ocp.CheckpointManager(str(tmp_path / "checkpoints"), item_names=("state", "meta"))
  old.save(5, args=ocp.args.Composite(state=ocp.args.StandardSave({"a": jnp.ones(2)}),
                                      meta=ocp.args.JsonSave({"epoch": 1})))
  old.close()  # the layout of version 1: one 'state' item and a 'meta' without 'format'
  for attempt in (lambda: train_and_evaluate(tiny_config(), str(tmp_path)),
                  lambda: restore_run(str(tmp_path))):
    with pytest.raises(CheckpointError,
                       match=rf"layout version 1, this version reads version {ckpt_lib.FORMAT}"):
      attempt()
  assert steps_on_disk(tmp_path) == [5]


def test_corpus_seed_none_and_the_runs_seed_are_the_same_corpus():
  saved = {"seed": 42, "data": {"corpus": {"seed": None}}}
  assert config_lib.diff(saved, {"seed": 42, "data": {"corpus": {"seed": 42}}}) == []
  assert [c.field for c in config_lib.diff(saved, {"seed": 42, "data": {"corpus": {"seed": 7}}})
          ] == ["data.corpus.seed"]


@pytest.mark.slow
def test_after_damage_the_recipe_is_checked_against_the_step_resumed(overfit_run, tmp_path):
  """Steps 60 (lr 0.1) and 100 (lr 0.05, allowed); 100 damaged: resuming 60 takes lr 0.1."""
  run = copy_run(overfit_run[0], tmp_path)
  train_and_evaluate(overfit_config(epochs=4, learning_rate=0.05, allow_changes=True,
                                    stop_after_steps=100), str(run))
  assert steps_on_disk(run) == [60, 100]
  damage(run / "checkpoints" / "100", "truncated_state")
  config = overfit_config(epochs=4, learning_rate=0.05)  # step 100's recipe, not step 60's
  config.checkpoint.on_damage = "previous"
  with pytest.raises(ConfigError, match=r"changed recipe: train.learning_rate: 0.1 -> 0.05"):
    train_and_evaluate(config, str(run))
  config.train.learning_rate = 0.1  # step 60's own: no change, nothing recorded
  summary = train_and_evaluate(config, str(run))
  assert summary["steps"] == 120
  assert all("train.learning_rate" not in c["changes"] for c in _changes(run))


def test_a_workdir_that_cannot_be_used_is_named(tmp_path):
  (tmp_path / "file").write_text("x")
  for bad in (tmp_path / "file", tmp_path / "file" / "sub"):
    with pytest.raises(WorkdirError, match=r"cannot use .* as a workdir .*a file is in the way"):
      train_and_evaluate(tiny_config(), str(bad))


def test_a_folder_the_run_cannot_write_in_is_one_error_before_anything_is_written(tmp_path):
  """A read-only checkpoints folder (or workdir) used to surface as a traceback at the first
  history record, or as Orbax waiting 5 minutes to make a step folder. Root ignores chmod, so
  there a read-only tmpfs stands in (skipped where neither is possible)."""
  ckpts = tmp_path / "run" / "checkpoints"
  ckpts.mkdir(parents=True)
  if os.geteuid() != 0:
    ckpts.chmod(0o500)
  elif subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ckpts)],
                      capture_output=True).returncode != 0:
    pytest.skip("running as root without mount: no folder it cannot write in")
  try:
    with pytest.raises(WorkdirError, match=r"cannot write in .*checkpoints \((Permission denied|"
                                           r"Read-only file system)\): make it writable"):
      lifecycle.check_writable(str(tmp_path / "run"), str(ckpts))
    with pytest.raises(WorkdirError, match="cannot write in"):
      train_and_evaluate(tiny_config(), str(tmp_path / "run"))
    assert sorted(os.listdir(tmp_path / "run")) == ["checkpoints"]  # as it was: nothing written
  finally:
    if os.geteuid() == 0:
      subprocess.run(["umount", "-l", str(ckpts)])
    else:
      ckpts.chmod(0o700)


def test_a_lock_held_by_another_start_is_not_removed_by_a_failed_one(tmp_path):
  """Two starts race for a new workdir: the loser's clean-up of 'its' empty workdir must not
  remove the lock the winner holds (a third process could then write beside the winner)."""
  workdir = str(tmp_path / "w")
  with lifecycle.WorkdirLock(workdir):
    lifecycle.remove_if_unused(workdir)
    assert os.listdir(workdir) == [lifecycle.LOCK_FILE]
  lifecycle.remove_if_unused(workdir)  # released: a failed start's own leftovers go
  assert not os.path.exists(workdir)


def test_a_signal_after_the_last_save_keeps_the_runs_status(tmp_path, capsys):
  """Once the loop has saved its last step (`ended`), a first signal says only the summary is
  left, and a second one marks summary.json with the run's status, not `aborted`."""
  summary = tmp_path / "summary.json"
  summary.write_text(json.dumps({"status": "running", "best_step": 60}))
  with lifecycle.StopSignals() as stop:
    stop.ended, stop.summary_path = "completed", str(summary)
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.requested == "SIGTERM"
    assert "the run has ended (completed) and is saved" in capsys.readouterr().err
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGTERM)
  stop.mark_aborted()  # what the hard abort of train.py does before it exits
  assert json.loads(summary.read_text()) == {"status": "completed", "best_step": 60}
  # a summary.json edited by hand into JSON that is no summary's still gets the status
  # (it raised a TypeError, which ended the abort before its exit)
  summary.write_text("[1, 2]")
  stop.ended = None
  stop.mark_aborted(lifecycle.DIVERGED, diverged={"step": 3})
  assert json.loads(summary.read_text()) == {"status": "diverged", "diverged": {"step": 3}}


def test_a_signal_the_caller_reports_gets_no_second_line(capsys):
  """said_by_caller (train.py's multi-process join, which exits with its own line): a first
  signal inside the block is recorded without the handler's line; one the caller did not act on
  is said when the block ends, once; outside the block the handler speaks as before."""
  with lifecycle.StopSignals() as stop:
    with stop.said_by_caller():
      os.kill(os.getpid(), signal.SIGTERM)
      assert stop.requested == "SIGTERM"
      assert "SIGTERM" not in capsys.readouterr().err
    err = capsys.readouterr().err
    assert err.count("SIGTERM received: stopping before training starts") == 1, err
    with stop.said_by_caller():
      pass
    assert capsys.readouterr().err == ""  # said once, not again
  with lifecycle.StopSignals() as stop:
    os.kill(os.getpid(), signal.SIGINT)
    assert "SIGINT received: stopping before training starts" in capsys.readouterr().err


_QUIET_BLOCK = r"""
import hashlib, os, signal, sys, threading, time
from infinito_jax import lifecycle
stop = lifecycle.StopSignals(hard_abort=True).install()
t0 = time.perf_counter()
hashlib.pbkdf2_hmac("sha256", b"x", b"y", 20000)
rounds = int(20000 * 2.5 / (time.perf_counter() - t0))  # a C call of about 2.5 s
with stop.said_by_caller():
  threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM)).start()
  hashlib.pbkdf2_hmac("sha256", b"x", b"y", rounds)  # the handler runs when this returns
  if sys.argv[1] == "twice":
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)
print("requested", stop.requested, flush=True)
"""


def test_a_quiet_first_signal_is_said_once_even_during_a_long_call():
  """said_by_caller with the counting thread of a hard-abort StopSignals: a first signal during
  a long C call inside the block gets the thread's 'long call' line and no second line when the
  block ends; a second signal inside the block aborts (130) naming both, not only the second."""
  root = pathlib.Path(__file__).parent.parent
  once = subprocess.run([sys.executable, "-c", _QUIET_BLOCK, "once"], capture_output=True,
                        text=True, timeout=120, cwd=root)
  assert once.returncode == 0 and "requested SIGTERM" in once.stdout, once
  assert once.stderr.count("SIGTERM received") == 1, once.stderr
  assert "while a long call is under way" in once.stderr, once.stderr
  twice = subprocess.run([sys.executable, "-c", _QUIET_BLOCK, "twice"], capture_output=True,
                         text=True, timeout=120, cwd=root)
  assert twice.returncode == 130, twice
  assert ("SIGTERM and then SIGTERM received. Aborted by a second signal during start-up: "
          "nothing was changed.") in twice.stderr, twice


_HARD_ABORT = r"""
import os, signal, sys, time
from infinito_jax import lifecycle
ended, path = sys.argv[1] or None, sys.argv[2]
with lifecycle.StopSignals(hard_abort=True) as stop:
  stop.training, stop.ended, stop.summary_path = True, ended, path
  os.kill(os.getpid(), signal.SIGTERM)
  os.kill(os.getpid(), signal.SIGTERM)
  time.sleep(30)
print("not aborted")
"""


@pytest.mark.parametrize("ended,code,status", [("interrupted", 0, "interrupted"),
                                                ("completed", 0, "completed"),
                                                ("", 130, "aborted")])
def test_a_hard_abort_exit_code_agrees_with_the_summary_status(tmp_path, ended, code, status):
  """train.py's second signal: after the last save (`ended`) the process exits with the code the
  run's status has (0) and the summary keeps that status; before it, 130 and `aborted`. A
  scheduler reads the code, a person the summary: they disagreed (130 with `interrupted`) when
  the second Ctrl-C came just after the save of the first one's step."""
  summary = tmp_path / "summary.json"
  summary.write_text(json.dumps({"status": "running", "best_step": 30}))
  proc = subprocess.run([sys.executable, "-c", _HARD_ABORT, ended, str(summary)],
                        capture_output=True, text=True, timeout=60,
                        cwd=pathlib.Path(__file__).parent.parent)
  assert proc.returncode == code, (proc.returncode, proc.stderr)
  assert "not aborted" not in proc.stdout
  assert json.loads(summary.read_text()) == {"status": status, "best_step": 30}


class _Inside:
  """Says when the main thread has entered `owner.name` (the real method, called through),
  for a thread that sends a signal while it runs. (It watched the main thread's frames with
  sys._current_frames: walking another thread's frames can crash CPython 3.11, and did.)"""

  def __init__(self, monkeypatch, owner, name: str):
    self.entries, self.now = 0, threading.Event()
    original = getattr(owner, name)

    def inside(*args, **kwargs):
      self.entries += 1
      self.now.set()
      try:
        return original(*args, **kwargs)
      finally:
        self.now.clear()

    monkeypatch.setattr(owner, name, inside)

  def entered(self, after: int, until: threading.Event) -> bool:
    """True once the main thread is inside its entry number `after` + 1 or a later one; False
    if `until` is set first."""
    while not until.is_set():
      if self.now.wait(0.01) and self.entries > after:
        return True
      time.sleep(0.0005)
    return False


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("where", ["wait_until_finished", "save"],
                         ids=["waiting_for_a_save", "starting_a_save"])
def test_a_second_signal_while_a_library_run_waits_for_a_save_is_one_clean_interrupt(
    tmp_path, caplog, monkeypatch, where):
  """In a notebook (no hard abort), a second Ctrl-C that lands while the run waits for Orbax's
  save, or while Orbax starts one, raises KeyboardInterrupt: without Orbax logging a traceback
  of it (it did), and, inside Orbax's save, only once the save has started (cut short, it left
  an event loop half set up, and the clean-up could delete the save under its threads: an
  OSError); the workdir resumes in the same process and completes.

  After the first signal only the last step's save is left to aim at; on a loaded machine the
  signalling thread can miss that short call, and the run then just stops (the first signal's
  exit). Such a try tests nothing: it is repeated in a new workdir, at most 4 times."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  config = tiny_config(epochs=2)
  config.checkpoint.every_steps = 1  # a save per step: the loop waits for Orbax at each one
  waits = _Inside(monkeypatch, ocp.CheckpointManager, "wait_until_finished")
  second = waits if where == "wait_until_finished" else _Inside(monkeypatch,
                                                                 ocp.CheckpointManager, where)
  for attempt in range(4):
    workdir, done, sent = str(tmp_path / f"try{attempt}"), threading.Event(), []

    def signals(done=done, sent=sent, start=waits.entries):
      for method in (waits, second):  # the first signal in a wait, the second in a later call
        if not method.entered(start if not sent else second.entries, done):
          return
        os.kill(os.getpid(), signal.SIGINT)
        sent.append(method)

    thread = threading.Thread(target=signals, daemon=True)
    thread.start()
    try:
      summary = train_and_evaluate(config, workdir)
    except KeyboardInterrupt as e:
      assert "second stop signal" in str(e), e
      break
    finally:
      done.set()
      thread.join()
    # no interrupt: only where the second signal missed the last save (try again)
    assert len(sent) < 2 and summary["status"] == "interrupted", (sent, summary["status"])
  else:
    pytest.fail("the second signal missed the last save in every try")
  logged = [r for r in caplog.records if r.exc_info and r.exc_info[0] is KeyboardInterrupt]
  assert not logged, [r.getMessage() for r in logged]
  gc.collect()  # an event loop Orbax left half set up reports itself when collected
  config.checkpoint.every_steps = 0
  assert train_and_evaluate(config, workdir)["status"] == "completed"


def test_a_library_run_stopped_by_a_signal_says_it_returns_and_how_to_resume(
    tmp_path, capsys, monkeypatch):
  """In a notebook (train_and_evaluate with its own handlers) a first Ctrl-C finishes the step,
  saves and returns: the lines say so and name the call that resumes, not a command or an
  exit; called again, the run completes."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  config = tiny_config(epochs=2)
  config.checkpoint.every_steps = 1
  waits = _Inside(monkeypatch, ocp.CheckpointManager, "wait_until_finished")
  done = threading.Event()

  def signal_once():
    if waits.entered(0, done):  # inside the loop's first save: training
      os.kill(os.getpid(), signal.SIGINT)

  thread = threading.Thread(target=signal_once, daemon=True)
  thread.start()
  try:
    summary = train_and_evaluate(config, str(tmp_path))
  finally:
    done.set()
    thread.join()
  out, err = capsys.readouterr()
  assert summary["status"] == "interrupted", summary["status"]
  assert "SIGINT received: finishing this step, saving a checkpoint, then returning" in err, err
  assert "exiting" not in err, err
  assert ("checkpoint saved. Run train_and_evaluate again with the same config and workdir to "
          "resume.") in out, out
  config.checkpoint.every_steps = 0
  assert train_and_evaluate(config, str(tmp_path))["status"] == "completed"


def test_a_run_that_fails_to_start_leaves_no_workdir(tmp_path):
  c = tiny_config()
  c.data.source = "files"
  c.data.files.train = c.data.files.validation = str(tmp_path / "missing.txt")
  with pytest.raises(DataError, match="no such file"):
    train_and_evaluate(c, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("on_devices", [False, True])
def test_checksums_are_equal_for_equal_bits_and_change_with_any_one_element(on_devices):
  """The checksum saved with each array: equal for equal bits, different when any one element
  changes, whatever its dtype; numpy (one process) and the devices (arrays spread over
  processes) give the same numbers. Sharded layouts: the resumed multi-device runs of
  test_multidevice.py verify theirs."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  sums = lambda a: ckpt_lib.checksums(a, on_devices=on_devices)  # noqa: E731
  rng = np.random.default_rng(0)
  arrays = {"a": {"f32": jnp.asarray(rng.normal(size=(3, 5)), jnp.float32),
                  "bf16": jnp.asarray(rng.normal(size=(7,)), jnp.bfloat16),
                  "i32": jnp.arange(11, dtype=jnp.int32), "flag": jnp.array([True, False]),
                  "big": jnp.asarray(rng.integers(0, 2**32, (4099,), dtype=np.uint32)),
                  "key": jax.random.key(3)}}
  base = sums(arrays)
  assert base == ckpt_lib.checksums(arrays, on_devices=not on_devices)  # the two paths agree
  assert base == sums(jax.tree_util.tree_map(lambda x: x.copy(), arrays))
  for name in ("f32", "bf16", "i32", "flag"):
    x = arrays["a"][name]
    for i in range(x.size):
      flat = x.ravel()
      changed = flat.at[i].set(~flat[i] if x.dtype == jnp.bool_ else
                               (flat[i] + 1).astype(x.dtype)).reshape(x.shape)
      other = sums({"a": {**arrays["a"], name: changed}})
      assert other["a"][f"['{name}']"] != base["a"][f"['{name}']"], (name, i)
      assert all(other["a"][k] == base["a"][k] for k in base["a"] if k != f"['{name}']")
  other = sums({"a": {**arrays["a"], "key": jax.random.key(4)}})
  assert other["a"]["['key']"] != base["a"]["['key']"]
  # the same words in another order: the positions tell them apart
  swapped = arrays["a"]["i32"][::-1]
  assert sums({"a": {"i32": swapped}})["a"]["['i32']"] != base["a"]["['i32']"]


def _signal_during(monkeypatch, module, name):
  """Sends this process a real SIGTERM when `module.name` is next called (a point in a run's
  start-up), then runs it."""
  original = getattr(module, name)

  def with_signal(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    return original(*args, **kwargs)

  monkeypatch.setattr(module, name, with_signal)


def test_a_signal_during_start_up_stops_before_anything_is_written(tmp_path, monkeypatch,
                                                                   capsys):
  """A stop signal while a one-process run starts (data, model, restore) ends it before it
  writes anything: StopRequested, no workdir for a new run, and a resumed run's files byte for
  byte as they were (it used to build the whole run, write config.json, history.jsonl,
  TensorBoard and an 'interrupted' summary, and name an empty checkpoints folder)."""
  from infinito_jax import data as data_lib
  workdir = tmp_path / "new"
  _signal_during(monkeypatch, data_lib, "prepare")
  with pytest.raises(lifecycle.StopRequested, match="SIGTERM"):
    train_and_evaluate(tiny_config(epochs=1), str(workdir))
  assert not workdir.exists()
  assert "SIGTERM received: stopping before training starts" in capsys.readouterr().err
  monkeypatch.undo()
  old = tmp_path / "old"
  train_and_evaluate(tiny_config(epochs=2, stop_after_steps=17), str(old))  # a partial window
  before = {p: p.read_bytes() for p in old.rglob("*") if p.is_file() and p.name != ".lock"}
  _signal_during(monkeypatch, data_lib, "prepare")  # the restore prepares the data too
  with pytest.raises(lifecycle.StopRequested):
    train_and_evaluate(tiny_config(epochs=2), str(old))
  after = {p: p.read_bytes() for p in old.rglob("*") if p.is_file() and p.name != ".lock"}
  assert after == before


_START_UP_ABORT = r"""
import os, signal, sys, time
from infinito_jax import lifecycle
stop = lifecycle.StopSignals(hard_abort=True).install()
stop.summary_path = sys.argv[1]  # what the loop sets just before its first step
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(0.3)
os.kill(os.getpid(), signal.SIGINT)
time.sleep(10)
print("not aborted")
"""


def test_a_second_signal_during_start_up_says_so_and_leaves_the_summary(tmp_path):
  """Two signals before a run's first step (train.py's hard abort): exit 130 with a line that
  says no step was trained, not the line about a save in progress, and summary.json keeps the
  status the run had (it became 'aborted' though nothing had changed)."""
  summary = tmp_path / "summary.json"
  summary.write_text(json.dumps({"status": "interrupted", "steps": 243}))
  root = pathlib.Path(__file__).resolve().parents[1]
  out = subprocess.run([sys.executable, "-c", _START_UP_ABORT, str(summary)],
                       capture_output=True, text=True, timeout=120, cwd=root)
  assert out.returncode == 130, out
  assert ("Aborted by a second signal during start-up: no step was trained, and what was "
          "saved before is intact.") in out.stderr, out.stderr
  assert "save in progress" not in out.stderr
  assert json.loads(summary.read_text()) == {"status": "interrupted", "steps": 243}


def test_nothing_to_do_for_a_stopped_run_under_shorter_settings_keeps_one_status(tmp_path,
                                                                                 capsys):
  """A run stopped before its end, started again with settings it has already passed (fewer
  epochs), trains nothing and keeps its status: the 'Nothing to do' line names that status
  and says the settings given end it (it said 'has ended (completed)' beside a summary that
  said 'stopped')."""
  summary = train_and_evaluate(tiny_config(epochs=2, stop_after_steps=45), str(tmp_path))
  assert summary["status"] == "stopped" and summary["steps"] == 45
  capsys.readouterr()
  again = train_and_evaluate(tiny_config(epochs=1), str(tmp_path))
  out = capsys.readouterr().out
  assert again["status"] == "stopped" and again["steps"] == 45
  assert (f"Nothing to do: the run in {tmp_path} (stopped at step 45) has no steps left to "
          "train with these settings (completed). To train on, raise config.train.epochs "
          "above 1 (now 1); to start over, pass fresh=True.") in out, out
  assert "has ended" not in out


def test_json_files_are_written_through_a_temporary_name_of_their_own(tmp_path):
  """dump_json (evaluate.py's reports, summary.json, ...) renames a temporary file of its own
  into place: a user's `<path>.tmp` is neither overwritten nor removed (the fixed name did
  both), nothing else is left, and the file gets a plain file's permissions."""
  (tmp_path / "r.json.tmp").write_text("my notes")
  ckpt_lib.dump_json(str(tmp_path / "r.json"), {"loss": 1.5})
  assert (tmp_path / "r.json.tmp").read_text() == "my notes"
  assert json.loads((tmp_path / "r.json").read_text()) == {"loss": 1.5}
  assert sorted(os.listdir(tmp_path)) == ["r.json", "r.json.tmp"]
  umask = os.umask(0)
  os.umask(umask)
  assert os.stat(tmp_path / "r.json").st_mode & 0o777 == 0o666 & ~umask


def test_a_damaged_best_checkpoint_is_found_at_resume(overfit_run, tmp_path, capsys):
  """The best step kept beside the newest one is read at resume as evaluate.py reads it: a
  damaged one is moved aside with a warning, and the resumed step, intact and validated,
  stands as the best (the run used to train on and end naming as its best a step nobody can
  read); the best at the end is the better of it and the later validations."""
  run = copy_run(overfit_run[0], tmp_path)
  best = overfit_run[1]["best_step"]
  damage(run / "checkpoints" / str(best), "flipped_bytes")
  summary = train_and_evaluate(overfit_config(epochs=4), str(run))
  out = capsys.readouterr().out
  assert f"warning: the best checkpoint (step {best}) is damaged" in out, out
  assert "the resumed step 90 (validation loss " in out and ") is the best now." in out
  assert [p.name.split("-")[0] for p in (run / ckpt_lib.DAMAGED_DIR).iterdir()] == [str(best)]
  val = {h["step"]: h["loss"] for h in map(json.loads, (run / "history.jsonl").read_text()
                                            .splitlines()) if h["kind"] == "validation"}
  assert summary["status"] == "completed" and summary["steps"] == 120
  assert summary["best_step"] == min((90, 120), key=val.get)
  assert restore_run(str(run)).step == summary["best_step"]  # what evaluate.py reads, intact


@pytest.mark.parametrize("item, old, new", [("meta", r'\"zu\"', r'\"zz\"'),  # the tokenizer
                                            ("progress", '"best_step": 60', '"best_step": 30')])
def test_a_json_item_changed_on_disk_is_damage(overfit_run, tmp_path, item, old, new):
  """A step's JSON items vouch for each other (progress holds meta's digest, meta progress's):
  one word of the tokenizer, or the record's best step, changed on disk is named as damage by
  evaluate.py and by a resume. A word changed used to score silently with another vocabulary."""
  run = copy_run(overfit_run[0], tmp_path)
  path = run / "checkpoints" / "90" / item / "metadata"
  text = path.read_text()
  assert text.count(old) >= 1, (item, old)
  path.write_text(text.replace(old, new, 1))
  with pytest.raises(CheckpointError, match=rf"90/{item} differs from the digest written with "
                                            r"it .*damaged"):
    ckpt_lib.Checkpointer(str(run), read_only=True).read_json(90, item)
  assert restore_run(str(run)).step == 60  # evaluate.py scores the best step, intact
  with pytest.raises(DamagedCheckpointError, match="newest intact step is 60"):
    train_and_evaluate(overfit_config(epochs=4), str(run))


_HARD_EXIT_IN_START_UP = r"""
import os, signal, sys, time
from infinito_jax import lifecycle
stop = lifecycle.StopSignals(hard_abort=True, startup_grace_s=1.0).install()
from configs import tiny
from infinito_jax import data as data_lib
from infinito_jax.train import train_and_evaluate
real = data_lib.prepare

def slow_prepare(*args, **kwargs):  # the workdir and its lock are made: signals now
  os.kill(os.getpid(), signal.SIGTERM)
  if sys.argv[2] == "twice":
    time.sleep(0.3)
    os.kill(os.getpid(), signal.SIGTERM)
  time.sleep(10)  # a start-up that reaches no check for long (the watchdog's case)
  return real(*args, **kwargs)

data_lib.prepare = slow_prepare
train_and_evaluate(tiny.get_config(), sys.argv[1], stop=stop)
print("not stopped")
"""


@pytest.mark.parametrize("how, code, says", [
    ("twice", 130, "Aborted by a second signal during start-up: no step was trained"),
    ("once", 0, "Start-up did not reach a stopping point within 1 s of SIGTERM")])
def test_a_hard_exit_during_a_new_runs_start_up_leaves_no_workdir(tmp_path, how, code, says):
  """train.py's hard exits before the first step (a second signal; the watchdog of a start-up
  that reaches no check) end the process with os._exit: they now remove the new run's
  workdir, as a stop at a check does, instead of leaving it with its lock file."""
  root = pathlib.Path(__file__).resolve().parents[1]
  workdir = tmp_path / "new"
  out = subprocess.run([sys.executable, "-c", _HARD_EXIT_IN_START_UP, str(workdir), how],
                       capture_output=True, text=True, timeout=120, cwd=root,
                       env={**os.environ, "PYTHONPATH": str(root)})
  assert out.returncode == code and says in out.stderr, out
  assert not workdir.exists(), os.listdir(workdir)


# ----- a resume writes nothing until it trains (found by a hostile helper, 2026-12-06) -----


def _files(workdir) -> dict:
  """Every file of a workdir and its bytes, the lock file (the owner's note) apart."""
  return {p.relative_to(workdir): p.read_bytes() for p in pathlib.Path(workdir).rglob("*")
          if p.is_file() and p.name != ".lock"}


def _keep_best(config, on: bool):
  config.checkpoint.keep_best = on
  return config


def test_keep_best_false_deletes_nothing_until_the_resumed_run_trains(overfit_run, tmp_path,
                                                                      monkeypatch, capsys):
  """checkpoint.keep_best=false given to a run that then trains nothing ('Nothing to do', or
  a stop signal during start-up) leaves its best checkpoint where it was: the change is not
  applied, and evaluate.py still scores that step (the best step was deleted at the resume,
  before the run knew it would train, and evaluate.py then failed)."""
  from infinito_jax import data as data_lib
  run = copy_run(overfit_run[0], tmp_path)
  best = overfit_run[1]["best_step"]
  before = _files(run)
  train_and_evaluate(_keep_best(overfit_config(), False), str(run))
  assert "Nothing to do" in capsys.readouterr().out
  _signal_during(monkeypatch, data_lib, "prepare")
  with pytest.raises(lifecycle.StopRequested):
    train_and_evaluate(_keep_best(overfit_config(epochs=4), False), str(run))
  monkeypatch.undo()
  assert _files(run) == before
  assert restore_run(str(run)).step == best
  summary = train_and_evaluate(_keep_best(overfit_config(epochs=4), False), str(run))
  assert steps_on_disk(run) == [summary["steps"]]  # applied once it trains, as documented


def test_keep_best_turned_back_on_makes_the_resumed_validated_step_the_best(tmp_path, capsys):
  """A run trained with keep_best=false, resumed with keep_best=true, has no checkpoint of the
  best step its record names: the resumed step, validated, becomes the best (said in a note),
  so summary.json and evaluate.py name a step on disk (it named the step never kept, and
  evaluate.py failed)."""
  run = tmp_path / "run"
  first = train_and_evaluate(_keep_best(overfit_config(), False), str(run))
  assert first["best_step"] < first["steps"] == 90 and steps_on_disk(run) == [90]
  capsys.readouterr()
  summary = train_and_evaluate(_keep_best(overfit_config(epochs=4), True), str(run))
  out = capsys.readouterr().out
  assert (f"note: the best checkpoint (step {first['best_step']}) was not kept "
          "(checkpoint.keep_best was false); the resumed step 90") in out, out
  val = {h["step"]: h["loss"] for h in map(json.loads, (run / "history.jsonl").read_text()
                                            .splitlines()) if h["kind"] == "validation"}
  assert summary["best_step"] == min((90, 120), key=val.get)
  assert summary["best_step"] in steps_on_disk(run)
  assert restore_run(str(run)).step == summary["best_step"]


def test_a_workdir_whose_run_saved_no_checkpoint_starts_it_again_or_refuses_other_settings(
    tmp_path, capsys):
  """A workdir holding the record (config.json, history.jsonl) of a run that saved no
  checkpoint: with other settings it is refused and left byte for byte (a new run of any
  config silently replaced that record); with the same settings the run starts again and,
  its keys being the same, trains the same losses."""
  run = tmp_path / "run"
  train_and_evaluate(tiny_config(epochs=1), str(run))
  shutil.rmtree(run / "checkpoints")  # as a run killed before its first save leaves it
  history = (run / "history.jsonl").read_text()
  before = _files(run)
  other = tiny_config(epochs=1)
  other.model.hidden_dim = 16
  with pytest.raises(ConfigError, match=r"holds the record of a run \(config\.json, "
                     r"history\.jsonl\) but no checkpoint.*model\.hidden_dim: 32 -> 16.*Start over "
                     r"with fresh=True .*choose a new workdir"):
    train_and_evaluate(other, str(run))
  assert _files(run) == before
  (run / "config.json").write_text("{}")  # it cannot vouch for any setting: refused too
  with pytest.raises(ConfigError, match=r"its config\.json lacks \d+ field\(s\)"):
    train_and_evaluate(other, str(run))
  (run / "config.json").write_bytes(before[pathlib.Path("config.json")])
  capsys.readouterr()
  train_and_evaluate(tiny_config(epochs=1), str(run))
  assert "has no checkpoint (none was saved, or they were removed): it starts again with the " \
      "same settings" in capsys.readouterr().out

  def losses(text):
    return [(h["step"], h["loss"]) for h in map(json.loads, text.splitlines())
            if h["kind"] in ("train", "validation")]
  assert losses((run / "history.jsonl").read_text()) == losses(history)


def test_fresh_stopped_during_start_up_puts_the_previous_run_back(overfit_run, tmp_path,
                                                                  monkeypatch, capsys):
  """--fresh moves the old run aside; a stop signal before the new run trains moves it back:
  the workdir is byte for byte as it was and no DIR.old-* is left (the old run stayed aside,
  the workdir held only the lock, and the next plain command started a new run)."""
  from infinito_jax import data as data_lib
  run = copy_run(overfit_run[0], tmp_path)
  before = _files(run)
  _signal_during(monkeypatch, data_lib, "prepare")
  with pytest.raises(lifecycle.StopRequested):
    train_and_evaluate(overfit_config(), str(run), fresh=True)
  assert "Moved the previous run back from" in capsys.readouterr().out
  assert _files(run) == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


_KILLED_MOVE = """
import os, signal, sys
from infinito_jax import lifecycle
real, moved = os.replace, []
def replace(a, b):  # kill -9 once two entries have moved (after the notes)
  real(a, b)
  if not str(b).endswith(lifecycle.MOVE_NOTE):
    moved.append(a)
  if len(moved) == 2:
    os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
if sys.argv[1] == "aside":
  lifecycle.move_aside(sys.argv[2])
else:
  lifecycle.move_back(sys.argv[2], sys.argv[3])
"""


def test_a_move_killed_halfway_is_finished_by_the_next_fresh_start(overfit_run, tmp_path):
  """--fresh's move of the previous run aside (and its undoing) killed by kill -9 halfway left
  the run split over two folders, and the next --fresh moved the rest into a third. A note
  names where it was going: a plain start is refused, saying so (nothing changed); --fresh
  finishes the move, the previous run whole in the folder the first move chose."""
  import sys  # pylint: disable=g-import-not-at-top,redefined-outer-name
  root = pathlib.Path(__file__).resolve().parents[1]
  run = copy_run(overfit_run[0], tmp_path)
  before = _files(run)

  def killed(*args):
    out = subprocess.run([sys.executable, "-c", _KILLED_MOVE, *map(str, args)],
                         env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True)
    assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]

  killed("aside", run)
  old = [p for p in tmp_path.iterdir() if ".old-" in p.name]
  moved = lambda: sorted(p.name for p in old[0].iterdir() if p.name != lifecycle.MOVE_NOTE)
  assert len(old) == 1 and len(moved()) == 2  # split: two entries moved
  with pytest.raises(WorkdirError, match=rf"killed while it moved the previous run in {run} to "
                                         rf"{old[0]}: .*Start again with fresh=True to finish"):
    train_and_evaluate(overfit_config(), str(run))
  assert len(moved()) == 2 and (run / lifecycle.MOVE_NOTE).exists()
  # readers are told the workdir holds part of a run (evaluate.py said its checkpoints folder
  # was gone, or scored half a run)
  with pytest.raises(CheckpointError, match=rf"{run} holds only part of it\. Start a run with "
                                            rf"fresh=True in {run} to finish the move"):
    restore_run(str(run))
  # and so are they in the other folder, which holds the other part (evaluate.py scored it
  # and wrote its report there); a start there, --fresh or not, is refused: --fresh would have
  # moved that part into a third folder
  half = rf"{old[0]} holds only part of that run, the rest lying in {run}"
  with pytest.raises(CheckpointError, match=rf"into {old[0]}: {half}\. Start a run with "
                                            rf"fresh=True in {run} to finish the move"):
    restore_run(str(old[0]))
  for fresh in (False, True):
    with pytest.raises(WorkdirError, match=rf"{half}, and is no workdir to start in"):
      train_and_evaluate(overfit_config(), str(old[0]), fresh=fresh)
  assert len(moved()) == 2
  # what was made on both sides since (an export of each half) is not overwritten: refused
  (run / "exported").mkdir()
  (old[0] / "exported").mkdir()
  with pytest.raises(WorkdirError, match=r"both hold exported, made in one of them since"):
    train_and_evaluate(overfit_config(epochs=1), str(run), fresh=True)
  (old[0] / "exported").rmdir()
  # a killed undoing (a --fresh start that stopped before training moves the run back)
  (run / lifecycle.MOVE_NOTE).unlink()
  (old[0] / lifecycle.MOVE_NOTE).unlink()
  for e in sorted(run.iterdir()):
    if e.name != lifecycle.LOCK_FILE:
      os.replace(e, old[0] / e.name)
  assert _files(old[0]) == before
  killed("back", run, old[0])
  assert lifecycle.unfinished_move(str(run)) == str(old[0])
  with pytest.raises(CheckpointError, match=rf"moved the previous run of that folder back out "
                                            rf"of {old[0]}: {half}"):
    restore_run(str(old[0]))
  with pytest.raises(WorkdirError, match=rf"stopped before training was killed while it moved "
                                         rf"the previous run back from {old[0]} into {run}"):
    train_and_evaluate(overfit_config(), str(run))
  summary = train_and_evaluate(overfit_config(epochs=1), str(run), fresh=True)
  assert summary["steps"] == 30
  assert [p for p in tmp_path.iterdir() if ".old-" in p.name] == old  # no third folder
  assert _files(old[0]) == before and not (run / lifecycle.MOVE_NOTE).exists()
  assert not (old[0] / lifecycle.MOVE_NOTE).exists()


def test_a_killed_moves_notes_hold_only_where_both_folders_name_each_other(tmp_path):
  """The two notes of a killed move name each other. A copy of the workdir (whose note names
  a folder that names the original) is no split run: --fresh there moved its files into the
  original's destination (which then could not finish its own move). A damaged note in the
  workdir is replaced by the destination's word (--fresh split the run over two DIR.old-*
  folders, silently). A note whose other half is gone (a kill between the two removals at the
  end) is ignored: the run is whole."""
  import shutil  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top,redefined-outer-name
  root = pathlib.Path(__file__).resolve().parents[1]
  run = tmp_path / "run"
  (run / "checkpoints" / "30").mkdir(parents=True)
  for name in ("config.json", "history.jsonl", "summary.json"):
    (run / name).write_text(name)
  before = _files(run)
  out = subprocess.run([sys.executable, "-c", _KILLED_MOVE, "aside", str(run)],
                       env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True)
  assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]
  [old] = [p for p in tmp_path.iterdir() if ".old-" in p.name]
  assert lifecycle.unfinished_move(str(run)) == str(old)
  copy = tmp_path / "copy"
  shutil.copytree(run, copy, symlinks=True)
  assert lifecycle.split_run(str(copy)) is None and lifecycle.unfinished_move(str(copy)) is None
  moved = lifecycle.move_aside(str(copy))
  assert moved != str(old) and ".old-" in moved and not (copy / lifecycle.MOVE_NOTE).exists()
  assert lifecycle.unfinished_move(str(run)) == str(old)  # the original's move is untouched
  (run / lifecycle.MOVE_NOTE).write_text("garbage{")
  assert lifecycle.unfinished_move(str(run)) == str(old)
  assert "holds only part of it" in lifecycle.split_run(str(run), reader=True)
  assert "holds only part of that run" in lifecycle.split_run(str(old), reader=True)
  assert lifecycle.move_aside(str(run)) == str(old) and _files(old) == before
  assert not (run / lifecycle.MOVE_NOTE).exists() and not (old / lifecycle.MOVE_NOTE).exists()
  # a kill between the end's two removals: the workdir's note names a folder that no longer
  # names it; the run lies whole there, and neither folder is called part of a run
  lifecycle._note_move(str(run), str(old))  # pylint: disable=protected-access
  (old / lifecycle.MOVE_NOTE).unlink()
  assert lifecycle.split_run(str(run)) is None and lifecycle.split_run(str(old)) is None
  assert lifecycle.move_aside(str(run)) is None and not (run / lifecycle.MOVE_NOTE).exists()


def test_a_signal_once_the_run_writes_its_files_finishes_a_step_and_saves(tmp_path,
                                                                          monkeypatch):
  """A stop signal that comes after the start-up's last check, while the resumed run writes
  its files (the accepted change into config.json and history.jsonl, TensorBoard), trains one
  step and saves it: config.json then tells the truth about a checkpoint (the run used to stop
  'before the first step' with config.json naming a learning rate no checkpoint was trained
  with)."""
  from infinito_jax import writers as writers_lib
  run = tmp_path / "run"
  train_and_evaluate(tiny_config(epochs=2, stop_after_steps=17), str(run))
  _signal_during(monkeypatch, writers_lib, "Writers")
  changed = tiny_config(epochs=2, learning_rate=2e-3, allow_changes=True)
  summary = train_and_evaluate(changed, str(run))
  assert summary["status"] == "interrupted" and summary["steps"] == 18
  saved = ckpt_lib.Checkpointer(str(run), read_only=True).read_meta(18)["config"]
  on_disk = json.loads((run / "config.json").read_text())
  assert saved["train"]["learning_rate"] == on_disk["train"]["learning_rate"] == 2e-3


def test_summary_says_running_once_the_run_writes_its_files(tmp_path, monkeypatch):
  """summary.json is written ('running') as soon as the run goes on to train, before its
  first step: a second signal before the first validation then marks it 'aborted' (there was
  no summary.json to mark)."""
  from infinito_jax import writers as writers_lib
  seen, real = [], writers_lib.Writers

  def writers(config, workdir, *args, **kwargs):
    seen.append(json.loads((pathlib.Path(workdir) / "summary.json").read_text())["status"])
    return real(config, workdir, *args, **kwargs)

  monkeypatch.setattr(writers_lib, "Writers", writers)
  train_and_evaluate(tiny_config(epochs=1, stop_after_steps=3), str(tmp_path / "run"))
  assert seen == ["running"]


def test_a_folder_where_the_run_writes_a_file_is_refused_before_training(tmp_path):
  """summary.json (or history.jsonl, config.json) that is a folder is refused before a step is
  trained, naming it (the run trained a whole epoch and then failed to write it)."""
  run = tmp_path / "run"
  (run / "summary.json").mkdir(parents=True)
  with pytest.raises(WorkdirError, match=r"summary\.json is a folder, where the run writes"):
    train_and_evaluate(tiny_config(epochs=1), str(run))
  assert steps_on_disk(run) == [] and not (run / "history.jsonl").exists()
  other = tmp_path / "other"
  other.mkdir()
  (other / "checkpoints").write_text("x")  # it trained an epoch, then blamed a removed workdir
  with pytest.raises(WorkdirError, match=r"checkpoints is not a folder, where the run keeps"):
    train_and_evaluate(tiny_config(epochs=1), str(other))
  assert sorted(p.name for p in other.iterdir()) == ["checkpoints"]  # as it was: no .lock left


def test_a_best_step_whose_meta_changed_on_disk_is_found_at_resume(overfit_run, tmp_path,
                                                                   capsys):
  """The best step's meta item (config, vocabulary) is read at resume as evaluate.py reads it:
  one word of its tokenizer changed on disk is damage, moved aside, and the run ends naming a
  best step evaluate.py can read (the run finished naming the changed step, which evaluate.py
  then refused)."""
  run = copy_run(overfit_run[0], tmp_path)
  best = overfit_run[1]["best_step"]
  path = run / "checkpoints" / str(best) / "meta" / "metadata"
  path.write_text(path.read_text().replace(r'\"zu\"', r'\"zz\"', 1))
  summary = train_and_evaluate(overfit_config(epochs=4), str(run))
  assert f"warning: the best checkpoint (step {best}) is damaged" in capsys.readouterr().out
  assert restore_run(str(run)).step == summary["best_step"] != best


def test_two_spellings_of_one_value_are_no_change():
  """attention_dropout unset (model.dropout's value) against that number, and replica_hparams
  written '1e-3' or '0.001' with spaces, are the same settings: a resume accepts them without
  allow_changes (they were refused as recipe changes); other values are still changes."""
  saved = tiny_config(replicas=2, replica_hparams="learning_rate=1e-3;learning_rate=1e-2")
  saved.model.dropout, saved.model.attention_dropout = 0.1, None
  new = tiny_config(replicas=2, replica_hparams="learning_rate=0.001; learning_rate = 0.01")
  new.model.dropout, new.model.attention_dropout = 0.1, 0.1
  assert config_lib.diff(saved.to_dict(), new) == []
  assert config_lib.check_resume(saved.to_dict(), new, "w") == []
  new.model.attention_dropout = 0.2
  new.train.replica_hparams = "learning_rate=0.001;learning_rate=0.02"
  assert [c.field for c in config_lib.diff(saved.to_dict(), new)] == [
      "model.attention_dropout", "train.replica_hparams"]


def test_a_refused_change_names_the_fixed_fields_apart_from_the_recipe_ones():
  """A fixed field and a recipe field changed together: the refusal says the fixed one cannot
  change, and the recipe one can with train.allow_changes (it was listed among the fields that
  'fix the model, the data or the keys')."""
  saved = tiny_config()
  new = tiny_config(learning_rate=saved.train.learning_rate / 3)
  new.model.hidden_dim = 2 * saved.model.hidden_dim
  with pytest.raises(ConfigError) as e:
    config_lib.check_resume(saved.to_dict(), new, "w")
  text = str(e.value)
  fixed, recipe = text.split(" (Also changed, in the recipe: ")
  assert "model.hidden_dim: " in fixed and "learning_rate" not in fixed
  assert "This field fixes the model, the data or the keys" in fixed
  assert recipe.startswith("train.learning_rate: ") and recipe.endswith(
      "--config.train.allow_changes=true lets those change on resume.)")
  new.train.allow_changes = True
  with pytest.raises(ConfigError, match=r"those may change, as train.allow_changes=true asks"):
    config_lib.check_resume(saved.to_dict(), new, "w")


def test_keep_best_false_deletes_the_old_best_only_once_a_save_is_on_disk(overfit_run, tmp_path,
                                                                          monkeypatch, capsys):
  """A resume with keep_best=false that dies after it began to train but before its first
  save (a second signal, kill -9, an error) still has its best checkpoint: the first save
  prunes it, once on disk (the resume deleted it as training began); the next start that
  trains nothing puts config.json back to the checkpoint's config (the dead resume had written
  its own)."""
  from infinito_jax import train as train_lib
  run = copy_run(overfit_run[0], tmp_path)
  best = overfit_run[1]["best_step"]

  def dies(self):
    raise RuntimeError("the process died here")

  monkeypatch.setattr(train_lib.Run, "describe", dies)  # just after the run's files changed
  with pytest.raises(RuntimeError):
    train_and_evaluate(_keep_best(overfit_config(epochs=4), False), str(run))
  monkeypatch.undo()
  assert best in steps_on_disk(run) and restore_run(str(run)).step == best
  assert json.loads((run / "config.json").read_text())["train"]["epochs"] == 4
  capsys.readouterr()
  train_and_evaluate(overfit_config(), str(run))  # nothing to do: 3 epochs are done
  assert f"Rewrote {run / 'config.json'}, which did not match" in capsys.readouterr().out
  saved = ckpt_lib.Checkpointer(str(run), read_only=True).read_meta(90)["config"]
  assert json.loads((run / "config.json").read_text()) == saved


def test_a_damaged_best_moved_aside_in_a_stopped_start_up_is_said(overfit_run, tmp_path,
                                                                  monkeypatch, capsys):
  """A resume moves a damaged best step aside while it starts; a stop signal then ends the
  start-up, and the move is still said, with where it went (it was said only by a run that
  went on, so a stopped start-up moved it silently)."""
  from infinito_jax import data as data_lib
  run = copy_run(overfit_run[0], tmp_path)
  best = overfit_run[1]["best_step"]
  damage(run / "checkpoints" / str(best), "flipped_bytes")
  _signal_during(monkeypatch, data_lib, "prepare")
  with pytest.raises(lifecycle.StopRequested):
    train_and_evaluate(overfit_config(epochs=4), str(run))
  out = capsys.readouterr().out
  moved = next((run / ckpt_lib.DAMAGED_DIR).iterdir())
  assert f"warning: the best checkpoint (step {best}) is damaged" in out
  assert f"moved it to {moved}." in out, out


def test_history_is_rewritten_through_a_temporary_file_of_its_own(tmp_path):
  """history.jsonl is rewritten atomically through a private temporary file: a user's
  history.jsonl.tmp (here a folder) is neither used nor in the way (a traceback before)."""
  from infinito_jax.train import History
  (tmp_path / "history.jsonl.tmp").mkdir()
  history = History(str(tmp_path / "history.jsonl"), [{"kind": "train", "step": 1}])
  assert (tmp_path / "history.jsonl").read_text() == '{"kind": "train", "step": 1}\n'
  assert not history.sync()  # it holds the entries: nothing to rewrite
  assert sorted(p.name for p in tmp_path.iterdir()) == ["history.jsonl", "history.jsonl.tmp"]
