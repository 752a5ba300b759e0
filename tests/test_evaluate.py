"""Sampling: only words the tokenizer has, whatever the temperature."""

import jax

from configs import tiny
from infinito_jax import data as data_lib
from infinito_jax.evaluate import generate
from infinito_jax.model import InfinitoV52, model_config
from infinito_jax.tokenizer import SPECIALS


def test_sampling_never_returns_ids_without_a_word():
  """vocab_size 128 but 100 words: the 28 ids past them have logits yet no word to print."""
  config = tiny.get_config()
  mc = model_config(config.model)
  tokenizer = data_lib.prepare(config, mc, splits=("validation",)).tokenizer
  assert len(tokenizer) < mc.vocab_size
  model = InfinitoV52(mc)
  variables = model.init(jax.random.key(0), jax.numpy.zeros((1, 8), jax.numpy.int32))
  for seed in range(3):  # hot sampling from an untrained model hits every id often
    g = generate(model, variables, tokenizer, "the", num_tokens=60, seed=seed, temperature=5.0)
    words = g["continuation"].split()
    assert len(words) == 60 and set(words) <= set(tokenizer.words) - {SPECIALS[0]}
