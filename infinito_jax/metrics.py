"""Integration metrics of the original: heuristic statistics of hidden states and attention.

"Integration", "phi" and "coherence" are the original's names; they are statistics of
activations, nothing more. All are computed in float32, per example, fully traced (the
original's `.item()` calls become array values), and cost nothing unless asked for.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from infinito_jax.layers import l2_normalize, torch_linear

PER_EXAMPLE = ("phi_estimate", "coherence", "complexity", "pattern_diversity",
               "activation_entropy")


def _unbiased_var(x_BN):
  """Variance over the last axis, divided by N - 1 like torch.var. Of a single number (phi's
  at T = 1 where hidden_dim // 2 = 1) 0, not the original's NaN, which the memory would keep."""
  n = x_BN.shape[-1]
  if n == 1:
    return jnp.zeros(x_BN.shape[:-1], x_BN.dtype)
  mean = jnp.mean(x_BN, axis=-1, keepdims=True)
  return jnp.sum(jnp.square(x_BN - mean), axis=-1) / (n - 1)


def phi_estimate(p_BTK):
  """phi from the projected states p = phi_projector(h) [B, T, D/2] (SPEC: phi)."""
  b, t, k = p_BTK.shape
  n = l2_normalize(p_BTK)
  trace = jnp.sum(jnp.square(n), axis=(1, 2)) / t  # trace(n^T n / T)
  if t > 1:
    m = t // 2
    integration = jnp.abs(jnp.sum(n[:, :m] * n[:, m:2 * m], axis=(1, 2)) / (m * k))
  else:
    integration = jnp.ones((b,), p_BTK.dtype)
  variance = _unbiased_var(p_BTK.reshape(b, t * k))
  return jnp.clip(2.0 * (0.4 * trace + 0.4 * integration + 0.2 * variance), 0.0, 10.0)


def coherence(attn_BHTT):
  """1 - mean attention entropy / log(number of keys), heads averaged first (SPEC: coherence).

  With a single key the entropy bound log(1) is 0; the original divides by it, here the
  (trivially perfect) coherence 1 is returned instead.
  """
  a = jnp.mean(attn_BHTT, axis=1)
  keys = a.shape[-1]
  if keys == 1:
    return jnp.ones(a.shape[:1], a.dtype)
  ent = -jnp.sum(a * jnp.log(a + 1e-6), axis=-1)
  return 1.0 - jnp.mean(ent, axis=-1) / math.log(keys)


def complexity_stats(c_BTK):
  """complexity, pattern_diversity, activation_entropy from c = complexity_analyzer(h)."""
  b, t, k = c_BTK.shape
  nc = l2_normalize(c_BTK)
  complexity = _unbiased_var(nc.reshape(b, t * k))
  sim = jnp.einsum("btk,bsk->bts", nc, nc) / (t + 1e-6)
  diversity = jnp.mean((sim < 0.8).astype(jnp.float32), axis=(1, 2))
  sm = jax.nn.softmax(c_BTK, axis=-1)
  entropy = jnp.mean(-jnp.sum(sm * jnp.log(sm + 1e-6), axis=-1), axis=-1)
  return complexity, diversity, entropy


class IntegrationMetrics(nn.Module):
  """The original's `iit_metrics`: two projection heads and the statistics above.

  Returns a dict of per-example arrays [B] named as in PER_EXAMPLE.
  """
  hidden_dim: int

  @nn.compact
  def __call__(self, h_BTD, attn_BHTT):
    d = self.hidden_dim
    h = h_BTD.astype(jnp.float32)
    p = torch_linear(d // 2, d, "phi_projector")(h)
    c = torch_linear(64, d, "complexity_analyzer")(h)
    complexity, diversity, entropy = complexity_stats(c)
    return dict(phi_estimate=phi_estimate(p),
                coherence=coherence(attn_BHTT.astype(jnp.float32)),
                complexity=complexity,
                pattern_diversity=diversity,
                activation_entropy=entropy)
