"""Studies: configs/study_tiny.py end to end, and refusals before any training."""

import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from configs import study_tiny
from infinito_jax import lifecycle
from infinito_jax import stats
from infinito_jax import study as study_lib
from infinito_jax.errors import ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_tiny_study_writes_its_json_table_and_plots(tmp_path):
  out = subprocess.run([sys.executable, "-m", "infinito_jax.study", "--config",
                        "configs/study_tiny.py", "--workdir", str(tmp_path)], cwd=ROOT,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  report = json.loads((tmp_path / "study.json").read_text())
  names = [v["name"] for v in report["variants"]]
  assert names == ["v5.2", "v5.1-equivalent"] and report["baseline"] == "v5.2"
  for v in report["variants"]:
    runs = json.loads((tmp_path / "runs" / v["name"] / "summary.json").read_text())
    best = [r["best_val_perplexity"] for r in runs["replicas"]]
    assert [p["best_val_perplexity"] for p in v["per_seed"]] == best  # from the runs themselves
    assert [p["seed"] for p in v["per_seed"]] == [42, 43]
    assert v["best_val_perplexity"]["mean"] == pytest.approx(np.mean(best))
    assert v["best_val_perplexity"]["std"] == pytest.approx(np.std(best, ddof=1))
    assert len(v["per_seed"][0]["curve"]["steps"]) == 4  # every 15 steps for 2 epochs
    g = v["generation"]
    for k in ("distinct_1", "distinct_2", "repetition_rate"):
      assert 0 < g[k]["mean"] <= 1
    assert g["judge_perplexity"]["mean"] > 1 and g["samples"][0]["text"]
    for k in ("distinct_1", "distinct_2", "repetition_rate", "judge_perplexity"):  # per seed
      assert g[k]["mean"] == pytest.approx(np.mean([x[k] for x in g["per_seed"]]))
    assert [x["seed"] for x in g["per_seed"]] == [p["seed"] for p in v["per_seed"]]
    assert v["memory"]["parameters"] == runs["parameters"]
    assert v["memory"]["state_bytes_per_replica"] > 2 * 4 * runs["parameters"]  # + Adam moments
  vs = report["variants"][1]["vs_baseline"]
  assert 0 <= vs["p"] <= vs["p_holm"] <= 1 and np.isfinite(vs["cohens_d"])
  assert report["same_key"]["bitwise_identical"] and report["same_key"]["final_val_loss_std"] == 0
  table = (tmp_path / "study.md").read_text()
  assert "| v5.1-equivalent |" in table and "bitwise identical" in table
  assert "Measured on other terms" not in table and "Another vocabulary" not in table
  # a variant measured on another vocabulary, and judged by its words re-encoded: both said
  report["variants"][1]["overrides"] = {"model.vocab_size": 48}
  report["variants"][1]["generation"]["judge_unknown_rate"] = 0.125
  table = study_lib.markdown(report)
  assert "Measured on other terms: v5.1-equivalent (model.vocab_size) change" in table
  assert "v5.1-equivalent (12.5% of its sampled words unknown to the judge)" in table
  assert "% <unk> to the judge) |" in table
  import matplotlib.image  # pylint: disable=g-import-not-at-top
  for png in ("curves.png", "perplexity.png"):
    image = matplotlib.image.imread(tmp_path / png)
    assert image.ndim == 3 and image.shape[0] > 100 and image.std() > 0.01  # a real picture
  # a run field that changes a finished run is refused with the study's own fix (no --fresh)
  refused = subprocess.run([sys.executable, "-m", "infinito_jax.study", "--config",
                            "configs/study_tiny.py", "--workdir", str(tmp_path),
                            "--config.base.model.hidden_dim=64"], cwd=ROOT,
                           env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
                           text=True, timeout=600)
  assert refused.returncode == 1
  [line] = [l for l in refused.stderr.splitlines() if l.startswith("error:")]
  assert "model.hidden_dim: 32 -> 64" in line and "--fresh" not in line
  assert f"delete {tmp_path / 'runs' / 'v5.2'} and run the study again" in line
  # SIGTERM while the finished runs are analysed: a clean stop (exit 0), the next run redoes it.
  # At several moments: raised from the handler, the stop was once swallowed by a callback of
  # XLA's or the garbage collector's ("Exception ignored"), and the analysis went on.
  before = (tmp_path / "study.json").read_bytes()
  for delay in (0.0, 0.8, 1.7):
    proc = subprocess.Popen([sys.executable, "-m", "infinito_jax.study", "--config",
                             "configs/study_tiny.py", "--workdir", str(tmp_path)], cwd=ROOT,
                            env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:
      seen.append(line)
      if line.startswith("=== analysis"):
        time.sleep(delay)
        proc.send_signal(signal.SIGTERM)
        break
    log = "".join(seen) + proc.stdout.read()
    assert proc.wait(timeout=120) == 0, log[-3000:]
    assert "SIGTERM received: stopping at the next check" in log, (delay, log[-3000:])
    assert "Traceback" not in log and "Exception ignored" not in log, (delay, log[-3000:])
    if delay == 0.0 or "The study stopped" in log:  # stopped: the outputs are as they were
      assert "The study stopped" in log and "Written:" not in log, (delay, log[-3000:])
      assert (tmp_path / "study.json").read_bytes() == before
    else:  # the signal came after the last check (a short analysis): written whole, and said
      assert "came as the study wrote its outputs: they are complete" in log, log[-3000:]
      again = json.loads((tmp_path / "study.json").read_text())
      assert [v["best_val_perplexity"] for v in again["variants"]] == [
          v["best_val_perplexity"] for v in report["variants"]]
      before = (tmp_path / "study.json").read_bytes()
  # run again: nothing is trained again, the same numbers come out
  again = subprocess.run([sys.executable, "-m", "infinito_jax.study", "--config",
                          "configs/study_tiny.py", "--workdir", str(tmp_path)], cwd=ROOT,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
                         text=True, timeout=600)
  assert again.returncode == 0 and again.stdout.count("Nothing to do") == 3, again.stdout[-2000:]
  # each names the flag that trains it on: the reproducibility run's epochs are the study's own
  assert again.stdout.count("raise --config.base.train.epochs above 2 (now 2)") == 2, \
      again.stdout[-3000:]
  assert "raise --config.same_key_epochs above 1 (now 1)" in again.stdout, again.stdout[-3000:]
  report2 = json.loads((tmp_path / "study.json").read_text())
  assert [v["best_val_perplexity"] for v in report2["variants"]] == [
      v["best_val_perplexity"] for v in report["variants"]]
  # and each variant's wall time is its run's (summary.json), not the time at its last save
  for v in report2["variants"]:
    run = json.loads((tmp_path / "runs" / v["name"] / "summary.json").read_text())
    assert v["wall_time_s"] == run["wall_time_s"], v["name"]
  # a folder at an output's name: refused before anything is redone, the outputs left whole
  # (it was a traceback after the analysis, with some outputs replaced and some not)
  from infinito_jax.errors import WorkdirError  # pylint: disable=import-outside-toplevel
  kept = {o: (tmp_path / o).read_bytes() for o in ("curves.png", "study.md", "study.json")}
  (tmp_path / "perplexity.png").rename(tmp_path / "p.png")
  (tmp_path / "perplexity.png").mkdir()
  with pytest.raises(WorkdirError, match=r"perplexity.png is not a file"):
    study_lib.run_study(study_tiny.get_config(), str(tmp_path))
  assert {o: (tmp_path / o).read_bytes() for o in kept} == kept
  (tmp_path / "perplexity.png").rmdir()
  (tmp_path / "p.png").rename(tmp_path / "perplexity.png")
  # a change that a later run's train.py would refuse is refused before any run trains on
  c = study_tiny.get_config()
  c.base.train.epochs = 3  # v5.2 (first) would train a third epoch
  c.variants = (("v5.2", {}), ("v5.1-equivalent", {"model.exploration": False,
                                                    "model.hidden_dim": 64}))
  v52 = (tmp_path / "runs" / "v5.2" / "summary.json").read_bytes()
  with pytest.raises(ConfigError, match=r"the run in .*runs/v5.1-equivalent was trained with "
                     r"another config: model.hidden_dim: 32 -> 64.* delete .*runs/v5.1-equivalent "
                     r"and run the study again"):
    study_lib.run_study(c, str(tmp_path))
  assert (tmp_path / "runs" / "v5.2" / "summary.json").read_bytes() == v52
  assert not (tmp_path / "runs" / "v5.2" / "checkpoints" / "90").exists()


def test_command_line_mistakes_are_one_error_line_not_a_traceback(tmp_path):
  """As train.py's: a workdir that is a file, a missing config, a value of the wrong type, a
  config that cannot be loaded; each one `error:` line naming it, exit code 1."""
  (tmp_path / "afile").write_text("x")
  study = [sys.executable, "-m", "infinito_jax.study"]
  tiny = ["--config", "configs/study_tiny.py"]
  cases = {
      "workdir is a file": (tiny + ["--workdir", str(tmp_path / "afile")],
                            ["as a study's workdir", "a file is in the way"]),
      "under a file": (tiny + ["--workdir", str(tmp_path / "afile" / "sub")],
                       ["as a study's workdir", "a file is in the way"]),
      "missing config": (["--config", "configs/nope.py", "--workdir", str(tmp_path / "w")],
                         ["configs/nope.py: no such file", "study_tiny.py"]),
      "not a number": (tiny + ["--workdir", str(tmp_path / "w"), "--config.seeds=two"],
                       ["--config.seeds=two", "int()", "python -m infinito_jax.study --help"]),
      "run field type": (tiny + ["--workdir", str(tmp_path / "w"),
                                 "--config.base.train.epochs=abc"], ["epochs=abc"]),
      "get_config argument": (["--config=configs/study_tiny.py:foo", "--workdir",
                               str(tmp_path / "w")], ["study_tiny.py:foo"]),
      "no workdir": (tiny, ["pass --config", "--workdir"]),
  }
  import importlib.util  # pylint: disable=import-outside-toplevel
  if importlib.util.find_spec("wandb") is None:  # refused before the first run is announced
    cases["wandb missing"] = (tiny + ["--workdir", str(tmp_path / "w"),
                                      "--config.base.log.wandb_project=x"],
                              ["wandb is not installed"])
  procs = {name: subprocess.Popen(study + args, cwd=ROOT, env=dict(os.environ,
                                                                    JAX_PLATFORMS="cpu"),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for name, (args, _) in cases.items()}
  for name, proc in procs.items():
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, (name, err[-2000:])
    assert "Traceback" not in err and "FATAL" not in err, (name, err[-2000:])
    [line] = [l for l in err.splitlines() if l.startswith("error:")]
    for word in cases[name][1]:
      assert word in line, (name, line)
  assert not (tmp_path / "w").exists()


def test_kept_runs_on_relative_data_paths_are_checked_as_train_py_checks_them(tmp_path,
                                                                             monkeypatch):
  """The study's check of its kept runs, made before any trains, compares configs as train.py
  does: data files named relative to the command's folder are the same files (train.py stores
  them absolute), while a changed model field is refused, with the study's own fix."""
  from infinito_jax import data as data_lib  # pylint: disable=import-outside-toplevel
  from infinito_jax.train import train_and_evaluate  # pylint: disable=import-outside-toplevel
  from configs import tiny  # pylint: disable=import-outside-toplevel
  config = tiny.get_config()
  texts, _ = data_lib.load_texts(config.data, config.seed)
  for split, name in (("train", "train.txt"), ("validation", "valid.txt")):
    (tmp_path / name).write_text("\n".join(texts[split][:40]) + "\n")
  monkeypatch.chdir(tmp_path)
  config.data.source = "files"
  config.data.files.train, config.data.files.validation = "train.txt", "valid.txt"
  config.train.epochs, config.train.stop_after_steps = 1, 2
  train_and_evaluate(config, str(tmp_path / "study" / "runs" / "v"))
  study_lib._check_kept_config(config, str(tmp_path / "study"), "v")  # the same: no error
  config.model.hidden_dim = 64
  with pytest.raises(ConfigError, match=r"model.hidden_dim: 32 -> 64.*delete .*runs/v and run "
                                        r"the study again"):
    study_lib._check_kept_config(config, str(tmp_path / "study"), "v")
  # the record of a run whose checkpoints are gone (or that saved none) is checked too, before
  # any training, not only when its turn comes
  import shutil  # pylint: disable=import-outside-toplevel
  shutil.rmtree(tmp_path / "study" / "runs" / "v" / "checkpoints")
  with pytest.raises(ConfigError, match=r"holds the record of a run.*but no checkpoint, made "
                                        r"with other settings: model.hidden_dim"):
    study_lib._check_kept_config(config, str(tmp_path / "study"), "v")
  config.model.hidden_dim = 32
  study_lib._check_kept_config(config, str(tmp_path / "study"), "v")  # the same: no error


def test_a_variant_naming_an_unknown_field_is_refused_before_training(tmp_path):
  c = study_tiny.get_config()
  c.variants = (("v5.2", {}), ("typo", {"model.dropuot": 0.0}))
  with pytest.raises(ConfigError, match=r"variant 'typo' sets 'model.dropuot', which is not a "
                                        r"config field"):
    study_lib.run_study(c, str(tmp_path))
  assert not (tmp_path / "runs").exists()


def test_a_study_config_that_is_no_study_is_refused_by_name(tmp_path):
  """run_study given no ConfigDict (a dict, an int), or one without a study's fields, says so
  (it raised AttributeError from inside)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  for bad, says in ((3, r"the study's config is an int, not an ml_collections.ConfigDict"),
                    ({"seeds": 2}, r"is a dict, .*or ml_collections.ConfigDict\(this dict\)\.$"),
                    (ml_collections.ConfigDict({"seeds": 2}),
                     r"the study's config lacks base, variants, baseline, "),
                    (study_tiny.get_config().base,  # a run's: its fields were called unknown
                     r"^this is a run's config \(model, train, \.\.\.\), not a study's: train it "
                     r"with train\.py, or make it a study's base")):
    with pytest.raises(ConfigError, match=says):
      study_lib.run_study(bad, str(tmp_path / "s"))
  assert not (tmp_path / "s").exists()


def test_two_variants_of_one_config_are_refused_before_training(tmp_path):
  """A variant that sets the base's own value trains what the baseline trains: the study
  refuses it by name (grouped, it was a train.replica_hparams error naming neither)."""
  c = study_tiny.get_config()
  same_lr = c.base.train.learning_rate
  c.variants = (("v5.2", {}), ("other", {"model.dropout": 0.0}),
                ("same", {"train.learning_rate": same_lr}))
  with pytest.raises(ConfigError, match=r"variants 'v5.2' \(no overrides\) and 'same' .* train "
                                        r"the same config"):
    study_lib.run_study(c, str(tmp_path))
  assert not (tmp_path / "runs").exists()
  # nor do fields of logging and saving, nor an attention dropout equal to the dropout it
  # would take by default, nor a value the float32 step holds alike
  dropout = c.base.model.dropout
  for twin in ({"train.log_every": 7, "checkpoint.every_steps": 3},
               {"model.attention_dropout": dropout},
               {"train.learning_rate": same_lr * (1 + 1e-12)}):
    c.variants = (("v5.2", {}), ("twin", twin))
    with pytest.raises(ConfigError, match=r"variants 'v5.2' \(no overrides\) and 'twin' .* train "
                                          r"the same config"):
      study_lib.variant_configs(c)
  c.variants = (("v5.2", {}), ("other", {"train.eval_every_steps": 7}))  # early stopping moves
  assert len(study_lib.variant_configs(c)) == 2


def test_fewer_than_two_seeds_is_refused(tmp_path):
  c = study_tiny.get_config()
  c.seeds = 1
  with pytest.raises(ConfigError, match=r"at least 2 seeds"):
    study_lib.run_study(c, str(tmp_path))
  c.seeds = 2
  c.variants = (("a", {"model.dropout": 2.0}),)
  c.baseline = "a"
  with pytest.raises(ConfigError, match=r"variant 'a' \(study.base with "
                                        r"\{'model.dropout': 2.0\}\): config.model.dropout=2.0"):
    study_lib.run_study(c, str(tmp_path))
  # a base that cannot work is the base's fault, and its fix the study's field (config.base.*;
  # its flag --config.base.* on the command line)
  c.variants = (("a", {}),)
  c.base.model.remat_policy = "dots"
  with pytest.raises(ConfigError, match=r"^study.base: config.model.remat_policy='dots'.*add "
                                        r"config.base.model.remat = True"):
    study_lib.run_study(c, str(tmp_path))
  assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("field,value,message", [
    ("same_key_replicas", 1, "0 \\(off\\) or at least 2"),
    ("top_k", -3, "an integer >= 0"),
    ("sample_seeds", (), "a non-empty tuple"),
    ("sample_seeds", (0, 2**32), r"integers in \[0, 2\*\*32\)"),  # key(2**32) is key(0)
    ("temperature", -1.0, r"0 \(greedy\) or a number in \[1e-30, 3.4e\+38\]"),
    ("temperature", 1e39, "a larger one is infinite itself"),  # every sample was <pad>
    ("temperature", 1e-40, "a smaller one overflows them"),  # one word won, whatever the model
    ("sample_tokens", 0, "an integer >= 1"),
    ("target_perplexity", -5.0, "a perplexity > 1"),
    ("prompts", ("",), "at least one word"),
    ("on_divergence", "maybe", r"'record' \(a variant whose loss becomes non-finite"),
    ("top_k", 1000, "exceeds the model.vocab_size of variant 'v5.2' \\("),
    ("sample_tokens", 10_000, "exceeds the model.max_len of variant 'v5.2' \\("),
])
def test_study_settings_that_cannot_work_are_refused_before_training(tmp_path, field, value,
                                                                     message):
  c = study_tiny.get_config()
  c[field] = value
  with pytest.raises(ConfigError, match=rf"study.{field}=.*{message}"):
    study_lib.run_study(c, str(tmp_path))
  assert not (tmp_path / "runs").exists()


def test_a_reproducibility_run_too_large_for_the_memory_is_refused_before_any_run_trains(
    tmp_path):
  """same_key_replicas past the memory: refused with train.py's message before the variants
  train (it came after them, hours on a GPU), saying what train.replicas is in a study."""
  c = study_tiny.get_config()
  c.same_key_replicas = 10**9
  with pytest.raises(ConfigError, match=r"train.replicas=1000000000: the training state .* "
                     r"\(In a study, train.replicas is config.same_key_replicas here, replicas "
                     r"all of the one seed config.base.seed.\)"):
    study_lib.run_study(c, str(tmp_path))
  assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("variants,message", [
    ((("v5.2", {}), ("_same_key", {})), "not starting with '.' or '_'"),
    # Orbax writes the arrays of 'b\\c' under runs/b/c: a run that trains, then cannot be read
    ((("v5.2", {}), ("b\\c", {})), "without '/', '\\\\', '\\|' or control characters"),
    ((("v5.2", {}), ("a|b", {})), "rename the variant"),  # would split study.md's table row
    ((("v5.2", {}), ("a\nb", {})), "rename the variant"),
    ((("v5.2", {}), ("b" * 101, {})), "at most 100 bytes"),
    # a model that sees the word it predicts: its perplexity compares with nothing
    ((("v5.2", {}), ("bidir", {"model.causal": False})), "sets model.causal=False"),
    ((("v5.2", {}), ("one",)), "a tuple of \\(name, \\{field: value\\}\\) pairs"),
    ((("v5.2", {"model.hidden_dim": "big"}),), "model.hidden_dim='big' does not fit the field"),
    # groups of values within one variant would make its "seeds" copies of one seed
    ((("v5.2", {}), ("mixed", {"train.replica_hparams": "learning_rate=1e-2;learning_rate=1e-4"})),
     "sets 'train.replica_hparams'"),
    # a pause of one variant: the study never ended, its advice (the base's field) not applying
    ((("v5.2", {}), ("short", {"train.stop_after_steps": 5})),
     "sets train.stop_after_steps: its run would pause there at every command"),
    # a nested group where overrides are flat: named as such (it was "not a config field")
    ((("v5.2", {}), ("big", {"model": {"hidden_dim": 48}})),
     r"sets 'model', which is a group of fields: name each field it changes, e.g. \{'model\."),
])
def test_malformed_variants_are_one_clear_error(tmp_path, variants, message):
  c = study_tiny.get_config()
  c.variants = variants
  with pytest.raises(ConfigError, match=message):
    study_lib.run_study(c, str(tmp_path))
  assert not (tmp_path / "runs").exists()


def test_allow_changes_is_refused_in_a_study_and_its_advice_is_not_given(tmp_path):
  """A study never continues a kept run under changed values: with train.allow_changes a
  variant's results were reported under values they were not trained with. Refused in the base
  and in a variant before anything is made; a run's error that would advise it names the
  study's fix (delete the run) instead."""
  c = study_tiny.get_config()
  c.base.train.allow_changes = True
  with pytest.raises(ConfigError, match=r"study.base sets train.allow_changes=true.*delete"):
    study_lib.run_study(c, str(tmp_path))
  c = study_tiny.get_config()
  c.variants = (("v5.2", {}), ("lr", {"train.learning_rate": 1e-2,
                                      "train.allow_changes": True}))
  with pytest.raises(ConfigError, match=r"variant 'lr' sets train.allow_changes"):
    study_lib.run_study(c, str(tmp_path))
  assert not (tmp_path / "runs").exists()
  from infinito_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  changed = study_tiny.get_config().base
  changed.model.dropout = 0.3  # a recipe change: train.py's refusal advises allow_changes
  with pytest.raises(ConfigError, match="train.allow_changes=true to continue") as refused:
    config_lib.check_resume(study_tiny.get_config().base.to_dict(), changed, "W")
  e = study_lib._in_study_terms(refused.value, str(tmp_path), "v")
  assert "model.dropout: 0.1 -> 0.3" in str(e) and "train.allow_changes" not in str(e) and f"delete {tmp_path}/runs/v" in str(e), str(e)


@pytest.mark.slow
def test_a_diverging_variant_is_named_with_a_fix_that_works_in_a_study(tmp_path):
  """With study.on_divergence='stop': a variant whose loss became NaN was reported as
  'replica 4' with a fix in train.replica_hparams, which a study refuses: the error names the
  variant and the study's own way out."""
  from infinito_jax.errors import NonFiniteLossError  # pylint: disable=import-outside-toplevel
  c = study_tiny.get_config()
  c.on_divergence = "stop"
  c.variants = (("v5.2", {}), ("huge", {"train.learning_rate": 1e4, "train.clip_norm": 1e9}))
  with pytest.raises(NonFiniteLossError, match=r"variant\(s\) \['huge'\] diverged at "
                                               r"step \d+ .*lower learning rate.*or leave it "
                                               r"out, and run the study again \(its values "
                                               r"train as a new population"):
    study_lib.run_study(c, str(tmp_path))


HUGE = {"train.learning_rate": 1e4, "train.clip_norm": 1e9}  # non-finite within a few steps


@pytest.mark.slow
def test_a_diverged_variant_is_a_result_and_the_study_goes_on(tmp_path, capsys):
  """study.on_divergence='record' (the default): a variant whose loss becomes non-finite is
  reported as diverged (its step and seeds) and left out of every statistic; its seeds are
  frozen and the variant it trained with in one population trains on in that run, with the
  results its own population gives (within 1e-5; nothing is trained again); a diverged
  baseline leaves no comparison (and no reproducibility check: it would train the baseline).
  Run again, the study reaches the same report without training anything."""
  c = study_tiny.get_config()
  c.variants = (("v5.2", {}), ("huge", HUGE), ("nodrop", {"model.dropout": 0.0}))
  c.baseline = "huge"
  w = tmp_path / "study"
  report = study_lib.run_study(c, str(w))
  names = [v["name"] for v in report["variants"]]
  assert names == ["v5.2", "huge", "nodrop"]  # the study's order
  huge = report["variants"][1]
  assert huge["diverged"]["seeds"] == [42, 43] and 1 <= huge["diverged"]["step"] <= 30, huge
  assert huge["diverged"]["stopped_with_it"] == huge["diverged"]["trained_on"] == []
  assert "per_seed" not in huge and "best_val_perplexity" not in huge
  runs = sorted(os.listdir(w / "runs"))
  assert runs[0].startswith("_values-") and runs[1:] == ["nodrop"], runs  # v5.2: not again
  summary = json.loads((w / "runs" / runs[0] / "summary.json").read_text())
  assert summary["status"] == "completed" and summary["steps"] == 2 * summary["steps_per_epoch"]
  assert [r["diverged"] and r["diverged"]["step"] for r in summary["replicas"]] == [
      None, None, huge["diverged"]["step"], huge["diverged"]["step"]]
  v52 = report["variants"][0]
  assert [p["best_val_perplexity"] for p in v52["per_seed"]] == [
      r["best_val_perplexity"] for r in summary["replicas"][:2]]
  assert v52["trained_together_with"] == ["huge"]
  # the frozen replicas changed nothing for v5.2: its results are its own population's
  from infinito_jax.train import train_and_evaluate  # pylint: disable=import-outside-toplevel
  (alone,) = study_lib.plan_runs(c, [v for v in study_lib.variant_configs(c)
                                     if v.name == "v5.2"])
  own = train_and_evaluate(alone.config, str(tmp_path / "alone"))
  np.testing.assert_allclose([r["best_val_loss"] for r in summary["replicas"][:2]],
                             [r["best_val_loss"] for r in own["replicas"]], rtol=0, atol=1e-5)
  assert [r["best_step"] for r in summary["replicas"][:2]] == [
      r["best_step"] for r in own["replicas"]]
  assert all("vs_baseline" not in v for v in report["variants"])  # the baseline diverged
  assert report["same_key"] == {"skipped": "it trains the baseline 'huge', which diverged"}
  assert not (w / "runs" / "_same_key").exists()
  md = (w / "study.md").read_text()
  assert "| huge | diverged at step" in md
  assert "seeds 42, 43: non-finite training loss, gradient or weights)" in md
  assert md.count("n/a (the baseline diverged)") == 2
  assert "no comparison: the baseline `huge` diverged" in md and "Welch" not in md
  assert "Reproducibility: not checked (it trains the baseline 'huge', which diverged)" in md
  assert (w / "curves.png").stat().st_size > 0
  # the run finished: its summary holds the divergence, and no run ended on one
  assert not (w / "diverged.json").exists() and report["diverged_training_wall_time_s"] == 0
  history = (w / "runs" / runs[0] / "history.jsonl").read_bytes()
  capsys.readouterr()
  again = study_lib.run_study(c, str(w))
  out = capsys.readouterr().out
  assert out.count("Nothing to do") == 2 and "Diverged: huge (seeds 42, 43) at step" in out
  assert (w / "runs" / runs[0] / "history.jsonl").read_bytes() == history
  assert again["variants"][1]["diverged"] == huge["diverged"]
  assert again["variants"][0]["per_seed"] == v52["per_seed"]
  assert again["training_wall_time_s"] == report["training_wall_time_s"]
  # with study.on_divergence='stop' the kept run's frozen seeds end the study, untrained
  c.on_divergence = "stop"
  with pytest.raises(study_lib.NonFiniteLossError,
                     match=r"variant\(s\) \['huge'\] diverged at step \d+ \(run .*; in an "
                           r"earlier command of the study, which recorded it and trained on\); "
                           r"the study stops, as study.on_divergence='stop' asks"):
    study_lib.run_study(c, str(w))
  assert (w / "runs" / runs[0] / "history.jsonl").read_bytes() == history
  # a summary.json that predates the freeze (a command killed after a save that held it,
  # before the next validation): the checkpoint's record says it, and nothing trains either
  path = w / "runs" / runs[0] / "summary.json"
  stale = json.loads(path.read_text())
  for rep in stale["replicas"]:
    rep["diverged"] = None
  path.write_text(json.dumps(stale))
  with pytest.raises(study_lib.NonFiniteLossError, match=r"\['huge'\] diverged at step"):
    study_lib.run_study(c, str(w))
  assert (w / "runs" / runs[0] / "history.jsonl").read_bytes() == history
  # evaluate.py and export on the study's folder: give one of its runs
  from infinito_jax import evaluate  # pylint: disable=import-outside-toplevel
  from infinito_jax.errors import CheckpointError  # pylint: disable=import-outside-toplevel
  with pytest.raises(CheckpointError, match=r"is a study's folder, not a run's: give one of "
                                      r"its runs, .*runs/_values-"):
    evaluate.restore_run(str(w))
  # and on its runs/ folder: a folder of runs, named
  with pytest.raises(CheckpointError, match=r"runs is not a run but holds 2 run folders: give "
                                      r"one of them, .*runs/_values-.*, .*runs/nodrop\."):
    evaluate.restore_run(str(w / "runs"))


def test_a_study_whose_every_variant_diverged_ends_on_an_error(tmp_path):
  """Nothing is left to compare: one error that names the variants and the fix."""
  from infinito_jax.errors import NonFiniteLossError  # pylint: disable=import-outside-toplevel
  c = study_tiny.get_config()
  c.base.train.epochs = 1
  c.variants = (("huge", HUGE), ("huger", dict(HUGE, **{"train.learning_rate": 1e5})))
  c.baseline = "huge"
  with pytest.raises(NonFiniteLossError, match=r"every variant of the study diverged \(huge "
                                               r"\(seeds 42, 43\) at step \d+; huger .*nothing "
                                               r"to compare. Lower the learning rates the "
                                               r"variants set in the study's config \(huge: "
                                               r"10000, huger: 100000\), the clip "
                                               r"norm \(train.clip_norm\) or the weight decay "
                                               r"\(train.weight_decay\), or add or lengthen "
                                               r"a warmup"):
    study_lib.run_study(c, str(tmp_path))
  assert not (tmp_path / "study.json").exists()
  # the population ended once both variants had a diverged seed, not at its last step
  (run,) = os.listdir(tmp_path / "runs")
  summary = json.loads((tmp_path / "runs" / run / "summary.json").read_text())
  assert summary["status"] == "diverged", summary
  kept = json.loads((tmp_path / "diverged.json").read_text())[run]
  assert kept["replicas"] == [0, 1, 2, 3] and len(kept["replica_steps"]) == 4
  assert all(1 <= s <= kept["step"] < 30 for s in kept["replica_steps"]), kept
  history = (tmp_path / "runs" / run / "history.jsonl").read_bytes()
  with pytest.raises(NonFiniteLossError, match=r"every variant of the study diverged"):
    study_lib.run_study(c, str(tmp_path))  # the same command: the kept divergence, untrained
  assert (tmp_path / "runs" / run / "history.jsonl").read_bytes() == history
  c.on_divergence = "stop"  # names both from the kept record, untrained
  with pytest.raises(NonFiniteLossError, match=r"\['huge', 'huger'\] diverged .*which "
                                               r"recorded it and ended there\)"):
    study_lib.run_study(c, str(tmp_path))
  assert (tmp_path / "runs" / run / "history.jsonl").read_bytes() == history


def test_a_divergence_names_the_seeds_it_stopped_or_froze_and_retrains_only_a_stopped_run(
    tmp_path):
  """A run that a divergence ended before its end (a variant's weights overflowed before its
  loss said so: the run cannot go on) left a variant's other seeds untrained past it, which the
  record (and study.md) says instead of letting them pass for fine, with every replica frozen
  before it; the variants it trained with are planned again without it, checked before
  training. A run that trained on past a frozen seed leaves its other seeds trained (said so)
  and plans nothing."""
  c = study_tiny.get_config()
  c.variants = (("v5.2", {}), ("lr", {"train.learning_rate": 260.0}))
  variants = study_lib.variant_configs(c)
  (run,) = study_lib.plan_runs(c, variants)  # one population: v5.2 seeds 42, 43; lr 42, 43
  e = study_lib.NonFiniteLossError("loss nan")
  e.replicas, e.step = [3], 14
  diverged = {}
  # pylint: disable-next=protected-access
  again = study_lib._record_divergence(c, run, e, diverged, str(tmp_path))
  assert [(r.name, [v.name for v in r.variants]) for r in again] == [("v5.2", ["v5.2"])]
  assert again[0].config.train.replicas == 2 and not again[0].config.train.replica_hparams
  d = diverged["lr"]
  assert (d["step"], d["seeds"], d["stopped_with_it"]) == (14, [43], [42])
  report = {"seeds": 2, "platform": "cpu", "devices": 1, "baseline": "lr",
            "target_perplexity": 60.0, "variants": [{"name": "lr", "diverged": {
                k: d[k] for k in ("step", "seeds", "stopped_with_it")}}]}
  md = study_lib.markdown(report)
  assert ("| lr | diverged at step 14 (seed 43: non-finite training loss, gradient or weights; "
          "seed 42 not trained to the end) |") in md, md
  # a replica frozen at step 9 before the one the run stopped on: both are the variant's
  e.replica_steps = [None, None, 9, 14]
  diverged = {}
  # pylint: disable-next=protected-access
  study_lib._record_divergence(c, run, e, diverged, str(tmp_path))
  assert {k: diverged["lr"][k] for k in ("step", "seeds", "stopped_with_it")} == {
      "step": 9, "seeds": [42, 43], "stopped_with_it": []}
  # a finished run whose replica 3 was frozen at step 9: lr's seed 42 trained on
  summary = {"replicas": [{"diverged": None}] * 3 + [{"diverged": {"step": 9}}]}
  diverged = {}
  study_lib._record_frozen(c, run, summary, diverged, str(tmp_path))  # pylint: disable=protected-access
  d = diverged["lr"]
  assert (d["step"], d["seeds"], d["trained_on"], d["seconds"]) == (9, [43], [42], 0.0)
  assert list(diverged) == ["lr"]
  report["variants"][0]["diverged"] = {k: d[k] for k in ("step", "seeds", "trained_on")}
  assert ("| lr | diverged at step 9 (seed 43: non-finite training loss, gradient or weights; "
          "seed 42 trained on, in no statistic) |") in study_lib.markdown(report)
  # its seed trained on: its numbers are kept beside (in no statistic)
  summary["replicas"] = [{"diverged": None, "best_val_perplexity": 50.0 + r,
                          "final_val_perplexity": 51.0 + r, "best_step": 30} for r in range(3)
                         ] + [{"diverged": {"step": 9}}]
  diverged = {}
  study_lib._record_frozen(c, run, summary, diverged, str(tmp_path))  # pylint: disable=protected-access
  assert diverged["lr"]["trained_on_results"] == [
      {"seed": 42, "best_val_perplexity": 52.0, "final_val_perplexity": 53.0, "best_step": 30}]
  # seeds that diverged at different steps: each one's step
  summary["replicas"][2] = {"diverged": {"step": 12}}
  diverged = {}
  study_lib._record_frozen(c, run, summary, diverged, str(tmp_path))  # pylint: disable=protected-access
  d = diverged["lr"]
  assert (d["step"], d["seeds"], d["steps"], d["trained_on"]) == (9, [42, 43], [12, 9], [])
  report["variants"][0]["diverged"] = {k: d[k] for k in ("step", "seeds", "steps", "trained_on")}
  assert ("| lr | diverged at step 9 (seed 42 at step 12, seed 43 at step 9: non-finite "
          "training loss, gradient or weights) |") in study_lib.markdown(report)
  # study.on_divergence='stop': each variant's own first step
  e = study_lib._stop_error(["v5.2", "v5.2", "lr", "lr"], {3: 9, 1: 50}, "W",  # pylint: disable=protected-access
                            earlier="trained on")
  assert ("variant(s) ['lr', 'v5.2'] diverged (lr at step 9, v5.2 at step 50) (run W; in an "
          "earlier command of the study, which recorded it and trained on)") in str(e), str(e)
  assert (e.replicas, e.step) == ([1, 3], 9)


def test_a_kept_divergence_holds_only_for_the_same_run_and_a_record_this_code_wrote(tmp_path,
                                                                                    capsys):
  """DIR/diverged.json spares the same command training a diverged run again: it holds for
  the run's config (but for how it logs and saves), platform and JAX, while its folder is
  there; anything else in the file (a corrupt or hand-edited record) lets the run train, and a
  record that cannot be written is a warning, not the study's end."""
  # pylint: disable=protected-access
  c = study_tiny.get_config()
  c.variants = (("v5.2", {}), ("lr", {"train.learning_rate": 1e4}))
  (run,) = study_lib.plan_runs(c, study_lib.variant_configs(c))
  e = study_lib.NonFiniteLossError("loss nan")
  e.replicas, e.step, e.seconds = [2, 3], 5, 1.5
  e.replica_steps = [None, None, 4, 5]  # replica 2 frozen at step 4, the run ended at 5
  study_lib._keep_divergence(str(tmp_path), run, e)
  assert study_lib._kept_divergence(str(tmp_path), run) is None  # its folder is gone
  (tmp_path / "runs" / run.name).mkdir(parents=True)
  kept = study_lib._kept_divergence(str(tmp_path), run)
  assert (kept.replicas, kept.step, kept.seconds, kept.replica_steps) == (
      [2, 3], 5, 1.5, [None, None, 4, 5])
  other = study_lib.plan_runs(c, study_lib.variant_configs(c))[0]
  other.config.train.epochs = 3  # another config under the same name: trains
  assert study_lib._kept_divergence(str(tmp_path), other) is None
  # how a run logs and saves does not change what it trains: the divergence holds
  other = study_lib.plan_runs(c, study_lib.variant_configs(c))[0]
  other.config.train.log_every, other.config.checkpoint.keep_best = 7, False
  other.config.log.plot = not other.config.log.plot
  assert study_lib._kept_divergence(str(tmp_path), other).step == 5
  other.config.train.stop_after_steps = 5  # paused at the step or after: the run reaches it
  assert study_lib._kept_divergence(str(tmp_path), other).step == 5
  other.config.train.stop_after_steps = 4  # paused before: it trains up to the pause
  assert study_lib._kept_divergence(str(tmp_path), other) is None
  other.config.train.stop_after_steps = 0
  other.config.checkpoint.every_steps = 3  # saves check the weights: the step found can move
  assert study_lib._kept_divergence(str(tmp_path), other) is None
  other.config.checkpoint.every_steps = run.config.checkpoint.every_steps
  other.config.train.eval_every_steps = 2  # validations move the best, so early stopping
  assert study_lib._kept_divergence(str(tmp_path), other) is None
  record = json.loads((tmp_path / "diverged.json").read_text())
  entry = record[run.name]
  for bad in ({"replicas": [4]}, {"replicas": []}, {"replicas": "2"}, {"step": "5"},
              {"step": 0}, {"replicas": [True]}, {"seconds": "x"},
              {"replica_steps": [4, 5]}, {"replica_steps": [None, None, None, 5]},
              {"replica_steps": [0, None, 4, 5]}, {"replica_steps": "4"}):
    (tmp_path / "diverged.json").write_text(json.dumps({run.name: dict(entry, **bad)}))
    assert study_lib._kept_divergence(str(tmp_path), run) is None, bad
  for junk in ("not json", "[1, 2]", json.dumps({run.name: [1]})):
    (tmp_path / "diverged.json").write_text(junk)
    assert study_lib._kept_divergence(str(tmp_path), run) is None, junk
  for junk in ("{", "[]"):  # unreadable, or not an object: said, and written anew
    (tmp_path / "diverged.json").write_text(junk)
    study_lib._keep_divergence(str(tmp_path), run, e)
    assert "diverged.json could not be read" in capsys.readouterr().err, junk
  assert study_lib._kept_divergence(str(tmp_path), run).step == 5
  (tmp_path / "diverged.json").unlink()
  (tmp_path / "diverged.json").mkdir()  # cannot be written: a warning, the study goes on
  study_lib._keep_divergence(str(tmp_path), run, e)
  assert study_lib._kept_divergence(str(tmp_path), run) is None


def test_what_a_divergence_would_retrain_is_checked_before_any_run_trains(tmp_path):
  """The runs a divergence plans (a population's variants without the diverged) are checked
  with the others before training where an earlier command left their folders; a
  diverged.json that is not a file is refused then too (a FIFO blocked the study's read)."""
  # pylint: disable=protected-access
  c = study_tiny.get_config()
  c.variants = (("v5.2", {}), ("lr", {"train.learning_rate": 1e-2}),
                ("wd", {"train.weight_decay": 0.1}))
  runs = study_lib.plan_runs(c, study_lib.variant_configs(c))
  assert study_lib._kept_replans(c, runs, str(tmp_path)) == []  # none left by earlier commands
  pair = study_lib.plan_runs(c, study_lib.variant_configs(c)[:2])[0]  # v5.2 + lr
  for name in ("lr", pair.name):
    (tmp_path / "runs" / name).mkdir(parents=True)
  found = study_lib._kept_replans(c, runs, str(tmp_path))
  assert sorted((r.name, tuple(v.name for v in r.variants)) for r in found) == sorted(
      [("lr", ("lr",)), (pair.name, ("v5.2", "lr"))])
  (tmp_path / "w").mkdir()
  os.mkfifo(tmp_path / "w" / "diverged.json")
  with pytest.raises(study_lib.WorkdirError, match=r"diverged.json is not a file"):
    study_lib.run_study(c, str(tmp_path / "w"))
  assert not (tmp_path / "w" / "runs").exists()
  summary = tmp_path / "s"
  summary.mkdir()
  assert study_lib._trained_before(str(summary)) == 0.0
  (summary / "summary.json").write_text(json.dumps({"wall_time_s": 3.5}))
  assert study_lib._trained_before(str(summary)) == 3.5
  (summary / "summary.json").write_text("[1]")
  assert study_lib._trained_before(str(summary)) == 0.0


def test_plots_of_a_run_gone_astray_draw_every_variant_without_overflow(tmp_path):
  """Perplexities near 1e304 overflowed numpy's std and matplotlib's log margins: both panels
  came out empty, with RuntimeWarnings on the console."""
  import warnings  # pylint: disable=import-outside-toplevel
  def variant(name, ppl):
    per_seed = [{"best_val_perplexity": p[-1], "curve": {"steps": [15, 30], "perplexity": p}}
                for p in ppl]
    return {"name": name, "steps_per_epoch": 30, "per_seed": per_seed,
            "best_val_perplexity": stats.describe([p[-1] for p in ppl], bounds=(1.0, None))}
  report = {"seeds": 2, "variants": [variant("ok", [[60.0, 48.0], [61.0, 48.5]]),
                                     variant("astray", [[1e138, 1.2e138], [1e304, 1.01e304]])]}
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # an overflow anywhere fails the test
    paths = study_lib.plots(report, str(tmp_path))
  assert all(os.path.getsize(p) > 10_000 for p in paths)


def test_numbers_of_a_run_gone_astray_are_readable_and_the_json_strict():
  """A variant whose loss stayed finite but huge (perplexity ~1e303): the table printed 300
  digits and study.json held Infinity / NaN, which strict JSON parsers refuse."""
  # pylint: disable=protected-access
  d = {"mean": 4.985e303, "std": 1.2e302, "ci_low": 3.9e303, "ci_high": math.inf}
  assert study_lib._fmt(d) == "4.985e+303 ± 1.2e+302 [3.9e+303, inf]"
  assert study_lib._fmt({"mean": 48.25, "std": 0.5, "ci_low": 43.8, "ci_high": 52.7}) == (
      "48.2 ± 0.5 [43.8, 52.7]")
  report = {"a": [1.5, math.nan], "b": {"c": -math.inf, "d": "x"}, "e": (2, math.inf)}
  strict = study_lib._strict_json(report)
  assert strict == {"a": [1.5, None], "b": {"c": None, "d": "x"}, "e": [2, None]}
  json.loads(json.dumps(strict, allow_nan=False))  # valid JSON for the strictest parser


def test_a_second_study_on_a_workdir_in_use_is_refused(tmp_path):
  """One study per workdir: its runs' locks left the analysis unguarded, where a second study
  could delete the first's temporary outputs."""
  from infinito_jax import lifecycle  # pylint: disable=import-outside-toplevel
  from infinito_jax.errors import WorkdirBusyError  # pylint: disable=import-outside-toplevel
  with lifecycle.WorkdirLock(str(tmp_path)):
    with pytest.raises(WorkdirBusyError, match=r"in use by process .*one study at a time"):
      study_lib.run_study(study_tiny.get_config(), str(tmp_path))
  assert not (tmp_path / "runs").exists()


def test_a_study_and_a_training_run_never_share_a_workdir(tmp_path):
  """train.py in a finished study's folder replaced the study's curves.png with its own plot;
  a study in a run's folder would have done the reverse. Each refuses the other's folder
  before anything is changed."""
  from infinito_jax.errors import WorkdirError  # pylint: disable=import-outside-toplevel
  from infinito_jax.train import train_and_evaluate  # pylint: disable=import-outside-toplevel
  from configs import tiny  # pylint: disable=import-outside-toplevel
  study_dir = tmp_path / "study"
  (study_dir / "runs").mkdir(parents=True)
  (study_dir / "curves.png").write_bytes(b"the study's plot")
  with pytest.raises(WorkdirError, match=r"is a study's folder"):
    train_and_evaluate(tiny.get_config(), str(study_dir))
  assert sorted(os.listdir(study_dir)) == ["curves.png", "runs"]  # as it was
  # a project's runs/ folder alone (the README's runs/demo) is no study: a run may train there
  project = tmp_path / "project"
  (project / "runs").mkdir(parents=True)
  assert not lifecycle.is_study_folder(str(project))
  c = tiny.get_config()  # and a run trains there (its own lock made it read as a study's)
  c.train.epochs, c.train.stop_after_steps, c.log.plot = 1, 2, False
  assert train_and_evaluate(c, str(project))["steps"] == 2
  assert (study_dir / "curves.png").read_bytes() == b"the study's plot"
  run_dir = tmp_path / "run"
  run_dir.mkdir()
  (run_dir / "config.json").write_text("{}")
  with pytest.raises(WorkdirError, match=r"holds a training run"):
    study_lib.run_study(study_tiny.get_config(), str(run_dir))
  assert sorted(os.listdir(run_dir)) == ["config.json"]


def test_table_shows_a_spread_smaller_than_its_decimals():
  """study.md printed a std of 0.00034 as 0.0 beside a 'large' Cohen's d: the decimals now
  follow the spread where it is below the table's one decimal."""
  row = {"mean": 48.0123, "std": 0.00034, "ci_low": 47.9, "ci_high": 48.1}
  assert study_lib._fmt(row) == "48.01230 ± 0.00034 [47.90000, 48.10000]"
  assert study_lib._fmt(dict(row, std=0.25)) == "48.0 ± 0.2 [47.9, 48.1]"
  assert study_lib._fmt(dict(row, std=0.0)) == "48.0 ± 0.0 [47.9, 48.1]"


def test_replicas_set_on_the_base_are_refused_not_ignored(tmp_path):
  c = study_tiny.get_config()
  c.base.train.replicas = 3
  with pytest.raises(ConfigError, match=r"the study sets them"):
    study_lib.run_study(c, str(tmp_path))
  c = study_tiny.get_config()
  c.base.train.replica_hparams = "learning_rate=1e-2;learning_rate=1e-4"
  with pytest.raises(ConfigError, match=r"study.base sets train.replica_hparams=.*as a variant"):
    study_lib.run_study(c, str(tmp_path))
  assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_paused_runs_are_not_analysed_and_a_longer_trained_run_is_refused(tmp_path, capsys):
  """Runs paused by train.stop_after_steps before any validation crashed the analysis with a
  traceback, and paused after one were analysed as if finished: the study now trains up to the
  pause, says so, analyses nothing, and the same command without the pause finishes them into
  the study an uninterrupted command gives. A run trained for more epochs than the study now
  gives it (kept from an earlier command) is refused before any training, by name."""
  c = study_tiny.get_config()
  c.variants = c.variants[:1] + (("no-dropout", {"model.dropout": 0.0}),)
  c.same_key_replicas = 0
  c.base.train.stop_after_steps = 10
  work = tmp_path / "s"
  assert study_lib.run_study(c, str(work))["status"] == "stopped"
  assert "paused at train.stop_after_steps" in capsys.readouterr().out
  assert not (work / "study.json").exists()
  c.base.train.stop_after_steps = 0
  report = study_lib.run_study(c, str(work))
  c2 = study_lib.variant_configs(c)[0].config
  per_epoch = report["variants"][0]["steps_per_epoch"]
  assert [v["steps"] for v in report["variants"]] == [c2.train.epochs * per_epoch] * 2
  assert [v["status"] for v in report["variants"]] == ["completed"] * 2
  # a library call's Ctrl-C during the analysis: taken at the study's next check (Python's own
  # KeyboardInterrupt could be swallowed by a callback of XLA's and the analysis went on); the
  # outputs stay the previous whole set
  before = {n: (work / n).read_bytes() for n in ("study.json", "study.md", "curves.png")}
  real = study_lib.analyse

  def interrupted_analyse(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGINT)
    return real(*args, **kwargs)

  study_lib.analyse = interrupted_analyse
  try:
    assert study_lib.run_study(c, str(work)) == {"status": "interrupted"}
  finally:
    study_lib.analyse = real
  assert {n: (work / n).read_bytes() for n in before} == before
  assert not [n for n in os.listdir(work) if ".tmp-" in n]
  c.base.train.epochs = c2.train.epochs - 1
  before = sorted(os.listdir(work / "runs"))
  with pytest.raises(ConfigError, match=rf"run \S+ .* was trained for {2 * per_epoch} steps "
                                        rf"\(2 epochs\), more than the 1 epoch\(s\).*"
                                        r"config.base.train.epochs = 2"):
    study_lib.run_study(c, str(work))
  assert sorted(os.listdir(work / "runs")) == before


def test_generation_measures_on_known_samples():
  assert study_lib.distinct([[1, 2, 1, 2]], 1) == 0.5
  assert study_lib.distinct([[1, 2, 1, 2]], 2) == pytest.approx(2 / 3)
  # prompt [5]: 5 repeats the prompt, 6 is new, 6 repeats: 2 of 3
  assert study_lib.repetition_rate([[5, 6, 6]], [[5]]) == pytest.approx(2 / 3)


@pytest.mark.slow
def test_value_only_variants_train_together_and_equal_their_separate_runs(tmp_path):
  """A variant changing only optimisation values shares one population with the baseline
  (runs/_values, train.replica_hparams); a variant changing the model runs alone, and
  together=False runs each alone. Each variant's per-seed results, curves and samples are its
  own slice of the population (that each replica equals its single run is
  test_population's)."""
  def study(together, structural=False):
    c = study_tiny.get_config()
    c.base.train.epochs = 1
    c.same_key_replicas = 0
    c.variants = (("v5.2", {}), ("lr", {"train.learning_rate": 3e-3, "train.warmup_steps": 5}),
                  *([("v5.1-equivalent", {"model.exploration": False})] if structural else []))
    c.together = together
    return c
  plan = study_lib.plan_runs(study(True, True), study_lib.variant_configs(study(True, True)))
  assert [(r.name, [v.name for v in r.variants]) for r in plan] == [
      (plan[0].name, ["v5.2", "lr"]), ("v5.1-equivalent", ["v5.1-equivalent"])]
  assert plan[0].name.startswith("_values-")
  assert plan[0].config.train.replicas == 4
  assert plan[0].config.train.replica_hparams == ";learning_rate=0.003,warmup_steps=5"
  assert [r.name for r in study_lib.plan_runs(study(False, True), study_lib.variant_configs(
      study(False, True)))] == ["v5.2", "lr", "v5.1-equivalent"]
  accum = study(True, True)
  accum.base.train.grad_accum_steps = 2  # replica_hparams needs 1: every variant alone
  assert len(study_lib.plan_runs(accum, study_lib.variant_configs(accum))) == 3
  together = study_lib.run_study(study(True), str(tmp_path / "together"))
  assert sorted(os.listdir(tmp_path / "together" / "runs")) == [plan[0].name]
  run = json.loads((tmp_path / "together" / "runs" / plan[0].name / "summary.json").read_text())
  for i, v in enumerate(together["variants"]):  # each variant's slice of the population
    mine = run["replicas"][2 * i:2 * i + 2]
    assert [p["seed"] for p in v["per_seed"]] == [r["seed"] for r in mine] == [42, 43]
    # the replica evaluate.py --replica names in the shared run (replica was the variant's own)
    assert [p["run_replica"] for p in v["per_seed"]] == [r["replica"] for r in mine] == [
        2 * i, 2 * i + 1]
    assert [p["best_val_perplexity"] for p in v["per_seed"]] == [
        r["best_val_perplexity"] for r in mine]
    assert v["per_seed"][1]["curve"]["perplexity"][-1] == pytest.approx(
        mine[1]["final_val_perplexity"])
    assert v["generation"]["judge_perplexity"]["mean"] > 1
  assert together["variants"][0]["trained_together_with"] == ["lr"]
  lr, base = (together["variants"][i]["best_val_perplexity"]["mean"] for i in (1, 0))
  assert abs(lr - base) > 1.0  # the learning rate really differs between the two groups


def test_study_together_must_be_a_bool(tmp_path):
  c = study_tiny.get_config()
  del c["together"]  # a typed bool in the shipped config: a hand-made config may hold anything
  c.together = "yes"
  with pytest.raises(ConfigError, match="study.together='yes'"):
    study_lib.run_study(c, str(tmp_path))
  assert not (tmp_path / "runs").exists()


def test_samples_of_another_vocabulary_are_judged_by_their_words():
  """A variant with another vocabulary (its size, its corpus) samples ids of its own: the
  judge read them as its own words (text never sampled) or past its table (NaN). Its words are
  re-encoded in the judge's vocabulary, <unk> where the judge has none, and that share said."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from infinito_jax.tokenizer import SPECIALS, UNK, WordTokenizer  # pylint: disable=g-import-not-at-top,line-too-long
  mine = WordTokenizer(list(SPECIALS) + ["a", "b", "c", "d"])
  judge = WordTokenizer(list(SPECIALS) + ["c", "a"])
  study = ml_collections.ConfigDict({"prompts": ("a d",)})
  full = np.array([*mine.encode_prompt("a d"), mine.index["b"], mine.index["c"], UNK], np.int32)
  rows = [(0, 0, 7, full, 2)]
  assert study_lib._in_judges_words(rows, mine, mine, study) == (rows, None)  # one vocabulary
  (out,), unknown = study_lib._in_judges_words(rows, mine, judge, study)
  assert out[:3] == (0, 0, 7) and out[4] == 2
  assert out[3].tolist() == [judge.index["a"], UNK, UNK, judge.index["c"], UNK]
  assert judge.decode(out[3][2:]) == "<unk> c <unk>"
  assert unknown == pytest.approx(1 / 3)  # b: the judge lacks it (a sampled <unk> is no loss)


def test_a_changed_baseline_is_named_where_the_reproducibility_run_refuses_it(tmp_path):
  """runs/_same_key is trained from the baseline's config: after --config.baseline changed,
  its refusal named only a field the user never set (model.hidden_dim: 32 -> 48)."""
  from infinito_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  saved = study_tiny.get_config().base.to_dict()
  changed = study_tiny.get_config().base
  changed.model.hidden_dim = 48
  with pytest.raises(ConfigError) as e:
    config_lib.check_resume(saved, changed, str(tmp_path / "runs" / "_same_key"))
  told = str(study_lib._in_study_terms(e.value, str(tmp_path), "_same_key"))
  assert "model.hidden_dim: 32 -> 48" in told and "a changed --config.baseline changes it" in told
  assert "--config.baseline" not in str(
      study_lib._in_study_terms(ConfigError(str(e.value)), str(tmp_path), "v5.2"))


def test_the_judge_is_never_a_variant_measured_on_other_terms():
  """A smaller vocabulary's perplexity is lower for folding words into <unk>: such a variant
  (or one on other data) became the judge of every variant's samples. The judge is the best of
  the variants measured on the study's terms, the best of all where none is."""
  def variant(ppl, **overrides):
    return {"overrides": overrides, "best_val_perplexity": {"mean": ppl}}
  variants = [variant(50.0), variant(30.0, **{"model.vocab_size": 48}), variant(45.0),
              variant(20.0, **{"data.corpus.seed": 7})]
  assert study_lib.judge_variant(variants) == 2
  assert study_lib.judge_variant(variants[1::2]) == 1  # none on the study's terms: the best
  assert study_lib.other_terms({"model.vocab_size": 48, "data.seq_len": 8,
                                "model.dropout": 0.0}) == ["model.vocab_size", "data.seq_len"]


def test_a_variant_may_say_stop_after_steps_is_off():
  """train.stop_after_steps=0 (off, as the base has it) is no pause: not refused."""
  c = study_tiny.get_config()
  c.variants = (("v5.2", {}), ("nodrop", {"train.stop_after_steps": 0, "model.dropout": 0.0}))
  assert [v.name for v in study_lib.variant_configs(c)] == ["v5.2", "nodrop"]
