"""The INFINITO V5.2 language model in flax.linen: config, transformer, memory and metrics wiring.

Usage::

  model = InfinitoV52(ModelConfig(vocab_size=97, hidden_dim=32, num_layers=2, num_heads=4,
                                  memory_slots=8))
  variables = model.init(jax.random.key(0), ids)            # {'params': ..., 'memory': ...}
  (logits, metrics), updates = model.apply(variables, ids, with_metrics=True, mutable=['memory'])
  (logits, _), updates = model.apply(variables, ids, train=True,
                                     rngs={'dropout': k1, 'explore': k2}, mutable=['memory'])

Randomness comes only from the `params`, `dropout` and `explore` streams. The memory state is the
`memory` collection; pass `mutable=['memory']` to get its update (without it, apply is read-only).
"""

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from infinito_jax.errors import ConfigError
from infinito_jax.layers import DROPOUT_BITS, Dropout, torch_linear
from infinito_jax.memory import MEMORY, PriorityMemory, row_mean
from infinito_jax.metrics import PER_EXAMPLE, IntegrationMetrics

__all__ = ["ModelConfig", "InfinitoV52", "check_ids", "model_config", "MEMORY", "stack_layers",
           "unstack_layers"]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Hyperparameters of V5.2 (SPEC names and original defaults) plus the JAX-only switches.

  Attributes:
    vocab_size: V, number of token ids (ids must lie in [0, V)).
    hidden_dim: D, the model width; must be divisible by num_heads.
    num_layers: L, transformer layers.
    num_heads: H, attention heads.
    memory_slots: S, slots of the priority memory.
    slot_size: width of a memory slot (64 in the original).
    max_len: rows of the position table: the longest sequence the model accepts.
    dropout: dropout rate on attention weights and in the feed-forward block (training only).
    attention_dropout: dropout rate on the attention weights alone (None: `dropout`). The
      original drops out attention *weights*, which a fused attention kernel cannot do; where
      it is 0 (or in evaluation) and no weights are asked for (no metrics), attention runs
      through `jax.nn.dot_product_attention` (see attention_impl).
    attention_impl: the kernel of that fused path: 'xla', 'cudnn' (cuDNN flash attention:
      a GPU of compute capability >= 8.0, bfloat16 or float16, head_dim a multiple of 8 up to
      128) or 'auto' (default): cuDNN where those hold, XLA elsewhere. The same function; the
      numbers differ by rounding. 'pallas': Pallas' Triton flash attention (a GPU; float32
      too, with a sequence length that is a multiple of 128 or shorter than 128). Without a
      GPU (a GPU run evaluated on a CPU) 'cudnn' and 'pallas' run XLA's; the Trainer refuses
      to train with them there.
    embed_dropout: dropout rate on the input of the first layer (token + position embeddings)
      in training; 0 (default, the original) adds nothing and draws no random bits.
    residual_dropout: dropout rate on the attention block's output before its residual add
      (h = LN1(h + dropout(attn(h)))) in training; 0 (default, the original) adds nothing.
      Like `dropout`, both are training-only: the function evaluated and its parameters are
      the original's.
    dropout_bits: random bits that decide each dropped-out element in training: 32 (default)
      is flax's nn.Dropout, the masks of every earlier run; 16 draws two decisions from each
      32-bit word (layers.Dropout): masks about 2.5 times cheaper on a CPU, the keep
      probability rounded to a multiple of 2^-16; another run of the same seed.
    exploration: add N(0, 1) * adaptive_scale noise after each layer in training.
    noise_scale: initial value of the learnable adaptive_scale.
    causal: mask future positions (default). False reproduces the original, whose attention
      sees the whole sequence; use it only for parity with the original's numbers.
    fuse_memory: add a causal per-position memory read to the final hidden states
      (importance_enhancer(content), see PriorityMemory.causal_read). The original computes a
      read and discards it, which is the default here.
    dtype: computation dtype of the transformer (e.g. jnp.bfloat16); parameters, softmax,
      metrics and memory stay in float32.
    scan_layers: run the layers as one `nn.scan` over parameters stacked on a leading layer
      axis (params['layers']['block'], [L, ...]) instead of L unrolled copies
      (params['layers_0'], ...): the step compiles in about the time of one layer. The same
      function (`stack_layers` converts the parameters exactly); the random streams of
      dropout, noise and init are split per layer differently, so a run with it is another
      run of the same seed.
    remat: recompute each layer's activations in the backward pass (`nn.remat`) instead of
      keeping them: the same numbers for a little more compute, and less memory where the
      layers are scanned (unrolled, XLA:CPU's schedule was measured to hold as much as without).
    remat_policy: what a rematerialised layer keeps (with remat only): 'nothing' (default:
      recompute the whole layer from its input) or 'dots' (keep the outputs of its
      projection and feed-forward matrix products, recompute the rest: attention, softmax,
      LayerNorm, GELU, dropout masks from the same keys), JAX's
      `dots_with_no_batch_dims_saveable`. Between no remat and 'nothing' in memory and work.
  """
  vocab_size: int = 5000
  hidden_dim: int = 512
  num_layers: int = 6
  num_heads: int = 8
  memory_slots: int = 256
  slot_size: int = 64
  max_len: int = 1000
  dropout: float = 0.1
  attention_dropout: float | None = None
  embed_dropout: float = 0.0
  residual_dropout: float = 0.0
  dropout_bits: int = 32
  exploration: bool = True
  noise_scale: float = 0.1
  causal: bool = True
  fuse_memory: bool = False
  dtype: Any = jnp.float32
  scan_layers: bool = False
  remat: bool = False
  remat_policy: str = "nothing"
  attention_impl: str = "auto"

  def __post_init__(self):
    for name in ("vocab_size", "hidden_dim", "num_layers", "num_heads", "memory_slots",
                 "slot_size", "max_len"):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"ModelConfig.{name} must be a positive integer, got {value!r}.")
    if self.hidden_dim % self.num_heads:
      raise ConfigError(
          f"ModelConfig: hidden_dim ({self.hidden_dim}) must be divisible by num_heads "
          f"({self.num_heads}); choose e.g. num_heads in "
          f"{[h for h in range(1, min(self.hidden_dim, 64) + 1) if self.hidden_dim % h == 0]}.")
    if self.hidden_dim < 2:
      raise ConfigError("ModelConfig.hidden_dim must be at least 2 (phi projects to D/2).")
    for name in ("exploration", "causal", "fuse_memory", "scan_layers", "remat"):
      if not isinstance(getattr(self, name), (bool, np.bool_)):
        raise ConfigError(f"ModelConfig.{name} must be True or False, got "
                          f"{getattr(self, name)!r}.")
    for name in ("dropout", "embed_dropout", "residual_dropout", "noise_scale",
                 "attention_dropout"):
      value = getattr(self, name)
      if value is None and name == "attention_dropout":
        continue
      if (not isinstance(value, (int, float, np.integer, np.floating)) or isinstance(value, bool)
          or not math.isfinite(value)):
        raise ConfigError(f"ModelConfig.{name} must be a finite number, got {value!r}.")
    if not 0.0 <= self.dropout < 1.0:
      raise ConfigError(f"ModelConfig.dropout must lie in [0, 1), got {self.dropout}.")
    for name in ("embed_dropout", "residual_dropout"):
      if not 0.0 <= getattr(self, name) < 1.0:
        raise ConfigError(f"ModelConfig.{name} must lie in [0, 1), got {getattr(self, name)}.")
    if (not isinstance(self.dropout_bits, (int, np.integer)) or isinstance(self.dropout_bits, bool)
        or self.dropout_bits not in DROPOUT_BITS):
      raise ConfigError(f"ModelConfig.dropout_bits must be one of {DROPOUT_BITS}, got "
                        f"{self.dropout_bits!r}.")
    if self.attention_dropout is not None and not 0.0 <= self.attention_dropout < 1.0:
      raise ConfigError("ModelConfig.attention_dropout must lie in [0, 1) (or None: dropout), "
                        f"got {self.attention_dropout}.")
    if not isinstance(self.remat_policy, str) or self.remat_policy not in REMAT_POLICIES:
      raise ConfigError(f"ModelConfig.remat_policy must be one of {tuple(REMAT_POLICIES)}, got "
                        f"{self.remat_policy!r}.")
    if self.remat_policy != "nothing" and not self.remat:
      raise ConfigError(f"ModelConfig.remat_policy={self.remat_policy!r} says what a "
                        "rematerialised layer keeps, but remat is off; set remat=True "
                        "(--config.model.remat=true) or leave remat_policy 'nothing'.")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ConfigError(f"ModelConfig.attention_impl must be one of {ATTENTION_IMPLS}, got "
                        f"{self.attention_impl!r}.")
    try:
      dt = jnp.dtype(self.dtype)
    except TypeError as e:
      raise ConfigError(f"ModelConfig.dtype {self.dtype!r} is not a dtype.") from e
    if not jnp.issubdtype(dt, jnp.floating):
      raise ConfigError(f"ModelConfig.dtype must be a floating dtype, got {dt}.")
    if dt.itemsize > 4 and not jax.config.jax_enable_x64:  # JAX would compute in float32
      raise ConfigError(f"ModelConfig.dtype {dt} needs JAX's 64-bit mode, which is off: without "
                        "it JAX computes in float32. Use float32 or bfloat16, or turn it on first "
                        "(jax.config.update('jax_enable_x64', True)).")

  @property
  def head_dim(self) -> int:
    return self.hidden_dim // self.num_heads

  @property
  def attn_dropout(self) -> float:
    """The dropout rate on attention weights in effect."""
    return self.dropout if self.attention_dropout is None else self.attention_dropout


ATTENTION_IMPLS = ("auto", "xla", "cudnn", "pallas")
# True: 'pallas' runs Pallas' interpreter off a GPU (the kernel's own code, slowly: for tests);
# False (default): off a GPU it runs XLA's attention, the same function
PALLAS_INTERPRET = False


def pallas_block(seq_len: int) -> int:
  """The block of query and key rows of the Pallas kernel along a sequence of `seq_len`: 128,
  or the whole sequence where it is shorter; the sequence must be a multiple of it."""
  return min(128, seq_len)


PALLAS_MODULE = "jax.experimental.pallas.ops.gpu.attention"


def pallas_kernel():
  """The module of Pallas' Triton flash attention (PALLAS_MODULE); JAX 0.10 ships it, JAX 0.11
  too (deprecated in favour of tokamax: importing it warns), JAX 0.12 no longer does.

  Raises:
    ConfigError: this JAX lacks it, with the settings that work instead.
  """
  try:
    from jax.experimental.pallas.ops.gpu import attention  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ConfigError(f"model.attention_impl='pallas' needs Pallas' Triton flash attention "
                      f"({PALLAS_MODULE}), which this JAX ({jax.__version__}) does not ship: use "
                      "attention_impl 'auto' (cuDNN's in bfloat16, XLA's elsewhere) or 'xla', "
                      "or a JAX that has it (0.10 and 0.11 do).") from None
  return attention


def pallas_available() -> bool:
  """Whether this JAX has Pallas' Triton flash attention (`pallas_kernel` would not refuse)."""
  try:
    pallas_kernel()
  except ConfigError:
    return False
  return True


def pallas_attention(q, k, v, scale: float, causal: bool, interpret: bool = False):
  """Flash attention from Pallas' Triton kernel (PALLAS_MODULE, forward and backward):
  [B, T, H, Dh] in and out, like jax.nn.dot_product_attention. Unlike cuDNN's it takes float32
  (TF32 products, JAX's default GPU precision), so the float32 fused path need not write the
  [B, H, T, T] scores to memory."""
  pallas_ops = pallas_kernel()
  t = q.shape[1]
  block = pallas_block(t)
  if t % block:
    raise ConfigError(f"attention_impl 'pallas' needs a sequence length that is a multiple of "
                      f"{block} (its kernel's block) or shorter, got {t}: use another length or "
                      "attention_impl 'auto'.")
  sizes = pallas_ops.BlockSizes(block_q=block, block_k=block, block_q_dkv=min(32, t),
                                block_kv_dkv=min(32, t), block_q_dq=min(32, t),
                                block_kv_dq=min(32, t))
  return pallas_ops.mha(q, k, v, None, sm_scale=scale, causal=causal, block_sizes=sizes,
                        interpret=interpret)


def fused_attention_impl(config: ModelConfig, dtype, seq_len: int | None = None) -> str:
  """The kernel of the fused path (attention_impl resolved): `jax.nn.dot_product_attention`'s
  'xla' or 'cudnn', or 'pallas' (`pallas_attention`). 'pallas' on a `seq_len` its block does
  not divide (sampling's growing buffers; training refuses such a data.seq_len) is 'xla'."""
  if (config.attention_impl == "pallas" and seq_len is not None
      and seq_len % pallas_block(seq_len)):
    return "xla"
  if config.attention_impl == "pallas" and not pallas_available():
    return "xla"  # a run trained with it, scored under a JAX without it (train.py refuses)
  if config.attention_impl in ("cudnn", "pallas") and jax.default_backend() != "gpu":
    if config.attention_impl == "pallas" and PALLAS_INTERPRET:
      return "pallas"
    return "xla"  # a GPU run scored or sampled on a CPU: the same function (train.py refuses)
  if config.attention_impl != "auto":
    return config.attention_impl
  if jax.default_backend() != "gpu" or jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
    return "xla"
  if config.head_dim % 8 or config.head_dim > 128:
    return "xla"
  capability = getattr(jax.devices()[0], "compute_capability", None)
  try:
    return "cudnn" if capability and float(capability) >= 8.0 else "xla"
  except ValueError:
    return "xla"


def model_config(model) -> ModelConfig:
  """The frozen ModelConfig of a run config's `model` group (a ConfigDict or dict; dtype by name).

  Raises:
    ConfigError: an unknown field, or a value ModelConfig refuses.
  """
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  kw = dict(model.items())
  unknown = sorted(set(kw) - fields)
  if unknown:
    raise ConfigError(f"config.model has unknown fields {unknown}; known: {sorted(fields)}.")
  try:
    kw["dtype"] = jnp.dtype(kw.get("dtype", "float32"))
  except TypeError:
    raise ConfigError(f"config.model.dtype={kw['dtype']!r} is not a dtype; use 'float32' or "
                      "'bfloat16'.") from None
  return ModelConfig(**kw)


def stacked_models_message(variables) -> str | None:
  """Why `variables` are not one model's, where they hold several stacked (a population's, whose
  scalar adaptive_scale has a leading axis): the message names the fix. None otherwise."""
  params = variables.get("params") if hasattr(variables, "get") else None
  scale = params.get("adaptive_scale") if hasattr(params, "get") else None
  if scale is None or np.ndim(scale) == 0:
    return None
  return (f"these variables have a leading axis of {np.shape(scale)[0]} (adaptive_scale has "
          f"shape {tuple(np.shape(scale))}, not ()): a population's or a batch of models'. Pass "
          "one model's: run.variables(i) of restore_run, or jax.tree_util.tree_map(lambda x: "
          "x[i], variables).")


def check_ids(ids, config: ModelConfig) -> None:
  """Refuses token ids the model cannot take, with an error naming the problem and the fix.

  Shape and dtype checks are static (free under jit). The range check needs values, so it runs
  only on concrete arrays (eager calls, data pipelines); under jit an out-of-range id gives
  NaN or clamped values without an error, so validate data once with this function before it
  enters a jitted step.
  """
  shape, dtype = getattr(ids, "shape", None), getattr(ids, "dtype", None)
  if shape is None or dtype is None:
    raise TypeError(f"token ids must be an integer array of shape [batch, seq_len], got "
                    f"{type(ids).__name__}; wrap it with jnp.asarray(ids, jnp.int32).")
  if len(shape) != 2:
    fix = ("add a batch axis with ids[None] for one sequence" if len(shape) < 2 else
           "fold the leading axes into the batch with ids.reshape(-1, ids.shape[-1])")
    raise ValueError(f"token ids must have shape [batch, seq_len] (rank 2), got shape "
                     f"{tuple(shape)}; {fix}.")
  if not jnp.issubdtype(dtype, jnp.integer):
    raise TypeError(f"token ids must be integers, got dtype {dtype}; cast with "
                    f"ids.astype(jnp.int32).")
  batch, seq_len = shape
  if batch == 0 or seq_len == 0:
    raise ValueError(f"token ids must be non-empty, got shape {tuple(shape)}.")
  if seq_len > config.max_len:
    raise ValueError(f"sequence length {seq_len} exceeds the position table "
                     f"(max_len={config.max_len}); split the input into windows of at most "
                     f"{config.max_len} tokens or build the model with a larger max_len.")
  try:
    values = np.asarray(ids)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return  # traced (under jit): values are unknown here; the data pipeline checked them
  lo, hi = int(values.min()), int(values.max())
  if lo < 0 or hi >= config.vocab_size:
    bad = values[(values < 0) | (values >= config.vocab_size)]
    raise ValueError(f"token ids must lie in [0, vocab_size={config.vocab_size}); found "
                     f"{bad.size} out of range (e.g. {int(bad[0])}, min {lo}, max {hi}). Map "
                     f"unknown words to <unk>=1 with the tokenizer, or build the model with a "
                     f"larger vocab_size.")


class SelfAttention(nn.Module):
  """Multi-head self-attention returning its (post-dropout) weights for the metrics.

  With `need_weights=False` and no dropout on the weights in effect (attention_dropout 0, or
  evaluation), it runs fused (`jax.nn.dot_product_attention`) and returns None for weights.
  """
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BTD, train: bool, need_weights: bool = True):
    cfg = self.config
    b, t, d = x_BTD.shape
    proj = lambda name: torch_linear(d, d, name, cfg.dtype)
    split = lambda z: z.reshape(b, t, cfg.num_heads, cfg.head_dim)
    q, k, v = (split(proj(n)(x_BTD)) for n in ("q_proj", "k_proj", "v_proj"))
    if not need_weights and (not train or cfg.attn_dropout == 0):
      impl = fused_attention_impl(cfg, q.dtype, t)
      if impl == "pallas":
        out = pallas_attention(q, k, v, 1.0 / math.sqrt(cfg.head_dim), cfg.causal,
                               interpret=jax.default_backend() != "gpu")
      else:
        out = jax.nn.dot_product_attention(q, k, v, scale=1.0 / math.sqrt(cfg.head_dim),
                                           is_causal=cfg.causal, implementation=impl)
      return proj("out_proj")(out.reshape(b, t, d)), None
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(cfg.head_dim)
    if cfg.causal:
      # an additive -inf above the diagonal, not a select: the softmax gives those entries
      # exactly 0 either way (a row keeps its diagonal), and the backward pass of an add is
      # the identity where a select's is another select over [B, H, T, T]
      future = np.triu(np.full((t, t), -np.inf, np.float32), k=1)
      scores = scores + future
    w = jax.nn.softmax(scores, axis=-1)
    w = Dropout(cfg.attn_dropout, deterministic=not train, bits=cfg.dropout_bits)(w)
    out = jnp.einsum("bhqk,bkhd->bqhd", w.astype(cfg.dtype), v).reshape(b, t, d)
    return proj("out_proj")(out), w


class Block(nn.Module):
  """One post-LayerNorm layer: h = LN1(h + attn(h)); h = LN2(h + FF(h))."""
  config: ModelConfig

  @nn.compact
  def __call__(self, h, train: bool, need_weights: bool = True):
    cfg = self.config
    d = cfg.hidden_dim
    norm = lambda name: nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, dtype=cfg.dtype,
                                     name=name)
    attn, w = SelfAttention(cfg, name="attention")(h, train, need_weights)
    # named: an unnamed Dropout here would take the name Dropout_0 from the feed-forward
    # dropouts below, and with it their random streams (flax folds the module path in)
    attn = Dropout(cfg.residual_dropout, deterministic=not train, bits=cfg.dropout_bits,
                   name="residual_dropout")(attn)
    h = norm("ln1")(h + attn)
    ff = torch_linear(4 * d, d, "ff_in", cfg.dtype)(h)
    ff = nn.gelu(ff, approximate=False)
    ff = Dropout(cfg.dropout, deterministic=not train, bits=cfg.dropout_bits)(ff)
    ff = torch_linear(d, 4 * d, "ff_out", cfg.dtype)(ff)
    ff = Dropout(cfg.dropout, deterministic=not train, bits=cfg.dropout_bits)(ff)
    return norm("ln2")(h + ff), w


# what a rematerialised layer keeps for the backward pass (ModelConfig.remat_policy)
REMAT_POLICIES = {"nothing": jax.checkpoint_policies.nothing_saveable,
                  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def layer_class(cfg: ModelConfig):
  """Block, or Block under `nn.remat` with cfg.remat_policy where cfg.remat is set."""
  if not cfg.remat:
    return Block
  return nn.remat(Block, static_argnums=(2, 3), policy=REMAT_POLICIES[cfg.remat_policy])


class _ScanLayer(nn.Module):
  """One layer and its exploration noise: the body of the scan over layers (scan_layers)."""
  config: ModelConfig
  train: bool
  need_weights: bool

  @nn.compact
  def __call__(self, h, scale):
    cfg = self.config
    h, w = layer_class(cfg)(cfg, name="block")(h, self.train, self.need_weights)
    if self.train and cfg.exploration:
      noise = jax.random.normal(self.make_rng("explore"), h.shape, jnp.float32)
      h = h + (noise * scale).astype(h.dtype)
    return h, w


def stack_layers(params) -> dict:
  """Unrolled parameters (params['layers_i']) -> the scan_layers layout (params['layers']
  ['block'] with a leading layer axis). Exact: only arrays are stacked."""
  params = dict(params)
  names = sorted((k for k in params if k.startswith("layers_")), key=lambda k: int(k[7:]))
  if not names:
    raise ValueError("these parameters have no layers_0, layers_1, ...: already stacked?")
  layers = [params.pop(k) for k in names]
  params["layers"] = {"block": jax.tree_util.tree_map(lambda *x: jnp.stack(x), *layers)}
  return params


def unstack_layers(params) -> dict:
  """The inverse of `stack_layers`: the scan_layers layout -> params['layers_i']."""
  params = dict(params)
  if "layers" not in params:
    return params
  block = params.pop("layers")["block"]
  n = jax.tree_util.tree_leaves(block)[0].shape[0]
  for i in range(n):
    params[f"layers_{i}"] = jax.tree_util.tree_map(lambda x, i=i: x[i], block)
  return params


class InfinitoV52(nn.Module):
  """INFINITO V5.2: post-LN transformer LM with priority memory, metrics and exploration.

  __call__(ids [B, T] int, train=False, with_metrics=False) -> (logits [B, T, V] float32, metrics)

  `metrics` is None unless with_metrics; then it holds the scalars integration_phi, coherence,
  complexity, pattern_diversity, memory_utilization and `per_example`, a dict of [B] arrays.
  The layer-averaged attention [B, H, T, T] is sown into the `intermediates` collection as
  `avg_attention` when metrics are computed. Training needs rngs {'dropout', 'explore'}.
  """
  config: ModelConfig

  @nn.compact
  def __call__(self, ids, train: bool = False, with_metrics: bool = False,
               return_hidden: bool = False):
    """`return_hidden`: return the final hidden states [B, T, D] instead of the logits (the
    output projection is left to the caller: loss.chunked_token_cross_entropy)."""
    cfg = self.config
    check_ids(ids, cfg)
    if train and not self.is_initializing():
      needed = (["dropout"] * (max(cfg.dropout, cfg.attn_dropout, cfg.embed_dropout,
                                   cfg.residual_dropout) > 0) + ["explore"] * cfg.exploration)
      missing = [s for s in needed if not self.has_rng(s)]
      if missing:
        raise ValueError(f"train=True needs PRNG keys for {missing}: pass "
                         f"rngs={{'dropout': k1, 'explore': k2}} to apply (or train=False).")
    t = ids.shape[1]
    embed = nn.Embed(cfg.vocab_size, cfg.hidden_dim, embedding_init=nn.initializers.normal(1.0),
                     dtype=cfg.dtype, name="token_embedding")
    pos = self.param("position_embedding",
                     lambda key, shape: 0.02 * jax.random.normal(key, shape, jnp.float32),
                     (cfg.max_len, cfg.hidden_dim))
    h = embed(ids) + pos[:t].astype(cfg.dtype)[None]
    h = Dropout(cfg.embed_dropout, deterministic=not train, bits=cfg.dropout_bits,
                name="embed_dropout")(h)
    scale = self.param("adaptive_scale", lambda key: jnp.asarray(cfg.noise_scale, jnp.float32))

    attn_maps = []
    need_weights = with_metrics or self.is_initializing()
    if cfg.scan_layers:
      layers = nn.scan(_ScanLayer, variable_axes={"params": 0},
                       split_rngs={"params": True, "dropout": True, "explore": True},
                       in_axes=nn.broadcast, length=cfg.num_layers)
      h, stacked = layers(cfg, train, need_weights, name="layers")(h, scale)
      attn_maps = list(stacked) if need_weights else []
    block = layer_class(cfg)
    for i in range(0 if cfg.scan_layers else cfg.num_layers):
      h, w = block(cfg, name=f"layers_{i}")(h, train, need_weights)
      attn_maps.append(w)
      if train and cfg.exploration:
        noise = jax.random.normal(self.make_rng("explore"), h.shape, jnp.float32)
        h = h + (noise * scale).astype(h.dtype)

    batch = ids.shape[0]
    level = jnp.ones((batch,), jnp.float32)
    per_example = None
    if with_metrics or self.is_initializing():
      avg_attention = jnp.mean(jnp.stack(attn_maps), axis=0)
      per_example = IntegrationMetrics(cfg.hidden_dim, name="iit_metrics")(h, avg_attention)
      if with_metrics:
        self.sow("intermediates", "avg_attention", avg_attention)
        level = jax.lax.stop_gradient(per_example["phi_estimate"])

    memory = PriorityMemory(cfg.hidden_dim, cfg.memory_slots, cfg.slot_size, name="memory")
    query = jax.lax.stop_gradient(jnp.mean(h.astype(jnp.float32), axis=1))
    fused = memory.causal_read(h) if cfg.fuse_memory else None
    if not cfg.fuse_memory and self.is_initializing():
      memory.touch_unused(query)
    # rows of padding alone (id 0: the data fills a split's last batch with them) are no
    # examples: the original's last batch is short, so they must not move the memory
    real = jnp.any(ids != 0, axis=1).astype(jnp.float32)
    read = memory.read(query, level, real)  # the original discards read.content
    phi_value = row_mean(level, real) if with_metrics else 0.0
    memory.write(query, query, level, phi_value, real)
    if fused is not None:
      h = h + fused.astype(h.dtype)
    if return_hidden and not self.is_initializing():
      return h, None

    logits = torch_linear(cfg.vocab_size, cfg.hidden_dim, "output_projection", cfg.dtype)(h)
    logits = logits.astype(jnp.float32)
    if not with_metrics:
      return logits, None
    metrics = {
        "integration_phi": jnp.mean(per_example["phi_estimate"]),
        "coherence": jnp.mean(per_example["coherence"]),
        "complexity": jnp.mean(per_example["complexity"]),
        "pattern_diversity": jnp.mean(per_example["pattern_diversity"]),
        "memory_utilization": read.utilization,
        "per_example": {k: per_example[k] for k in PER_EXAMPLE},
    }
    return logits, metrics
