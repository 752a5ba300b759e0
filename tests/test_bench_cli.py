"""How the benchmark tools under bench/ end on a mistake or a signal: one line and a known exit
code (bench/_cli.py), checked before anything is compiled, nothing left behind; and what
kernel_profile.py counts as a kernel and as busy time."""

import collections
import gzip
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import bench_module
from infinito_jax.train import OPTIMIZER_FORMS, SINGLE_REPLICA_FORMS

ROOT = pathlib.Path(__file__).resolve().parents[1]


_bench = bench_module


def _start(args, cwd=ROOT, **env):
  return subprocess.Popen([sys.executable, *map(str, args)], cwd=cwd, text=True,
                          env=dict(os.environ, PYTHONUNBUFFERED="1", **env),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _run_all(cases, cwd=ROOT):
  """Runs [(args, env)] at once; [(returncode, stdout, stderr)] in order."""
  procs = [_start(args, cwd, **env) for args, env in cases]
  out = []
  for p in procs:
    stdout, stderr = p.communicate(timeout=240)
    out.append((p.returncode, stdout, stderr))
  return out


def _last(stderr):
  lines = [l for l in stderr.splitlines() if l.strip()]
  return lines[-1] if lines else ""


def test_compile_time_refuses_a_bad_form_in_the_environment_before_compiling():
  """INFINITO_OPTIMIZER_FORM / INFINITO_SINGLE_REPLICA that name no form: the parser's one line
  (exit 2), as step_speed.py and population.py say it, not a ConfigError traceback."""
  results = _run_all([
      (["bench/compile_time.py", "--preset", "tiny", "--repeats", "1"],
       {"INFINITO_OPTIMIZER_FORM": "bogus"}),
      (["bench/compile_time.py", "--preset", "tiny", "--repeats", "1"],
       {"INFINITO_SINGLE_REPLICA": "bogus"})])
  expected = [f"compile_time.py: error: INFINITO_OPTIMIZER_FORM='bogus': use one of "
              f"{OPTIMIZER_FORMS} (or leave it unset).",
              f"compile_time.py: error: INFINITO_SINGLE_REPLICA='bogus': use one of "
              f"{SINGLE_REPLICA_FORMS} (or leave it unset)."]
  for (code, stdout, stderr), line in zip(results, expected):
    assert code == 2 and _last(stderr) == line, stderr[-2000:]
    assert "Traceback" not in stderr and not stdout


def test_a_population_too_big_for_the_host_is_one_error_line(tmp_path):
  """--replicas 100000: the Trainer's memory check is one `error:` line (exit 1), before any
  program is built, and kernel_profile.py leaves no temporary folder."""
  results = _run_all([
      (["bench/population.py", "--preset", "tiny", "--replicas", "1", "100000", "--steps", "1",
        "--no_eval"], {"TMPDIR": str(tmp_path)}),
      (["bench/kernel_profile.py", "--preset", "tiny", "--replicas", "100000", "--steps", "1"],
       {"TMPDIR": str(tmp_path)})])
  for code, stdout, stderr in results:
    lines = [l for l in stderr.splitlines() if l.strip()]
    assert code == 1 and len(lines) == 1, stderr[-2000:]
    assert lines[0].startswith("error: train.replicas=100000: the training state alone"), lines
    assert "built" not in stdout  # population.py: refused before the first build
  assert not list(tmp_path.glob("kernel_profile_*"))


def test_kernel_profile_checks_its_flags_up_front_and_leaves_no_folder(tmp_path):
  """An --out the trace cannot be written to (once a JaxRuntimeError after the compile), a
  refused config or environment form (once after an empty /tmp/kernel_profile_* was made) and
  a second --variant (once all but the last silently dropped): the parser's one line, exit 2."""
  a_file = tmp_path / "a_file"
  a_file.write_text("")
  tmp = tmp_path / "tmp"
  tmp.mkdir()
  base = ["bench/kernel_profile.py", "--preset", "tiny", "--steps", "1"]
  env = {"TMPDIR": str(tmp)}
  cases = [
      (base + ["--out", str(a_file)], env,
       f"--out {a_file}: is a file, not a folder (the trace is written into a folder)"),
      (base + ["--out", str(a_file / "sub")], env,
       f"--out {a_file / 'sub'}: {a_file} is a file, not a folder"),
      (base + ["--variant", "a:loss_chunk=7"], env,
       "--variant a on preset tiny: train.loss_chunk=7 must divide data.seq_len=64: choose a "
       "divisor of seq_len, or 0 (no chunks)."),
      (base, dict(env, INFINITO_POPULATION="zz"),
       "INFINITO_POPULATION='zz': use one of ('auto', 'vmap', 'map', 'map_stacked') (or leave "
       "it unset)."),
      (base + ["--variant", "a:", "--variant", "b:remat=1"], env,
       "--variant given 2 times ('a:', 'b:remat=1'): this profiles one setting; run it once per "
       "variant (bench/step_speed.py times several in turns)"),
  ]
  if os.path.isdir("/proc"):  # a folder even root cannot write in
    cases.append((base + ["--out", "/proc/nope"], env, "--out /proc/nope: cannot write in /proc"))
  results = _run_all([(args, e) for args, e, _ in cases])
  for (args, _, says), (code, stdout, stderr) in zip(cases, results):
    line = _last(stderr)
    assert code == 2 and line.startswith(f"kernel_profile.py: error: {says}"), (args, stderr)
    assert "Traceback" not in stderr and not stdout, args
  assert not list(tmp.iterdir())  # no temporary folder made
  assert not list(tmp_path.glob("**/.kernel_profile_check_*"))


def _trace(path, events):
  with gzip.open(path, "wt") as f:
    json.dump({"traceEvents": events}, f)
  return str(path)


def test_device_times_counts_each_host_kernel_once_and_busy_as_the_union_per_thread(tmp_path):
  """A CPU trace as XLA:CPU writes it: the Python thread's PjRt execute helper and its parts,
  the thunk executor, 'end:' markers and thread-pool events are no kernels; a while loop's
  event holds its body's kernels (here on its own thread and another) and is not counted
  again. Busy time: each thread's union of its kernels' intervals, summed. Before, busy came to
  more than the step's threads could run (tiny: 28.6 - 30.6 ms against 24 - 25 ms of wall)."""
  kernel_profile = _bench("kernel_profile")
  meta = lambda pid, tid, kind, name: {"ph": "M", "pid": pid, "tid": tid, "name": kind,
                                       "args": {"name": name}}

  def x(tid, name, ts, dur, op=True):
    e = {"ph": "X", "pid": 1, "tid": tid, "name": name, "ts": ts, "dur": dur}
    if op:
      e["args"] = {"hlo_op": name, "hlo_module": "jit_train_step"}
    elif not name.startswith("$") and "::" not in name:
      e["args"] = {"_src": "thunk_executor.cc"}
    return e

  events = [
      meta(1, 0, "process_name", "/host:CPU"), meta(1, 10, "thread_name", "python"),
      meta(1, 11, "thread_name", "tf_XLAEigen/1"), meta(1, 12, "thread_name", "tf_XLAEigen/2"),
      x(10, "$train_step", 0, 200, op=False),
      x(10, "PjitFunction(train_step)", 0, 190, op=False),
      x(10, "CommonPjRtLoadedExecutable::ExecuteHelperOnSingleDevice", 5, 180, op=False),
      x(10, "Handle inputs", 6, 10, op=False),
      x(10, "Wait for donation holds", 20, 1, op=False),
      x(11, "ThunkExecutor::Execute", 10, 150, op=False),
      x(11, "ThreadpoolListener::Record", 11, 1e-6, op=False),
      x(11, "while.4", 20, 100),  # its body: copy.1 and fusion.2 here, fusion.3 elsewhere
      x(11, "copy.1", 25, 10), x(11, "end: copy.1", 35, 0.5, op=False),
      x(11, "fusion.2", 40, 30), x(11, "end: fusion.2", 70, 0.5, op=False),
      x(12, "ThunkExecutor::Execute", 20, 60, op=False),
      x(12, "fusion.3", 30, 40),
      x(12, "fusion.3", 75, 5),
      x(11, "call.7", 130, 20), x(11, "ynn_fusion.5", 132, 15),  # a call and its body
  ]
  launches, busy = collections.Counter(), collections.Counter()
  kernels, ops, where = kernel_profile.device_times(_trace(tmp_path / "cpu.json.gz", events),
                                                    launches, busy)
  assert dict(kernels) == {"copy.1": 10.0, "fusion.2": 30.0, "fusion.3": 45.0,
                           "ynn_fusion.5": 15.0}
  assert dict(launches) == {"copy.1": 1, "fusion.2": 1, "fusion.3": 2, "ynn_fusion.5": 1}
  assert dict(busy) == {"/host:CPU/tf_XLAEigen/1": 55.0, "/host:CPU/tf_XLAEigen/2": 45.0}
  assert not ops and where == "/host:CPU"

  # an older XLA, whose op events carry no hlo_op: runtime events are told apart by name
  old = [{k: v for k, v in e.items() if k != "args"} if e["ph"] == "X" else e for e in events]
  kernels, _, _ = kernel_profile.device_times(_trace(tmp_path / "old.json.gz", old))
  assert dict(kernels) == {"copy.1": 10.0, "fusion.2": 30.0, "fusion.3": 45.0,
                           "ynn_fusion.5": 15.0}

  # a GPU trace: every event on a stream is a kernel, as before; busy is the streams' sum
  gpu = [meta(2, 0, "process_name", "/device:GPU:0"), meta(2, 7, "thread_name", "Stream #1"),
         meta(2, 8, "thread_name", "Stream #2"), meta(2, 9, "thread_name", "XLA Ops"),
         {"ph": "X", "pid": 2, "tid": 7, "name": "gemm", "ts": 0, "dur": 30.0},
         {"ph": "X", "pid": 2, "tid": 7, "name": "reduce", "ts": 40, "dur": 5.0},
         {"ph": "X", "pid": 2, "tid": 8, "name": "gemm", "ts": 10, "dur": 20.0},
         {"ph": "X", "pid": 2, "tid": 9, "name": "dot.1", "ts": 0, "dur": 50.0}]
  busy = collections.Counter()
  kernels, ops, where = kernel_profile.device_times(_trace(tmp_path / "gpu.json.gz", gpu),
                                                    None, busy)
  assert dict(kernels) == {"gemm": 50.0, "reduce": 5.0} and dict(ops) == {"dot.1": 50.0}
  assert dict(busy) == {"/device:GPU:0/Stream #1": 35.0, "/device:GPU:0/Stream #2": 20.0}
  assert where == "/device:GPU:0"


def test_kernel_profile_of_a_real_cpu_step_counts_leaf_ops_within_its_threads(tmp_path):
  """tiny on the CPU: no runtime event or loop counted as a kernel, the kernels' time within
  the busy time, and the busy time within what its threads could run in the wall time."""
  out = subprocess.run([sys.executable, "bench/kernel_profile.py", "--preset", "tiny",
                        "--steps", "2", "--top", "100000", "--out", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  rows = [json.loads(l) for l in out.stdout.splitlines() if l.startswith("{")]
  total, kernels = rows[-1], {r["kernel"]: r["ms_per_step"] for r in rows if "kernel" in r}
  assert total["counted"] == "/host:CPU" and total["kernels"] == len(kernels)
  # the attention dropout used (unset: the preset's dropout), as step_speed.py shows it
  assert total["attention_dropout"] == pytest.approx(0.1)
  bad = [k for k in kernels if "::" in k or "Execute" in k or k.startswith(("end: ", "$"))
         or re.match(r"(while|call|conditional)\b", k)]
  assert not bad, bad
  busy, wall = total["device_busy_ms_per_step"], total["wall_ms_per_step"]
  assert sum(kernels.values()) <= busy * 1.001 + 0.01
  assert 0 < busy <= wall * total["busy_threads"]


def test_figures_stopped_in_start_up_says_no_figure_and_exits_3(tmp_path):
  """SIGTERM once the run's folder exists but before training starts: the documented 'No
  figure' line and exit 3, as for a run stopped while it trains (once a StopRequested
  traceback, exit 1); nothing is left in the workdir."""
  p = _start(["bench/figures.py", "demo", "--workdir", tmp_path])
  deadline = time.time() + 120
  while not (tmp_path / "demo_embedded").exists() and p.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  p.send_signal(signal.SIGTERM)
  stdout, stderr = p.communicate(timeout=240)
  assert p.returncode == 3, stderr[-2000:]
  assert _last(stderr) == (
      f"No figure demo_embedded: stopped by SIGTERM before training started in "
      f"{tmp_path / 'demo_embedded'}, nothing written; run the same command with --workdir "
      f"{tmp_path} to make it."), stderr[-2000:]
  assert "Traceback" not in stderr and "FIGURE" not in stdout
  assert not (tmp_path / "demo_embedded").exists()


def test_ema_probe_overrides_parse_as_config_flags_into_existing_fields_only():
  """FIELD=VALUE as ml_collections parses a --config.FIELD flag: true/false or 1/0 for a
  boolean (once only 0/1), integers, numbers, strings; a field without a value takes a
  literal. A field that does not exist or a value not of its type: an OverrideError naming it."""
  ema_probe = _bench("ema_probe")
  from configs import wikitext2_recipe  # pylint: disable=import-outside-toplevel
  c = wikitext2_recipe.get_config()
  for item in ("data.random_offsets=false", "model.remat=1", "train.learning_rate=1",
               "train.epochs=7", "model.dtype=bfloat16", "data.corpus.seed=3", "seed=5",
               "log.plot=FALSE"):
    ema_probe.apply_override(c, item)
  assert c.data.random_offsets is False and c.model.remat is True and c.log.plot is False
  assert c.train.learning_rate == 1.0 and isinstance(c.train.learning_rate, float)
  assert c.train.epochs == 7 and c.model.dtype == "bfloat16" and c.data.corpus.seed == 3
  assert c.seed == 5
  for item, says in [
      ("bogus.key=1", "bogus.key: no such field: the config has ['checkpoint', 'data', 'log', "
                      "'model', 'seed', 'train']"),
      ("train.nope=1", "train.nope: no such field: train has ["),
      ("seed.x=1", "seed.x: no such field: the config has"),
      ("train=1", "train is a section, not a field"),
      ("train.epochs=abc", "train.epochs='abc': train.epochs takes an integer"),
      ("train.epochs=2.5", "train.epochs='2.5': train.epochs takes an integer"),
      ("train.learning_rate=fast", "train.learning_rate='fast': train.learning_rate takes a "
                                   "number"),
      ("data.random_offsets=yes", "data.random_offsets='yes': data.random_offsets takes true "
                                  "or false (or 1 or 0)"),
      ("train.epochs", "'train.epochs': write FIELD=VALUE")]:
    with pytest.raises(ema_probe.OverrideError) as e:
      ema_probe.apply_override(c, item)
    assert str(e.value).startswith(says), (item, str(e.value))


def test_ema_probe_refuses_what_cannot_work_in_one_line_before_building(tmp_path):
  """A field that does not exist (once a KeyError), a value not of its type (once a
  ValueError), a config train.py refuses, a decay outside [0, 1) (once accepted), a data file
  that is not there (once a DataError traceback): one parser line each, exit 2. The default
  data is beside the repository, whatever the current folder (once relative to it)."""
  wikitext = os.path.normpath(ROOT / ".." / "shared" / "data" / "wikitext-2")
  script = str(ROOT / "bench" / "ema_probe.py")
  missing = ("--valid /nope.txt: no such file (data.files.validation"
             if os.path.isfile(os.path.join(wikitext, "test.txt")) else
             f"--train {wikitext}/test.txt: no such file (data.files.train")
  cases = [
      (["bogus.key=1"], "bogus.key: no such field: the config has ['checkpoint', 'data', "
                        "'log', 'model', 'seed', 'train']"),
      (["train.epochs=abc"], "train.epochs='abc': train.epochs takes an integer"),
      (["data.random_offsets=maybe"], "data.random_offsets='maybe': data.random_offsets takes "
                                      "true or false (or 1 or 0)"),
      (["model.dropout=2"], "config.model.dropout=2.0: must lie in [0, 1)."),
      (["model.remat_policy=dots"], "config.model.remat_policy='dots': says what a "
                                    "rematerialised layer keeps, but model.remat is off: add "
                                    "model.remat=true"),
      (["--decay", "5"], "--decay must be in [0, 1) (the weight of the average so far), got 5.0"),
      (["--decay", "-0.1"], "--decay must be in [0, 1)"),
      (["--train", "/nope.txt"], "--train /nope.txt: no such file (data.files.train"),
      (["--valid", "/nope.txt", "data.random_offsets=true"], missing),
  ]
  results = _run_all([([script, *args], {}) for args, _ in cases], cwd=tmp_path)
  for (args, says), (code, stdout, stderr) in zip(cases, results):
    line = _last(stderr)
    assert code == 2 and line.startswith(f"ema_probe.py: error: {says}"), (args, stderr)
    assert "Traceback" not in stderr and not stdout, args


@pytest.mark.slow
def test_a_signal_while_step_speed_compiles_ends_on_its_line_not_a_crash():
  """SIGTERM while XLA compiles (before any row): the one line and exit 143. The interpreter's
  shutdown with XLA's threads still busy crashed after the line (exit 139, 6 times in 6)."""
  env = {k: v for k, v in os.environ.items()  # as users run it: buffered, XLA's defaults
         if k not in ("PYTHONUNBUFFERED", "XLA_FLAGS")}
  p = subprocess.Popen([sys.executable, "bench/step_speed.py", "--preset", "demo", "--steps", "3"],
                       cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  deadline = time.time() + 120
  while p.poll() is None and time.time() < deadline:  # until JAX is imported and at work
    if os.path.exists(f"/proc/{p.pid}/task") and len(os.listdir(f"/proc/{p.pid}/task")) > 10:
      break  # XLA's thread pools have started
    time.sleep(0.05)
  time.sleep(2.5)  # building and compiling the demo steps (its first row comes after ~20 s)
  p.send_signal(signal.SIGTERM)
  stdout, stderr = p.communicate(timeout=120)
  assert p.returncode == 143, (p.returncode, stderr[-1500:])
  assert _last(stderr).startswith("Stopped by SIGTERM") and "Traceback" not in stderr


def test_an_unusable_cache_folder_is_named_as_the_caller_sets_it(tmp_path, monkeypatch, capsys):
  """The warning for a compilation cache that cannot be used names the setting its user
  wrote: train.compilation_cache for a run, --compilation_cache for a benchmark."""
  import jax  # pylint: disable=import-outside-toplevel
  from infinito_jax.train import use_compilation_cache  # pylint: disable=import-outside-toplevel
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
  blocker = tmp_path / "file"
  blocker.write_text("x")
  suite_cache = jax.config.jax_compilation_cache_dir  # the call turns the cache off: put it back
  try:
    assert use_compilation_cache(str(blocker), setting="--compilation_cache") is None
    out = capsys.readouterr().out
    assert "a file is in the way); set --compilation_cache to a writable folder" in out, out
    assert use_compilation_cache(str(blocker)) is None
    assert "set train.compilation_cache to a writable folder" in capsys.readouterr().out
  finally:
    jax.config.update("jax_compilation_cache_dir", suite_cache)
