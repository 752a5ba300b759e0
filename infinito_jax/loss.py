"""The language-model loss: token cross-entropy over targets != 0 (id 0 is padding)."""

import jax
import jax.numpy as jnp
import optax


# How the loss's gradient with respect to the logits is computed (token_cross_entropy's `grad`):
# 'fused' (softmax - one-hot in one elementwise pass, _token_losses) or 'autodiff' (JAX's
# derivative of optax's loss: a scatter-add of the targets' one-hot over a zeroed [B, T, V]
# buffer, and a separate product). The same forward, bitwise; gradients equal to float rounding.
LOSS_GRADIENT_FORMS = ("fused", "autodiff")


@jax.custom_jvp
def _token_losses(logits, targets):
  """optax's softmax cross-entropy of float32 `logits` against integer `targets`, per token,
  whose derivative is written out: d loss = sum((softmax - onehot) * d logits). Its transpose,
  the backward pass, is one elementwise pass over the logits, which XLA fuses with the
  float32 cast and the bias gradient; JAX's own derivative of the same function scatters the
  one-hot into a zeroed [B, T, V] buffer and multiplies in passes of their own (bench/
  gpu_aot.py's traffic_mib_per_step: 13764 against 15014 MiB per step in the full preset,
  bfloat16, fused attention)."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


@_token_losses.defjvp
def _token_losses_jvp(primals, tangents):
  logits, targets = primals
  x = logits.astype(jnp.float32)
  label = jnp.take_along_axis(x, targets[..., None], axis=-1)[..., 0]  # as optax computes it
  lse = jax.nn.logsumexp(x, axis=-1)
  onehot = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1) == targets[..., None]
  slope = jnp.exp(x - lse[..., None]) - onehot.astype(jnp.float32)
  return lse - label, jnp.sum(slope * tangents[0].astype(jnp.float32), axis=-1)


def token_cross_entropy(logits_BTV, targets_BT, grad: str = "autodiff"):
  """Returns (summed loss, number of counted tokens) over targets != 0.

  Sums, not means: eval aggregates them over a whole split so that perplexity is
  exp(total loss / total tokens), token-weighted, not a mean of batch means. `grad`: how its
  gradient is computed (LOSS_GRADIENT_FORMS; the Trainer takes train.loss_gradient_form's);
  the value is the same either way.
  """
  if grad == "fused":
    losses = _token_losses(logits_BTV, targets_BT)
  elif grad == "autodiff":
    losses = optax.softmax_cross_entropy_with_integer_labels(logits_BTV.astype(jnp.float32),
                                                             targets_BT)
  else:
    raise ValueError(f"token_cross_entropy: grad={grad!r}; use one of {LOSS_GRADIENT_FORMS}")
  weights = (targets_BT != 0).astype(jnp.float32)
  return jnp.sum(losses * weights), jnp.sum(weights)


def chunked_token_cross_entropy(h_BTD, kernel_DV, bias_V, targets_BT, chunk: int,
                                dtype=jnp.float32, grad: str = "autodiff"):
  """token_cross_entropy(h @ kernel + bias, targets), `chunk` positions at a time.

  The output projection and the cross-entropy run over [B, chunk] slices of the sequence in a
  `lax.map` whose body is rematerialised: the [B, T, V] logits (and their float32 copy, and the
  softmax the backward pass needs) are never held whole, only [B, chunk, V] at a time. The
  projection is computed as nn.Dense(dtype=dtype) computes it, so the result is the unchunked
  loss to float rounding. T must be a multiple of `chunk`. `grad`: as token_cross_entropy's.
  """
  b, t, d = h_BTD.shape
  if t % chunk:
    raise ValueError(f"sequence length {t} is not a multiple of the loss chunk {chunk}")
  n = t // chunk
  hs = jnp.moveaxis(h_BTD.reshape(b, n, chunk, d), 1, 0)  # [n, B, chunk, D]: rows stay put
  ts = jnp.moveaxis(targets_BT.reshape(b, n, chunk), 1, 0)

  @jax.checkpoint
  def one(args):
    h, tg = args
    logits = (jnp.dot(h.astype(dtype), kernel_DV.astype(dtype))
              + bias_V.astype(dtype)).astype(jnp.float32)
    return token_cross_entropy(logits, tg, grad)

  totals, counts = jax.lax.map(one, (hs, ts))
  return jnp.sum(totals), jnp.sum(counts)


def mean_token_cross_entropy(logits_BTV, targets_BT):
  """The original's training loss: mean over targets != 0 (0 when a batch has no targets)."""
  total, count = token_cross_entropy(logits_BTV, targets_BT)
  return total / jnp.maximum(count, 1.0)
