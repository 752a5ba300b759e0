"""Small building blocks shared by the model, the memory and the metrics: torch-initialised layers."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp


def torch_uniform(fan_in: int):
  """torch.nn.Linear's default init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), for kernel and bias."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def torch_linear(features: int, fan_in: int, name: str, dtype=jnp.float32) -> nn.Dense:
  """A Dense layer initialised like torch.nn.Linear(fan_in, features); kernel is [in, out]."""
  init = torch_uniform(fan_in)
  return nn.Dense(features, kernel_init=init, bias_init=init, dtype=dtype, name=name)


def l2_normalize(x, eps: float = 1e-12):
  """torch.nn.functional.normalize(x, dim=-1): x / max(||x||, eps)."""
  norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
  return x / jnp.maximum(norm, eps)
