"""Multi-process runs on jax.distributed, for real: 2 train.py processes on localhost, each with
2 simulated CPU devices (4 in all), talking through gloo.

Properties:
- 2 processes x 2 devices train like 1 process x 4 devices (within 1e-5) and like 1 device (the
  tolerance of test_multidevice.py), with the global batch each process builds in halves;
- a checkpoint moves between process counts: 2 -> 1 -> 2 processes continue the run as one
  uninterrupted 2-process run does;
- the run's files come from process 0 only; a stop signal to one process stops both after the
  same step, saved;
- an error on one process stops the other with its message; a process that cannot reach the
  coordinator fails with a clear error within its timeout.
"""

import glob
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import xla_flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRAIN = [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "tiny.py"),
         "--config.train.learning_rate=1e-4", "--config.log.plot=false"]

pytestmark = pytest.mark.slow


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def env(devices: int, own_cache: bool = False) -> dict:
  """The processes' environment; `own_cache`: without the suite's compilation cache, so that
  the run's train.compilation_cache decides."""
  out = dict(os.environ, XLA_FLAGS=xla_flags(f"--xla_force_host_platform_device_count={devices}"),
             JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  if own_cache:
    out.pop("JAX_COMPILATION_CACHE_DIR", None)
  return out


def launch(args, processes: int = 2, devices: int = 2, extra=None, own_cache=False):
  """Starts `processes` train.py processes (or one plain process) with `args` (and process i's
  `extra[i]` flags, which come last and win)."""
  if processes == 1:
    return [subprocess.Popen(TRAIN + args, env=env(devices, own_cache), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=ROOT)]
  port = free_port()
  return [subprocess.Popen(TRAIN + args + [f"--coordinator_address=localhost:{port}",
                                           f"--num_processes={processes}", f"--process_id={i}"]
                           + (extra or {}).get(i, []),
                           env=env(devices, own_cache), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, cwd=ROOT)
          for i in range(processes)]


def finish(procs, timeout: float = 300):
  """(returncode, stdout, stderr) of each process; past `timeout` every process is killed (a
  hung run leaves nothing behind) and the timeout raised."""
  outs = []
  try:
    for p in procs:
      out, err = p.communicate(timeout=timeout)
      outs.append((p.returncode, out, err))
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
      p.communicate()
    raise
  return outs


def run(args, processes=2, devices=2, own_cache=False):
  outs = finish(launch(args, processes, devices, own_cache=own_cache))
  for i, (rc, out, err) in enumerate(outs):
    assert rc == 0, f"process {i}: rc {rc}\n{out[-2000:]}\n{err[-3000:]}"
  return outs


def restored(workdir, step):
  """(params, memory) of `step`, read back here (one device)."""
  from infinito_jax.evaluate import restore_run  # pylint: disable=import-outside-toplevel
  r = restore_run(str(workdir), step=step)
  return r.params, r.memory


def max_diff(a, b, skip_key_bias=False):
  import jax  # pylint: disable=import-outside-toplevel
  worst = 0.0
  for (p, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)):
    if skip_key_bias and "k_proj']['bias" in jax.tree_util.keystr(p):
      continue
    worst = max(worst, float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y)))))
  return worst


def train_records(workdir) -> list[dict]:
  lines = (pathlib.Path(workdir) / "history.jsonl").read_text().splitlines()
  return [r for r in map(json.loads, lines) if r["kind"] == "train"]


def train_losses(workdir):
  return [r["loss"] for r in train_records(workdir)]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
  """A run of 2 processes x 2 devices stopped after 12 steps, its train.compilation_cache a
  folder of its own (`cache` next to the workdir), steps 2..3 profiled: (workdir, outputs)."""
  work = tmp_path_factory.mktemp("two") / "run"
  return work, run(["--config.train.stop_after_steps=12", "--workdir", str(work),
                    f"--config.train.compilation_cache={work.parent / 'cache'}",
                    "--config.train.profile_steps=2,4"], own_cache=True)


def test_each_process_writes_its_own_profile(two_processes):
  """The trace files are named after the host: on one host, the processes' traces in one
  folder overwrote each other's (one was left, silently). Each has a folder of its own."""
  work, _ = two_processes
  for i in (0, 1):
    traces = glob.glob(str(work / "profile" / f"process_{i}" / "plugins" / "profile" / "*" /
                           "*.xplane.pb"))
    assert len(traces) == 1, (i, os.listdir(work / "profile"))


def test_a_multi_process_cpu_run_keeps_out_of_the_compilation_cache(two_processes, tmp_path):
  """Under JAX 0.12.1, a second 2-process CPU run of the same shapes, whose process 0 loaded its
  programs from the persistent compilation cache (only process 0 writes it) while process 1
  compiled its own, hung in the first collective between them and never took a step. A
  multi-process CPU run neither writes the cache nor reads it, and says so once; a second run
  with the same cache finishes. (A one-process run fills such a folder: test_speed_tools.py.)"""
  work, outs = two_processes
  cache = work.parent / "cache"
  assert not cache.exists() or os.listdir(cache) == []
  assert outs[0][1].count("note: no persistent compilation cache in a multi-process run on "
                          "CPU") == 1
  again = run(["--config.train.stop_after_steps=2", "--workdir", str(tmp_path / "again"),
               f"--config.train.compilation_cache={cache}"], own_cache=True)
  assert "Run stopped after 2 steps" in again[0][1]
  assert not cache.exists() or os.listdir(cache) == []


def test_two_processes_train_like_one_process_and_like_one_device(tmp_path, two_processes):
  stop = ["--config.train.stop_after_steps=12"]
  work, two = two_processes
  shutil.copytree(work, tmp_path / "two")
  run(stop + ["--workdir", str(tmp_path / "four"), "--config.train.num_devices=4"],
      processes=1, devices=4)
  run(stop + ["--workdir", str(tmp_path / "one"), "--config.train.num_devices=1"],
      processes=1, devices=1)
  # the run's output and files are process 0's: process 1 prints nothing to stdout
  assert "Run stopped after 12 steps" in two[0][1] and two[1][1] == "", two[1][1][-500:]
  summary = json.loads((tmp_path / "two" / "summary.json").read_text())
  assert summary["devices"] == 4 and summary["steps"] == 12
  p2, m2 = restored(tmp_path / "two", 12)
  p4, m4 = restored(tmp_path / "four", 12)
  p1, m1 = restored(tmp_path / "one", 12)
  l2, l4, l1 = (train_losses(tmp_path / w) for w in ("two", "four", "one"))
  assert len(l2) == len(l4) == 3  # steps 5, 10, 12
  print(f"2 processes x 2 devices vs 1 x 4: losses {max(abs(a - b) for a, b in zip(l2, l4)):.1e}, "
        f"params (key bias aside) {max_diff(p2, p4, skip_key_bias=True):.1e}, key bias "
        f"{max_diff(p2, p4):.1e}, memory {max_diff(m2, m4):.1e}; vs 1 device: losses "
        f"{max(abs(a - b) for a, b in zip(l2, l1)):.1e}, params (key bias aside) "
        f"{max_diff(p2, p1, skip_key_bias=True):.1e}, memory {max_diff(m2, m1):.1e}")
  assert max(abs(a - b) for a, b in zip(l2, l4)) < 1e-5
  # the key bias's true gradient is 0: its rounding noise is scaled by Adam to ~lr per step
  # whatever the reduction order (test_multidevice.py's tolerance); everything else to 1e-5
  assert max_diff(p2, p4, skip_key_bias=True) < 1e-5 and max_diff(m2, m4) < 1e-5
  assert max_diff(p2, p4) < 12 * 1e-4
  # against one device: test_multidevice.py's tolerance (the key bias is Adam's sign noise)
  assert max(abs(a - b) for a, b in zip(l2, l1)) < 1e-5
  assert max_diff(p2, p1, skip_key_bias=True) < 1e-5 and max_diff(m2, m1) < 1e-5
  assert max_diff(p2, p1) < 12 * 1e-4
  v2 = json.loads((tmp_path / "two" / "summary.json").read_text())["replicas"][0]
  assert v2["seed"] == 42
  # evaluate.py takes the same flags: 2 processes score the checkpoint as 1 process does
  port = free_port()
  evaluate = [sys.executable, str(ROOT / "evaluate.py"), "--ckpt", str(tmp_path / "two"),
              "--step=12"]
  procs = [subprocess.Popen(evaluate + [f"--out={tmp_path / 'eval2.json'}",
                                        f"--coordinator_address=localhost:{port}",
                                        "--num_processes=2", f"--process_id={i}"],
                            env=env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT) for i in range(2)]
  assert [o[0] for o in finish(procs)] == [0, 0]
  one = subprocess.run(evaluate + [f"--out={tmp_path / 'eval1.json'}"], env=env(1),
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert one.returncode == 0, one.stderr[-2000:]
  e2, e1 = (json.loads((tmp_path / f"eval{n}.json").read_text()) for n in (2, 1))
  assert abs(e2["loss"] - e1["loss"]) < 1e-5 and e2["devices"] == 4, (e2, e1)


def test_a_checkpoint_moves_between_process_counts(tmp_path, two_processes):
  """2 processes to step 12, then 1 process (2 devices) to 18, then 2 processes to 24: the same
  run as 2 processes going straight to 24."""
  straight, moved = tmp_path / "straight", tmp_path / "moved"
  run(["--workdir", str(straight), "--config.train.stop_after_steps=24"])
  shutil.copytree(two_processes[0], moved)
  out = run(["--workdir", str(moved), "--config.train.stop_after_steps=18"], processes=1)
  assert "Resuming from" in out[0][1] and "step 12" in out[0][1]
  out = run(["--workdir", str(moved), "--config.train.stop_after_steps=24"])
  assert "Resuming from" in out[0][1] and "step 18" in out[0][1]
  ps, ms = restored(straight, 24)
  pm, mm = restored(moved, 24)
  print(f"2 -> 1 -> 2 processes vs 2 straight: params (key bias aside) "
        f"{max_diff(ps, pm, skip_key_bias=True):.1e}, key bias {max_diff(ps, pm):.1e}, memory "
        f"{max_diff(ms, mm):.1e}")
  assert max_diff(ps, pm, skip_key_bias=True) < 1e-5 and max_diff(ms, mm) < 1e-5
  assert max_diff(ps, pm) < 24 * 1e-4  # the key bias: see the test above
  assert abs(train_losses(straight)[-1] - train_losses(moved)[-1]) < 1e-5
  # one history, in order, written by process 0 alone (no duplicated records)
  steps = [r["step"] for r in train_records(moved)]
  assert steps == sorted(set(steps)) and steps[-1] == 24, steps


def _wait_for_train_record(history, procs, after_step=-1, timeout=240):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if history.exists() and any(r["kind"] == "train" and r["step"] > after_step
                                for r in map(json.loads, history.read_text().splitlines())):
      return
    if any(p.poll() is not None for p in procs):
      break
    time.sleep(0.5)
  raise AssertionError(f"no training record after step {after_step}: {finish(procs, 5)}")


def test_a_signal_to_one_process_stops_both_and_a_killed_one_stops_the_other(tmp_path):
  """SIGTERM to process 1 alone: both stop after the same step, saved, exit 0. Then kill -9 of
  process 1 in the resumed run: process 0 stops within seconds, saying a peer died, and the
  checkpoints are intact."""
  work = tmp_path / "run"
  procs = launch(["--workdir", str(work), "--config.train.epochs=50"])
  history = work / "history.jsonl"
  _wait_for_train_record(history, procs)
  procs[1].send_signal(signal.SIGTERM)  # the scheduler's signal, to process 1 only
  outs = finish(procs, 120)
  assert [o[0] for o in outs] == [0, 0], outs
  summary = json.loads((work / "summary.json").read_text())
  assert summary["status"] == "interrupted"
  step = summary["steps"]
  assert f"at step {step}: checkpoint saved" in outs[0][1]
  assert f"stopped with the others after step {step}" in outs[1][2]
  from infinito_jax.checkpoint import Checkpointer  # pylint: disable=import-outside-toplevel
  assert Checkpointer(str(work), read_only=True).latest_step() == step
  # the run goes on from there, and a process killed outright stops the other
  procs = launch(["--workdir", str(work), "--config.train.epochs=50",
                  "--config.checkpoint.every_steps=5"])
  _wait_for_train_record(history, procs, after_step=step)
  procs[1].kill()
  t0 = time.time()
  rc, out, err = finish(procs[:1], 150)[0]
  assert rc not in (0, None) and time.time() - t0 < 120, (rc, err[-2000:])
  assert "Resuming from" in out and f"step {step}" in out
  # our line, from the failed collective; or, on a loaded machine where JAX's heartbeat check
  # notices first, the coordination service's own abort (C++, before Python can say more: CI
  # saw it once with a second job on the cores)
  assert ("another process probably died" in err or "process 1" in err
          or "coordination_service" in err), err[:1000] + " ... " + err[-1000:]
  saved = Checkpointer(str(work), read_only=True).steps()
  assert saved and saved[-1] >= step, saved  # what was saved is there, and readable
  print("process 0 after the kill:", err.strip().splitlines()[-1][:300], f"({time.time() - t0:.1f} s)")
  params, _ = restored(work, saved[-1])
  assert all(np.all(np.isfinite(x)) for x in __import__("jax").tree_util.tree_leaves(params))


def test_an_error_on_one_process_stops_the_other_with_its_message(tmp_path):
  """Process 0 cannot take the workdir's lock (another run holds it): process 1, which would
  wait for it forever, stops too, naming the problem."""
  import fcntl  # pylint: disable=import-outside-toplevel
  work = tmp_path / "run"
  work.mkdir()
  with open(work / ".lock", "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    t0 = time.time()
    outs = finish(launch(["--workdir", str(work)]), 120)
    elapsed = time.time() - t0
  assert [o[0] for o in outs] == [1, 1], outs
  assert "is in use by" in outs[0][2]
  assert "process 0 stopped" in outs[1][2] and "is in use by" in outs[1][2], outs[1][2][-2000:]
  assert elapsed < 90
  assert not (work / "checkpoints").exists()


def test_process_1_started_with_another_config_stops_both(tmp_path):
  """Processes started with different configs would compile different programs and hang in
  their first collective: process 1 refuses, and process 0 stops with process 1's message."""
  work = tmp_path / "run"
  t0 = time.time()
  outs = finish(launch(["--workdir", str(work)],
                       extra={1: ["--config.train.batch_size=4"]}), 120)
  assert [o[0] for o in outs] == [1, 1], outs
  message = "process 1 was started with another config than process 0: train.batch_size: 4"
  assert message in outs[1][2], outs[1][2][-2000:]
  assert "process 1 stopped" in outs[0][2] and message in outs[0][2], outs[0][2][-2000:]
  assert time.time() - t0 < 90
  assert not (work / "checkpoints").exists()


def test_fresh_moves_the_old_run_aside_once_for_all_processes(tmp_path, two_processes):
  work = tmp_path / "run"
  shutil.copytree(two_processes[0], work)
  out = run(["--workdir", str(work), "--fresh", "--config.train.stop_after_steps=2"])
  assert "Moved the previous run" in out[0][1]
  old = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
  assert len(old) == 1 and (old[0] / "checkpoints" / "12").is_dir()
  assert json.loads((work / "summary.json").read_text())["steps"] == 2


def test_a_missing_process_is_a_clear_error_at_the_timeout(tmp_path):
  """--num_processes=3 with 2 started: both stop with one line at --distributed_timeout,
  instead of JAX's abort."""
  t0 = time.time()
  outs = finish(launch(["--workdir", str(tmp_path / "run"), "--distributed_timeout=8"],
                       extra={0: ["--num_processes=3"], 1: ["--num_processes=3"]}), 120)
  assert [o[0] for o in outs] == [1, 1], outs
  for _, _, err in outs:
    assert "did not all join localhost:" in err and "within 8 s" in err, err[-2000:]
  assert time.time() - t0 < 60
  assert not (tmp_path / "run").exists()


def test_evaluate_refuses_processes_with_other_flags(two_processes, tmp_path):
  port = free_port()
  base = [sys.executable, str(ROOT / "evaluate.py"), "--ckpt", str(two_processes[0]),
          f"--coordinator_address=localhost:{port}", "--num_processes=2",
          f"--out={tmp_path / 'e.json'}"]
  procs = [subprocess.Popen(base + [f"--process_id={i}"] + (["--split=test"] if i else []),
                            env=env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT) for i in range(2)]
  outs = finish(procs, 120)
  assert [o[0] for o in outs] == [1, 1], outs
  assert "split: 'test' here, 'validation' on process 0" in outs[1][2], outs[1][2][-2000:]
  assert "process 1 stopped" in outs[0][2], outs[0][2][-2000:]
  assert not (tmp_path / "e.json").exists()


def test_unreachable_coordinator_is_a_clear_error_in_bounded_time(tmp_path):
  port = free_port()  # nobody listens there
  t0 = time.time()
  out = subprocess.run(TRAIN + ["--workdir", str(tmp_path / "run"),
                                f"--coordinator_address=localhost:{port}", "--num_processes=2",
                                "--process_id=1", "--distributed_timeout=5"],
                       env=env(2), capture_output=True, text=True, timeout=120, cwd=ROOT)
  assert out.returncode == 1, out.stderr[-2000:]
  assert f"cannot reach the coordinator at localhost:{port} within 5 s" in out.stderr
  assert "Traceback" not in out.stderr
  assert time.time() - t0 < 60
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags,message", [
    (["--coordinator_address=localhost:1234", "--num_processes=2"], "missing --process_id"),
    (["--coordinator_address=localhost:1234", "--num_processes=2", "--process_id=2"],
     "must be in 0..1"),
    (["--coordinator_address=nohostport", "--num_processes=2", "--process_id=0"],
     "is not HOST:PORT"),
    (["--coordinator_address=localhost:1234", "--num_processes=0", "--process_id=0"],
     "--num_processes=0 must be at least 1"),
])
def test_bad_distributed_flags_are_refused(tmp_path, flags, message):
  out = subprocess.run(TRAIN + ["--workdir", str(tmp_path / "run")] + flags, env=env(1),
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
  assert out.returncode == 1 and message in out.stderr, out.stderr[-2000:]


def _no_crash(err: str) -> None:
  """An error that stops every process is one line each: no abort of JAX's coordination
  client (exit 134, a crash dump) in the process that outlived the service's host."""
  for sign in ("Fatal Python error", "Terminating process", "Check failure", "Traceback"):
    assert sign not in err, err[-3000:]


def test_processes_that_differ_in_devices_or_process_count_stop_with_one_line(tmp_path):
  """The global mesh is processes x local devices: a process with another device count (a
  reshape error in the first collective, and an abort, before) or another --num_processes
  (silently accepted before) is named by every process, each exiting 1 without a crash."""
  port = free_port()
  procs = [subprocess.Popen(TRAIN + ["--workdir", str(tmp_path / "a"),
                                     f"--coordinator_address=localhost:{port}",
                                     "--num_processes=2", f"--process_id={i}"],
                            env=env(2 - i), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT) for i in range(2)]
  outs = finish(procs, 120)
  assert [o[0] for o in outs] == [1, 1], outs
  for _, _, err in outs:
    assert "the processes differ in local devices: process 0: 2, process 1: 1" in err, err[-2000:]
    _no_crash(err)
  outs = finish(launch(["--workdir", str(tmp_path / "b")], extra={1: ["--num_processes=3"]}), 120)
  assert [o[0] for o in outs] == [1, 1], outs
  for _, _, err in outs:
    assert "differ in --num_processes: process 0: 2, process 1: 3" in err, err[-2000:]
    _no_crash(err)
  assert not (tmp_path / "a" / "checkpoints").exists()
  assert not (tmp_path / "b" / "checkpoints").exists()


def test_an_error_every_process_raises_ends_each_with_its_line_alone(tmp_path):
  """A config refused on every process (num_devices=1 in a 2-process run): each exits 1 with
  the message; process 0, which hosts the coordination service, leaves last, so the other is
  not aborted by the service's end (exit 134 before)."""
  outs = finish(launch(["--workdir", str(tmp_path / "run"), "--config.train.num_devices=1"]), 120)
  assert [o[0] for o in outs] == [1, 1], outs
  for _, _, err in outs:
    assert "train.num_devices=1: a multi-process run uses all 4 devices" in err, err[-2000:]
    assert len([l for l in err.splitlines() if l.startswith("error:")]) == 1, err[-2000:]
    _no_crash(err)
  assert not (tmp_path / "run").exists()  # nor a workdir holding only the lock


def test_a_port_in_use_and_a_signal_while_waiting_for_the_coordinator(tmp_path):
  """Process 0 on a port another program listens on: one line naming it (JAX's gRPC server
  then often segfaulted). Another process waiting for an absent coordinator, and a process 0
  waiting for the others to join, each exit at once on SIGTERM with one line saying so (the
  join printed the stop handler's line too, which promised a stop 'before training starts'),
  nothing made, and their process-id lock files removed (these exits skip atexit); evaluate.py
  waiting for its coordinator likewise."""
  with socket.socket() as blocker:
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(1)
    port = blocker.getsockname()[1]
    out = subprocess.run(TRAIN + ["--workdir", str(tmp_path / "run"),
                                  f"--coordinator_address=localhost:{port}",
                                  "--num_processes=2", "--process_id=0",
                                  "--distributed_timeout=20"],
                         env=env(2), capture_output=True, text=True, timeout=120, cwd=ROOT)
  assert out.returncode == 1, out.stderr[-2000:]
  assert f"cannot listen on localhost:{port}: port {port} is in use" in out.stderr
  _no_crash(out.stderr)
  for process, said in ((1, "SIGTERM received while waiting for the coordinator: exiting"),
                        (0, "SIGTERM received while the processes were joining: exiting")):
    port = free_port()
    claim = pathlib.Path(f"/tmp/infinito_jax-{os.getuid()}/local_{port}.process{process}.lock")
    p = subprocess.Popen(TRAIN + ["--workdir", str(tmp_path / "run"),
                                  f"--coordinator_address=localhost:{port}",
                                  "--num_processes=2", f"--process_id={process}"],
                         env=env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         cwd=ROOT)
    deadline = time.time() + 60
    while not claim.exists() and p.poll() is None and time.time() < deadline:
      time.sleep(0.1)
    assert claim.exists(), p.communicate(timeout=60)
    time.sleep(1)  # in the wait (process 1) or the join (process 0)
    p.send_signal(signal.SIGTERM)
    t0 = time.time()
    _, err = p.communicate(timeout=60)
    assert p.returncode == 0 and time.time() - t0 < 10, err[-2000:]
    assert said in err, err[-2000:]
    assert [l for l in err.splitlines() if "received" in l] == [l for l in err.splitlines()
                                                                if said in l], err[-2000:]
    assert not (tmp_path / "run").exists()
    assert not claim.exists()
  # evaluate.py's handler ends it with os._exit as well: its claim goes too
  port = free_port()
  claim = pathlib.Path(f"/tmp/infinito_jax-{os.getuid()}/local_{port}.process1.lock")
  p = subprocess.Popen([sys.executable, str(ROOT / "evaluate.py"), "--ckpt", str(tmp_path / "x"),
                        f"--coordinator_address=localhost:{port}", "--num_processes=2",
                        "--process_id=1"], env=env(2), stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True, cwd=ROOT)
  deadline = time.time() + 60
  while not claim.exists() and p.poll() is None and time.time() < deadline:
    time.sleep(0.1)
  assert claim.exists(), p.communicate(timeout=60)
  p.send_signal(signal.SIGTERM)
  _, err = p.communicate(timeout=60)
  assert p.returncode == 128 + signal.SIGTERM, err[-2000:]
  assert "SIGTERM received: evaluation stopped, nothing written." in err, err[-2000:]
  assert not claim.exists()


def test_a_second_signal_to_one_process_leaves_the_summary_aborted(tmp_path):
  """Two SIGTERMs to process 1 abort it at once (exit 130) and stop process 0 with its message
  and its exit code (130, as for a one-process abort: it was 1, a failure to a scheduler);
  summary.json, process 0's, then says `aborted` as in a one-process run (it kept saying
  `running`), and the checkpoints stay readable."""
  import threading  # pylint: disable=import-outside-toplevel
  work = tmp_path / "run"
  # stops agreed on only at epoch ends (log_every past them): a window for the second signal
  procs = launch(["--workdir", str(work), "--config.train.epochs=50",
                  "--config.train.log_every=1000"])
  lines = []  # process 1's stderr, read as it comes
  reader = threading.Thread(target=lambda: lines.extend(iter(procs[1].stderr.readline, "")),
                            daemon=True)
  reader.start()
  summary = work / "summary.json"
  deadline = time.time() + 240
  while (not summary.exists() or json.loads(summary.read_text())["best_step"] is None) and (
      time.time() < deadline and procs[0].poll() is None):
    time.sleep(0.5)  # 'running' from the first step; the first validation names a best step
  assert json.loads(summary.read_text())["status"] == "running"
  procs[1].send_signal(signal.SIGTERM)
  deadline = time.time() + 60  # two signals before Python's handler runs would count as one
  while not any("SIGTERM received" in l for l in lines) and time.time() < deadline:
    time.sleep(0.01)
  procs[1].send_signal(signal.SIGTERM)
  procs[1].wait(120)
  reader.join(10)
  outs = finish(procs[:1], 120) + [(procs[1].returncode, "", "".join(lines))]
  assert outs[1][0] == 130 and outs[0][0] == 130, outs
  after = outs[1][2].split("Aborted by a second signal", 1)[-1]  # nothing said after the abort
  assert "Aborted by a second signal" in outs[1][2] and "received" not in after, outs[1][2][-2000:]
  assert "aborted by a second stop signal" in outs[0][2], outs[0][2][-2000:]
  assert json.loads(summary.read_text())["status"] == "aborted"
  from infinito_jax.checkpoint import Checkpointer  # pylint: disable=import-outside-toplevel
  assert Checkpointer(str(work), read_only=True).steps()


def test_a_second_process_with_a_taken_process_id_is_refused_and_the_run_goes_on(tmp_path):
  """A process started on the same host with the --process_id of a running process of the same
  run (the same --coordinator_address) made JAX's coordination service take it for that process
  restarted and abort every process, the running ones included (exit 134, a C++ stack trace).
  Now it is refused in one line naming the pid that holds the id, for process 1 and process 0
  alike, before it reaches the coordinator, also where it spells the coordinator's host another
  way (127.0.0.1 for localhost) or has another $TMPDIR; the running pair trains on, stops on
  SIGTERM and saves as usual, and removes its claims' lock files as it exits."""
  work = tmp_path / "run"
  procs = launch(["--workdir", str(work), "--config.train.epochs=50"])
  address = next(a for a in procs[0].args if a.startswith("--coordinator_address="))
  _wait_for_train_record(work / "history.jsonl", procs)
  # process 1's duplicate names the coordinator another way and has another $TMPDIR
  other = {1: address.replace("localhost", "127.0.0.1"), 0: address}
  for taken in (1, 0):
    dup = subprocess.run(TRAIN + ["--workdir", str(tmp_path / f"dup{taken}"), other[taken],
                                  "--num_processes=2", f"--process_id={taken}"],
                         env=dict(env(2), TMPDIR=str(tmp_path)), capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert dup.returncode == 1, dup.stderr[-2000:]
    assert (f"--process_id={taken} is taken: process {taken} of the run at "
            f"{other[taken].split('=', 1)[1]} is already running on this host (pid "
            f"{procs[taken].pid})") in dup.stderr, dup.stderr[-2000:]
    _no_crash(dup.stderr)
    assert not (tmp_path / f"dup{taken}").exists()
  assert [p.poll() for p in procs] == [None, None]  # the pair lives on
  port = address.rsplit(":", 1)[1]
  claims = [pathlib.Path(f"/tmp/infinito_jax-{os.getuid()}/local_{port}.process{i}.lock")
            for i in (0, 1)]
  assert [c.read_text() for c in claims] == [str(p.pid) for p in procs]
  steps_before = train_records(work)[-1]["step"]
  _wait_for_train_record(work / "history.jsonl", procs, after_step=steps_before)
  procs[1].send_signal(signal.SIGTERM)
  outs = finish(procs, 120)
  assert [o[0] for o in outs] == [0, 0], outs
  assert json.loads((work / "summary.json").read_text())["status"] == "interrupted"
  assert not any(c.exists() for c in claims)  # no stale lock files pile up in /tmp


_JOINED_THEN_SIGTERM = r"""
import os, signal, sys, time
from infinito_jax import distributed, lifecycle
stop = lifecycle.StopSignals().install()
with stop.said_by_caller():
  distributed.initialize(f"localhost:{sys.argv[1]}", 1, 0, timeout_s=60)
  os.kill(os.getpid(), signal.SIGTERM)  # just after the start: before train.py's reinstall
  time.sleep(0.5)
print("requested:", stop.requested, flush=True)
"""


def test_a_sigterm_just_after_the_start_reaches_the_run(tmp_path):
  """JAX's preemption service installs a C++ SIGTERM handler at the end of
  jax.distributed.initialize; until train.py installed the run's handlers again, a SIGTERM
  (a scheduler's stop) went to it and was lost: the run trained on. The service is off now
  (nothing uses its sync points), so the signal is the run's, and said once."""
  out = subprocess.run([sys.executable, "-c", _JOINED_THEN_SIGTERM, str(free_port())],
                       env=env(1), capture_output=True, text=True, timeout=120, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "requested: SIGTERM" in out.stdout, (out.stdout, out.stderr[-2000:])
  assert out.stderr.count("SIGTERM received") == 1, out.stderr[-2000:]


_CLAIM = r"""
import sys
from infinito_jax import distributed
try:
  distributed.claim_process_id(sys.argv[1], 1, 2)
except distributed.DistributedError as e:
  print("refused:", e)
  sys.exit(1)
print("claimed:", open(sys.argv[2]).read())
"""


def test_a_link_or_a_folder_at_the_lock_path_does_not_switch_the_claim_off(tmp_path):
  """A symbolic link (dangling or not), a FIFO, a socket or a directory where a --process_id
  claim's lock file goes made the claim give up silently (or fail with a traceback): a
  duplicate process then started, and JAX aborted the whole run. Now what is no regular file
  is removed (a link's target untouched) and the claim made; a directory is refused in one
  line naming it and the fix; an exiting claimer removes its file."""
  port = free_port()
  path = pathlib.Path(f"/tmp/infinito_jax-{os.getuid()}/local_{port}.process1.lock")
  path.parent.mkdir(mode=0o700, exist_ok=True)
  target = tmp_path / "target.txt"
  target.write_text("keep me")
  for link_to in (target, tmp_path / "missing"):
    path.symlink_to(link_to)
    out = subprocess.run([sys.executable, "-c", _CLAIM, f"localhost:{port}", str(path)],
                         env=env(1), capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0 and "claimed: " in out.stdout, out
    assert out.stdout.split("claimed: ")[1].strip().isdigit(), out.stdout  # its pid
    assert not path.exists() and not path.is_symlink()  # removed at its exit
    assert target.read_text() == "keep me" and not (tmp_path / "missing").exists()
  sock = socket.socket(socket.AF_UNIX)
  for make in (lambda: os.mkfifo(path), lambda: sock.bind(str(path))):
    make()
    out = subprocess.run([sys.executable, "-c", _CLAIM, f"localhost:{port}", str(path)],
                         env=env(1), capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.split("claimed: ")[1].strip().isdigit(), out
    assert not path.exists()
  sock.close()
  path.mkdir()
  try:
    out = subprocess.run([sys.executable, "-c", _CLAIM, f"localhost:{port}", str(path)],
                         env=env(1), capture_output=True, text=True, timeout=60, cwd=ROOT)
  finally:
    path.rmdir()
  assert out.returncode == 1, out
  assert (f"{path}, where its lock file goes, is a directory. Remove it (rm -r {path}) and "
          "start the process again.") in out.stdout, out.stdout


_HOLD = r"""
import sys, time
from infinito_jax import distributed
distributed.claim_process_id(sys.argv[1], 1, 2)
print("held", flush=True)
time.sleep(60)
"""


def test_every_local_spelling_of_the_coordinator_is_one_claim(tmp_path):
  """The claim keys on the coordinator's host: a duplicate --process_id that spelled this host
  another way (0.0.0.0, ::, an IPv4-mapped loopback, this host's own interface address) got its
  own lock file, reached JAX, and the running pair was aborted. Each is refused now; another
  host's address is another run."""
  port = free_port()
  holder = subprocess.Popen([sys.executable, "-c", _HOLD, f"localhost:{port}"], env=env(1),
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)
  try:
    assert holder.stdout.readline().strip() == "held"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # this host's outward address
      try:
        s.connect(("192.0.2.1", 9))
        outward = [s.getsockname()[0]]
      except OSError:
        outward = []
    for host in ["127.0.0.1", "0.0.0.0", "[::]", "[::ffff:127.0.0.1]", *outward]:
      out = subprocess.run([sys.executable, "-c", _CLAIM, f"{host}:{port}", "-"], env=env(1),
                           capture_output=True, text=True, timeout=60, cwd=ROOT)
      assert out.returncode == 1 and f"is taken: process 1 of the run at {host}:{port} is " \
          f"already running on this host (pid {holder.pid})" in out.stdout, (host, out)
    out = subprocess.run([sys.executable, "-c", _CLAIM, f"198.51.100.7:{port}", "/dev/null"],
                         env=env(1), capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0 and "claimed:" in out.stdout, out  # another host: not this run
  finally:
    holder.kill()
    holder.wait()


_SIGNAL_PROCESS_1_IN_START_UP = r"""
import os, runpy, signal, sys
train = sys.argv[1]
sys.argv = [train] + sys.argv[2:]
from infinito_jax import data as data_lib
real = data_lib.prepare

def prepare(*args, **kwargs):  # after the join, before the loop: process 1's start-up
  if "--process_id=1" in sys.argv:
    os.kill(os.getpid(), signal.SIGTERM)
  return real(*args, **kwargs)

data_lib.prepare = prepare
runpy.run_path(train, run_name="__main__")
"""


def test_a_signal_to_one_process_in_start_up_stops_both_before_anything_is_written(tmp_path):
  """SIGTERM to process 1 alone while the run starts (after the join): the processes agree on
  it before their first step and both stop with nothing written, as one process does: no
  workdir for a new run (they used to build the run, write its files and an 'interrupted'
  summary of a run that trained nothing)."""
  work = tmp_path / "run"
  port = free_port()
  procs = [subprocess.Popen(
      [sys.executable, "-c", _SIGNAL_PROCESS_1_IN_START_UP, TRAIN[1], *TRAIN[2:],
       "--workdir", str(work), f"--coordinator_address=localhost:{port}", "--num_processes=2",
       f"--process_id={i}"], env=env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True, cwd=ROOT) for i in range(2)]
  outs = finish(procs, 240)
  assert [o[0] for o in outs] == [0, 0], outs
  assert "Stopped by a signal to another process before training started: nothing was written." \
      in outs[0][1], outs[0]
  assert "SIGTERM received: stopping before training starts" in outs[1][2], outs[1]  # (its
  # stdout goes nowhere: a run's output is process 0's)
  for _, _, err in outs:
    _no_crash(err)
  assert not work.exists()
