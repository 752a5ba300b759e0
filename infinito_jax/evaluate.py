"""Evaluation of a trained run: restore a checkpoint, score a split, sample text, write a report.

Restoring reads only the step it scores, and of it only the model's parameters and memory (no
optimizer state, no training step is built); scoring prepares only the split it scores.
"""

import dataclasses
import json
import math
import os
import re
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from infinito_jax import checkpoint as ckpt_lib
from infinito_jax.config import SEED_LIMIT
from infinito_jax import data as data_lib
from infinito_jax import sampling
from infinito_jax.errors import (CheckpointError, ConfigError, DataError, StepVanishedError,
                                 python_terms)
from infinito_jax.lifecycle import RunRecord, parents
from infinito_jax.memory import MEMORY
from infinito_jax.model import (InfinitoV52, ModelConfig, fused_attention_impl, model_config,
                                stacked_models_message)
from infinito_jax.tokenizer import UNK, WordTokenizer
from infinito_jax import distributed
from infinito_jax.train import (DEFAULT_COMPILATION_CACHE, Scorer, eval_batch_size,
                                group_statistics, jax_settings_restored, make_mesh, replica,
                                replica_groups, use_compilation_cache, use_threefry_kernel)


@dataclasses.dataclass
class Restored:
  """Checkpoints restored for evaluation: the variables of some replicas of a run, stacked on
  a leading axis (one per replica in `replicas`, each from its own chosen step), and what
  scores them."""
  config: ml_collections.ConfigDict  # the config the run was trained with
  model_cfg: ModelConfig
  scorer: Scorer
  params: dict  # [len(replicas), ...]
  memory: dict
  tokenizer: WordTokenizer
  record: RunRecord
  replicas: list[int]  # which replicas of the run, in the order of the stacked axis
  steps: list[int]  # the step each one was restored from
  notes: list[str]  # how each step was chosen
  data_sha256: dict = dataclasses.field(default_factory=dict)  # of the files it trained on
  # train.replica_hparams: the values each one was trained with up to its step (its step's
  # config: a resume may have changed them since; None without groups)
  hparams: list[dict] | None = None

  @property
  def model(self) -> InfinitoV52:
    return self.scorer.model

  @property
  def step(self) -> int:
    """The step of the first replica restored (the only one by default)."""
    return self.steps[0]

  @property
  def note(self) -> str:
    return self.notes[0]

  def variables(self, i: int = 0) -> dict:
    """The variables of the i-th replica restored (replica `replicas[i]` of the run),
    unstacked: what model.apply takes."""
    n = len(self.replicas)
    if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
      raise TypeError(f"variables(i) takes an integer index, got {i!r}.")
    if not -n <= i < n:
      raise IndexError(f"variables({i!r}): {n} replica(s) restored (replicas {self.replicas} "
                       f"of the run), so i lies in 0..{n - 1}; it indexes the restored ones, "
                       "not the run's replica numbers.")
    return {"params": replica(self.params, int(i) % n), MEMORY: replica(self.memory, int(i) % n)}


def resolve_ckpt(path: str, step: int | None = None,
                 what: str = "--ckpt") -> tuple[str, int | None]:
  """The run's workdir and step from what people paste: the workdir, its checkpoints folder,
  or one step's folder (e.g. runs/demo/checkpoints/438, as Orbax names it: that step).
  `what` names the argument in errors ('--ckpt' for evaluate.py)."""
  p = os.path.abspath(os.path.expanduser(os.fspath(path)))
  named = f"{what} {path}" if what.startswith("-") else f"{path} ({what})"

  def give(run):  # the advice to name the run instead, in the caller's terms
    return f"pass {what} {run}" if what.startswith("-") else f"give {run} as {what}"

  if os.path.isdir(ckpt_lib.checkpoint_dir(p)):
    return p, step
  if not os.path.exists(p):
    link = next((q for q in parents(p) if os.path.islink(q) and not os.path.exists(q)),
                None)
    if link is not None:
      raise CheckpointError(f"{named}: {link} is a symbolic link to {os.readlink(link)!r}, "
                            "which does not exist; fix the link or give the run's own folder.")
    parent = os.path.dirname(p)
    if os.path.basename(p).isdigit() and parent == ckpt_lib.checkpoint_dir(
        os.path.dirname(parent)) and os.path.isdir(parent):  # a step the run no longer keeps
      kept = sorted(int(n) for n in os.listdir(parent)
                    if n.isdigit() and os.path.isdir(os.path.join(parent, n)))
      try:  # where the run's best step is kept, no --step chooses it
        with open(os.path.join(os.path.dirname(parent), "summary.json"), encoding="utf-8") as f:
          best = json.load(f).get("best_step")
      except (OSError, ValueError, AttributeError):
        best = None
      raise CheckpointError(
          f"{named}: the run {os.path.dirname(parent)} keeps no step {int(os.path.basename(p))} "
          f"(a run keeps its latest and best steps; it has {kept or 'none yet'})"
          + (f": {give(os.path.dirname(parent))} with --step set to one of {kept}"
             + (f", or none for its best ({best})." if best in kept else ".") if kept else "."))
    raise CheckpointError(f"{named}: no such folder ({p}); give the workdir of a "
                          "training run (train.py's --workdir), e.g. runs/demo.")
  if not os.path.isdir(p):
    raise CheckpointError(f"{named} is a file; give the workdir of a training run "
                          "(train.py's --workdir, a folder), e.g. runs/demo.")
  p = os.path.realpath(p)  # a link to a run's checkpoints or step folder: where it points
  if os.path.isdir(ckpt_lib.checkpoint_dir(p)):
    return p, step
  name, parent = os.path.basename(p), os.path.dirname(p)
  if os.path.isdir(p) and p == ckpt_lib.checkpoint_dir(parent):
    return parent, step
  inner = p  # a step folder, or a folder inside one (its params/, as a file browser shows it)
  while os.path.dirname(inner) != inner:
    name, parent = os.path.basename(inner), os.path.dirname(inner)
    unfinished = re.fullmatch(r"(\d+)\.orbax-checkpoint-tmp.*", name)
    if unfinished and parent == ckpt_lib.checkpoint_dir(os.path.dirname(parent)):
      raise CheckpointError(
          f"{named} is an unfinished save of step {int(unfinished.group(1))} (Orbax's "
          "temporary folder: its process stopped while writing it; the run's next start "
          f"removes it), not a checkpoint: {give(os.path.dirname(parent))} for the run's "
          "saved steps.")
    if name.isdigit() and os.path.isdir(parent) and parent == ckpt_lib.checkpoint_dir(
        os.path.dirname(parent)):  # (if the step is gone, restoring names the steps)
      if step is not None and step != int(name):
        raise ConfigError(f"{named} is in step {int(name)}'s folder but step {step} was asked "
                          "for; give one of them.")
      return os.path.dirname(parent), int(name)
    inner = parent
  return p, step


# how a reader names another step: the commands' flag and the notebook's argument
STEP_HINT = ("choose another step (evaluate.py --step, python -m infinito_jax.convert export "
             "--step, restore_run's step=)")


def _newest_record(checkpointer: ckpt_lib.Checkpointer) -> tuple[int, RunRecord, list[int]]:
  """The newest readable record: (its step, the record, the newer unreadable steps)."""
  steps = checkpointer.steps()
  if not steps:
    raise CheckpointError(ckpt_lib.no_checkpoint_yet(checkpointer.workdir))
  skipped = []
  for s in reversed(steps):
    try:
      with checkpointer.pinned([s]):  # not deleted while it is read
        return s, RunRecord.from_json(checkpointer.read_json(s, "progress")["record"]), skipped
    except StepVanishedError:
      continue  # the run deleted it meanwhile: not damage
    except (CheckpointError, KeyError, TypeError):
      skipped.append(s)
  checkpointer.read_meta(steps[-1])  # raises if it is another version's layout
  raise CheckpointError(f"no checkpoint in {checkpointer.directory} can be read (steps "
                        f"{steps} are damaged); retrain with train.py --fresh.")


def _check_replica(record: RunRecord, r: int) -> None:
  n = len(record.replicas)
  if not 0 <= r < n:
    raise ConfigError(f"replica {r}: the run has {n} replica(s), 0..{n - 1}.")


def choose_step(checkpointer: ckpt_lib.Checkpointer, step: int | None,
                replica_index: int = 0) -> tuple[int, str]:
  """`step` if given, else the best step of replica `replica_index` named by the newest
  readable record. Reads only JSON items; a damaged newest step is passed over (and named)."""
  steps = checkpointer.steps()
  if step is not None:
    if step not in steps:
      raise CheckpointError(f"no checkpoint for step {step} in {checkpointer.directory}; "
                            f"available: {steps}.")
    return step, f"step {step} (asked for)"
  for _ in range(5):  # a run saving meanwhile: the listing and the newest record must agree
    s, record, skipped = _newest_record(checkpointer)
    _check_replica(record, replica_index)
    rep = record.replicas[replica_index]
    steps = checkpointer.steps()
    if rep.best_step is None or rep.best_step in steps:
      break
  passed = f" (newer step(s) {skipped} cannot be read)" if skipped else ""
  if rep.best_step is None:
    if rep.diverged:  # train.on_divergence='freeze': it will never be validated
      return s, (f"the latest step {s}: it diverged at step {rep.diverged['step']}, frozen "
                 f"before its first validation{passed}")
    return s, f"the latest step {s}: no validation yet{passed}"
  if rep.best_step in steps:
    return rep.best_step, (f"the best step {rep.best_step} (validation loss "
                           f"{rep.best_val_loss:.4f}){passed}")
  keep_best = checkpointer.read_json(s, "meta").get("config", {}).get(
      "checkpoint", {}).get("keep_best", True)
  if not keep_best:
    return s, f"the latest step {s} (the run kept no best checkpoint){passed}"
  raise CheckpointError(f"the best checkpoint of the run (step {rep.best_step}) is missing "
                        f"from {checkpointer.directory}; {STEP_HINT} (available: {steps}).")


# evaluate.py's flags, as run() and restore_run() take them (errors to a Python caller)
# (STEP_HINT names the commands' --step and restore_run's step= both: left as it is)
EVALUATE_ARGS = {"ckpt": "workdir", "step": "step", "replica": "replica", "split": "split",
                 "data_file": "data_file", "prompt": "prompt", "num_tokens": "num_tokens",
                 "seed": "seed", "temperature": "temperature", "top_k": "top_k"}


@python_terms("restore_run", EVALUATE_ARGS)
def restore_run(workdir: str, step: int | None = None, replica: int | None = None) -> Restored:
  """Restores parameters and memory: of every replica of the run (each at its best step, or
  all at `step`), or of replica `replica` alone.

  `workdir` may also be its checkpoints folder or one step's folder (as evaluate.py's --ckpt).
  A run may be training in `workdir` meanwhile: if it replaces a best step while this reads
  it, the new best is read instead.
  """
  for name, value in (("step", step), ("replica", replica)):
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))):
      raise ConfigError(f"restore_run: {name} must be an integer or None, got {value!r}.")
  workdir, step = resolve_ckpt(workdir, step, what="the workdir")
  checkpointer = ckpt_lib.Checkpointer(workdir, read_only=True)
  try:
    for attempt in range(10):
      listed = checkpointer.steps()
      chosen = None
      try:  # a run saving meanwhile may prune any step listed here, until it is pinned
        _, record, _ = _newest_record(checkpointer)
        which = list(range(len(record.replicas))) if replica is None else [replica]
        for r in which:
          _check_replica(record, r)
        chosen = [choose_step(checkpointer, step, r) for r in which]
        with checkpointer.pinned([s for s, _ in chosen]):
          return _restore_steps(checkpointer, which, chosen, record)
      except StepVanishedError:
        if step is not None or attempt == 9:
          raise
      except CheckpointError as e:
        if step is not None:  # the step asked for cannot be read: the others are named
          steps = checkpointer.steps()
          others = sorted(set(steps) - {step})
          if step in steps and others and "available" not in str(e):
            e.args = (f"{str(e).rstrip('.')}. The run's other steps: {others}.",)
          raise
        if _unchanged(checkpointer, listed):  # damaged or missing, not replaced
          if chosen is None:
            raise
          others = sorted(set(checkpointer.steps()) - {s for s, _ in chosen})
          raise CheckpointError(
              f"{str(e).rstrip('.')}. " + (f"{STEP_HINT[0].upper()}{STEP_HINT[1:]} (available: "
                                           f"{others})." if others else
                                           "No other step is left to choose: train again "
                                           "(train.py --fresh moves this run aside).")) from None
        if attempt == 9:
          raise
  finally:
    checkpointer.close()


def _scorer(model_cfg: ModelConfig, config, replicas: int) -> Scorer:
  """A scorer on all local devices, or on one where the batch does not split over them."""
  try:
    return Scorer(InfinitoV52(model_cfg), make_mesh(), eval_batch_size(config), replicas)
  except ConfigError:
    if distributed.active():  # no one-device mesh spans several processes
      raise
    return Scorer(InfinitoV52(model_cfg), make_mesh(1), eval_batch_size(config), replicas)


def _unchanged(checkpointer, listed: list[int]) -> bool:
  """Whether a failed restore failed on its own: the listing is as it was before the choice,
  a moment later. A run saving meanwhile changes it: its better step replaces the old best,
  whose folder may still be listed while it is being removed."""
  time.sleep(0.5)
  return checkpointer.steps() == listed


def _restore_steps(checkpointer: ckpt_lib.Checkpointer, which: list[int],
                   chosen: list[tuple[int, str]], record: RunRecord) -> Restored:
  """Restores each chosen step once and stacks replica `which[i]` of step `chosen[i]`."""
  first = chosen[0][0]
  meta = checkpointer.read_meta(first)
  config = ml_collections.ConfigDict(meta["config"])
  model_cfg = model_config(config.model)
  n = config.train.replicas
  whole = _scorer(model_cfg, config, n)
  targets = whole.abstract_variables(config.data.seq_len)
  by_step = {}
  configs = {first: config}
  for s in sorted({s for s, _ in chosen}):
    by_step[s] = checkpointer.restore_arrays(s, targets)
    if s not in configs:
      configs[s] = ml_collections.ConfigDict(checkpointer.read_meta(s)["config"])
  hparams = ([replica_groups(configs[s])[r] for r, (s, _) in zip(which, chosen)]
             if any(c.train.get("replica_hparams", "") for c in configs.values()) else None)
  parts = [replica({"params": by_step[s]["params"], MEMORY: by_step[s][MEMORY]}, r)
           for r, (s, _) in zip(which, chosen)]
  scorer = whole if len(which) == n else _scorer(model_cfg, config, len(which))
  stacked = jax.device_put(jax.tree_util.tree_map(lambda *x: jnp.stack(x), *parts),
                           scorer.state_sharding)
  return Restored(config=config, model_cfg=model_cfg, scorer=scorer, params=stacked["params"],
                  memory=stacked[MEMORY], tokenizer=WordTokenizer.from_json(meta["tokenizer"]),
                  record=record, replicas=which, steps=[s for s, _ in chosen],
                  notes=[note for _, note in chosen], data_sha256=meta.get("data_sha256") or {},
                  hparams=hparams)


def _check_split(split: str) -> None:
  if split not in data_lib.SPLITS:
    raise ConfigError(f"split must be one of {list(data_lib.SPLITS)}, got {split!r} (or give "
                      "data_file, a text file to score).")


def evaluate_split(restored: Restored, split: str, data_file: str | None = None) -> list[dict]:
  """Token-weighted loss and perplexity plus the integration metrics on one split (or file):
  one report per restored replica."""
  config = restored.config
  if data_file:
    windows = data_lib.file_windows(data_file, restored.tokenizer, config.data.seq_len,
                                    "--data_file")
    where, info = data_file, {}
  else:
    _check_split(split)
    try:
      data = data_lib.prepare(config, restored.model_cfg, restored.tokenizer, splits=(split,))
    except DataError as e:  # the run's config names the text: no flag here changes it
      if "no such file" not in str(e) and "symbolic link" not in str(e):
        raise
      raise DataError(f"{str(e).split('; ')[0]}: the {split} text the run was trained with, as "
                      "its config names it; put that file back there, or score another text "
                      "with --data_file=FILE.") from None
    windows, info = data.windows[split], data.info
    where = data_lib.describe(config.data, split)
  batches = data_lib.Batches(windows, restored.scorer.batch_size, 0, shuffle=False)
  extra = {"unk_rate": data_lib.unk_rate(windows, restored.tokenizer)}
  warnings = [data_lib.unk_warning(windows, where, restored.tokenizer)]
  if not data_file:
    warnings.append(data_lib.changed_file_warning(config.data, split, restored.data_sha256))
  if warnings := [w for w in warnings if w]:
    extra["warning"] = "\n".join(warnings)
  if info:  # the embedded corpus: what the best possible model reaches
    for k in ("oracle_perplexity", "previous_word_only_perplexity"):
      extra[k] = info[k]
    # exact only where every word of the scored text has an id (as train.py says of it)
    extra["oracle_applies"] = not bool(np.any(windows == UNK))
  return [{**out, **extra} for out in restored.scorer(restored.params, restored.memory, batches)]


def check_sampling(*, num_tokens: int, temperature: float, top_k: int, vocab_size: int,
                   seed: int = 0) -> None:
  """Refuses sampling settings that cannot give text, before any work is done."""
  if isinstance(seed, (jax.Array, np.ndarray)) and (
      jnp.issubdtype(seed.dtype, jax.dtypes.prng_key)
      or (seed.dtype == np.uint32 and np.shape(seed)[-1:] in ((2,), (4,)))):  # PRNGKey(s)
    raise ConfigError("seed must be an integer, not a key: generate makes key(seed) itself "
                      "(the same key as evaluate.py --seed and a run's logged samples); pass "
                      "the integer the key was made from.")
  for name, value in (("seed", seed), ("num_tokens", num_tokens), ("top_k", top_k)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
      raise ConfigError(f"{name} must be an integer, got {value!r}.")
  if isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.integer,
                                                                   np.floating)):
    raise ConfigError(f"temperature must be a number, got {temperature!r}.")
  if not 0 <= seed < SEED_LIMIT:
    raise ConfigError(f"seed must lie in [0, 2**32) (JAX's keys take 32-bit seeds), got {seed}.")
  if num_tokens < 1:
    raise ConfigError(f"num_tokens must be at least 1, got {num_tokens}.")
  if not (math.isfinite(temperature) and temperature >= 0):
    raise ConfigError(f"temperature must be a finite number >= 0 (0: greedy, 1: the model's "
                      f"distribution), "
                      f"got {temperature}.")
  lo, hi = sampling.TEMPERATURES
  if temperature and not lo <= temperature <= hi:
    raise ConfigError(f"temperature must be 0 (greedy) or lie in [{lo:g}, {hi:.3g}]: the "
                      "logits are divided by it in float32, where a smaller one overflows them "
                      "to infinity (one word then wins whatever the model says) and a larger "
                      f"one is infinite itself; got {temperature}.")
  if not 0 <= top_k <= vocab_size:
    raise ConfigError(f"top_k must lie in [0, vocab_size={vocab_size}] (0: all words), "
                      f"got {top_k}.")


def prompt_to_ids(tokenizer: WordTokenizer, prompt: str, num_tokens: int,
                  model_cfg: ModelConfig) -> np.ndarray:
  """The prompt's ids, refused where no text can be sampled after them."""
  if not isinstance(prompt, str):
    raise ConfigError(f"prompt must be a string of words, got {type(prompt).__name__} "
                      f"{prompt!r:.60}.")
  prompt_ids = tokenizer.encode_prompt(prompt)
  if len(prompt_ids) == 0:
    raise ConfigError("prompt must contain at least one word.")
  if not model_cfg.causal:
    raise ConfigError("generation needs a causal model (model.causal=True).")
  if len(prompt_ids) >= model_cfg.max_len:
    raise ConfigError(f"the prompt alone ({words(len(prompt_ids))}) fills the position table "
                      f"(max_len={model_cfg.max_len}), leaving no room for a word after it: "
                      f"give a prompt of at most {model_cfg.max_len - 1} words.")
  if len(prompt_ids) + num_tokens > model_cfg.max_len:
    raise ConfigError(f"prompt ({words(len(prompt_ids))}) + num_tokens ({num_tokens}) exceeds "
                      f"the position table (max_len={model_cfg.max_len}); ask for at most "
                      f"{model_cfg.max_len - len(prompt_ids)} tokens, or a shorter prompt.")
  return prompt_ids


def words(n: int) -> str:
  """'1 word', 'n words'."""
  return f"{n} word" if n == 1 else f"{n} words"


def _concrete(x):
  """A 0-d NumPy or JAX array as the Python number it holds; anything else as it is."""
  if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    return x  # a key, which check_sampling refuses by name (a legacy one has shape (2,))
  if isinstance(x, (jax.Array, np.ndarray)) and np.shape(x) == ():
    try:
      return x.item()
    except jax.errors.ConcretizationTypeError:  # traced under jit: check_sampling names it
      return x
  return x


def generate(model: InfinitoV52, variables, tokenizer: WordTokenizer, prompt: str,
             num_tokens: int, seed: int = 0, temperature: float = 1.0, top_k: int = 0) -> dict:
  """Samples `num_tokens` words after `prompt` from key(seed); temperature 0 is greedy.

  One jitted loop over a fixed-length buffer (`sampling.sampler`, compiled once per shape).
  The settings may be Python or NumPy numbers or 0-d arrays (a value of `jnp.linspace`).
  """
  num_tokens, seed, temperature, top_k = map(_concrete, (num_tokens, seed, temperature, top_k))
  check_sampling(num_tokens=num_tokens, temperature=temperature, top_k=top_k,
                 vocab_size=model.config.vocab_size, seed=seed)
  if (stacked := stacked_models_message(variables)) is not None:
    raise ConfigError(stacked)
  if len(tokenizer) > model.config.vocab_size:  # its ids would reach past the embedding table
    raise ConfigError(f"the tokenizer has {len(tokenizer)} words and the model's vocab_size is "
                      f"{model.config.vocab_size}: not this model's tokenizer; pass the one it "
                      "was trained with (restore_run(...).tokenizer).")
  prompt_ids = prompt_to_ids(tokenizer, prompt, num_tokens, model.config)
  total = len(prompt_ids) + num_tokens
  buf = np.zeros(total, np.int32)
  buf[:len(prompt_ids)] = prompt_ids
  sample = sampling.sampler(model.config, total, len(tokenizer), temperature, top_k)
  stacked = jax.tree_util.tree_map(lambda x: jnp.asarray(x)[None], variables)
  out = np.asarray(sample(stacked, buf, len(prompt_ids), jax.random.key(seed)[None]))[0, 0]
  unknown = [w for w in prompt.lower().split() if w not in tokenizer.index]
  return {"prompt": prompt, "prompt_as_seen": tokenizer.decode(prompt_ids),
          "unknown_prompt_words": unknown,
          "continuation": tokenizer.decode(out[len(prompt_ids):]), "seed": seed,
          "temperature": temperature, "top_k": top_k}


def refuse_non_finite(restored: Restored, scores: list[dict], where: str,
                      replica: int | None = None, workdir: str | None = None) -> None:
  """A NaN or infinite loss is no score: raises CheckpointError naming each such replica and
  why (weights that hold NaN or infinite values, or finite weights whose activations overflow
  on this text), and how to score something else (the run's other steps, from `workdir`)."""
  frozen = [i for i in range(len(scores))
             if restored.record.replicas[restored.replicas[i]].diverged]
  bad = [i for i, score in enumerate(scores) if not math.isfinite(score["loss"])]
  if len(scores) > 1 and len(frozen) < len(scores):
    # a replica frozen by a divergence (train.on_divergence='freeze') in a population's
    # report: its non-finite numbers are null (JSON has no NaN); the others are its report
    for i in set(bad) & set(frozen):
      scores[i].update({k: None for k, v in scores[i].items()
                        if isinstance(v, float) and not math.isfinite(v)})
    bad = [i for i in bad if i not in frozen]
  if not bad:
    return
  parts = []
  for i in bad:
    leaves = [jax.tree_util.keystr(path) for path, x in
              jax.tree_util.tree_leaves_with_path(restored.variables(i)["params"])
              if not np.all(np.isfinite(np.asarray(x)))]
    why = (f"its weights hold NaN or infinite values in {len(leaves)} array(s) "
           f"({', '.join(leaves[:3])}{', ...' if len(leaves) > 3 else ''})" if leaves else
           "its weights are finite, and its activations overflow on this text")
    diverged = restored.record.replicas[restored.replicas[i]].diverged
    if diverged:
      why += (f" (it diverged in training at step {diverged['step']} and was frozen with the "
              "weights it had: every later step holds the same)")
    parts.append(f"replica {restored.replicas[i]} at step {restored.steps[i]} "
                 f"({scores[i]['loss']}): {why}")
  fine = [restored.replicas[i] for i in range(len(scores)) if i not in bad]
  others = None
  if workdir is not None:
    checkpointer = ckpt_lib.Checkpointer(workdir, read_only=True)
    try:
      others = sorted(set(checkpointer.steps()) - {restored.steps[i] for i in bad})
    finally:
      checkpointer.close()
  # a frozen replica's weights are the same at every step from the one before its divergence:
  # only earlier steps score it differently (it offered those steps again and again)
  froze = [restored.record.replicas[restored.replicas[i]].diverged for i in bad]
  if others is not None and all(froze):
    others = [s for s in others if s < min(d["step"] for d in froze) - 1]
  steps = (STEP_HINT if others is None else f"{STEP_HINT} (available: {others})" if others
           else "no other step is left to choose" if not all(froze) else
           "no step the run keeps holds other weights for it (it froze before its earliest "
           "kept step)")
  raise CheckpointError(
      f"the loss on {where} is not finite for " + "; ".join(parts) + ". Nothing is written. "
      f"A diverged or extreme model: {steps}"
      + (f", or score the others with --replica (replicas {fine})" if fine and replica is None
         else "") + ".")


def attention_note(model_cfg: ModelConfig) -> str | None:
  """What to say when the run chose an attention kernel this process cannot run ('cudnn' or
  'pallas' off an NVIDIA GPU, 'pallas' under a JAX without it), so that sampling takes XLA's
  attention: the same function, to float rounding. (Scoring never uses a fused kernel: the eval
  step computes the metrics from the attention weights, on the exact path.)"""
  asked = model_cfg.attention_impl
  if asked not in ("cudnn", "pallas"):
    return None
  used = fused_attention_impl(model_cfg, model_cfg.dtype)
  if used == asked:
    return None
  why = (f"which this JAX ({jax.__version__}) does not ship"
         if asked == "pallas" and jax.default_backend() == "gpu"
         else f"which runs on NVIDIA GPUs only (this process: {jax.default_backend()})")
  return (f"the run chose model.attention_impl='{asked}', {why}: the samples were drawn with "
          "XLA's attention instead, the same function (to float rounding); the scores take the "
          "exact attention path, as always.")


@python_terms("evaluate.run", EVALUATE_ARGS)
def run(workdir: str, split: str = "validation", step: int | None = None,
        data_file: str | None = None, prompt: str | None = None, num_tokens: int | None = None,
        seed: int | None = None, temperature: float | None = None, top_k: int | None = None,
        replica: int | None = None) -> dict:
  """restore_run + evaluate_split (+ generate); returns the report.

  Every replica of the run is scored (or replica `replica` alone). The report's top-level
  numbers are those of the replica with the best validation loss during training (the only
  one of a single run); `replicas` lists each, and `population` sums them up. With `prompt`,
  `num_tokens` words (40) are sampled after it with `seed` (0), `temperature` (1.0) and
  `top_k` (0: all words); without one, those are refused (they would be ignored).
  """
  sampling = {"num_tokens": num_tokens, "seed": seed, "temperature": temperature,
              "top_k": top_k}
  given = [name for name, value in sampling.items() if value is not None]
  if given and prompt is None:
    raise ConfigError(f"{', '.join(given)} {'sets' if len(given) == 1 else 'set'} how words are "
                      "sampled after a prompt: pass prompt='TEXT' too (or drop "
                      f"{'it' if len(given) == 1 else 'them'} to only score).")
  num_tokens = 40 if num_tokens is None else num_tokens
  seed = 0 if seed is None else seed
  temperature = 1.0 if temperature is None else temperature
  top_k = 0 if top_k is None else top_k
  with jax_settings_restored():  # the run's cache and threefry settings, for this call only
    return _run(workdir, split, step, data_file, prompt, num_tokens, seed, temperature, top_k,
                replica)


def _run(workdir, split, step, data_file, prompt, num_tokens, seed, temperature, top_k,
         replica) -> dict:
  if data_file is None:
    _check_split(split)  # before the restore's work
  workdir, step = resolve_ckpt(workdir, step)
  from_env = "JAX_COMPILATION_CACHE_DIR" in os.environ  # it wins over the run's config
  if from_env:  # before the restore compiles anything (JAX would warn there first)
    use_compilation_cache("")
  restored = restore_run(workdir, step, replica)
  if not from_env:
    use_compilation_cache(restored.config.train.get("compilation_cache",
                                                    DEFAULT_COMPILATION_CACHE),
                          # evaluate.py takes no --config: the environment sets it here
                          setting="JAX_COMPILATION_CACHE_DIR (the folder was the run's "
                                  "train.compilation_cache)")
  use_threefry_kernel(restored.config.train.get("threefry_kernel", False))
  if prompt is not None:  # refuse bad sampling flags and prompts before the scoring work
    check_sampling(num_tokens=num_tokens, temperature=temperature, top_k=top_k,
                   vocab_size=restored.model_cfg.vocab_size, seed=seed)
    prompt_to_ids(restored.tokenizer, prompt, num_tokens, restored.model_cfg)
  scores = evaluate_split(restored, split, data_file)
  refuse_non_finite(restored, scores, data_file or split, replica, workdir)
  where = ckpt_lib.checkpoint_dir(workdir)
  # train.replica_hparams: a seed recurs in every group, so each replica's values say which
  # (those its scored step was trained with)
  groups = restored.hparams
  rows = [{"replica": r, "seed": restored.record.replicas[r].seed,
           **({"hparams": groups[i]} if groups else {}),
           # train.on_divergence='freeze': where its training diverged and it was frozen
           **({"diverged": restored.record.replicas[r].diverged}
              if restored.record.replicas[r].diverged else {}),
           "checkpoint": os.path.join(where, str(s)), "step": s, "chosen": note, **score}
          for i, (r, s, note, score) in enumerate(zip(restored.replicas, restored.steps,
                                                      restored.notes, scores))]
  best = restored.record.best_replica
  lead = restored.replicas.index(best) if best in restored.replicas else 0
  why = None
  if rows[lead]["loss"] is None:  # a frozen replica's weights with no score: another leads
    lead = next(i for i, row in enumerate(rows) if row["loss"] is not None)
    why = "the first with a finite score"
  report = {"split": os.path.abspath(data_file) if data_file else split, "workdir": workdir,
            **rows[lead], "devices": restored.scorer.mesh.size, "processes": jax.process_count(),
            # why the top level is this replica's
            "lead": why or ("the one asked for" if replica is not None else
                     "the only replica" if len(restored.replicas) == 1 else
                     "the best in training" if best in restored.replicas else
                     "the first: no validation yet to rank them")}
  notes = [n for n in (attention_note(restored.model_cfg) if prompt is not None else None,) if n]
  if not restored.model_cfg.causal:
    notes.append("model.causal=false: each position attends to the later words too (the "
                 "original's computation), so this perplexity is not that of a model "
                 "predicting the next word from the earlier ones.")
  if notes:
    report["note"] = " ".join(notes)
  if len(rows) > 1:
    from infinito_jax import stats  # pylint: disable=g-import-not-at-top
    trained = ([r for r in rows if "diverged" not in r]  # frozen ones: left out
               or [r for r in rows if r["perplexity"] is not None])
    # (finite for a run gone astray: perplexities ~1e303)
    report["population"] = stats.population([r["perplexity"] for r in trained], "perplexity")
    if len(trained) < len(rows):
      report["population"]["diverged"] = [r["replica"] for r in rows if "diverged" in r]
    if groups:  # the groups of train.replica_hparams, apart, named by the scored steps' values
      counted = {r["replica"] for r in trained}
      report["population"]["groups"] = group_statistics(
          restored.config, [r["perplexity"] if r["replica"] in counted else None for r in rows],
          "perplexity", [r["replica"] for r in rows], labels=groups)
    report["replicas"] = rows
  if prompt is not None:
    report["generation"] = generate(restored.model, restored.variables(lead), restored.tokenizer,
                                    prompt, num_tokens, seed, temperature, top_k)
  return report
