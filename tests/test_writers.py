"""Around a run: TensorBoard files mirror history.jsonl, samples at each validation, config.json,
the plot at the end, evaluation every N steps, W&B refused cleanly when absent."""

import json
import os
import shutil
import time

import matplotlib.image
import numpy as np
import pytest

from configs import tiny
from infinito_jax import evaluate
from infinito_jax.errors import ConfigError
from infinito_jax.train import train_and_evaluate

ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator",
                         reason="reading event files needs tensorboard (the test extra)")


def tiny_config(**train):
  c = tiny.get_config()
  c.train.epochs = 1
  for k, v in train.items():
    c.train[k] = v
  return c


def history(workdir):
  return [json.loads(l) for l in open(os.path.join(workdir, "history.jsonl"))]


def events(workdir):
  acc = ea.EventAccumulator(os.path.join(workdir, "tensorboard"),
                            size_guidance={ea.SCALARS: 0, ea.TENSORS: 0})
  acc.Reload()
  return acc


@pytest.fixture(scope="module")
def sampled_run(tmp_path_factory):
  """One epoch (30 steps) of the tiny config, validating every 10 steps, with samples."""
  workdir = str(tmp_path_factory.mktemp("run"))
  config = tiny_config(eval_every_steps=10, sample_prompt="stimou Qzx pous", sample_tokens=6)
  summary = train_and_evaluate(config, workdir)
  return config, workdir, summary


def test_tensorboard_scalars_equal_the_history(sampled_run):
  """Every train and validation record of history.jsonl is in the event files, same step and
  value (float32), read back with TensorBoard's own reader."""
  _, workdir, _ = sampled_run
  acc, hist = events(workdir), history(workdir)
  train = [r for r in hist if r["kind"] == "train"]
  val = [r for r in hist if r["kind"] == "validation"]
  got = {e.step: e.value for e in acc.Scalars("train/loss")}
  assert sorted(got) == [r["step"] for r in train]
  np.testing.assert_allclose([got[r["step"]] for r in train], [r["loss"] for r in train],
                             rtol=1e-6)
  for tag in ("perplexity", "loss", "integration_phi", "memory_utilization"):
    got = {e.step: e.value for e in acc.Scalars(f"validation/{tag}")}
    assert sorted(got) == [r["step"] for r in val], tag
    np.testing.assert_allclose([got[r["step"]] for r in val], [r[tag] for r in val], rtol=1e-6)
  lr = {e.step: e.value for e in acc.Scalars("train/learning_rate")}
  assert lr[train[-1]["step"]] == pytest.approx(train[-1]["learning_rate"], rel=1e-6)


def test_validation_every_n_steps_and_at_the_epoch_end(tmp_path, sampled_run):
  """eval_every_steps=10 over a 30-step epoch validates at 10, 20, 30; 7 gives 7, 14, 21, 28
  and the epoch end 30 (each once)."""
  _, workdir, _ = sampled_run
  assert [r["step"] for r in history(workdir) if r["kind"] == "validation"] == [10, 20, 30]
  other = str(tmp_path / "seven")
  train_and_evaluate(tiny_config(eval_every_steps=7, log_every=100), other)
  assert [r["step"] for r in history(other) if r["kind"] == "validation"] == [7, 14, 21, 28, 30]


def test_samples_at_each_validation_equal_evaluate_generate(sampled_run):
  """A sample is logged (history and TensorBoard text) at every validation, from the fixed
  key(seed): the last one is exactly what evaluate.generate gives from the saved checkpoint
  of that step with --seed = the run's seed, its prompt shown as the model saw it, as
  evaluate.py shows it (<unk> for a word the vocabulary lacks: the log showed the word)."""
  config, workdir, _ = sampled_run
  samples = [r for r in history(workdir) if r["kind"] == "sample"]
  assert [r["step"] for r in samples] == [10, 20, 30]
  assert all(len(r["text"].split()) == 6 for r in samples)
  texts = {e.step: e.tensor_proto.string_val[0].decode() for e in events(workdir).Tensors(
      "samples/text_summary")}
  assert texts == {r["step"]: f"stimou <unk> pous >>> {r['text']}" for r in samples}
  restored = evaluate.restore_run(workdir, step=30)
  g = evaluate.generate(restored.model, restored.variables(0), restored.tokenizer,
                        "stimou Qzx pous", 6, seed=config.seed)
  assert g["continuation"] == samples[-1]["text"]
  assert g["prompt_as_seen"] == samples[-1]["prompt_as_seen"] == "stimou <unk> pous"


def test_config_json_hparams_and_plot(sampled_run):
  """The workdir holds the full config as JSON (data paths absolute), TensorBoard's hparams
  hold the config, and the run wrote a valid curves.png with its training and validation
  lines."""
  config, workdir, _ = sampled_run
  saved = json.load(open(os.path.join(workdir, "config.json")))
  assert saved["train"]["sample_prompt"] == "stimou Qzx pous"
  assert saved["model"] == config.model.to_dict()
  acc = events(workdir)
  content = acc.PluginTagToContent("hparams")
  assert content and any(b"train.learning_rate" in v for v in content.values())
  png = os.path.join(workdir, "curves.png")
  assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
  assert matplotlib.image.imread(png).ndim == 3


def test_resume_hides_what_a_killed_process_logged_past_its_checkpoint(tmp_path):
  """Events written after the last checkpoint (by a process killed before saving) are purged
  by the resumed run: TensorBoard shows each step once, with the resumed run's value."""
  from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "run")
  train_and_evaluate(tiny_config(stop_after_steps=15), workdir)  # saved at 15
  ghost = SummaryWriter(os.path.join(workdir, "tensorboard"))  # the killed process, after 15
  ghost.add_scalar("train/loss", 999.0, 20)
  ghost.close()
  time.sleep(1.1)  # event files are named by the second they were opened, and read in order
  train_and_evaluate(tiny_config(), workdir)
  loss = [(e.step, e.value) for e in events(workdir).Scalars("train/loss")]
  assert [s for s, _ in loss] == [5, 10, 15, 20, 25, 30]
  assert 999.0 not in [v for _, v in loss]


def test_a_resumed_run_restores_tensorboard_events_lost_before_its_checkpoint(tmp_path):
  """tensorboardX writes from a queue: a kill -9 just after a checkpoint loses the events
  still queued, though they came before it (here all of them: the event files are removed).
  The resumed run writes its history again, so TensorBoard shows every record once."""
  workdir = str(tmp_path / "run")
  train_and_evaluate(tiny_config(stop_after_steps=20), workdir)  # saved at 20
  shutil.rmtree(os.path.join(workdir, "tensorboard"))
  time.sleep(1.1)  # event files are named by the second they were opened, and read in order
  train_and_evaluate(tiny_config(), workdir)
  hist = history(workdir)
  train = [r for r in hist if r["kind"] == "train"]
  val = [r for r in hist if r["kind"] == "validation"]
  acc = events(workdir)
  loss = [(e.step, e.value) for e in acc.Scalars("train/loss")]
  assert [s for s, _ in loss] == [r["step"] for r in train] == [5, 10, 15, 20, 25, 30]
  np.testing.assert_allclose([v for _, v in loss], [r["loss"] for r in train], rtol=1e-6)
  assert [e.step for e in acc.Scalars("validation/loss")] == [r["step"] for r in val]


def test_a_partial_window_logged_at_a_stop_is_replaced_in_tensorboard_on_resume(tmp_path):
  """A stop at step 17 logs the window 16..17 as partial (TensorBoard gets it at 17); the
  resumed run logs 16..20 whole, and TensorBoard then shows the history's records only."""
  workdir = str(tmp_path / "run")
  train_and_evaluate(tiny_config(stop_after_steps=17), workdir)
  assert [(e.step) for e in events(workdir).Scalars("train/loss")] == [5, 10, 15, 17]
  time.sleep(1.1)  # event files are named by the second they were opened, and read in order
  train_and_evaluate(tiny_config(), workdir)
  train = [r for r in history(workdir) if r["kind"] == "train"]
  assert [r["step"] for r in train] == [5, 10, 15, 20, 25, 30]
  assert not any("partial" in r for r in train)
  loss = [(e.step, e.value) for e in events(workdir).Scalars("train/loss")]
  assert [s for s, _ in loss] == [5, 10, 15, 20, 25, 30]
  np.testing.assert_allclose([v for _, v in loss], [r["loss"] for r in train], rtol=1e-6)


def test_wandb_without_the_package_is_refused_before_training(tmp_path):
  """log.wandb_project without wandb installed: a ConfigError naming the extra, before
  anything is written (no workdir is made)."""
  try:
    import wandb  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    pytest.skip("wandb is installed here")
  except ImportError:
    pass
  c = tiny_config()
  c.log.wandb_project = "infinito"
  with pytest.raises(ConfigError, match=r'pip install -e "\.\[wandb\]"'):
    train_and_evaluate(c, str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w")


def test_sample_prompt_must_have_words():
  """A blank sample prompt is refused by validation, naming the field."""
  from infinito_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  c = tiny_config(sample_prompt="   ")
  with pytest.raises(ConfigError, match="train.sample_prompt"):
    config_lib.validate(c)


def test_population_samples_use_each_replicas_seed(tmp_path):
  """In a population, replica r's sample at a validation is drawn with key(seed + r): it
  equals evaluate.generate on replica r's parameters with seed = that replica's seed, and
  TensorBoard keeps one text series per replica."""
  c = tiny_config(replicas=2, sample_prompt="sa", sample_tokens=5, stop_after_steps=10,
                  eval_every_steps=10)
  train_and_evaluate(c, str(tmp_path))
  samples = [r for r in history(str(tmp_path)) if r["kind"] == "sample"]
  assert [(r["replica"], r["seed"]) for r in samples] == [(0, 42), (1, 43)]
  restored = evaluate.restore_run(str(tmp_path), step=10)
  for r in samples:
    g = evaluate.generate(restored.model, restored.variables(r["replica"]), restored.tokenizer,
                          "sa", 5, seed=r["seed"])
    assert g["continuation"] == r["text"]
  tags = events(str(tmp_path)).Tags()["tensors"]
  assert {"samples/replica_0/text_summary", "samples/replica_1/text_summary"} <= set(tags)
