"""Run configs: validation, and which fields a resumed run may change.

Every field of `configs/default.py` is named here once, in one of three classes:
- FIXED: the model, the data, the vocabulary, the keys, the batch. A resumed run with another
  value would not continue the same run, so it is refused with the list of differences.
- OPTIMISATION: the recipe (learning rate, schedule, weight decay, dropout, clipping, dtype).
  Refused unless `train.allow_changes=true`, which records the change in the run's history.
- FREE: how long and how the run is driven (epochs, patience, logging, evaluation and
  checkpoint cadence, devices). Accepted, printed and recorded.
"""

import dataclasses
import math
import os
import re
import struct
from typing import Any

import ml_collections

from infinito_jax.errors import ConfigError

FIXED = (
    "seed",
    "model.vocab_size", "model.hidden_dim", "model.num_layers", "model.num_heads",
    "model.memory_slots", "model.slot_size", "model.max_len", "model.noise_scale",
    "model.causal", "model.fuse_memory", "model.exploration", "model.scan_layers",
    "data.source", "data.hub_name", "data.hub_config", "data.files.train",
    "data.files.validation", "data.seq_len", "data.add_eos", "data.corpus.seed",
    "data.corpus.num_words", "data.corpus.num_classes", "data.corpus.successors",
    "data.corpus.smoothing", "data.corpus.zipf", "data.corpus.train_words",
    "data.corpus.validation_words", "data.corpus.test_words", "data.corpus.words_per_line",
    "train.batch_size", "train.replicas", "train.seed_stride", "train.rng_impl",
)
OPTIMISATION = (
    "train.learning_rate", "train.min_learning_rate", "train.cosine_epochs",
    "train.warmup_steps", "train.weight_decay", "train.b1", "train.b2", "train.eps",
    "train.clip_norm", "model.dropout", "model.dtype", "train.grad_accum_steps",
    "model.attention_dropout", "train.replica_hparams", "model.embed_dropout",
    "model.residual_dropout", "data.random_offsets", "model.dropout_bits",
)
FREE = (
    "train.epochs", "train.patience", "train.log_every", "train.eval_every_steps",
    "train.eval_batch_size", "train.num_devices", "train.sharding", "train.stop_after_steps",
    "train.allow_changes", "data.files.test",
    "checkpoint.every_steps", "checkpoint.keep_best", "checkpoint.on_damage",
    "train.sample_prompt", "train.sample_tokens", "train.compilation_cache",
    "train.threefry_kernel", "train.on_divergence",
    "train.profile_steps", "model.remat", "model.remat_policy", "train.loss_chunk",
    "model.attention_impl",
    "log.tensorboard", "log.wandb_project", "log.wandb_entity", "log.plot",
)
FIELDS = FIXED + OPTIMISATION + FREE
# fields whose value may be None (configs/default.py: FieldReference(None, ...)), which the
# command line sets with --config.NAME=None
NULLABLE = ("model.attention_dropout", "data.corpus.seed")
# fields added after checkpoints existed, with the value those checkpoints were made with
NEWER_FIELDS = {"model.scan_layers": False, "model.remat": False, "train.loss_chunk": 0,
                "model.attention_impl": "auto", "train.replica_hparams": "",
                "model.embed_dropout": 0.0, "model.residual_dropout": 0.0,
                "data.random_offsets": False, "model.dropout_bits": 32,
                "model.remat_policy": "nothing", "train.on_divergence": "stop"}
# the optimisation values a population's replicas may differ in (train.replica_hparams)
REPLICA_HPARAMS = ("learning_rate", "min_learning_rate", "warmup_steps", "cosine_epochs",
                   "weight_decay", "b1", "b2", "eps", "clip_norm")
ON_DAMAGE = ("stop", "previous")
ON_DIVERGENCE = ("freeze", "stop")
SEED_LIMIT = 2**32  # jax.random.key takes a 32-bit seed where 64-bit ints are off (the default)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
  """{'a': {'b': 1}} -> {'a.b': 1}."""
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _as_dict(config) -> dict:
  return config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)


@dataclasses.dataclass(frozen=True)
class Change:
  field: str
  saved: Any
  new: Any
  kind: str  # 'fixed', 'optimisation' or 'free'

  def __str__(self):
    return f"{self.field}: {self.saved!r} -> {self.new!r}"


def kind_of(field: str) -> str:
  if field in FIXED:
    return "fixed"
  if field in OPTIMISATION:
    return "optimisation"
  if field in FREE:
    return "free"
  return "fixed"  # a field this version does not know: safest to refuse a change to it


def diff(saved: dict, new) -> list[Change]:
  """The fields whose values differ between a checkpoint's config and `new`, classified."""
  a, b = flatten(saved), flatten(_as_dict(new))
  for field, value in NEWER_FIELDS.items():  # a checkpoint older than a field had its default
    if field in b:
      a.setdefault(field, value)
  for d in (a, b):  # corpus.seed None means "the run's seed": the same corpus either way
    if d.get("data.corpus.seed", 0) is None:
      d["data.corpus.seed"] = d.get("seed")
  changes = []
  for field in sorted(set(a) | set(b)):
    if field not in a:  # a field newer than the checkpoint: nothing to compare with
      continue
    if a.get(field) != b.get(field) and not _same_value(field, a, b):
      changes.append(Change(field, a.get(field), b.get(field), kind_of(field)))
  return changes


def _same_value(field: str, a: dict, b: dict) -> bool:
  """Two spellings of one value: attention_dropout None (model.dropout's) against that number,
  replica_hparams written differently ('1e-3' and '0.001', spaces) with the same groups."""
  if field == "model.attention_dropout":
    return ((a[field] if a[field] is not None else a.get("model.dropout"))
            == (b[field] if b[field] is not None else b.get("model.dropout")))
  if field == "train.replica_hparams":
    try:
      return replica_hparams(a[field] or "") == replica_hparams(b[field] or "")
    except (ConfigError, TypeError, AttributeError):
      return False
  return False


def check_resume(saved: dict, new, where: str, fixed_only: bool = False) -> list[Change]:
  """Refuses what a resumed run must not change; returns the accepted changes.

  Args:
    saved: the config stored in the checkpoint to resume.
    new: the config asked for now.
    where: the workdir, for messages.
    fixed_only: check only the FIXED fields (the same in every checkpoint of a run).

  Raises:
    ConfigError: a FIXED field differs, or an OPTIMISATION field differs without
      train.allow_changes=true. The message lists every difference and the ways out.
  """
  changes = diff(saved, new)
  groups = [len(replica_hparams(_as_dict(c).get("train", {}).get("replica_hparams", "")) or [{}])
            for c in (saved, new)]
  if groups[0] != groups[1]:
    raise ConfigError(
        f"the run in {where} was trained with {groups[0]} group(s) of train.replica_hparams and "
        f"is asked for {groups[1]}: the number of groups decides each replica's seed, so it "
        "cannot change in a run (the values within the groups can, with "
        "--config.train.allow_changes=true). Use the same number of groups, start over with "
        "--fresh (the old run is moved aside), or choose a new --workdir.")
  allow = bool(_as_dict(new).get("train", {}).get("allow_changes", False))
  fixed = [c for c in changes if c.kind == "fixed"]
  recipe = [c for c in changes if c.kind == "optimisation"]  # named with the fixed ones too
  if fixed_only:
    changes = fixed
  if fixed:
    raise ConfigError(
        f"the run in {where} was trained with another config: {'; '.join(map(str, fixed))}. "
        f"{'These fields fix' if len(fixed) > 1 else 'This field fixes'} the model, the data or "
        "the keys, so the run cannot continue with "
        f"{'them' if len(fixed) > 1 else 'it'}: use the value{'s' * (len(fixed) > 1)} it was "
        "trained with, start over with --fresh (the old run is moved aside), or choose a new "
        "--workdir."
        + (f" (Also changed, in the recipe: {'; '.join(map(str, recipe))}; "
           + ("--config.train.allow_changes=true lets those change on resume.)" if not allow else
              "those may change, as train.allow_changes=true asks.)") if recipe else ""))
  if recipe and not allow and not fixed_only:
    raise ConfigError(
        f"resuming {where} with a changed recipe: {'; '.join(map(str, recipe))}. Set "
        "--config.train.allow_changes=true to continue the run with it (the change is "
        "recorded in its history), or --fresh to start over, or a new --workdir.")
  return changes


_F32_MAX = 3.4028234663852886e38  # a number the float32 step computes with


def _check(ok: bool, field: str, value, rule: str) -> None:
  if not ok:
    big = (isinstance(value, (int, float)) and not isinstance(value, bool)
           and math.isfinite(value) and abs(value) > _F32_MAX)
    raise ConfigError(f"config.{field}={value!r}: {rule}"
                      + (" (and finite in float32, within +-3.4e38)" if big else "") + ".")


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


_TINY_RULE = ("must be at least 1.2e-38, float32's smallest normal number (the step's "
              "arithmetic: below it the value is 0, or flushed to 0 on a GPU)")
_STEPS_LIMIT = 2 ** 31  # the step counter and the schedule's step counts are int32
_F32_TINY = 1.1754943508222875e-38  # the smallest normal float32: below it a GPU flushes to 0


def _f32(v: float) -> float:
  """`v` as float32 holds it (the step's arithmetic)."""
  return struct.unpack("f", struct.pack("f", v))[0]


def _is_num(v) -> bool:
  """A finite number, in float32 too (the step's arithmetic: 1e39 would be infinite there)."""
  return (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
          and abs(v) <= _F32_MAX)


def validate(config) -> None:
  """Refuses a config that cannot work, naming the field and what it must be.

  Raises:
    ConfigError: an unknown field, or a value out of its range.
  """
  flat = flatten(_as_dict(config))
  unknown = sorted(set(flat) - set(FIELDS))
  if unknown and "variants" in flat and any(k.startswith("base.") for k in flat):
    raise ConfigError("this is a study's config (it has `base` and `variants`), not a run's: "
                      "run it with python -m infinito_jax.study --config FILE --workdir DIR.")
  if unknown:
    raise ConfigError(f"unknown config field(s) {unknown}; see configs/default.py for the "
                      "fields and what each does.")
  missing = sorted(set(FIELDS) - set(flat))
  if missing:
    raise ConfigError(f"config is missing {missing}; build configs on configs/default.py "
                      "(`c = default.get_config()`, then change fields).")
  g = flat.get
  _check(_is_int(g("seed")) and 0 <= g("seed") < SEED_LIMIT, "seed", g("seed"),
         "must be an integer in [0, 2**32) (JAX's keys take 32-bit seeds: a larger one would "
         "silently give the key of seed % 2**32)")
  _check(g("data.corpus.seed") is None or (_is_int(g("data.corpus.seed")) and
                                            0 <= g("data.corpus.seed") < SEED_LIMIT),
         "data.corpus.seed", g("data.corpus.seed"),
         "must be an integer in [0, 2**32) (or None: seed)")
  for f in ("train.epochs", "train.batch_size", "train.patience", "train.log_every",
            "train.replicas",
            "train.cosine_epochs", "data.seq_len"):
    _check(_is_int(g(f)) and g(f) >= 1, f, g(f), "must be an integer >= 1")
  for f in ("train.epochs", "train.patience", "train.log_every", "train.cosine_epochs",
            "train.warmup_steps", "train.stop_after_steps", "train.eval_every_steps",
            "checkpoint.every_steps"):
    _check(not _is_int(g(f)) or g(f) < _STEPS_LIMIT, f, g(f),
           "must be below 2**31 (steps are counted in 32-bit integers)")
  chunk = g("train.loss_chunk")
  _check(_is_int(chunk) and chunk >= 0, "train.loss_chunk", chunk, "must be an integer >= 0")
  if chunk and _is_int(g("data.seq_len")) and g("data.seq_len") % chunk:
    raise ConfigError(f"train.loss_chunk={chunk} must divide data.seq_len={g('data.seq_len')}: "
                      "choose a divisor of seq_len, or 0 (no chunks).")
  accum = g("train.grad_accum_steps")
  _check(_is_int(accum) and accum >= 1, "train.grad_accum_steps", accum,
         "must be an integer >= 1 (1: no gradient accumulation)")
  if g("train.batch_size") % accum:
    raise ConfigError(f"train.batch_size={g('train.batch_size')} is not a multiple of "
                      f"train.grad_accum_steps={accum}: choose a batch size that is, or a "
                      "train.grad_accum_steps that divides it (each step runs "
                      "grad_accum_steps micro-batches of batch_size / grad_accum_steps rows).")
  zero = {"train.eval_batch_size": "0: train.batch_size", "train.num_devices": "0: all devices"}
  for f in ("train.warmup_steps", "train.eval_batch_size", "train.num_devices",
            "train.stop_after_steps", "train.eval_every_steps", "checkpoint.every_steps"):
    _check(_is_int(g(f)) and g(f) >= 0, f, g(f),
           f"must be an integer >= 0 ({zero.get(f, '0: off')})")
  _check(_is_int(g("train.seed_stride")) and g("train.seed_stride") >= 0, "train.seed_stride",
         g("train.seed_stride"), "must be an integer >= 0 (replica r uses seed + r * stride; "
         "0: every replica the same key)")
  last_seed = g("seed") + (g("train.replicas") - 1) * g("train.seed_stride")
  if last_seed >= SEED_LIMIT:
    raise ConfigError(f"replica {g('train.replicas') - 1} would train with seed {last_seed} "
                      "(seed + r * train.seed_stride), past JAX's 32-bit seeds (< 2**32): lower "
                      "seed, train.seed_stride or train.replicas.")
  lr = g("train.learning_rate")
  _check(_is_num(lr) and lr > 0, "train.learning_rate", lr, "must be a number > 0")
  _check(_f32(lr) >= _F32_TINY, "train.learning_rate", lr, _TINY_RULE)
  _check(isinstance(g("train.replica_hparams"), str), "train.replica_hparams",
         g("train.replica_hparams"), "must be a text 'k=v,...;k=v,...' (empty: off)")
  groups = replica_hparams(g("train.replica_hparams"))
  if groups:
    if g("train.replicas") % len(groups):
      raise ConfigError(f"train.replica_hparams has {len(groups)} groups but train.replicas="
                        f"{g('train.replicas')} is not a multiple of it: each group takes "
                        "replicas / groups replicas (seeds seed + i * seed_stride). An empty "
                        "group (e.g. after a trailing ';') counts: it keeps the train.* values.")
    if g("train.grad_accum_steps") != 1:
      raise ConfigError("train.replica_hparams works with train.grad_accum_steps=1 only.")
    normal = "> 0, and at least 1.2e-38 (float32's smallest normal number)"
    rules = {"learning_rate": normal, "eps": normal, "clip_norm": normal,
             "b1": "in [0, 1) in float32", "b2": "in [0, 1) in float32",
             "weight_decay": ">= 0", "warmup_steps": "in [0, 2**31)",
             "cosine_epochs": "in [1, 2**31)", "min_learning_rate": "in [0, learning_rate]"}
    for group in groups:
      merged = {k: group.get(k, g(f"train.{k}")) for k in REPLICA_HPARAMS}
      ok = {"learning_rate": _f32(merged["learning_rate"]) >= _F32_TINY,
            "eps": _f32(merged["eps"]) >= _F32_TINY,
            "clip_norm": _f32(merged["clip_norm"]) >= _F32_TINY,
            "b1": 0 <= _f32(merged["b1"]) < 1, "b2": 0 <= _f32(merged["b2"]) < 1,
            "weight_decay": merged["weight_decay"] >= 0,
            "warmup_steps": 0 <= merged["warmup_steps"] < _STEPS_LIMIT,
            "cosine_epochs": 1 <= merged["cosine_epochs"] < _STEPS_LIMIT,
            "min_learning_rate": 0 <= merged["min_learning_rate"] <= merged["learning_rate"]}
      bad = [f"{k}={merged[k]} must be {rules[k]}" for k in REPLICA_HPARAMS if not ok[k]]
      if bad:
        raise ConfigError(f"train.replica_hparams group {group or '(the train.* values)'}: "
                          f"{'; '.join(bad)}.")
    merged = [tuple(v if k in _INTEGER_HPARAMS else _f32(v)  # as the step holds them:
                    for k, v in ((k, group.get(k, g(f"train.{k}"))) for k in REPLICA_HPARAMS))
              for group in groups]  # 1e-3 and 1.00000000001e-3 alike
    for j, values in enumerate(merged):
      if (i := merged.index(values)) < j:
        said = lambda x: repr(x) if x else "(empty: the train.* values)"  # noqa: E731
        raise ConfigError(
            f"train.replica_hparams groups {i} {said(groups[i])} and {j} {said(groups[j])} "
            "give the same values (with the train.* ones): their replicas, of the same seeds, "
            "would train bitwise alike. Give each group values of its own (more seeds: raise "
            "train.replicas).")
  _check(_is_num(g("train.min_learning_rate")) and 0 <= g("train.min_learning_rate") <= lr,
         "train.min_learning_rate", g("train.min_learning_rate"),
         f"must lie in [0, train.learning_rate={lr}]")
  _check(_is_num(g("train.weight_decay")) and g("train.weight_decay") >= 0,
         "train.weight_decay", g("train.weight_decay"), "must be a number >= 0")
  for f in ("train.b1", "train.b2"):
    _check(_is_num(g(f)) and 0 <= g(f) < 1, f, g(f), "must lie in [0, 1)")
    _check(_f32(g(f)) < 1, f, g(f), "must lie in [0, 1) in float32, the step's arithmetic, "
           "where it is 1.0 (Adam then divides by 0): at most 0.99999994")
  for f in ("train.eps", "train.clip_norm"):
    _check(_is_num(g(f)) and g(f) > 0, f, g(f), "must be a number > 0")
    _check(_f32(g(f)) >= _F32_TINY, f, g(f), _TINY_RULE)
  _check(_is_num(g("model.dropout")) and 0 <= g("model.dropout") < 1, "model.dropout",
         g("model.dropout"), "must lie in [0, 1)")
  for f in ("model.embed_dropout", "model.residual_dropout"):
    _check(_is_num(g(f)) and 0 <= g(f) < 1, f, g(f), "must lie in [0, 1) (0: none)")
  _check(_is_int(g("model.dropout_bits")) and g("model.dropout_bits") in (16, 32),
         "model.dropout_bits", g("model.dropout_bits"),
         "must be 32 (flax's nn.Dropout, the default) or 16 (two decisions per random word)")
  _check(g("model.attention_dropout") is None or (_is_num(g("model.attention_dropout")) and
                                                  0 <= g("model.attention_dropout") < 1),
         "model.attention_dropout", g("model.attention_dropout"),
         "must lie in [0, 1) (or None: model.dropout)")
  _check(_is_num(g("model.noise_scale")), "model.noise_scale", g("model.noise_scale"),
         "must be a number")
  _check(isinstance(g("train.sample_prompt"), str) and (g("train.sample_prompt") == "" or
                                                        g("train.sample_prompt").strip()),
         "train.sample_prompt", g("train.sample_prompt"),
         "must be a text with at least one word (empty: no samples)")
  _check(_is_int(g("train.sample_tokens")) and g("train.sample_tokens") >= 1,
         "train.sample_tokens", g("train.sample_tokens"), "must be an integer >= 1")
  if g("train.sample_prompt"):
    _check(len(g("train.sample_prompt").split()) + g("train.sample_tokens") <= g("model.max_len"),
           "train.sample_tokens", g("train.sample_tokens"),
           f"plus the prompt's words exceeds model.max_len={g('model.max_len')}; ask for fewer")
  _check(g("train.sharding") in ("replicated", "fsdp"), "train.sharding", g("train.sharding"),
         "must be 'replicated' (default) or 'fsdp' (parameters and optimizer state sliced over "
         "the devices)")
  _check(g("train.rng_impl") in ("threefry", "rbg", "unsafe_rbg"), "train.rng_impl",
         g("train.rng_impl"), "must be 'threefry' (default), 'rbg' or 'unsafe_rbg'")
  _check(g("model.attention_impl") in ("auto", "xla", "cudnn", "pallas"), "model.attention_impl",
         g("model.attention_impl"), "must be 'auto' (default: cuDNN on a GPU in bfloat16, XLA "
         "elsewhere), 'xla', 'cudnn' or 'pallas' (Pallas' flash attention on a GPU, float32 too)")
  _check(g("model.remat_policy") in ("nothing", "dots"), "model.remat_policy",
         g("model.remat_policy"), "must be 'nothing' (recompute the whole layer) or 'dots' "
         "(keep its matrix products' outputs)")
  _check(g("model.remat_policy") == "nothing" or g("model.remat") is True, "model.remat_policy",
         g("model.remat_policy"), "says what a rematerialised layer keeps, but model.remat is "
         "off: add --config.model.remat=true, or leave remat_policy 'nothing'")
  seq_len = g("data.seq_len")  # 128: model.pallas_block's (not imported: no jax here)
  _check(g("model.attention_impl") != "pallas" or not isinstance(seq_len, int) or seq_len <= 128
         or seq_len % 128 == 0, "data.seq_len", seq_len,
         "must be a multiple of 128 (the block of its kernel) or at most 128 with "
         "model.attention_impl='pallas'; choose such a length, or attention_impl 'auto'")
  _check(isinstance(g("train.compilation_cache"), str), "train.compilation_cache",
         g("train.compilation_cache"), "must be a folder path (empty: no persistent cache)")
  _check(str(g("train.compilation_cache")).strip().lower() not in (
      "false", "none", "no", "off", "0", "true", "yes", "on", "1"), "train.compilation_cache",
         g("train.compilation_cache"), "is a folder path, not a switch: this would keep the "
         "cache in a folder of that name here; --config.train.compilation_cache= (empty) turns "
         "it off, a path (default ~/.cache/infinito_jax/jax) puts it there")
  cache = str(g("train.compilation_cache"))
  _check(cache.strip() == cache, "train.compilation_cache",
         cache, "begins or ends with blanks: that would keep the cache in a folder whose "
         "name does, hardly visible; give the path without them, or "
         "--config.train.compilation_cache= (empty) to turn it off")
  _check(isinstance(g("train.profile_steps"), str) and profile_window(g("train.profile_steps"))
         is not False, "train.profile_steps", g("train.profile_steps"),
         "must be 'N,M' with 0 <= N < M (steps N..M-1 are traced), or empty")
  for f in ("log.wandb_project", "log.wandb_entity"):
    _check(isinstance(g(f), str), f, g(f), "must be a text (empty: off)")
  for f in ("checkpoint.keep_best", "train.allow_changes", "data.add_eos", "data.random_offsets",
            "model.causal", "train.threefry_kernel",
            "model.fuse_memory", "model.exploration", "log.tensorboard", "log.plot"):
    _check(isinstance(g(f), bool), f, g(f), "must be true or false")
  _check(g("checkpoint.on_damage") in ON_DAMAGE, "checkpoint.on_damage",
         g("checkpoint.on_damage"), f"must be one of {ON_DAMAGE}")
  _check(g("train.on_divergence") in ON_DIVERGENCE, "train.on_divergence",
         g("train.on_divergence"), f"must be one of {ON_DIVERGENCE}")
  _check(g("data.source") in ("embedded", "hub", "files"), "data.source", g("data.source"),
         "must be 'embedded', 'hub' or 'files'")
  _check(_is_int(g("model.vocab_size")) and g("model.vocab_size") >= 4, "model.vocab_size",
         g("model.vocab_size"), "must be an integer >= 4 (3 special ids + at least one word)")
  _check(_is_int(g("model.max_len")) and g("model.max_len") >= 2, "model.max_len",
         g("model.max_len"), "must be an integer >= 2 (the positions a window and a sample "
         "have; the original's is 512)")
  _check(g("data.seq_len") <= g("model.max_len"),
         "data.seq_len", g("data.seq_len"),
         f"exceeds model.max_len={g('model.max_len')}; lower data.seq_len or raise model.max_len")
  if g("data.source") == "files":
    for split in ("train", "validation"):
      _check(bool(g(f"data.files.{split}")), f"data.files.{split}", g(f"data.files.{split}"),
             "data.source=files needs data.files.train and data.files.validation (one text "
             "per line)")
  else:
    given = [f"data.files.{s}" for s in ("train", "validation", "test") if g(f"data.files.{s}")]
    if given:  # read by nothing: the run would train on other data than the user means
      raise ConfigError(f"{', '.join(given)} is set but data.source={g('data.source')!r} does "
                        "not read files: add --config.data.source=files to train on them, or "
                        "drop the file fields.")
  if g("data.source") == "embedded":
    from infinito_jax.corpus import CorpusSpec  # pylint: disable=g-import-not-at-top
    corpus = _as_dict(config)["data"]["corpus"]
    try:
      CorpusSpec(**{k: (0 if k == "seed" else v) for k, v in corpus.items()}).check()
    except (ValueError, TypeError) as e:
      raise ConfigError(f"config.data.corpus: {e}") from None
  from infinito_jax.model import model_config  # pylint: disable=g-import-not-at-top
  model_config(config.model if isinstance(config, ml_collections.ConfigDict)
               else ml_collections.ConfigDict(_as_dict(config)["model"]))


_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
_INTEGER_HPARAMS = ("warmup_steps", "cosine_epochs")


def replica_hparams(text: str) -> list[dict]:
  """train.replica_hparams: 'k=v,k=v;k=v;...' -> one dict of train.<k> overrides per group
  ('' -> []; an empty group is the config's own values).

  Raises:
    ConfigError: a key not in REPLICA_HPARAMS, a key twice in a group, a value that is not a
      finite decimal number, or a step count that is not a whole number.
  """
  if not text.strip():
    return []
  groups = []
  for group in text.split(";"):
    values = {}
    for item in filter(None, (x.strip() for x in group.split(","))):
      key, eq, value = (x.strip() for x in item.partition("="))
      if eq and key.startswith("train.") and key[len("train."):] in REPLICA_HPARAMS:
        raise ConfigError(f"train.replica_hparams={text!r}: write {key[len('train.'):]!r}, not "
                          f"{key!r} (the keys are train's fields without the prefix).")
      if eq and key not in REPLICA_HPARAMS:
        why = ("changes the model (each replica's program must be the same: a study runs "
               "such variants one after another)" if key.startswith("model.") or f"model.{key}"
               in FIELDS else "is not a value of the optimiser")
        raise ConfigError(f"train.replica_hparams={text!r}: {key!r} cannot differ between "
                          f"replicas: it {why}. The keys that can are {list(REPLICA_HPARAMS)}.")
      if not eq:
        raise ConfigError(f"train.replica_hparams={text!r}: {item!r} is not KEY=VALUE with KEY one "
                          f"of {list(REPLICA_HPARAMS)} (groups separated by ';', e.g. "
                          "'learning_rate=1e-4;learning_rate=1e-3,warmup_steps=100').")
      if key in values:
        raise ConfigError(f"train.replica_hparams={text!r}: the group {group.strip()!r} sets {key} "
                          "twice; give each key once per group.")
      if not _NUMBER.match(value):
        raise ConfigError(f"train.replica_hparams={text!r}: {key}={value!r} is not a finite "
                          "decimal number (e.g. 3e-4 or 0.001).")
      number = float(value)
      if not abs(number) <= _F32_MAX:
        raise ConfigError(f"train.replica_hparams={text!r}: {key}={value} is infinite in "
                          "float32, the step's arithmetic (its numbers lie within +-3.4e38).")
      if key in _INTEGER_HPARAMS:
        if number != int(number):
          raise ConfigError(f"train.replica_hparams={text!r}: {key}={value} must be a whole "
                            "number.")
        number = int(number)
      values[key] = number
    groups.append(values)
  return groups


def profile_window(text: str):
  """'N,M' -> (N, M); '' -> None; anything else -> False."""
  if not text:
    return None
  try:
    n, m = (int(x) for x in text.split(","))
  except ValueError:
    return False
  return (n, m) if 0 <= n < m else False


def with_absolute_paths(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy whose data files are absolute, so the run reads the same files from any folder."""
  c = config.copy_and_resolve_references()
  for split, path in c.data.files.items():
    if path:
      c.data.files[split] = os.path.abspath(os.path.expanduser(path))
  return c
