"""The optimizer of the original recipe: global-norm clipping, AdamW and cosine annealing."""

from collections.abc import Callable

import flax
import jax
import jax.numpy as jnp
import optax

from infinito_jax.model import ModelConfig


def clip_by_global_norm_torch(max_norm: float) -> optax.GradientTransformation:
  """torch.nn.utils.clip_grad_norm_: g * min(1, max_norm / (||g|| + 1e-6)).

  optax.clip_by_global_norm omits the 1e-6; this keeps the original's numbers exactly.
  """

  def update_fn(updates, state, params=None):
    del params
    norm = optax.tree.norm(updates)
    coef = jnp.minimum(1.0, max_norm / (norm + 1e-6))
    return jax.tree_util.tree_map(lambda g: (g * coef).astype(g.dtype), updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def cosine_schedule(learning_rate: float, min_learning_rate: float, decay_steps: int,
                    warmup_steps: int = 0) -> optax.Schedule:
  """torch CosineAnnealingLR(T_max=decay_steps, eta_min=min_learning_rate) stepped per batch,
  optionally after a linear warmup from 0 (then the cosine starts at the end of warmup)."""
  if decay_steps < 1:
    raise ValueError(f"cosine decay_steps must be >= 1, got {decay_steps}.")
  cosine = optax.cosine_decay_schedule(learning_rate, decay_steps,
                                       alpha=min_learning_rate / learning_rate)
  if warmup_steps <= 0:
    return cosine
  warmup = optax.linear_schedule(0.0, learning_rate, warmup_steps)
  return optax.join_schedules([warmup, cosine], [warmup_steps])


def trained_mask(params, config: ModelConfig):
  """True for parameters the loss reaches; False for those it never does.

  torch's AdamW skips parameters whose gradient is None entirely (no weight decay either),
  while optax would decay them; the mask keeps them untouched as the original does. Untrained:
  the metric heads, the write controller and content processor always; the read controller
  and importance enhancer unless the memory read is fused; the exploration scale when
  exploration is off.
  """
  untrained = {("iit_metrics",), ("memory", "write_controller"), ("memory", "content_processor")}
  if not config.exploration:
    untrained.add(("adaptive_scale",))
  if not config.fuse_memory:
    untrained |= {("memory", "read_controller"), ("memory", "importance_enhancer")}
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  mask = {k: not any(k[:len(u)] == u for u in untrained) for k in flat}
  return flax.traverse_util.unflatten_dict(mask)


def make_optimizer(learning_rate: float | Callable, config: ModelConfig, params, *,
                   weight_decay: float = 0.01, clip_norm: float = 1.0, b1: float = 0.9,
                   b2: float = 0.999, eps: float = 1e-8) -> optax.GradientTransformation:
  """chain(torch-style clip, AdamW) with torch's defaults, masked to the trained parameters."""
  mask = trained_mask(params, config)
  return optax.chain(
      clip_by_global_norm_torch(clip_norm),
      optax.masked(optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay),
                   mask))
