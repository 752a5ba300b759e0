"""Configs: every file builds a valid ModelConfig, and the presets hold the original's settings."""

import pytest

from configs import default, demo, tiny, wikitext2, wikitext2_demo, wikitext2_recipe
from infinito_jax import config as config_lib
from infinito_jax.model import model_config


@pytest.mark.parametrize("module", [default, demo, tiny, wikitext2, wikitext2_demo,
                                    wikitext2_recipe])
def test_every_config_builds_a_model_config(module):
  c = module.get_config()
  config_lib.validate(c)
  mc = model_config(c.model)
  assert mc.causal and c.data.seq_len <= mc.max_len
  assert c.data.source in ("hub", "files", "embedded")


def test_presets_hold_the_original_settings():
  d = demo.get_config()
  assert (d.model.vocab_size, d.model.hidden_dim, d.model.num_layers, d.model.num_heads) == (5000, 256, 3, 4)
  assert (d.train.batch_size, d.data.seq_len, d.train.learning_rate, d.train.epochs, d.seed) == (16, 128, 1e-4, 3, 42)
  assert d.data.source == "embedded"
  w = wikitext2.get_config()
  assert (w.model.vocab_size, w.model.hidden_dim, w.model.num_layers, w.model.num_heads,
          w.model.memory_slots) == (10000, 512, 6, 8, 256)
  assert (w.data.seq_len, w.train.batch_size, w.train.learning_rate, w.train.epochs,
          w.train.patience, w.train.cosine_epochs) == (256, 32, 1e-4, 15, 3, 20)
  assert (w.data.hub_name, w.data.hub_config) == ("Salesforce/wikitext", "wikitext-2-raw-v1")
  wd = wikitext2_demo.get_config()
  assert wd.data.source == "hub" and wd.model.hidden_dim == 256


def test_unknown_model_field_is_refused():
  c = tiny.get_config()
  c.model.unlock()
  c.model.hidden_size = 3
  with pytest.raises(ValueError, match=r"unknown fields \['hidden_size'\]"):
    model_config(c.model)


@pytest.mark.parametrize("field, meaning", [("train.num_devices", "0: all devices"),
                                            ("train.eval_batch_size", "0: train.batch_size"),
                                            ("train.warmup_steps", "0: off")])
def test_a_negative_count_is_refused_with_what_zero_means(field, meaning):
  """The error names what 0 does for that field (num_devices=-1 used to say '0: off', while 0
  uses every device)."""
  c = tiny.get_config()
  group, name = field.split(".")
  c[group][name] = -1
  with pytest.raises(config_lib.ConfigError, match=f"config.{field}=-1: must be an integer >= 0 "
                                                  rf"\({meaning}\)"):
    config_lib.validate(c)


def test_the_recipe_config_keeps_the_demo_architecture():
  """wikitext2_recipe changes the training recipe only (OPTIMISATION fields, and FREE ones such
  as the number of epochs): the model, the data and the vocabulary are wikitext2_demo's, and
  its batch size is the one FIXED field it may change (issue 7 asks for the same architecture)."""
  a, b = wikitext2_demo.get_config(), wikitext2_recipe.get_config()
  changes = config_lib.diff(a.to_dict(), b)
  assert changes and all(c.kind in ("optimisation", "free") or c.field == "train.batch_size"
                         for c in changes), changes
  assert not any(c.field.startswith("model.") and c.field not in config_lib.OPTIMISATION
                 for c in changes), changes


@pytest.mark.parametrize("change, says", [
    ({"seed": 2**32}, r"config.seed=4294967296: must be an integer in \[0, 2\*\*32\)"),
    ({"seed": 2**32 - 2, "train.replicas": 3},
     "replica 2 would train with seed 4294967296"),
    ({"data.corpus.seed": 2**40}, r"data.corpus.seed=1099511627776: must be an integer in")])
def test_seeds_past_32_bits_are_refused(change, says):
  """jax.random.key takes 32-bit seeds: 2**32 + 42 would silently be the key of 42, and a
  population's last replica (seed + r * stride) must fit as well."""
  c = tiny.get_config()
  for field, value in change.items():
    group, _, name = field.rpartition(".")
    (c if not group else c.data.corpus if group == "data.corpus" else c[group])[name] = value
  with pytest.raises(config_lib.ConfigError, match=says):
    config_lib.validate(c)
  c = tiny.get_config()
  c.seed, c.train.replicas = 2**32 - 3, 3  # the largest that fits
  config_lib.validate(c)


def test_data_files_that_the_source_does_not_read_are_refused():
  """data.files.* set while data.source is 'embedded' or 'hub' would be read by nothing: the
  run would train on other text than the user named."""
  c = tiny.get_config()
  c.data.files.train = "/some/where/train.txt"
  with pytest.raises(config_lib.ConfigError, match=r"data.files.train is set but "
                                                  r"data.source='embedded' does not read files"):
    config_lib.validate(c)
  c.data.source, c.data.files.validation = "files", "/some/where/valid.txt"
  config_lib.validate(c)


def test_a_model_too_large_for_one_replica_is_named_as_such():
  """When not even one replica fits, the message asks for a smaller model, not for 'at most 1
  replicas' (which is what was asked)."""
  from infinito_jax import train  # pylint: disable=g-import-not-at-top
  mesh = train.make_mesh(1)
  available = train.device_memory_bytes(mesh)[0]
  with pytest.raises(config_lib.ConfigError, match="make the model smaller"):
    train.check_population_fits(1, available + 1, mesh)
  with pytest.raises(config_lib.ConfigError, match="Use at most 2 replicas"):
    train.check_population_fits(5, available // 4, mesh)


@pytest.mark.parametrize("value", ["false", "None", "0", " off "])
def test_a_switch_word_as_the_cache_folder_is_refused(value):
  """train.compilation_cache is a folder: 'false' (how the boolean fields are turned off)
  would fill a folder named 'false' in the current directory; '' is what turns it off."""
  c = tiny.get_config()
  c.train.compilation_cache = value
  with pytest.raises(config_lib.ConfigError, match=r"not a switch.*compilation_cache= \(empty\)"):
    config_lib.validate(c)
  for ok in ("", "/tmp/false_cache", "~/.cache/x"):
    c.train.compilation_cache = ok
    config_lib.validate(c)
  for blank in ("  ", "\t", "cache ", " /tmp/x"):  # a folder named '  ' appeared here
    c.train.compilation_cache = blank
    with pytest.raises(config_lib.ConfigError, match=r"begins or ends with blanks"):
      config_lib.validate(c)
