"""The priority memory: slots read by attention-like addressing and overwritten by priority.

The slot matrix, ages, importances, access counts and the utilization tracker are mutable
state in the `memory` variable collection (the original keeps them as buffers). Every forward
pass computes their update; it is stored only where the caller made `memory` mutable, so
`model.apply(variables, ids)` without `mutable=` is a pure read-only inference call.
"""

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from infinito_jax.layers import torch_linear

MEMORY = "memory"  # the variable collection that holds the state


def row_mean(x_B, real_B):
  """The mean over the real rows (real_B: 1.0 for a row of the batch, 0.0 for a row of padding
  the data added to fill the last batch); with every row real, jnp.mean's value, bitwise."""
  n = jnp.sum(real_B)
  return jnp.sum(x_B * real_B.reshape(real_B.shape + (1,) * (x_B.ndim - 1)), axis=0) / \
      jnp.maximum(n, 1.0)


class ReadResult(NamedTuple):
  content: jax.Array  # [B, slot_size] the weighted slot contents
  weights: jax.Array  # [B, S] normalized read weights
  utilization: jax.Array  # [] the tracker after this read


def read_weights(logits_BS, importance_S):
  """softmax over slots, scaled by slot importance and renormalized (SPEC: memory read)."""
  r = jax.nn.softmax(logits_BS.astype(jnp.float32), axis=-1)
  w = r * importance_S[None, :]
  return w / (jnp.sum(w, axis=-1, keepdims=True) + 1e-6)


def write_slot(importance_S, access_S, age_S):
  """The slot the priority write replaces: argmax of the score, first index on ties."""
  score = (-importance_S - 0.1 * access_S / (jnp.max(access_S) + 1e-6)
           + 0.05 * age_S / (jnp.max(age_S) + 1e-6))
  return jnp.argmax(score)


class PriorityMemory(nn.Module):
  """External memory with importance/age/access-count replacement (SPEC: memory read / write).

  Attributes:
    hidden_dim: D, the width of the queries and contents.
    slots: S, the number of memory slots.
    slot_size: width of one slot (64 in the original).
  """
  hidden_dim: int
  slots: int
  slot_size: int = 64

  def setup(self):
    d, s, k = self.hidden_dim, self.slots, self.slot_size
    self.read_controller = torch_linear(s, d + 1, "read_controller")
    self.write_controller = torch_linear(s, d + 1, "write_controller")
    self.content_processor = torch_linear(k, d, "content_processor")
    self.importance_enhancer = torch_linear(d, k, "importance_enhancer")
    zeros = lambda *shape: jnp.zeros(shape, jnp.float32)
    if (not self.is_initializing() and not self.is_mutable_collection(MEMORY)
        and not self.has_variable(MEMORY, "slots")):
      raise ValueError(f"the model reads its memory state: pass the whole variables of "
                       f"model.init (params and {MEMORY!r}), e.g. model.apply(variables, ids), "
                       f"not {{'params': ...}} alone (or pass mutable=[{MEMORY!r}] to start "
                       "from a fresh memory, as init makes it).")
    self.slot_values = self.variable(MEMORY, "slots", zeros, s, k)
    self.age = self.variable(MEMORY, "age", zeros, s)
    self.importance = self.variable(MEMORY, "importance", lambda: jnp.full((s,), 0.1, jnp.float32))
    self.access_count = self.variable(MEMORY, "access_count", zeros, s)
    self.utilization = self.variable(MEMORY, "utilization", zeros)

  def _storing(self) -> bool:
    # init must return the initial state, not the state after one pass.
    return self.is_mutable_collection(MEMORY) and not self.is_initializing()

  def _controller_input(self, query_BD, level_B):
    return jnp.concatenate([query_BD, level_B[:, None].astype(query_BD.dtype)], axis=-1)

  def read(self, query_BD, level_B, real_B=None) -> ReadResult:
    """Reads with one query per example; updates access counts and the utilization tracker
    from the real rows (real_B, default all: a row of padding is no example; a batch of
    padding alone leaves them as they are)."""
    e = self._controller_input(query_BD, level_B)
    w = read_weights(self.read_controller(e), self.importance.value)
    content = w @ self.slot_values.value
    if real_B is None:
      real_B = jnp.ones(w.shape[:1], jnp.float32)
    access = self.access_count.value + jnp.sum((w > 0.01).astype(jnp.float32)
                                               * real_B[:, None], axis=0)
    util = jnp.where(jnp.sum(real_B) > 0,
                     0.9 * self.utilization.value + 0.1 * row_mean(jnp.max(w, axis=-1), real_B),
                     self.utilization.value)
    if self._storing():
      self.access_count.value = jax.lax.stop_gradient(access)
      self.utilization.value = jax.lax.stop_gradient(util)
    return ReadResult(content, w, util)

  def write(self, query_BD, content_BD, level_B, phi_value, real_B=None):
    """Priority write of the mean over the real rows (real_B, default all) of
    content_processor(content) into the lowest-priority slot; a batch of padding alone
    writes nothing (the original, whose last batch is short, never sees such a batch)."""
    e = self._controller_input(query_BD, level_B)
    self.write_controller(e)  # computed by the original and never used; XLA drops it
    if real_B is None:
      real_B = jnp.ones(content_BD.shape[:1], jnp.float32)
    new = row_mean(self.content_processor(content_BD).astype(jnp.float32), real_B)
    new_importance = row_mean(level_B, real_B) * (1.0 + phi_value)
    importance, access, age = (jnp.asarray(v.value) for v in
                               (self.importance, self.access_count, self.age))
    s = write_slot(importance, access, age)
    if self._storing():
      sg = jax.lax.stop_gradient
      any_real = jnp.sum(real_B) > 0
      keep = lambda new_value, old: jnp.where(any_real, new_value, old)  # noqa: E731
      slots = jnp.asarray(self.slot_values.value)
      self.slot_values.value = sg(keep(slots.at[s].set(new), slots))
      self.age.value = keep((age + 1.0).at[s].set(0.0), age)
      self.importance.value = sg(keep(importance.at[s].set(new_importance), importance))
      self.access_count.value = keep(access.at[s].set(0.0), access)
    return s

  def causal_read(self, h_BTD):
    """Per-position read for the optional fusion: query_t = mean(h[:, :t+1]), level 1.

    Reads the memory as it was before this pass (filled from earlier batches only), so
    position t sees nothing of positions > t. Returns importance_enhancer(content) [B, T, D].
    The state is not changed here: the batch-level read and write do that.
    """
    t = h_BTD.shape[1]
    h32 = h_BTD.astype(jnp.float32)
    query = jnp.cumsum(h32, axis=1) / jnp.arange(1, t + 1, dtype=jnp.float32)[None, :, None]
    e = jnp.concatenate([query, jnp.ones(query.shape[:-1] + (1,), query.dtype)], axis=-1)
    w = read_weights(self.read_controller(e), self.importance.value)
    content = w @ jax.lax.stop_gradient(self.slot_values.value)
    return self.importance_enhancer(content)

  def touch_unused(self, query_BD):
    """Creates importance_enhancer's parameters where fusion is off (the original's unused layer)."""
    return self.importance_enhancer(jnp.zeros(query_BD.shape[:-1] + (self.slot_size,), query_BD.dtype))
