"""Converters between the original PyTorch state dict and this package's Flax variables.

`from_torch_state_dict` and `to_torch_state_dict` are exact inverses: torch Linear weights
[out, in] become Flax kernels [in, out], the position table [1, max_len, D] becomes
[max_len, D], and the memory buffers plus the utilization tracker become the `memory` collection.
"""

from collections.abc import Mapping
import os
import re

import flax
import jax
import numpy as np

from infinito_jax.memory import MEMORY
from infinito_jax.model import InfinitoV52, ModelConfig

# torch Linear modules outside the layers: torch prefix -> Flax params path
_LINEARS = {
    "output_projection": ("output_projection",),
    "memory.read_controller": ("memory", "read_controller"),
    "memory.write_controller": ("memory", "write_controller"),
    "memory.content_processor": ("memory", "content_processor"),
    "memory.importance_enhancer": ("memory", "importance_enhancer"),
    "iit_metrics.phi_projector": ("iit_metrics", "phi_projector"),
    "iit_metrics.complexity_analyzer": ("iit_metrics", "complexity_analyzer"),
}
_LAYER_LINEARS = {  # per layer i: torch prefix pattern -> Flax path inside layers_i
    "attention_layers.{i}.q_proj": ("attention", "q_proj"),
    "attention_layers.{i}.k_proj": ("attention", "k_proj"),
    "attention_layers.{i}.v_proj": ("attention", "v_proj"),
    "attention_layers.{i}.out_proj": ("attention", "out_proj"),
    "ff_layers.{i}.0": ("ff_in",),
    "ff_layers.{i}.3": ("ff_out",),
}
_LAYER_NORMS = {"layer_norms_1.{i}": ("ln1",), "layer_norms_2.{i}": ("ln2",)}
_BUFFERS = {  # torch buffer -> name in the memory collection
    "memory.memory": "slots",
    "memory.memory_age": "age",
    "memory.memory_importance": "importance",
    "memory.access_count": "access_count",
    "memory.memory_utilization_tracker": "utilization",
}


def _name_map(num_layers: int):
  """[(torch name, collection, flax path, kind)] for every entry of the original state dict."""
  rows = [("token_embedding.weight", "params", ("token_embedding", "embedding"), "same"),
          ("position_embedding", "params", ("position_embedding",), "position"),
          ("explorer.adaptive_scale", "params", ("adaptive_scale",), "same")]
  linears = [(t, p) for t, p in _LINEARS.items()]
  norms = []
  for i in range(num_layers):
    linears += [(t.format(i=i), (f"layers_{i}",) + p) for t, p in _LAYER_LINEARS.items()]
    norms += [(t.format(i=i), (f"layers_{i}",) + p) for t, p in _LAYER_NORMS.items()]
  for t, p in linears:
    rows += [(t + ".weight", "params", p + ("kernel",), "transpose"),
             (t + ".bias", "params", p + ("bias",), "same")]
  for t, p in norms:
    rows += [(t + ".weight", "params", p + ("scale",), "same"),
             (t + ".bias", "params", p + ("bias",), "same")]
  rows += [(t, MEMORY, ("memory", n), "tracker" if n == "utilization" else "same")
           for t, n in _BUFFERS.items()]
  return rows


def _to_numpy(value):
  if hasattr(value, "detach"):  # a torch tensor
    value = value.detach().cpu().numpy()
  return np.asarray(value)


def _expected_shapes(config: ModelConfig):
  """torch-side shapes of every state-dict entry, from the config (no arrays are made)."""
  ids = jax.ShapeDtypeStruct((1, 2), np.int32)
  abstract = jax.eval_shape(InfinitoV52(config).init, jax.random.key(0), ids)
  return to_torch_state_dict(abstract, shapes_only=True)


def from_torch_state_dict(state: Mapping, config: ModelConfig) -> dict:
  """Builds Flax variables {'params', 'memory'} from the original's state dict.

  Args:
    state: mapping of the original's names (e.g. `attention_layers.0.q_proj.weight`) to
      arrays or torch tensors; a `module.` prefix (DataParallel) is accepted.
    config: the ModelConfig the variables are for; shapes are checked against it.

  Returns:
    {'params': ..., 'memory': ...} as `InfinitoV52(config).init` lays them out.

  Raises:
    ValueError naming every missing, unknown or mis-shaped entry.
  """
  state = {re.sub(r"^module\.", "", k): v for k, v in state.items()}
  expected = _expected_shapes(config)
  missing = sorted(set(expected) - set(state))
  unknown = sorted(set(state) - set(expected))
  wrong = sorted(f"{k}: got {tuple(np.shape(state[k]))}, expected {expected[k]}"
                 for k in set(expected) & set(state)
                 if tuple(np.shape(state[k])) != expected[k])
  if missing or unknown or wrong:
    parts = [f"missing: {missing}" if missing else "",
             f"unknown: {unknown}" if unknown else "",
             f"wrong shape: {wrong}" if wrong else ""]
    raise ValueError(
        f"state dict does not match ModelConfig(vocab_size={config.vocab_size}, hidden_dim="
        f"{config.hidden_dim}, num_layers={config.num_layers}, num_heads={config.num_heads}, "
        f"memory_slots={config.memory_slots}): " + "; ".join(p for p in parts if p)
        + ". Build the config that the checkpoint was trained with.")
  flat = {}
  for torch_name, collection, path, kind in _name_map(config.num_layers):
    value = _to_numpy(state[torch_name]).astype(np.float32)
    if kind == "transpose":
      value = value.T
    elif kind == "position":
      value = value[0]
    elif kind == "tracker":
      value = value.reshape(())
    flat[(collection,) + path] = np.array(value, order="C")
  return flax.traverse_util.unflatten_dict(flat)


def to_torch_state_dict(variables: Mapping, shapes_only: bool = False) -> dict:
  """Inverse of from_torch_state_dict: {torch name: numpy array} in the original's layout."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables))
  num_layers = len({k[1] for k in flat if k[0] == "params" and k[1].startswith("layers_")})
  out = {}
  for torch_name, collection, path, kind in _name_map(num_layers):
    key = (collection,) + path
    if key not in flat:
      raise ValueError(f"variables lack {'/'.join(key)} (for {torch_name}); pass the full "
                       f"{{'params', 'memory'}} dict that InfinitoV52.init returns.")
    value = flat[key]
    shape = tuple(value.shape)
    if kind == "transpose":
      shape = shape[::-1]
    elif kind == "position":
      shape = (1,) + shape
    elif kind == "tracker":
      shape = (1,)
    if shapes_only:
      out[torch_name] = shape
      continue
    value = np.asarray(value)
    out[torch_name] = np.array(value.T if kind == "transpose" else value.reshape(shape), order="C")
  return out


def load_torch_checkpoint(path: str | os.PathLike, config: ModelConfig) -> dict:
  """Reads an original `.pt` checkpoint (its `model_state_dict`, or a bare state dict).

  Needs PyTorch: `pip install 'infinito_jax[torch]'`.
  """
  try:
    import torch
  except ImportError as e:
    raise ImportError("reading .pt files needs PyTorch: pip install 'infinito_jax[torch]' "
                      "(or export the state dict to .npz and use from_torch_state_dict).") from e
  if not os.path.exists(path):
    raise FileNotFoundError(f"no PyTorch checkpoint at {path}")
  obj = torch.load(path, map_location="cpu", weights_only=True)
  state = obj.get("model_state_dict", obj) if isinstance(obj, Mapping) else None
  if not isinstance(state, Mapping):
    raise ValueError(f"{path} holds no state dict (expected a dict with 'model_state_dict').")
  return from_torch_state_dict(state, config)
