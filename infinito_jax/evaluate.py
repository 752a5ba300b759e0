"""Evaluation of a trained run: restore a checkpoint, score a split, sample text, write a report."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from infinito_jax import checkpoint as ckpt_lib
from infinito_jax import data as data_lib
from infinito_jax.memory import MEMORY
from infinito_jax.model import InfinitoV52
from infinito_jax.tokenizer import PAD, WordTokenizer
from infinito_jax.train import Trainer, eval_batch_size, model_config


def restore_run(workdir: str, step: int | None = None):
  """Restores a run's checkpoint: the best one unless `step` is given.

  Returns:
    (config, trainer, state, meta, step) with the config the run was trained with.
  """
  checkpointer = ckpt_lib.Checkpointer(workdir, read_only=True)
  try:
    steps = checkpointer.steps()
    if not steps:
      raise ckpt_lib.CheckpointError(f"no checkpoints in {checkpointer.directory}: pass the "
                                     f"--workdir of a training run (train.py prints it).")
    latest_meta = checkpointer.read_meta(max(steps))
    if step is None:
      best = latest_meta.get("best_step")
      step = best if best in steps else max(steps)
    meta = checkpointer.read_meta(step)
    config = ml_collections.ConfigDict(meta["config"])
    model_cfg = model_config(config.model)
    n = jax.local_device_count()
    config.train.num_devices = n if eval_batch_size(config) % n == 0 else 1
    trainer = Trainer(config, model_cfg, steps_per_epoch=1)
    state, meta = checkpointer.restore(step, trainer.abstract_state())
  finally:
    checkpointer.close()
  return config, trainer, state, meta, step


def evaluate_split(config, trainer: Trainer, state, tokenizer: WordTokenizer, split: str,
                   data_file: str | None = None) -> dict:
  """Token-weighted loss and perplexity plus the integration metrics on one split."""
  if data_file:
    if not os.path.isfile(data_file):
      raise data_lib.DataError(f"--data_file: no such file {data_file!r}")
    with open(data_file) as f:
      windows = data_lib.make_windows(tokenizer.encode(f), config.data.seq_len)
    if len(windows) == 0:
      raise data_lib.DataError(f"{data_file} has fewer than seq_len + 1 tokens.")
    batches = data_lib.Batches(windows, trainer.eval_batch_size, 0, shuffle=False)
    info = {}
  else:
    data = data_lib.prepare(config, trainer.model_cfg, tokenizer)
    batches = data.batches(split, trainer.eval_batch_size)
    info = data.info
  out = trainer.evaluate(state, batches)
  out["unk_rate"] = float(np.mean(batches.windows[:, 1:] == 1))
  if info:  # the embedded corpus: what the best possible model reaches
    for k in ("oracle_perplexity", "previous_word_only_perplexity", "oracle_applies"):
      out[k] = info[k]
  return out


def generate(model: InfinitoV52, variables, tokenizer: WordTokenizer, prompt: str,
             num_tokens: int, seed: int = 0, temperature: float = 1.0, top_k: int = 0) -> dict:
  """Samples `num_tokens` words after `prompt` from key(seed); temperature 0 is greedy.

  One jitted loop over a fixed-length buffer: the model is causal, so the not-yet-written
  tail cannot influence the position being sampled, and nothing recompiles per token.
  """
  prompt_ids = tokenizer.encode([prompt])
  if len(prompt_ids) == 0:
    raise ValueError("--prompt must contain at least one word.")
  if num_tokens < 1:
    raise ValueError(f"--num_tokens must be at least 1, got {num_tokens}.")
  if not model.config.causal:
    raise ValueError("generation needs a causal model (model.causal=True).")
  total = len(prompt_ids) + num_tokens
  if total > model.config.max_len:
    raise ValueError(f"prompt ({len(prompt_ids)} words) + num_tokens ({num_tokens}) exceeds "
                     f"the position table (max_len={model.config.max_len}); ask for fewer.")
  buf = np.zeros((1, total), np.int32)
  buf[0, :len(prompt_ids)] = prompt_ids

  @jax.jit
  def sample(buf, key):
    def body(i, carry):
      buf, key = carry
      logits, _ = model.apply(variables, buf)
      logits = jax.lax.dynamic_index_in_dim(logits[0], i - 1, keepdims=False)
      logits = logits.at[PAD].set(-jnp.inf)
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
  config, trainer, state, meta, step = restore_run(workdir, step)
  tokenizer = WordTokenizer.from_json(meta["tokenizer"])
  report = {"checkpoint": os.path.join(ckpt_lib.checkpoint_dir(workdir), str(step)),
            "step": step, "epoch": meta["epoch"], "split": data_file or split}
  report.update(evaluate_split(config, trainer, state, tokenizer, split, data_file))
  if prompt is not None:
    variables = {"params": state.params, MEMORY: state.memory}
    report["generation"] = generate(trainer.model, variables, tokenizer, prompt, num_tokens,
                                    seed, temperature, top_k)
  return report
