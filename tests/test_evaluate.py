"""Sampling: only words the tokenizer has, whatever the temperature; prompts and seeds that
cannot be sampled are refused before any scoring; a data file changed since training is named."""

import os
import shutil

import jax
import numpy as np
import pytest

from configs import tiny
from infinito_jax import data as data_lib
from infinito_jax import evaluate
from infinito_jax import sampling
from infinito_jax.errors import ConfigError
from infinito_jax.evaluate import generate
from infinito_jax.model import InfinitoV52, model_config
from infinito_jax.tokenizer import EOS, SPECIALS, WordTokenizer
from infinito_jax.train import train_and_evaluate


def test_sampling_never_returns_ids_without_a_word():
  """vocab_size 128 but 100 words: the 28 ids past them have logits yet no word to print."""
  config = tiny.get_config()
  mc = model_config(config.model)
  tokenizer = data_lib.prepare(config, mc, splits=("validation",)).tokenizer
  assert len(tokenizer) < mc.vocab_size
  model = InfinitoV52(mc)
  variables = model.init(jax.random.key(0), jax.numpy.zeros((1, 8), jax.numpy.int32))
  for seed in range(3):  # hot sampling from an untrained model hits every id often
    g = generate(model, variables, tokenizer, "the", num_tokens=60, seed=seed, temperature=5.0)
    words = g["continuation"].split()
    assert len(words) == 60 and set(words) <= set(tokenizer.words) - {SPECIALS[0]}


def test_a_temperature_sweep_compiles_the_sampler_once():
  """The temperature is an argument of the compiled sampler, not a constant of it: a notebook's
  sweep over temperatures compiles once, and each temperature still means what it says (a
  near-zero one draws the greedy text; hot and cool draws differ)."""
  config = tiny.get_config()
  mc = model_config(config.model)
  tokenizer = data_lib.prepare(config, mc, splits=("validation",)).tokenizer
  model = InfinitoV52(mc)
  variables = model.init(jax.random.key(0), jax.numpy.zeros((1, 8), jax.numpy.int32))
  texts = {t: generate(model, variables, tokenizer, "the", num_tokens=30, seed=1, temperature=t)
           ["continuation"] for t in (1e-6, 0.5, 1.0, 5.0)}
  compiled = sampling._sampler(mc, 31, len(tokenizer), False, 0)
  assert compiled._cache_size() == 1  # four temperatures, one program
  greedy = generate(model, variables, tokenizer, "the", num_tokens=30, temperature=0.0)
  assert texts[1e-6] == greedy["continuation"]
  assert len({texts[0.5], texts[1.0], texts[5.0]}) == 3
  for t in jax.numpy.asarray([0.5, 1.0]):  # a sweep over an array: 0-d arrays as numbers
    g = generate(model, variables, tokenizer, "the", num_tokens=jax.numpy.int32(30),
                 seed=np.int64(1), temperature=t, top_k=jax.numpy.asarray(0))
    assert g["continuation"] == texts[float(t)] and type(g["temperature"]) is float
  with pytest.raises(ConfigError, match="top_k must be an integer"):
    generate(model, variables, tokenizer, "the", num_tokens=3, top_k=jax.numpy.asarray(1.0))


@pytest.fixture(scope="module")
def file_run(tmp_path_factory):
  """A tiny run of one short epoch on local files (the embedded corpus's text written out),
  with an <eos> after each line."""
  root = tmp_path_factory.mktemp("file_run")
  config = tiny.get_config()
  texts, _ = data_lib.load_texts(config.data, config.seed)
  for split, name in (("train", "train.txt"), ("validation", "valid.txt")):
    (root / name).write_text("\n".join(texts[split][:60]) + "\n")
  config.data.source = "files"
  config.data.files.train, config.data.files.validation = str(root / "train.txt"), str(
      root / "valid.txt")
  config.data.add_eos = True
  config.train.epochs, config.train.stop_after_steps = 1, 6
  train_and_evaluate(config, str(root / "run"))
  return root, str(root / "run")


def test_a_prompt_is_continued_not_ended_with_eos(file_run):
  """With data.add_eos the training text ends each line with <eos>; a prompt is the start of a
  line, so its ids end with its last word, and the logged sample uses the same ids."""
  _, workdir = file_run
  restored = evaluate.restore_run(workdir)
  assert restored.tokenizer.add_eos
  g = evaluate.generate(restored.model, restored.variables(0), restored.tokenizer, "the a", 5)
  assert "<eos>" not in g["prompt_as_seen"] and len(g["prompt_as_seen"].split()) == 2
  ids = restored.tokenizer.encode_prompt("the a")
  assert len(ids) == 2 and list(restored.tokenizer.encode(["the a"])) == [*ids, EOS]


def test_bad_prompts_and_seeds_are_refused_before_any_scoring(file_run, tmp_path):
  """A prompt that cannot be sampled, or a seed JAX would wrap, is refused before the split is
  scored: here the data file does not even exist, and the error is still the prompt's."""
  _, workdir = file_run
  missing = str(tmp_path / "missing.txt")
  with pytest.raises(ConfigError, match="prompt must contain at least one word"):
    evaluate.run(workdir, data_file=missing, prompt="   ")
  with pytest.raises(ConfigError, match=r"exceeds the position table \(max_len=64\); ask for "
                                        r"at most 4 tokens"):
    evaluate.run(workdir, data_file=missing, prompt="the " * 60, num_tokens=10)
  # a prompt no number of tokens fits after: the prompt is named, not num_tokens
  with pytest.raises(ConfigError, match=r"the prompt alone \(70 words\) fills the position "
                                        r"table \(max_len=64\).*at most 63 words"):
    evaluate.run(workdir, data_file=missing, prompt="the " * 70, num_tokens=1)
  with pytest.raises(ConfigError, match=r"seed must lie in \[0, 2\*\*32\)"):
    evaluate.run(workdir, data_file=missing, prompt="the", seed=2**32 + 1)
  # a notebook's floats are not truncated into another setting (top_k=2.7 sampled as 2)
  for flag, value in (("top_k", 2.7), ("seed", 1.5), ("num_tokens", 3.0)):
    with pytest.raises(ConfigError, match=rf"^{flag} must be an integer, got {value}"):
      evaluate.run(workdir, data_file=missing, prompt="the", **{flag: value})
  # a notebook's wrong types are named, not a TypeError or AttributeError from inside
  with pytest.raises(ConfigError, match=r"temperature must be a number, got '0.5'"):
    evaluate.run(workdir, data_file=missing, prompt="the", temperature="0.5")
  # sampling settings without a prompt: refused, as evaluate.py refuses its flags (they were
  # silently ignored)
  with pytest.raises(ConfigError, match=r"^num_tokens, temperature set how words are sampled "
                                        r"after a prompt: pass prompt='TEXT' too"):
    evaluate.run(workdir, data_file=missing, num_tokens=5, temperature=3.0)
  restored = evaluate.restore_run(workdir)
  # a split that is none: named with the splits there are, before the restore (a KeyError)
  for call in (lambda: evaluate.run(workdir, split="tset"),
               lambda: evaluate.evaluate_split(restored, "tset")):
    with pytest.raises(ConfigError, match=r"^split must be one of \['train', 'validation', "
                                          r"'test'\], got 'tset'"):
      call()
  # a JAX key passed as the seed (a JAX user's habit) is named, not an error from inside
  for key in (jax.random.key(0), jax.random.PRNGKey(0)):  # a typed key, and a legacy one
    with pytest.raises(ConfigError, match=r"^seed must be an integer, not a key"):
      evaluate.generate(restored.model, restored.variables(0), restored.tokenizer, "the", 3,
                        seed=key)
  # the notebook's errors name its arguments (prompt, temperature), not evaluate.py's flags
  for prompt in (None, ["the"]):
    with pytest.raises(ConfigError, match="^prompt must be a string of words"):
      evaluate.generate(restored.model, restored.variables(0), restored.tokenizer, prompt, 3)
  for bad in (-1.0, float("inf")):
    with pytest.raises(ConfigError, match=r"^temperature must be a finite number >= 0"):
      evaluate.generate(restored.model, restored.variables(0), restored.tokenizer, "the", 3,
                        temperature=bad)
  # a population's stacked variables, or another (larger) vocabulary's tokenizer: named, not
  # a Flax shape error or a prompt id past the embedding table sampled silently
  two = jax.tree_util.tree_map(lambda x: np.stack([x, x]), restored.variables(0))
  with pytest.raises(ConfigError, match=r"leading axis of 2 .*run.variables\(i\)"):
    evaluate.generate(restored.model, two, restored.tokenizer, "the", 3)
  big = WordTokenizer(restored.tokenizer.words
                      + [f"w{i}" for i in range(restored.model.config.vocab_size)])
  with pytest.raises(ConfigError, match=rf"the tokenizer has {len(big)} words and the model's "
                                        rf"vocab_size is {restored.model.config.vocab_size}"):
    evaluate.generate(restored.model, restored.variables(0), big, big.words[-1], 3)
  # finite as Python floats, but not as float32 divisors: 1e39 is inf there (every draw was
  # <pad>), 1e-40 overflows the logits (one word won whatever the model said)
  for bad in (1e39, 1e-40):
    with pytest.raises(ConfigError, match=r"^temperature must be 0 \(greedy\) or lie in "
                                          r"\[1e-30, 3.4e\+38\]"):
      evaluate.generate(restored.model, restored.variables(0), restored.tokenizer, "the", 3,
                        temperature=bad)
  with pytest.raises(evaluate.CheckpointError, match=r"no such folder .*give the workdir of a "
                                                     r"training run \(train.py's workdir\)"):
    evaluate.restore_run(str(tmp_path / "none"))
  with pytest.raises(ConfigError, match=r"^replica 5: the run has 1 replica\(s\)"):
    evaluate.restore_run(workdir, replica=5)
  with pytest.raises(data_lib.DataError, match="no such file"):  # a good prompt: scoring starts
    evaluate.run(workdir, data_file=missing, prompt="the", seed=2**32 - 1)


def test_a_changed_data_file_is_warned_about_and_a_relative_file_reported_absolute(
    file_run, monkeypatch):
  """The checkpoint holds the sha256 of the training and validation files: scoring a split
  whose file changed since says so; a --data_file given relative is named absolute."""
  root, workdir = file_run
  before = evaluate.run(workdir)
  assert "warning" not in before
  valid = root / "valid.txt"
  text = valid.read_text()
  try:
    valid.write_text("\n".join(text.splitlines()[:40]) + "\n")
    after = evaluate.run(workdir)
  finally:
    valid.write_text(text)
  assert "data.files.validation" in after["warning"] and "changed since" in after["warning"]
  assert after["loss"] != before["loss"]
  # a split's file gone: no flag of evaluate's changes the config's path ("check the path")
  valid.rename(root / "moved.txt")
  try:
    with pytest.raises(data_lib.DataError, match=r"no such file .*valid.txt': the validation "
                                                 r"text the run was trained with, as its config "
                                                 r"names it; put that file back there, or score "
                                                 r"another text with data_file=FILE\.$"):
      evaluate.run(workdir)
  finally:
    (root / "moved.txt").rename(valid)
  monkeypatch.chdir(root)
  report = evaluate.run(workdir, data_file="valid.txt")
  assert report["split"] == str(valid) and "warning" not in report
  assert report["loss"] == pytest.approx(before["loss"], rel=1e-6)  # the same text


def test_what_people_paste_as_a_checkpoint_is_resolved_or_named(tmp_path):
  """A link to a step folder is that step of its run; a step folder the run no longer keeps is
  named with the steps it does keep; a finished run whose checkpoints folder is gone (or is a
  file) is told so, not to wait for its next save."""
  import json  # pylint: disable=g-import-not-at-top
  from infinito_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from infinito_jax.errors import CheckpointError  # pylint: disable=g-import-not-at-top
  run = tmp_path / "run"
  for step in (30, 60):
    (run / "checkpoints" / str(step)).mkdir(parents=True)
  (tmp_path / "link_step").symlink_to(run / "checkpoints" / "30")
  assert evaluate.resolve_ckpt(str(tmp_path / "link_step")) == (str(run), 30)
  (tmp_path / "link_ckpts").symlink_to(run / "checkpoints")
  assert evaluate.resolve_ckpt(str(tmp_path / "link_ckpts")) == (str(run), None)
  with pytest.raises(CheckpointError, match=r"keeps no step 99 .*it has \[30, 60\]\): pass "
                                            r"--ckpt \S+ with --step set to one of \[30, 60\]\.$"):
    evaluate.resolve_ckpt(str(run / "checkpoints" / "99"))
  # the advice names the caller's own argument (convert's export takes the run positionally;
  # it named evaluate.py's --ckpt)
  with pytest.raises(CheckpointError, match=r"\(the workdir\): the run \S+ keeps no step 99 .*: "
                                            rf"give {run} as the workdir with --step set to one of"):
    evaluate.resolve_ckpt(str(run / "checkpoints" / "99"), what="the workdir")
  # told to a Python caller of evaluate.run / restore_run: its arguments, not the flags; the
  # hint that names the commands' flags and restore_run's argument stays as it is
  from infinito_jax import errors  # pylint: disable=g-import-not-at-top
  with pytest.raises(CheckpointError) as e:
    evaluate.resolve_ckpt(str(run / "checkpoints" / "99"))
  told = errors.in_python_terms(str(e.value), "evaluate.run", evaluate.EVALUATE_ARGS)
  assert told.endswith(f": pass workdir {run} with step set to one of [30, 60].") and (
      "--" not in told), told
  assert errors.in_python_terms(evaluate.STEP_HINT, "evaluate.run",
                                evaluate.EVALUATE_ARGS) == evaluate.STEP_HINT
  # where the run's best step is kept, no --step chooses it; where it is gone, that is not said
  (run / "summary.json").write_text(json.dumps({"best_step": 60}))
  with pytest.raises(CheckpointError, match=r"one of \[30, 60\], or none for its best \(60\)\.$"):
    evaluate.resolve_ckpt(str(run / "checkpoints" / "99"))
  # Orbax's folder of an unfinished save (a process killed while saving) is named as such
  (run / "checkpoints" / "90.orbax-checkpoint-tmp-1765").mkdir()
  with pytest.raises(CheckpointError, match=r"is an unfinished save of step 90 .*not a "
                                            rf"checkpoint: pass --ckpt {run} for"):
    evaluate.resolve_ckpt(str(run / "checkpoints" / "90.orbax-checkpoint-tmp-1765"))
  done = tmp_path / "done"
  done.mkdir()
  (done / "summary.json").write_text(json.dumps({"status": "completed", "steps": 30}))
  (done / "history.jsonl").write_text("")
  with pytest.raises(CheckpointError, match=r"checkpoints folder is gone: .*saved step 30"):
    ckpt_lib.Checkpointer(str(done), read_only=True)
  (done / "checkpoints").write_text("")
  with pytest.raises(CheckpointError, match=r"checkpoints is not a folder"):
    ckpt_lib.Checkpointer(str(done), read_only=True)
  (done / "checkpoints").unlink()
  (done / "summary.json").write_text(json.dumps({"status": "running", "steps": 30}))
  with pytest.raises(CheckpointError, match=r"has no checkpoint yet"):  # it may still save
    ckpt_lib.Checkpointer(str(done), read_only=True)


def test_no_report_is_filed_when_the_run_was_replaced_while_it_was_read(tmp_path):
  """evaluate.py files its report in the run's folder only if that run is still there: where
  `train.py --fresh` moved it to <workdir>.old-<time> meanwhile, the step scored may be either
  run's (a pin does not follow the move: the restore may take the new run's step), so the
  report goes nowhere, and the error says where the old run went."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  import pathlib  # pylint: disable=import-outside-toplevel
  from infinito_jax import checkpoint  # pylint: disable=import-outside-toplevel
  spec = importlib.util.spec_from_file_location(
      "evaluate_cli", pathlib.Path(__file__).resolve().parents[1] / "evaluate.py")
  cli = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(cli)
  workdir = tmp_path / "run"
  (workdir / "checkpoints").mkdir(parents=True)
  read_from = checkpoint.file_id(checkpoint.checkpoint_dir(str(workdir)))
  assert cli._replaced_while_read(checkpoint, str(workdir), read_from) is None
  old = tmp_path / "run.old-20261207-000000"
  old.mkdir()
  os.replace(workdir / "checkpoints", old / "checkpoints")  # as lifecycle.move_aside does
  (workdir / "checkpoints").mkdir()  # the new run's
  problem = cli._replaced_while_read(checkpoint, str(workdir), read_from)
  assert f"was replaced while evaluate.py read it (moved to {old})" in problem
  assert "no report was written" in problem
  shutil.rmtree(old)
  assert "the run you meant" in cli._replaced_while_read(checkpoint, str(workdir), read_from)


@pytest.mark.slow
def test_an_unusable_cache_folder_names_what_evaluate_can_change(file_run, tmp_path):
  """The run's train.compilation_cache cannot be written: evaluate.py's warning named that
  field, which evaluate.py takes no flag for; it names JAX_COMPILATION_CACHE_DIR, and setting
  it as said (empty: off) silences it."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  _, workdir = file_run
  (tmp_path / ".cache").write_text("a file where the default cache folder goes")
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  env["HOME"] = str(tmp_path)  # the run's cache folder: ~/.cache/infinito_jax/jax
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cmd = [sys.executable, "evaluate.py", "--ckpt", workdir, "--out", str(tmp_path / "r.json")]
  out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert ("set JAX_COMPILATION_CACHE_DIR (the folder was the run's train.compilation_cache) to "
          "a writable folder, or '' to silence this.") in out.stdout, out.stdout
  out = subprocess.run(cmd, cwd=root, env=dict(env, JAX_COMPILATION_CACHE_DIR=""),
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0 and "compilation cache" not in out.stdout, out.stdout
  # the environment naming a file: the one warning line, before JAX's own (with its source
  # line) at the restore's first compilation
  blocker = str(tmp_path / ".cache")
  out = subprocess.run(cmd, cwd=root, env=dict(env, JAX_COMPILATION_CACHE_DIR=blocker),
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert f"warning: no compilation cache ({blocker}: a file is in the way)" in out.stdout
  assert "UserWarning" not in out.stderr and "compilation cache" not in out.stderr, out.stderr
