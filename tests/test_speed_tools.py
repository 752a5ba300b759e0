"""Start-up and profiling tools of a run: the persistent compilation cache, the profiler window."""

import glob
import gzip
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import bench_module
from configs import tiny
from infinito_jax.train import train_and_evaluate

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _train(workdir, *extra):
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  # every program is cached, however fast it compiled: with the default threshold (0.5 s) a
  # program compiled just under it by one run and just over it by the next (a busy machine)
  # was cached by the second run alone, and the cache grew (CI saw it once)
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  return subprocess.run([sys.executable, "train.py", "--config", "configs/tiny.py", "--workdir",
                         str(workdir), "--config.train.epochs=1", "--config.log.plot=false",
                         *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_second_run_with_the_same_shapes_compiles_nothing_new(tmp_path):
  """train.py fills train.compilation_cache on its first run; a second run of the same shapes
  (another workdir) finds every executable there: the cache does not grow. An empty field
  turns the cache off."""
  cache = tmp_path / "cache"
  first = _train(tmp_path / "a", f"--config.train.compilation_cache={cache}",
                 "--config.model.hidden_dim=48")  # shapes no other test compiles
  assert first.returncode == 0, first.stderr[-3000:]
  entries = sorted(os.listdir(cache))
  assert len(entries) >= 2  # at least the train and eval steps
  second = _train(tmp_path / "b", f"--config.train.compilation_cache={cache}",
                  "--config.model.hidden_dim=48")
  assert second.returncode == 0, second.stderr[-3000:]
  assert sorted(os.listdir(cache)) == entries
  off = _train(tmp_path / "c", "--config.train.compilation_cache=",
               "--config.model.hidden_dim=48")
  assert off.returncode == 0 and sorted(os.listdir(cache)) == entries


def test_a_call_sets_the_compilation_cache_for_its_run_only(tmp_path, monkeypatch):
  """train_and_evaluate called twice in one process: the first call's train.compilation_cache
  takes the run's programs, and the second's '' turns the cache off (JAX opens its cache once
  per process: the folder of the first call kept taking programs); after each call JAX's
  settings and the warnings hook are as they were (the user's own cache folder included)."""
  import warnings
  import jax
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")  # else the environment decides
  before, hook = jax.config.jax_compilation_cache_dir, warnings.showwarning
  cache = tmp_path / "cache"
  c = tiny.get_config()
  c.train.epochs, c.train.stop_after_steps, c.model.hidden_dim = 1, 2, 36  # shapes of its own
  c.log.plot = c.log.tensorboard = False
  c.train.compilation_cache = str(cache)
  train_and_evaluate(c, str(tmp_path / "a"))
  entries = sorted(os.listdir(cache))
  assert len(entries) >= 2  # at least the train and eval steps
  assert jax.config.jax_compilation_cache_dir == before and warnings.showwarning is hook
  c.train.compilation_cache, c.model.hidden_dim = "", 44  # new programs, and the cache off
  train_and_evaluate(c, str(tmp_path / "b"))
  assert sorted(os.listdir(cache)) == entries
  assert jax.config.jax_compilation_cache_dir == before and warnings.showwarning is hook
  # JAX_COMPILATION_CACHE_DIR set after jax's import (a notebook's os.environ) wins over the
  # config, and takes the programs (JAX reads it at import only: the cache stayed off)
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "env"))
  c.train.compilation_cache, c.model.hidden_dim = str(cache), 52
  train_and_evaluate(c, str(tmp_path / "c"))
  assert sorted(os.listdir(cache)) == entries and len(os.listdir(tmp_path / "env")) >= 2
  assert jax.config.jax_compilation_cache_dir == before and warnings.showwarning is hook


@pytest.mark.slow
def test_a_damaged_cache_entry_is_removed_and_saved_again(tmp_path):
  """A cache entry cut short (a process killed while JAX wrote it: JAX writes in place and
  never replaces an entry) is removed by the next run, which says so in one note instead of
  JAX's warning, compiles that program and saves it again, whole."""
  from jax._src import compilation_cache  # pylint: disable=g-import-not-at-top
  cache = tmp_path / "cache"
  first = _train(tmp_path / "a", f"--config.train.compilation_cache={cache}",
                 "--config.model.hidden_dim=40")  # shapes no other test compiles
  assert first.returncode == 0, first.stderr[-3000:]
  entries = sorted(os.listdir(cache))
  damaged = next(cache / e for e in entries if e.startswith("jit_train_step-"))
  whole = damaged.read_bytes()
  damaged.write_bytes(whole[:len(whole) // 2])
  os.utime(damaged, (1e9, 1e9))  # long ago: not an entry another process is writing now
  second = _train(tmp_path / "b", f"--config.train.compilation_cache={cache}",
                  "--config.model.hidden_dim=40")
  assert second.returncode == 0, second.stderr[-3000:]
  assert f"note: removed 1 damaged compilation-cache entry ({damaged})" in second.stdout
  assert "Error reading persistent compilation cache" not in second.stderr, second.stderr[-2000:]
  assert sorted(os.listdir(cache)) == entries
  compilation_cache.decompress_executable(damaged.read_bytes())  # whole again


@pytest.mark.slow
def test_an_unusable_cache_folder_from_the_environment_is_one_warning(tmp_path):
  """JAX_COMPILATION_CACHE_DIR naming a file (or a folder under one) wins over the config, as
  documented, but gets the one-line warning of a bad train.compilation_cache and no cache,
  instead of JAX's warning with a traceback line at every compilation; the run completes."""
  blocker = tmp_path / "file"
  blocker.write_text("not a folder")
  for bad in (blocker, blocker / "sub"):
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(bad))
    out = subprocess.run([sys.executable, "train.py", "--config", "configs/tiny.py", "--workdir",
                          str(tmp_path / f"run_{bad.name}"), "--config.train.epochs=1",
                          "--config.log.plot=false"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"warning: no compilation cache ({bad}: a file is in the way)" in out.stdout
    assert "JAX_COMPILATION_CACHE_DIR to a writable folder" in out.stdout
    assert "persistent compilation cache" not in out.stderr and blocker.read_text() == \
        "not a folder"


def test_profile_steps_writes_a_trace_of_the_window(tmp_path):
  """train.profile_steps='2,4' writes a jax.profiler trace (xplane + Chrome trace JSON with
  events) into <workdir>/profile, and training goes on to the end."""
  c = tiny.get_config()
  c.train.epochs, c.train.stop_after_steps, c.train.profile_steps = 1, 6, "2,4"
  c.log.plot = False
  summary = train_and_evaluate(c, str(tmp_path / "run"))
  assert summary["steps"] == 6
  traces = glob.glob(str(tmp_path / "run" / "profile" / "plugins" / "profile" / "*" /
                         "*.trace.json.gz"))
  assert len(traces) == 1 and glob.glob(os.path.join(os.path.dirname(traces[0]), "*.xplane.pb"))
  events = json.loads(gzip.open(traces[0]).read())["traceEvents"]
  assert len(events) > 10


def test_profile_window_cut_by_the_run_says_which_steps_it_traced(tmp_path, capsys):
  """A window the run ends inside traces to the run's last step and says so; a run resumed
  inside a window traces from its first step (it used to trace nothing, silently); a window
  the run never reaches writes nothing and says so (it used to say nothing)."""
  def run(workdir, stop_after, window):
    c = tiny.get_config()
    c.train.epochs, c.train.stop_after_steps, c.train.profile_steps = 1, stop_after, window
    c.log.plot, c.log.tensorboard = False, False
    train_and_evaluate(c, str(workdir))
    return capsys.readouterr().out

  traces = lambda w: glob.glob(str(w / "profile" / "plugins" / "profile" / "*" / "*.xplane.pb"))
  out = run(tmp_path / "a", 3, "2,10")
  assert "Profile of steps 2..2 (train.profile_steps asked for 2..9; the run ended after " \
         "step 2)" in out and len(traces(tmp_path / "a")) == 1
  # said before training too (only a window wholly outside the run was)
  assert out.index("note: train.profile_steps=2,10 reaches outside the steps this run will "
                   "train (0..2): steps 2..2 will be traced.") < out.index("Profile of steps")
  out = run(tmp_path / "a", 6, "2,5")  # resumed at step 3, inside the window
  assert "Profile of steps 3..4 (train.profile_steps asked for 2..4; the run resumed at " \
         "step 3)" in out and len(traces(tmp_path / "a")) == 2
  assert "train (3..5): steps 3..4 will be traced." in out
  out = run(tmp_path / "b", 3, "100,200")
  assert "No profile: train.profile_steps=100,200 lies outside the steps this run trained " \
         "(0..2; 0-based" in out and not (tmp_path / "b" / "profile").exists()
  # ... and says it before training, where the run's last step is known
  before = out.index("note: train.profile_steps=100,200 lies outside the steps this run will "
                     "train (0..2)")
  assert before < out.index("No profile:")


def test_a_profile_that_cannot_be_written_costs_no_training(tmp_path, capsys):
  """A file where the profile folder goes is refused before anything is trained (it stopped a
  resumed run mid-way with a traceback, its steps unsaved); a trace that cannot be written
  anyway is a warning, not the run's end."""
  from infinito_jax import train as train_lib  # pylint: disable=g-import-not-at-top
  from infinito_jax.errors import WorkdirError  # pylint: disable=g-import-not-at-top
  c = tiny.get_config()
  c.train.epochs, c.train.stop_after_steps, c.train.profile_steps = 1, 3, "1,2"
  c.log.plot, c.log.tensorboard = False, False
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / "profile").write_text("mine")
  with pytest.raises(WorkdirError, match=r"profile is not a folder, where train.profile_steps"):
    train_and_evaluate(c, str(tmp_path / "run"))
  assert sorted(os.listdir(tmp_path / "run")) == ["profile"]  # as it was: nothing written
  assert (tmp_path / "run" / "profile").read_text() == "mine"
  profiler = train_lib.Profiler((1, 2), str(tmp_path / "run"))  # as if it appeared later
  profiler.before(1)
  profiler.after(2, None)  # the window's end: the trace is written, or fails to be
  assert "warning: the profile of steps 1..1 could not be written" in capsys.readouterr().out
  assert not profiler.active
  profiler.finish(None, 0, 3)
  assert "Profile of" not in capsys.readouterr().out


def test_bad_profile_window_is_refused():
  """A window that is not 'N,M' with N < M names the field."""
  from infinito_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from infinito_jax.errors import ConfigError  # pylint: disable=g-import-not-at-top
  for bad in ("4,2", "3", "a,b", "-1,2"):
    c = tiny.get_config()
    c.train.profile_steps = bad
    with pytest.raises(ConfigError, match="train.profile_steps"):
      config_lib.validate(c)


def test_rbg_keys_train_and_resume_bitwise(tmp_path):
  """train.rng_impl='rbg' draws other random numbers than threefry (other parameters after
  training), and a run stopped and resumed equals the uninterrupted run bitwise (the key is
  still explicit state: fold_in(key, step))."""
  from infinito_jax.evaluate import restore_run  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  def cfg(**train):
    c = tiny.get_config()
    c.train.epochs, c.train.rng_impl = 1, "rbg"
    c.log.plot = c.log.tensorboard = False
    for k, v in train.items():
      c.train[k] = v
    return c

  whole = train_and_evaluate(cfg(), str(tmp_path / "whole"))
  train_and_evaluate(cfg(stop_after_steps=13), str(tmp_path / "split"))
  split = train_and_evaluate(cfg(), str(tmp_path / "split"))
  assert split["best_val_loss"] == whole["best_val_loss"]
  a = restore_run(str(tmp_path / "whole"), step=30).params
  b = restore_run(str(tmp_path / "split"), step=30).params
  import jax  # pylint: disable=g-import-not-at-top
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  threefry = train_and_evaluate(cfg(rng_impl="threefry"), str(tmp_path / "threefry"))
  assert threefry["best_val_loss"] != whole["best_val_loss"]


_bench = bench_module


def test_step_speed_variants_parse_on_top_of_the_flags_and_refuse_unknown_keys():
  """bench/step_speed.py --variant NAME:k=v,...: typed values over the command's own flags."""
  step_speed = _bench("step_speed")
  base = dict(attention_dropout=None, rng_impl="threefry", scan_layers=False, remat=False,
              loss_chunk=0, attention_impl="auto")
  name, kw = step_speed.parse_variant("fast:attention_dropout=0,rng_impl=rbg,scan_layers=1", base)
  assert name == "fast" and kw == dict(base, attention_dropout=0.0, rng_impl="rbg",
                                       scan_layers=True)
  assert step_speed.parse_variant("exact:", base) == ("exact", base)
  with pytest.raises(step_speed.VariantError, match="'dropout=0' is not KEY=VALUE"):
    step_speed.parse_variant("x:dropout=0", base)
  for spec in ("exact", ":rng_impl=rbg"):  # no ':' (a name mistaken for settings), no name
    with pytest.raises(step_speed.VariantError, match="write NAME:KEY=VALUE"):
      step_speed.parse_variant(spec, base)
  # values that cannot work are refused when parsed, before any variant is built
  for spec, says in (("x:dropout_bits=7", "dropout_bits must be one of"),
                     ("x:dropout_bits=x", "dropout_bits='x' is not an integer"),
                     ("x:attention_dropout=2", r"attention_dropout must lie in \[0, 1\)"),
                     ("x:population=zip", "population must be one of"),
                     ("x:rng_impl=fast", "rng_impl must be one of")):
    with pytest.raises(step_speed.VariantError, match=says):
      step_speed.parse_variant(spec, base)
  assert step_speed.parse_variant("m:population=map", base)[1]["population"] == "map"
  assert step_speed.parse_variant("k:threefry_kernel=1", base)[1]["threefry_kernel"] is True
  with pytest.raises(step_speed.VariantError, match="threefry_kernel must be one of"):
    step_speed.parse_variant("k:threefry_kernel=2", base)


def test_copy_mib_counts_the_top_level_copies_of_an_optimised_program():
  """step_speed's copy_mib is the size of the whole-buffer copies in the ENTRY computation (what
  XLA inserted around loops and in-place updates), by dtype; copies inside fused computations
  (transposes) and other instructions are not counted."""
  step_speed = _bench("step_speed")
  hlo = """HloModule jit_step

%fused_computation (p: f32[1024,1024]) -> f32[1024,1024] {
  %p = f32[1024,1024]{1,0} parameter(0)
  ROOT %copy.9 = f32[1024,1024]{0,1} copy(%p)
}

ENTRY %main.1 (a: f32[6,32,256,512], b: bf16[1024,512]) -> f32[6,32,256,512] {
  %a = f32[6,32,256,512]{3,2,1,0} parameter(0)
  %copy.1 = f32[6,32,256,512]{3,2,1,0} copy(%wrapped_broadcast)
  %copy.2 = bf16[1024,512]{1,0} copy(%b)
  %copy.3 = pred[1048576]{0} copy(%c)
  %add.1 = f32[6,32,256,512]{3,2,1,0} add(%a, %copy.1)
}
"""
  want = (6 * 32 * 256 * 512 * 4 + 1024 * 512 * 2 + 1048576) / 2**20
  assert step_speed.copy_mib(hlo) == round(want, 1) == 98.0  # 96 + 1 + 1
  assert step_speed.copy_mib("HloModule m\n") == 0.0


def test_model_flops_count_every_layer_and_replica_whatever_form_the_program_takes():
  """The benchmarks' flops_per_step (and so MFU) is the model's: XLA's cost analysis counts a
  while loop's body once, so a step scanned over layers, with a chunked loss or with replicas
  mapped would report a fraction of its work. model_flops lowers the loop-free form instead:
  the same figure for every form of one model, N replicas N times one's (to the shared parts of
  the update), and more than XLA's own count of the scanned program."""
  import jax  # pylint: disable=import-outside-toplevel
  step_speed = _bench("step_speed")
  b, t = step_speed.PRESETS["tiny"][4:]

  def flops(replicas=1, **kw):
    config = step_speed.make_config("tiny", False, replicas, **kw)
    batch = {k: np.zeros((replicas, b, t), np.int32) for k in ("inputs", "targets")}
    return step_speed.model_flops(config, batch, {k: v[0] for k, v in batch.items()})

  plain = flops()
  assert all(f and f > 0 for f in plain)
  assert flops(scan_layers=True) == plain
  assert flops(loss_chunk=8, remat=True) == plain
  # a fused kernel (a custom call, uncounted by XLA) is counted as XLA's attention: the same
  assert flops(attention_dropout=0.0, attention_impl="cudnn") == flops(attention_dropout=0.0)
  with step_speed.single_replica("auto", "map"):
    assert flops(replicas=3) == flops(replicas=3, scan_layers=True)
  three = flops(replicas=3)
  np.testing.assert_allclose(np.divide(three, plain), 3.0, rtol=0.02)
  # what the benchmark avoids: XLA's count of the scanned step misses layers
  config = step_speed.make_config("tiny", False, scan_layers=True)
  trainer = step_speed.Trainer(config, step_speed.model_config(config.model), 1000)
  shaped = {k: jax.ShapeDtypeStruct((1, b, t), np.int32) for k in ("inputs", "targets")}
  assert step_speed._cost(trainer.train_step.lower(trainer.abstract_state(), shaped)) < (
      0.9 * plain[0])


def test_interleaved_times_calls_every_step_once_per_round_in_turn():
  """bench/step_speed.py --interleave: one warm-up call of each step, then --steps rounds in
  which each is called once in the same order, one median per step (a slow spell of the
  machine falls on every variant alike)."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  step_speed = _bench("step_speed")
  calls = []
  fns = [lambda i=i: calls.append(i) or jnp.zeros(()) for i in range(3)]
  med = step_speed.interleaved_times(fns, 4)
  assert calls == [0, 1, 2] * 5
  assert len(med) == 3 and all(m >= 0 for m in med)


@pytest.mark.slow
def test_step_speed_interleave_prints_a_row_per_variant_and_step_and_the_peer_ratios():
  """`step_speed.py --interleave` with two variants prints their train and eval rows, each
  with its own dropout_bits and timing 'interleaved'; with torch installed and
  --peer_in_process the peer's step joins the turns (a CPU) and one ratio per variant follows."""
  have_torch = subprocess.run([sys.executable, "-c", "import torch"]).returncode == 0
  peer = pathlib.Path(ROOT).parent / "shared" / "bench" / "torch_peer.py"
  extra = ["--peer", str(peer), "--peer_in_process"] if have_torch and peer.exists() else []
  out = subprocess.run([sys.executable, "bench/step_speed.py", "--preset", "tiny", "--steps", "2",
                        "--interleave", "--variant", "a:", "--variant", "b:dropout_bits=16",
                        *extra], cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
  ours = [(r["variant"], r["step"], r["dropout_bits"], r["timing"]) for r in rows if "step" in r]
  assert ours == [("a", "train", 32, "interleaved"), ("a", "eval", 32, "interleaved"),
                  ("b", "train", 16, "interleaved"), ("b", "eval", 16, "interleaved")]
  assert all(r["ms_per_step"] > 0 for r in rows if "step" in r)
  if extra:
    peers = [r for r in rows if r.get("peer") == "pytorch-v52"]
    ratios = [r for r in rows if "speedup_tokens_per_s" in r]
    assert [p["timing"] for p in peers] == ["interleaved"] and peers[0]["step_s_median"] > 0
    assert [r["variant"] for r in ratios] == ["a", "b"]
    for r in ratios:
      train = next(x for x in rows if x.get("variant") == r["variant"] and x.get("step") == "train")
      assert r["speedup_tokens_per_s"] == round(train["tokens_per_s"] / peers[0]["tokens_per_s"], 2)


def test_step_speed_no_eval_times_the_train_step_alone_and_peer_modes_are_checked(tmp_path):
  """`--no_eval` builds and prints the train step only (sequential and interleaved timing);
  `--peer_modes` names modes of the platform's peer, and an unknown one is refused with the
  list before anything is built."""
  for timing in ([], ["--interleave"]):
    out = subprocess.run([sys.executable, "bench/step_speed.py", "--preset", "tiny", "--steps",
                          "1", "--no_eval", "--variant", "a:", "--variant", "b:dropout_bits=16",
                          *timing], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [(r["variant"], r["step"]) for r in rows] == [("a", "train"), ("b", "train")]
    assert all(r["ms_per_step"] > 0 and r["flops_per_step"] > 0 for r in rows)
  peer = tmp_path / "peer.py"
  peer.write_text("")  # a file is all the refusal needs: nothing runs
  bad = subprocess.run([sys.executable, "bench/step_speed.py", "--preset", "tiny", "--peer",
                        str(peer), "--peer_modes", "eager fp32", "bf16+compile"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
  assert bad.returncode == 2 and not bad.stdout
  assert "--peer_modes ['bf16+compile']" in bad.stderr and "'eager fp32'" in bad.stderr
  bad = subprocess.run([sys.executable, "bench/step_speed.py", "--preset", "tiny", "--peer_modes",
                        "eager fp32"], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert bad.returncode == 2 and "give --peer too" in bad.stderr


@pytest.mark.slow
def test_population_bench_prints_each_build_then_rows_and_speedups_per_variant():
  """`population.py` with two variants and N = 1, 2: a 'built' line per program as it is made
  (a run cut short still says how far it got), a train row per variant and N with that
  variant's settings, and per variant the speed-ups tokens/s(N) / tokens/s(1) of its own rows.
  A variant that names a population form is refused before anything is built."""
  cmd = [sys.executable, "bench/population.py", "--preset", "tiny", "--replicas", "1", "2",
         "--steps", "1", "--no_eval", "--forms", "vmap"]
  out = subprocess.run(cmd + ["--variant", "a:", "--variant", "b:dropout_bits=16"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
  assert [(r["built"], r["replicas"], r["population_form"]) for r in rows if "built" in r] == [
      ("a", 1, "auto"), ("a", 2, "vmap"), ("b", 1, "auto"), ("b", 2, "vmap")]
  timed = [r for r in rows if "tokens_per_s" in r]
  assert [(r["variant"], r["replicas"], r["dropout_bits"], r["step"]) for r in timed] == [
      ("a", 1, 32, "train"), ("a", 2, 32, "train"), ("b", 1, 16, "train"), ("b", 2, 16, "train")]
  speedups = [r for r in rows if "speedup_vs_1" in r]
  assert [r["variant"] for r in speedups] == ["a", "b"]
  for r, (one, two) in zip(speedups, (timed[:2], timed[2:])):
    assert r["speedup_vs_1"] == {"1/single": 1.0, "2/vmap": round(two["tokens_per_s"] /
                                                                  one["tokens_per_s"], 2)}
  bad = subprocess.run(cmd + ["--variant", "m:population=map"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
  assert bad.returncode != 0 and "--forms" in bad.stderr and "built" not in bad.stdout


@pytest.mark.slow
def test_step_speed_alternate_runs_the_peer_between_rounds_of_ours(tmp_path):
  """`step_speed.py --alternate K`: K rounds, each timing our variants and then the peer in a
  subprocess (never both at once); our rows and the peer's are medians over the rounds, each
  round's figure is listed, and the ratio is theirs. The peer here is a script that logs its
  calls and reports a known step time, so the order and the medians can be checked exactly."""
  log = tmp_path / "calls.txt"
  peer = tmp_path / "peer.py"
  peer.write_text(
      "import json, sys\n"
      f"log = open({str(log)!r}, 'a')\n"
      "n = sum(1 for _ in open(log.name)) if log.tell() else 0\n"
      "log.write('peer\\n'); log.close()\n"
      "s = [0.5, 0.3, 0.4][n]\n"
      "print(json.dumps(dict(peer='pytorch-v52', preset='tiny', step_s_median=s, "
      "tokens_per_s=8 * 64 / s)))\n")
  out = subprocess.run([sys.executable, "bench/step_speed.py", "--preset", "tiny", "--steps", "2",
                        "--alternate", "3", "--peer", str(peer), "--variant", "a:",
                        "--variant", "b:dropout_bits=16"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
  ours = [r for r in rows if r.get("step") == "train"]
  assert [r["variant"] for r in ours] == ["a", "b"] and all(r["timing"] == "alternated"
                                                            for r in ours)
  for r in ours:
    assert len(r["rounds_ms"]) == 3
    assert r["ms_per_step"] == pytest.approx(float(np.median(r["rounds_ms"])), abs=0.1)
  assert log.read_text().split() == ["peer"] * 3  # once a round
  (peer_row,) = [r for r in rows if r.get("peer") == "pytorch-v52"]
  assert peer_row["rounds"] == [0.5, 0.3, 0.4] and peer_row["step_s_median"] == 0.4
  assert peer_row["tokens_per_s"] == pytest.approx(8 * 64 / 0.4, rel=1e-4)
  ratios = {r["variant"]: r["speedup_tokens_per_s"] for r in rows if "speedup_tokens_per_s" in r}
  assert ratios == {r["variant"]: round(r["tokens_per_s"] / peer_row["tokens_per_s"], 2)
                    for r in ours}
  bad = subprocess.run([sys.executable, "bench/step_speed.py", "--preset", "tiny", "--alternate",
                        "2"], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert bad.returncode == 2 and "--alternate K alternates" in bad.stderr


def test_kernel_profile_sums_device_streams_not_the_op_and_module_lines(tmp_path):
  """bench/kernel_profile.py counts a GPU trace's kernels on its stream threads only (the 'XLA
  Ops' line repeats the same time by HLO op and is reported apart), and a host-only trace's XLA
  thunks without Python frames."""
  kernel_profile = _bench("kernel_profile")
  meta = lambda ph, pid, tid, kind, name: {"ph": ph, "pid": pid, "tid": tid, "name": kind,
                                           "args": {"name": name}}
  x = lambda pid, tid, name, dur: {"ph": "X", "pid": pid, "tid": tid, "name": name, "dur": dur}
  gpu = [meta("M", 1, 0, "process_name", "/device:GPU:0"),
         meta("M", 2, 0, "process_name", "/host:CPU"),
         meta("M", 1, 7, "thread_name", "Stream #13(Compute)"),
         meta("M", 1, 8, "thread_name", "XLA Ops"),
         x(1, 7, "gemm", 30.0), x(1, 7, "gemm", 20.0), x(1, 7, "reduce", 5.0),
         x(1, 8, "dot.1", 50.0), x(2, 0, "$python frame", 1000.0)]
  path = tmp_path / "gpu.json.gz"
  with gzip.open(path, "wt") as f:
    json.dump({"traceEvents": gpu}, f)
  kernels, ops, where = kernel_profile.device_times(str(path))
  assert dict(kernels) == {"gemm": 50.0, "reduce": 5.0} and dict(ops) == {"dot.1": 50.0}
  assert where == "/device:GPU:0"
  host = [meta("M", 2, 0, "process_name", "/host:CPU"), x(2, 0, "$python frame", 1000.0),
          x(2, 0, "ynn_fusion.3", 40.0), x(2, 0, "ThunkExecutor::Execute", 90.0)]
  with gzip.open(path, "wt") as f:
    json.dump(host, f)
  kernels, ops, where = kernel_profile.device_times(str(path))
  assert dict(kernels) == {"ynn_fusion.3": 40.0} and not ops and where == "/host:CPU"


def test_kernel_ops_name_each_kernel_by_the_jax_op_of_its_fusion(tmp_path):
  """kernel_profile --by_op: kernels (named like their HLO instructions, '.' as '_') are summed
  by the op_name of that instruction, layer numbers folded; tuple-shaped fusions are found too;
  GEMM library kernels and unnamed kernels are kept apart, not dropped."""
  kernel_profile = _bench("kernel_profile")
  hlo = """
  %fusion.12 = f32[32,8,256,256]{3,2,1,0} fusion(%p0), kind=kLoop, calls=%c, metadata={op_name="jit(train_step)/jvp(InfinitoV52)/layers_3/attention/div" source_file="m.py"}
  %input_add_reduce_fusion = (f32[2048]{0}, f32[1,2048]{1,0}) fusion(%a, %b), kind=kInput, calls=%d, metadata={op_name="jit(train_step)/layers_0/ff_in/reduce_sum"}
  ROOT %loop_select_fusion.2 = f32[8]{0} fusion(%a), kind=kLoop, calls=%e, metadata={op_name="jit(train_step)/layers_5/attention/div"}
  %copy.3 = f32[8]{0} copy(%a)
"""
  (tmp_path / "module_1.jit_train_step.gpu_after_optimizations.txt").write_text(hlo)
  names = kernel_profile.kernel_ops(hlo)
  assert names == {"fusion_12": "jvp(InfinitoV52)/layers_*/attention/div",
                   "input_add_reduce_fusion": "layers_*/ff_in/reduce_sum",
                   "loop_select_fusion_2": "layers_*/attention/div"}
  ops = kernel_profile.by_op({"fusion_12": 3.0, "loop_select_fusion_2": 2.0,
                              "input_add_reduce_fusion": 4.0, "nvjet_sm90_tst_128": 7.0,
                              "copy_3": 1.0}, str(tmp_path))
  assert dict(ops) == {"jvp(InfinitoV52)/layers_*/attention/div": 3.0,
                       "layers_*/attention/div": 2.0, "layers_*/ff_in/reduce_sum": 4.0,
                       "gemm (library)": 7.0, "(no op) copy_3": 1.0}


@pytest.mark.slow
def test_kernel_profile_by_op_names_most_of_a_real_step(tmp_path):
  """A real --by_op run on the CPU: the HLO is dumped, and most of the step's time is named by
  a JAX op of the model (the parser keeps up with the installed XLA's dump format)."""
  out = subprocess.run([sys.executable, "bench/kernel_profile.py", "--preset", "tiny",
                        "--by_op", "--steps", "2", "--top", "1000", "--out", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  rows = [json.loads(l) for l in out.stdout.splitlines() if l.startswith("{")]
  ops = {r["op"]: r["ms_per_step"] for r in rows if "op" in r}
  named = sum(v for k, v in ops.items() if "InfinitoV52" in k)
  assert named > 0.3 * sum(ops.values()), sorted(ops.items(), key=lambda kv: -kv[1])[:10]
  assert any("layers_*/attention" in k for k in ops)
  assert rows[-1]["single_replica"] == "vmap"


def test_one_replica_compiled_with_or_without_vmap_is_the_same_step(monkeypatch):
  """INFINITO_SINGLE_REPLICA: a one-replica population's train and eval steps compiled on the
  replica alone ('plain', the GPU default; 'plain_inner', with the update on the replica alone
  too) compute what the size-1 vmap ('vmap', the CPU default) computes, to float rounding; an
  unknown form is refused by name. The 'plain' form's optimised program copies no more whole
  buffers than the vmap form's (with the update on the replica alone, XLA:CPU copied the
  parameters and both Adam moments every step)."""
  import jax
  import numpy as np
  from infinito_jax.errors import ConfigError
  from infinito_jax.model import model_config
  from infinito_jax.train import Trainer, single_replica_form

  step_speed = _bench("step_speed")
  results, programs, copied = {}, {}, {}
  for form in ("vmap", "plain", "plain_inner"):
    monkeypatch.setenv("INFINITO_SINGLE_REPLICA", form)
    assert single_replica_form() == form
    config = step_speed.make_config("tiny", False)
    trainer = Trainer(config, model_config(config.model), steps_per_epoch=100)
    rng = np.random.default_rng(0)
    batch = trainer.put({k: rng.integers(3, 1000, (1, 8, 64)).astype(np.int32)
                         for k in ("inputs", "targets")})
    state = trainer.new_state()
    programs[form] = str(jax.make_jaxpr(trainer.train_step)(state, batch))
    copied[form] = step_speed.copy_mib(trainer.train_step.lower(state, batch).compile().as_text())
    losses = []
    for _ in range(3):
      state, metrics = trainer.train_step(state, batch)
      losses.append(float(metrics["loss"][0]))
    scores = trainer.scorer.step(state.params, state.memory,
                                 jax.device_put({k: v[0] for k, v in batch.items()}))
    results[form] = (losses, jax.tree_util.tree_leaves(state.params),
                     jax.tree_util.tree_leaves(state.memory),
                     jax.tree_util.tree_leaves(scores))
  print("MiB copied whole per step:", copied)
  assert len(set(programs.values())) == 3  # each form really changes the compiled program
  assert copied["plain"] <= copied["vmap"] + 0.1, copied
  (l1, p1, m1, s1) = results["vmap"]
  for form in ("plain", "plain_inner"):
    (l2, p2, m2, s2) = results[form]
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    for a, b in zip(p1 + m1 + s1, p2 + m2 + s2):
      assert a.shape == b.shape
      np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                                 rtol=1e-4, atol=1e-5)
  assert l1[0] != l1[2]  # the steps trained: the comparison is not of a constant
  monkeypatch.setenv("INFINITO_SINGLE_REPLICA", "batched")
  with pytest.raises(ConfigError, match="INFINITO_SINGLE_REPLICA='batched'"):
    single_replica_form()


@pytest.fixture
def threefry_switch():
  """JAX's process-wide jax_threefry_gpu_kernel_lowering, as it was after the test."""
  import jax
  old = jax.config.jax_threefry_gpu_kernel_lowering
  yield
  jax.config.update("jax_threefry_gpu_kernel_lowering", old)


def _tiny_step(steps: int = 0):
  """A tiny Trainer's state and batch, after `steps` train steps."""
  from infinito_jax.model import model_config
  from infinito_jax.train import Trainer
  config = _bench("step_speed").make_config("tiny", False)
  trainer = Trainer(config, model_config(config.model), steps_per_epoch=100)
  rng = np.random.default_rng(0)
  batch = trainer.put({k: rng.integers(3, 1000, (1, 8, 64)).astype(np.int32)
                       for k in ("inputs", "targets")})
  state = trainer.new_state()
  for _ in range(steps):
    state, _ = trainer.train_step(state, batch)
  return trainer, state, batch


def test_threefry_kernel_makes_every_threefry_hash_of_the_cuda_train_step_a_kernel_call(
    threefry_switch):
  """train.threefry_kernel: the train step lowered for a GPU (jax.export lowers for CUDA
  without one) computes every threefry hash (dropout masks, exploration noise, key folds and
  splits) with JAX's CUDA kernel when on, and none when off (the hash inlined as XLA code,
  which XLA compiles anew in every fusion that draws bits)."""
  import re
  from jax import export
  from infinito_jax.train import use_threefry_kernel
  trainer, state, batch = _tiny_step()
  kernels, hashes = {}, {}
  for on in (False, True):
    assert use_threefry_kernel(on) is on
    text = export.export(trainer.train_step, platforms=["cuda"])(state, batch).mlir_module()
    kernels[on] = len(re.findall(r"custom_call @cu_threefry2x32_ffi", text))
    hashes[on] = len(re.findall(r"func\.func private @threefry2x32\w*", text))
  assert hashes[False] == hashes[True] >= 3  # the same hashes are drawn either way
  assert kernels == {False: 0, True: hashes[True]}


def test_threefry_kernel_is_set_by_the_run_and_the_environment_wins(tmp_path, monkeypatch,
                                                                   threefry_switch):
  """train.py and the study turn the switch on from train.threefry_kernel at the run's start,
  for the run only (the call puts it back: a notebook's next call is not this run); JAX's own
  JAX_THREEFRY_GPU_KERNEL_LOWERING, when set, decides instead (as for the cache)."""
  import jax
  from infinito_jax import train as train_lib
  from infinito_jax.train import use_threefry_kernel
  c = tiny.get_config()
  c.train.epochs, c.train.stop_after_steps, c.train.threefry_kernel = 1, 2, True
  c.log.plot = c.log.tensorboard = False
  jax.config.update("jax_threefry_gpu_kernel_lowering", False)
  seen, describe = [], train_lib.Run.describe

  def describe_and_look(self):  # the run's own start-up line, and the switch as it trains
    seen.append(jax.config.jax_threefry_gpu_kernel_lowering)
    return describe(self)

  monkeypatch.setattr(train_lib.Run, "describe", describe_and_look)
  assert train_and_evaluate(c, str(tmp_path / "run"))["steps"] == 2
  assert seen == [True] and jax.config.jax_threefry_gpu_kernel_lowering is False
  monkeypatch.setenv("JAX_THREEFRY_GPU_KERNEL_LOWERING", "1")
  jax.config.update("jax_threefry_gpu_kernel_lowering", True)  # as JAX reads it at its start
  assert use_threefry_kernel(False) is True
  from infinito_jax import config as config_lib
  from infinito_jax.errors import ConfigError
  d = c.to_dict()
  d["train"]["threefry_kernel"] = "yes"  # a config.json written by hand, say
  with pytest.raises(ConfigError, match="train.threefry_kernel.*true or false"):
    config_lib.validate(d)


@pytest.mark.skipif(not any(d.platform == "gpu" for d in __import__("jax").devices()),
                    reason="the CUDA kernel exists on a GPU only (bench/gpu_all.sh runs this)")
def test_threefry_kernel_draws_the_same_bits_on_a_gpu(threefry_switch):
  """On a GPU the kernel computes the hash the inlined code computes: three train steps give
  bitwise the same parameters, memory and losses with the switch on and off."""
  import jax
  from infinito_jax.train import use_threefry_kernel
  out = {}
  for on in (False, True):
    use_threefry_kernel(on)
    _, state, _ = _tiny_step(3)
    out[on] = [np.asarray(x) for x in jax.tree_util.tree_leaves((state.params, state.memory))]
  for a, b in zip(out[False], out[True]):
    np.testing.assert_array_equal(a, b)


def test_bench_scripts_refuse_settings_that_cannot_work_before_building(tmp_path):
  """Zero or negative counts, a variant whose run config train.py would refuse (a loss chunk
  that does not divide the preset's sequence length), and figures.py's missing WikiText files
  or --epochs 0 (once silently the default 3) are one parser error each (exit 2), no traceback
  and nothing built."""
  cases = [
      (["bench/step_speed.py", "--preset", "tiny", "--steps", "0"], "--steps must be a positive"),
      (["bench/step_speed.py", "--preset", "tiny", "--variant", "x:loss_chunk=7"],
       "--variant x on preset tiny: train.loss_chunk=7 must divide data.seq_len=64"),
      (["bench/population.py", "--preset", "tiny", "--variant", "x:loss_chunk=7"],
       "train.loss_chunk=7 must divide"),
      (["bench/kernel_profile.py", "--preset", "tiny", "--steps", "0"], "--steps and --top must"),
      # a variant's name or key that cannot work (once exit 1, or a name taken for no settings)
      (["bench/step_speed.py", "--preset", "tiny", "--variant", "x:nokey=1"],
       "'nokey=1' is not KEY=VALUE"),
      (["bench/step_speed.py", "--preset", "tiny", "--variant", "exact"], "write NAME:KEY=VALUE"),
      (["bench/step_speed.py", "--preset", "tiny", "--variant", "a:", "--variant", "a:remat=1"],
       "names ['a'] more than once"),
      (["bench/step_speed.py", "--preset", "tiny", "--variant", "a:remat=1,remat=0"],
       "sets remat twice"),
      # a config refusal names the fix in the benchmark's terms (a variant key or a flag, not
      # train.py's --config.* flag), and flags without --variant as the command's flags
      (["bench/step_speed.py", "--preset", "tiny", "--variant", "d:remat_policy=dots"],
       "--variant d on preset tiny: config.model.remat_policy='dots': says what a "
       "rematerialised layer keeps, but model.remat is off: add remat=1 in the --variant (or "
       "the flag --remat)"),
      (["bench/step_speed.py", "--preset", "tiny", "--remat_policy", "dots"],
       "the command's flags on preset tiny: config.model.remat_policy='dots'"),
      (["bench/population.py", "--preset", "tiny", "--variant", "x:rng_impl=fast"],
       "rng_impl must be one of"),
      (["bench/population.py", "--preset", "tiny", "--variant", "m:population=map"], "--forms"),
      (["bench/kernel_profile.py", "--preset", "tiny", "--variant", "fused"],
       "write NAME:KEY=VALUE"),
      (["bench/compile_time.py", "--preset", "tiny", "--repeats", "0"], "--repeats must be"),
      (["bench/figures.py", "wikitext", "--epochs", "0"], "--epochs must be a positive"),
      (["bench/figures.py", "wikitext", "--wikitext", str(tmp_path)],
       "needs WikiText-2's test.txt"),
  ]
  for args, says in cases:
    out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and says in out.stderr, (args, out.stderr[-1500:])
    assert "Traceback" not in out.stderr and "built" not in out.stdout, args


def test_optimizer_forms_apply_the_same_step_as_optax_leaf_by_leaf():
  """optim.apply_step: the 'norm' form (global norm over one vector of all gradients) and the
  'vectors' form (the whole update on concatenated vectors, large and small leaves mixed) give
  the parameters, Adam's moments and counts of optax's per-leaf transformation to float
  rounding over several steps (clipping active, a schedule, weight decay), with the same state
  structure; untrained parameters stay exactly as they were; the reported norm is the
  gradients' global norm; a transformation not made by make_optimizer runs leaf by leaf."""
  import jax
  import jax.numpy as jnp
  import optax
  from infinito_jax.model import InfinitoV52, ModelConfig
  from infinito_jax.optim import apply_step, cosine_schedule, make_optimizer, trained_mask

  cfg = ModelConfig(vocab_size=300, hidden_dim=32, num_layers=2, num_heads=4, memory_slots=8,
                    slot_size=8, max_len=64)
  params = InfinitoV52(cfg).init({"params": jax.random.key(0)},
                                 jnp.zeros((1, 16), jnp.int32))["params"]
  sizes = sorted(x.size for x in jax.tree_util.tree_leaves(params))
  assert sizes[0] < 1000 < sizes[-1]  # vectors of mixed sizes: embeddings and biases
  tx = make_optimizer(cosine_schedule(1e-2, 1e-4, 50, 3), cfg, params, weight_decay=0.1)
  mask = trained_mask(params, cfg)
  rng = np.random.default_rng(1)
  out = {}
  for form in ("leaves", "norm", "vectors"):
    p, s, norms = params, tx.init(params), []
    step = jax.jit(lambda g, s, p, form=form: apply_step(tx, form, g, s, p))
    for _ in range(5):
      g = jax.tree_util.tree_map(
          lambda x, t: jnp.asarray(rng.normal(size=x.shape) * 3 if t else np.zeros(x.shape),
                                   x.dtype), params, mask)
      p, s, n = step(g, s, p)
      norms.append((float(n), float(optax.tree.norm(g))))
    out[form] = (p, s)
    for got, want in norms:
      assert got == pytest.approx(want, rel=1e-6)
    assert norms[0][1] > 1.0  # the clip at 1.0 scaled these gradients
    rng = np.random.default_rng(1)  # the same gradients for the next form
  want = out["leaves"]
  for form in ("norm", "vectors"):
    assert jax.tree_util.tree_structure(out[form]) == jax.tree_util.tree_structure(want)
    for a, b in zip(jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(out[form])):
      assert a.shape == b.shape and a.dtype == b.dtype
      np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-6, atol=1e-7)
    untrained = [(x, y) for x, y, t in zip(jax.tree_util.tree_leaves(params),
                                           jax.tree_util.tree_leaves(out[form][0]),
                                           jax.tree_util.tree_leaves(mask)) if not t]
    assert untrained and all(np.array_equal(x, y) for x, y in untrained)
  moved = [not np.allclose(a, b) for a, b in zip(jax.tree_util.tree_leaves(params),
                                                 jax.tree_util.tree_leaves(want[0]))]
  assert sum(moved) > len(moved) // 2  # the steps changed the trained parameters
  plain = optax.adam(1e-3)
  p, s, n = apply_step(plain, "vectors", params, plain.init(params), params)
  u, _ = plain.update(params, plain.init(params), params)
  for a, b in zip(jax.tree_util.tree_leaves(p),
                  jax.tree_util.tree_leaves(optax.apply_updates(params, u))):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("replicas", [1, 2])
def test_train_step_in_each_optimizer_form_trains_the_same_run(monkeypatch, replicas):
  """INFINITO_OPTIMIZER_FORM: the Trainer's train step (one replica, and a population of two)
  with its update in each form is another program computing the same steps: losses,
  parameters, moments and memory equal to float rounding after 3 steps. 'auto' is 'leaves' on
  a CPU; an unknown form is refused by name."""
  import jax
  from infinito_jax.errors import ConfigError
  from infinito_jax.model import model_config
  from infinito_jax.train import Trainer, optimizer_form

  step_speed = _bench("step_speed")
  assert optimizer_form() == "leaves"  # this machine is a CPU
  results, programs = {}, {}
  for form in ("leaves", "norm", "vectors"):
    monkeypatch.setenv("INFINITO_OPTIMIZER_FORM", form)
    config = step_speed.make_config("tiny", False, replicas=replicas)
    trainer = Trainer(config, model_config(config.model), steps_per_epoch=100)
    rng = np.random.default_rng(0)
    batch = trainer.put({k: rng.integers(3, 1000, (replicas, 8, 64)).astype(np.int32)
                         for k in ("inputs", "targets")})
    state = trainer.new_state()
    programs[form] = str(jax.make_jaxpr(trainer.train_step)(state, batch))
    losses = []
    for _ in range(3):
      state, metrics = trainer.train_step(state, batch)
      losses.append(np.asarray(metrics["loss"]))
    results[form] = (np.stack(losses), np.asarray(metrics["grad_norm"]),
                     jax.tree_util.tree_leaves((state.params, state.opt_state, state.memory)))
  assert len(set(programs.values())) == 3
  l1, n1, s1 = results["leaves"]
  assert not np.allclose(l1[0], l1[2])  # it trained
  for form in ("norm", "vectors"):
    l2, n2, s2 = results[form]
    np.testing.assert_allclose(l2, l1, rtol=1e-6)
    np.testing.assert_allclose(n2, n1, rtol=1e-5)
    assert len(s1) == len(s2)
    for a, b in zip(s1, s2):
      np.testing.assert_allclose(np.asarray(b, np.float64), np.asarray(a, np.float64),
                                 rtol=1e-4, atol=1e-5)
  monkeypatch.setenv("INFINITO_OPTIMIZER_FORM", "fused")
  with pytest.raises(ConfigError, match="INFINITO_OPTIMIZER_FORM='fused'"):
    optimizer_form()
  # the benchmarks: a variant that names no form keeps the environment's; a bad one is refused
  with step_speed.single_replica("auto", "auto", "auto"):
    assert os.environ["INFINITO_OPTIMIZER_FORM"] == "fused"
  monkeypatch.setenv("INFINITO_OPTIMIZER_FORM", "vectors")
  with step_speed.single_replica("auto", "auto", "norm"):
    assert optimizer_form() == "norm"
  assert optimizer_form() == "vectors"
  monkeypatch.setenv("INFINITO_OPTIMIZER_FORM", "bogus")
  out = subprocess.run([sys.executable, "bench/step_speed.py", "--preset", "tiny", "--steps",
                        "1", "--no_eval"], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode == 2 and "INFINITO_OPTIMIZER_FORM='bogus'" in out.stderr


def test_gpu_aot_reads_xla_timers_counts_kernels_and_says_what_it_needs(tmp_path):
  """bench/gpu_aot.py (compiling for a GPU without one): its phases come from XLA's timer
  lines of the step's module, its kernel count from the optimised program's top level (here a
  CPU program with a loop), and without JAX's CUDA plugin it says to install it, once, exit 1."""
  import importlib.util
  import jax
  import jax.numpy as jnp
  gpu_aot = _bench("gpu_aot")
  log = "\n".join([
      "I1206 23:45:22.680873 2590 gpu_compiler.cc:2345] GpuCompiler::RunHloPasses for "
      "jit_one_step time: 18.7 s (18709395 us) (cumulative: 18.7 s, max: 18.7 s, #called: 1)",
      "I1206 23:45:20.1 2590 gpu_compiler.cc:2345] GpuCompiler::RunHloPasses for jit_convert "
      "time: 2.1 ms (2100 us) (cumulative: 18.7 s, max: 18.7 s, #called: 2)",
      "I1206 23:45:28.470763 2590 gpu_compiler.cc:3017] GpuCompiler::RunBackend for "
      "jit_one_step time: 5.79 s (5789877 us) (cumulative: 5.79 s, max: 5.79 s, #called: 1)",
      "I1206 hlo_pass_pipeline.cc:206] HLO pass: priority-fusion time: 4.63 s (4633887 us) "
      "(cumulative: 7.36 s, max: 4.63 s, #called: 448)",
      "I1206 hlo_pass_pipeline.cc:206] HLO pass: config-assigner time: 700 ms (700000 us) "
      "(cumulative: 8.0 s, max: 4.63 s, #called: 449)",
      "I1206 hlo_pass_pipeline.cc:206] HLO pass: config-assigner time: 9.7 s (9700000 us) "
      "(cumulative: 19.1 s, max: 9.7 s, #called: 450)",
      "I1206 hlo_pass_pipeline.cc:206] HLO pass: dce time: 16 us (16 us) (cumulative: 19.1 s, "
      "max: 9.7 s, #called: 451)"])
  times = gpu_aot.xla_times(log)
  assert times["hlo_passes_s"] == 18.7 and times["backend_s"] == 5.79
  assert list(times["slowest_passes_s"].items())[:2] == [("config-assigner", 10.4),
                                                        ("priority-fusion", 4.63)]

  def f(x):
    y = jax.lax.fori_loop(0, 3, lambda i, v: jnp.tanh(v * 1.5 + i), x)
    return jnp.sum(jnp.exp(y) * 2.0), y.T

  lowered = jax.jit(f).lower(jnp.ones((64, 128)))
  counts = gpu_aot.program_counts(lowered.compile().as_text())
  assert counts["while_loops"] == 1 and counts["kernels"] >= 1
  assert counts["kernels_per_step"] > counts["kernels"]  # the loop body's kernels counted too
  # a loop with a known trip count: its body's kernels that many times
  hlo = "\n".join([
      "%body.1 (p: (s32[], f32[8])) -> (s32[], f32[8]) {",
      "  %fusion.1 = f32[8]{0} fusion(%x), kind=kLoop, calls=%fused_add",
      "  %gemm = f32[8]{0} fusion(%x), kind=kCustom, calls=%gemm_fusion_dot.3",
      "}", "",
      "ENTRY %main.2 (a: f32[8]) -> f32[8] {",
      "  %fusion.2 = f32[8]{0} fusion(%a), kind=kLoop, calls=%fused_mul",
      '  %while.6 = (s32[], f32[8]{0}, /*index=2*/f32[8]{0}) while(%tuple.1), '
      'condition=%cond.1, body=%body.1, backend_config={"known_trip_count":{"n":"6"}}',
      '  %cc = (f32[8]{0}, s8[0]{0}) custom-call(%a), custom_call_target="__cudnn$fmha"',
      "}"])
  counts = gpu_aot.program_counts(hlo)
  assert counts == {"kernels": 2, "kernels_per_step": 2 + 6 * 2, "gemm_fusions_per_step": 6,
                    "custom_calls_per_step": {"__cudnn$fmha": 1}, "while_loops": 1}, counts
  assert gpu_aot.hlo_instructions(lowered.as_text(dialect="hlo")) > 5
  # memory traffic: a kernel reads its operands and writes its output, but a fusion that only
  # slices an operand reads the slice, one that updates a buffer in place writes the update
  hlo = "\n".join([
      "%fused_slice (p0: f32[6,256], p1: s32[]) -> f32[256] {",
      "  %p0 = f32[6,256]{1,0} parameter(0)",
      "  %p1 = s32[] parameter(1)",
      "  %ds = f32[1,256]{1,0} dynamic-slice(%p0, %p1, %z), dynamic_slice_sizes={1,256}",
      "  ROOT %e = f32[256]{0} exponential(%ds)",
      "}", "",
      "%fused_update (p0: f32[6,256], p1: f32[1,256], p2: s32[]) -> f32[6,256] {",
      "  %p0 = f32[6,256]{1,0} parameter(0)",
      "  %p1 = f32[1,256]{1,0} parameter(1)",
      "  %p2 = s32[] parameter(2)",
      "  ROOT %dus = f32[6,256]{1,0} dynamic-update-slice(%p0, %p1, %p2, %z)",
      "}", "",
      "%body.1 (p: (s32[], f32[6,256])) -> (s32[], f32[6,256]) {",
      "  %stack = f32[6,256]{1,0} get-tuple-element(%p), index=1",
      "  %i = s32[] get-tuple-element(%p), index=0",
      "  %row = f32[256]{0} fusion(%stack, %i), kind=kLoop, calls=%fused_slice",
      "  %upd = f32[1,256]{1,0} bitcast(%row)",
      "  %new = f32[6,256]{1,0} fusion(%stack, %upd, %i), kind=kLoop, calls=%fused_update",
      "}", "",
      "ENTRY %main.2 (a: f32[6,256]) -> f32[6,256] {",
      "  %a = f32[6,256]{1,0} parameter(0)",
      '  %c = f32[6,256]{1,0} copy(%a), metadata={op_name="jit(step)/vmap(jvp(M))/layer/copy"}',
      '  %while.6 = (s32[], f32[6,256]{1,0}) while(%tuple.1), condition=%cond.1, '
      'body=%body.1, backend_config={"known_trip_count":{"n":"6"}}',
      "}"])
  row, index = 256 * 4, 4
  # the copy reads and writes 6 rows; each of 6 trips: the slice fusion reads a row and the
  # index and writes a row, the update fusion reads the new row and the index and writes it
  # into the stack in place
  assert gpu_aot.program_traffic(hlo) == 2 * 6 * row + 6 * ((2 * row + index) + (2 * row + index))
  # kernel by kernel (--top): the same bytes, the largest first, named by their JAX op
  kernels = gpu_aot.kernel_traffic(hlo)
  assert sum(k["bytes"] for k in kernels) == gpu_aot.program_traffic(hlo) and len(kernels) == 3
  assert sorted((k["bytes"], k["kind"]) for k in kernels) == [
      (2 * 6 * row, "copy"), (6 * (2 * row + index), "kLoop"), (6 * (2 * row + index), "kLoop")]
  top = gpu_aot.top_kernels(hlo, 3)
  assert [t["kind"] for t in top] == ["kLoop", "kLoop", "copy"]  # the largest first
  assert top[2] == {"mib": 0.0, "kind": "copy", "shape": "f32[6,256]", "op": "layer/copy"}, top
  assert len(gpu_aot.top_kernels(hlo, 1)) == 1
  assert gpu_aot.shape_bytes("(bf16[2,3]{1,0}, pred[4])") == 16
  # a description XLA takes and then divides by zero with (SIGFPE): refused by the parser
  (tmp_path / "empty.txt").write_text("")
  out = subprocess.run([sys.executable, "bench/gpu_aot.py", "--target_config",
                        str(tmp_path / "empty.txt")], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 2 and "lacks gpu_device_info, a core_count above 0" in out.stderr
  if importlib.util.find_spec("jax_plugins") is not None:
    return  # a plugin is there (CUDA's, say): it would compile
  out = subprocess.run([sys.executable, "bench/gpu_aot.py", "--preset", "tiny"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 1
  rows = [json.loads(line) for line in out.stdout.splitlines()]
  assert len(rows) == 1 and 'pip install \"jax[cuda12]\"' in rows[0]["error"], out.stdout


PEER = pathlib.Path(ROOT).parent / "shared" / "bench" / "torch_peer.py"


def _step_speed(*args, timeout=600):
  return subprocess.run([sys.executable, "bench/step_speed.py", "--preset", "tiny", "--steps",
                         "1", "--no_eval", *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=timeout)


def test_step_speed_takes_the_peers_median_and_refuses_flags_that_cannot_work(tmp_path):
  """The median is the peer's (the upper middle value at an even count: np.median's mean of
  the two would favour us); a --peer that is no Python program, --peer_in_process without
  --interleave, and a preset the peer lacks are refused before anything is built (the last
  used to drop the peer with a JSON line and build the large step anyway)."""
  step_speed = _bench("step_speed")
  assert step_speed.median([4.0, 1.0, 3.0, 2.0]) == 3.0 and step_speed.median([2.0, 9.0, 1.0]) == 2.0
  for args, says in [
      (["--peer", str(ROOT / "README.md")], "is not a Python program"),
      (["--peer", str(ROOT / "train.py"), "--peer_in_process"], "needs --peer and --interleave"),
      (["--peer_in_process"], "needs --peer and --interleave"),
      (["--peer", str(ROOT / "train.py"), "--preset", "large"], "the peer has no preset large")]:
    out = _step_speed(*args, timeout=60)
    assert out.returncode == 2 and says in out.stderr, (args, out.stderr[-1500:])
    assert not out.stdout, out.stdout  # nothing was built or timed


@pytest.mark.slow
def test_step_speed_exits_1_when_a_peer_mode_fails(tmp_path):
  """A peer that fails leaves its 'failed' row and the command exits 1 (it exited 0: a script
  such as gpu_all.sh could not tell); our rows are printed all the same."""
  broken = tmp_path / "peer.py"
  broken.write_text("import sys\nsys.exit('the peer cannot start here')\n")
  out = _step_speed("--peer", str(broken), "--peer_modes", "eager fp32")
  assert out.returncode == 1, out.stderr[-1500:]
  rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
  assert [r["step"] for r in rows if "step" in r] == ["train"]
  assert rows[-1]["peer_mode"] == "eager fp32" and "cannot start here" in rows[-1]["failed"]
  assert "error: the peer failed in mode(s) eager fp32" in out.stderr


@pytest.mark.slow
def test_sigterm_to_step_speed_stops_the_peer_it_is_running(tmp_path):
  """SIGTERM (a scheduler's) while the PyTorch peer runs in its subprocess: step_speed ends on
  one line with exit code 143 and the peer ends with it (it ran on alone, under init)."""
  if not PEER.exists() or subprocess.run([sys.executable, "-c", "import torch"]).returncode:
    pytest.skip("needs ../shared/bench/torch_peer.py and torch")
  proc = subprocess.Popen([sys.executable, "bench/step_speed.py", "--preset", "tiny", "--steps",
                           "300", "--no_eval", "--peer", str(PEER), "--peer_modes", "eager fp32"],
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  peer_pid, deadline = None, time.time() + 240
  while peer_pid is None and time.time() < deadline and proc.poll() is None:
    time.sleep(0.2)
    ps = subprocess.run(["ps", "-o", "pid=,ppid=,args=", "-ax"], capture_output=True,
                        text=True).stdout
    peer_pid = next((int(line.split()[0]) for line in ps.splitlines()
                     if int(line.split()[1]) == proc.pid and "torch_peer.py" in line), None)
  assert peer_pid is not None, proc.communicate()[1][-1500:]
  time.sleep(1.0)  # the peer is importing torch or training
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=60)
  assert proc.returncode == 143, err[-1500:]
  assert err.strip().splitlines()[-1].startswith("Stopped by SIGTERM"), err[-1500:]
  assert "Traceback" not in err
  for _ in range(50):  # the peer is killed and reaped with it
    if not os.path.exists(f"/proc/{peer_pid}"):
      break
    time.sleep(0.1)
  assert not os.path.exists(f"/proc/{peer_pid}"), "the peer runs on"


def test_parity_report_help_is_usage_not_the_report():
  """`bench/parity_report.py --help` printed the whole report after 27 s of work."""
  out = subprocess.run([sys.executable, "bench/parity_report.py", "--help"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
  assert out.returncode == 0 and out.stdout.startswith("usage:") and "{" not in out.stdout
  out = subprocess.run([sys.executable, "bench/parity_report.py", "--bogus"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
  assert out.returncode == 2 and "unrecognized arguments: --bogus" in out.stderr


def test_the_freezing_optimizer_is_optax_adamw_where_live_and_keeps_its_state_where_not():
  """apply_step(live=...) (train.on_divergence='freeze'; make_optimizer's update.freezing):
  with live True, the same step as without it in each form (parameters, moments, counts:
  bitwise over 3 steps); with live False, Adam's moments and count come out exactly as they
  went in, whatever the gradient (NaN included), and the state keeps optax.adamw's structure
  either way. `live` is given the form's own gradient norm."""
  import jax
  import jax.numpy as jnp
  from infinito_jax.model import InfinitoV52, ModelConfig
  from infinito_jax.optim import apply_step, cosine_schedule, make_optimizer, trained_mask

  cfg = ModelConfig(vocab_size=300, hidden_dim=32, num_layers=2, num_heads=4, memory_slots=8,
                    slot_size=8, max_len=64)
  params = InfinitoV52(cfg).init({"params": jax.random.key(0)},
                                 jnp.zeros((1, 16), jnp.int32))["params"]
  tx = make_optimizer(cosine_schedule(1e-2, 1e-4, 50, 3), cfg, params, weight_decay=0.1)
  mask = trained_mask(params, cfg)
  rng = np.random.default_rng(1)
  grads = [jax.tree_util.tree_map(
      lambda x, t: jnp.asarray(rng.normal(size=x.shape) * 3 if t else np.zeros(x.shape),
                               x.dtype), params, mask) for _ in range(3)]
  for form in ("leaves", "norm", "vectors"):
    plain = jax.jit(lambda g, s, p, form=form: apply_step(tx, form, g, s, p))
    norms = []

    @jax.jit
    def where(g, s, p, live, form=form):
      def live_of(norm):
        norms.append(norm)
        return live

      return apply_step(tx, form, g, s, p, live=live_of)

    a = b = (params, tx.init(params))
    for g in grads:
      a, b = plain(g, a[1], a[0])[:2], where(g, b[1], b[0], jnp.asarray(True))[:2]
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert not np.array_equal(jax.tree_util.tree_leaves(a[0])[0],
                              jax.tree_util.tree_leaves(params)[0])  # it trained
    assert norms  # the freezing step asked for `live` with its norm
    state = a[1]
    for g in (grads[0], jax.tree_util.tree_map(lambda x: x * jnp.nan, grads[0])):
      _, kept, _ = where(g, state, a[0], jnp.asarray(False))
      adam_in, adam_out = state[1].inner_state[0], kept[1].inner_state[0]
      for x, y in zip(jax.tree_util.tree_leaves(adam_in), jax.tree_util.tree_leaves(adam_out)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
