"""train.py and evaluate.py end to end, as a user runs them (subprocesses, tiny config)."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run(*args, timeout=300):
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout)


@pytest.mark.slow
def test_train_then_evaluate_end_to_end(tmp_path):
  workdir = tmp_path / "run"
  train = run("train.py", "--config", "configs/tiny.py", "--workdir", str(workdir),
              "--config.train.epochs=2", "--config.model.hidden_dim=48")
  assert train.returncode == 0, train.stderr[-3000:]
  assert f"Checkpoints: {workdir}/checkpoints" in train.stdout
  assert "oracle (best possible)" in train.stdout
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["epochs_completed"] == 2 and summary["parameters"] > 0

  ev = run("evaluate.py", "--ckpt", str(workdir), "--split", "validation", "--prompt",
           "the", "--num_tokens", "7", "--seed", "3")
  assert ev.returncode == 0, ev.stderr[-3000:]
  report = json.loads((workdir / f"eval_validation_step{summary['best_step']}.json").read_text())
  # the restored best checkpoint scores exactly what training measured
  assert abs(report["loss"] - summary["best_val_loss"]) < 1e-6
  assert len(report["generation"]["continuation"].split()) == 7
  run("evaluate.py", "--ckpt", str(workdir), "--prompt", "the", "--num_tokens", "7",
              "--seed", "3", "--out", str(tmp_path / "again.json"))
  assert json.loads((tmp_path / "again.json").read_text())["generation"] == report["generation"]

  test = run("evaluate.py", "--ckpt", str(workdir), "--split", "test")
  assert test.returncode == 0 and "test: loss" in test.stdout


def test_a_printed_command_names_the_script_as_it_runs_from_the_current_folder(monkeypatch,
                                                                             tmp_path):
  """train.py's closing "Evaluate: python evaluate.py --ckpt W" (and the importer's) ran only
  from the project's root: from another folder it names the script by its path."""
  from infinito_jax import cli  # pylint: disable=import-outside-toplevel
  monkeypatch.chdir(ROOT)
  assert cli.script("evaluate.py") == "evaluate.py"
  for elsewhere in (tmp_path, ROOT / "configs"):
    monkeypatch.chdir(elsewhere)
    assert cli.script("evaluate.py") == str(ROOT / "evaluate.py")
    assert pathlib.Path(cli.script("train.py")).is_file()


@pytest.mark.slow
def test_help_explains_the_commands():
  for script, words in [("train.py", ["--config", "--workdir", "resume"]),
                        ("evaluate.py", ["--ckpt", "--split", "--prompt", "--num_tokens"]),
                        ("-m infinito_jax.study", ["--config", "--workdir"])]:
    out = run(*script.split(), "--help")  # asked for: exit 0 (absl's own is 1)
    assert out.returncode == 0, (script, out.stderr[-2000:])
    for w in words:
      assert w in out.stdout, (script, w)


@pytest.mark.slow
def test_errors_name_the_fix(tmp_path):
  out = run("evaluate.py", "--ckpt", str(tmp_path / "none"))
  assert out.returncode == 1 and "none: no such folder" in out.stderr
  # the command line's errors name its flags (a Python caller's, the arguments: test_evaluate)
  assert "(train.py's --workdir)" in out.stderr, out.stderr
  (tmp_path / "link").symlink_to(tmp_path / "gone")  # a dangling link is named as such
  out = run("evaluate.py", "--ckpt", str(tmp_path / "link"))
  assert out.returncode == 1 and "is a symbolic link to" in out.stderr, out.stderr
  (tmp_path / "five.py").write_text("def get_config():\n  return 5\n")  # no config
  out = run("train.py", "--config", str(tmp_path / "five.py"), "--workdir", str(tmp_path / "f"))
  assert out.returncode == 1 and out.stderr.strip().splitlines() == [
      f"error: --config {tmp_path / 'five.py'}: its get_config() returned int, not an "
      "ml_collections.ConfigDict: return one, as configs/demo.py does."], out.stderr
  assert not (tmp_path / "f").exists()
  # the same with an override, which absl applies to what get_config() returned: one line
  out = run("train.py", "--config", str(tmp_path / "five.py"), "--workdir", str(tmp_path / "f"),
            "--config.train.epochs=2")
  assert out.returncode == 1 and out.stderr.strip().splitlines() == [
      f"error: --config {tmp_path / 'five.py'}: its get_config() returned int, not an "
      "ml_collections.ConfigDict: return one, as configs/demo.py does."], out.stderr
  # a list or a dict (which overrides index differently), with and without an override
  (tmp_path / "seq.py").write_text("def get_config():\n  return [1, 2]\n")
  (tmp_path / "plain.py").write_text("def get_config():\n  return {'base': 1}\n")
  (tmp_path / "none.py").write_text("def get_config():\n  pass\n")  # absl's warning too
  for name, kind in (("seq.py", "list"), ("plain.py", "dict"), ("none.py", "None")):
    for extra in ([], ["--config.train.epochs=2"]):
      out = run("train.py", "--config", str(tmp_path / name), "--workdir", str(tmp_path / "f"),
                *extra)
      assert out.returncode == 1 and out.stderr.strip().splitlines() == [
          f"error: --config {tmp_path / name}: its get_config() returned {kind}, not an "
          "ml_collections.ConfigDict: return one, as configs/demo.py does."], out.stderr
  out = run("-m", "infinito_jax.study", "--config", str(tmp_path / "plain.py"), "--workdir",
            str(tmp_path / "f"), "--config.base.train.epochs=2")
  assert out.returncode == 1 and "its get_config() returned dict, not an" in out.stderr, out.stderr
  # the study's command names what the file is before the fields a study lacks (it named a
  # run's field as no study's: the file was the mistake)
  # (or, with a study's own field set, a KeyError; with a file that does not load, the field)
  (tmp_path / "broken.py").write_text("def get_config(:\n")
  for file, flag, said in (
      (tmp_path / "five.py", "train.epochs=2", ": its get_config() returned int, not an "
       "ml_collections.ConfigDict: return one, as configs/study_tiny.py does."),
      ("configs/tiny.py", "train.epochs=2", ": this is a run's config (model, train, ...), not "
       "a study's: train it with train.py, or make it a study's base"),
      ("configs/tiny.py", "base.train.epochs=1", ": this is a run's config"),
      (tmp_path / "broken.py", "train.epochs=2", " could not be loaded (line 1): SyntaxError")):
    out = run("-m", "infinito_jax.study", "--config", str(file), "--workdir",
              str(tmp_path / "f"), f"--config.{flag}")
    assert out.returncode == 1 and out.stderr.startswith(f"error: --config {file}{said}"), \
        out.stderr
  (tmp_path / "noget.py").write_text("X = 1\n")  # named its module config_config
  out = run("train.py", "--config", str(tmp_path / "noget.py"), "--workdir", str(tmp_path / "f"))
  assert out.returncode == 1 and out.stderr.startswith(
      f"error: --config {tmp_path / 'noget.py'} defines no get_config(). A config is"), out.stderr
  assert not (tmp_path / "f").exists()
  (tmp_path / "empty").mkdir()  # a folder, but not a run's
  out = run("evaluate.py", "--ckpt", str(tmp_path / "empty"))
  assert out.returncode == 1 and "no checkpoints in" in out.stderr
  out = run("train.py", "--config", "configs/tiny.py", "--workdir", str(tmp_path / "w"),
            "--config.model.hidden_dim=30")
  assert out.returncode == 1 and "must be divisible by num_heads" in out.stderr
  out = run("train.py", "--config", "configs/tiny.py", "--workdir", str(tmp_path / "w"),
            "--config.data.source=files", "--config.data.files.train=missing.txt",
            "--config.data.files.validation=missing.txt")
  assert out.returncode == 1 and "no such file '" + str(ROOT / 'missing.txt') + "'" in out.stderr
  out = run("train.py", "--config", "configs/tiny.py", "--workdir", str(tmp_path / "w"),
            "--config.train.batch_size=0")
  assert out.returncode == 1 and "config.train.batch_size=0: must be an integer >= 1" in out.stderr
  # sampling settings without a prompt were accepted silently, bad values included
  out = run("evaluate.py", "--ckpt", str(tmp_path / "empty"), "--temperature", "-5", "--seed",
            "3")
  assert out.returncode == 1 and "--temperature, --seed set how words are sampled after " \
      "--prompt" in out.stderr
  # an empty --workdir (an unset shell variable) trained into the default run's folder
  out = run("train.py", "--config", "configs/tiny.py", "--workdir", "")
  assert out.returncode == 1 and "--workdir is empty" in out.stderr
  # a study's config given to train.py: say so, not 30 unknown fields
  out = run("train.py", "--config", "configs/study_tiny.py", "--workdir", str(tmp_path / "s"))
  assert out.returncode == 1 and "this is a study's config" in out.stderr
  assert not (tmp_path / "s").exists()
  # a config file whose get_config() raises: its reason, not only "Error whilst parsing"
  (tmp_path / "raises.py").write_text("def get_config():\n  raise ValueError('MY REASON')\n")
  out = run("train.py", "--config", str(tmp_path / "raises.py"))
  assert out.returncode == 1 and "(ValueError: MY REASON)" in out.stderr


@pytest.mark.slow
def test_ctrl_c_saves_and_exits_cleanly_then_resumes(tmp_path):
  workdir = tmp_path / "run"
  proc = subprocess.Popen(
      [sys.executable, "train.py", "--config", "configs/tiny.py", "--workdir", str(workdir),
       "--config.train.epochs=200", "--config.train.log_every=1"],
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env=dict(os.environ, PYTHONUNBUFFERED="1"))
  history = workdir / "history.jsonl"
  deadline = time.time() + 120
  while time.time() < deadline and not (history.exists() and history.read_text().count("\n") >= 3):
    time.sleep(0.2)
  proc.send_signal(signal.SIGINT)
  stdout, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 0, stderr[-3000:]
  assert "SIGINT received: finishing this step" in stderr and "Run interrupted" in stdout
  ckpts = [p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
  assert ckpts and not any(p.name.endswith("tmp") for p in (workdir / "checkpoints").iterdir())
  resumed = run("train.py", "--config", "configs/tiny.py", "--workdir", str(workdir),
                "--config.train.epochs=1")
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "Resuming from" in resumed.stdout


@pytest.mark.slow
def test_relative_data_paths_work_from_another_folder(tmp_path):
  """data.source=files with paths relative to where train.py ran: the run stores them
  absolute, so evaluate.py run from another folder (with a relative --ckpt) finds the data,
  and its --data_file report is named after the file, whose absolute path it holds."""
  here = tmp_path / "project"
  (here / "text").mkdir(parents=True)
  words = [f"w{i % 37}" for i in range(4000)]
  for name, part in (("train.txt", words[:3000]), ("valid.txt", words[3000:])):
    (here / "text" / name).write_text("\n".join(" ".join(part[i:i + 20])
                                                for i in range(0, len(part), 20)) + "\n")
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  train = subprocess.run(
      [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "tiny.py"),
       "--workdir", "run", "--config.train.epochs=1", "--config.data.source=files",
       "--config.data.files.train=text/train.txt",
       "--config.data.files.validation=text/valid.txt"],
      cwd=here, env=env, capture_output=True, text=True, timeout=300)
  assert train.returncode == 0, train.stderr[-3000:]
  saved = json.loads((here / "run" / "config.json").read_text())
  assert saved["data"]["files"]["train"] == str(here / "text" / "train.txt")
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  ev = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--ckpt", "../project/run",
                       "--data_file", "../project/text/valid.txt"],
                      cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
  assert ev.returncode == 0, ev.stderr[-3000:]
  step = json.loads((here / "run" / "summary.json").read_text())["best_step"]
  named = list((here / "run").glob(f"eval_file-valid-*_step{step}.json"))
  # the report names the file absolute, as the run stores its data paths
  assert len(named) == 1 and json.loads(named[0].read_text())["split"] == str(
      here / "text" / "valid.txt")
  ev = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--ckpt", "../project/run"],
                      cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
  assert ev.returncode == 0, ev.stderr[-3000:]
  assert ev.stderr.strip() == ""  # no third-party warnings in a plain evaluation


@pytest.mark.slow
def test_output_piped_into_head_does_not_end_the_run(tmp_path):
  """`train.py ... | head -2`: once head has gone, every later line would raise BrokenPipeError
  (the run used to die at its first validation line, before that epoch's save). The run
  trains to the end, saves and exits 0; then `evaluate.py ... | head -1` still writes its
  report."""
  workdir = tmp_path / "run"
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  train = subprocess.Popen([sys.executable, "train.py", "--config", "configs/tiny.py",
                            "--workdir", str(workdir), "--config.train.epochs=2",
                            "--config.log.plot=false"], cwd=ROOT, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  train.stdout.readline()
  train.stdout.close()  # the reader goes, as head does after its lines
  train.stderr.close()
  assert train.wait(timeout=300) == 0
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["status"] == "completed" and summary["epochs_completed"] == 2
  ev = subprocess.Popen([sys.executable, "evaluate.py", "--ckpt", str(workdir)], cwd=ROOT,
                        env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
  ev.stdout.close()
  assert ev.wait(timeout=300) == 0
  assert (workdir / f"eval_validation_step{summary['best_step']}.json").exists()


def test_closed_output_guard_swallows_a_closed_stream_but_not_an_encoding_error(tmp_path):
  """Only a gone reader sends the output to os.devnull: a write that the stream cannot encode
  still raises (it is a bug to see), and writes after a closed stream are dropped quietly."""
  # pylint: disable=import-outside-toplevel,protected-access
  import io
  from infinito_jax import cli
  ascii_out = cli._ClosedSafe(io.TextIOWrapper(io.BytesIO(), encoding="ascii"))
  with pytest.raises(UnicodeEncodeError):
    ascii_out.write("caf\u00e9")
  raw = open(tmp_path / "out.txt", "w", encoding="utf-8")  # pylint: disable=consider-using-with
  guarded = cli._ClosedSafe(raw)
  guarded.write("kept\n")
  guarded.flush()
  raw.close()
  assert guarded.write("dropped\n") == len("dropped\n")
  guarded.flush()
  assert (tmp_path / "out.txt").read_text() == "kept\n"


def test_none_overrides_are_taken_out_of_argv_for_nullable_fields_only():
  """--config.NAME=None reaches a field that may be None (absl's parser cannot give None to a
  typed field); the last override of a field wins, as absl orders them; other fields keep
  theirs (absl then names the bad value)."""
  # pylint: disable=import-outside-toplevel,protected-access
  from infinito_jax import cli
  from infinito_jax.config import NULLABLE
  argv = ["train.py", "--config", "c.py", "--config.model.attention_dropout=0.0",
          "--config.model.attention_dropout=None", "--config.data.corpus.seed=3",
          "--config.train.learning_rate=None"]
  # the None goes (load_config sets it after absl has parsed the earlier value)
  assert cli.take_none_overrides(argv, NULLABLE) == [
      "train.py", "--config", "c.py", "--config.model.attention_dropout=0.0",
      "--config.data.corpus.seed=3", "--config.train.learning_rate=None"]
  assert cli._NONE_FIELDS == ["model.attention_dropout"]
  # a later value wins over None: the None goes, absl parses the value
  later = argv[:3] + ["--config.model.attention_dropout=None",
                      "--config.model.attention_dropout=.1"]
  assert cli.take_none_overrides(later, NULLABLE) == later[:3] + later[4:]
  assert not cli._NONE_FIELDS
  # absl's other spellings: one dash, the value as the next argument; None in any case
  spaced = ["train.py", "--config=c.py", "-config.model.attention_dropout=NULL",
            "--config.data.corpus.seed", "NONE", "--workdir", "w"]
  assert cli.take_none_overrides(spaced, NULLABLE) == ["train.py", "--config=c.py",
                                                       "--workdir", "w"]
  assert cli._NONE_FIELDS == ["data.corpus.seed", "model.attention_dropout"]
  # no config file given (convert export): no overrides to take; absl refuses them all alike
  bare = ["convert", "export", "w", "--config.model.attention_dropout=None"]
  assert cli.take_none_overrides(bare, NULLABLE) == bare and not cli._NONE_FIELDS


def test_a_none_or_empty_value_the_field_cannot_take_is_one_line_naming_the_fields_that_can():
  for value, says in [("None", "train.learning_rate cannot be None (the fields that may be: "
                                "model.attention_dropout, data.corpus.seed); give it a value"),
                      ("", "--config.train.learning_rate= is empty: give it a value. ")]:
    out = run("train.py", "--config", "configs/tiny.py", f"--config.train.learning_rate={value}",
              timeout=120)
    assert out.returncode == 1 and says in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_an_override_of_a_field_an_older_config_lacks_names_the_field_and_the_fix(tmp_path):
  """A study config written before study.on_divergence existed: the flag that sets it was
  'could not be loaded: AttributeError'; now it says which field to add."""
  old = tmp_path / "old_study.py"
  old.write_text(f"import sys\nsys.path.insert(0, {str(ROOT)!r})\nfrom configs import study_tiny\n"
                 "def get_config():\n  c = study_tiny.get_config()\n  del c['on_divergence']\n"
                 "  return c\n")
  out = run("-m", "infinito_jax.study", "--config", str(old), "--workdir", str(tmp_path / "w"),
            "--config.on_divergence=stop", timeout=120)
  assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
  assert (f"--config.on_divergence: the config {old} has no field 'on_divergence'" in out.stderr
          and "add it to its get_config(), e.g. `c.on_divergence = ...`" in out.stderr), out.stderr
  assert not (tmp_path / "w").exists()


def test_train_sets_a_nullable_field_to_none_from_the_command_line(tmp_path):
  """A config that sets model.attention_dropout (the recipe: 0.0) can be given back its None
  (= model.dropout) on the command line; the run's config.json records None. (The same run
  names train.threefry_kernel as a GPU setting where it changes nothing.)"""
  workdir = tmp_path / "run"
  out = run("train.py", "--config", "configs/tiny.py", "--workdir", str(workdir),
            "--config.model.attention_dropout=0.0", "--config.model.attention_dropout=None",
            "--config.train.stop_after_steps=1", "--config.data.corpus.seed=None",
            "--config.train.threefry_kernel=true")
  assert out.returncode == 0, out.stderr[-3000:]
  # a GPU setting given on a CPU is said, not silently taken
  assert "note: train.threefry_kernel changes nothing on cpu" in out.stdout, out.stdout
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["model"]["attention_dropout"] is None
  assert saved["data"]["corpus"]["seed"] is None
