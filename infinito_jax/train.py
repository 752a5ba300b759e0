"""Training: the TrainState, the jitted train and eval steps, and the epoch loop.

`train_and_evaluate(config, workdir)` trains, validates every epoch, checkpoints (latest and
best), stops early, resumes exactly from the workdir, and writes history.jsonl and summary.json.
"""

import dataclasses
import json
import math
import os
import signal
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import tqdm

from infinito_jax import checkpoint as ckpt_lib
from infinito_jax import data as data_lib
from infinito_jax.loss import token_cross_entropy
from infinito_jax.memory import MEMORY
from infinito_jax.model import InfinitoV52, ModelConfig
from infinito_jax.optim import cosine_schedule, make_optimizer
from infinito_jax.tokenizer import WordTokenizer

METRIC_NAMES = {"phi_estimate": "integration_phi", "coherence": "coherence",
                "complexity": "complexity", "pattern_diversity": "pattern_diversity"}


class NonFiniteLossError(RuntimeError):
  """The training loss became NaN or infinite; the message names the step."""


@flax.struct.dataclass
class TrainState:
  """Everything a step changes: carried through the jitted step and saved whole."""
  step: jax.Array  # int32 []: optimizer steps taken
  params: Any
  opt_state: Any
  memory: Any  # the model's `memory` collection
  rng: jax.Array  # key data (uint32) of the training key; step keys are fold_in(key, step)


def model_config(model: ml_collections.ConfigDict) -> ModelConfig:
  """The frozen ModelConfig of a config's `model` group (dtype given by name)."""
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(model.keys()) - fields)
  if unknown:
    raise ValueError(f"config.model has unknown fields {unknown}; known: {sorted(fields)}.")
  kw = dict(model.items())
  kw["dtype"] = jnp.dtype(kw.get("dtype", "float32"))
  return ModelConfig(**kw)


def eval_batch_size(config: ml_collections.ConfigDict) -> int:
  """train.eval_batch_size, where 0 means the training batch size."""
  return config.train.eval_batch_size or config.train.batch_size


def make_mesh(num_devices: int = 0) -> Mesh:
  """A 1-D data-parallel mesh over the first `num_devices` local devices (0: all)."""
  devices = jax.local_devices()
  if num_devices:
    if num_devices > len(devices):
      raise ValueError(f"train.num_devices={num_devices} but only {len(devices)} local devices.")
    devices = devices[:num_devices]
  return Mesh(np.array(devices), ("data",))


def make_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
  t = config.train
  return cosine_schedule(t.learning_rate, t.min_learning_rate,
                         max(1, steps_per_epoch * t.cosine_epochs), t.warmup_steps)


def make_tx(config, model_cfg: ModelConfig, params, schedule) -> optax.GradientTransformation:
  t = config.train
  return make_optimizer(schedule, model_cfg, params, weight_decay=t.weight_decay,
                        clip_norm=t.clip_norm, b1=t.b1, b2=t.b2, eps=t.eps)


def init_variables(model: InfinitoV52, key, seq_len: int):
  return model.init({"params": key}, jnp.zeros((1, seq_len), jnp.int32))


def create_state(model: InfinitoV52, tx, key, seq_len: int) -> TrainState:
  """A fresh state: params from split(key)[0]; the training key is split(key)[1]."""
  init_key, train_key = jax.random.split(key)
  v = init_variables(model, init_key, seq_len)
  return TrainState(step=jnp.zeros((), jnp.int32), params=v["params"],
                    opt_state=tx.init(v["params"]), memory=v[MEMORY],
                    rng=jax.random.key_data(train_key))


def make_train_step(model: InfinitoV52, tx, schedule):
  """train_step(state, batch) -> (state, metrics); pure, to be jitted with the state donated."""

  def train_step(state: TrainState, batch):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    dropout_key, explore_key = jax.random.split(key)

    def loss_fn(params):
      (logits, _), updates = model.apply(
          {"params": params, MEMORY: state.memory}, batch["inputs"], train=True,
          rngs={"dropout": dropout_key, "explore": explore_key}, mutable=[MEMORY])
      total, count = token_cross_entropy(logits, batch["targets"])
      return total / jnp.maximum(count, 1.0), (updates[MEMORY], count)

    (loss, (memory, count)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "tokens": count,
               "learning_rate": schedule(state.step)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                         memory=memory), metrics

  return train_step


def make_eval_step(model: InfinitoV52):
  """eval_step(state, batch) -> sums over the batch; reads the memory, never changes it."""

  def eval_step(state: TrainState, batch):
    (logits, metrics) = model.apply({"params": state.params, MEMORY: state.memory},
                                    batch["inputs"], with_metrics=True)
    total, count = token_cross_entropy(logits, batch["targets"])
    real = jnp.any(batch["targets"] != 0, axis=1).astype(jnp.float32)  # padded rows: 0
    sums = {"loss": total, "tokens": count, "examples": jnp.sum(real),
            "memory_utilization": metrics["memory_utilization"] * jnp.sum(real)}
    for name, out in METRIC_NAMES.items():
      sums[out] = jnp.sum(metrics["per_example"][name] * real)
    return sums

  return eval_step


def finish_eval(per_batch: list[dict]) -> dict:
  """Host side, once per split: token-weighted loss and perplexity, example-weighted metrics.

  `perplexity_batch_mean` is the original's figure, the mean over batches of exp(batch mean
  loss); it is reported only to compare with numbers the original printed.
  """
  batches = jax.device_get(per_batch)
  s = {k: float(sum(b[k] for b in batches)) for k in batches[0]}
  tokens, examples = max(s["tokens"], 1.0), max(s["examples"], 1.0)
  loss = s["loss"] / tokens
  batch_ppl = [math.exp(min(float(b["loss"]) / float(b["tokens"]), 700.0))
               for b in batches if b["tokens"] > 0]
  out = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": int(s["tokens"]),
         "perplexity_batch_mean": float(np.mean(batch_ppl))}
  for name in list(METRIC_NAMES.values()) + ["memory_utilization"]:
    out[name] = s[name] / examples
  return out


class Trainer:
  """Owns the mesh, the jitted steps and the shardings of one run."""

  def __init__(self, config: ml_collections.ConfigDict, model_cfg: ModelConfig,
               steps_per_epoch: int):
    self.config, self.model_cfg = config, model_cfg
    self.model = InfinitoV52(model_cfg)
    self.mesh = make_mesh(config.train.num_devices)
    n = self.mesh.size
    self.eval_batch_size = eval_batch_size(config)
    for name, size in (("batch_size", config.train.batch_size),
                       ("eval_batch_size", self.eval_batch_size)):
      if size % n:
        raise ValueError(f"train.{name}={size} must be divisible by the {n} devices of the "
                         f"mesh; change it or set train.num_devices.")
    self.replicated = NamedSharding(self.mesh, P())
    self.batch_sharding = NamedSharding(self.mesh, P("data"))
    self.schedule = make_schedule(config, steps_per_epoch)
    key = jax.random.key(config.seed)
    abstract_params = jax.eval_shape(
        lambda k: init_variables(self.model, k, config.data.seq_len)["params"], key)
    self.tx = make_tx(config, model_cfg, abstract_params, self.schedule)
    self.train_step = jax.jit(make_train_step(self.model, self.tx, self.schedule),
                              in_shardings=(self.replicated, self.batch_sharding),
                              out_shardings=(self.replicated, self.replicated),
                              donate_argnums=0)
    self.eval_step = jax.jit(make_eval_step(self.model),
                             in_shardings=(self.replicated, self.batch_sharding),
                             out_shardings=self.replicated)
    self._create = jax.jit(lambda k: create_state(self.model, self.tx, k, config.data.seq_len),
                           out_shardings=self.replicated)
    self._key = key

  def new_state(self) -> TrainState:
    return self._create(self._key)

  def abstract_state(self):
    shapes = jax.eval_shape(lambda k: create_state(self.model, self.tx, k,
                                                   self.config.data.seq_len), self._key)
    return jax.tree_util.tree_map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=self.replicated), shapes)

  def put(self, batch):
    return jax.device_put(batch, self.batch_sharding)

  def evaluate(self, state: TrainState, batches: data_lib.Batches) -> dict:
    return finish_eval([self.eval_step(state, self.put(batch)) for batch in batches])


class _Interrupt:
  """Ctrl-C finishes the current step, then the loop saves and exits; a second Ctrl-C aborts."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGINT, self._handle)
    except ValueError:  # not the main thread: no handler, Ctrl-C behaves as usual
      self._previous = None
    return self

  def _handle(self, signum, frame):
    if self.requested:
      raise KeyboardInterrupt
    self.requested = True
    print("\nInterrupted: finishing this step, saving a checkpoint, then exiting "
          "(Ctrl-C again to abort without saving).", flush=True)

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGINT, self._previous)


def _append(path: str, record: dict) -> None:
  with open(path, "a") as f:
    f.write(json.dumps(record) + "\n")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains `config` in `workdir` (resuming from its latest checkpoint) and returns the summary.

  Raises:
    NonFiniteLossError: the loss became NaN/inf; the last good checkpoint is kept.
    CheckpointError: the workdir's checkpoint is damaged or does not fit the config.
    DataError: the data cannot be loaded (the message names the alternatives).
  """
  t0 = time.time()
  os.makedirs(workdir, exist_ok=True)
  model_cfg = model_config(config.model)
  checkpointer = ckpt_lib.Checkpointer(workdir, keep_best=config.checkpoint.keep_best)
  history_path = os.path.join(workdir, "history.jsonl")
  latest = checkpointer.latest_step()
  meta = None
  tokenizer = None
  if latest is not None:
    meta = checkpointer.read_meta(latest)
    ckpt_lib.check_compatible(meta, config.to_dict(), checkpointer.path(latest))
    tokenizer = WordTokenizer.from_json(meta["tokenizer"])

  data = data_lib.prepare(config, model_cfg, tokenizer)
  train_batches = data.batches("train", config.train.batch_size, config.seed, shuffle=True)
  steps_per_epoch = len(train_batches)
  trainer = Trainer(config, model_cfg, steps_per_epoch)
  valid_batches = data.batches("validation", trainer.eval_batch_size)

  if meta is None:
    state = trainer.new_state()
    meta = {"config": config.to_dict(), "tokenizer": data.tokenizer.to_json(),
            "data_info": data.info, "epoch": 0, "batch": 0, "history": [],
            "best_val_loss": None, "best_step": None, "epochs_without_improvement": 0,
            "finished": False}
    open(history_path, "w").close()
    print(f"Starting a new run in {os.path.abspath(workdir)}")
  else:
    state, _ = checkpointer.restore(latest, trainer.abstract_state())
    with open(history_path, "w") as f:  # the checkpoint's history is the truth
      f.writelines(json.dumps(r) + "\n" for r in meta["history"])
    print(f"Resuming from {checkpointer.path(latest)} (epoch {meta['epoch'] + 1}, "
          f"batch {meta['batch']})")
  n_params = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
  print(f"{n_params:,} parameters; {steps_per_epoch} steps per epoch; "
        f"{trainer.mesh.size} device(s): {jax.devices()[0].platform}; "
        f"vocabulary {len(data.tokenizer)} words; train {train_batches.num_tokens:,} tokens")
  if data.info:
    print(f"Embedded corpus: oracle perplexity {data.info['oracle_perplexity']:.2f} "
          f"(previous word only: {data.info['previous_word_only_perplexity']:.2f})")

  def record(kind: str, **values):
    rec = {"kind": kind, **values}
    meta["history"].append(rec)
    _append(history_path, rec)

  host_step = int(state.step)  # mirrors state.step on the host: no per-step device sync

  def save(val_loss=None):
    # a copy: the save is asynchronous and the loop goes on changing `meta`
    checkpointer.save(host_step, state, json.loads(json.dumps(meta)), val_loss)

  pending = []  # device metrics not yet fetched: fetched every log_every steps

  def flush(bar=None):
    """Fetches pending train metrics; stops on a non-finite loss, naming the step."""
    if not pending:
      return
    fetched = jax.device_get(pending)
    pending.clear()
    for step, m in fetched:
      if not np.isfinite(m["loss"]):
        raise NonFiniteLossError(
            f"the training loss became {float(m['loss'])} at step {step} (epoch "
            f"{meta['epoch'] + 1}). Training stopped; the last good checkpoint is kept in "
            f"{checkpointer.directory} (steps {checkpointer.steps()}). Lower "
            f"train.learning_rate or train.clip_norm, or add train.warmup_steps.")
    losses = [float(m["loss"]) for _, m in fetched]
    last_step, last = fetched[-1]
    now = time.time()
    dt, clock["t"] = now - clock["t"], now
    tokens = sum(float(m["tokens"]) for _, m in fetched)
    record("train", step=last_step + 1, epoch=meta["epoch"] + 1, loss=float(np.mean(losses)),
           learning_rate=float(last["learning_rate"]), grad_norm=float(last["grad_norm"]),
           tokens_per_s=tokens / max(dt, 1e-9))
    if bar is not None:
      bar.set_postfix(loss=f"{np.mean(losses):.3f}", lr=f"{float(last['learning_rate']):.2e}")

  clock = {"t": time.time()}
  stop_at, every = config.train.stop_after_steps, config.checkpoint.every_steps
  status = "finished"
  try:
    with _Interrupt() as interrupt:
      while meta["epoch"] < config.train.epochs and not meta["finished"]:
        epoch = meta["epoch"]
        bar = tqdm.tqdm(total=steps_per_epoch, initial=meta["batch"], disable=None,
                        desc=f"epoch {epoch + 1}/{config.train.epochs}", unit="step")
        while meta["batch"] < steps_per_epoch:
          step = host_step
          state, metrics = trainer.train_step(state, trainer.put(
              train_batches.batch(epoch, meta["batch"])))
          pending.append((step, metrics))
          host_step += 1
          meta["batch"] += 1
          bar.update(1)
          stop = interrupt.requested or (stop_at and step + 1 >= stop_at)
          if len(pending) >= config.train.log_every or stop or (every and (step + 1) % every == 0):
            flush(bar)
          if stop:
            save()
            status = "interrupted"
            break
          if every and (step + 1) % every == 0 and meta["batch"] < steps_per_epoch:
            save()
        bar.close()
        if status == "interrupted":
          break
        flush()
        val = trainer.evaluate(state, valid_batches)
        improved = meta["best_val_loss"] is None or val["loss"] < meta["best_val_loss"]
        meta["epoch"], meta["batch"] = epoch + 1, 0
        if improved:
          meta["best_val_loss"], meta["best_step"] = val["loss"], host_step
          meta["best_epoch"] = epoch + 1
          meta["epochs_without_improvement"] = 0
        else:
          meta["epochs_without_improvement"] += 1
        record("validation", step=host_step, epoch=epoch + 1, **val)
        oracle = ""
        if data.info:
          oracle = f" (oracle {data.info['oracle_perplexity']:.2f}" + (
              ")" if data.info["oracle_applies"] else
              f", approximate: {data.info['validation_unk_rate']:.2%} <unk>)")
        print(f"epoch {epoch + 1}: validation loss {val['loss']:.4f}, perplexity "
              f"{val['perplexity']:.2f}{oracle}, phi {val['integration_phi']:.3f}"
              f"{' (best)' if improved else ''}", flush=True)
        if meta["epochs_without_improvement"] >= config.train.patience:
          meta["finished"] = True
          print(f"Early stopping: no better validation loss for {config.train.patience} epochs.")
        save(val["loss"])
        if interrupt.requested or (stop_at and host_step >= stop_at):
          status = "interrupted"
          break
  finally:
    checkpointer.close()  # waits for pending saves: nothing is lost on exit

  summary = {
      "status": status, "workdir": os.path.abspath(workdir),
      "checkpoints": checkpointer.directory, "history": os.path.abspath(history_path),
      "steps": host_step, "epochs_completed": meta["epoch"],
      "best_epoch": meta.get("best_epoch"), "best_step": meta["best_step"],
      "best_val_loss": meta["best_val_loss"],
      "best_val_perplexity": (math.exp(meta["best_val_loss"])
                              if meta["best_val_loss"] is not None else None),
      "wall_time_s": time.time() - t0, "devices": trainer.mesh.size,
      "platform": jax.devices()[0].platform, "parameters": int(n_params),
  }
  if data.info:
    summary["corpus"] = data.info
  ckpt_lib.dump_json(os.path.join(workdir, "summary.json"), summary)
  return summary
