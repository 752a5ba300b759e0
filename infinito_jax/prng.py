"""The PRNG implementations behind `train.rng_impl`: JAX's threefry, and RBG keys that stay
each key's own under `jax.vmap`.

JAX's batching rule for XLA's RngBitGenerator (`lax.rng_bit_generator`, with which 'rbg' and
'unsafe_rbg' keys draw their bits, and 'unsafe_rbg' keys also split and fold in) draws for the
whole batch from its first key: under a vmap over keys [k0, k1, ...], key r's bits are row r
of one draw of k0. A population is a vmap over its replicas' keys (its init always, its train
step in the 'vmap' form), so replica r >= 1 of an RBG population was not the run of seed + r,
and replicas of one key differed. `rbg` and `unsafe_rbg` here are JAX's implementations whose
functions that call RngBitGenerator, vmapped, call it for each key in turn (an unrolled loop
of the same draws, stacked). Key data and every unbatched result are JAX's own, so a single
run's numbers are bitwise those of JAX's implementation, and its checkpoints' keys the same.
"""

import functools

import jax
import jax.numpy as jnp
from jax.extend import random as jex_random


UNROLL_UP_TO = 8  # vmaps of at most this many keys draw in an unrolled loop, larger in lax.map


@functools.lru_cache(maxsize=None)
def _looped(fn, *static):
  """fn(*arrays, *static) under a custom vmap rule that calls it on each element of the
  batched arrays in turn and stacks the results (nested vmaps loop at every level)."""

  @jax.custom_batching.custom_vmap
  def once(*args):
    return fn(*args, *static)

  @once.def_vmap
  def _each(axis_size, in_batched, *args):
    if not any(in_batched):
      return once(*args), False

    def element(xs):  # `once` again, not fn: an outer vmap's elements stay apart too
      it = iter(xs)
      return once(*(next(it) if b else a for a, b in zip(args, in_batched)))

    batched = [a for a, b in zip(args, in_batched) if b]
    if axis_size > UNROLL_UP_TO:  # a loop in the program, not axis_size copies of the draw
      return jax.lax.map(element, batched), True
    return jnp.stack([element([a[i] for a in batched]) for i in range(axis_size)]), True

  return once


def _per_key_under_vmap(base, split: bool):
  """`base` (a PRNGImpl) with random_bits, and `split` and fold_in if `split`, looped under vmap."""
  def bits(key, bit_width, shape):
    return _looped(base.random_bits, bit_width, tuple(shape))(key)

  def split_looped(key, shape):
    return _looped(base.split, tuple(shape))(key)

  def fold_in_looped(key, data):
    return _looped(base.fold_in)(key, data)

  # rbg splits and folds in with threefry's hash, which vmaps exactly
  split_fn, fold_in = (split_looped, fold_in_looped) if split else (base.split, base.fold_in)
  return jex_random.define_prng_impl(
      key_shape=base.key_shape, seed=base.seed, split=split_fn, random_bits=bits,
      fold_in=fold_in, name=base.name, tag=f"{base.tag}_per_key")


IMPLS = {"threefry": "threefry2x32",
         # rbg splits and folds in with threefry's hash; unsafe_rbg with RngBitGenerator
         "rbg": _per_key_under_vmap(jex_random.rbg_prng_impl, split=False),
         "unsafe_rbg": _per_key_under_vmap(jex_random.unsafe_rbg_prng_impl, split=True)}


def make_key(seed: int, rng_impl: str = "threefry") -> jax.Array:
  """The run's typed key of `seed` in the train.rng_impl implementation."""
  return jax.random.key(seed, impl=IMPLS[rng_impl])


def wrap_key(data, rng_impl: str = "threefry") -> jax.Array:
  """The typed key of raw key `data` (jax.random.key_data's) in train.rng_impl's implementation."""
  return jax.random.wrap_key_data(data, impl=IMPLS[rng_impl])
