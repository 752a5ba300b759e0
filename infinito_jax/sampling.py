"""Sampling text from a model: one jitted loop, vmapped over replicas and keys, cached per shape.

The model is causal, so the not-yet-written tail of a fixed-length buffer cannot influence the
position being sampled, and nothing recompiles per token; the compiled sampler is cached per
(model config, length, vocabulary, greedy or not, top-k), so sampling at every validation of a
run, for every variant of a study, or at every temperature of a sweep, compiles once.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from infinito_jax.model import InfinitoV52, ModelConfig
from infinito_jax.tokenizer import PAD


# the temperatures (besides 0, greedy) that float32 logits can be divided by: a smaller one
# overflows them (1e-30: logits up to 3e8 stay finite), a larger one is inf in float32
TEMPERATURES = (1e-30, float(np.finfo(np.float32).max))


def sampler(model_cfg: ModelConfig, length: int, num_words: int, temperature: float,
            top_k: int):
  """A jitted `sample(variables [N, ...], buf [length], start, keys [K]) -> ids [N, K, length]`.

  Positions `start..length-1` of `buf` are sampled, each from the logits of the position
  before it; <pad> and ids >= `num_words` (ids the tokenizer has no word for) are never drawn.
  Temperature 0 is greedy; `top_k` > 0 samples among the k likeliest words. The temperature is
  an argument of the compiled program, not part of it: a sweep over temperatures compiles once.
  """
  compiled = _sampler(model_cfg, int(length), int(num_words), float(temperature) == 0,
                      int(top_k))
  t = jnp.float32(temperature)
  return lambda variables, buf, start, keys: compiled(variables, buf, start, keys, t)


@functools.lru_cache(maxsize=64)
def _sampler(model_cfg, length, num_words, greedy, top_k):
  model = InfinitoV52(model_cfg)

  def one(variables, buf, start, key, temperature):
    def body(i, carry):
      buf, key = carry
      logits, _ = model.apply(variables, buf[None])
      logits = jax.lax.dynamic_index_in_dim(logits[0], i - 1, keepdims=False)
      ids = jnp.arange(logits.shape[-1])
      logits = jnp.where((ids == PAD) | (ids >= num_words), -jnp.inf, logits)
      key, sub = jax.random.split(key)
      if greedy:
        tok = jnp.argmax(logits)
      else:
        logits = logits / temperature
        if top_k:
          logits = jnp.where(logits < jax.lax.top_k(logits, top_k)[0][-1], -jnp.inf, logits)
        tok = jax.random.categorical(sub, logits)
      return buf.at[i].set(tok.astype(buf.dtype)), key

    return jax.lax.fori_loop(start, length, body, (buf, key))[0]

  over_keys = jax.vmap(one, in_axes=(None, None, None, 0, None))
  return jax.jit(jax.vmap(over_keys, in_axes=(0, None, None, None, None)))
