"""The run lifecycle across real processes: signals, kill -9, two writers, damage, a full disk,
and the command-line scripts' one-line errors. Every test here runs train.py / evaluate.py as
a user does (subprocesses of the tiny config)."""

import json
import os
import pathlib
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from test_lifecycle import steps_on_disk
from test_train import final_state, leaves_equal, train_records, validation_losses

ROOT = pathlib.Path(__file__).resolve().parents[1]
# 8 epochs of 30 steps, no early stopping, a history line per step: long enough (seconds) to
# be signalled mid-run, short enough for CI. No end-of-run plot (1.2 s a run, ~20 runs here;
# test_plot.py and test_cli.py cover it).
RUN = ["--config", "configs/tiny.py", "--config.train.epochs=8", "--config.train.patience=100",
       "--config.train.log_every=1", "--config.log.plot=false"]
ENV = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu")
# for tests of what a signal does while XLA compiles: no compilation cache, a real compile
NO_CACHE = dict(ENV, JAX_COMPILATION_CACHE_DIR="")  # set and empty: no persistent cache


def train_cmd(workdir, *extra):
  return [sys.executable, "train.py", *RUN, "--workdir", str(workdir), *extra]


def run(cmd, timeout=300):
  return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


_STARTED: list[subprocess.Popen] = []


def popen(cmd, **kwargs) -> subprocess.Popen:
  """subprocess.Popen, and the process is killed at the end of its test if it still runs (a
  failed test must not leave a training process loading the cores under the tests after it)."""
  proc = subprocess.Popen(cmd, **kwargs)
  _STARTED.append(proc)
  return proc


@pytest.fixture(autouse=True)
def _no_process_outlives_its_test():
  yield
  while _STARTED:
    proc = _STARTED.pop()
    if proc.poll() is None:
      proc.kill()
    proc.communicate()  # reaped, and its pipes closed


def start(cmd, log: pathlib.Path, env=None):
  with open(log, "w") as out:  # the child has its own descriptor
    return popen(cmd, cwd=ROOT, env=env or ENV, stdout=out, stderr=subprocess.STDOUT, text=True)


def wait_for(predicate, timeout=120.0, what="condition"):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if predicate():
      return
    time.sleep(0.02)
  raise AssertionError(f"timed out waiting for {what}")


def train_lines(workdir) -> int:
  try:
    return (workdir / "history.jsonl").read_text().count('"kind": "train"')
  except FileNotFoundError:
    return 0


def one_error_line(stderr: str) -> str:
  """The CLI's contract for a user's mistake: exactly one line, 'error: ...', no traceback."""
  lines = [l for l in stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]
  return lines[0]


@pytest.fixture(scope="module")
def lone_run(tmp_path_factory):
  """The uninterrupted run every interrupted one must end equal to."""
  workdir = tmp_path_factory.mktemp("lone") / "run"
  out = run(train_cmd(workdir))
  assert out.returncode == 0, out.stderr[-3000:]
  return workdir


def assert_same_run(a, b):
  sa, ha = final_state(a)
  sb, hb = final_state(b)
  assert sa.step.tolist() == sb.step.tolist() == [240]
  assert leaves_equal(sa, sb)  # params, optimizer state, memory, step, key: bitwise
  assert validation_losses(ha) == validation_losses(hb)
  assert train_records(ha) == train_records(hb)
  sum_a = json.loads((a / "summary.json").read_text())
  sum_b = json.loads((b / "summary.json").read_text())
  assert (sum_a["best_step"], sum_a["best_val_loss"]) == (sum_b["best_step"], sum_b["best_val_loss"])
  assert str(sum_b["best_step"]) in os.listdir(b / "checkpoints")


@pytest.mark.slow
def test_sigterm_mid_run_saves_exits_zero_and_resumes_exactly(lone_run, tmp_path):
  workdir = tmp_path / "run"
  proc = start(train_cmd(workdir), tmp_path / "log")
  wait_for(lambda: train_lines(workdir) >= 40, what="40 steps")
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=60) == 0
  log = (tmp_path / "log").read_text()
  assert "SIGTERM received: finishing this step" in log and "Stopped by SIGTERM at step" in log
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["status"] == "interrupted" and 40 <= summary["steps"] < 240
  assert str(summary["steps"]) in os.listdir(workdir / "checkpoints")  # saved, not lost
  resumed = run(train_cmd(workdir))
  assert resumed.returncode == 0 and f"Resuming from {workdir}/checkpoints/{summary['steps']}" \
      in resumed.stdout, resumed.stderr[-3000:]
  assert_same_run(lone_run, workdir)


@pytest.mark.slow
def test_a_stopped_fresh_run_says_to_resume_without_fresh(tmp_path):
  """The same command with --fresh would move the stopped run aside and start over: the
  stop's advice names the command without it, and that command resumes."""
  workdir = tmp_path / "run"
  run(train_cmd(workdir, "--config.train.epochs=1"))
  proc = start(train_cmd(workdir, "--fresh"), tmp_path / "log")
  wait_for(lambda: "Moved the previous run" in (tmp_path / "log").read_text()
           and train_lines(workdir) >= 10, what="10 steps of the new run")
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=60) == 0
  log = (tmp_path / "log").read_text()
  assert "Run the command again without --fresh to resume." in log, log[-2000:]
  assert "Run the same command again" not in log
  steps = json.loads((workdir / "summary.json").read_text())["steps"]
  resumed = run(train_cmd(workdir, f"--config.train.stop_after_steps={steps + 1}"))
  assert f"Resuming from {workdir}/checkpoints/{steps}" in resumed.stdout, resumed.stderr[-3000:]


@pytest.mark.slow
def test_the_closing_lines_name_only_what_this_run_wrote_and_a_file_blocks_tensorboard(tmp_path):
  """Resumed with TensorBoard off, the closing lines named the earlier run's tensorboard/ as
  this run's; with a file of the user's in curves.png's place, the run overwrote it (now: a
  warning, the file kept) and named it as its plot. A file where TensorBoard writes is
  refused before training (it was a warning at every resume, and the run went on without
  it)."""
  workdir = tmp_path / "run"
  assert run(train_cmd(workdir, "--config.train.epochs=1")).returncode == 0
  (workdir / "curves.png").write_text("the user's")
  out = run(train_cmd(workdir, "--config.train.epochs=2", "--config.log.tensorboard=false",
                      "--config.log.plot=true"))
  assert out.returncode == 0, out.stderr[-2000:]
  assert "Plot:" not in out.stdout and "TensorBoard:" not in out.stdout, out.stdout[-1500:]
  assert "(the plot's default path) exists and is not a plot" in out.stdout, out.stdout[-1500:]
  assert (workdir / "curves.png").read_text() == "the user's"
  other = tmp_path / "other"
  other.mkdir()
  (other / "tensorboard").write_text("a file")
  line = one_error_line(run(train_cmd(other)).stderr)
  assert "tensorboard is not a folder, where the run writes its TensorBoard files" in line
  assert "--config.log.tensorboard=false" in line
  assert set(os.listdir(other)) == {"tensorboard"}  # as it was: nothing written, no lock left


def validated(workdir) -> bool:
  """Whether a running run has validated: summary.json (written 'running' when training
  begins, atomically) names a best step."""
  try:
    return json.loads((workdir / "summary.json").read_text())["best_step"] is not None
  except FileNotFoundError:
    return False


@pytest.mark.slow
def test_second_writer_is_refused_at_once_and_the_first_run_is_unharmed(lone_run, tmp_path):
  workdir = tmp_path / "run"
  first = start(train_cmd(workdir), tmp_path / "log")
  wait_for(lambda: train_lines(workdir) >= 5, what="the first run to train")
  t0 = time.time()
  second = run(train_cmd(workdir), timeout=60)
  assert second.returncode == 1 and time.time() - t0 < 30
  line = one_error_line(second.stderr)
  assert f"workdir {workdir} is in use by process {first.pid} on host" in line
  # evaluate.py may read the workdir meanwhile, while the run saves and prunes steps
  wait_for(lambda: validated(workdir), what="a first validation")
  for i in range(3):
    ev = run([sys.executable, "evaluate.py", "--ckpt", str(workdir), "--out",
              str(tmp_path / f"eval{i}.json")])
    assert ev.returncode == 0, ev.stderr[-3000:]
  assert first.wait(timeout=120) == 0
  assert_same_run(lone_run, workdir)


@pytest.mark.slow
def test_sigint_during_the_first_compilation_exits_cleanly(tmp_path):
  workdir = tmp_path / "run"
  proc = start(train_cmd(workdir), tmp_path / "log", env=NO_CACHE)
  # "N parameters; ..." is printed just before the first step, which compiles
  wait_for(lambda: "parameters;" in (tmp_path / "log").read_text(), what="start of the loop")
  proc.send_signal(signal.SIGINT)
  assert proc.wait(timeout=60) == 0  # not a segfault (-11), not a traceback
  log = (tmp_path / "log").read_text()
  assert "SIGINT received" in log and "Traceback" not in log
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["status"] == "interrupted" and summary["steps"] <= 2
  if summary["steps"]:
    assert str(summary["steps"]) in os.listdir(workdir / "checkpoints")


@pytest.mark.slow
def test_stops_inside_logging_windows_leave_the_history_of_an_uninterrupted_run(tmp_path):
  """Windows of 7 steps, two SIGTERMs at arbitrary steps: each stop logs its window as partial;
  after the resumes the train records (timings aside) and validations equal the uninterrupted
  run's, in the checkpoint and in history.jsonl."""
  extra = ["--config.train.log_every=7", "--config.train.epochs=3"]
  lone = tmp_path / "lone"
  assert run(train_cmd(lone, *extra)).returncode == 0
  workdir = tmp_path / "run"
  for stop in (2, 7):  # stop once the run has logged this many train records
    proc = start(train_cmd(workdir, *extra), tmp_path / "log")
    wait_for(lambda n=stop: train_lines(workdir) >= n, what=f"{stop} train records")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, (tmp_path / "log").read_text()[-2000:]
    steps = json.loads((workdir / "summary.json").read_text())["steps"]
    last = json.loads((workdir / "history.jsonl").read_text().splitlines()[-1])
    assert last.get("partial", False) == (steps % 7 != 0 and steps % 30 != 0), (steps, last)
  assert run(train_cmd(workdir, *extra)).returncode == 0
  (_, ha), (_, hb) = final_state(lone), final_state(workdir)
  assert train_records(ha) == train_records(hb) and validation_losses(ha) == validation_losses(hb)
  on_disk = [json.loads(l) for l in (workdir / "history.jsonl").read_text().splitlines()]
  assert train_records(on_disk) == train_records(ha)


@pytest.mark.slow
def test_restore_run_never_loses_the_race_with_a_run_that_replaces_its_latest_step(tmp_path):
  """Before any validation evaluate.py restores the latest step, which a run saving at every
  step replaces at every step: restore_run pins the step it reads, so every call succeeds
  (it failed ~3 times in 100 with "no checkpoint for step N; available: [N+1]")."""
  from infinito_jax.evaluate import restore_run  # pylint: disable=import-outside-toplevel
  workdir = tmp_path / "run"
  # batch 1: ~120 steps before the first validation, each one saved (and the last pruned)
  proc = start(train_cmd(workdir, "--config.checkpoint.every_steps=1",
                         "--config.train.batch_size=1"), tmp_path / "log")
  try:
    wait_for(lambda: len(steps_on_disk(workdir)) > 0, what="a first checkpoint")
    seen = []
    while not validated(workdir) and len(seen) < 40:
      restored = restore_run(str(workdir))
      assert "no validation yet" in restored.note or "best step" in restored.note
      seen.append(restored.step)
    assert len(seen) >= 5 and len(set(seen)) >= 3, seen  # the race really ran
  finally:
    proc.kill()
    proc.wait()


@pytest.mark.slow
def test_sigterm_during_start_up_exits_cleanly_and_changes_nothing(tmp_path):
  workdir = tmp_path / "run"
  proc = start(train_cmd(workdir), tmp_path / "log")
  time.sleep(0.3)  # inside the imports
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=120) == 0
  log = (tmp_path / "log").read_text()
  assert "SIGTERM received" in log and "Traceback" not in log
  assert not (workdir / "checkpoints").exists() or not any(
      p.name.isdigit() for p in (workdir / "checkpoints").iterdir())


@pytest.mark.slow
def test_a_second_signal_during_the_first_compilation_aborts_with_130_not_a_crash(tmp_path):
  workdir = tmp_path / "run"
  proc = start(train_cmd(workdir), tmp_path / "log", env=NO_CACHE)
  wait_for(lambda: "parameters;" in (tmp_path / "log").read_text(), what="start of the loop")
  time.sleep(0.3)  # past the loop's first check: the first step is compiling (seconds)
  proc.send_signal(signal.SIGINT)
  time.sleep(0.1)
  proc.send_signal(signal.SIGTERM)
  rc = proc.wait(timeout=60)
  assert rc == 130, (rc, (tmp_path / "log").read_text()[-2000:])  # not 139: a segfault
  log = (tmp_path / "log").read_text()
  assert "Aborted by a second signal" in log
  assert "Traceback" not in log and "Fatal Python error" not in log


@pytest.mark.slow
def test_a_second_ctrl_c_aborts_at_once_and_keeps_what_was_saved(tmp_path):
  workdir = tmp_path / "run"
  proc = start(train_cmd(workdir, "--config.checkpoint.every_steps=10"), tmp_path / "log")
  wait_for(lambda: train_lines(workdir) >= 35, what="35 steps (an epoch end: summary.json)")
  proc.send_signal(signal.SIGINT)
  proc.send_signal(signal.SIGINT)
  rc = proc.wait(timeout=60)
  assert rc in (0, 130)  # 0: the first stop won the race to the save
  log = (tmp_path / "log").read_text()
  assert "Traceback" not in log
  steps = steps_on_disk(workdir)
  assert steps and max(steps) >= 30
  # the summary says the process is gone, not "running": aborted (130) or interrupted (0)
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["status"] == {130: "aborted", 0: "interrupted"}[rc], (rc, summary["status"])
  resumed = run(train_cmd(workdir, "--config.checkpoint.every_steps=10"))
  assert resumed.returncode == 0, resumed.stderr[-3000:]


@pytest.mark.slow
def test_damaged_latest_step_gives_one_paragraph_with_the_command_that_resumes(tmp_path):
  workdir = tmp_path / "run"
  base = [sys.executable, "train.py", "--config", "configs/tiny.py", "--workdir", str(workdir),
          "--config.train.learning_rate=0.1", "--config.train.epochs=3"]
  assert run(base).returncode == 0
  steps = steps_on_disk(workdir)
  assert len(steps) == 2  # the best (epoch 2) and the latest (epoch 3)
  for f in (workdir / "checkpoints" / str(steps[-1]) / "params" / "d").iterdir():
    os.truncate(f, 7)
  out = run(base)
  assert out.returncode == 1
  line = one_error_line(out.stderr)
  assert f"step {steps[-1]}" in line and f"newest intact step is {steps[0]}" in line
  command = line.split("The command: ")[1]
  assert command.endswith("--config.checkpoint.on_damage=previous")
  args = command.split()[2:]  # drop "python train.py"
  again = run([sys.executable, "train.py", *args])
  assert again.returncode == 0, again.stderr[-3000:]
  assert f"Resuming from {workdir}/checkpoints/{steps[0]}" in again.stdout
  ev = run([sys.executable, "evaluate.py", "--ckpt", str(workdir), "--step", str(steps[0])])
  assert ev.returncode == 0, ev.stderr[-3000:]


def _write(path: pathlib.Path, data) -> str:
  (path.write_bytes if isinstance(data, bytes) else path.write_text)(data)
  return str(path)


@pytest.mark.slow
def test_bad_inputs_get_one_line_naming_the_problem_and_exit_1(tmp_path):
  good = _write(tmp_path / "good.txt", " ".join(f"w{i % 40}" for i in range(4000)) + "\n")
  empty = _write(tmp_path / "empty.txt", "")
  binary = _write(tmp_path / "binary.bin", bytes(range(256)) * 64)
  late_binary = _write(tmp_path / "late.txt", b"w " * 600_000 + b"\xff\xfe w\n")
  files = lambda train, valid: ["--config.data.source=files", f"--config.data.files.train={train}",
                                f"--config.data.files.validation={valid}"]
  tiny = [sys.executable, "train.py", "--config", "configs/tiny.py"]
  cases = {  # command -> words the one error line must hold
      "empty train": (files(empty, good), ["data.files.train", "empty.txt", "is empty"]),
      "binary train": (files(binary, good), ["data.files.train", "binary.bin", "not UTF-8"]),
      "empty validation": (files(good, empty), ["data.files.validation", "empty.txt", "is empty"]),
      "lr 0": (["--config.train.learning_rate=0"], ["train.learning_rate=0", "> 0"]),
      "negative lr": (["--config.train.learning_rate=-0.001"], ["train.learning_rate", "> 0"]),
      "batch 0": (["--config.train.batch_size=0"], ["train.batch_size=0", ">= 1"]),
      "epochs 0": (["--config.train.epochs=0"], ["train.epochs=0", ">= 1"]),
      "unknown field": (["--config.model.foo=1"], ["no field 'model.foo'", "hidden_dim"]),
      "not a number": (["--config.train.learning_rate=abc"], ["learning_rate=abc", "float"]),
      "negative seed": (["--config.seed=-1"], ["config.seed=-1", "[0, 2**32)"]),
      "bad bytes after 1 MiB": (files(late_binary, good), ["byte 1200000", "not UTF-8"]),
      "workdir is a file": ([], ["as a workdir", "a file is in the way"]),
  }
  whole = {  # whole command lines
      "missing config": (["--config", "configs/nope.py"], ["configs/nope.py", "no such file"]),
      "no config": ([], ["pass --config"]),
      "not a python file": (["--config", "README.md"], ["README.md", "a config is a Python file"]),
      "no get_config": (["--config", "configs/__init__.py"], ["defines no get_config()"]),
      "stray argument": (["--config", "configs/tiny.py", "extra"], ["unexpected arguments"]),
  }
  (tmp_path / "workdir_is_a_file").write_text("x")
  procs = {}
  for name, case in {**cases, **whole}.items():
    cmd = ([sys.executable, "train.py", *case[0]] if name in whole
           else tiny + ["--workdir", str(tmp_path / name.replace(" ", "_")), *case[0]])
    procs[name] = popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                        text=True)
  for name, proc in procs.items():
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, (name, err[-2000:])
    line = one_error_line(err)
    for w in {**cases, **whole}[name][1]:
      assert w in line, (name, line)
    if name in cases and name != "workdir is a file":  # a failed start leaves no workdir
      assert not (tmp_path / name.replace(" ", "_")).exists(), name


@pytest.mark.slow
def test_evaluate_refuses_bad_flags_before_the_work_and_warns_on_unknown_text(tmp_path):
  workdir = tmp_path / "run"
  assert run([sys.executable, "train.py", "--config", "configs/tiny.py", "--workdir",
              str(workdir), "--config.train.epochs=1"]).returncode == 0
  ev = [sys.executable, "evaluate.py", "--ckpt", str(workdir)]
  out = run(ev + ["--out", str(tmp_path / "no" / "such" / "dir" / "r.json")])
  assert out.returncode == 1 and "does not exist" in one_error_line(out.stderr)
  out = run(ev + ["--prompt", "the", "--temperature", "-1"])
  assert out.returncode == 1 and "temperature must be a finite number >= 0" in one_error_line(out.stderr)
  out = run(ev + ["--out", str(tmp_path)])
  assert out.returncode == 1 and "is a folder" in one_error_line(out.stderr)
  # a report among the step folders would go when Orbax prunes its step (or pose as one)
  for inside in ("checkpoints/30/report.json", "checkpoints/99"):
    out = run(ev + ["--out", str(workdir / inside)])
    assert out.returncode == 1 and "lies inside the run's checkpoints folder" in one_error_line(
        out.stderr)
  assert sorted(os.listdir(workdir / "checkpoints")) == ["30"]
  # what to score, said twice: refused, not one of them ignored
  out = run(ev + ["--split", "test", "--data_file", str(workdir / "history.jsonl")])
  assert out.returncode == 1 and "--split test and --data_file both say" in one_error_line(
      out.stderr)
  for flags in (["--split", "bogus"], ["--step", "abc"], ["--nope"], ["extra"]):
    out = run(ev + flags)
    assert out.returncode == 1 and "evaluate.py --help" in one_error_line(out.stderr), flags
  out = run([sys.executable, "evaluate.py"])
  assert out.returncode == 1 and "pass --ckpt" in one_error_line(out.stderr)
  # a closed terminal (SIGHUP) ends it as SIGINT and SIGTERM do: one line, nothing written
  # (it died silently with -1)
  proc = popen(ev + ["--out", str(tmp_path / "hup.json")], cwd=ROOT, env=ENV,
               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  time.sleep(1.0)  # restoring and scoring take longer
  proc.send_signal(signal.SIGHUP)
  _, err = proc.communicate(timeout=60)
  assert proc.returncode == 128 + signal.SIGHUP, (proc.returncode, err[-2000:])
  assert "SIGHUP received: evaluation stopped, nothing written" in err
  assert not (tmp_path / "hup.json").exists()
  foreign = _write(tmp_path / "foreign.txt", " ".join(f"zz{i}" for i in range(300)) + "\n")
  out = run(ev + ["--data_file", foreign])
  assert out.returncode == 0, out.stderr[-2000:]
  assert "100.0% of the target words" in out.stdout and "outside the vocabulary" in out.stdout
  [report] = workdir.glob("eval_file-foreign-*_step30.json")  # named after the file
  assert json.loads(report.read_text())["unk_rate"] == 1.0
  # --out never overwrites what is not a report: the scored text, the run's own record
  history = (workdir / "history.jsonl").read_bytes()
  for victim, extra in ((foreign, ["--data_file", foreign]), (workdir / "history.jsonl", [])):
    before = pathlib.Path(victim).read_bytes()
    out = run(ev + extra + ["--out", str(victim)])
    assert out.returncode == 1 and "is not a report of evaluate.py" in one_error_line(out.stderr)
    assert pathlib.Path(victim).read_bytes() == before
  assert (workdir / "history.jsonl").read_bytes() == history
  out = run(ev + ["--out", str(report)])  # a report is replaced by the new one
  assert out.returncode == 0, out.stderr[-2000:]
  assert json.loads(report.read_text())["split"] == "validation"
  # a mistyped folder is named as missing, a file as a file; --num_tokens alone would sample
  # nothing
  out = run([sys.executable, "evaluate.py", "--ckpt", str(tmp_path / "rnu")])
  assert out.returncode == 1 and "no such folder" in one_error_line(out.stderr)
  out = run([sys.executable, "evaluate.py", "--ckpt", str(workdir / "history.jsonl")])
  assert out.returncode == 1 and "history.jsonl is a file" in one_error_line(out.stderr)
  out = run(ev + ["--num_tokens", "5"])
  assert out.returncode == 1 and "pass --prompt" in one_error_line(out.stderr)


def _can_mount_tmpfs(path) -> bool:
  path.mkdir(parents=True, exist_ok=True)
  ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(path)],
                      capture_output=True).returncode == 0
  if ok:
    subprocess.run(["umount", str(path)], check=True)
  return ok


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_loses_nothing(tmp_path):
  """A real full disk: a small tmpfs (needs root; skipped where mounting is not allowed)."""
  mnt = tmp_path / "disk"
  if not _can_mount_tmpfs(mnt):
    pytest.skip("mounting a tmpfs is not permitted here (needs root)")
  src = tmp_path / "src"
  assert run(train_cmd(src, "--config.train.epochs=1")).returncode == 0
  used = int(subprocess.run(["du", "-s", "--block-size=1", str(src)], capture_output=True,
                            text=True, check=True).stdout.split()[0])
  # room for the copied run (one checkpoint) and 40% more: the resume's next save cannot fit
  subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={used * 14 // 10}", "tmpfs", str(mnt)],
                 check=True)
  try:
    shutil.copytree(src, mnt / "run")
    before = sorted(p.name for p in (mnt / "run" / "checkpoints").iterdir())
    out = run(train_cmd(mnt / "run", "--config.train.epochs=3"))
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    line = one_error_line(out.stderr)
    assert "no space left on the device" in line and "free space" in line
    assert sorted(p.name for p in (mnt / "run" / "checkpoints").iterdir()
                  if ".orbax-checkpoint-tmp" not in p.name) == before
    state, _ = final_state(mnt / "run")  # what was saved is intact
    assert state.step.tolist() == [30]
    # and the summary says how the run ended, although the disk was full to the last byte
    assert json.loads((mnt / "run" / "summary.json").read_text())["status"] == "aborted"
  finally:
    subprocess.run(["umount", "-l", str(mnt)])


@pytest.mark.slow
def test_a_full_tensorboard_folder_turns_tensorboard_off_and_the_run_goes_on(lone_run, tmp_path):
  """TensorBoard's folder on a full disk (a tmpfs of 8 KiB, filled): tensorboardX's writer
  thread dies, and its queue used to block the loop forever, with no save and no way out but a
  second signal. Now one warning, no traceback, and the run ends equal to the lone run."""
  workdir = tmp_path / "run"
  tb = workdir / "tensorboard"
  if not _can_mount_tmpfs(tb):
    pytest.skip("mounting a tmpfs is not permitted here (needs root)")
  subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8k", "tmpfs", str(tb)], check=True)
  try:
    subprocess.run(["dd", "if=/dev/zero", f"of={tb / 'filler'}", "bs=1k"], capture_output=True)
    out = run(train_cmd(workdir), timeout=240)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "Traceback" not in out.stderr and "Exception" not in out.stderr, out.stderr[-3000:]
    warnings = [l for l in out.stderr.splitlines() if "TensorBoard files could no longer" in l]
    assert len(warnings) == 1 and "No space left on device" in warnings[0]
    assert json.loads((workdir / "summary.json").read_text())["status"] == "completed"
    assert_same_run(lone_run, workdir)
  finally:
    subprocess.run(["umount", "-l", str(tb)])


@pytest.mark.slow
def test_sighup_stops_like_sigterm_and_a_late_summary_is_repaired(lone_run, tmp_path):
  """A closed terminal or ssh session sends SIGHUP: the step is finished and saved, exit 0.
  A summary.json left stale after the last save (a process killed between the two) is
  rewritten from the checkpoint by the next start, which has nothing to train."""
  workdir = tmp_path / "run"
  proc = start(train_cmd(workdir), tmp_path / "log")
  wait_for(lambda: train_lines(workdir) >= 40, what="40 steps")
  proc.send_signal(signal.SIGHUP)
  assert proc.wait(timeout=60) == 0
  assert "SIGHUP received: finishing this step" in (tmp_path / "log").read_text()
  assert json.loads((workdir / "summary.json").read_text())["status"] == "interrupted"
  assert run(train_cmd(workdir)).returncode == 0
  assert_same_run(lone_run, workdir)
  path = workdir / "summary.json"
  good = json.loads(path.read_text())
  path.write_text(json.dumps(dict(good, status="running", best_step=30)))
  out = run(train_cmd(workdir))
  assert out.returncode == 0 and "Nothing to do" in out.stdout, out.stderr[-2000:]
  again = json.loads(path.read_text())
  assert again["status"] == "completed" and again["best_step"] == good["best_step"]


@pytest.mark.slow
def test_a_workdir_removed_under_a_run_ends_it_with_one_error_line(tmp_path):
  """rm -rf of the workdir while the run saves every step: exit 1 with the error naming what
  happened, not Orbax's tracebacks as the last word."""
  workdir = tmp_path / "run"
  proc = start(train_cmd(workdir, "--config.checkpoint.every_steps=1"), tmp_path / "log")
  wait_for(lambda: train_lines(workdir) >= 20, what="20 steps")
  shutil.rmtree(workdir, ignore_errors=True)
  assert proc.wait(timeout=120) == 1
  errors = [l for l in (tmp_path / "log").read_text().splitlines() if l.startswith("error: ")]
  assert len(errors) == 1 and "was removed while this run" in errors[0], (tmp_path / "log").read_text()[-3000:]


@pytest.mark.slow
def test_soak_eight_kill_9_at_random_moments_end_equal_to_the_lone_run(lone_run, tmp_path):
  """Kill -9 anywhere (start-up, compile, a step, a save, a prune), resume, 8 times."""
  workdir = tmp_path / "run"
  rng = random.Random(0)
  extra = ["--config.checkpoint.every_steps=7"]  # many saves: kills land inside them too
  # where each life ends, shuffled; waits counted in steps and saves, not seconds, so that a
  # slow machine kills at the same points of the run. With this seed the lives that resume
  # after a life that saved (3rd, 4th, 7th) resume from 3 different steps.
  plan = ["start"] * 2 + ["after a save"] * 4 + ["in the steps"] * 2
  rng.shuffle(plan)
  kills = 0
  for kind in plan:
    log = tmp_path / f"log{kills}"
    if kind == "start":  # imports, data, restore, the first compilations
      # real compilations (no cache): the kill lands in one or before
      proc = start(train_cmd(workdir, *extra), log, env=NO_CACHE)
      time.sleep(rng.uniform(0.2, 8.0))
    else:  # the loop: steps, validations, saves, prunes
      proc = start(train_cmd(workdir, *extra), log)
      wait_for(lambda: "parameters;" in log.read_text() or proc.poll() is not None,
               what="the loop to start")
      n0, saved = train_lines(workdir), set(steps_on_disk(workdir))
      if kind == "after a save":  # a new checkpoint is on disk: into the steps or saves after it
        wait_for(lambda: set(steps_on_disk(workdir)) - saved or proc.poll() is not None,
                 what="a new checkpoint")
        time.sleep(rng.uniform(0.0, 1.0))
      else:  # a few steps in, maybe inside a save
        steps = rng.randint(1, 12)
        wait_for(lambda: train_lines(workdir) >= n0 + steps or proc.poll() is not None,
                 what=f"{steps} steps")
        time.sleep(rng.uniform(0.0, 0.3))
    if proc.poll() is not None:  # finished before the kill: the rest is the final check
      break
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    kills += 1
  final = run(train_cmd(workdir, *extra))
  assert final.returncode == 0, final.stderr[-3000:]
  assert kills >= 7, kills  # the run was long enough to be killed often
  resumed_at = {int(m) for i in range(kills)
                for m in re.findall(r"Resuming from .* \(step (\d+)", (tmp_path / f"log{i}").read_text())}
  assert len(resumed_at) >= 3, resumed_at  # kills landed while training, not only at start-up
  assert_same_run(lone_run, workdir)
  restored = run([sys.executable, "evaluate.py", "--ckpt", str(workdir), "--out",
                  str(tmp_path / "eval.json")])
  report = json.loads((tmp_path / "eval.json").read_text())
  summary = json.loads((workdir / "summary.json").read_text())
  assert restored.returncode == 0 and report["step"] == summary["best_step"]
  assert abs(report["loss"] - summary["best_val_loss"]) < 1e-6


WATCHDOG = """
import sys, time
sys.path.insert(0, {root!r})
from infinito_jax.lifecycle import StopSignals
stop = StopSignals(hard_abort=True, startup_grace_s=0.5).install()
print("ready", flush=True)
while not stop.requested:
  time.sleep(0.01)
stop.training = {training}  # True: the step loop began before the grace period ran out
time.sleep(3)  # a start-up stuck without a check (a long restore or initialisation)
print("main thread finished", flush=True)
sys.exit(3)
"""


@pytest.mark.parametrize("training", [False, True])
def test_a_signal_during_a_stuck_start_up_exits_after_the_grace_period(tmp_path, training):
  """Start-up has nothing to save: if it reaches no check within startup_grace_s of SIGTERM,
  the process exits 0 there; once the step loop has begun it never does (that step is saved)."""
  proc = popen([sys.executable, "-c", WATCHDOG.format(root=str(ROOT), training=training)],
               env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  assert proc.stdout.readline().strip() == "ready"
  t0 = time.time()
  proc.send_signal(signal.SIGTERM)
  rc = proc.wait(timeout=30)
  log = proc.stdout.read()
  took = time.time() - t0
  if training:
    assert rc == 3 and "main thread finished" in log and took >= 3, (rc, log)
  else:
    assert rc == 0 and took < 2.5, (rc, took, log)
    assert "did not reach a stopping point within 0.5 s of SIGTERM" in log
    assert "main thread finished" not in log


LONG_C_CALL = """
import sys
sys.path.insert(0, {root!r})
import numpy as np
from infinito_jax.lifecycle import StopSignals
stop = StopSignals(hard_abort=True).install()
stop.training = True
a = np.random.default_rng(0).random((7000, 7000), dtype=np.float32)
print("computing", flush=True)
a @ a  # seconds in one BLAS call: Python's handler cannot run until it returns
print("computed", flush=True)
"""


@pytest.mark.slow
def test_signals_during_a_long_call_into_c_are_counted_not_merged(tmp_path):
  """Python runs a signal's handler only when the main thread is back in Python; during a long
  call into C (a restore, a save, a data load; here one big numpy product) two SIGTERMs used
  to reach it as one, and the run saved a step and exited 0 instead of aborting. Counted as
  they arrive, a second signal aborts at once (exit 130, before the call returns), and a lone
  first one is acknowledged within a second or two, then takes effect when the call returns."""
  env = dict(ENV, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")

  def start():
    proc = popen([sys.executable, "-c", LONG_C_CALL.format(root=str(ROOT))],
                 env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "computing", proc.stderr.read()[-2000:]
    time.sleep(0.5)
    return proc

  proc = start()
  t0 = time.time()
  proc.send_signal(signal.SIGTERM)
  time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  took = time.time() - t0
  assert proc.returncode == 130 and "computed" not in out, (proc.returncode, took, out, err)
  assert "Aborted by a second signal" in err and took < 3, (took, err)

  proc = start()
  t0 = time.time()
  proc.send_signal(signal.SIGTERM)
  seen = []
  while not any("received while" in line for line in seen):
    line = proc.stderr.readline()
    assert line, f"no acknowledgement before the end of its output: {seen}"
    seen.append(line)
  acknowledged = time.time() - t0
  out, err = proc.communicate(timeout=120)
  assert acknowledged < 3 and "computed" in out, (acknowledged, out)
  assert proc.returncode == 0 and "finishing this step" in err, (proc.returncode, err)


@pytest.mark.slow
def test_a_removed_lock_stops_the_run_before_a_second_writer_can_share_the_workdir(lone_run,
                                                                                  tmp_path):
  """`rm .lock` under a running run: the run notices at its next write of any of its files
  (it holds a lock on that file, not on the path) and stops with one error line, writing
  nothing more; a second train.py, which makes a new lock, then owns the workdir alone and
  ends equal to the lone run. Before, both wrote it at once (history interleaved)."""
  workdir = tmp_path / "run"
  first = start(train_cmd(workdir), tmp_path / "log")
  wait_for(lambda: train_lines(workdir) >= 5, what="the first run to train")
  summary_before = (workdir / "summary.json").read_text()
  (workdir / ".lock").unlink()
  assert first.wait(timeout=60) == 1
  log = (tmp_path / "log").read_text()
  errors = [l for l in log.splitlines() if l.startswith("error: ")]
  assert len(errors) == 1 and "(or its lock file) was removed while this run" in errors[0], log[-3000:]
  assert "Traceback" not in log, log[-3000:]
  assert (workdir / "summary.json").read_text() == summary_before  # nothing more written
  second = run(train_cmd(workdir))
  assert second.returncode == 0, second.stderr[-3000:]
  assert_same_run(lone_run, workdir)


def test_a_lock_made_anew_by_another_process_is_told_apart(tmp_path):
  """The checkpointer tells a lock removed from one removed and taken anew (a second writer):
  by the file at the path, not by the path alone."""
  from infinito_jax.checkpoint import Checkpointer  # pylint: disable=import-outside-toplevel
  lock = tmp_path / ".lock"
  lock.write_text("")
  held = os.open(lock, os.O_RDONLY)  # as train.py's lock holds it: its inode is not reused
  ckpt = Checkpointer(str(tmp_path))
  assert not ckpt.workdir_removed()
  lock.unlink()
  assert ckpt.workdir_removed() and not ckpt.lock_replaced()
  assert "was removed while this run saved" in ckpt.lost_message("saved")
  lock.write_text("")  # another process's new lock: another file
  assert ckpt.workdir_removed() and ckpt.lock_replaced()
  assert "another process took a new one" in ckpt.lost_message("saved")
  ckpt.close()
  os.close(held)


def _can_bind_read_only(path) -> bool:
  path.mkdir(parents=True, exist_ok=True)
  ok = subprocess.run(["mount", "--bind", "-o", "ro", str(path), str(path)],
                      capture_output=True).returncode == 0
  if ok:
    subprocess.run(["umount", str(path)], check=True)
  return ok


@pytest.mark.slow
def test_a_workdir_made_read_only_under_a_run_is_one_error_line_and_resumes(lone_run, tmp_path):
  """The workdir's disk turned read-only mid-run (a read-only bind mount; needs root): one
  error line naming the file and the fix, no traceback (the save in flight that cannot finish
  is a warning line), and once writable again the run resumes to the lone run's end."""
  workdir = tmp_path / "run"
  if not _can_bind_read_only(workdir):
    pytest.skip("a read-only bind mount is not permitted here (needs root)")
  proc = start(train_cmd(workdir), tmp_path / "log")
  wait_for(lambda: train_lines(workdir) >= 35, what="35 steps (a first save)")
  subprocess.run(["mount", "--bind", "-o", "ro", str(workdir), str(workdir)], check=True)
  try:
    assert proc.wait(timeout=120) == 1
  finally:
    subprocess.run(["umount", "-l", str(workdir)])
  log = (tmp_path / "log").read_text()
  errors = [l for l in log.splitlines() if l.startswith("error: ")]
  assert len(errors) == 1 and "read-only or unwritable" in errors[0], log[-3000:]
  assert "Traceback" not in log, log[-3000:]
  out = run(train_cmd(workdir))
  assert out.returncode == 0, out.stderr[-3000:]
  assert_same_run(lone_run, workdir)


@pytest.mark.slow
def test_an_ended_run_deletes_a_step_left_by_a_reader_once_no_reader_holds_it(lone_run, tmp_path):
  """A step a reader pinned through the run's last save outlives that save, and an ended run
  saves no more: its 'Nothing to do' start deletes it, unless a reader still holds it."""
  import fcntl  # pylint: disable=import-outside-toplevel
  workdir = tmp_path / "run"
  shutil.copytree(lone_run, workdir)
  kept = sorted(steps_on_disk(workdir))
  extra = workdir / "checkpoints" / "7"  # a committed step that is neither latest nor best
  shutil.copytree(workdir / "checkpoints" / str(kept[0]), extra)
  pin = workdir / ".readers" / "7"
  pin.parent.mkdir(exist_ok=True)
  fd = os.open(pin, os.O_RDWR | os.O_CREAT, 0o666)
  try:
    fcntl.flock(fd, fcntl.LOCK_SH)  # a reader holds it
    out = run(train_cmd(workdir))
    assert out.returncode == 0 and "Nothing to do" in out.stdout, out.stderr[-3000:]
    assert extra.is_dir()
  finally:
    os.close(fd)  # the reader is done
  out = run(train_cmd(workdir))
  assert out.returncode == 0 and "Nothing to do" in out.stdout, out.stderr[-3000:]
  assert not extra.exists() and sorted(steps_on_disk(workdir)) == kept


@pytest.mark.slow
def test_a_lock_removed_during_start_up_stops_the_run_at_its_first_write(tmp_path):
  """The run knows its lock by the file it locked, from the moment it took it: a `.lock`
  removed while the run still prepares its data and model is noticed at its first write."""
  workdir = tmp_path / "run"
  proc = start(train_cmd(workdir), tmp_path / "log")
  wait_for(lambda: (workdir / ".lock").exists(), what="the lock")
  (workdir / ".lock").unlink()
  assert proc.wait(timeout=120) == 1
  log = (tmp_path / "log").read_text()
  errors = [l for l in log.splitlines() if l.startswith("error: ")]
  assert len(errors) == 1 and "(or its lock file) was removed while this run" in errors[0], log[-3000:]
  assert train_lines(workdir) == 0 and "Traceback" not in log
