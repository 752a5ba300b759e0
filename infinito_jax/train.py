"""Training: the TrainState, the jitted train and eval steps, and the flat step loop.

`train_and_evaluate(config, workdir)` runs one loop over global steps; logging, validation,
checkpoints and stopping are periodic actions at the top of each step. Batch `step` is
(epoch, index) = divmod(step, steps_per_epoch), so a run resumes from its step alone, bitwise.

A run is a population of `train.replicas` = N independent replicas (1 by default, the same code
path): the pure train and eval steps are mapped (vmap; lax.map on a CPU) over a leading replica
axis of the state (parameters, optimizer state, memory, key) and of the batch. Replica r is the
run of seed `seed + r * train.seed_stride`: its init key, dropout/exploration keys and data
order are the ones a single run with that seed uses (the data itself, an embedded corpus
included, is the population's).
"""

import contextlib
import errno
import functools
import json
import math
import os
import re
import shlex
import sys
import time
import warnings
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm import auto as tqdm_auto

from infinito_jax import checkpoint as ckpt_lib
from infinito_jax import config as config_lib
from infinito_jax import data as data_lib
from infinito_jax import distributed
from infinito_jax import hostmem
from infinito_jax import lifecycle
from infinito_jax import sampling
from infinito_jax import writers as writers_lib
from infinito_jax.errors import (CheckpointError, ConfigError, DamagedCheckpointError,
                                 DiskFullError, IncompatibleCheckpointError, check_config_dict,
                                 NonFiniteLossError, WorkdirError, WorkdirLostError,
                                 is_disk_full, is_unwritable, python_terms, workdir_path,
                                 short as errors_short)
from infinito_jax.lifecycle import RunRecord
from infinito_jax.loss import (LOSS_GRADIENT_FORMS, chunked_token_cross_entropy,
                               token_cross_entropy)
from infinito_jax.memory import MEMORY
from infinito_jax.model import InfinitoV52, ModelConfig, model_config, pallas_kernel
from infinito_jax.optim import OPTIMIZER_FORMS, apply_step, cosine_schedule, make_optimizer
from infinito_jax.prng import make_key, wrap_key
from infinito_jax.tokenizer import WordTokenizer

METRIC_NAMES = {"phi_estimate": "integration_phi", "coherence": "coherence",
                "complexity": "complexity", "pattern_diversity": "pattern_diversity"}

__all__ = ["TrainState", "Trainer", "Scorer", "train_and_evaluate", "NonFiniteLossError",
           "replica", "replica_seeds"]


@flax.struct.dataclass
class TrainState:
  """Everything a step changes: carried through the jitted step and saved whole."""
  step: jax.Array  # int32 []: optimizer steps taken
  params: Any
  opt_state: Any
  memory: Any  # the model's `memory` collection
  rng: jax.Array  # key data (uint32) of the training key; step keys are fold_in(key, step)
  # bool []: the replica trains. train.on_divergence='freeze' clears it at the step whose loss
  # or gradient norm is not finite (that step's update is discarded) and it stays clear: the
  # replica keeps the weights it had before. Not in the checkpoint's arrays: the run's record
  # holds each replica's divergence (state_from_items)
  live: jax.Array


def replica_seeds(config: ml_collections.ConfigDict) -> list[int]:
  """The seed of each replica: replica r is the single run of seed + r * train.seed_stride; with
  G groups of train.replica_hparams, seed + (r % (replicas / G)) * train.seed_stride."""
  t = config.train
  groups = len(config_lib.replica_hparams(t.get("replica_hparams", ""))) or 1
  per_group = t.replicas // groups
  return [config.seed + (r % per_group) * t.seed_stride for r in range(t.replicas)]


def replica_groups(config: ml_collections.ConfigDict) -> list[dict]:
  """The optimisation values of each replica: train.* with its group's overrides."""
  t = config.train
  groups = config_lib.replica_hparams(t.get("replica_hparams", "")) or [{}]
  return [{k: groups[g].get(k, t[k]) for k in config_lib.REPLICA_HPARAMS}
          for g in replica_group_index(config)]


def replica_groups_at(config: ml_collections.ConfigDict, changes: list[dict],
                      step: int) -> list[dict]:
  """replica_groups as they were when step `step` was trained: `config` (the run's now) with
  the optimisation values that `changes` (history.jsonl's config_change records, each at the
  step a resume started from) changed at or after `step` put back."""
  fields = {f"train.{k}" for k in config_lib.REPLICA_HPARAMS} | {"train.replica_hparams"}
  then = config.copy_and_resolve_references()
  for rec in reversed(changes):
    if rec.get("step", 0) < step:
      break
    for field, (saved, _) in sorted(rec.get("changes", {}).items()):
      if field in fields and saved is not None:  # (None: a field the old config lacked)
        with contextlib.suppress(TypeError, ValueError):  # a value its type refuses: kept
          then.train[field.split(".", 1)[1]] = saved
  return replica_groups(then)


def replica_group_index(config: ml_collections.ConfigDict) -> list[int]:
  """The group of train.replica_hparams each replica is in (all 0 where it sets none)."""
  groups = config_lib.replica_hparams(config.train.get("replica_hparams", "")) or [{}]
  return [r // (config.train.replicas // len(groups)) for r in range(config.train.replicas)]


def replica_hparams_arrays(config: ml_collections.ConfigDict,
                           steps_per_epoch: int) -> dict[str, np.ndarray] | None:
  """[replicas] float32 arrays of the per-replica optimisation values (None without groups);
  the cosine's length in steps as `decay_steps`."""
  if not config_lib.replica_hparams(config.train.get("replica_hparams", "")):
    return None
  rows = replica_groups(config)
  out = {k: np.asarray([r[k] for r in rows], np.float32) for k in config_lib.REPLICA_HPARAMS
         if k != "cosine_epochs"}
  out["decay_steps"] = np.asarray([max(1, steps_per_epoch * r["cosine_epochs"]) for r in rows],
                                  np.float32)
  return out


SINGLE_REPLICA_FORMS = ("auto", "vmap", "plain", "plain_inner")


def _env_form(name: str, choices) -> str:
  """The environment variable `name` (a benchmark's A/B switch): one of `choices`, 'auto'
  where unset or empty; any other value is a ConfigError naming the choices."""
  form = os.environ.get(name, "auto") or "auto"
  if form not in choices:
    raise ConfigError(f"{name}={form!r}: use one of {choices} (or leave it unset).")
  return form


def single_replica_form() -> str:
  """How a one-replica step is compiled: 'vmap' (a batch axis of size 1 through every op) or
  'plain' (the model's forward and backward pass on that replica alone; the clip + AdamW update,
  elementwise, on the state as it is stored, with its replica axis). All compute the same
  function; they differ in XLA's layouts, hence in speed and in float rounding. 'auto' (the
  default): 'vmap' on CPU, where it measured ~10% faster (bench/step_speed.py --variant
  ...,single=plain), 'plain' elsewhere, where the size-1 axis put transposes around the GPU
  matmuls and dropout masks (H200, fp32, full preset: 15.8 -> 14.1 ms per step, on two
  machines). 'plain_inner', the former 'plain', runs the update on the replica alone too: on
  XLA:CPU its update then re-reads the old moments after their buffers were given to the new
  ones, so XLA copies the parameters and both moments whole every step (340 MiB in the full
  preset; bench/step_speed.py's copy_mib); kept for that A/B on other devices. The environment
  variable INFINITO_SINGLE_REPLICA=vmap|plain|plain_inner overrides it for a process (a
  benchmark's A/B).
  """
  form = _env_form("INFINITO_SINGLE_REPLICA", SINGLE_REPLICA_FORMS)
  if form == "auto":
    return "vmap" if jax.default_backend() == "cpu" else "plain"
  return form


def optimizer_form(fsdp: bool = False) -> str:
  """How the train step applies the clip + AdamW update (optim.apply_step): 'leaves' (optax's
  transformation leaf by leaf), 'norm' (the global gradient norm over all gradients as one
  vector, the update leaf by leaf) or 'vectors' (all of it on the trained parameters,
  gradients and moments concatenated into vectors). The three compute the same step; only the
  order in which the norm sums its squares differs, so they equal each other to float rounding.
  'auto' (the default): 'leaves' where the parameters are sliced over devices
  (train.sharding=fsdp: concatenating them would gather them), else 'norm' on GPUs and TPUs
  (XLA:GPU reduces each of the ~100 gradient leaves in a kernel of its own: at the full
  preset one vector makes 766 kernels per step of the 880, compiled for an H100 by
  bench/gpu_aot.py) and 'leaves' on CPUs, where 'norm' measured no faster (bench/step_speed.py
  --variant ...,optimizer=norm). INFINITO_OPTIMIZER_FORM=leaves|norm|vectors overrides it for
  a process (a benchmark's A/B).
  """
  form = _env_form("INFINITO_OPTIMIZER_FORM", OPTIMIZER_FORMS)
  if form == "auto":
    return "leaves" if fsdp or jax.default_backend() == "cpu" else "norm"
  return form


LOSS_GRADIENT_CHOICES = ("auto", *LOSS_GRADIENT_FORMS)


def loss_gradient_form() -> str:
  """How the train step differentiates the cross-entropy with respect to the logits
  (loss.token_cross_entropy's `grad`): 'fused' (softmax - one-hot written out: one elementwise
  pass over the logits in the backward pass, fused with their float32 cast and the bias
  gradient) or 'autodiff' (JAX's derivative of optax's loss: a scatter-add of the one-hot
  into a zeroed [B, T, V] buffer and a product in passes of their own). The loss is the same,
  bitwise; its gradients equal to float rounding. 'auto' (the default): 'fused' off CPUs
  (compiled for an H100 by bench/gpu_aot.py, the full preset's fused bfloat16 step moves
  13764 instead of 15014 MiB, the demo population of 8 13311 instead of 14249 MiB, one demo
  run 2091 instead of 2169 MiB: bench/gpu_aot.py's traffic_mib_per_step; not yet timed on
  a GPU: gpu_all.sh part 'lossgrad'), 'autodiff' on CPUs, where XLA:CPU keeps a [B, T, V]
  float32 buffer more (demo train step: 466 against 393 MiB of temporaries) and 'fused'
  measured no faster (bench/step_speed.py --variant ...,loss_grad=fused).
  INFINITO_LOSS_GRADIENT=fused|autodiff overrides it for a process (a benchmark's A/B)."""
  form = _env_form("INFINITO_LOSS_GRADIENT", LOSS_GRADIENT_CHOICES)
  if form == "auto":
    return "autodiff" if jax.default_backend() == "cpu" else "fused"
  return form


POPULATION_FORMS = ("auto", "vmap", "map", "map_stacked")


def population_form(sharded: bool = False) -> str:
  """How a population's step (N > 1 replicas) is compiled: 'vmap' (one batched program over the
  replica axis: what fills an accelerator that one small run leaves idle) or 'map'
  (`jax.lax.map`: the replicas one after another inside the one jitted program, each as a
  single run's step). Both compute the same function, to float rounding. 'auto' (the default):
  'map' on a CPU, where one run already keeps the cores busy and the batched matrix products
  of 'vmap' are slower (demo preset, 2 cores, timed in turns by `python bench/population.py`:
  8 replicas' train step 3.8 against 5.9 s, eval step 0.8 against 1.1 s, temporaries 0.6
  against 3.1 GiB), unless the replicas are sharded over several devices (`sharded`), which
  'vmap' keeps local to each device; 'vmap' elsewhere. A train step under 'map' loops over
  the replicas for its gradients only and updates the population state in one vmapped update
  (_map_gradients); 'map_stacked', the former 'map', loops over the whole step, which copies
  the population's parameters and moments every step, kept for that A/B
  (bench/population.py --forms map map_stacked). INFINITO_POPULATION=vmap|map|map_stacked
  overrides it for a process.
  """
  form = _env_form("INFINITO_POPULATION", POPULATION_FORMS)
  if form == "auto":
    return "map" if jax.default_backend() == "cpu" and not sharded else "vmap"
  return form


def over_replicas(fn, replicas: int, in_axes=0, sharded: bool = False):
  """`fn` over the leading replica axis of its arguments (in_axes: 0 or None per argument):
  `jax.vmap`, or with population_form 'map' a `jax.lax.map` of `fn` over the replicas; with
  one replica and the 'plain' forms (single_replica_form), `fn` on that replica alone, its
  results given the axis back (a train step with `parts` in the 'plain' form: its gradient on the
  replica alone, its update on the state with the axis). `sharded`: whether the replica axis
  lies on the mesh. A train step with `parts` (or `hparams_parts`) in the 'map' form: its
  gradients in the loop over the replicas, its update vmapped over the stored population state
  (`_map_gradients`)."""
  axes = tuple(in_axes) if isinstance(in_axes, (tuple, list)) else None
  if replicas != 1:
    if population_form(sharded) == "vmap":
      return jax.vmap(fn, in_axes=in_axes)
    parts = getattr(fn, "parts", None) or getattr(fn, "hparams_parts", None)  # make_train_step
    if parts is not None and population_form(sharded) == "map":
      return _map_gradients(*parts)

    def mapped(*args):
      mapped_args = tuple(a for i, a in enumerate(args) if axes is None or axes[i] is not None)

      def body(xs):
        it = iter(xs)
        return fn(*[next(it) if axes is None or axes[i] is not None else a
                    for i, a in enumerate(args)])

      return jax.lax.map(body, mapped_args)

    return mapped
  form = single_replica_form()
  if form == "vmap":
    return jax.vmap(fn, in_axes=in_axes)
  squeeze = lambda tree: jax.tree_util.tree_map(lambda x: x[0], tree)  # noqa: E731
  expand = lambda tree: jax.tree_util.tree_map(lambda x: jnp.expand_dims(x, 0), tree)  # noqa: E731
  parts = getattr(fn, "parts", None)  # a train step's (gradient, update): make_train_step
  if parts is not None and form == "plain":
    gradient, update = parts

    def one_step(state, batch):
      grads, loss, count, memory = gradient(squeeze(state), squeeze(batch))
      state, metrics = update(state, expand(grads), loss, count, expand(memory))
      return state, jax.tree_util.tree_map(lambda x: jnp.reshape(x, (1,)), metrics)

    return one_step

  def one(*args):
    return expand(fn(*[a if axes is not None and axes[i] is None else squeeze(a)
                       for i, a in enumerate(args)]))

  return one


def _map_gradients(gradient, update):
  """The 'map' form of a train step from its `parts`: the replicas' gradients (forward and
  backward) one after another in a `jax.lax.map`, then one clip + AdamW update, elementwise,
  vmapped over the population state as stored. A lax.map of the whole step would stack the new
  states into fresh buffers, a copy of the population's parameters and moments every step (demo
  preset, 8 replicas on XLA:CPU: 856 MiB; with the state carried through a loop and updated in
  place instead, XLA copied the moments twice per replica, 639 MiB, as the parameter update
  re-reads the old moments: see single_replica_form's 'plain_inner'). Population form
  'map_stacked' keeps the whole step in the loop, for that A/B."""

  def step(state, batch, *hparams):  # hparams: a step with per-replica values (hparams_parts)
    grads, loss, count, memory = jax.lax.map(lambda sb: gradient(*sb), (state, batch))
    return jax.vmap(update)(state, grads, loss, count, memory, *hparams)

  return step


def replica(tree, r: int):
  """Replica r of a stacked tree (a TrainState, params, memory...): the leading axis dropped."""
  return jax.tree_util.tree_map(lambda x: x[r], tree)


def eval_batch_size(config: ml_collections.ConfigDict) -> int:
  """train.eval_batch_size, where 0 means the training batch size."""
  return config.train.eval_batch_size or config.train.batch_size


def make_mesh(num_devices: int = 0) -> Mesh:
  """A 1-D data-parallel mesh over the first `num_devices` devices (0: all).

  In a multi-process run (jax.distributed) the mesh spans every process's devices, in process
  order, so each process holds a contiguous block of every sharded batch."""
  devices = jax.devices()
  if num_devices and distributed.active() and num_devices != len(devices):
    raise ConfigError(f"train.num_devices={num_devices}: a multi-process run uses all "
                      f"{len(devices)} devices of its {jax.process_count()} processes; set it "
                      "to 0.")
  if num_devices:
    if num_devices > len(devices):
      raise ConfigError(f"train.num_devices={num_devices} but only {len(devices)} local "
                        "devices; lower it (0 uses all).")
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
                    rng=jax.random.key_data(train_key), live=jnp.ones((), bool))


def _check_accum_divisible(batch_size: int, accum_steps: int, devices: int) -> None:
  """Refuses a batch whose rows per device do not split into train.grad_accum_steps micro-batches.

  Needed where the batch axis is sharded over `devices` (see make_train_step's micro-batch
  split); train.batch_size % train.grad_accum_steps itself is config.validate's check.
  """
  if accum_steps > 1 and (batch_size // devices) % accum_steps:
    raise ConfigError(
        f"train.batch_size={batch_size} over the {devices} devices of the mesh is "
        f"{batch_size // devices} rows per device, not a multiple of "
        f"train.grad_accum_steps={accum_steps}: choose a batch size that is a multiple of "
        f"{devices * accum_steps} (devices x grad_accum_steps), lower train.grad_accum_steps, "
        "or set train.num_devices.")


def _micro_batches(batch, accum_steps: int):
  """[B, ...] -> [K, B/K, ...], micro-batch i = rows i, i+K, i+2K, ... (strided, not blocks)."""

  def split(x):
    x = x.reshape((x.shape[0] // accum_steps, accum_steps) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)

  return jax.tree_util.tree_map(split, batch)


def _token_loss(model: InfinitoV52, params, memory, batch, rngs, loss_chunk: int = 0,
                loss_grad: str = "autodiff"):
  """(summed token loss, token count, new memory) of one training forward pass; with
  `loss_chunk` the output projection and cross-entropy run chunk by chunk; `loss_grad`: how
  the loss is differentiated (loss_gradient_form)."""
  variables = {"params": params, MEMORY: memory}
  if not loss_chunk:
    (logits, _), updates = model.apply(variables, batch["inputs"], train=True, rngs=rngs,
                                       mutable=[MEMORY])
    return (*token_cross_entropy(logits, batch["targets"], loss_grad), updates[MEMORY])
  (h, _), updates = model.apply(variables, batch["inputs"], train=True, rngs=rngs,
                                mutable=[MEMORY], return_hidden=True)
  out = params["output_projection"]
  total, count = chunked_token_cross_entropy(h, out["kernel"], out["bias"], batch["targets"],
                                             loss_chunk, model.config.dtype, loss_grad)
  return total, count, updates[MEMORY]


def make_train_step(model: InfinitoV52, tx, schedule, grad_accum_steps: int = 1,
                    rng_impl: str = "threefry", loss_chunk: int = 0, hparams_tx=None,
                    optimizer: str = "leaves", loss_grad: str = "autodiff",
                    freeze: bool = False):
  """train_step(state, batch[, hparams]) -> (state, metrics); pure, to be jitted with the state
  donated. With `hparams_tx` (replica_hparams_tx) the step takes the replica's optimisation
  values `hparams` (one row of replica_hparams_arrays) and builds its optimizer from them.

  With grad_accum_steps = K > 1 the batch [B, T] is split into K micro-batches of B/K rows,
  run one after the other (forward and backward) in a `jax.lax.scan`; their token-loss sums,
  token counts and gradients of the loss sums are added up and divided once by the total token
  count, so the loss and gradient are the token-weighted mean over the whole batch, what one
  full-batch step computes (to float rounding). Then one clip + AdamW update as with K = 1.
  K = 1 is the plain full-batch step, unchanged.

  The step (without `hparams_tx`) carries `parts`: (gradient(state, batch) -> (grads, loss,
  token count, memory), update(state, grads, loss, count, memory) -> (state, metrics)), its two
  halves, so that over_replicas can run the update outside the per-replica part; with
  `hparams_tx`, `hparams_parts`, whose update takes the replica's `hparams` last.

  - Micro-batch i takes rows i, i+K, i+2K, ... (the batch reshaped [B/K, K, T], K moved
    first). With B sharded over the devices in contiguous blocks, each device then keeps its
    own rows for every micro-batch (no resharding), provided (B / devices) % K == 0
    (`_check_accum_divisible`).
  - The memory state is carried through the micro-batches in order: micro-batch i reads and
    writes the memory micro-batch i-1 left, as K separate forward passes would. The memory after
    a K-step accumulation is therefore not the memory after one full-batch pass (K writes of
    means over B/K rows instead of one write of the mean over B), and with
    model.fuse_memory=True the logits (so loss and gradient) of micro-batches after the first
    differ from the full-batch ones too.
  - Keys: micro-batch i draws its dropout and exploration keys from
    split(fold_in(step_key, i)) where step_key = fold_in(state key, step); K = 1 uses
    split(step_key) as before.

  Args:
    model: the model.
    tx: the optimizer (clip + AdamW).
    schedule: the learning-rate schedule, reported in the metrics.
    grad_accum_steps: K, train.grad_accum_steps; must divide the batch size.
    rng_impl: the PRNG implementation of the state's key (train.rng_impl).
    loss_chunk: train.loss_chunk: positions per chunk of the output projection and
      cross-entropy (0: the whole sequence at once).
    optimizer: how the update is applied (optimizer_form: 'leaves', 'norm' or 'vectors').
    loss_grad: how the loss is differentiated (loss_gradient_form: 'fused' or 'autodiff').
    freeze: a replica whose loss or gradient norm is not finite stops training, keeping its
      state (train.on_divergence='freeze': see _update).
  """
  if loss_grad not in LOSS_GRADIENT_FORMS:
    raise ConfigError(f"make_train_step: loss_grad={loss_grad!r}; use one of "
                      f"{LOSS_GRADIENT_FORMS}.")
  if optimizer not in OPTIMIZER_FORMS[1:]:
    raise ConfigError(f"make_train_step: optimizer={optimizer!r}; use one of "
                      f"{OPTIMIZER_FORMS[1:]}.")
  if not isinstance(grad_accum_steps, int) or isinstance(grad_accum_steps, bool) \
      or grad_accum_steps < 1:
    raise ConfigError(f"train.grad_accum_steps={grad_accum_steps!r} must be an integer >= 1.")
  if grad_accum_steps > 1:
    return _make_accum_train_step(model, tx, schedule, grad_accum_steps, rng_impl,
                                  loss_chunk, optimizer, loss_grad, freeze)

  def gradient(state: TrainState, batch):
    key = jax.random.fold_in(wrap_key(state.rng, rng_impl), state.step)
    dropout_key, explore_key = jax.random.split(key)

    def loss_fn(params):
      total, count, memory = _token_loss(model, params, state.memory, batch,
                                         {"dropout": dropout_key, "explore": explore_key},
                                         loss_chunk, loss_grad)
      return total / jnp.maximum(count, 1.0), (memory, count)

    (loss, (memory, count)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return grads, loss, count, memory

  def update_from_hparams(state: TrainState, grads, loss, count, memory, hparams):
    step_tx, step_schedule = hparams_tx(state.params, hparams)
    return _update(state, grads, loss, count, memory, tx=step_tx, schedule=step_schedule,
                   optimizer=optimizer, freeze=freeze)

  def train_step(state: TrainState, batch, hparams=None):
    if hparams_tx:
      return update_from_hparams(state, *gradient(state, batch), hparams)
    return _update(state, *gradient(state, batch), tx=tx, schedule=schedule,
                   optimizer=optimizer, freeze=freeze)

  if hparams_tx is None:
    train_step.parts = (gradient, functools.partial(_update, tx=tx, schedule=schedule,
                                                      optimizer=optimizer, freeze=freeze))
  else:  # one replica's update, for the 'map' population form only (_map_gradients)
    train_step.hparams_parts = (gradient, update_from_hparams)
  return train_step


def replica_hparams_tx(model_cfg: ModelConfig):
  """(params, hparams) -> (optimizer, schedule) built from one replica's traced optimisation
  values: the same clip + masked AdamW and warmup + cosine as make_tx / make_schedule (within
  float rounding of optax's schedule functions), and the same optimizer-state structure."""

  def build(params, h):
    def schedule(step):
      step = jnp.asarray(step, jnp.float32)
      warm, decay = h["warmup_steps"], h["decay_steps"]
      peak, floor = h["learning_rate"], h["min_learning_rate"]
      t = jnp.clip(step - warm, 0.0, decay)
      cosine = floor + (peak - floor) * 0.5 * (1.0 + jnp.cos(jnp.pi * t / decay))
      return jnp.where(step < warm, peak * step / jnp.maximum(warm, 1.0), cosine)

    tx = make_optimizer(schedule, model_cfg, params, weight_decay=h["weight_decay"],
                        clip_norm=h["clip_norm"], b1=h["b1"], b2=h["b2"], eps=h["eps"])
    return tx, schedule

  return build


def _make_accum_train_step(model: InfinitoV52, tx, schedule, accum_steps: int,
                           rng_impl: str = "threefry", loss_chunk: int = 0,
                           optimizer: str = "leaves", loss_grad: str = "autodiff",
                           freeze: bool = False):
  """make_train_step's K > 1 step: see its docstring."""

  def gradient(state: TrainState, batch):
    rows = jax.tree_util.tree_leaves(batch)[0].shape[0]
    if rows % accum_steps:
      raise ConfigError(f"train.batch_size={rows} is not a multiple of "
                        f"train.grad_accum_steps={accum_steps}: choose a batch size that is.")
    step_key = jax.random.fold_in(wrap_key(state.rng, rng_impl), state.step)

    def micro_step(carry, xs):
      memory, grad_sum, total_sum, count_sum = carry
      i, micro = xs
      dropout_key, explore_key = jax.random.split(jax.random.fold_in(step_key, i))

      def sum_loss_fn(params):
        total, count, new_memory = _token_loss(
            model, params, memory, micro, {"dropout": dropout_key, "explore": explore_key},
            loss_chunk, loss_grad)
        return total, (new_memory, count)

      (total, (memory, count)), grads = jax.value_and_grad(sum_loss_fn, has_aux=True)(
          state.params)
      grad_sum = jax.tree_util.tree_map(jnp.add, grad_sum, grads)
      return (memory, grad_sum, total_sum + total, count_sum + count), None

    zero = jnp.zeros((), jnp.float32)
    init = (state.memory, jax.tree_util.tree_map(jnp.zeros_like, state.params), zero, zero)
    xs = (jnp.arange(accum_steps, dtype=jnp.int32), _micro_batches(batch, accum_steps))
    (memory, grad_sum, total, count), _ = jax.lax.scan(micro_step, init, xs)
    denom = jnp.maximum(count, 1.0)
    loss = total / denom
    grads = jax.tree_util.tree_map(lambda g: (g / denom).astype(g.dtype), grad_sum)
    return grads, loss, count, memory

  def train_step(state: TrainState, batch):
    return _update(state, *gradient(state, batch), tx=tx, schedule=schedule,
                   optimizer=optimizer, freeze=freeze)

  train_step.parts = (gradient, functools.partial(_update, tx=tx, schedule=schedule,
                                                  optimizer=optimizer, freeze=freeze))
  return train_step


def _update(state: TrainState, grads, loss, count, memory, *, tx, schedule,
            optimizer: str = "leaves", freeze: bool = False):
  """One clip + AdamW update from the step's gradient (optim.apply_step in the form
  `optimizer`); the new state and the step's metrics.

  `freeze` (train.on_divergence='freeze'): a replica whose loss or gradient norm is not
  finite, or that is frozen already, keeps its parameters, optimizer state and memory (the
  step's update is discarded: a select on a scalar known before the update, fused into it)
  and is frozen from then on (`live`, also in the metrics: the host learns of it at its next
  fetch). Its step counter advances with the others' (the population stays in lockstep)."""
  live = state.live
  if freeze:  # from the gradient norm the optimizer's clip takes, once computed
    def live_after(norm):
      return state.live & jnp.isfinite(loss) & jnp.isfinite(norm)

    # the optimizer keeps a frozen replica's moments in place (scale_by_adam_where)
    params, opt_state, grad_norm = apply_step(tx, optimizer, grads, state.opt_state,
                                              state.params, live=live_after)
    live = live_after(grad_norm)
  else:
    params, opt_state, grad_norm = apply_step(tx, optimizer, grads, state.opt_state,
                                              state.params)
  metrics = {"loss": loss, "grad_norm": grad_norm, "tokens": count,
             "learning_rate": schedule(state.step)}
  if freeze:
    keep = functools.partial(jax.tree_util.tree_map, lambda new, old: jnp.where(live, new, old))
    params, memory = keep(params, state.params), keep(memory, state.memory)
    # the optimizer's counters (scalars); its moments are kept by the optimizer itself
    opt_state = jax.tree_util.tree_map(lambda new, old: new if jnp.ndim(new) else
                                       jnp.where(live, new, old), opt_state, state.opt_state)
    metrics["live"] = live
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                       memory=memory, live=live), metrics


def make_eval_step(model: InfinitoV52):
  """eval_step(params, memory, batch) -> sums over the batch; reads the memory, never changes it."""

  def eval_step(params, memory, batch):
    (logits, metrics) = model.apply({"params": params, MEMORY: memory}, batch["inputs"],
                                    with_metrics=True)
    total, count = token_cross_entropy(logits, batch["targets"])
    real = jnp.any(batch["targets"] != 0, axis=1).astype(jnp.float32)  # padded rows: 0
    sums = {"loss": total, "tokens": count, "examples": jnp.sum(real),
            "memory_utilization": metrics["memory_utilization"] * jnp.sum(real)}
    for name, out in METRIC_NAMES.items():
      sums[out] = jnp.sum(metrics["per_example"][name] * real)
    return sums

  return eval_step


def finish_eval(per_batch: list[dict]) -> list[dict]:
  """Host side, once per split: one report per replica (see `_finish_one`)."""
  batches = jax.device_get(per_batch)
  n = len(np.atleast_1d(batches[0]["loss"]))
  return [_finish_one([{k: np.atleast_1d(v)[r] for k, v in b.items()} for b in batches])
          for r in range(n)]


def perplexity(loss: float) -> float:
  """exp(loss), kept finite: a diverged run's loss (above 700 nats) reads as exp(700)
  (stats.PERPLEXITY_CAP; lines of text say it is the cap)."""
  return math.exp(min(loss, 700.0))


def _finish_one(batches: list[dict]) -> dict:
  """Token-weighted loss and perplexity, example-weighted metrics, of one replica.

  `perplexity_batch_mean` is the original's figure, the mean over batches of exp(batch mean
  loss); it is reported only to compare with numbers the original printed.
  """
  s = {k: float(sum(b[k] for b in batches)) for k in batches[0]}
  tokens, examples = max(s["tokens"], 1.0), max(s["examples"], 1.0)
  loss = s["loss"] / tokens
  batch_ppl = [perplexity(float(b["loss"]) / float(b["tokens"]))
               for b in batches if b["tokens"] > 0]
  out = {"loss": loss, "perplexity": perplexity(loss), "tokens": int(s["tokens"]),
         "perplexity_batch_mean": float(np.mean(batch_ppl))}
  for name in list(METRIC_NAMES.values()) + ["memory_utilization"]:
    out[name] = s[name] / examples
  return out


def _check_divisible(name: str, size: int, mesh: Mesh) -> None:
  if size % mesh.size:
    divisors = [d for d in range(1, mesh.size + 1) if size % d == 0]
    raise ConfigError(f"train.{name}={size} must be divisible by the {mesh.size} devices of "
                      "the mesh (or train.replicas a multiple of it): set train.num_devices to "
                      f"one of {divisors} (a resumed run keeps its batch size), or, in a new "
                      f"run, change train.{name}.")


def device_memory_bytes(mesh: Mesh) -> tuple[int, str] | None:
  """The memory the mesh's devices offer (the sum of their limits), and what it is; on a CPU,
  the host's physical memory (its devices share it). None where neither is reported."""
  limits = []
  for d in mesh.devices.flat:
    try:
      stats = d.memory_stats() or {}
    except Exception:  # pylint: disable=broad-except  (backends without memory_stats)
      stats = {}
    limits.append(stats.get("bytes_limit"))
  if all(limits):
    return int(sum(limits)), f"the {mesh.size} device(s)' memory"
  try:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "this host's memory"
  except (ValueError, OSError, AttributeError):
    return None


def check_population_fits(replicas: int, state_bytes: int, mesh: Mesh) -> None:
  """Refuses a population whose training state alone exceeds the devices' memory (activations
  and gradients need more still), before anything is allocated or written."""
  available = device_memory_bytes(mesh)
  if available is None or replicas * state_bytes <= available[0]:
    return
  gib = 2.0 ** 30
  fits = available[0] // state_bytes // 2
  if fits < 1:
    raise ConfigError(
        f"the model's training state alone (parameters, optimizer state, memory) takes "
        f"{state_bytes / gib:.1f} GiB per replica, more than {available[1]} "
        f"({available[0] / gib:.1f} GiB) can hold with room for activations: make the model "
        "smaller (model.vocab_size, hidden_dim, num_layers, memory_slots) or use more devices.")
  raise ConfigError(
      f"train.replicas={replicas}: the training state alone (parameters, optimizer state, "
      f"memory) takes {state_bytes / 2**20:.2f} MiB per replica, "
      f"{replicas * state_bytes / gib:.1f} GiB in all, more than {available[1]} "
      f"({available[0] / gib:.1f} GiB). Use at most {fits} "
      "replicas (half of what the state alone would fill: activations and gradients need room "
      "too), or more devices.")


def shard_replicas(replicas: int, mesh: Mesh) -> bool:
  """Whether the replica axis goes on the mesh (several replicas, a multiple of the devices);
  otherwise the batch axis does and every device holds every replica."""
  return replicas > 1 and mesh.size > 1 and replicas % mesh.size == 0


class Scorer:
  """The jitted eval step of a population on a mesh: scores stacked (params, memory) [N, ...] on
  fixed-shape batches, the same batch for every replica; one report per replica.

  Needs no optimizer: evaluate.py builds one from a restored checkpoint alone.
  """

  def __init__(self, model: InfinitoV52, mesh: Mesh, batch_size: int, replicas: int = 1,
               sharding: str = "replicated", seq_len: int = 2):
    """`sharding`: 'replicated' (every device holds the parameters) or 'fsdp' (parameters
    sliced over the devices; applies where the batch, not the replicas, is on the mesh)."""
    self.model, self.mesh, self.batch_size, self.replicas = model, mesh, batch_size, replicas
    self.by_replica = shard_replicas(replicas, mesh)
    if not self.by_replica:
      _check_divisible("eval_batch_size", batch_size, mesh)
    self.replicated = NamedSharding(mesh, P())
    # the state: replicas over the devices, or every device holds all of them (or, with
    # fsdp, a slice of each large parameter)
    self.state_sharding = NamedSharding(mesh, P("data") if self.by_replica else P())
    self.fsdp = sharding == "fsdp" and not self.by_replica and mesh.size > 1
    self.param_sharding = self.state_sharding
    if self.fsdp:
      shapes = jax.eval_shape(jax.vmap(lambda k: init_variables(model, k, seq_len)),
                              jax.random.split(jax.random.key(0), replicas))
      self.param_sharding = fsdp_shardings(shapes["params"], mesh)
    self.batch_sharding = NamedSharding(mesh, P() if self.by_replica else P("data"))
    self.step = jax.jit(over_replicas(make_eval_step(model), replicas, in_axes=(0, 0, None),
                                      sharded=self.by_replica),
                        in_shardings=(self.param_sharding, self.state_sharding,
                                      self.batch_sharding),
                        out_shardings=self.replicated)

  def abstract_variables(self, seq_len: int) -> dict:
    """{'params', 'memory'} of the population as ShapeDtypeStructs [N, ...]: restore targets."""
    shapes = jax.eval_shape(
        jax.vmap(lambda k: init_variables(self.model, k, seq_len)),
        jax.random.split(jax.random.key(0), self.replicas))
    return {"params": _with_sharding(shapes["params"], self.param_sharding),
            MEMORY: _with_sharding(shapes[MEMORY], self.state_sharding)}

  def place(self, batch: dict) -> dict:
    """A whole batch {name: [B, T]} (the same on every process) placed on the mesh."""
    return distributed.place(lambda box: {k: v[box] for k, v in batch.items()},
                             {k: v.shape for k, v in batch.items()}, self.batch_sharding)

  def __call__(self, params, memory, batches) -> list[dict]:
    """Scores `batches`: a data_lib.Batches (each process builds only its rows of every
    batch) or an iterable of whole batches."""
    if isinstance(batches, data_lib.Batches):
      t = batches.windows.shape[1] - 1
      shapes = {"inputs": (batches.batch_size, t), "targets": (batches.batch_size, t)}
      placed = (distributed.place(lambda box, i=i: batches.batch(0, i, box[0]), shapes,
                                  self.batch_sharding) for i in range(len(batches)))
    else:
      placed = (self.place(b) for b in batches)
    return finish_eval([self.step(params, memory, b) for b in placed])


def _with_sharding(tree, sharding):
  """ShapeDtypeStructs of `tree` placed by `sharding` (one for all leaves, or a pytree of
  them: a prefix of `tree`)."""
  full = jax.tree_util.tree_map(lambda sh, sub: jax.tree_util.tree_map(lambda _: sh, sub),
                                sharding_prefix(sharding, tree), tree,
                                is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
  return jax.tree_util.tree_map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), tree, full)


def sharding_prefix(sharding, tree):
  """`sharding` as a pytree prefix of `tree` (a single sharding covers every leaf)."""
  if isinstance(sharding, jax.sharding.Sharding):
    return jax.tree_util.tree_map(lambda _: sharding, tree)
  return sharding


FSDP_MIN_SIZE = 2**12  # smaller arrays stay whole on every device: slicing them saves nothing


def fsdp_shardings(tree, mesh: Mesh):
  """Per-leaf shardings for `train.sharding=fsdp`: each leaf [N, ...] of at least
  FSDP_MIN_SIZE elements is split over the `data` axis along its largest dimension that the
  device count divides (never the replica axis); other leaves are replicated. XLA gathers a
  parameter where a step needs it whole and reduce-scatters its gradient."""
  n = mesh.size

  def one(leaf):
    shape = tuple(getattr(leaf, "shape", ()))
    if n == 1 or int(np.prod(shape)) < FSDP_MIN_SIZE:
      return NamedSharding(mesh, P())
    dims = [i for i in range(1, len(shape)) if shape[i] % n == 0]
    if not dims:
      return NamedSharding(mesh, P())
    d = max(dims, key=lambda i: shape[i])
    return NamedSharding(mesh, P(*([None] * d + ["data"])))

  return jax.tree_util.tree_map(one, tree)


def check_platform(config, model_cfg: ModelConfig | None = None) -> None:
  """Refuses settings this process's devices cannot train with (before anything is made): of
  the run config, or of `model_cfg` where given (the model the Trainer builds)."""
  impl = model_cfg.attention_impl if model_cfg else config.model.get("attention_impl", "auto")
  if impl == "pallas":
    pallas_kernel()  # a JAX without the kernel: refused, whatever the platform
  if impl in ("cudnn", "pallas") and jax.default_backend() != "gpu":
    raise ConfigError(f"model.attention_impl={impl} needs an NVIDIA GPU, and this process runs "
                      f"on {jax.default_backend()}: use 'auto' (cuDNN where it can run, XLA "
                      "elsewhere) or 'xla'.")


def _optimizer_and_state_bytes(config, model_cfg: ModelConfig, model: InfinitoV52, schedule):
  """The run's optimizer and the bytes of one replica's training state (shapes only)."""
  abstract_params = jax.eval_shape(
      lambda k: init_variables(model, k, config.data.seq_len)["params"], jax.random.key(0))
  tx = make_tx(config, model_cfg, abstract_params, schedule)
  one = jax.eval_shape(lambda k: create_state(model, tx, k, config.data.seq_len),
                       make_key(0, config.train.get("rng_impl", "threefry")))
  return tx, sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(one))


def check_fits(config: ml_collections.ConfigDict) -> None:
  """check_population_fits for a run config, without building its Trainer (shapes only): a
  caller that trains several runs checks them all before the first one trains."""
  model_cfg = model_config(config.model)
  model = InfinitoV52(model_cfg)
  _, state_bytes = _optimizer_and_state_bytes(config, model_cfg, model,
                                              make_schedule(config, 1))
  check_population_fits(config.train.replicas, state_bytes, make_mesh(config.train.num_devices))


class Trainer:
  """Owns the mesh, the jitted (vmapped) steps and the shardings of one run's population."""

  def __init__(self, config: ml_collections.ConfigDict, model_cfg: ModelConfig,
               steps_per_epoch: int, frozen: bool = False):
    """`frozen`: the run's record holds replicas frozen by a divergence (they stay frozen
    whatever train.on_divergence says now)."""
    self.config, self.model_cfg = config, model_cfg
    check_platform(config, model_cfg)
    self.model = InfinitoV52(model_cfg)
    self.mesh = make_mesh(config.train.num_devices)
    replicas = config.train.replicas  # nothing of that length is made before it is known to fit
    accum_steps = config.train.get("grad_accum_steps", 1)
    if not shard_replicas(replicas, self.mesh):  # the training batch, named first
      _check_divisible("batch_size", config.train.batch_size, self.mesh)
      _check_accum_divisible(config.train.batch_size, accum_steps, self.mesh.size)
    self.scorer = Scorer(self.model, self.mesh, eval_batch_size(config), replicas,
                         sharding=config.train.get("sharding", "replicated"),
                         seq_len=config.data.seq_len)
    self.replicated = self.scorer.replicated
    self.state_sharding = self.scorer.state_sharding  # one for every leaf, or per leaf (fsdp)
    # [N, B, T]: replicas over the devices, or each replica's batch split over them
    self.batch_sharding = NamedSharding(
        self.mesh, P("data") if self.scorer.by_replica else P(None, "data"))
    self.schedule = make_schedule(config, steps_per_epoch)
    self.tx, state_bytes = _optimizer_and_state_bytes(config, model_cfg, self.model,
                                                      self.schedule)
    check_population_fits(replicas, state_bytes, self.mesh)
    self.seeds = replica_seeds(config)
    if self.scorer.fsdp:  # parameters and optimizer state sliced; memory and keys whole
      shapes = jax.eval_shape(
          jax.vmap(lambda k: create_state(self.model, self.tx, k, config.data.seq_len)),
          self.keys())
      rep = self.replicated
      self.state_sharding = TrainState(
          step=rep, params=self.scorer.param_sharding,
          opt_state=fsdp_shardings(shapes.opt_state, self.mesh),
          memory=jax.tree_util.tree_map(lambda _: rep, shapes.memory), rng=rep, live=rep)
    # per-replica optimisation values (train.replica_hparams): constants of the compiled step
    self.hparams = replica_hparams_arrays(config, steps_per_epoch)
    self.loss_grad = loss_gradient_form()  # how the loss is differentiated (the platform's)
    # a replica that diverges stops alone (one replica: the run stops, as with 'stop'); the
    # step keeps replicas frozen by a divergence where the record has some, in either mode
    self.freeze = replicas > 1 and (
        config.train.get("on_divergence", "stop") == "freeze" or frozen)
    step = over_replicas(make_train_step(
        self.model, self.tx, self.schedule, accum_steps, config.train.get("rng_impl", "threefry"),
        config.train.get("loss_chunk", 0),
        replica_hparams_tx(model_cfg) if self.hparams is not None else None,
        optimizer_form(self.scorer.fsdp), self.loss_grad, self.freeze), len(self.seeds),
        sharded=self.scorer.by_replica)
    if self.hparams is not None:
      hparams, vmapped = self.hparams, step
      step = lambda state, batch: vmapped(state, batch, hparams)  # noqa: E731
    self.train_step = jax.jit(step, in_shardings=(self.state_sharding, self.batch_sharding),
                              out_shardings=(self.state_sharding, self.replicated),
                              donate_argnums=0)
    self._create = jax.jit(
        jax.vmap(lambda k: create_state(self.model, self.tx, k, config.data.seq_len)),
        out_shardings=self.state_sharding)
    self._finite = jax.jit(_replicas_finite, out_shardings=self.replicated)

  @property
  def eval_step(self):
    return self.scorer.step

  @property
  def eval_batch_size(self) -> int:
    return self.scorer.batch_size

  @property
  def replicas(self) -> int:
    return len(self.seeds)

  def keys(self) -> jax.Array:
    """key(seed_r) for each replica: the key a single run of that seed starts from."""
    return jnp.stack([make_key(s, self.config.train.get("rng_impl", "threefry"))
                      for s in self.seeds])

  def new_state(self) -> TrainState:
    """The population's fresh state [N, ...]: replica r is create_state(key(seed_r))."""
    return self._create(self.keys())

  def live_array(self, live) -> jax.Array:
    """[N] bools `live` (TrainState.live, from the run's record) placed as the state is."""
    sharding = (self.state_sharding.live if isinstance(self.state_sharding, TrainState)
                else self.state_sharding)
    mask = np.asarray(live, bool)
    return distributed.place(lambda box: {"live": mask[box[:1]]}, {"live": mask.shape},
                             sharding)["live"]

  def abstract_state(self) -> TrainState:
    shapes = jax.eval_shape(
        jax.vmap(lambda k: create_state(self.model, self.tx, k, self.config.data.seq_len)),
        self.keys())
    return _with_sharding(shapes, self.state_sharding)

  def train_batches(self, data: data_lib.LMData) -> data_lib.PopulationBatches:
    """The population's training batches: replica r's order is that of seed_r's single run."""
    ids = data.ids.get("train") if self.config.data.get("random_offsets", False) else None
    return data_lib.PopulationBatches(data.windows["train"], self.config.train.batch_size,
                                      self.seeds, ids)

  def put(self, batch):
    """Places a whole population batch [N, B, T] (the same on every process) on the mesh."""
    return distributed.place(lambda box: {k: np.asarray(v)[box] for k, v in batch.items()},
                             {k: np.shape(v) for k, v in batch.items()}, self.batch_sharding)

  def train_batch(self, batches: data_lib.PopulationBatches, epoch: int, index: int):
    """Training batch (epoch, index) on the mesh; each process builds only the replicas and
    rows its devices hold (all of it in a one-process run)."""
    shape = (self.replicas, batches.batch_size, batches.windows.shape[1] - 1)
    return distributed.place(lambda box: batches.batch(epoch, index, box[0], box[1]),
                             {"inputs": shape, "targets": shape}, self.batch_sharding)

  def evaluate(self, state: TrainState, batches: data_lib.Batches) -> list[dict]:
    """One report per replica."""
    return self.scorer(state.params, state.memory, batches)

  def non_finite(self, state: TrainState) -> np.ndarray:
    """The replicas whose parameters or memory hold a NaN or infinity (one reduction on the
    device, one small fetch: for saves and validations, not every step)."""
    return np.flatnonzero(~np.asarray(jax.device_get(self._finite(state.params, state.memory))))


def _replicas_finite(*trees) -> jax.Array:
  """[N] bools: replica n's floating-point leaves are all finite."""
  leaves = [x for x in jax.tree_util.tree_leaves(trees) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.stack([jnp.isfinite(x).all(axis=tuple(range(1, x.ndim))) for x in leaves]).all(0)


def state_items(state: TrainState) -> dict:
  """The checkpoint's array items of a TrainState (evaluation reads params and memory only)."""
  return {"params": state.params, "memory": state.memory,
          "optimizer": {"opt_state": state.opt_state, "step": state.step, "rng": state.rng}}


def state_from_items(items: dict, live=None) -> TrainState:
  """The TrainState of a checkpoint's array items; `live`: [N] bools, which replicas train
  (from the run's record: see TrainState.live; None: all of them)."""
  o = items["optimizer"]
  if live is None:
    live = jnp.ones(np.shape(o["step"]), bool)
  return TrainState(step=o["step"], params=items["params"], opt_state=o["opt_state"],
                    memory=items["memory"], rng=o["rng"], live=live)


class History:
  """history.jsonl: one JSON record per line, appended as the run goes; its list is saved in
  every checkpoint, and a resumed run rewrites the file from the checkpoint's (the truth)."""

  def __init__(self, path: str, entries: list[dict], sync: bool = True):
    """`sync`: make the file hold `entries` now; otherwise at `sync()` or the first append (a
    run writes nothing until it trains)."""
    self.path, self.entries = path, list(entries)
    self.write = distributed.is_primary()  # every process keeps the list; process 0 the file
    self.guard = None  # called before each write (Run.check_workdir: the workdir is still ours)
    self._synced = False
    if sync:
      self.sync()

  def _text(self) -> str:
    return "".join(json.dumps(r) + "\n" for r in self.entries)

  def _rewrite(self) -> None:
    self._synced = True
    if not self.write:
      return
    text = self._text()

    def write(tmp):
      with open(tmp, "w") as f:
        f.write(text)

    if self.guard:
      self.guard("wrote history.jsonl")
    with _disk_full_is_an_error(self.path):
      lifecycle.write_atomically([(self.path, write)])

  def sync(self) -> bool:
    """Rewrites the file where it does not hold the entries (a resumed run's are its
    checkpoint's: the truth). Returns whether it was rewritten."""
    self._synced = True
    if not self.write:
      return False
    try:
      with open(self.path) as f:
        if f.read() == self._text():
          return False
    except (OSError, ValueError):  # missing, a folder, not UTF-8: rewritten
      pass
    self._rewrite()
    return True

  def append(self, kind: str, **values) -> dict:
    if not self._synced:
      self.sync()
    rec = {"kind": kind, **values}
    self.entries.append(rec)
    if self.write:
      if self.guard:
        self.guard("wrote history.jsonl")
      with _disk_full_is_an_error(self.path), open(self.path, "a") as f:
        f.write(json.dumps(rec) + "\n")
    return rec

  def drop_partial(self, step: int) -> None:
    """Removes the partial train record of `step` (the last), whose window the resumed run
    logs whole, and rewrites the file."""
    if self.entries and self.entries[-1].get("partial") and self.entries[-1]["step"] == step:
      self.entries.pop()
      self._rewrite()

  def of(self, kind: str) -> list[dict]:
    return [r for r in self.entries if r["kind"] == kind]


@contextlib.contextmanager
def _disk_full_is_an_error(path: str):
  try:
    yield
  except OSError as e:
    folder = os.path.dirname(os.path.abspath(path))
    if isinstance(e, FileNotFoundError) and not os.path.isdir(folder):
      raise WorkdirLostError(f"the workdir {folder} was removed while this run used it: {path} "
                             "cannot be written. Restore it from a copy, or start again."
                             ) from None
    if is_unwritable(e):
      raise WorkdirError(f"cannot write {path} any more ({e.strerror}): its disk or folder "
                         "became read-only or unwritable while this run used it. The "
                         "checkpoints saved before are intact; make it writable and run the "
                         "same command again to resume.") from None
    if not is_disk_full(e):
      raise
    raise DiskFullError(f"no space left on the device to write {path}: free space and run "
                        "the same command again; the checkpoints saved before are intact.") from None


def group_statistics(config: ml_collections.ConfigDict, values: list, name: str,
                     replicas: list[int] | None = None,
                     labels: list[dict] | None = None) -> list[dict]:
  """Per group of train.replica_hparams: its values (`hparams`), its replicas, and the
  population statistics (stats.population, as `name`) of `values` (one per replica of
  `replicas`, default all; None: a replica left out, frozen or unscored). `labels`: the values
  each of those replicas was trained with (default: the config's); a group is labelled with
  those of the replicas it counts, or None and `hparams_of_replicas` where they differ (a
  resume changed them between their steps)."""
  from infinito_jax import stats  # pylint: disable=g-import-not-at-top
  which = list(range(config.train.replicas)) if replicas is None else replicas
  index = replica_group_index(config)
  if labels is None:
    labels = [replica_groups(config)[r] for r in which]
  out = []
  for g in sorted({index[r] for r in which}):
    mine = [i for i, r in enumerate(which) if index[r] == g]
    kept = [values[i] for i in mine if values[i] is not None]
    seen = [labels[i] for i in mine if values[i] is not None] or [labels[mine[0]]]
    same = all(v == seen[0] for v in seen)
    out.append({"hparams": seen[0] if same else None,
                **({} if same else {"hparams_of_replicas": [labels[i] for i in mine]}),
                "of_replicas": [which[i] for i in mine],
                **(stats.population(kept, name) if kept else {"replicas": 0})})
  return out


GROUP_FIX = ("Lower its group's learning_rate, clip_norm or weight_decay in "
             "train.replica_hparams, or add or lengthen its warmup_steps there")
GROUPS_FIX = ("Lower those groups' learning_rate, clip_norm or weight_decay in "
              "train.replica_hparams, or add or lengthen their warmup_steps there")


def diverged_error(what: str, value: float | None, step: int, bad, replicas: int,
                   groups: list[dict] | None, saved: int | None = None) -> NonFiniteLossError:
  """The error that ends a run whose training diverged: `what` (of replicas `bad`) became
  `value` (None: non-finite values) at `step`, `saved` the run's last saved step (None: none
  yet); it carries `replicas` and `step`."""
  r = int(bad[0])
  which = f" of replica {r}" if replicas > 1 else ""
  fix = ("Lower train.learning_rate, train.clip_norm or train.weight_decay, or add or lengthen "
         "train.warmup_steps")
  if groups:
    which += f" (train.replica_hparams values {groups[r]})"
    fix = GROUP_FIX
  became = f"became {value}" if value is not None else "became non-finite"
  if saved:
    then = (f"Training stopped; step {saved}, the last saved, is kept. {fix}, and train in a "
            "new --workdir, or resume from it: run the same command again with the new values "
            "and --config.train.allow_changes=true (if that diverges again at once, step "
            f"{saved}'s weights were already on their way out: train anew with --fresh).")
  else:
    then = (f"Training stopped before its first checkpoint: nothing was saved. {fix}, and "
            "train again with --fresh (or in a new --workdir).")
  e = NonFiniteLossError(f"{what}{which} {became} at step {step}. {then}")
  e.replicas, e.step = [int(b) for b in bad], int(step)
  return e


class TrainMetrics:
  """Metrics of dispatched steps, fetched from the device every log_every steps (one sync).

  tokens_per_s is training throughput: the tokens of the steps timed over the time from the
  clock's (re)start to the fetch. The loop restarts the clock after the step that compiled
  and after each validation and save, so neither counts; a window with no timed step has none.

  A run stopped inside a window (a signal, train.stop_after_steps) logs it as `partial` and
  saves its losses (`window`) with the checkpoint; resumed, the run drops that record and
  logs the whole window where an uninterrupted run does, with the same mean loss (resumed
  with another train.log_every, it keeps the partial record and starts new windows).
  """

  def __init__(self, groups: list[dict] | None = None, window: list[dict] | None = None,
               diverged: list[int | None] | None = None, stop: bool = False,
               ends: list[int] | None = None):
    self.pending: list[tuple[int, dict]] = []
    # the saved part of the current window, from a run stopped inside it: host values (None:
    # a replica frozen at that step)
    self.carried = [(w["step"], {"loss": np.asarray([np.nan if x is None else x
                                                      for x in w["loss"]], np.float32)})
                    for w in window or []]
    # train.on_divergence='freeze' (None otherwise): the step at which each replica diverged
    # (None: it trains), as of the last fetch; the divergences that fetch found are also
    # queued in `frozen` for the loop to record
    self.diverged = None if diverged is None else list(diverged)
    self.frozen: list[dict] = []
    self.stop = stop  # train.on_divergence='stop': a new divergence ends the run
    # each replica's group (train_and_evaluate's end_when_groups_diverge; None: not asked): the
    # run ends once every group has a diverged replica
    self.ends = ends
    self.clock = time.time()
    self.untimed = 0  # pending steps before the clock's last restart
    self.groups = groups  # each replica's values, where train.replica_hparams sets them
    self.saved: int | None = None  # the run's last saved step (the loop's), for the errors

  def add(self, step: int, metrics: dict) -> None:
    self.pending.append((step, metrics))

  def restart_clock(self, after=None) -> None:
    """The next rate counts only steps dispatched from now, once `after` (device values of the
    last step, if given) is ready: the time up to here (compiling, validating, saving) is not
    training's."""
    if after is not None:
      jax.block_until_ready(after)
    self.clock, self.untimed = time.time(), len(self.pending)

  def window(self) -> list[dict]:
    """The steps of a partial record, to be saved with the checkpoint (JSON)."""
    return [{"step": int(s), "loss": [float(x) if np.isfinite(x) else None
                                      for x in np.ravel(m["loss"])]}
            for s, m in self.carried]

  def fetch(self, partial: bool = False) -> dict | None:
    """The mean loss and last values since the last full fetch; stops on a non-finite loss.
    `partial`: the run stops inside its logging window (the record says so), which goes on
    (from window()) if the run is resumed."""
    if not self.pending:
      return None
    fetched = jax.device_get(self.pending)
    self.pending = []
    for step, m in fetched:
      if self.diverged is not None:  # a divergence freezes its replica; all of them: the end
        self._freeze(int(step) + 1, m)
        continue
      # the gradient norm as well: a step whose loss was finite can still make the weights
      # non-finite through it (the next step's loss would say so one step late)
      for what, name in (("loss", "training loss"), ("grad_norm", "gradient norm")):
        bad = np.flatnonzero(~np.isfinite(np.ravel(m[what])))
        if bad.size:
          raise diverged_error(f"the {name}", float(np.ravel(m[what])[bad[0]]), int(step) + 1,
                               bad, np.size(m["loss"]), self.groups, self.saved)
    now, last = time.time(), fetched[-1][1]
    dt, self.clock = now - self.clock, now
    timed, self.untimed = fetched[self.untimed:], 0

    def trained(m, key="loss"):  # a frozen replica's values (its update discarded): NaN
      x = np.asarray(m[key], np.float32)
      return np.where(m["live"], x, np.nan) if "live" in m else x

    whole = self.carried + [(s, {"loss": trained(m)}) for s, m in fetched]
    self.carried = whole if partial else []
    with warnings.catch_warnings():  # a replica frozen for the whole window: NaN, said as None
      warnings.simplefilter("ignore", RuntimeWarning)
      per_replica = np.nanmean([m["loss"] for _, m in whole], axis=0)  # [N]
    live = np.isfinite(per_replica)
    # the population's mean: over the replicas training at the window's end (one that froze in
    # it is left out, as after: its losses before it diverged are often already exploding)
    counted = live & np.array([d is None for d in self.diverged]) if self.diverged is not None \
        and any(d is None for d in self.diverged) else live
    out = {"step": fetched[-1][0] + 1, "loss": float(np.mean(per_replica[counted])),
           "steps_averaged": len(whole),  # log_every, or fewer where a save ended the window
           # a replica's that trains (a frozen one's schedule goes on, unused)
           "learning_rate": float(np.ravel(last["learning_rate"])[
               int(np.argmax(last["live"])) if "live" in last else 0]),
           "grad_norm": float(np.nanmean(trained(last, "grad_norm")))}
    if timed:  # the tokens trained on (a frozen replica's are not)
      out["tokens_per_s"] = sum(float(np.sum(m["tokens"] * m.get("live", 1))) for _, m in timed
                                ) / max(dt, 1e-9)
    if per_replica.size > 1:  # the mean above is over replicas; each one's here
      out["replica_losses"] = [float(x) if ok else None for x, ok in zip(per_replica, live)]
      rates = np.asarray(last["learning_rate"], float)
      if np.any(rates != rates[0]):  # train.replica_hparams: each replica's rate
        out["replica_learning_rates"] = [float(x) for x in rates]
    if partial:
      out["partial"] = True
    return out

  def _freeze(self, step: int, m: dict) -> None:
    """Step `step`'s metrics `m` in a population whose step freezes replicas (Trainer.freeze):
    the replicas whose loss or gradient norm it found not finite were frozen by the step
    (TrainState.live); each is queued in `frozen`. Raises the divergence error with
    train.on_divergence='stop', once every replica is frozen, or, where `ends` gives each
    replica's group, once every group has a frozen replica (its `replicas`: those frozen, and
    `replica_steps`: the step at which each replica froze, None for those still training)."""
    now = np.ravel(np.asarray(m["live"], bool))
    found = []
    for r in np.flatnonzero(~now):
      if self.diverged[r] is not None:
        continue
      loss, norm = float(np.ravel(m["loss"])[r]), float(np.ravel(m["grad_norm"])[r])
      what, value = (("training loss", loss) if not np.isfinite(loss)
                     else ("gradient norm", norm))
      found.append({"replica": int(r), "step": step, "what": what, "value": value})
    if not found:
      return
    bad = [f["replica"] for f in found]
    e = diverged_error(f"the {found[0]['what']}", found[0]["value"], step, bad, now.size,
                       self.groups, self.saved)
    if self.stop:  # the step kept the replica's state: nothing non-finite even in memory
      raise e
    for f in found:
      self.diverged[f["replica"]] = step
    self.frozen += found
    gone = [r for r, s in enumerate(self.diverged) if s is not None]
    groups_done = self.ends is not None and {self.ends[r] for r in gone} == set(self.ends)
    if now.any() and not groups_done:
      return
    earlier = sorted((s, r) for r, s in enumerate(self.diverged) if s is not None and s < step)
    first = e.args[0][0].upper() + e.args[0][1:]
    if self.groups and len({str(self.groups[r]) for r in gone}) > 1:  # the fix: all of them
      first = first.replace(GROUP_FIX, GROUPS_FIX)
    e.replica_steps = list(self.diverged)
    if now.any():  # every group has a diverged replica: the caller asked to end there
      e.args = ("every group of the population has a diverged replica ("
                + ", ".join(f"replica {r} at step {s}" for s, r in sorted(
                    (s, r) for r, s in enumerate(self.diverged) if s is not None))
                + "): the run ends, as its caller asked (end_when_groups_diverge). " + first,)
      e.replicas = gone
      raise e
    if earlier:
      saved_frozen = [r for s, r in earlier if self.saved and s <= self.saved]
      e.args = ("every replica of the population has diverged: "
                + ", ".join(f"replica {r} at step {s}" for s, r in earlier)
                + " (frozen, as train.on_divergence='freeze' asks), then the others. " + first
                + (f" Resumed, the run keeps replica{'s' * (len(saved_frozen) > 1)} "
                   f"{', '.join(map(str, saved_frozen))} frozen (diverged by step "
                   f"{self.saved}); --fresh trains every replica anew." if saved_frozen else ""),)
    else:
      e.args = (f"every replica of the population diverged at step {step}. {first}",)
    e.replicas = list(range(now.size))
    raise e


def _check_same_files(meta: dict, config, where: str) -> None:
  """Refuses a resume on data files whose content changed under the same path."""
  saved, now = meta.get("data_sha256") or {}, data_lib.fingerprints(config.data)
  changed = [s for s in saved if s in now and saved[s] != now[s]]
  if changed:
    raise ConfigError(
        f"the run in {where} was trained on other text: "
        + "; ".join(f"data.files.{s} ({config.data.files[s]}) changed since (sha256 "
                    f"{saved[s][:12]}... -> {now[s][:12]}...)" for s in changed)
        + ". Restore the file, start over with --fresh, or choose a new --workdir.")


def check_unsaved_record(workdir: str, config) -> bool:
  """A workdir with no checkpoint may still hold the record of a start that saved none
  (config.json, history.jsonl): a new run replaces it where the settings are the run's (its
  steps are trained again, bitwise the same), and is refused where they differ, as a resume
  would be (that record described another run). Returns whether there is such a record.

  Raises:
    ConfigError: a record made with other settings, or one whose config.json cannot vouch for
      them (missing, unreadable, lacking fields).
  """
  path, hist = (os.path.join(workdir, f) for f in ("config.json", "history.jsonl"))
  try:
    with open(path) as f:
      saved = json.load(f)
    if not isinstance(saved, dict):
      raise ValueError("not a JSON object")
  except FileNotFoundError:
    saved = None
  except (OSError, ValueError) as e:
    saved = e
  has_history = os.path.isfile(hist) and os.path.getsize(hist) > 0
  if saved is None and not has_history:
    return False
  why = ("" if isinstance(saved, dict) else
         f"; its config.json cannot be read ({errors_short(saved)})" if saved is not None
         else "; it has no config.json to compare with")
  changes = []
  if isinstance(saved, dict):
    lacking = sorted(set(config_lib.flatten(config.to_dict()))
                     - set(config_lib.flatten(saved)) - set(config_lib.NEWER_FIELDS))
    if lacking:
      why = (f"; its config.json lacks {len(lacking)} field(s) ({', '.join(lacking[:3])}"
             f"{', ...' if len(lacking) > 3 else ''}) to compare with")
    changes = [c for c in config_lib.diff(saved, config) if c.kind != "free"]
  if changes or why:
    raise ConfigError(
        f"{workdir} holds the record of a run (config.json, history.jsonl) but no "
        f"checkpoint{why}"
        + (f", made with other settings: {'; '.join(map(str, changes))}" if changes else "")
        + ". Start over with --fresh (that record is moved aside), choose a new --workdir, "
        "or delete config.json and history.jsonl there.")
  return True


class Run:
  """A run opened in its workdir: data, trainer, state, record and history, new or resumed."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, *,
               tokenizer: WordTokenizer | None = None, announce: bool = True,
               before_writing=lambda: None):
    """Restores the newest intact step of `workdir`, or prepares a new run (data, model, state).
    `before_writing` is called once that is done, before the first file is written (a new
    run's checkpoints folder, history.jsonl): train_and_evaluate's stop check."""
    self.config, self.workdir = config, os.path.abspath(workdir)
    self.model_cfg = model_config(config.model)
    self.trainer, self.checkpointer, self._changes, resumed = None, None, [], None
    self.window: list[dict] = []  # a logging window the resumed step stopped inside
    self.resumed_step: int | None = None
    self.resumed_config: dict | None = None  # the config the resumed step was trained with
    # best checkpoints the resumed step's record names and the workdir lacks: (replica, why,
    # damage); `commit` replaces them (a run that trains nothing leaves its record as it is)
    self._lost_best: list[tuple[int, str, bool]] = []
    has_run = os.path.isdir(ckpt_lib.checkpoint_dir(workdir))
    distributed.barrier("infinito:looked_for_a_run")  # every process decides before any writes
    if has_run:
      self.checkpointer = ckpt_lib.Checkpointer(workdir)
      removed = self.checkpointer.remove_tmp()
      if removed:
        print(f"Removed {len(removed)} unfinished save(s) of a stopped process: {removed}")
      resumed = self._resume() if self.checkpointer.steps() else None
    if resumed is None:
      self._check_unsaved_record()
      # bad data: nothing made on disk
      self.data = data_lib.prepare(config, self.model_cfg, tokenizer)
      self._make_trainer()
      self.state, entries = self.trainer.new_state(), []
      self.record = RunRecord.new(self.trainer.seeds)
      before_writing()
      if self.checkpointer is None:
        self.checkpointer = ckpt_lib.Checkpointer(workdir)
      if announce:
        print(f"Starting a new run in {self.workdir}")
    else:
      self.state, self.record, entries = resumed
      before_writing()
    # written when the run trains (`commit`), or by its first record (an import)
    self.history = History(os.path.join(self.workdir, "history.jsonl"), entries, sync=False)
    self.history.guard = self.check_workdir
    self.writers: writers_lib.Writers | None = None  # opened by the loop, not by an import
    self.meta = {"format": ckpt_lib.FORMAT, "config": config.to_dict(),
                 "tokenizer": self.data.tokenizer.to_json(), "data_info": self.data.info,
                 "data_sha256": data_lib.fingerprints(config.data)}
    self.keep_best = config.checkpoint.keep_best
    self._since = time.time()  # the record's wall time counts from here

  def close_writers(self, failing: bool = False) -> None:
    """Closes TensorBoard / W&B. A full disk while flushing them is one DiskFullError, or
    nothing where the run is already failing (its own error is the one to report)."""
    if self.writers is None:
      return
    writers, self.writers = self.writers, None
    try:
      writers.close(failing)
    except OSError as e:
      if not is_disk_full(e):
        raise
      if not failing:
        raise DiskFullError(f"no space left on the device to write the TensorBoard files in "
                            f"{self.workdir}: free space; the checkpoints saved before are "
                            "intact.") from None

  def log(self, kind: str, **values) -> dict:
    """Appends a record to history.jsonl (the truth) and mirrors it to the metric writers."""
    rec = self.history.append(kind, **values)
    if self.writers is not None:
      self.writers.write(rec)
    return rec

  def freeze_replica(self, replica: int, step: int, what: str, value: float,
                     training: int) -> None:
    """Records that replica `replica` diverged at `step` (its `what` became `value`) and was
    frozen there (train.on_divergence='freeze'): in the record (its checkpoints and summary),
    in history.jsonl, and in a warning line that says how many replicas (`training`) train on."""
    rep, n = self.record.replicas[replica], len(self.record.replicas)
    value = str(value)  # 'nan' or 'inf': JSON has no such numbers
    rep.diverged = {"step": step, "what": what, "value": value}
    groups = replica_groups(self.config) if self.trainer.hparams is not None else None
    self.log("diverged", step=step, epoch=step / self.steps_per_epoch, replica=replica,
             seed=rep.seed, what=what, value=value,
             **({"hparams": groups[replica]} if groups else {}))
    values = f", train.replica_hparams values {groups[replica]}" if groups else ""
    tqdm_auto.tqdm.write(
        f"warning: replica {replica} (seed {rep.seed}{values}) diverged at step {step}: its "
        f"{what} became {value}. It is frozen with its weights from before that step "
        f"(train.on_divergence='freeze')" + (f"; {training} of {n} replicas train on."
                                             if training else "."))

  def samples(self, step: int) -> list[dict]:
    """Each replica's continuation of train.sample_prompt from key(seed): the same key at
    every validation, so the text changes only as the model does (none for a frozen one)."""
    c, tok = self.config.train, self.data.tokenizer
    ids = tok.encode_prompt(c.sample_prompt)
    sample = sampling.sampler(self.model_cfg, len(ids) + c.sample_tokens, len(tok), 1.0, 0)
    buf = np.zeros(len(ids) + c.sample_tokens, np.int32)
    buf[:len(ids)] = ids
    recs = []
    for r, seed in enumerate(self.trainer.seeds):  # replica r: its own seed's key
      if self.record.replicas[r].diverged:  # frozen: its model changes no more
        continue
      one = jax.tree_util.tree_map(lambda x: x[r:r + 1],
                                   {"params": self.state.params, MEMORY: self.state.memory})
      out = np.asarray(sample(one, buf, len(ids), jax.random.key(seed)[None]))
      recs.append(self.log("sample", step=step, replica=r, seed=seed, prompt=c.sample_prompt,
                           prompt_as_seen=tok.decode(ids),  # <unk> for what it lacks
                           text=tok.decode(out[0, 0, len(ids):])))
    return recs

  def _check_unsaved_record(self) -> None:
    """See check_unsaved_record; says when the record is replaced."""
    if check_unsaved_record(self.workdir, self.config) and distributed.is_primary():
      print(f"The run in {self.workdir} has no checkpoint (none was saved, or they were "
            "removed): it starts again with the same settings (its history.jsonl is replaced).")

  def commit(self) -> None:
    """The run goes on to train: what its start only planned is written now, so that a stop
    or an error before this changed none of the run's files. A lost best checkpoint is
    replaced, a partial window the run logs again is dropped, and history.jsonl, config.json
    and summary.json ('running') are written."""
    if self.resumed_step is not None:
      for r, why, damage in self._lost_best:
        self._replace_best(self.record, r, self.resumed_step, self.history.entries, why, damage)
      self._lost_best = []
      # (the checkpoints these settings do not keep, an old best with keep_best=false among
      # them, are deleted by the first save, once it is on disk: not before)
      if self.window:  # it trains on: the window stopped inside goes on
        self.history.drop_partial(self.resumed_step)
    self.history.sync()
    self.record_changes()
    self.summary("running")  # from the start of training: a second signal marks it 'aborted'

  def repair_config(self) -> bool:
    """config.json as the resumed step's config where it says otherwise (a resume that ended
    before its first save, by a second signal or kill -9, had written its own). Returns
    whether it was rewritten."""
    path = os.path.join(self.workdir, "config.json")
    try:
      with open(path) as f:
        if json.load(f) == self.resumed_config:
          return False
    except (OSError, ValueError):
      pass
    ckpt_lib.dump_json(path, self.resumed_config)
    return True

  def unapplied_notes(self) -> None:
    """What a resumed run that trains nothing says of a lost best checkpoint: its record (the
    checkpoint's) still names it."""
    for r, why, damage in self._lost_best:
      if damage:
        rep = self.record.replicas[r]
        who = f" of replica {r}" if len(self.record.replicas) > 1 else ""
        print(f"warning: the best checkpoint{who} (step {rep.best_step}) {why}; nothing was "
              "trained, so the run's record still names it (evaluate.py --step "
              f"{self.resumed_step} scores the newest step).")

  def write_config(self) -> None:
    """config.json: the config this run trains with from now on. Written when training (or an
    import) goes ahead, not by a call that trains nothing: the file keeps telling the truth."""
    if distributed.is_primary():
      ckpt_lib.dump_json(os.path.join(self.workdir, "config.json"), self.config.to_dict())

  def record_changes(self) -> None:
    """Says the accepted config changes and writes them into the history (saved with the next
    checkpoint), with config.json."""
    for c in self._changes:
      print(f"  config change accepted ({c.kind}): {c}")
    self.write_config()
    if self._changes:
      self.log("config_change", step=self.record.step,
                          changes={c.field: [c.saved, c.new] for c in self._changes})

  def _make_trainer(self, frozen: bool = False):
    self.steps_per_epoch = math.ceil(len(self.data.windows["train"])
                                     / self.config.train.batch_size)
    self.trainer = Trainer(self.config, self.model_cfg, self.steps_per_epoch, frozen)
    self.train_batches = self.trainer.train_batches(self.data)
    self.valid_batches = self.data.batches("validation", self.trainer.eval_batch_size)

  def _resume(self):
    """Restores the newest intact step; refuses config changes it must not accept."""
    ckpt, damaged, found = self.checkpointer, [], None
    for step in reversed(ckpt.steps()):
      try:
        meta = ckpt.read_meta(step)
        progress = ckpt.read_json(step, "progress")
      except IncompatibleCheckpointError:
        raise  # another version's layout: not damage
      except CheckpointError as e:
        damaged.append((step, e))
        continue
      # fixed fields first: a changed shape must be refused, not mistaken for damage
      config_lib.check_resume(meta["config"], self.config, self.workdir, fixed_only=True)
      if self.trainer is None:
        self.data = data_lib.prepare(self.config, self.model_cfg,
                                     WordTokenizer.from_json(meta["tokenizer"]))
        kept = (progress.get("record") or {}).get("replicas", [])
        self._make_trainer(frozen=any(isinstance(r, dict) and r.get("diverged") for r in kept))
      try:
        items = ckpt.restore_arrays(step, state_items(self.trainer.abstract_state()), progress)
      except CheckpointError as e:
        damaged.append((step, e))
        continue
      found = (step, items, progress, meta)
      break
    if found is not None:  # the recipe is checked against the step that is resumed
      self._changes = config_lib.check_resume(found[3]["config"], self.config, self.workdir)
      _check_same_files(found[3], self.config, self.workdir)
    if damaged:
      self._handle_damage(damaged, found)
    if found is None:
      return None
    step, items, progress, meta = found
    record = RunRecord.from_json(progress["record"])
    # replicas frozen by a divergence (train.on_divergence='freeze') stay frozen
    state = state_from_items(items, self.trainer.live_array(
        [rep.diverged is None for rep in record.replicas]))
    # checkpoint.keep_best=false: the best step's checkpoint was not kept, by design; its loss
    # and step stay in the record (patience counts from them)
    kept_best = meta["config"].get("checkpoint", {}).get("keep_best", True)
    self.resumed_step, self.resumed_config = step, meta["config"]
    for r, rep in enumerate(record.replicas):
      if rep.best_step is None or rep.best_step in ckpt.steps():
        continue
      if kept_best:
        self._lost_best.append((r, f"is missing from {ckpt.directory}", True))
      elif self.config.checkpoint.keep_best:  # keep_best false -> true: not kept, by design
        self._lost_best.append((r, "was not kept (checkpoint.keep_best was false)", False))
    if kept_best:
      self._check_best(step, record)
    epoch, batch = divmod(step, self.steps_per_epoch)
    print(f"Resuming from {ckpt.path(step)} (step {step}: "
          + ("before training)" if step == 0 else f"after epoch {epoch})" if batch == 0
             else f"epoch {epoch + 1}, batch {batch})"))
    self.window = progress.get("window") or []
    if self.window and any(c.field == "train.log_every" for c in self._changes):
      # windows of another length: the stopped one's partial record stays as it is, and the
      # resumed run's windows start afresh (no record spans more than the new log_every)
      self.window = []
    return state, record, progress["history"]

  def _check_best(self, step: int, record: RunRecord) -> None:
    """Reads the best steps kept beside the resumed one as evaluate.py and export do (meta,
    progress, params and memory, checked against their digests and checksums): a damaged one
    is moved aside and, where the run trains, replaced as a missing one is (`_replace_best`),
    instead of a run that ends naming a best step nobody can read."""
    ckpt = self.checkpointer
    abstract = state_items(self.trainer.abstract_state())
    for best in sorted(record.best_steps() & set(ckpt.steps()) - {step}):
      try:
        ckpt.read_meta(best)  # the vocabulary and config evaluate.py scores it with
        ckpt.restore_arrays(best, {k: abstract[k] for k in ("params", MEMORY)},
                            ckpt.read_json(best, "progress"))
      except IncompatibleCheckpointError:
        raise
      except CheckpointError as e:
        moved = ckpt.move_aside(best)
        print(f"warning: the best checkpoint (step {best}) is damaged ({str(e).rstrip('.')}); "
              f"moved it to {moved}.")
        for r, rep in enumerate(record.replicas):
          if rep.best_step == best:
            self._lost_best.append((r, f"was damaged (moved to {moved})", True))

  @staticmethod
  def _replace_best(record: RunRecord, r: int, step: int, history: list[dict],
                    why: str, damage: bool = True) -> None:
    """Replica r's best checkpoint cannot be read (`why`; `damage`: lost, not left out by
    checkpoint.keep_best=false): the resumed step, intact, becomes its best where the history
    holds its validation loss there; otherwise the next validation does. Its patience count
    stays."""
    rep = record.replicas[r]
    who = f" of replica {r}" if len(record.replicas) > 1 else ""
    losses = [h["loss"] for h in history if h.get("kind") == "validation"
              and h.get("step") == step and h.get("replica", 0) == r]
    lost = rep.best_step
    rep.best_val_loss, rep.best_step = (float(losses[-1]), step) if losses else (None, None)
    then = (f"the resumed step {step} (validation loss {losses[-1]:.4f}) is the best now"
            if losses else "the next validation becomes the best")
    print(f"{'warning' if damage else 'note'}: the best checkpoint{who} (step {lost}) {why}; "
          f"{then}.")

  def _handle_damage(self, damaged, found):
    where = "; ".join(f"step {s}: {str(e).rstrip('.')}" for s, e in damaged)
    if found is None:
      raise CheckpointError(
          f"no checkpoint in {self.checkpointer.directory} can be read ({where}). Start over "
          "with --fresh (the damaged run is moved aside) or choose a new --workdir.")
    if self.config.checkpoint.on_damage != "previous":
      raise DamagedCheckpointError(
          f"the newest checkpoint of {self.workdir} cannot be read ({where}). The newest "
          f"intact step is {found[0]}. To resume from it (the damaged step(s) are moved to "
          f"{os.path.join(self.workdir, ckpt_lib.DAMAGED_DIR)}), run again with "
          "--config.checkpoint.on_damage=previous.")
    for step, _ in damaged:
      print(f"Moved damaged step {step} to {self.checkpointer.move_aside(step)}")

  def check_workdir(self, doing: str) -> None:
    """Raises WorkdirLostError where the workdir was removed under the run (rm -rf) or its
    lock is no longer this run's (removed, and perhaps taken anew by a second train.py): before
    each write of the run's files, so that nothing is written into a workdir another process
    may own or into one a removal left half made again."""
    if self.checkpointer.workdir_removed():
      self.checkpointer.abandon()
      raise WorkdirLostError(self.checkpointer.lost_message(doing))

  def _clock(self) -> None:
    now = time.time()
    self.record.wall_time_s += now - self._since
    self._since = now

  def save(self, step: int, *, wait: bool, window: list[dict] | None = None) -> None:
    self.check_workdir(f"was to save step {step}")
    self.record.step = step
    self._clock()
    self.checkpointer.save(
        step, arrays=state_items(self.state),
        jsons={"progress": {"record": self.record.to_json(), "history": list(self.history.entries),
                            **({"window": window} if window else {})},
               "meta": self.meta},
        keep={step} | (self.record.best_steps() if self.keep_best else set()), wait=wait)
    if self.writers is not None:  # what TensorBoard shows up to a checkpoint is on disk with it
      self.writers.flush()

  def summary(self, status: str, write: bool = True) -> dict:
    if write:
      self._clock()
    r, spe = self.record, self.steps_per_epoch
    last = {}  # each replica's latest validation
    for v in self.history.of("validation"):
      last[v.get("replica", 0)] = v

    def replica_summary(i, rep):
      return {"replica": i, "seed": rep.seed, "best_step": rep.best_step,
              "best_epoch": None if rep.best_step is None else rep.best_step / spe,
              "best_val_loss": rep.best_val_loss,
              "best_val_perplexity": None if rep.best_val_loss is None
                                     else perplexity(rep.best_val_loss),
              "final_val_loss": last[i]["loss"] if i in last else None,
              "final_val_perplexity": last[i]["perplexity"] if i in last else None,
              "epochs_without_improvement": rep.epochs_without_improvement,
              # train.on_divergence='freeze': {step, what, value} where it was frozen
              "diverged": rep.diverged}

    replicas = [replica_summary(i, rep) for i, rep in enumerate(r.replicas)]
    if self.trainer.hparams is not None:  # train.replica_hparams: each replica's values
      changes = self.history.of("config_change")
      for i, (entry, values) in enumerate(zip(replicas, replica_groups(self.config))):
        entry["hparams"] = values
        best = r.replicas[i].best_step
        if changes and best is not None:  # a resume changed them after its best step:
          then = replica_groups_at(self.config, changes, best)[i]  # the best's own values
          if then != values:
            entry["best_hparams"] = then
    best = replicas[r.best_replica] if r.best_replica is not None else replica_summary(0, r.replicas[0])
    s = {"status": status, "workdir": self.workdir, "checkpoints": self.checkpointer.directory,
         "history": self.history.path, "steps": r.step, "epochs_completed": r.step // spe,
         "steps_per_epoch": spe,
         # the best replica's (the only one by default)
         "best_replica": r.best_replica, "best_step": best["best_step"],
         "best_epoch": best["best_epoch"], "best_val_loss": best["best_val_loss"],
         "best_val_perplexity": best["best_val_perplexity"],
         "replicas": replicas,
         "wall_time_s": r.wall_time_s, "devices": self.trainer.mesh.size,
         "platform": jax.devices()[0].platform,
         "parameters": int(sum(x.size for x in jax.tree_util.tree_leaves(self.state.params))
                           // len(r.replicas))}
    diverged = [x["replica"] for x in replicas if x["diverged"]]
    if diverged:  # frozen replicas: their best steps stand, the statistics leave them out
      s["diverged_replicas"] = diverged
    trained = [x for x in replicas if not x["diverged"] and x["best_val_perplexity"] is not None]
    if len(replicas) > 1 and trained:
      from infinito_jax import stats  # pylint: disable=g-import-not-at-top
      # (finite for a run gone astray: perplexities ~1e303)
      s["population"] = stats.population([x["best_val_perplexity"] for x in trained],
                                         "best_val_perplexity")
      if diverged:
        s["population"]["diverged"] = diverged  # as evaluate.py's: the replicas
      if self.trainer.hparams is not None:  # the groups of train.replica_hparams, apart
        s["population"]["groups"] = group_statistics(
            self.config, [None if x["diverged"] else x["best_val_perplexity"] for x in replicas],
            "best_val_perplexity")
    if self.data.info:
      s["corpus"] = self.data.info
    if write and distributed.is_primary():
      self.check_workdir("wrote summary.json")
      ckpt_lib.dump_json(os.path.join(self.workdir, "summary.json"), s)
    return s

  def describe(self) -> None:
    d, t = self.data, self.trainer
    n = t.replicas
    groups = config_lib.replica_hparams(self.config.train.get("replica_hparams", ""))
    stride = t.seeds[1] - t.seeds[0] if n > 1 else 0
    arithmetic = all(b - a == stride for a, b in zip(t.seeds, t.seeds[1:]))
    seeds = (f"all seed {t.seeds[0]}: seed_stride 0" if len(set(t.seeds)) == 1 and not groups
             else f"seeds {', '.join(map(str, t.seeds))}" if n <= 4 or not arithmetic
             and n <= 16 else f"seeds {t.seeds[0]}, {t.seeds[1]}, ..., {t.seeds[-1]}"
             if arithmetic else f"seeds {', '.join(map(str, t.seeds[:8]))}, ... ({n} in all)")
    if groups:
      seeds += (f"; {len(groups)} groups of train.replica_hparams: "
                + " | ".join(", ".join(f"{k}={v}" for k, v in g.items()) or "train.*"
                             for g in groups))
    pop = (f"; a population of {n} replicas ({seeds}), "
           f"{'replicas' if t.scorer.by_replica else 'batch'} over the devices" if n > 1 else "")
    print(f"{sum(x.size for x in jax.tree_util.tree_leaves(self.state.params)) // n:,} "
          f"parameters{' each' if n > 1 else ''}{pop}; "
          f"{self.steps_per_epoch} steps per epoch; {t.mesh.size} device(s): "
          f"{jax.devices()[0].platform}; vocabulary {len(d.tokenizer) - 3} words + 3 special "
          f"ids; train {self.train_batches.num_tokens:,} tokens"
          + (f"; host malloc: {hostmem.status()}" if jax.devices()[0].platform == "cpu" else ""))
    if d.info:
      print(f"Embedded corpus: oracle perplexity {d.info['oracle_perplexity']:.2f} "
            f"(previous word only: {d.info['previous_word_only_perplexity']:.2f})")
    for msg in d.warnings.values():
      print(msg)
    windows, batch = len(self.train_batches.windows), self.config.train.batch_size
    if batch > windows:
      print(f"warning: train.batch_size={batch} exceeds the {windows} training windows: every "
            f"step is mostly padding; a batch of at most {windows} trains the same data.")
    m = self.config.model
    if m.remat and not m.scan_layers and jax.devices()[0].platform == "cpu":
      print("note: model.remat without model.scan_layers: on XLA:CPU this was measured to hold "
            "as much memory as without remat, in a slower step (README: 'Layers in one "
            "nn.scan'); --config.model.remat=false undoes it on resume.")

  def validation_line(self, epoch: float, vals: list[dict], improved: list[bool]) -> str:
    if len(vals) > 1:
      from infinito_jax import stats  # pylint: disable=g-import-not-at-top
      frozen = [r for r, rep in enumerate(self.record.replicas) if rep.diverged]
      which = [r for r in range(len(vals)) if r not in frozen]
      nan = [r for r in which if not math.isfinite(vals[r]["perplexity"])]
      which = [r for r in which if r not in nan] or which
      ppl = np.array([vals[r]["perplexity"] for r in which], float)
      best = which[int(np.argmin(np.where(np.isnan(ppl), np.inf, ppl)))]
      mean, std = stats.mean_std(ppl)
      spread = (f"{stats.num(mean)} +- {stats.num(std)} over {len(ppl)} replicas (min "
                f"{stats.num(ppl.min())}: replica {best}" if len(ppl) > 1
                else f"{stats.num(mean)} (replica {best}")
      if nan and len(which) < len(vals) - len(frozen):
        spread += (f"; not finite: replica{'s' * (len(nan) > 1)} {', '.join(map(str, nan))}")
      return (f"epoch {epoch:.3g}: validation perplexity {spread}; {sum(improved)} improved"
              + (f"; {len(frozen)} frozen after diverging: replica{'s' * (len(frozen) > 1)} "
                 f"{', '.join(map(str, frozen))}" if frozen else "") + ")")
    val, improved = vals[0], improved[0]
    info, oracle = self.data.info, ""
    if info:
      oracle = f" (oracle {info['oracle_perplexity']:.2f}" + (
          ")" if info["oracle_applies"] else
          f", approximate: {data_lib.percent(info['validation_unk_rate'])} of the targets "
          "<unk>)")
    from infinito_jax.stats import num  # pylint: disable=g-import-not-at-top
    return (f"epoch {epoch:.3g}: validation loss {val['loss']:.4f}, perplexity "
            f"{num(val['perplexity'])}{oracle}, phi {val['integration_phi']:.3f}"
            f"{' (best)' if improved else ''}")


DEFAULT_COMPILATION_CACHE = "~/.cache/infinito_jax/jax"  # configs/default.py's


def use_compilation_cache(folder: str, setting: str = "train.compilation_cache") -> str | None:
  """Turns on JAX's persistent compilation cache in `folder` ("" leaves it off), unless the
  environment already decides (JAX_COMPILATION_CACHE_DIR set, even empty: that wins).

  A second run with the same shapes then loads its compiled steps from disk instead of
  compiling them again. A folder that cannot be made or written (either way of setting it) is
  one warning and no cache, not JAX's warnings at every compilation. Returns the folder in
  use, or None. `setting` is how the caller's user sets the folder, as the warning names it.
  """
  env = "JAX_COMPILATION_CACHE_DIR" in os.environ
  if env:
    folder = os.environ["JAX_COMPILATION_CACHE_DIR"]
  if not folder:  # off, though an earlier call (or the user) turned it on in this process
    _set_cache_dir(None)
    return None
  if distributed.active() and not jax.config.jax_enable_compilation_cache:
    # distributed.no_cache_on_cpu: off in a multi-process CPU run, whatever asks for it
    if distributed.is_primary():
      print("note: no persistent compilation cache in a multi-process run on CPU (JAX's CPU "
            "collectives hang in programs loaded from it); GPU and TPU runs keep it.")
    return None
  folder = os.path.abspath(os.path.expanduser(folder))
  try:
    os.makedirs(folder, exist_ok=True)
    if not os.access(folder, os.W_OK | os.X_OK):
      raise PermissionError(errno.EACCES, "not writable")
  except OSError as e:
    where = ("JAX_COMPILATION_CACHE_DIR to a writable folder, or unset it" if env else
             f"{setting} to a writable folder, or '' to silence this")
    why = ("a file is in the way" if isinstance(e, (FileExistsError, NotADirectoryError))
           else e.strerror)
    print(f"warning: no compilation cache ({folder}: {why}); set {where}.")
    _set_cache_dir(None)
    return None
  # the environment's folder too: JAX reads its variable once, at import (one set later, in a
  # notebook, was said to win and left the cache off)
  _set_cache_dir(folder)
  if not env:
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:  # JAX's own setting wins
      jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  _repair_damaged_cache_entries()
  return folder


def _set_cache_dir(folder: str | None) -> None:
  """JAX's compilation cache in `folder` (None: off) from the next compilation on: JAX opens
  its cache once per process, at the first compilation that uses it, so a change (a second
  run in one process with another train.compilation_cache, or '' to turn it off) also resets
  that cache, which then opens in the new folder."""
  if jax.config.jax_compilation_cache_dir != folder:
    jax.config.update("jax_compilation_cache_dir", folder)
    from jax.experimental.compilation_cache import compilation_cache  # pylint: disable=g-import-not-at-top
    compilation_cache.reset_cache()


# what a run sets process-wide for its duration (train.compilation_cache,
# train.threefry_kernel): put back when the call returns (jax_settings_restored)
_JAX_SETTINGS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
                 "jax_threefry_gpu_kernel_lowering")


@contextlib.contextmanager
def jax_settings_restored():
  """The JAX settings a call changes for its run (compilation cache, threefry kernel) and
  the warnings hook of the cache repair, as they were before it once it returns or raises: a
  notebook's next call, and the user's own settings, are not those of this one."""
  import warnings  # pylint: disable=g-import-not-at-top
  before = {name: getattr(jax.config, name) for name in _JAX_SETTINGS}
  shown = warnings.showwarning
  try:
    yield
  finally:
    for name, value in before.items():
      if getattr(jax.config, name) != value:
        if name == "jax_compilation_cache_dir":
          _set_cache_dir(value)
        else:
          jax.config.update(name, value)
    warnings.showwarning = shown


_CACHE_READ_ERROR = re.compile(r"Error reading persistent compilation cache entry for '([^']+)'")


def drop_damaged_cache_entries(folder: str, module_name: str, settle_s: float = 60.0) -> list:
  """Removes `folder`'s compilation-cache entries of `module_name` that do not decompress (a
  process killed while JAX wrote one: JAX writes in place and never replaces an entry, so it
  would warn and recompile at every run). Entries changed in the last `settle_s` seconds may
  still be being written by another process and are left. Returns the paths removed."""
  from jax._src import compilation_cache  # pylint: disable=g-import-not-at-top
  removed = []
  for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
    path = os.path.join(folder, name)
    if not (name.startswith(module_name + "-") and name.endswith("-cache")):
      continue
    try:
      if time.time() - os.path.getmtime(path) < settle_s:
        continue
      with open(path, "rb") as f:
        data = f.read()
    except OSError:  # gone or unreadable: nothing to repair here
      continue
    try:
      compilation_cache.decompress_executable(data)
    except Exception:  # pylint: disable=broad-except  (zlib.error, zstd's errors)
      with contextlib.suppress(OSError):
        os.remove(path)
        removed.append(path)
  return removed


def _repair_damaged_cache_entries() -> None:
  """Once per process: JAX's warning that a cache entry cannot be read becomes the removal of
  the damaged entry and one note (the program is compiled and saved again), where the entry
  does not decompress; any other such warning is shown as JAX gives it."""
  import warnings  # pylint: disable=g-import-not-at-top
  shown = warnings.showwarning
  if getattr(shown, "_infinito_cache_repair", False):
    return

  def showwarning(message, category, filename, lineno, file=None, line=None):
    match = _CACHE_READ_ERROR.match(str(message))
    folder = jax.config.jax_compilation_cache_dir
    if match and folder:
      removed = drop_damaged_cache_entries(os.path.expanduser(folder), match.group(1))
      if removed:
        print(f"note: removed {len(removed)} damaged compilation-cache "
              f"entr{'y' if len(removed) == 1 else 'ies'} ({', '.join(removed)}): "
              "compiled again, and saved again.", flush=True)
        return
    shown(message, category, filename, lineno, file, line)

  showwarning._infinito_cache_repair = True
  warnings.showwarning = showwarning


THREEFRY_KERNEL_ENV = "JAX_THREEFRY_GPU_KERNEL_LOWERING"  # JAX's own switch: set, it wins


def use_threefry_kernel(on: bool) -> bool:
  """train.threefry_kernel: on a GPU, threefry's random bits (dropout masks, exploration noise,
  key splits) come from JAX's CUDA kernel instead of the hash inlined as XLA code in every
  fusion that draws bits; the bits are the same by construction, so the run is too. Meant to
  cut compile time (not yet measured: bench/gpu_all.sh part 'threefry'), at the cost of writing
  the bits to memory. No effect on other platforms.
  Process-wide (JAX's jax_threefry_gpu_kernel_lowering, part of every jit key); the
  environment variable, when set, wins. Returns the value in effect."""
  if THREEFRY_KERNEL_ENV not in os.environ:
    jax.config.update("jax_threefry_gpu_kernel_lowering", bool(on))
  return bool(jax.config.jax_threefry_gpu_kernel_lowering)


class Profiler:
  """A jax.profiler trace of steps [N, M) into <workdir>/profile (train.profile_steps); with
  several processes each writes its own, into profile/process_<i> (the trace files are named
  after the host, so processes on one host would overwrite each other's).

  A run resumed inside the window traces from its first step; a run that ends inside it
  traces to its last; either way the message names the steps really traced. A window the run
  will not reach is said before training and again at the end (nothing is written). A trace
  that cannot be started or written is a warning: training goes on."""

  def __init__(self, window, workdir: str, start: int = 0, total: int | None = None):
    self.window, self.folder, self.active = window, os.path.join(workdir, "profile"), False
    if jax.process_count() > 1:
      self.folder = os.path.join(self.folder, f"process_{jax.process_index()}")
    self.first = self.last = None  # the steps traced
    if window and total is not None and (window[0] >= total or window[1] <= start):
      tqdm_auto.tqdm.write(
          f"note: train.profile_steps={window[0]},{window[1]} lies outside the steps this run "
          f"will train ({f'{start}..{total - 1}' if total > start else 'none'}): nothing will "
          "be traced; choose steps in that range.")
    elif window and total is not None and (window[0] < start or window[1] > total):
      tqdm_auto.tqdm.write(
          f"note: train.profile_steps={window[0]},{window[1]} reaches outside the steps this "
          f"run will train ({start}..{total - 1}): steps {max(start, window[0])}.."
          f"{min(total, window[1]) - 1} will be traced.")

  def before(self, step: int) -> None:
    if (self.window and self.first is None and self.window[0] <= step < self.window[1]):
      self.first = step
      try:
        jax.profiler.start_trace(self.folder)
      except Exception as e:  # pylint: disable=broad-except  (a profile is never worth the run)
        tqdm_auto.tqdm.write(f"warning: no profile: the trace could not start in {self.folder} "
                             f"({type(e).__name__}: {e}); training goes on.")
        return
      self.active = True

  def after(self, step: int, state) -> None:
    """`step` steps are done; stops (after the device finishes them) at the window's end."""
    if self.active:
      self.last = step - 1
      if step >= self.window[1]:
        self.stop(state)

  def stop(self, state=None) -> None:
    if self.active:
      if state is not None:
        jax.block_until_ready(state)
      self.active = False
      try:
        jax.profiler.stop_trace()
      except Exception as e:  # pylint: disable=broad-except  (a full disk, a folder removed)
        tqdm_auto.tqdm.write(f"warning: the profile of steps {self.first}..{self.last} could "
                             f"not be written to {self.folder} ({type(e).__name__}: {e}); "
                             "training goes on.")
        return
      asked = self.window[0], self.window[1] - 1
      why = ([f"the run resumed at step {self.first}"] * (self.first > asked[0])
             + [f"the run ended after step {self.last}"] * (self.last < asked[1]))
      short = (f" (train.profile_steps asked for {asked[0]}..{asked[1]}; "
               f"{' and '.join(why)})" if why else "")
      tqdm_auto.tqdm.write(f"Profile of steps {self.first}..{self.last}{short} written "
                           f"to {self.folder} (tensorboard --logdir {self.folder}, or "
                           "Perfetto: ui.perfetto.dev)")

  def finish(self, state, start: int, end: int) -> None:
    """At the end of the step loop, which ran steps start..end-1."""
    self.stop(state)
    if self.window and self.first is None:
      tqdm_auto.tqdm.write(
          f"No profile: train.profile_steps={self.window[0]},{self.window[1]} lies outside "
          f"the steps this run trained ({f'{start}..{end - 1}' if end > start else 'none'}; "
          "0-based: the step history.jsonl logs as step k+1 is step k here).")


CLI_FLAGS = ("--config.", "pass --fresh")  # how train.py's command line sets a field, starts over
PYTHON_FLAGS = ("config.", "pass fresh=True")  # a Python caller's


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, fresh: bool = False,
                       stop: lifecycle.StopSignals | None = None,
                       flags: tuple | None = None,
                       end_when_groups_diverge: bool = False) -> dict:
  """Trains `config` in `workdir` (resuming from its newest intact checkpoint); returns the summary.

  Args:
    config: the run config (configs/default.py's fields).
    workdir: where checkpoints, history.jsonl and summary.json go; locked while training.
    fresh: move an existing run in `workdir` aside and start over.
    stop: signal handlers already installed by the caller (train.py installs them before its
      imports); by default SIGINT/SIGTERM are handled here for the duration of the call.
    flags: how the caller's command line sets a field and starts over, for messages:
      CLI_FLAGS for train.py's (a study sets `--config.base.` fields); by default (None) a
      Python caller's, whose errors name config.FIELD = VALUE and fresh=True
      (errors.in_python_terms) where a command line's would name --config.FIELD=VALUE and
      --fresh.
    end_when_groups_diverge: in a population with train.on_divergence='freeze', end the run
      (NonFiniteLossError, with the frozen replicas and the step of each) once every group of
      train.replica_hparams (the whole population where it sets none) has a diverged replica,
      instead of once every replica has: a study's runs, where a variant with a diverged seed
      is done, and the population trains on only while some variant has all its seeds.

  Raises:
    ConfigError, DataError, CheckpointError (DamagedCheckpointError), WorkdirBusyError,
    DiskFullError, NonFiniteLossError: each with a message that names the fix.
    lifecycle.StopRequested: a stop signal came during start-up (in a multi-process run: to
      any process, agreed on before the first step); nothing was written (a new run's workdir
      is removed, and a run --fresh moved aside is moved back).
  """
  if flags is None:  # a Python caller: the fixes in its terms
    return python_terms("train_and_evaluate")(train_and_evaluate)(
        config, workdir, fresh=fresh, stop=stop, flags=PYTHON_FLAGS,
        end_when_groups_diverge=end_when_groups_diverge)
  workdir = workdir_path(workdir)
  check_config_dict(config, "config", "configs/tiny.py")
  with distributed.errors_stop_all(), jax_settings_restored():
    config_lib.validate(config)
    config = config_lib.with_absolute_paths(config)
    writers_lib.check_available(config)  # before anything is written
    distributed.check_same("config", {"workdir": os.path.abspath(workdir), "fresh": fresh,
                                      **config_lib.flatten(config.to_dict())})
    use_compilation_cache(config.train.compilation_cache)
    use_threefry_kernel(config.train.threefry_kernel)
    primary = distributed.is_primary()
    if config.train.threefry_kernel and jax.default_backend() != "gpu" and primary:
      print(f"note: train.threefry_kernel changes nothing on {jax.default_backend()}: it moves "
            "threefry's random bits into JAX's CUDA kernel on a GPU (the same bits, so the same "
            "run either way).")
    made_workdir = not os.path.exists(workdir)
    before = None if made_workdir else lifecycle.entries(workdir)  # what a failed start keeps
    distributed.barrier("infinito:started")  # before process 0 makes the workdir

    lock = lifecycle.WorkdirLock(workdir) if primary else None
    moved = []  # where --fresh moved the previous run

    def unmake():
      """A run that failed to start (or was stopped in start-up) leaves no empty workdir, and
      a previous run that --fresh moved aside goes back in place: --fresh takes effect only
      once the new run trains (its loop's files are written)."""
      if not primary or (stop is not None and stop.training):
        return
      if moved and lifecycle.move_back(workdir, moved[0]):
        print(f"Moved the previous run back from {moved[0]} to {workdir}: the new run did not "
              "start.", flush=True)
        moved.clear()
      if made_workdir or before is not None:  # a new workdir goes; an existing folder
        lock.release()  # still held where a multi-process error exits from inside its block
        lifecycle.remove_if_unused(workdir, before)  # loses the lock file and empty folders

    try:
      # one writer per workdir: process 0 holds the lock for all processes of the run
      with (lock if primary else contextlib.nullcontext()), \
          contextlib.ExitStack() as stack, distributed.errors_stop_all(unmake):
        if stop is None:  # a library call (a notebook's): it returns, and is called again
          stop = stack.enter_context(lifecycle.StopSignals())
          stop.again = "train_and_evaluate again with the same config and workdir"
        stop.before_hard_exit = unmake  # a hard exit during start-up leaves no new workdir
        stack.callback(setattr, stop, "before_hard_exit", None)
        stop_check = functools.partial(_stop_before_training, stop)
        stop_check()
        if fresh and primary and (others := lifecycle.not_made_by_a_run(workdir)):
          raise WorkdirError(
              f"--fresh moves what a run left in {os.path.abspath(workdir)} aside, and that "
              f"folder also holds what no run makes ({', '.join(others[:6])}"
              f"{f' and {len(others) - 6} more' if len(others) > 6 else ''}), which --fresh "
              "will not move: move those out of it, or choose another --workdir; nothing was "
              "moved.")
        split = lifecycle.split_run(workdir) if primary else None
        if split and (not fresh or lifecycle.moved_into(workdir)):
          raise WorkdirError(split)  # --fresh finishes a move only in the folder it began in
        if fresh and primary and (old := lifecycle.move_aside(workdir)):
          moved.append(old)
          print(f"Moved the previous run in {workdir} to {old}"
                + (" (finishing the move a killed start began)" if split else ""))
        distributed.barrier("infinito:moved_aside")  # every process looks after the move
        lifecycle.check_writable(workdir, ckpt_lib.checkpoint_dir(workdir))
        lifecycle.check_run_files(workdir, before=before,
                                  profile=bool(config.train.profile_steps),
                                  tensorboard=bool(config.log.tensorboard))
        run = Run(config, workdir, before_writing=stop_check)
        # waits for the last save (nothing is lost); on an error, a save that cannot finish is
        # a warning line
        stack.push(lambda kind, *_: run.checkpointer.close(failing=kind is not None))
        stack.push(lambda kind, *_: run.close_writers(failing=kind is not None))
        return _loop(run, stop, flags, end_when_groups_diverge)
    except BaseException as e:
      if isinstance(e, WorkdirLostError) and stop is not None:
        stop.summary_path = None  # not this run's to write any more (another may own it)
      if stop is not None and stop.summary_path:  # the loop had begun: the summary said
        # 'running' (or the status it was resumed from), not what it is
        if isinstance(e, NonFiniteLossError):  # where, and whose (the rest: the last
          stop.mark_aborted(lifecycle.DIVERGED,  # evaluation, which the checkpoints hold)
                            diverged={"step": e.step, "replicas": list(e.replicas),
                                      # a population's, replica by replica (freeze)
                                      **({"replica_steps": e.replica_steps}
                                         if getattr(e, "replica_steps", None) else {})},
                            # the record's, where replicas froze since the last evaluation
                            base=getattr(e, "summary", None))
        else:
          stop.mark_aborted()
        stop.summary_path = None
      unmake()
      raise


def _stop_before_training(stop: lifecycle.StopSignals) -> None:
  """Raises StopRequested where a stop signal came during a one-process run's start-up, so
  that it ends before writing anything (a new run's workdir is then removed). A multi-process
  run's processes agree on a stop at the loop's collective check instead."""
  if stop.requested and not stop.training and not distributed.active():
    raise lifecycle.StopRequested(stop.requested)


def _loop(run: Run, stop: lifecycle.StopSignals, flags=CLI_FLAGS,
          end_when_groups_diverge: bool = False) -> dict:
  """The flat loop: one step per iteration; log, validate, save and stop are periodic actions.
  `flags`: how the caller's command line sets a run field (a prefix), how it starts over, and
  optionally {field: flag} for fields it sets another way; `end_when_groups_diverge`: see
  train_and_evaluate."""
  c, spe, record = run.config.train, run.steps_per_epoch, run.record
  total = c.epochs * spe
  every_save, every_eval = run.config.checkpoint.every_steps, c.eval_every_steps
  stop_at = c.stop_after_steps or total
  done_reason = record.done(total, c.patience) or (lifecycle.STOPPED if record.step >= stop_at
                                                   else None)
  if done_reason:
    def f(field):  # the flag that sets a field: flags[2] names those a caller sets otherwise
      return (flags[2] if len(flags) > 2 else {}).get(field) or f"{flags[0]}{field}"
    waited = min(r.epochs_without_improvement for r in record.training())  # one trains on
    how = {lifecycle.STOPPED: f"raise {f('train.stop_after_steps')} above {record.step} (now "
                              f"{c.stop_after_steps}), or unset it (0)",
           lifecycle.EARLY_STOPPED: f"raise {f('train.patience')} above {waited} (now "
                                    f"{c.patience})",
           lifecycle.COMPLETED: f"raise {f('train.epochs')} above {record.step // spe} "
                                f"(now {c.epochs})"}[done_reason]
    if record.stop_reason and record.stop_reason != done_reason:  # the settings given end it
      print(f"Nothing to do: the run in {run.workdir} ({record.stop_reason} at step "
            f"{record.step}) has no steps left to train with these settings ({done_reason}). "
            f"To train on, {how}; to start over, {flags[1]}.")
    else:
      print(f"Nothing to do: the run in {run.workdir} has ended ({done_reason}) at step "
            f"{record.step}. To train on, {how}; to start over, {flags[1]}.")
    if run._changes:  # pylint: disable=protected-access
      print("  not applied, as nothing was trained (config.json keeps the run's): "
            + "; ".join(str(ch) for ch in run._changes))  # pylint: disable=protected-access
    run.unapplied_notes()
    # a step a reader (evaluate.py) pinned through the run's last save is left for a later
    # save to delete, and an ended run makes none: deleted now, if no reader holds it still
    # (the record's steps are kept whatever checkpoint.keep_best says: nothing is trained)
    run.checkpointer.keep_only({record.step} | record.best_steps())
    summary = run.summary(record.stop_reason or done_reason, write=False)  # nothing changed
    if distributed.is_primary():  # but summary.json may be stale: a process that died (or a
      # disk that filled) after the last save never wrote it; it is the checkpoint's record
      stale = [path for path, rewrote in (  # the same for history.jsonl and config.json
          (run.history.path, run.history.sync()),
          (os.path.join(run.workdir, "config.json"), run.repair_config())) if rewrote]
      path = os.path.join(run.workdir, "summary.json")
      try:
        with open(path) as f:
          on_disk = json.load(f)
      except (OSError, ValueError):
        on_disk = {}
      if not isinstance(on_disk, dict):  # JSON, but not a summary's (null, a list): rewritten
        on_disk = {}
      if any(on_disk.get(k) != summary[k] for k in ("status", "steps", "best_step",
                                                     "best_val_loss", "best_replica")):
        ckpt_lib.dump_json(path, summary)
        stale.append(path)
      elif isinstance(on_disk.get("wall_time_s"), (int, float)):
        # the run's whole time, counted after its last save (the checkpoint's stops there)
        summary["wall_time_s"] = on_disk["wall_time_s"]
      for path in stale:
        print(f"Rewrote {path}, which did not match the run's last checkpoint.")
    return summary
  # the end of start-up: a stop signal so far ends the run before it changes any of its files
  _stop_before_training(stop)
  if distributed.active() and distributed.any_process(bool(stop.requested)):  # all agree
    raise lifecycle.StopRequested(stop.requested or "a signal to another process")
  stop.training = True  # from here a signal finishes a step and saves: the files now change
  run.commit()
  run.describe()
  metrics = TrainMetrics(replica_groups(run.config) if run.trainer.hparams is not None else None,
                         run.window, [rep.diverged and rep.diverged["step"]
                                      for rep in record.replicas]
                         if run.trainer.freeze else None,
                         stop=c.get("on_divergence", "stop") == "stop",
                         ends=replica_group_index(run.config) if end_when_groups_diverge
                         else None)
  start, status = record.step, None
  metrics.saved = start or None  # a resumed run's step is on disk
  if distributed.is_primary():  # the run's files: process 0's
    stop.summary_path = os.path.join(run.workdir, "summary.json")
    distributed.set_abort_hook(stop.mark_aborted)  # a peer's error ends this process too
    run.writers = writers_lib.Writers(run.config, run.workdir, record,
                                      replicas=run.trainer.replicas,
                                      history=run.history.entries)
  if c.sample_prompt:
    unknown = [w for w in dict.fromkeys(c.sample_prompt.lower().split())
               if w not in run.data.tokenizer.index]
    if unknown:
      print(f"note: train.sample_prompt words {unknown} are not in the vocabulary: <unk>.")
  # tqdm.auto picks the widget in a notebook, whose stdout is no TTY: show it there anyway
  in_notebook = any(k.__module__ == "tqdm.notebook" for k in tqdm_auto.tqdm.__mro__)
  bar = tqdm_auto.tqdm(total=total, initial=start, unit="step",
                       disable=(True if not distributed.is_primary() else
                                False if in_notebook else None))
  step = start
  profiler = Profiler(config_lib.profile_window(c.profile_steps), run.workdir, start,
                      min(total, stop_at))
  many = distributed.active()

  def stop_requested(check: bool) -> bool:
    """A stop signal, seen the same by every process: one process's is agreed on at steps that
    `check` (every train.log_every steps and at saves), so all stop after the same step."""
    if not many:
      return bool(stop.requested)
    return check and distributed.any_process(bool(stop.requested))

  def record_frozen(ending: bool = False):
    """Records the divergences the last fetch found (train.on_divergence='freeze'), each
    with the number of replicas still training after its step (none where the run ends)."""
    for frozen in metrics.frozen:
      run.freeze_replica(**frozen, training=0 if ending else sum(
          d is None or d > frozen["step"] for d in metrics.diverged))
    metrics.frozen.clear()

  def with_frozen(e: NonFiniteLossError) -> NonFiniteLossError:
    """`e`, with the run's summary from its record where replicas freeze (each frozen one's
    `diverged`, the best and the statistics over those still training; the rest that of the
    last evaluation), for the summary that says how the run ended (train_and_evaluate)."""
    if metrics.diverged is not None and distributed.is_primary():
      e.summary = run.summary(lifecycle.DIVERGED, write=False)
    return e

  stop.ended = None  # (a study's next run)
  while status is None:
    epoch, index = divmod(step, spe)
    profiler.before(step)
    run.state, m = run.trainer.train_step(
        run.state, run.trainer.train_batch(run.train_batches, epoch, index))
    metrics.add(step, m)
    step += 1
    if step == start + 1:  # this process's first step compiled the program: not throughput
      metrics.restart_clock(after=m["loss"])
    profiler.after(step, run.state)
    bar.update(1)
    if index == 0 or step == start + 1:
      bar.set_description(f"epoch {epoch + 1}/{c.epochs}")
    epoch_end = step % spe == 0
    evaluate = epoch_end or (every_eval and step % every_eval == 0)
    scheduled = evaluate or (every_save and step % every_save == 0) or step >= stop_at
    requested = stop_requested(scheduled or step % c.log_every == 0)
    save = scheduled or requested
    if step % c.log_every == 0 or save:
      # a window an uninterrupted run would not end here: it goes on if the run is resumed
      partial = not (step % c.log_every == 0 or evaluate or step >= total
                     or (every_save and step % every_save == 0))
      try:
        logged = metrics.fetch(partial)
      except NonFiniteLossError as e:  # those found before the error that ends the run too
        record_frozen(ending=True)
        raise with_frozen(e)
      record_frozen()
      if logged is not None:
        run.log("train", epoch=epoch + 1, **logged)
        bar.set_postfix(loss=f"{logged['loss']:.3f}", lr=f"{logged['learning_rate']:.2e}")
    if save and (bad := run.trainer.non_finite(run.state)).size:  # nothing diverged is saved
      frozen = record.replicas[bad[0]].diverged
      if frozen:  # its weights were lost before its loss said so: freezing cannot keep them
        e = diverged_error("the parameters", None, frozen["step"] - 1, bad[:1],
                           run.trainer.replicas, metrics.groups, metrics.saved)
        at = f"became non-finite at step {frozen['step'] - 1}"
        e.args = (e.args[0].replace(
            f"{at}. ", f"{at}, by an update that overflowed float32 while the step's loss and "
            "gradient norm were still finite (far too large a learning rate or weight decay); "
            f"the next step's {frozen['what']} froze the replica with those weights "
            "(train.on_divergence='freeze'), which cannot be saved. ", 1),)
      else:
        e = diverged_error("the parameters", None, step, bad, run.trainer.replicas,
                           metrics.groups, metrics.saved)
      if metrics.diverged is not None:  # and the replicas frozen before (a study records all)
        e.replica_steps = [e.step if r in e.replicas else s
                           for r, s in enumerate(metrics.diverged)]
      raise with_frozen(e)
    if evaluate:
      vals = run.trainer.evaluate(run.state, run.valid_batches)
      improved = record.observe(step, [v["loss"] for v in vals], epoch_end=epoch_end,
                                steps_per_epoch=spe)
      groups = replica_groups(run.config) if run.trainer.hparams is not None else None
      for r, val in enumerate(vals):
        if record.replicas[r].diverged:  # frozen: validated no more (its record stands)
          continue
        # NaN or inf (finite weights about to diverge): null, as JSON has no such numbers
        val = {k: None if isinstance(v, float) and not math.isfinite(v) else v
               for k, v in val.items()}
        run.log("validation", step=step, epoch=step / spe, replica=r,
                seed=run.trainer.seeds[r], **({"hparams": groups[r]} if groups else {}), **val)
      tqdm_auto.tqdm.write(run.validation_line(step / spe, vals, improved))
      if c.sample_prompt:
        for rec in run.samples(step)[:4]:
          who = f" (replica {rec['replica']})" if len(vals) > 1 else ""
          tqdm_auto.tqdm.write(f"  sample{who}: {rec['prompt_as_seen']} >>> {rec['text']}")
    if step >= total:  # the last epoch: completed, whatever the patience says
      status = lifecycle.COMPLETED
    elif record.out_of_patience(c.patience):
      status = lifecycle.EARLY_STOPPED
      tqdm_auto.tqdm.write(f"Early stopping: no better validation loss for {c.patience} epoch"
                      f"{'s' if c.patience > 1 else ''}"
                      + ("." if len(record.replicas) == 1 else " in any replica." if
                         len(record.training()) == len(record.replicas) else
                         " in any replica still training (the others are frozen)."))
    elif step >= stop_at:
      status = lifecycle.STOPPED
    elif requested:
      status = lifecycle.INTERRUPTED
    if save or status:
      record.stop_reason = status
      run.save(step, wait=bool(evaluate or status), window=metrics.window())
      metrics.saved = step
      if evaluate:
        run.summary("running")
      stop.ended = status  # the last step is saved: a signal now only hurries the exit
    if evaluate or save:
      metrics.restart_clock()  # validating and saving are not training's time
  bar.close()
  profiler.finish(run.state, start, step)  # a window past the run's end: what was traced
  if status == lifecycle.INTERRUPTED and not distributed.is_primary():  # its log says why
    print(f"process {distributed.process_index()}: stopped with the others after step {step} "
          "(a stop signal); process 0 saved the run's files.", file=sys.stderr)
  if status == lifecycle.INTERRUPTED:
    print(f"Stopped by {stop.requested or 'a signal to another process'} at step {step}: "
          f"checkpoint saved. Run {stop.again} to resume.")
  if run.config.log.plot and step > start and distributed.is_primary():
    try:
      from infinito_jax import plot  # pylint: disable=g-import-not-at-top
      plot.write_plot([run.workdir])
    except Exception as e:  # pylint: disable=broad-except
      said = str(e).rstrip(".") if isinstance(e, WorkdirError) else errors_short(e)
      print(f"warning: the plot of {run.workdir} was not written ({said}); "
            f"python -m infinito_jax.plot {shlex.quote(run.workdir)}"
            + (" --out OTHER.png" if isinstance(e, WorkdirError) else "") + " writes it.")
  summary = run.summary(status)
  stop.summary_path = None  # this run's summary is final
  distributed.set_abort_hook(None)
  return summary
