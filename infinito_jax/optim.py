"""The optimizer of the original recipe: global-norm clipping, AdamW and cosine annealing."""

import functools
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
    return _clipped(updates, optax.tree.norm(updates), max_norm), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def _clipped(grads, norm, max_norm: float):
  """grads * min(1, max_norm / (norm + 1e-6)), each in its own dtype: torch's clip."""
  coef = jnp.minimum(1.0, max_norm / (norm + 1e-6))
  return jax.tree_util.tree_map(lambda g: (g * coef).astype(g.dtype), grads)


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


def scale_by_adam_where(live, b1: float, b2: float, eps: float) -> optax.GradientTransformation:
  """optax.scale_by_adam (eps_root 0, no nesterov), the same arithmetic through optax's own
  helpers, with its moments and count kept as they were where `live` (a traced bool) is False.

  The kept moments are what the step's update is computed from, so a frozen replica's moments
  are updated in place by one select: a select on optax's outputs instead (its update reads
  the new moments, the select the old ones) made XLA copy the moments and parameters every
  step (demo preset, 4 replicas on XLA:CPU: 158 MiB more copied, 2% slower). A frozen
  replica's update is garbage, discarded by the caller's select on the parameters."""

  def init_fn(params):
    return optax.scale_by_adam(b1, b2, eps).init(params)

  def update_fn(updates, state, params=None):
    del params
    keep = functools.partial(jax.tree_util.tree_map, lambda new, old: jnp.where(live, new, old))
    mu = keep(optax.tree.update_moment(updates, state.mu, b1, 1), state.mu)
    nu = keep(optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2), state.nu)
    count_inc = jnp.where(live, optax.safe_increment(state.count), state.count)
    mu_hat = optax.tree.bias_correction(mu, b1, count_inc)
    nu_hat = optax.tree.bias_correction(nu, b2, count_inc)
    updates = jax.tree_util.tree_map(lambda m, v: m / (jnp.sqrt(v + 0.0) + eps), mu_hat, nu_hat)
    return updates, optax.ScaleByAdamState(count=count_inc, mu=mu,
                                           nu=optax.tree.cast_like(nu, state.nu))

  return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(learning_rate: float | Callable, config: ModelConfig, params, *,
                   weight_decay: float = 0.01, clip_norm: float = 1.0, b1: float = 0.9,
                   b2: float = 0.999, eps: float = 1e-8) -> optax.GradientTransformation:
  """chain(torch-style clip, AdamW) with torch's defaults, masked to the trained parameters.

  An optax transformation like any other (init; update per leaf). Its `update.forms` holds the
  same step in other forms for the train step (apply_step): {'norm': norm_step, 'vectors':
  vector_step}; `update.freezing(live)` each form ('leaves' too) with `live`, a function of the
  step's global gradient norm giving a traced bool: where it is False, Adam's moments and count
  stay as they were (scale_by_adam_where: train.on_divergence='freeze')."""
  mask = trained_mask(params, config)

  def adamw(live=None):  # optax.adamw, or its chain with the moments kept where not `live`
    if live is None:
      return optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    return optax.chain(scale_by_adam_where(live, b1, b2, eps),
                       optax.add_decayed_weights(weight_decay),
                       optax.scale_by_learning_rate(learning_rate))

  inner = adamw()
  masked = optax.masked(inner, mask)
  tx = optax.chain(clip_by_global_norm_torch(clip_norm), masked)

  def update(updates, state, params=None, **extra_args):
    return tx.update(updates, state, params, **extra_args)

  update.forms = {
      "norm": functools.partial(norm_step, masked=masked, clip_norm=clip_norm),
      "vectors": functools.partial(vector_step, inner=inner, mask=mask, clip_norm=clip_norm)}

  def freezing(live):
    def inner_for(norm):
      kept = adamw(live(norm))
      return kept, optax.masked(kept, mask)

    return {"leaves": functools.partial(leaves_step, masked=masked, clip_norm=clip_norm,
                                        inner_for=inner_for),
            "norm": functools.partial(norm_step, masked=masked, clip_norm=clip_norm,
                                      inner_for=inner_for),
            "vectors": functools.partial(vector_step, inner=inner, mask=mask,
                                         clip_norm=clip_norm, inner_for=inner_for)}

  update.freezing = freezing
  return optax.GradientTransformationExtraArgs(tx.init, update)


# How the train step applies the optimizer (apply_step); INFINITO_OPTIMIZER_FORM chooses.
OPTIMIZER_FORMS = ("auto", "leaves", "norm", "vectors")


def apply_step(tx: optax.GradientTransformation, form: str, grads, opt_state, params,
               live=None):
  """One optimizer step and optax.apply_updates: (params, opt_state, global gradient norm).

  `form` (train.optimizer_form): 'leaves', optax's transformation leaf by leaf; 'norm', the
  same with the global norm over all gradients as one vector (norm_step); 'vectors', all of
  it on vectors (vector_step). The three equal each other to float rounding (only the order
  in which the norm sums its squares differs). A transformation without these forms (not
  made by make_optimizer) always runs leaf by leaf.

  `live` (train.on_divergence='freeze'): a function of the form's gradient norm giving a
  traced bool; where it is False, Adam's moments and count are kept (make_optimizer's
  `update.freezing`); the caller keeps the parameters."""
  if live is not None:
    if not hasattr(tx.update, "freezing"):
      raise TypeError("apply_step(live=...): build the optimizer with make_optimizer")
    return tx.update.freezing(live)[form](grads, opt_state, params)
  step = getattr(tx.update, "forms", {}).get(form)
  if step is not None:
    return step(grads, opt_state, params)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, optax.tree.norm(grads)


def _flat(leaves):
  return jnp.concatenate([jnp.ravel(x) for x in leaves])


def _split(flat, like):
  """The inverse of _flat: pieces of `flat` shaped like the arrays of `like`."""
  sizes = [x.size for x in like]
  offsets = [sum(sizes[:i]) for i in range(1, len(sizes))]
  return [piece.reshape(x.shape) for piece, x in zip(jnp.split(flat, offsets), like)]


def leaves_step(grads, opt_state, params, *, masked, clip_norm: float, inner_for=None):
  """make_optimizer's step leaf by leaf, as its chain (clip, masked AdamW) computes it, with
  `inner_for(norm)` -> (inner, masked) choosing the AdamW from the gradient norm (freezing)."""
  return _leaf_update(grads, opt_state, params, optax.tree.norm(grads), masked, clip_norm,
                      inner_for)


def norm_step(grads, opt_state, params, *, masked, clip_norm: float, inner_for=None):
  """make_optimizer's step with the global norm of the gradients taken over them as one
  vector: leaf by leaf, XLA:GPU reduces each of the ~100 leaves in kernels of its own (about
  110 fewer kernels at the full preset, for one copy of the gradients); the update itself
  stays per leaf, in place. `inner_for`: as leaves_step's."""
  norm = jnp.sqrt(jnp.sum(jnp.square(_flat(jax.tree_util.tree_leaves(grads)))))
  return _leaf_update(grads, opt_state, params, norm, masked, clip_norm, inner_for)


def _leaf_update(grads, opt_state, params, norm, masked, clip_norm: float, inner_for):
  """The clip by `norm` and the masked AdamW update, leaf by leaf (leaves_step, norm_step)."""
  if inner_for is not None:
    masked = inner_for(norm)[1]
  clipped = _clipped(grads, norm, clip_norm)
  clip_state, masked_state = opt_state
  updates, masked_state = masked.update(clipped, masked_state, params)
  return optax.apply_updates(params, updates), (clip_state, masked_state), norm


def vector_step(grads, opt_state, params, *, inner, mask, clip_norm: float, inner_for=None):
  """make_optimizer's step on the trained parameters, their gradients and Adam's moments each
  concatenated into one vector: optax's own AdamW on the vectors, so the same arithmetic per
  element, and the same optimizer-state structure in and out. The fewest kernels (about 270
  fewer than per leaf at the full preset), for a copy of the parameters, gradients and both
  moments in and out of the vectors every step."""
  p_leaves, treedef = jax.tree_util.tree_flatten(params)
  g_leaves = treedef.flatten_up_to(grads)
  trained = treedef.flatten_up_to(mask)
  clip_state, masked_state = opt_state
  adam, *rest = masked_state.inner_state
  mu_leaves, mu_def = jax.tree_util.tree_flatten(adam.mu)
  if not isinstance(adam, optax.ScaleByAdamState) or len(mu_leaves) != sum(trained):
    raise TypeError(f"vector_step: unexpected optimizer state {type(adam).__name__}; build "
                    "the optimizer with make_optimizer")
  nu_leaves = mu_def.flatten_up_to(adam.nu)
  on = [i for i, t in enumerate(trained) if t]
  off = [i for i, t in enumerate(trained) if not t]
  p_on = [p_leaves[i] for i in on]
  flat_g = _flat([g_leaves[i] for i in on])
  # untrained parameters have no gradient (exact zeros), but the per-leaf clip counts them
  sq = jnp.sum(jnp.square(flat_g))
  if off:
    sq = sq + jnp.sum(jnp.square(_flat([g_leaves[i] for i in off])))
  norm = jnp.sqrt(sq)
  if inner_for is not None:  # as leaves_step's
    inner = inner_for(norm)[0]
  flat_p = _flat(p_on)
  state = (adam._replace(mu=_flat(mu_leaves), nu=_flat(nu_leaves)), *rest)
  updates, (new_adam, *new_rest) = inner.update(_clipped(flat_g, norm, clip_norm), state, flat_p)
  new_p = list(p_leaves)
  for i, x in zip(on, _split(optax.apply_updates(flat_p, updates), p_on)):
    new_p[i] = x
  for i in off:  # optax.masked passes their (clipped) gradient through: p + 0
    new_p[i] = optax.apply_updates(p_leaves[i], _clipped(g_leaves[i], norm, clip_norm))
  new_adam = new_adam._replace(
      mu=jax.tree_util.tree_unflatten(mu_def, _split(new_adam.mu, mu_leaves)),
      nu=jax.tree_util.tree_unflatten(mu_def, _split(new_adam.nu, nu_leaves)))
  opt_state = (clip_state, masked_state._replace(inner_state=(new_adam, *new_rest)))
  return jax.tree_util.tree_unflatten(treedef, new_p), opt_state, norm
