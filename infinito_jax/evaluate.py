"""Evaluation of a trained run: restore a checkpoint, score a split, sample text, write a report.

Restoring reads only the step it scores, and of it only the model's parameters and memory (no
optimizer state, no training step is built); scoring prepares only the split it scores.
"""

import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from infinito_jax import checkpoint as ckpt_lib
from infinito_jax import data as data_lib
from infinito_jax.errors import CheckpointError, ConfigError
from infinito_jax.lifecycle import RunRecord
from infinito_jax.memory import MEMORY
from infinito_jax.model import InfinitoV52, ModelConfig, model_config
from infinito_jax.tokenizer import PAD, UNK, WordTokenizer
from infinito_jax.train import Scorer, eval_batch_size, make_mesh


@dataclasses.dataclass
class Restored:
  """A checkpoint restored for evaluation: the model's variables and what scores them."""
  config: ml_collections.ConfigDict  # the config the run was trained with
  model_cfg: ModelConfig
  scorer: Scorer
  params: dict
  memory: dict
  tokenizer: WordTokenizer
  record: RunRecord
  step: int
  note: str  # how the step was chosen

  @property
  def model(self) -> InfinitoV52:
    return self.scorer.model

  @property
  def variables(self) -> dict:
    return {"params": self.params, MEMORY: self.memory}


def choose_step(checkpointer: ckpt_lib.Checkpointer, step: int | None) -> tuple[int, str]:
  """`step` if given, else the best step named by the newest readable record.

  Reads only JSON items; a damaged newest step is passed over (and named in the note).
  """
  steps = checkpointer.steps()
  if not steps:
    raise CheckpointError(f"no checkpoint in {checkpointer.directory} yet: a run saves at the "
                          "end of each epoch (and every checkpoint.every_steps).")
  if step is not None:
    if step not in steps:
      raise CheckpointError(f"no checkpoint for step {step} in {checkpointer.directory}; "
                            f"available: {steps}.")
    return step, f"step {step} (--step)"
  skipped = []
  for s in reversed(steps):
    try:
      record = RunRecord.from_json(checkpointer.read_json(s, "progress")["record"])
      break
    except (CheckpointError, KeyError, TypeError):
      skipped.append(s)
  else:
    checkpointer.read_meta(steps[-1])  # raises if it is another version's layout
    raise CheckpointError(f"no checkpoint in {checkpointer.directory} can be read (steps "
                          f"{steps} are damaged); retrain with train.py --fresh.")
  passed = f" (newer step(s) {skipped} cannot be read)" if skipped else ""
  if record.best_step is None:
    return s, f"the latest step {s}: no validation yet{passed}"
  if record.best_step in steps:
    return record.best_step, f"the best step {record.best_step} (validation loss {record.best_val_loss:.4f}){passed}"
  keep_best = checkpointer.read_json(s, "meta").get("config", {}).get(
      "checkpoint", {}).get("keep_best", True)
  if not keep_best:
    return s, f"the latest step {s} (the run kept no best checkpoint){passed}"
  raise CheckpointError(f"the best checkpoint of the run (step {record.best_step}) is missing "
                        f"from {checkpointer.directory}; pass --step to score another "
                        f"(available: {steps}).")


def restore_run(workdir: str, step: int | None = None) -> Restored:
  """Restores the parameters and memory of one checkpoint: the best unless `step` is given.

  A run may be training in `workdir` meanwhile: if it replaces the best step while this reads
  it, the new best is read instead.
  """
  checkpointer = ckpt_lib.Checkpointer(workdir, read_only=True)
  try:
    for attempt in range(5):
      chosen, note = choose_step(checkpointer, step)
      try:
        return _restore_step(checkpointer, chosen, note)
      except CheckpointError as e:
        if step is None and chosen in checkpointer.steps():  # the best is damaged
          others = [s for s in checkpointer.steps() if s != chosen]
          raise CheckpointError(f"{str(e).rstrip('.')}. Pass --step to score another step"
                                f" (available: {others or 'none'}).") from None
        if step is not None or attempt == 4:
          raise
  finally:
    checkpointer.close()


def _restore_step(checkpointer: ckpt_lib.Checkpointer, step: int, note: str) -> Restored:
  meta = checkpointer.read_meta(step)
  progress = checkpointer.read_json(step, "progress")
  config = ml_collections.ConfigDict(meta["config"])
  model_cfg = model_config(config.model)
  mesh = make_mesh()
  if eval_batch_size(config) % mesh.size:
    mesh = make_mesh(1)
  scorer = Scorer(InfinitoV52(model_cfg), mesh, eval_batch_size(config))
  items = checkpointer.restore_arrays(step, scorer.abstract_variables(config.data.seq_len))
  return Restored(config=config, model_cfg=model_cfg, scorer=scorer, params=items["params"],
                  memory=items[MEMORY], tokenizer=WordTokenizer.from_json(meta["tokenizer"]),
                  record=RunRecord.from_json(progress["record"]), step=step, note=note)


def evaluate_split(restored: Restored, split: str, data_file: str | None = None) -> dict:
  """Token-weighted loss and perplexity plus the integration metrics on one split (or file)."""
  config = restored.config
  if data_file:
    windows = data_lib.file_windows(data_file, restored.tokenizer, config.data.seq_len,
                                    "--data_file")
    where, info = data_file, {}
  else:
    data = data_lib.prepare(config, restored.model_cfg, restored.tokenizer, splits=(split,))
    windows, info = data.windows[split], data.info
    where = data_lib.describe(config.data, split)
  batches = data_lib.Batches(windows, restored.scorer.batch_size, 0, shuffle=False)
  out = restored.scorer(restored.params, restored.memory, batches)
  out["unk_rate"] = float(np.mean(windows[:, 1:] == UNK))
  if warning := data_lib.unk_warning(windows, where):
    out["warning"] = warning
  if info:  # the embedded corpus: what the best possible model reaches
    for k in ("oracle_perplexity", "previous_word_only_perplexity"):
      out[k] = info[k]
  return out


def check_sampling(*, num_tokens: int, temperature: float, top_k: int, vocab_size: int) -> None:
  """Refuses sampling settings that cannot give text, before any work is done."""
  if num_tokens < 1:
    raise ConfigError(f"--num_tokens must be at least 1, got {num_tokens}.")
  if not (math.isfinite(temperature) and temperature >= 0):
    raise ConfigError(f"--temperature must be >= 0 (0: greedy, 1: the model's distribution), "
                      f"got {temperature}.")
  if not 0 <= top_k <= vocab_size:
    raise ConfigError(f"--top_k must lie in [0, vocab_size={vocab_size}] (0: all words), "
                      f"got {top_k}.")


def generate(model: InfinitoV52, variables, tokenizer: WordTokenizer, prompt: str,
             num_tokens: int, seed: int = 0, temperature: float = 1.0, top_k: int = 0) -> dict:
  """Samples `num_tokens` words after `prompt` from key(seed); temperature 0 is greedy.

  One jitted loop over a fixed-length buffer: the model is causal, so the not-yet-written
  tail cannot influence the position being sampled, and nothing recompiles per token.
  """
  check_sampling(num_tokens=num_tokens, temperature=temperature, top_k=top_k,
                 vocab_size=model.config.vocab_size)
  prompt_ids = tokenizer.encode([prompt])
  if len(prompt_ids) == 0:
    raise ConfigError("--prompt must contain at least one word.")
  if not model.config.causal:
    raise ConfigError("generation needs a causal model (model.causal=True).")
  total = len(prompt_ids) + num_tokens
  if total > model.config.max_len:
    raise ConfigError(f"prompt ({len(prompt_ids)} words) + num_tokens ({num_tokens}) exceeds "
                     f"the position table (max_len={model.config.max_len}); ask for fewer.")
  buf = np.zeros((1, total), np.int32)
  buf[0, :len(prompt_ids)] = prompt_ids

  @jax.jit
  def sample(buf, key):
    def body(i, carry):
      buf, key = carry
      logits, _ = model.apply(variables, buf)
      logits = jax.lax.dynamic_index_in_dim(logits[0], i - 1, keepdims=False)
      # never <pad>, nor ids the tokenizer has no word for (vocab_size > its words)
      ids = jnp.arange(logits.shape[-1])
      logits = jnp.where((ids == PAD) | (ids >= len(tokenizer)), -jnp.inf, logits)
      key, sub = jax.random.split(key)
      if temperature == 0:
        tok = jnp.argmax(logits)
      else:
        logits = logits / temperature
        if top_k:
          kth = jax.lax.top_k(logits, top_k)[0][-1]
          logits = jnp.where(logits < kth, -jnp.inf, logits)
        tok = jax.random.categorical(sub, logits)
      return buf.at[0, i].set(tok.astype(buf.dtype)), key

    return jax.lax.fori_loop(len(prompt_ids), total, body, (buf, key))[0]

  out = np.asarray(sample(buf, jax.random.key(seed)))[0]
  unknown = [w for w in prompt.lower().split() if w not in tokenizer.index]
  return {"prompt": prompt, "prompt_as_seen": tokenizer.decode(prompt_ids),
          "unknown_prompt_words": unknown,
          "continuation": tokenizer.decode(out[len(prompt_ids):]), "seed": seed,
          "temperature": temperature, "top_k": top_k}


def run(workdir: str, split: str = "validation", step: int | None = None,
        data_file: str | None = None, prompt: str | None = None, num_tokens: int = 40,
        seed: int = 0, temperature: float = 1.0, top_k: int = 0) -> dict:
  """restore_run + evaluate_split (+ generate); returns the report."""
  restored = restore_run(workdir, step)
  if prompt is not None:  # refuse bad sampling flags before the scoring work
    check_sampling(num_tokens=num_tokens, temperature=temperature, top_k=top_k,
                   vocab_size=restored.model_cfg.vocab_size)
  report = {"checkpoint": os.path.join(ckpt_lib.checkpoint_dir(workdir), str(restored.step)),
            "step": restored.step, "chosen": restored.note, "split": data_file or split}
  report.update(evaluate_split(restored, split, data_file))
  if prompt is not None:
    report["generation"] = generate(restored.model, restored.variables, restored.tokenizer,
                                    prompt, num_tokens, seed, temperature, top_k)
  return report
