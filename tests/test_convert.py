"""Converters between the original's state dict and Flax variables: exact inverses, clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infinito_jax.convert import from_torch_state_dict, load_torch_checkpoint, to_torch_state_dict
from infinito_jax.model import InfinitoV52


def test_fixture_state_round_trips_exactly(reference):
  back = to_torch_state_dict(reference["variables"])
  assert set(back) == set(reference["state"])
  for name, value in reference["state"].items():
    assert back[name].shape == value.shape, name
    np.testing.assert_array_equal(back[name], value, err_msg=name)


def test_flax_variables_round_trip_exactly(small_config):
  v = InfinitoV52(small_config).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  again = from_torch_state_dict(to_torch_state_dict(v), small_config)
  flat_a = jax.tree_util.tree_leaves_with_path(v)
  flat_b = dict(jax.tree_util.tree_leaves_with_path(again))
  assert len(flat_a) == len(flat_b)
  for path, x in flat_a:
    np.testing.assert_array_equal(np.asarray(x), flat_b[path], err_msg=str(path))


def test_linear_weights_are_transposed_into_kernels(reference):
  w = reference["state"]["attention_layers.1.q_proj.weight"]  # torch [out, in]
  kernel = reference["variables"]["params"]["layers_1"]["attention"]["q_proj"]["kernel"]
  np.testing.assert_array_equal(kernel, w.T)


def test_missing_unknown_and_misshaped_entries_are_named(reference):
  state = dict(reference["state"])
  del state["layer_norms_2.1.bias"]
  state["attention_layers.0.extra"] = np.zeros(3)
  state["output_projection.bias"] = np.zeros(5)
  with pytest.raises(ValueError) as err:
    from_torch_state_dict(state, reference["config"])
  msg = str(err.value)
  assert "missing: ['layer_norms_2.1.bias']" in msg
  assert "unknown: ['attention_layers.0.extra']" in msg
  assert "output_projection.bias: got (5,), expected (97,)" in msg


def test_state_for_another_config_is_refused(reference, small_config):
  import dataclasses
  bigger = dataclasses.replace(reference["config"], num_layers=3)
  with pytest.raises(ValueError, match=r"missing: \['attention_layers.2"):
    from_torch_state_dict(reference["state"], bigger)


def test_dataparallel_prefix_is_accepted(reference):
  state = {"module." + k: v for k, v in reference["state"].items()}
  v = from_torch_state_dict(state, reference["config"])
  np.testing.assert_array_equal(v["params"]["output_projection"]["bias"],
                                reference["state"]["output_projection.bias"])


def test_pytorch_pt_checkpoint_loads(reference, tmp_path):
  torch = pytest.importorskip("torch", reason="reading .pt needs the 'torch' extra")
  path = tmp_path / "v52.pt"
  torch.save({"model_state_dict": {k: torch.from_numpy(np.array(v))
                                   for k, v in reference["state"].items()}, "epoch": 3}, path)
  v = load_torch_checkpoint(path, reference["config"])
  back = to_torch_state_dict(v)
  for name, value in reference["state"].items():
    np.testing.assert_array_equal(back[name], value, err_msg=name)
