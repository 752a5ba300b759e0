"""Studies: variants x seeds, each variant one population run, and the statistics between them.

  python -m infinito_jax.study --config configs/study_v51_v52.py --workdir runs/study

A study config (see configs/study_tiny.py) holds a `base` run config, `variants` (a tuple of
(name, {field: value}) overrides of it), `seeds` per variant and the `baseline` variant. Each
variant trains as one population (`train.replicas = seeds`: replica r is the single run of seed
`base.seed + r`) in <workdir>/runs/<name>, so a study stopped at any point resumes where it was
(a finished variant is not trained again) and variants run one after another. Variants that
change only optimisation values a population's replicas may differ in (learning rate, its
schedule, weight decay, Adam's betas and eps, clipping: config.REPLICA_HPARAMS) train together
as one population of variants x seeds replicas (train.replica_hparams, in
<workdir>/runs/_values-<hash of the groups>;
each replica still equals its single run), unless `together` is False. Then:
- validation perplexity (best and final): mean, std and 95% t interval over seeds; against the
  baseline, Welch's t-test (Holm-corrected over the variants) and Cohen's d;
- convergence: steps to reach `target_perplexity`, and the area under the validation curve;
- memory: parameters, bytes of training state per replica, peak device memory where reported;
- generation: fixed prompts and keys, distinct-1/2, repetition rate, the perplexity of the
  samples under the best variant's best replica, and a few samples;
- reproducibility: `same_key_replicas` replicas of the baseline's first seed trained together
  from one key are bitwise identical (a property of the design: the std is exactly 0).
A variant whose training diverges (a NaN or inf loss, gradient norm or weights) in any of its
seeds is a finding, not the end of the study (`on_divergence`, default "record"): it is
reported as diverged, with the step and the seeds, and left out of the statistics. Its
diverged seeds are frozen (train.on_divergence='freeze', whatever the base config says) and
the run trains on while some variant in it has all its seeds: the variants it trained together
with keep their results (each replica is its own run), and a run whose every variant has a
diverged seed ends there (a run that must stop otherwise, its weights overflowed before its
loss said so, trains its other variants again as a population without it). "stop" ends the
study at the first divergence with an error that names the variant.
Writes <workdir>/study.json, study.md and PNGs (validation curves; best perplexity with intervals).
"""

import dataclasses
import functools
import hashlib
import contextlib
import json
import math
import os
import re
import shlex
import sys
import time

if __name__ == "__main__":  # the command: before the slow imports below
  from infinito_jax import hostmem  # pylint: disable=g-import-not-at-top
  from infinito_jax.lifecycle import StopSignals  # pylint: disable=g-import-not-at-top
  hostmem.at_startup()  # before JAX starts its threads (infinito_jax/hostmem.py)
  # a signal during start-up stops the study cleanly (exit 0) instead of killing it
  _STOP = StopSignals(hard_abort=True).install()

import jax  # pylint: disable=g-import-not-at-top,g-bad-import-order
import jax.numpy as jnp
import ml_collections
import numpy as np

from infinito_jax import checkpoint as ckpt_lib
from infinito_jax import errors as errors_lib
from infinito_jax import config as config_lib
from infinito_jax import evaluate
from infinito_jax import lifecycle
from infinito_jax import sampling
from infinito_jax import stats
from infinito_jax.errors import (ConfigError, DamagedCheckpointError, InfinitoError,
                                 NonFiniteLossError, WorkdirBusyError, WorkdirError)
from infinito_jax.model import InfinitoV52, model_config
from infinito_jax.tokenizer import UNK
from infinito_jax.train import (Trainer, check_fits, check_platform, check_unsaved_record,
                                jax_settings_restored, loss_gradient_form, optimizer_form,
                                perplexity, population_form, replica_seeds, single_replica_form,
                                train_and_evaluate, use_compilation_cache)

STUDY_FIELDS = ("base", "variants", "seeds", "baseline", "target_perplexity", "prompts",
                "sample_tokens", "sample_seeds", "temperature", "top_k", "same_key_replicas",
                "same_key_epochs", "shown_samples", "together", "on_divergence")
STUDY_DEFAULTED = ("together", "on_divergence")  # fields a study's config may leave out
ON_DIVERGENCE = ("record", "stop")


@dataclasses.dataclass
class Variant:
  name: str
  overrides: dict
  config: ml_collections.ConfigDict


def variant_configs(study: ml_collections.ConfigDict) -> list[Variant]:
  """The run config of every variant, checked before any training.

  Raises:
    ConfigError: an unknown study or run field, seeds < 2, a duplicate or missing baseline name,
      or a variant config that cannot work.
  """
  errors_lib.check_config_dict(study, "the study's config", "configs/study_tiny.py")
  _refuse_a_run_config(study)
  unknown = sorted(set(study.keys()) - set(STUDY_FIELDS))
  if unknown:
    raise ConfigError(f"unknown study field(s) {unknown}; a study has {list(STUDY_FIELDS)} "
                      "(see configs/study_tiny.py).")
  missing = [f for f in STUDY_FIELDS if f not in study and f not in STUDY_DEFAULTED]
  if missing:
    raise ConfigError(f"the study's config lacks {', '.join(missing)}: build it as "
                      "configs/study_tiny.py does (a base config, variants, seeds, ...).")
  seeds = study.seeds
  if not (isinstance(seeds, int) and not isinstance(seeds, bool) and seeds >= 2):
    raise ConfigError(f"study.seeds={seeds!r}: a study needs at least 2 seeds per variant (the "
                      "spread over seeds is what it measures); set --config.seeds=5.")
  _check_study_fields(study)
  entries = list(study.variants) if isinstance(study.variants, (list, tuple)) else None
  if not entries or not all(isinstance(e, (list, tuple)) and len(e) == 2 and
                            isinstance(e[0], str) and isinstance(e[1], dict) for e in entries):
    raise ConfigError(f"study.variants={study.variants!r}: a tuple of (name, {{field: value}}) "
                      "pairs, e.g. (('v5.2', {}), ('no-dropout', {'model.dropout': 0.0})).")
  names = [name for name, _ in entries]
  if len(set(names)) != len(names):
    raise ConfigError(f"study.variants must name each variant once; got {names}.")
  if study.baseline not in names:
    raise ConfigError(f"study.baseline={study.baseline!r} is not a variant; variants: {names}.")
  base_train = study.base.train
  if base_train.replicas != 1 or base_train.seed_stride != 1:
    raise ConfigError(f"study.base sets train.replicas={base_train.replicas} / train.seed_stride="
                      f"{base_train.seed_stride}: the study sets them (study.seeds replicas of "
                      "seeds base.seed + r); leave them at 1.")
  if base_train.get("allow_changes", False):
    raise ConfigError("study.base sets train.allow_changes=true: a study compares runs trained "
                      "under the values it reports, so a kept run is never continued under "
                      "changed ones. To train a variant again with new values, delete its "
                      "folder DIR/runs/<variant> (a value-only variant's: the runs/_values-* "
                      "one), or start the study in a new --workdir.")
  if base_train.get("replica_hparams", ""):
    raise ConfigError(f"study.base sets train.replica_hparams={base_train.replica_hparams!r}: a "
                      "study's replicas are its seeds; give each set of values as a variant "
                      "(value-only variants train together in one population by themselves).")
  out = []
  for name, overrides in entries:
    if (not name or name.startswith((".", "_")) or any(ch in name for ch in "/\\|")
        or not name.isprintable() or len(name.encode()) > 100):
      raise ConfigError(f"variant name {name!r} must be a plain folder name of at most 100 "
                        "bytes, without '/', '\\', '|' or control characters, not starting with "
                        "'.' or '_' (the study's own runs use '_'): rename the variant.")
    c = study.base.copy_and_resolve_references()
    c.unlock()
    for field, value in dict(overrides).items():
      if field not in config_lib.FIELDS:
        group = [f for f in config_lib.FIELDS if f.startswith(f"{field}.")]
        raise ConfigError(
            f"variant {name!r} sets {field!r}, which is a group of fields: name each field it "
            f"changes, e.g. {{'{group[0]}': ...}} (a variant's overrides are flat)" if group else
            f"variant {name!r} sets {field!r}, which is not a config field; see "
            "configs/default.py for the fields.")
      if field == "train.stop_after_steps" and value:
        raise ConfigError(f"variant {name!r} sets train.stop_after_steps: its run would pause "
                          "there at every command, and the study, which compares finished runs, "
                          "would never end; pause the whole study with "
                          "--config.base.train.stop_after_steps, or shorten the variant with "
                          "train.epochs.")
      if field == "train.allow_changes":
        raise ConfigError(f"variant {name!r} sets train.allow_changes: a study never continues "
                          "a kept run under changed values (its results would be reported "
                          "under values they were not trained with); delete the variant's run "
                          "folder under DIR/runs to train it again.")
      if field == "train.on_divergence":
        raise ConfigError(f"variant {name!r} sets train.on_divergence: a study decides what a "
                          "divergence does itself (--config.on_divergence: 'record' or 'stop'); "
                          "leave it out of the variant.")
      if field in ("train.replicas", "train.seed_stride", "seed", "train.replica_hparams"):
        raise ConfigError(f"variant {name!r} sets {field!r}: the study sets the seeds "
                          "(base.seed + r for r < study.seeds) and groups value-only variants "
                          "itself; make each set of values a variant of its own.")
      group, key = field.rsplit(".", 1) if "." in field else ("", field)
      target = c
      for part in group.split(".") if group else []:
        target = target[part]
      try:
        target[key] = value
      except (TypeError, ValueError) as e:
        raise ConfigError(f"variant {name!r}: {field}={value!r} does not fit the field "
                          f"({str(e).splitlines()[0]}).") from None
    c.train.replicas, c.train.seed_stride = seeds, 1
    try:
      config_lib.validate(c)
    except ConfigError as e:
      raise ConfigError(_variant_error(study, name, dict(overrides), seeds, e)) from None
    _check_variant_against_study(name, c, study)
    for other in out:
      if _trained(other.config) == _trained(c):
        raise ConfigError(
            f"variants {other.name!r} ({other.overrides or 'no overrides'}) and {name!r} "
            f"({dict(overrides) or 'no overrides'}) train the same config (with study.base's "
            "values; fields of logging and saving aside): their seeds would train bitwise "
            "alike, a comparison of nothing. Give one of them other values, or leave it out.")
    out.append(Variant(name, dict(overrides), c))
  return out


def _trained(config: ml_collections.ConfigDict) -> dict:
  """What a config trains: its fields but those of logging and saving (_NOT_TRAINED), with
  model.attention_dropout's None as the model.dropout it stands for, and numbers as the
  float32 step holds them."""
  flat = {k: v for k, v in config_lib.flatten(config.to_dict()).items() if k not in _NOT_TRAINED}
  if flat.get("model.attention_dropout") is None:
    flat["model.attention_dropout"] = flat.get("model.dropout")
  return {k: float(np.float32(v)) if isinstance(v, float) else v for k, v in flat.items()}


def _variant_error(study, name: str, overrides: dict, seeds: int, error: ConfigError) -> str:
  """A variant's refused config, told in the study's terms: where the base alone is refused
  alike, the fault is the base's and its flags are --config.base.*; otherwise the variant's
  overrides are named beside the error."""
  base = study.base.copy_and_resolve_references()
  base.unlock()
  base.train.replicas, base.train.seed_stride = seeds, 1
  try:
    config_lib.validate(base)
  except ConfigError as e:
    if str(e) == str(error):
      return f"study.base: {str(e).replace('--config.', '--config.base.')}"
  return (f"variant {name!r} (study.base with {overrides or 'no overrides'}): {error} The "
          "variant's overrides are in the study config's `variants`.")


def _check_study_fields(study) -> None:
  """The study's own settings, checked before any training."""
  def need(ok, field, rule):
    if not ok:
      raise ConfigError(f"study.{field}={study[field]!r}: {rule}.")

  is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
  need(is_int(study.same_key_replicas) and (study.same_key_replicas == 0 or
                                            study.same_key_replicas >= 2),
       "same_key_replicas", "0 (off) or at least 2")
  need(is_int(study.same_key_epochs) and study.same_key_epochs >= 0, "same_key_epochs",
       "an integer >= 0 (0: the base config's epochs)")
  need(is_int(study.sample_tokens) and study.sample_tokens >= 1, "sample_tokens",
       "an integer >= 1")
  need(is_int(study.top_k) and study.top_k >= 0, "top_k", "an integer >= 0 (0: all words)")
  need(is_int(study.shown_samples) and study.shown_samples >= 0, "shown_samples",
       "an integer >= 0")
  if "on_divergence" in study:
    need(study.on_divergence in ON_DIVERGENCE, "on_divergence", "'record' (a variant whose "
         "loss becomes non-finite is reported as diverged and the study goes on, the default) "
         "or 'stop' (the study ends there with an error)")
  if "together" in study:
    need(isinstance(study.together, bool), "together", "True (value-only variants train in one "
         "population, the default) or False (every variant alone)")
  lo, hi = sampling.TEMPERATURES
  need(isinstance(study.temperature, (int, float)) and (
      study.temperature == 0 or lo <= study.temperature <= hi), "temperature",
       f"0 (greedy) or a number in [{lo:g}, {hi:.3g}] (float32 logits are divided by it: a "
       "smaller one overflows them, a larger one is infinite itself)")
  need(isinstance(study.target_perplexity, (int, float)) and study.target_perplexity > 1,
       "target_perplexity", "a perplexity > 1 (convergence: steps until validation reaches it)")
  need(isinstance(study.sample_seeds, (list, tuple)) and len(study.sample_seeds) >= 1
       and all(is_int(x) and 0 <= x < config_lib.SEED_LIMIT for x in study.sample_seeds),
       "sample_seeds", "a non-empty tuple of integers in [0, 2**32) (the sampling keys; JAX's "
       "keys take 32-bit seeds: a larger one would silently be another)")
  need(isinstance(study.prompts, (list, tuple)) and len(study.prompts) >= 1
       and all(isinstance(p, str) and p.split() for p in study.prompts), "prompts",
       "a non-empty tuple of texts, each with at least one word")


PPL = (1.0, None)  # a perplexity is at least 1: intervals are cut there


def _check_variant_against_study(name: str, c, study) -> None:
  """What the analysis after training asks of a variant, checked before any training."""
  if not c.model.causal:
    raise ConfigError(f"variant {name!r} sets model.causal=False: each position then sees the "
                      "word it predicts, so its perplexity and its samples compare with nothing "
                      "(and it would judge the others' samples); a study compares causal models.")
  if study.top_k > c.model.vocab_size:
    raise ConfigError(f"study.top_k={study.top_k} exceeds the model.vocab_size of variant "
                      f"{name!r} ({c.model.vocab_size}); set --config.top_k to at most that (0: "
                      "all words).")
  longest = max(len(p.split()) for p in study.prompts)
  if longest + study.sample_tokens > c.model.max_len:
    raise ConfigError(f"the longest prompt ({longest} words) plus study.sample_tokens="
                      f"{study.sample_tokens} exceeds the model.max_len of variant {name!r} "
                      f"({c.model.max_len}); ask for fewer tokens or shorter prompts.")


@functools.lru_cache(maxsize=None)
def _scorer(model_cfg):
  model = InfinitoV52(model_cfg)

  @jax.jit
  def score(variables, ids, starts):
    """Mean loss per sample of its sampled tokens (positions >= start)."""
    logits, _ = model.apply(variables, ids[:, :-1])
    targets = ids[:, 1:]
    counted = jnp.arange(targets.shape[1])[None, :] + 1 >= starts[:, None]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    nll = -jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
    return jnp.sum(nll * counted, 1) / jnp.maximum(jnp.sum(counted, 1), 1)

  return score


def distinct(samples: list[list[int]], n: int) -> float:
  """Distinct n-grams over all n-grams of the samples (pooled)."""
  grams = [tuple(s[i:i + n]) for s in samples for i in range(len(s) - n + 1)]
  return len(set(grams)) / len(grams) if grams else 0.0


def repetition_rate(samples: list[list[int]], contexts: list[list[int]]) -> float:
  """The fraction of sampled words already seen earlier in the same text (prompt included)."""
  repeated = total = 0
  for s, ctx in zip(samples, contexts):
    seen = set(ctx)
    for w in s:
      repeated += w in seen
      total += 1
      seen.add(w)
  return repeated / max(total, 1)


def generation_samples(restored: evaluate.Restored, study, names=()) -> dict:
  """Samples of every replica on the study's prompts and keys: ids and texts. `names`: the
  variants trained in the run, for the warning about prompt words it does not know."""
  tok = restored.tokenizer
  prompts = [tok.encode_prompt(p) for p in study.prompts]
  unknown = sorted({w for p in study.prompts for w in p.lower().split() if w not in tok.index})
  if unknown:
    whose = f" of {', '.join(names)}" if names else ""
    print(f"warning: prompt words {unknown} are not in the vocabulary{whose} and become <unk> "
          "in its samples.")
  length = max(len(p) for p in prompts) + study.sample_tokens
  if length > restored.model_cfg.max_len:
    raise ConfigError(f"the longest prompt plus study.sample_tokens={study.sample_tokens} exceeds "
                      f"model.max_len={restored.model_cfg.max_len}; ask for fewer.")
  sample = sampling.sampler(restored.model_cfg, length, len(tok), study.temperature,
                            min(study.top_k, len(tok)))  # more than the words there are: all
  keys = jnp.stack([jax.random.key(s) for s in study.sample_seeds])
  variables = {"params": restored.params, "memory": restored.memory}
  rows = []  # (replica, prompt index, seed, full ids, start)
  for p, ids in enumerate(prompts):
    buf = np.zeros(length, np.int32)
    buf[:len(ids)] = ids
    # Every variant and replica draws with the same keys (common random numbers: differences
    # between variants come from the models, not the draws); each prompt gets its own keys.
    prompt_keys = jax.vmap(lambda k: jax.random.fold_in(k, p))(keys)
    out = np.asarray(sample(variables, jnp.asarray(buf), len(ids), prompt_keys))  # [N, K, length]
    for r in range(out.shape[0]):
      for k, seed in enumerate(study.sample_seeds):
        end = len(ids) + study.sample_tokens
        rows.append((r, p, seed, out[r, k, :end], len(ids)))
  return {"rows": rows, "length": length}


def _in_judges_words(rows, tokenizer, judge_tokenizer, study):
  """`rows` (generation_samples') as the judge reads them, and the share of sampled words it
  does not know (None where the vocabularies are one): a variant with another vocabulary (its
  size, its corpus) samples ids of its own, which the judge would read as other words (or
  beyond its table: NaN). The prompt is encoded by the judge; each sampled word is mapped to
  the judge's id for it, <unk> where it has none."""
  if tokenizer.words == judge_tokenizer.words:
    return rows, None
  to_judge = np.array([judge_tokenizer.index.get(w, UNK) for w in tokenizer.words], np.int32)
  to_judge[list(tokenizer.unknown_ids())] = UNK
  out, unknown, total = [], 0, 0
  for r, p, seed, full, start in rows:
    prompt = judge_tokenizer.encode_prompt(study.prompts[p])
    own = np.asarray(full[start:])
    sampled = to_judge[own]
    unknown += int(np.sum((sampled == UNK) & (own != UNK)))
    total += len(sampled)
    out.append((r, p, seed, np.concatenate([prompt, sampled]).astype(np.int32), len(prompt)))
  return out, unknown / max(total, 1)


def _judge_perplexity(judge: evaluate.Restored, judge_index: int, rows, length: int) -> list[float]:
  """Per-sample perplexity of the sampled words under the judge (judge_variant's best
  replica); samples are padded to `length` with <pad> (never counted)."""
  ids = np.zeros((len(rows), length), np.int32)
  starts = np.zeros(len(rows), np.int32)
  for i, (_, _, _, full, start) in enumerate(rows):
    ids[i, :len(full)] = full
    starts[i] = start
  loss = np.asarray(_scorer(judge.model_cfg)(judge.variables(judge_index), jnp.asarray(ids),
                                             jnp.asarray(starts)))
  return [perplexity(float(x)) for x in loss]


def _state_bytes(config) -> int:
  """Bytes of one replica's training state (parameters, optimizer state, memory, key)."""
  c = config.copy_and_resolve_references()
  c.train.replicas = 1
  trainer = Trainer(c, model_config(c.model), steps_per_epoch=1)
  return int(sum(x.size * x.dtype.itemsize
                 for x in jax.tree_util.tree_leaves(trainer.abstract_state())))


def _peak_memory() -> int | None:
  stats_ = jax.local_devices()[0].memory_stats() or {}
  return stats_.get("peak_bytes_in_use")


def _curves(history: list[dict], replicas) -> list[tuple[list[int], list[float]]]:
  """The validation curve (steps, perplexities) of each replica index in `replicas`."""
  vals = [h for h in history if h["kind"] == "validation"]
  out = []
  for r in replicas:
    mine = [v for v in vals if v.get("replica", 0) == r]
    out.append(([v["step"] for v in mine], [v["perplexity"] for v in mine]))
  return out


def value_only(v: Variant) -> bool:
  """True where a variant changes only optimisation values that replicas of one population may
  differ in (train.replica_hparams): such variants can train together."""
  return all(f.startswith("train.") and f[len("train."):] in config_lib.REPLICA_HPARAMS
             for f in v.overrides)


@dataclasses.dataclass
class StudyRun:
  """One population run of a study: one variant, or several value-only variants together
  (variant i of `variants` holds replicas i*seeds .. (i+1)*seeds - 1)."""
  name: str
  variants: list
  config: ml_collections.ConfigDict


def plan_runs(study, variants: list[Variant]) -> list[StudyRun]:
  """Value-only variants in one population (train.replica_hparams) where study.together (default
  True) and there are at least two of them; every other variant alone, in the given order."""
  together = [v for v in variants if value_only(v)] if study.get("together", True) else []
  if len(together) < 2 or study.base.train.grad_accum_steps != 1:  # replica_hparams needs 1
    together = []
  runs, joined = [], False
  for v in variants:
    if v not in together:
      runs.append(StudyRun(v.name, [v], v.config))
    elif not joined:
      joined = True
      c = study.base.copy_and_resolve_references()
      c.train.replicas, c.train.seed_stride = study.seeds * len(together), 1
      c.train.replica_hparams = ";".join(
          ",".join(f"{f[len('train.'):]}={x!r}" for f, x in w.overrides.items())
          for w in together)
      config_lib.validate(c)
      # named by what it trains: a study given another set of value-only variants trains a new
      # population beside the old one instead of refusing to resume it
      tag = hashlib.sha1(f"{c.train.replica_hparams}|{study.seeds}".encode()).hexdigest()[:8]
      runs.append(StudyRun(f"_values-{tag}", together, c))
  return runs


@errors_lib.python_terms("run_study")
def run_study(study: ml_collections.ConfigDict, workdir: str,
              stop: lifecycle.StopSignals | None = None) -> dict:
  """Trains every variant (resuming what exists), analyses, writes study.json / .md / PNGs.

  `stop`: signal handlers installed by the caller (the command line's: a signal during a run
  finishes its step and saves; elsewhere the study stops at its next check, StopRequested); by
  default they are installed here for the call (a second signal raises KeyboardInterrupt), and
  {"status": "interrupted"} is returned when a signal stopped it.
  """
  workdir = errors_lib.workdir_path(workdir)  # ('' trained the study into the current folder)
  if stop is None:  # a library call: Ctrl-C between runs is taken at the study's checks too
    # (Python's own KeyboardInterrupt can be swallowed by XLA's and the gc's callbacks)
    with lifecycle.StopSignals(idle_raises=True) as own:
      own.again = "run_study again with the same config and workdir"
      try:
        return run_study(study, workdir, own)
      except lifecycle.StopRequested:
        return {"status": lifecycle.INTERRUPTED}
  variants = variant_configs(study)
  runs = plan_runs(study, variants)
  # the environment's forms, checked now
  single_replica_form(), population_form(), optimizer_form(), loss_gradient_form()
  from infinito_jax import writers as writers_lib  # pylint: disable=g-import-not-at-top
  for run in runs:  # wandb not installed, cuDNN without a GPU: refused before anything is made
    writers_lib.check_available(run.config)
    check_platform(run.config)
  workdir = os.path.abspath(workdir)
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise WorkdirError(f"cannot use {workdir} as a study's workdir ({e.strerror}"
                       f"{lifecycle.in_the_way(workdir, e)}); choose a --workdir in a folder you "
                       "can write to.") from None
  if lifecycle.holds_run(workdir):  # train.py's files, and its curves.png beside the study's
    raise WorkdirError(f"{workdir} holds a training run (config.json, checkpoints/): a study "
                       "keeps its runs under DIR/runs and its outputs beside them; choose "
                       "another --workdir. Nothing was changed.")
  # one study per workdir: its runs' own locks leave the analysis and the outputs unguarded
  lock = lifecycle.WorkdirLock(workdir)
  try:
    lock.acquire()
  except WorkdirBusyError as e:
    raise WorkdirBusyError(str(e).replace("one training run at a time may write there",
                                          "one study at a time may run there").replace(
        " evaluate.py can read the workdir meanwhile.", "")) from None
  try:
    # the runs' compilation cache for the study's own programs too (scoring, sampling); the
    # process's settings as they were once it returns
    with jax_settings_restored():
      use_compilation_cache(study.base.train.compilation_cache,
                            setting="--config.base.train.compilation_cache")
      return _run_study(study, workdir, stop, variants, runs)
  finally:
    lock.release()


OUTPUTS = ("curves.png", "perplexity.png", "study.md", "study.json")


def _check_outputs(workdir: str) -> None:
  """Refuses a folder (or anything but a file) at an output's name: os.replace cannot put the
  output there, and the outputs are renamed into place as one set."""
  in_the_way = [o for o in OUTPUTS + (DIVERGED,) if os.path.lexists(os.path.join(workdir, o))
                and not os.path.isfile(os.path.join(workdir, o))]
  if in_the_way:
    raise WorkdirError(f"{', '.join(os.path.join(workdir, o) for o in in_the_way)} "
                       f"{'is' if len(in_the_way) == 1 else 'are'} not a file: the study writes "
                       "its outputs under these names. Move or delete "
                       f"{'it' if len(in_the_way) == 1 else 'them'} and run the same command "
                       "again (the trained runs are kept).")


def _run_study(study, workdir: str, stop, variants, runs) -> dict:
  """run_study's work, under the study's lock."""
  _check_outputs(workdir)  # before anything trains
  for name in os.listdir(workdir):  # diverged.json's temporary file from a killed command
    if name.startswith(f".{DIVERGED}.") and name.endswith(".tmp"):
      with contextlib.suppress(OSError):
        os.remove(os.path.join(workdir, name))
  kept = [(run.config, run.name) for run in runs + _kept_replans(study, runs, workdir)]
  if (same := _same_key_config(study, variants)) is not None:
    kept.append((same, "_same_key"))
  for config, name in kept:  # every run, before any trains: the variants would differ in
    # training (a run trained longer before), or train.py would refuse it at its turn (its
    # kept config changed, or a population too large for the memory)
    _check_budget(config, os.path.join(workdir, "runs", name), name)
    _check_kept_config(config, workdir, name)
    try:
      check_fits(config)
    except InfinitoError as e:
      raise _in_study_terms(e, workdir, name) from None
  _check_stop(stop)
  t0 = time.time()
  by_variant, diverged = {}, {}
  paused = []
  record = study.get("on_divergence", "record") == "record"
  runs, i = list(runs), 0
  while i < len(runs):
    run, i = runs[i], i + 1
    what = "; ".join(f"{v.name} ({', '.join(f'{k}={x!r}' for k, x in v.overrides.items())}"
                     f"{'' if v.overrides else 'the base config'})" for v in run.variants)
    how = (f"{study.seeds} seeds in one population" if len(run.variants) == 1 else
           f"{len(run.variants)} variants x {study.seeds} seeds together in one population "
           "(train.replica_hparams)")
    _check_stop(stop)
    print(f"\n=== run {i}/{len(runs)}: {what}, {how} ===", flush=True)
    kept = _kept_divergence(workdir, run) if record else None
    if not record:  # 'stop': a kept run whose seeds froze under 'record' ends it untrained
      _check_not_frozen(study, run, workdir)
    started = time.time() - _trained_before(os.path.join(workdir, "runs", run.name))
    try:
      if kept is not None:
        raise kept
      summary = _train(run.config, os.path.join(workdir, "runs", run.name), workdir, run.name,
                       stop, variants=[v.name for v in run.variants for _ in range(study.seeds)],
                       record_divergence=record)
    except NonFiniteLossError as e:
      if not record or not getattr(e, "replicas", None):  # 'stop': the study's error
        raise
      _stopped({"status": None}, stop)  # the run is closed
      e.seconds = kept.seconds if kept is not None else time.time() - started
      if kept is None:
        _keep_divergence(workdir, run, e)
      again = _record_divergence(study, run, e, diverged, workdir)
      runs[i:i] = again  # the variants it trained with, as a population of their own
      if again:  # the plan grew: "run 3/3" after "run 2/2" reads as meant
        print(f"The study's plan now has {len(runs)} runs.", flush=True)
      continue
    if _stopped(summary, stop):
      return {"status": lifecycle.INTERRUPTED}
    if not record:  # a kept run frozen under 'record' whose summary.json did not say so
      _check_not_frozen(study, run, workdir, summary)
    if summary["status"] == lifecycle.STOPPED:
      paused.append((", ".join(v.name for v in run.variants), summary["steps"]))
    else:  # the seeds frozen in a run that trained on
      _record_frozen(study, run, summary, diverged, workdir)
    _check_budget(run.config, os.path.join(workdir, "runs", run.name), run.name, summary)
    peak = _peak_memory()
    for g, v in enumerate(run.variants):
      off = g * study.seeds
      mine = dict(summary, replicas=[dict(r, replica=r["replica"] - off)
                                     for r in summary["replicas"][off:off + study.seeds]])
      by_variant[v.name] = {"variant": v, "summary": mine, "peak": peak, "offset": off,
                            "together_with": [w.name for w in run.variants if w is not v]}
  if len(diverged) == len(variants):
    own = {v.name: v.overrides["train.learning_rate"] for v in variants
           if "train.learning_rate" in v.overrides}
    where = ("the learning rates the variants set in the study's config ("
             + ", ".join(f"{n}: {x:g}" for n, x in own.items()) + ")"
             + (", and the base's (--config.base.train.learning_rate) for the others"
                if len(own) < len(variants) else "")
             if own else "the base config's learning rate (--config.base.train.learning_rate)")
    raise NonFiniteLossError(
        "every variant of the study diverged "
        f"({_said({v.name: diverged[v.name] for v in variants})}): there is nothing to compare. "
        f"Lower {where}, the clip norm (train.clip_norm) or the weight decay "
        "(train.weight_decay), or add or lengthen a warmup "
        "(train.warmup_steps); the runs are kept under "
        f"{os.path.join(workdir, 'runs')} (delete them to train again).")
  results = [by_variant[v.name] for v in variants if v.name not in diverged]
  if study.baseline in diverged:
    same_key = None
    if _same_key_config(study, variants) is not None:
      same_key = {"skipped": f"it trains the baseline {study.baseline!r}, which diverged"}
      print(f"\nThe reproducibility check is skipped: it trains the baseline "
            f"{study.baseline!r}, which diverged.", flush=True)
  else:
    same_key = _same_key_check(study, variants, workdir, stop)
  if same_key and same_key.get("status") == lifecycle.INTERRUPTED:
    return same_key
  if same_key and same_key.get("status") == lifecycle.STOPPED:
    paused.append(("the reproducibility check", same_key["steps"]))
  if paused:
    print("\nThe runs paused at train.stop_after_steps ("
          + "; ".join(f"{name} at step {step}" for name, step in paused)
          + "): the analysis compares finished runs only. Run the same command without "
          "--config.base.train.stop_after_steps (or with 0) to finish them; what was trained "
          "is kept.", flush=True)
    return {"status": lifecycle.STOPPED}
  _check_stop(stop)
  print("\n=== analysis: scoring samples and statistics ===", flush=True)
  report = analyse(study, results, same_key, stop, diverged=diverged,
                   order=[v.name for v in variants])
  _check_stop(stop)  # the last check: from here the outputs are written
  report["wall_time_s"] = time.time() - t0
  # the runs that diverged count too (their training up to the divergence, in the command
  # that trained them)
  report["diverged_training_wall_time_s"] = sum(
      {d["run"]: d["seconds"] for d in diverged.values()}.values())
  report["training_wall_time_s"] = sum(
      {r["summary"]["workdir"]: r["summary"]["wall_time_s"] for r in results}.values()) + (
          report["diverged_training_wall_time_s"])
  # every output is made under a temporary name first, then all are renamed at once (study.json
  # last): an abort or a full disk meanwhile leaves the previous set whole, not a mix
  for name in os.listdir(workdir):  # an aborted command's temporary outputs (the study's
    if name.startswith(tuple(o + ".tmp-" for o in OUTPUTS)):  # lock: no other study is live)
      with contextlib.suppress(OSError):
        os.remove(os.path.join(workdir, name))
  _check_outputs(workdir)  # again: before anything is written
  tag = f".tmp-{os.getpid()}"
  report["plots"] = [os.path.join(workdir, name) for name in OUTPUTS[:2]]
  try:
    plots(report, workdir, suffix=tag)
    with open(os.path.join(workdir, "study.md" + tag), "w") as f:
      f.write(markdown(report))
    ckpt_lib.dump_json(os.path.join(workdir, "study.json" + tag), _strict_json(report))
  except BaseException:
    for name in OUTPUTS:
      with contextlib.suppress(OSError):
        os.remove(os.path.join(workdir, name + tag))
    raise
  try:
    for name in OUTPUTS:
      os.replace(os.path.join(workdir, name + tag), os.path.join(workdir, name))
  except OSError as e:
    for name in OUTPUTS:
      with contextlib.suppress(OSError):
        os.remove(os.path.join(workdir, name + tag))
    raise WorkdirError(f"cannot put the study's outputs in place in {workdir} ({e.strerror}: "
                       f"{e.filename2 or e.filename}); fix that and run the same command again "
                       "(the trained runs are kept).") from None
  print(markdown(report))
  print(f"Written: {os.path.join(workdir, 'study.json')}, study.md, {', '.join(report['plots'])}")
  return report


def _check_budget(config, where: str, name: str, summary: dict | None = None) -> None:
  """Refuses a run trained for more epochs than the study's config now gives it (its earlier
  epochs' steps are already done, so it would be analysed after more training than the rest).
  `summary`: the run's, just returned; default: its summary.json, if it has one yet."""
  if summary is None:
    try:
      with open(os.path.join(where, "summary.json"), encoding="utf-8") as f:
        summary = json.load(f)
    except (OSError, ValueError):
      return  # not trained yet (or unreadable: training it reports that)
  if not isinstance(summary, dict):  # (not a summary's JSON: training it rewrites it)
    return
  steps, per_epoch = summary.get("steps"), summary.get("steps_per_epoch")
  if not (isinstance(steps, int) and isinstance(per_epoch, int) and per_epoch > 0):
    return
  if steps > config.train.epochs * per_epoch:
    which = "the reproducibility check's run" if name == "_same_key" else f"run {name}"
    flag = "--config.same_key_epochs" if name == "_same_key" else "--config.base.train.epochs"
    raise ConfigError(
        f"{which} ({where}) was trained for {steps} steps ({steps / per_epoch:g} epochs), more "
        f"than the {config.train.epochs} epoch(s) of {config.train.epochs * per_epoch} steps this "
        f"study gives it: "
        + ("its bitwise check would be reported for training it did not have" if name ==
           "_same_key" else "its variants would be compared after unequal training")
        + f". Set {flag}="
        f"{math.ceil(steps / per_epoch)} (or more), or delete {where} to train it again.")


def _newest_saved(where: str, read):
  """read(checkpointer, step) of the newest step the run in `where` saved (None: none saved);
  raises what the read raises where that step cannot be read."""
  if not os.path.isdir(ckpt_lib.checkpoint_dir(where)):
    return None
  ckpt = ckpt_lib.Checkpointer(where, read_only=True)
  try:
    step = ckpt.latest_step()
    return None if step is None else read(ckpt, step)
  finally:
    ckpt.close()


def _check_kept_config(config, workdir: str, name: str) -> None:
  """Refuses a kept run whose config the study now changes where train.py would refuse it (a
  field that fixes the model, data or keys; the recipe without train.allow_changes), before
  anything trains rather than at its turn, after the runs before it. Checked against its
  newest checkpoint's config (one that cannot be read: its training says so)."""
  where = os.path.join(workdir, "runs", name)
  try:
    saved = _newest_saved(where, lambda ckpt, step: ckpt.read_meta(step)["config"])
  except (ckpt_lib.CheckpointError, KeyError, TypeError):
    return
  if saved is None and os.path.isdir(where):  # the record of a start that saved nothing
    try:
      check_unsaved_record(where, config_lib.with_absolute_paths(config))
    except InfinitoError as e:
      raise _in_study_terms(e, workdir, name) from None
  if saved is not None:
    try:  # as train.py sees it: data files absolute (a study may name them relative)
      config_lib.check_resume(saved, config_lib.with_absolute_paths(config), where)
    except InfinitoError as e:
      raise _in_study_terms(e, workdir, name) from None


def _stopped(summary: dict, stop: lifecycle.StopSignals | None) -> bool:
  """Whether a signal stopped the run just trained (or came after its last step)."""
  if stop is not None:
    stop.training = False  # until the next run's loop: a signal stops the study at its checks
    stop.ended = None  # the run is closed: an abort from here is the study's, not the run's
  return summary["status"] == lifecycle.INTERRUPTED or bool(stop and stop.requested)


def _same_key_config(study, variants):
  """The run config of the reproducibility check (None when it is off): `same_key_replicas`
  replicas of the baseline's first seed, all from one key."""
  n = study.same_key_replicas
  if not n:
    return None
  if n < 2:
    raise ConfigError(f"study.same_key_replicas={n}: 0 (off) or at least 2.")
  base = next(v for v in variants if v.name == study.baseline).config.copy_and_resolve_references()
  base.train.replicas, base.train.seed_stride = n, 0
  if study.same_key_epochs:
    base.train.epochs = study.same_key_epochs
  return base


def _same_key_check(study, variants, workdir, stop=None) -> dict | None:
  """Trains `same_key_replicas` replicas of the baseline's first seed from one key together."""
  base = _same_key_config(study, variants)
  if base is None:
    return None
  n = base.train.replicas
  where = os.path.join(workdir, "runs", "_same_key")
  print(f"\n=== reproducibility: {n} replicas of seed {base.seed} from one key "
        f"({base.train.epochs} epoch{'s' if base.train.epochs > 1 else ''}) ===", flush=True)
  _check_budget(base, where, "_same_key")
  summary = _train(base, where, workdir, "_same_key", stop,
                   {"train.epochs": "--config.same_key_epochs"} if study.same_key_epochs else None)
  if _stopped(summary, stop):
    return {"status": lifecycle.INTERRUPTED}
  if summary["status"] == lifecycle.STOPPED:
    return {"status": lifecycle.STOPPED, "steps": summary["steps"]}
  _check_stop(stop)
  restored = evaluate.restore_run(where, step=summary["steps"])
  leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(
      {"params": restored.params, "memory": restored.memory})]
  identical = all(all(np.array_equal(x[0], x[r]) for r in range(1, n)) for x in leaves)
  losses = [r["final_val_loss"] for r in summary["replicas"]]
  return {"replicas": n, "seed": base.seed, "epochs": base.train.epochs,
          "steps": summary["steps"], "bitwise_identical": identical,
          "final_val_losses": losses,
          "final_val_loss_std": float(np.std(losses, ddof=1))}  # as every std of the study


def _FLAGS(workdir: str, name: str, own: dict | None = None) -> tuple:  # pylint: disable=invalid-name
  """How a study's command line changes a run, for train_and_evaluate's messages (`own`: the
  run fields the study sets with flags of its own, e.g. the reproducibility run's epochs)."""
  return ("--config.base.", f"delete {os.path.join(workdir, 'runs', name)} and run the study again",
          own or {})


def _train(config, where: str, workdir: str, name: str, stop, own: dict | None = None,
           variants: list[str] | None = None, record_divergence: bool = False) -> dict:
  """train_and_evaluate for one run of the study; its errors name the study's own fixes (a
  study has no --fresh, and sets run fields as --config.base.FIELD). `variants`: the variant
  of each replica, named when a replica's loss diverges; `record_divergence`: a replica that
  diverges is frozen (train.on_divergence='freeze') and the run trains on while some variant
  has none (its summary says which froze), and the error that ends a run once every variant
  has one is raised as the run gave it (its `replicas`, `step` and `replica_steps`), for the
  study to record."""
  flags = _FLAGS(workdir, name, own)
  # study.on_divergence='record': a diverged seed's replica is frozen and its run trains on
  # while some variant has all its seeds (each replica is its own run: the others train as
  # they would without it); the study reads who froze from the summary (_record_frozen), or
  # from the error that ends the run. Otherwise a divergence ends the run, and the study.
  config = config.copy_and_resolve_references()
  freeze = bool(record_divergence and variants)
  config.train.on_divergence = "freeze" if freeze else "stop"
  try:
    return train_and_evaluate(config, where, stop=stop, flags=flags,
                              end_when_groups_diverge=freeze)
  except NonFiniteLossError as e:
    if record_divergence and variants:
      raise
    if not variants:
      raise _in_study_terms(e, workdir, name) from None
    raise _stop_error(variants, {r: e.step for r in e.replicas}, where) from None
  except InfinitoError as e:
    raise _in_study_terms(e, workdir, name) from None


def _frozen(summary: dict) -> dict:
  """{replica: the step at which it diverged} for the replicas a run froze (its summary)."""
  replicas = summary.get("replicas") if isinstance(summary, dict) else None  # (or a record)
  return {r: rep["diverged"]["step"] for r, rep in enumerate(replicas or [])
          if isinstance(rep, dict) and isinstance(rep.get("diverged"), dict)
          and _whole(rep["diverged"].get("step"))}


def _check_not_frozen(study, run: StudyRun, workdir: str, summary: dict | None = None) -> None:
  """study.on_divergence='stop': refuses a run with seeds frozen after diverging (under
  'record' in an earlier command), before it trains: as `summary` says, or the kept run's
  newest checkpoint's record and its summary.json (written at validations only: a command
  killed after a save holding a freeze left it behind)."""
  where = os.path.join(workdir, "runs", run.name)
  frozen = _frozen(summary) if summary is not None else {}
  if summary is None:
    try:
      with open(os.path.join(where, "summary.json"), encoding="utf-8") as f:
        summary = json.load(f)
      frozen = _frozen(summary)
    except (OSError, ValueError):
      pass
    try:
      frozen = {**_frozen(_newest_saved(where, lambda ckpt, step: ckpt.read_json(
          step, "progress").get("record"))), **frozen}
    except (ckpt_lib.CheckpointError, AttributeError):
      pass  # an unreadable record: the run's training says so
    if (kept := _kept_divergence(workdir, run, quiet=True)) is not None:  # one that ended it
      frozen = {**_diverged_steps(kept, run), **frozen}
      summary = {"status": lifecycle.DIVERGED}
  if frozen:
    raise _stop_error([v.name for v in run.variants for _ in range(study.seeds)], frozen,
                      where, earlier="ended there" if isinstance(summary, dict) and summary.get(
                          "status") == lifecycle.DIVERGED else "trained on")


def _stop_error(variants: list[str], steps: dict, where: str,
                earlier: str | None = None) -> NonFiniteLossError:
  """study.on_divergence='stop': the error that ends the study where replicas of the run in
  `where` (`variants`: each replica's variant) diverged (`steps`: {replica: its step}; `earlier`:
  in an earlier command, which recorded it and then `earlier`, e.g. 'trained on')."""
  first = {}  # each variant's first divergence
  for r, s in sorted(steps.items()):
    if r < len(variants):
      first[variants[r]] = min(s, first.get(variants[r], s))
  bad, step = sorted(first), min(steps.values())
  when = (f"at step {step}" if len(set(first.values())) == 1 else
          "(" + ", ".join(f"{v} at step {first[v]}" for v in bad) + ")")
  # variants trained together share the run: new values make a new one, the others' runs stay
  then = ("and run the study again (its values train as a new population; the finished "
          "runs are kept)" if len(set(variants)) > 1 else
          f"then delete {where} and run the study again (the other runs are kept)")
  e = NonFiniteLossError(
      f"the training of variant(s) {bad} diverged {when} (run {where}"
      + (f"; in an earlier command of the study, which recorded it and {earlier}" if earlier
         else "") + "); the study stops, as study.on_divergence='stop' asks ('record' reports "
      "a variant that diverges as such and goes on). Give "
      f"{'that variant' if len(bad) == 1 else 'those variants'} a lower learning rate "
      "(train.learning_rate), a lower clip norm (train.clip_norm) or weight decay "
      "(train.weight_decay), or a longer warmup (train.warmup_steps) in the study's config, "
      f"or leave {'it' if len(bad) == 1 else 'them'} out, {then}.")
  e.replicas, e.step = sorted(steps), step
  return e


def _in_study_terms(e: InfinitoError, workdir: str, name: str) -> InfinitoError:
  """`e` (a run's error), its message given the study's own fixes: a study has no --fresh, and
  sets run fields as --config.base.FIELD."""
  flags = _FLAGS(workdir, name)

  def start_over(m):
    return flags[1][0].upper() + flags[1][1:] if m.group(0)[0].isupper() else flags[1]

  text = re.sub(r"(?i)start over with --fresh(?: \([^)]*\))?|--fresh to start over|"
                r"with --fresh|pass --fresh", start_over, str(e))
  text = re.sub(r"--config\.(?!base\.)", "--config.base.", text)
  # continuing a kept run under changed values is refused in a study (variant_configs)
  text = re.sub(r"Set --config\.base\.train\.allow_changes=true to continue the run with it "
                r"\(the change is recorded in its history\), or ",
                "A study never continues a kept run under changed values: ", text)
  text = re.sub(r" \(or resume with --config\.base\.train\.allow_changes=true\)", "", text)
  if re.search(r"train\.(replicas|seed_stride)", text):  # fields the study sets itself
    text += (" (In a study, train.replicas is --config.same_key_replicas here, replicas all of "
             "the one seed --config.base.seed.)" if name == "_same_key" else
             " (In a study, train.replicas is --config.seeds, the seeds are --config.base.seed "
             "+ r, and train.seed_stride is the study's own.)")
  if name == "_same_key" and ("trained with another config" in text
                              or "changed recipe" in text):
    text += (" (runs/_same_key, the reproducibility check's run, is trained from the baseline "
             "variant's config: a changed --config.baseline changes it too; delete it to train "
             "the check again for this baseline, or keep the baseline it was trained for.)")
  e.args = (text,)
  if isinstance(e, DamagedCheckpointError):
    e.flag = re.sub(r"--config\.(?!base\.)", "--config.base.", e.flag)
  return e


def _check_stop(stop: lifecycle.StopSignals | None) -> None:
  """StopRequested if a stop signal came outside a run's steps (see StopSignals.check)."""
  if stop is not None:
    stop.check()


DIVERGED = "diverged.json"  # DIR/diverged.json: the runs that diverged, by name


# fields that change neither what a run trains nor how far: how it logs, reports and saves
# (checkpoint.every_steps does say when a divergence is found: weights are checked at saves)
# (train.on_divergence: the study sets it, _train)
_NOT_TRAINED = ("train.on_divergence", "train.log_every", "train.eval_batch_size",
                "train.sample_prompt",
                "train.sample_tokens", "train.compilation_cache", "train.profile_steps",
                "train.allow_changes", "data.files.test", "checkpoint.every_steps",
                "checkpoint.keep_best", "checkpoint.on_damage", "log.tensorboard",
                "log.wandb_project", "log.wandb_entity", "log.plot")


def _divergence_key(run: StudyRun) -> dict:
  """What a kept divergence holds for: the run's config but for the fields that only say how
  it logs and saves (_NOT_TRAINED), the platform and JAX (a run is a pure function of its key
  on one platform and version; another may not diverge)."""
  # (train.stop_after_steps neither: a run diverged before it paused; _kept_divergence
  # holds it only where the run would reach the step)
  config = {k: v for k, v in config_lib.flatten(run.config.to_dict()).items()
            if (k not in _NOT_TRAINED or k == "checkpoint.every_steps")
            and k != "train.stop_after_steps"}
  return json.loads(json.dumps({"config": config, "platform": jax.default_backend(),
                                "jax": jax.__version__}))


def _kept_replans(study, runs: list, workdir: str) -> list:
  """The runs a divergence would plan (a population's variants without those that diverged)
  whose folders an earlier command left: checked with the others before any run trains, so a
  kept one the study would refuse (trained with other seeds, say) is refused now, not after
  hours of training. At most 2**10 subsets of a population are looked at."""
  out = []
  for run in runs:
    names = [v.name for v in run.variants]
    if not 2 <= len(names) <= 10:
      continue
    for mask in range(1, 2 ** len(names) - 1):
      rest = [v for b, v in enumerate(run.variants) if mask >> b & 1]
      for new in plan_runs(study, rest):
        if os.path.isdir(os.path.join(workdir, "runs", new.name)):
          out.append(new)
  return out


def _trained_before(where: str) -> float:
  """The training seconds a run's earlier commands spent (its summary.json's wall_time_s; 0 for
  none): a run that diverges in this command took those too."""
  try:
    with open(os.path.join(where, "summary.json"), encoding="utf-8") as f:
      seconds = json.load(f).get("wall_time_s", 0.0)
  except (OSError, ValueError, AttributeError):
    return 0.0
  return float(seconds) if isinstance(seconds, (int, float)) and math.isfinite(seconds) and (
      seconds > 0) else 0.0


def _whole(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _kept_divergence(workdir: str, run: StudyRun,
                     quiet: bool = False) -> NonFiniteLossError | None:
  """The divergence an earlier command of the study recorded for `run` (DIR/diverged.json), as
  the run's error, where it holds still: the same config, platform and JAX, and the run's folder
  still there (deleting it trains the run again). Otherwise None: the run trains."""
  path = os.path.join(workdir, DIVERGED)
  try:
    if not os.path.isfile(path):  # (a FIFO would block the read)
      return None
    with open(path, encoding="utf-8") as f:
      entry = json.load(f).get(run.name)
  except (OSError, ValueError, AttributeError):
    return None
  where = os.path.join(workdir, "runs", run.name)
  if not (isinstance(entry, dict) and os.path.isdir(where)
          and entry.get("key") == _divergence_key(run)):
    return None
  replicas, step, seconds = entry.get("replicas"), entry.get("step"), entry.get("seconds", 0.0)
  if not (isinstance(replicas, list) and replicas and all(
      _whole(r) and 0 <= r < run.config.train.replicas for r in replicas) and _whole(step)
          and step >= 1 and isinstance(seconds, (int, float)) and math.isfinite(seconds)
          and seconds >= 0):
    return None  # not a record this code wrote: the run trains
  if 0 < run.config.train.stop_after_steps < step:  # it pauses before: it trains up to there
    return None
  steps = entry.get("replica_steps")  # each replica's (a run whose replicas froze), or none
  if steps is not None and not (
      isinstance(steps, list) and len(steps) == run.config.train.replicas
      and all(s is None or (_whole(s) and s >= 1) for s in steps)
      and all(steps[r] is not None for r in replicas)):
    return None
  e = NonFiniteLossError(str(entry.get("message", "")))
  e.replicas, e.step, e.seconds = list(replicas), step, float(seconds)
  if steps is not None:
    e.replica_steps = steps
  if not quiet:
    print(f"Diverged at step {e.step} in an earlier command of this study ({DIVERGED}): not "
          f"trained again (delete {where} to train it again).", flush=True)
  return e


def _keep_divergence(workdir: str, run: StudyRun, e: NonFiniteLossError) -> None:
  """Records `run`'s divergence in DIR/diverged.json, so that the same command again does not
  train it up to the same step (a run is a pure function of its key)."""
  path = os.path.join(workdir, DIVERGED)
  try:
    with open(path, encoding="utf-8") as f:  # a regular file (_check_outputs) or none
      kept = json.load(f)
    if not isinstance(kept, dict):
      raise ValueError(f"a JSON {type(kept).__name__}, not an object")
  except FileNotFoundError:
    kept = {}
  except (OSError, ValueError) as error:
    print(f"warning: {path} could not be read ({error}): it is written anew, with this "
          "divergence only (the runs whose divergences it held train again up to them).",
          file=sys.stderr, flush=True)
    kept = {}
  kept[run.name] = {"step": e.step, "replicas": list(e.replicas), "message": str(e),
                    "seconds": e.seconds, "key": _divergence_key(run),
                    "replica_steps": getattr(e, "replica_steps", None)}
  try:
    ckpt_lib.dump_json(path, kept)
  except InfinitoError as error:  # only a shortcut for the next command: the study goes on
    print(f"warning: the divergence could not be kept in {path} ({error}); the same command "
          "again trains the run up to it again.", file=sys.stderr, flush=True)


def _note_diverged(study, run: StudyRun, steps: dict, diverged: dict, workdir: str,
                   seconds: float, trained_on: bool) -> list[str]:
  """Records in `diverged` the variants of `run` that have a replica in `steps` ({replica: the
  step at which it diverged}): the first such step, those seeds, and the variant's other seeds,
  as `trained_on` (frozen, the seeds trained to the end) or `stopped_with_it` (the run ended
  before its end). Returns the names of those variants."""
  seeds = replica_seeds(run.config)
  for r, step in sorted(steps.items()):
    v = run.variants[r // study.seeds]
    entry = diverged.setdefault(v.name, {"step": step, "seeds": [], "run": os.path.join(
        workdir, "runs", run.name), "variant": v, "seconds": seconds})
    entry["step"] = min(entry["step"], step)
    entry["seeds"].append(seeds[r])
    entry.setdefault("steps", []).append(step)  # each seed's
  bad = [v.name for v in run.variants if v.name in diverged]
  for g, v in enumerate(run.variants):  # its other seeds: trained on, or stopped with the run
    if v.name in bad:
      mine = seeds[g * study.seeds:(g + 1) * study.seeds]
      diverged[v.name]["trained_on" if trained_on else "stopped_with_it"] = [
          x for x in mine if x not in diverged[v.name]["seeds"]]
  return bad


def _diverged_steps(e: NonFiniteLossError, run: StudyRun) -> dict:
  """{replica: the step it diverged at} of the error `e` that ended `run`: each replica's
  (`replica_steps`, where replicas froze before) or the error's step for its replicas."""
  steps = (getattr(e, "replica_steps", None) or
           [e.step if r in e.replicas else None for r in range(run.config.train.replicas)])
  return {r: s for r, s in enumerate(steps) if s is not None}


def _record_divergence(study, run: StudyRun, e: NonFiniteLossError, diverged: dict,
                       workdir: str) -> list[StudyRun]:
  """Records in `diverged` the variants of `run` whose loss became non-finite (error `e` that
  ended the run: the population's replicas and the step, or each replica's step), says so, and
  returns the runs that train its other variants again without them (none where it was one
  variant's run, or where every variant had diverged: the usual end of a study's run). The
  same command again finds the divergence kept (_kept_divergence), so the same runs follow
  without training it."""
  bad = _note_diverged(study, run, _diverged_steps(e, run), diverged, workdir,
                       getattr(e, "seconds", 0.0), trained_on=False)
  rest = [v for v in run.variants if v.name not in diverged]
  print(f"\nDiverged: {_said({n: diverged[n] for n in bad})}. Recorded as "
        f"{'its' if len(bad) == 1 else 'their'} result, left out of the statistics"
        + (f"; {', '.join(v.name for v in rest)} train{'s' if len(rest) == 1 else ''} again "
           "without it" if rest else "") + " (study.on_divergence='stop' ends the study "
        "instead).", flush=True)
  again = plan_runs(study, rest) if rest else []
  for new in again:  # checked as every run is before the first trains
    where = os.path.join(workdir, "runs", new.name)
    _check_budget(new.config, where, new.name)
    _check_kept_config(new.config, workdir, new.name)
    try:
      check_fits(new.config)
    except InfinitoError as error:
      raise _in_study_terms(error, workdir, new.name) from None
  return again


def _record_frozen(study, run: StudyRun, summary: dict, diverged: dict, workdir: str) -> None:
  """Records in `diverged` the variants of `run` (a finished run: its `summary`) with a seed
  that diverged and was frozen while the run trained on (train.on_divergence='freeze'), and
  says so. Their other seeds trained to the end, as did the run's other variants, whose
  results stand: each replica is its own run, and a frozen one's NaNs reach none of them."""
  steps = _frozen(summary)
  if not steps:
    return
  # its training time is the run's, counted with the variants that finished in it
  bad = _note_diverged(study, run, steps, diverged, workdir, 0.0, trained_on=True)
  seeds = replica_seeds(run.config)
  for g, v in enumerate(run.variants):  # the seeds trained on: their numbers, in no statistic
    if v.name in bad:
      diverged[v.name]["trained_on_results"] = [
          {k: rep.get(k) for k in ("best_val_perplexity", "final_val_perplexity", "best_step")}
          | {"seed": seeds[r]} for r, rep in enumerate(summary["replicas"])
          if g * study.seeds <= r < (g + 1) * study.seeds and r not in steps]
  rest = [v.name for v in run.variants if v.name not in bad]
  print(f"\nDiverged: {_said({n: diverged[n] for n in bad})}. Recorded as "
        f"{'its' if len(bad) == 1 else 'their'} result, left out of the statistics; the "
        f"diverged seed{'s were' if len(steps) > 1 else ' was'} frozen and "
        + (f"{', '.join(rest)} trained on in the same run, as {'it' if len(rest) == 1 else 'they'}"
           " would have without it" if rest else "the run trained on")
        + " (study.on_divergence='stop' ends the study instead).", flush=True)


def _seeds(seeds: list) -> str:
  return f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"


def _said(diverged: dict) -> str:
  """'v (seeds 42, 43) at step 12; ...' for the variants in `diverged`."""
  return "; ".join(f"{name} ({_seeds(d['seeds'])}) at step {d['step']}"
                   + (f", {_seeds(d['stopped_with_it'])} not trained to the end"
                      if d.get("stopped_with_it") else "")
                   + (f", {_seeds(d['trained_on'])} trained on" if d.get("trained_on") else "")
                   for name, d in diverged.items())


def analyse(study, results: list[dict], same_key: dict | None,
            stop: lifecycle.StopSignals | None = None, diverged: dict | None = None,
            order: list[str] | None = None) -> dict:
  """The statistics of the study from its finished runs (summaries, histories, checkpoints);
  `stop`'s signal is taken between its pieces (StopRequested). `diverged`: the variants whose
  loss became non-finite (_record_divergence), reported as such and in no statistic; `order`:
  the variants' names in the study's order (default: the results' order)."""
  diverged = diverged or {}
  variants = []
  for res in results:
    _check_stop(stop)
    v, s = res["variant"], res["summary"]
    history = [json.loads(line) for line in open(s["history"])]
    off = res.get("offset", 0)
    curves = _curves(history, range(off, off + len(s["replicas"])))
    per_seed = []
    for rep, (steps, ppl) in zip(s["replicas"], curves):
      per_seed.append({"replica": rep["replica"], "seed": rep["seed"],
                       # its replica in the run folder (`workdir`), as evaluate.py's --replica
                       # takes it: variants trained together share one run, one after another
                       "run_replica": rep["replica"] + off,
                       "best_val_perplexity": rep["best_val_perplexity"],
                       "final_val_perplexity": rep["final_val_perplexity"],
                       "best_step": rep["best_step"],
                       "steps_to_target": stats.steps_to_reach(steps, ppl, study.target_perplexity),
                       "auc_val_perplexity": stats.area_under_curve(steps, ppl),
                       "curve": {"steps": steps, "perplexity": ppl}})
    variants.append({
        "name": v.name, "overrides": v.overrides, "workdir": s["workdir"], "seeds": len(per_seed),
        "per_seed": per_seed, "steps": s["steps"], "steps_per_epoch": s["steps_per_epoch"],
        "status": s["status"], "wall_time_s": s["wall_time_s"],
        "trained_together_with": res.get("together_with", []),
        **{k: stats.describe([p[k] for p in per_seed], bounds=PPL)
           for k in ("best_val_perplexity", "final_val_perplexity", "auc_val_perplexity")},
        "convergence": _convergence(per_seed, study.target_perplexity),
        "memory": {"parameters": s["parameters"], "state_bytes_per_replica":
                   _state_bytes(v.config), "peak_device_bytes": res["peak"],
                   "peak_note": None if res["peak"] is not None else
                   f"the {s['platform']} backend reports no device memory statistics"},
    })
  baseline = next((v for v in variants if v["name"] == study.baseline), None)
  others = [v for v in variants if v is not baseline] if baseline else []
  base_ppl = [p["best_val_perplexity"] for p in baseline["per_seed"]] if baseline else []
  tests = [stats.welch([p["best_val_perplexity"] for p in v["per_seed"]], base_ppl)
           for v in others]
  for v, t, adj in zip(others, tests, stats.holm([t["p"] for t in tests])):
    ppl = [p["best_val_perplexity"] for p in v["per_seed"]]
    v["vs_baseline"] = {"metric": "best_val_perplexity",
                        "mean_difference": float(np.mean(ppl) - np.mean(base_ppl)),
                        "welch_t": t["t"], "welch_df": t["df"], "p": t["p"], "p_holm": adj,
                        "cohens_d": stats.cohens_d(ppl, base_ppl)}
  _generation(study, results, variants, stop)
  variants += [{"name": name, "overrides": d["variant"].overrides, "workdir": d["run"],
                "diverged": {"step": d["step"], "seeds": d["seeds"],
                             "steps": d.get("steps", [d["step"]] * len(d["seeds"])),
                             "stopped_with_it": d.get("stopped_with_it", []),
                             "trained_on": d.get("trained_on", []),
                             **({"trained_on_results": d["trained_on_results"]}
                                if d.get("trained_on_results") else {})}}
               for name, d in diverged.items()]
  if order:
    variants.sort(key=lambda v: order.index(v["name"]))
  return {"baseline": study.baseline, "seeds": study.seeds,
          "target_perplexity": study.target_perplexity, "variants": variants,
          "same_key": same_key, "platform": jax.devices()[0].platform,
          "devices": jax.device_count()}


def _convergence(per_seed: list[dict], target: float) -> dict:
  reached = [p["steps_to_target"] for p in per_seed if p["steps_to_target"] is not None]
  return {"target_perplexity": target, "seeds_reaching": len(reached),
          "steps_to_target": stats.describe(reached) if reached else None}


def other_terms(overrides: dict) -> list[str]:
  """The fields of a variant's overrides that change what its perplexity is measured on (the
  text, its windows, the vocabulary)."""
  return [k for k in overrides if k == "model.vocab_size" or k.startswith("data.")]


def judge_variant(variants: list[dict]) -> int:
  """The variant whose best replica judges the samples: the best (lowest mean best validation
  perplexity) of those measured on the study's terms (other_terms), of all where none is."""
  same = [i for i, v in enumerate(variants) if not other_terms(v["overrides"])] or list(
      range(len(variants)))
  return min(same, key=lambda i: variants[i]["best_val_perplexity"]["mean"])


def _generation(study, results, variants, stop=None) -> None:
  """Samples every replica of every variant; scores them under the best variant's best replica
  (of those measured on the study's own terms, where there are some: a smaller vocabulary's
  perplexity is lower for folding words into <unk>)."""
  runs, samples = {}, {}  # by run folder: variants trained together share one
  for r in results:
    where = r["summary"]["workdir"]
    _check_stop(stop)
    if where not in runs:
      runs[where] = evaluate.restore_run(where)
      samples[where] = generation_samples(
          runs[where], study, [v["name"] for v, x in zip(variants, results)
                               if x["summary"]["workdir"] == where])
  best_v = judge_variant(variants)
  judge = runs[results[best_v]["summary"]["workdir"]]
  judge_index = int(np.argmin([p["best_val_perplexity"] for p in variants[best_v]["per_seed"]]))
  judge_index += results[best_v].get("offset", 0)
  for v, res in zip(variants, results):
    _check_stop(stop)
    rest = runs[res["summary"]["workdir"]]
    off, n = res.get("offset", 0), len(v["per_seed"])
    g = samples[res["summary"]["workdir"]]
    rows = [(row[0] - off, *row[1:]) for row in g["rows"] if off <= row[0] < off + n]
    unknown_to_judge = _in_judges_words(rows, rest.tokenizer, judge.tokenizer, study)
    ppl = _judge_perplexity(judge, judge_index, unknown_to_judge[0], g["length"])
    g = {"rows": rows, "length": g["length"]}
    per_replica = []
    for r in range(n):
      mine = [(row, p) for row, p in zip(g["rows"], ppl) if row[0] == r]
      samples_r = [list(map(int, row[3][row[4]:])) for row, _ in mine]
      contexts = [list(map(int, row[3][:row[4]])) for row, _ in mine]
      per_replica.append({"replica": r, "seed": v["per_seed"][r]["seed"],
                          "distinct_1": distinct(samples_r, 1),
                          "distinct_2": distinct(samples_r, 2),
                          "repetition_rate": repetition_rate(samples_r, contexts),
                          "judge_perplexity": float(np.exp(np.mean(np.log([p for _, p in mine]))))})
    shown = []
    for row, p in zip(g["rows"], ppl):
      if row[0] == 0 and row[2] == study.sample_seeds[0] and len(shown) < study.shown_samples:
        shown.append({"replica": 0, "seed": row[2], "prompt": study.prompts[row[1]],
                      "text": rest.tokenizer.decode(row[3][row[4]:]), "judge_perplexity": p})
    v["generation"] = {
        "judge": f"{variants[best_v]['name']} replica "
                 f"{judge_index - results[best_v].get('offset', 0)}",
        "prompts": list(study.prompts), "sample_seeds": list(study.sample_seeds),
        "sample_tokens": study.sample_tokens, "temperature": study.temperature,
        "top_k": study.top_k,
        **{k: stats.describe([x[k] for x in per_replica], bounds=bounds)
           for k, bounds in (("distinct_1", (0.0, 1.0)), ("distinct_2", (0.0, 1.0)),
                             ("repetition_rate", (0.0, 1.0)), ("judge_perplexity", PPL))},
        "per_seed": per_replica,  # the values the statistics above are of, seed by seed
        "samples": shown,
        # another vocabulary than the judge's: the samples' words re-encoded in the judge's
        # (None where the two are one); what share of them the judge does not know (<unk>)
        "judge_unknown_rate": unknown_to_judge[1]}


def _strict_json(obj):
  """`obj` with every non-finite float (an overflowed interval of a run gone astray) as None:
  JSON has no NaN or Infinity, and strict parsers refuse them."""
  if isinstance(obj, float):
    return obj if math.isfinite(obj) else None
  if isinstance(obj, dict):
    return {k: _strict_json(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_strict_json(v) for v in obj]
  return obj


def _fmt(d: dict | None, digits: int = 1) -> str:
  """mean ± std [interval] with `digits` decimals, or more where the spread would print as 0
  (two significant digits of the std, at most 6 decimals): a d or p beside two rows that look
  equal has a spread to show."""
  if not d or d.get("mean") is None:
    return "n/a"
  big = [x for x in (d["mean"], d["std"], d["ci_low"], d["ci_high"]) if x is not None]
  if any(not math.isfinite(x) or abs(x) >= 1e7 for x in big):  # a run gone astray: 4 digits
    parts = [f"{x:.4g}" if x is not None else "n/a" for x in
             (d["mean"], d["std"], d["ci_low"], d["ci_high"])]
    return parts[0] if d["std"] is None else f"{parts[0]} ± {parts[1]} [{parts[2]}, {parts[3]}]"
  if d["std"] is None:
    return f"{d['mean']:.{digits}f}"
  std = d["std"]
  if 0 < std < 10 ** -digits and math.isfinite(std):
    digits = min(6, 1 - math.floor(math.log10(std)))
  return (f"{d['mean']:.{digits}f} ± {std:.{digits}f} "
          f"[{d['ci_low']:.{digits}f}, {d['ci_high']:.{digits}f}]")


def markdown(report: dict) -> str:
  """The study's table (mean ± std [95% t interval] over seeds) and a few samples."""
  lines = [f"# Study: {len(report['variants'])} variants x {report['seeds']} seeds "
           f"({report['platform']}, {report['devices']} device(s))", "",
           "Validation perplexity (token-weighted), mean ± std [95% t interval] over seeds; "
           + (f"no comparison: the baseline `{report['baseline']}` diverged."
              if any(v["name"] == report["baseline"] and "diverged" in v
                     for v in report["variants"]) else
              f"p: Welch's t-test of best perplexity against `{report['baseline']}`, "
              "Holm-corrected; d: Cohen's d (negative: lower perplexity than the baseline)."), "",
           "| variant | best ppl | final ppl | vs baseline: diff, p (Holm), d | steps to ppl "
           f"{report['target_perplexity']:g} | AUC of val ppl | distinct-1 / -2 | repetition | "
           "sample ppl (judge) | params | state MiB/replica | train s |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  for v in report["variants"]:
    if "diverged" in v:
      d = v["diverged"]
      at = d.get("steps") or []
      seeds = (_seeds(d["seeds"]) if len(set(at)) < 2 else  # seeds that diverged apart: each
               ", ".join(f"seed {x} at step {t}" for x, t in zip(d["seeds"], at)))
      lines.append(f"| {v['name']} | diverged at step {d['step']} ({seeds}: "
                   "non-finite training loss, gradient or weights"
                   + (f"; {_seeds(d['stopped_with_it'])} not trained to the end"
                      if d.get("stopped_with_it") else "")
                   + (f"; {_seeds(d['trained_on'])} trained on, in no statistic"
                      if d.get("trained_on") else "") + ") |" + " n/a |" * 10)
      continue
    vs = v.get("vs_baseline")
    vs_s = ("baseline" if v["name"] == report["baseline"] else "n/a (the baseline diverged)"
            if vs is None else
            f"{vs['mean_difference']:+.3g}, {vs['p_holm']:.3g}, {vs['cohens_d']:+.2f}")
    c = v["convergence"]
    conv = (f"{_fmt(c['steps_to_target'], 0)} ({c['seeds_reaching']}/{v['seeds']} seeds)"
            if c["steps_to_target"] else f"never (0/{v['seeds']})")
    g = v.get("generation", {})
    lines.append(
        f"| {v['name']} | {_fmt(v['best_val_perplexity'])} | {_fmt(v['final_val_perplexity'])} "
        f"| {vs_s} | {conv} | {_fmt(v['auc_val_perplexity'])} | "
        f"{_fmt(g.get('distinct_1'), 3)} / {_fmt(g.get('distinct_2'), 3)} | "
        f"{_fmt(g.get('repetition_rate'), 3)} | {_fmt(g.get('judge_perplexity'))}"
        + (f" ({g['judge_unknown_rate']:.0%} <unk> to the judge)"
           if g.get("judge_unknown_rate") is not None else "") + " | "
        f"{v['memory']['parameters']:,} | {v['memory']['state_bytes_per_replica'] / 2**20:.1f} | "
        f"{v['wall_time_s']:.0f}"
        + (f" (one run with {', '.join(v['trained_together_with'])})"
           if v.get("trained_together_with") else "") + " |")
  sk = report.get("same_key")
  if sk and "skipped" in sk:
    lines += ["", f"Reproducibility: not checked ({sk['skipped']})."]
  elif sk:
    lines += ["", f"Reproducibility: {sk['replicas']} replicas trained together from one key "
              f"(seed {sk['seed']}, {sk['steps']} steps) are "
              f"{'bitwise identical' if sk['bitwise_identical'] else 'NOT identical'}: final "
              f"validation losses {sk['final_val_losses']}, std {sk['final_val_loss_std']:g}. "
              "This is a property of the design (every random number comes from the run's key), "
              "not a statistical finding; the spread over seeds above is the real variation."]
  judge = next((v["generation"]["judge"] for v in report["variants"] if "generation" in v), None)
  measured = [f"{v['name']} ({', '.join(other_terms(v.get('overrides', {})))})"
              for v in report["variants"] if other_terms(v.get("overrides", {}))]
  if measured:
    lines += ["", "Measured on other terms: " + "; ".join(measured) + " change what a perplexity "
              "is over (the text, its windows or the vocabulary: a smaller vocabulary folds more "
              "words into <unk>), so the tests against the baseline compare different quantities "
              "there."]
  other = [f"{v['name']} ({v['generation']['judge_unknown_rate']:.1%} of its sampled words "
           "unknown to the judge)" for v in report["variants"]
           if v.get("generation", {}).get("judge_unknown_rate") is not None]
  if other:
    lines += ["", "Another vocabulary than the judge's: the sample perplexity of "
              + "; ".join(other) + " is over its samples' words re-encoded in the judge's "
              "vocabulary (a word it lacks is <unk>), so it compares with the others' only "
              "roughly."]
  if judge:
    lines += ["", f"Samples (replica 0, sample seed fixed; judge: {judge}):", ""]
    for v in report["variants"]:
      for s in v.get("generation", {}).get("samples", []):  # a diverged variant: none
        lines.append(f"- **{v['name']}**, “{s['prompt']}” → {s['text']}")
  if "wall_time_s" in report:
    spent = report.get("diverged_training_wall_time_s")
    lines += ["", f"Wall time: {report['wall_time_s']:.0f} s in this command (training "
              f"{report['training_wall_time_s']:.0f} s over all its processes"
              + (f", {spent:.0f} s of it in runs that diverged" if spent else "") + ")."]
  return "\n".join(lines) + "\n"


def _log_axis_if_wide(ax, values) -> None:
  """A log y axis where the perplexities span more than 100x (a run gone astray beside the
  others): on a linear one every other variant lies flat at 0."""
  finite = [x for x in values if x is not None and math.isfinite(x) and x > 0]
  if finite and max(finite) > 100 * min(finite):
    ax.set_yscale("log")


def plots(report: dict, workdir: str, suffix: str = "") -> list[str]:
  """curves.png (mean validation perplexity per variant with a ±1 std band over seeds) and
  perplexity.png (best validation perplexity, mean with its 95% interval, seeds as dots)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from infinito_jax import plot as plot_lib  # pylint: disable=g-import-not-at-top

  shown = [v for v in report["variants"] if "diverged" not in v]  # diverged: no curve
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for v in shown:
    curves = [p["curve"] for p in v["per_seed"]]
    steps = curves[0]["steps"]
    # a run gone astray is drawn at most at PPL_MAX: near 1e300 matplotlib's margins overflow
    ppl = np.minimum(np.array([c["perplexity"] for c in curves if c["steps"] == steps], float),
                     plot_lib.PPL_MAX)
    mean, sd = stats.mean_std(ppl, axis=0)
    epochs = np.asarray(steps) / v["steps_per_epoch"]
    ax.plot(epochs, mean, marker="o", label=v["name"])
    ax.fill_between(epochs, mean - sd, mean + sd, alpha=0.2)
  _log_axis_if_wide(ax, [min(p, plot_lib.PPL_MAX) for v in shown for c in v["per_seed"]
                         for p in c["curve"]["perplexity"]])
  ax.set_xlabel("epoch")
  ax.set_ylabel("validation perplexity")
  ax.set_title(f"Validation perplexity, mean ± std over {report['seeds']} seeds")
  ax.legend()
  fig.tight_layout()
  curves_png = os.path.join(workdir, "curves.png" + suffix)
  fig.savefig(curves_png, dpi=120, format="png")
  plt.close(fig)

  fig, ax = plt.subplots(figsize=(7, 4.5))
  for i, v in enumerate(shown):
    d = {k: min(v["best_val_perplexity"][k], plot_lib.PPL_MAX) for k in ("mean", "ci_low",
                                                                     "ci_high")}
    ax.errorbar([i], [d["mean"]], yerr=[[d["mean"] - d["ci_low"]], [d["ci_high"] - d["mean"]]],
                fmt="o", capsize=6, color="C0")
    seeds = [min(p["best_val_perplexity"], plot_lib.PPL_MAX) for p in v["per_seed"]]
    ax.scatter(np.full(len(seeds), i + 0.15), seeds, s=12, color="C1", alpha=0.8)
  ax.set_xticks(range(len(shown)), [v["name"] for v in shown], rotation=20)
  _log_axis_if_wide(ax, [min(p["best_val_perplexity"], plot_lib.PPL_MAX) for v in shown
                         for p in v["per_seed"]])
  ax.set_ylabel("best validation perplexity")
  ax.set_title("Best validation perplexity: mean and 95% t interval (dots: seeds)")
  fig.tight_layout()
  final_png = os.path.join(workdir, "perplexity.png" + suffix)
  fig.savefig(final_png, dpi=120, format="png")
  plt.close(fig)
  return [curves_png, final_png]


EXAMPLES = "study_tiny.py, study_v51_v52.py"


def _check_study_file(path: str, cli) -> bool:
  """Refuses a --config file whose get_config() returns no study's config (a run's, an int,
  one without a study's fields), in the words run_study would use, before its overrides are
  applied or checked against a study's fields. Returns False for a file that cannot be
  loaded: absl's parsing says why."""
  config = cli.config_returned(path)
  if config is cli._UNLOADABLE:  # pylint: disable=protected-access
    return False
  if not isinstance(config, ml_collections.ConfigDict):  # load_config's words
    cli.fail(f"--config {path}: its get_config() returned {cli.type_name(config)}, not an "
             "ml_collections.ConfigDict: return one, as configs/study_tiny.py does.")
  try:
    _refuse_a_run_config(config)
    missing = [f for f in STUDY_FIELDS if f not in config and f not in STUDY_DEFAULTED]
    if missing:
      raise ConfigError(f"the study's config lacks {', '.join(missing)}: build it as "
                        "configs/study_tiny.py does (a base config, variants, seeds, ...).")
  except ConfigError as e:
    cli.fail(f"--config {path}: {e}")
  return True


def _refuse_a_run_config(study) -> None:
  if "variants" not in study and {"model", "train"} <= set(study.keys()):
    raise ConfigError(
        "this is a run's config (model, train, ...), not a study's: train it with train.py, or "
        "make it a study's base, as configs/study_tiny.py does (base, variants, seeds, ...).")


def main(argv=None, stop: lifecycle.StopSignals | None = None) -> int:
  """The command line; `stop`: signal handlers installed at start-up (default: installed here)."""
  from absl import app, flags, logging  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from infinito_jax import cli  # pylint: disable=g-import-not-at-top

  args = sys.argv if argv is None else argv
  overrides = [a for a in args[1:] if a.startswith(("--config.", "-config."))]  # either dash
  if overrides and (path := cli.config_path(args)) and not cli.asked_for_help(args):
    # the file is the first mistake: missing, broken (absl's parsing says why) or no study's
    cli.check_config_file(path, EXAMPLES)
    if not _check_study_file(path, cli):
      overrides = []  # unloadable: absl's parsing names the cause before any field
  for arg in overrides:  # before absl: one line, no traceback
    name = arg.split("config.", 1)[1].split("=", 1)[0]
    known = (name[len("base."):] in config_lib.FIELDS if name.startswith("base.")
             else name in STUDY_FIELDS)
    if not known and name.startswith("base."):
      cli.fail(f"{arg}: the run config has no field {name[len('base.'):]!r}; see "
               "configs/default.py for every field.")
    if not known:
      cli.fail(f"{arg}: a study has no field {name!r}; its fields are "
               f"{list(STUDY_FIELDS)}, and the run's are --config.base.<field> (see "
               "configs/default.py).")
  config = config_flags.DEFINE_config_file("config", None, "A study config, e.g. "
                                           "configs/study_tiny.py or configs/study_v51_v52.py.")
  out = flags.DEFINE_string("workdir", None, "Where the runs and the study's outputs go.")

  def parse(args):
    return cli.parse_flags(args, "python -m infinito_jax.study", EXAMPLES, "A study config "
                           "is a Python file whose get_config() returns a ConfigDict like "
                           "configs/study_tiny.py's.",
                           nullable=[f"base.{n}" for n in config_lib.NULLABLE])

  @errors_lib.on_command_line  # its errors name its flags
  def body(args):
    if len(args) > 1:
      cli.fail(f"unexpected arguments {args[1:]}: study fields are set with "
               "--config.FIELD=VALUE, run fields with --config.base.FIELD=VALUE.")
    if not flags.FLAGS["config"].present or not out.value:
      cli.fail("pass --config (e.g. configs/study_tiny.py) and --workdir.")
    study = cli.load_config(config, "python -m infinito_jax.study", "configs/study_tiny.py")
    try:
      _refuse_a_run_config(study)
    except ConfigError as e:
      cli.fail(f"--config {flags.FLAGS['config'].config_filename}: {e}")
    logging.set_verbosity(logging.WARNING)
    signals = stop or lifecycle.StopSignals(hard_abort=True).install()
    if signals.requested:  # during the imports: the handler's line said it (nothing changed)
      return 0
    signals.idle_raises = True  # from here a signal outside a run's steps stops at once
    try:
      result = run_study(study, out.value, stop=signals)
    except DamagedCheckpointError as e:
      command = " ".join(shlex.quote(a) for a in ["python", "-m", "infinito_jax.study",
                                                   *(sys.argv if argv is None else argv)[1:]])
      print(f"error: {e} The command: {command} {e.flag}", file=sys.stderr)
      return 1
    except InfinitoError as e:
      print(f"error: {e}", file=sys.stderr)
      return 1
    except lifecycle.StopRequested:
      result = {"status": lifecycle.INTERRUPTED}
    finally:
      signals.ignore()
    if result.get("status") == lifecycle.INTERRUPTED:
      print("The study stopped; run the same command again to resume it (finished runs are "
            "kept; the analysis is redone).")
    elif signals.requested and "variants" in result:
      print(f"({signals.requested} came as the study wrote its outputs: they are complete.)")
    return 0

  app.run(lambda a: sys.exit(body(a)), argv=argv, flags_parser=parse)
  return 0


if __name__ == "__main__":
  sys.path.insert(0, os.getcwd())  # configs/ of the project
  from infinito_jax import cli as _cli  # pylint: disable=g-import-not-at-top
  _cli.survive_closed_output()  # a study piped into `head` trains on
  main(stop=_STOP)
