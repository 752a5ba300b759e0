"""The language-model loss: token cross-entropy over targets != 0 (id 0 is padding)."""

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


def mean_token_cross_entropy(logits_BTV, targets_BT):
  """The original's training loss: mean over targets != 0 (0 when a batch has no targets)."""
  total, count = token_cross_entropy(logits_BTV, targets_BT)
  return total / jnp.maximum(count, 1.0)
