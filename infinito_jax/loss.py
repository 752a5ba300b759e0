"""The language-model loss: token cross-entropy over targets != 0 (id 0 is padding)."""

import jax
import jax.numpy as jnp
import optax


def token_cross_entropy(logits_BTV, targets_BT):
  """Returns (summed loss, number of counted tokens) over targets != 0.

  Sums, not means: eval aggregates them over a whole split so that perplexity is
  exp(total loss / total tokens), token-weighted, not a mean of batch means.
  """
  losses = optax.softmax_cross_entropy_with_integer_labels(logits_BTV.astype(jnp.float32),
                                                           targets_BT)
  weights = (targets_BT != 0).astype(jnp.float32)
  return jnp.sum(losses * weights), jnp.sum(weights)


def chunked_token_cross_entropy(h_BTD, kernel_DV, bias_V, targets_BT, chunk: int,
                                dtype=jnp.float32):
  """token_cross_entropy(h @ kernel + bias, targets), `chunk` positions at a time.

  The output projection and the cross-entropy run over [B, chunk] slices of the sequence in a
  `lax.map` whose body is rematerialised: the [B, T, V] logits (and their float32 copy, and the
  softmax the backward pass needs) are never held whole, only [B, chunk, V] at a time. The
  projection is computed as nn.Dense(dtype=dtype) computes it, so the result is the unchunked
  loss to float rounding. T must be a multiple of `chunk`.
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
    return token_cross_entropy(logits, tg)

  totals, counts = jax.lax.map(one, (hs, ts))
  return jnp.sum(totals), jnp.sum(counts)


def mean_token_cross_entropy(logits_BTV, targets_BT):
  """The original's training loss: mean over targets != 0 (0 when a batch has no targets)."""
  total, count = token_cross_entropy(logits_BTV, targets_BT)
  return total / jnp.maximum(count, 1.0)
