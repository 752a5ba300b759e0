"""Converters between the original PyTorch state dict and this package's Flax variables.

`from_torch_state_dict` and `to_torch_state_dict` are exact inverses: torch Linear weights
[out, in] become Flax kernels [in, out], the position table [1, max_len, D] becomes
[max_len, D], and the memory buffers plus the utilization tracker become the `memory` collection.
The original's `attention_layers.{i}.last_attention_weights` (a cache of the last forward pass,
in every state dict it saved after training, used by nothing) is ignored on the way in and not
written on the way out, as a freshly built original model's state dict lacks it too.

From the command line, a workdir in and out:

  python -m infinito_jax.convert import MODEL.pt --config configs/wikitext2.py --workdir W
  python -m infinito_jax.convert export W --format pt|safetensors|npz [--out FILE]

`import` makes a run at step 0 that evaluate.py scores and train.py fine-tunes (same config);
`export` writes the original's state dict (safetensors and npz without torch) beside the
tokenizer (`<out stem>.tokenizer.json`) and the model's settings (`<out stem>.config.json`,
which names the state dict it belongs to).
"""

from collections.abc import Mapping
import dataclasses
import os
import pickle
import re

import flax
import jax
import jax.numpy as jnp
import numpy as np

from infinito_jax import errors
from infinito_jax.memory import MEMORY
from infinito_jax.model import (InfinitoV52, ModelConfig, stack_layers, stacked_models_message,
                                unstack_layers)

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


CACHE_BUFFER = re.compile(r"^attention_layers\.\d+\.last_attention_weights$")


def drop_cache_buffers(state: Mapping) -> tuple[dict, list[str]]:
  """The state dict without the original's attention-weight caches, and the names dropped."""
  ignored = sorted(k for k in state if CACHE_BUFFER.match(re.sub(r"^module\.", "", k)))
  return {k: v for k, v in state.items() if k not in ignored}, ignored


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
    import torch  # pylint: disable=g-import-not-at-top
    value = value.detach().cpu()
    if value.dtype == torch.bfloat16:  # numpy has none: the same bits as ml_dtypes' bfloat16
      return value.view(torch.int16).numpy().view(jnp.bfloat16)
    try:
      value = value.numpy()
    except TypeError:  # another dtype numpy lacks (float8, ...): its values in float32
      value = value.float().numpy()
  return np.asarray(value)


def non_finite(state: Mapping) -> list[str]:
  """The floating-point entries that hold a NaN or an infinity once in float32, the dtype every
  weight is kept in (a finite float64 beyond float32's range becomes infinite there)."""
  bad = []
  for k, v in state.items():
    v = _to_numpy(v)
    if jnp.issubdtype(v.dtype, jnp.floating):
      with np.errstate(over="ignore"):
        if not np.all(np.isfinite(v.astype(np.float32))):
          bad.append(k)
  return sorted(bad)


def _expected_shapes(config: ModelConfig):
  """torch-side shapes of every state-dict entry, from the config (no arrays are made)."""
  ids = jax.ShapeDtypeStruct((1, 2), np.int32)
  config = dataclasses.replace(config, scan_layers=False)  # the original's layout: unrolled
  abstract = jax.eval_shape(InfinitoV52(config).init, jax.random.key(0), ids)
  return to_torch_state_dict(abstract, shapes_only=True)


def from_torch_state_dict(state: Mapping, config: ModelConfig) -> dict:
  """Builds Flax variables {'params', 'memory'} from the original's state dict.

  Args:
    state: mapping of the original's names (e.g. `attention_layers.0.q_proj.weight`) to
      arrays or torch tensors; a `module.` prefix (DataParallel) is accepted, and the
      `last_attention_weights` caches of a trained original are ignored.
    config: the ModelConfig the variables are for; shapes are checked against it.

  Returns:
    {'params': ..., 'memory': ...} as `InfinitoV52(config).init` lays them out.

  Raises:
    ValueError naming every missing, unknown or mis-shaped entry.
  """
  if not isinstance(config, ModelConfig):
    raise TypeError(f"from_torch_state_dict needs a ModelConfig, got {type(config).__name__}; "
                    "for a run config use model_config(run_config.model) (infinito_jax.model).")
  heads = settings_of(state).get("num_heads")  # only the attention caches show it
  state = {re.sub(r"^module\.", "", k): v for k, v in drop_cache_buffers(state)[0].items()}
  expected = _expected_shapes(config)
  missing = sorted(set(expected) - set(state))
  unknown = sorted(set(state) - set(expected))
  wrong = sorted(f"{k}: got {tuple(np.shape(state[k]))}, expected {expected[k]}"
                 for k in set(expected) & set(state)
                 if tuple(np.shape(state[k])) != expected[k])
  if missing or unknown or wrong:
    def first(names, n=6):  # a wrong config mis-shapes nearly everything: name a few
      return str(names[:n])[:-1] + (f", ... ({len(names) - n} more)]" if len(names) > n else "]")

    if not set(expected) & set(state):  # nothing of the original's: no config would fit
      raise ValueError(
          f"the state dict holds none of INFINITO V5.2's entries (e.g. token_embedding.weight)"
          f": {'it is empty' if not state else f'its entries are {first(unknown)}'}. Not a "
          "state dict of this model: give the file the original's trainer saved (its "
          "'model_state_dict'), or an export of python -m infinito_jax.convert export.")
    parts = [f"missing: {first(missing)}" if missing else "",
             f"unknown: {first(unknown)}" if unknown else "",
             f"wrong shape: {first(wrong)}" if wrong else ""]
    raise ValueError(
        f"state dict does not match ModelConfig(vocab_size={config.vocab_size}, hidden_dim="
        f"{config.hidden_dim}, num_layers={config.num_layers}, num_heads={config.num_heads}, "
        f"memory_slots={config.memory_slots}): " + "; ".join(p for p in parts if p)
        + ". Build the config that the checkpoint was trained with.")
  if heads is not None and heads != config.num_heads:
    raise ValueError(
        f"the state dict's attention caches (last_attention_weights) hold {heads} heads and "
        f"the config {config.num_heads}: no weight's shape shows the head count, so these "
        f"weights would load and compute other numbers. Build the config with "
        f"num_heads={heads}.")
  dtypes = {k: _to_numpy(state[k]).dtype for k in expected}
  odd = sorted(f"{k} ({d})" for k, d in dtypes.items() if not jnp.issubdtype(d, jnp.floating))
  if odd:  # the original's entries are all float32: an int, bool, complex or str one is foreign
    raise ValueError(f"{len(odd)} entr{'y is' if len(odd) == 1 else 'ies are'} not floating "
                     f"point ({', '.join(odd[:4])}{', ...' if len(odd) > 4 else ''}): the "
                     "original saves float tensors only; give its state dict.")
  bad = non_finite({k: state[k] for k in expected})
  if bad:
    entries = "entry" if len(bad) == 1 else "entries"
    raise ValueError(f"NaN or infinite values in {len(bad)} {entries} as float32 ({', '.join(bad[:4])}{', ...' if len(bad) > 4 else ''}): a "
                     "diverged model, or values beyond float32's range (about 3.4e38); give a "
                     "state dict saved before it diverged.")
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
  out = flax.traverse_util.unflatten_dict(flat)
  if config.scan_layers:
    out["params"] = jax.tree_util.tree_map(np.asarray, stack_layers(out["params"]))
  return out


def to_torch_state_dict(variables: Mapping, shapes_only: bool = False) -> dict:
  """Inverse of from_torch_state_dict: {torch name: numpy array} in the original's layout
  (parameters in either layout: unrolled, or stacked by model.scan_layers)."""
  variables = dict(flax.core.unfreeze(variables))
  if "layers" in variables.get("params", {}):
    if shapes_only:
      raise ValueError("shapes_only needs the unrolled layout (scan_layers=False)")
    variables["params"] = unstack_layers(variables["params"])
  if (stacked := stacked_models_message(variables)) is not None:
    raise ValueError(stacked)
  flat = flax.traverse_util.flatten_dict(variables)
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


# ----- files and workdirs -----

FORMATS = ("pt", "safetensors", "npz")
_SUFFIXES = {".pt": "pt", ".pth": "pt", ".safetensors": "safetensors", ".npz": "npz"}


def read_state_dict(path: str | os.PathLike) -> dict:
  """{torch name: numpy array} from a `.pt`/`.pth` (needs torch), `.safetensors` or `.npz`.

  A `.pt` may hold the trainer's dict (its `model_state_dict`) or a bare state dict; of an
  `.npz` with names under `model_state_dict/` or `state/`, only those are read.
  """
  from infinito_jax.errors import DataError  # pylint: disable=g-import-not-at-top
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise DataError(f"no checkpoint file at {path}.")
  kind = _SUFFIXES.get(os.path.splitext(path)[1].lower())
  if kind is None:
    raise DataError(f"{path}: unknown kind of file; give a .pt/.pth (PyTorch), .safetensors or "
                    ".npz holding the original's state dict.")
  try:
    if kind == "pt":
      try:
        import torch  # pylint: disable=g-import-not-at-top
      except ImportError:
        raise DataError(f"reading {path} needs PyTorch: pip install -e \".[torch]\" (or export "
                        "the state dict to .safetensors or .npz where torch is).") from None
      try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
      except pickle.UnpicklingError as e:  # torch's safe loader met another kind of object
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        found = f" ({found.group(1)})" if found else ""
        raise DataError(
            f"{path} holds Python objects besides tensors and plain numbers{found}, "
            "which this project does not unpickle. Where you trust the file, keep its weights "
            f"alone: python -c \"import torch; c = torch.load('{path}', weights_only=False); "
            "torch.save({'model_state_dict': c.get('model_state_dict', c)}, 'weights.pt')\" and "
            "import weights.pt.") from None
      state = obj.get("model_state_dict", obj) if isinstance(obj, Mapping) else None
      if not isinstance(state, Mapping):
        raise DataError(f"{path} holds no state dict (expected a dict with 'model_state_dict').")
      return {k: _to_numpy(v) for k, v in state.items()}
    if kind == "safetensors":
      from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
      return dict(load_file(path))
    with np.load(path, allow_pickle=False) as z:
      state = {k: z[k] for k in z.files}
  except DataError:
    raise
  except Exception as e:  # a damaged or foreign file: say which, not a library traceback
    if kind == "npz" and "pickle" in str(e):  # numpy takes any non-zip file for a pickle
      raise DataError(f"{path} is not an .npz archive (a zip of .npy arrays); pickles are never "
                      "loaded here: give the original's state dict as .npz, .safetensors or "
                      ".pt.") from None
    said = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(e)).split())  # no terminal codes
    raise DataError(f"{path} cannot be read as a {kind} state dict "
                    f"({type(e).__name__}: {said[:200]}).") from None
  for prefix in ("model_state_dict/", "state/"):  # a state dict kept beside other arrays
    inside = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if inside:
      return inside
  return state


def settings_of(state: Mapping) -> dict:
  """The model settings a state dict's shapes show (num_heads only where a cache holds it)."""
  state = {re.sub(r"^module\.", "", k): v for k, v in state.items()}
  out = {}
  shape = lambda k: tuple(np.shape(state[k])) if k in state else None  # noqa: E731
  if (s := shape("token_embedding.weight")) and len(s) == 2:
    out["vocab_size"], out["hidden_dim"] = s
  if (s := shape("position_embedding")) and len(s) == 3:
    out["max_len"] = s[1]
  if (s := shape("memory.memory")) and len(s) == 2:
    out["memory_slots"], out["slot_size"] = s
  layers = {int(m.group(1)) for k in state if (m := re.match(r"layer_norms_1\.(\d+)\.", k))}
  if layers:
    out["num_layers"] = max(layers) + 1
  caches = [k for k in state if CACHE_BUFFER.match(k)]
  if caches and len(shape(caches[0])) == 4:
    out["num_heads"] = shape(caches[0])[1]
  return out


@errors.python_terms("import_original", {"vocab": "vocab"})
def import_original(source: str, config, workdir: str, *, vocab: str | None = None) -> dict:
  """Makes `workdir` a run at step 0 holding the original's weights and memory.

  Args:
    source: a .pt/.pth, .safetensors or .npz state dict of the original.
    config: the run config (its `model` must match the state dict's shapes; its data is what
      evaluate.py scores and train.py fine-tunes on).
    workdir: a new or empty folder.
    vocab: a tokenizer JSON (as `export` writes) or a JSON list of words, in id order; by
      default the vocabulary is built from the config's training split by the original's rule
      (the original's ids when that is the text it was trained on).

  Returns:
    the run's summary (status "imported").
  """
  # pylint: disable=g-import-not-at-top
  import hashlib
  import json
  from infinito_jax import config as config_lib, lifecycle, train as train_lib
  from infinito_jax.errors import ConfigError, DataError, WorkdirError
  from infinito_jax.model import model_config
  from infinito_jax.tokenizer import WordTokenizer
  workdir = errors.workdir_path(workdir)  # ('' imported into the current folder)
  config_lib.validate(config)
  config = config_lib.with_absolute_paths(config)
  if config.train.replicas != 1:
    raise ConfigError(f"train.replicas={config.train.replicas}: an import makes one run; "
                      "import with replicas 1.")
  model_cfg = model_config(config.model)
  raw = read_state_dict(source)
  state, ignored = drop_cache_buffers(raw)
  exported = exported_settings(source, strict=True)  # what export wrote beside it, if any
  if exported:
    odd = {k: exported[k] for k in _BEHAVIOUR_SETTINGS
           if k in exported and not isinstance(exported[k], bool)}
    if odd:  # "true" or 1 would otherwise skip the check below without a word
      raise ConfigError(
          f"{_beside(source, '.config.json')} has "
          + ", ".join(f"{k}={json.dumps(v)}" for k, v in odd.items())
          + ": export writes these as JSON true or false; correct the file (or delete the "
          "key to import without that check).")
    differ = {k: v for k, v in exported.items()
              if (k in _SHAPE_SETTINGS or k in _BEHAVIOUR_SETTINGS) and getattr(model_cfg, k) != v}
    if differ:  # causal and fuse_memory change what the weights compute, as shapes do
      flag = lambda v: str(v).lower() if isinstance(v, bool) else v  # noqa: E731
      raise ConfigError(
          f"{source} was exported from a model with "
          + ", ".join(f"{k}={flag(v)}" for k, v in differ.items())
          + f" ({_beside(source, '.config.json')}), and the config says "
          + ", ".join(f"{k}={flag(getattr(model_cfg, k))}" for k in differ) + "; pass "
          + " ".join(f"--config.model.{k}={flag(v)}" for k, v in differ.items()) + ".")
  elif os.path.exists(_beside(source, ".config.json")):
    try:
      with open(_beside(source, ".config.json"), encoding="utf-8") as f:
        named = json.load(f).get("state_dict")
    except (OSError, ValueError, AttributeError):
      named = None
    if not isinstance(named, str) or named == os.path.basename(source):  # damaged
      raise ConfigError(
          f"{_beside(source, '.config.json')}, beside {source} where export writes its "
          "settings, cannot be read as them (not JSON, or not export's fields): repair it, or "
          "move it away to import without the checks it allows (the shapes are then checked "
          "against the config alone, and the vocabulary is not taken from beside the file).")
  bad = non_finite(state)
  if bad:
    beyond = [k for k in bad if np.all(np.isfinite(_to_numpy(state[k])))]  # finite as saved
    how = (f" ({', '.join(beyond[:4])}{', ...' if len(beyond) > 4 else ''}: finite as saved, "
           "but beyond float32's range, about 3.4e38, and float32 is what the weights are kept "
           "in)" if beyond else "")
    raise DataError(f"{source} holds NaN or infinite values in {len(bad)} tensor(s) "
                    f"({', '.join(bad[:4])}{', ...' if len(bad) > 4 else ''}) as float32{how}: "
                    "a diverged model; import a checkpoint saved before it diverged.")
  cast = sorted({str(_to_numpy(v).dtype) for v in state.values()} - {"float32"})
  auto_vocab = None  # the tokenizer beside it, where the settings beside it name this file
  if not vocab and exported and os.path.isfile(_beside(source, ".tokenizer.json")):
    vocab = auto_vocab = _beside(source, ".tokenizer.json")  # the ids the weights were made for
  try:
    variables = from_torch_state_dict(raw, model_cfg)  # with the caches, which show num_heads
  except ValueError as e:
    shown = settings_of(raw)  # the caches show num_heads
    hint = " ".join(f"--config.model.{k}={v}" for k, v in shown.items()
                    if getattr(model_cfg, k, v) != v)
    raise ConfigError((f"{source} was saved by another model shape; pass {hint} (what its "
                       f"shapes say). Details: {e}") if hint else
                      f"{source} does not fit the config: {e}") from None
  tokenizer = None
  if vocab:
    try:
      with open(vocab) as f:
        obj = json.load(f)
      tokenizer = (WordTokenizer(obj, config.data.add_eos) if isinstance(obj, list)
                   else WordTokenizer(obj["words"], obj.get("add_eos", config.data.add_eos)))
      odd = [w for w in tokenizer.words if not isinstance(w, str) or not w or w.split() != [w]
             or w != w.lower()]
      if odd:  # a word the lower-casing whitespace split can never produce: an id no text reaches
        raise ValueError(f"{len(odd)} entries are not single lower-case words ({odd[:3]})")
      seen, twice = set(), []
      for w in tokenizer.words[3:]:  # the original's rule repeats no word after the specials
        (twice.append(w) if w in seen else seen.add(w))
      if twice:  # the earlier id of a repeated word would never be produced
        raise ValueError(f"{len(twice)} words appear twice ({twice[:3]})")
    except (OSError, ValueError, KeyError, TypeError) as e:
      if vocab == auto_vocab:  # not the user's --vocab: the file export wrote beside it
        raise DataError(f"{vocab}, the tokenizer beside {source} (read because no --vocab was "
                        f"given), is not a vocabulary ({type(e).__name__}: {e}): restore it "
                        "from where the export was made, or pass --vocab FILE with the words "
                        "the weights were trained on.") from None
      raise DataError(f"--vocab {vocab}: not a vocabulary ({type(e).__name__}: {e}); give a "
                      "JSON list of words in id order, starting with <pad>, <unk>, <eos>, or "
                      "the .tokenizer.json that export writes.") from None
  ckpts = os.path.join(workdir, "checkpoints")
  if (os.path.isdir(ckpts) and os.listdir(ckpts)) or any(
      os.path.exists(os.path.join(workdir, f))
      for f in ("history.jsonl", "config.json", "summary.json")):
    raise WorkdirError(f"{workdir} already holds a run (or what is left of one: its "
                       "checkpoints, history.jsonl, config.json or summary.json); import into "
                       "a new --workdir.")
  before = lifecycle.entries(workdir)  # None: the import makes the workdir
  made = before is None and not os.path.lexists(workdir)
  try:
    with lifecycle.WorkdirLock(workdir):
      run = train_lib.Run(config, workdir, tokenizer=tokenizer, announce=False)
      try:
        run.write_config()
        stacked = jax.tree_util.tree_map(lambda x: np.asarray(x)[None], variables)
        sh = run.trainer.state_sharding  # one sharding, or per field (fsdp)
        of = (lambda f: getattr(sh, f)) if isinstance(sh, train_lib.TrainState) else (lambda f: sh)
        params = jax.device_put(stacked["params"], of("params"))
        memory = jax.device_put(stacked[MEMORY], of("memory"))
        opt_state = jax.jit(jax.vmap(run.trainer.tx.init),
                            out_shardings=of("opt_state"))(params)
        run.state = run.state.replace(params=params, memory=memory, opt_state=opt_state)
        with open(source, "rb") as f:
          digest = hashlib.file_digest(f, "sha256").hexdigest()
        run.history.append("import", step=0, source=os.path.abspath(source), sha256=digest,
                           ignored=ignored)
        run.save(0, wait=True)
        summary = run.summary("imported")
      finally:
        run.checkpointer.close()
  except BaseException:
    if made or before is not None:  # a new workdir goes, an existing one loses the lock file
      lifecycle.remove_if_unused(workdir, before)
    raise
  return dict(summary, ignored=ignored, vocab=auto_vocab, exported=exported, cast=cast,
              rebuilt_vocab=not vocab, vocab_words=len(run.data.tokenizer))


_SHAPE_SETTINGS = ("vocab_size", "hidden_dim", "num_layers", "num_heads", "memory_slots",
                   "slot_size", "max_len")
_BEHAVIOUR_SETTINGS = ("causal", "fuse_memory")  # checked where an export's settings hold them


def _beside(path: str, suffix: str) -> str:
  """The file export writes beside a state dict: <path without its suffix><suffix>."""
  return os.path.splitext(path)[0] + suffix


def exported_settings(path: str, strict: bool = False) -> dict | None:
  """The model settings export wrote beside a state dict (`<name>.config.json`), or None
  where there is no such file (the original's checkpoints) or it is not export's. `strict`
  (import): export's file whose shape settings are not integers raises ConfigError instead of
  counting as no file."""
  import json  # pylint: disable=g-import-not-at-top
  try:
    with open(_beside(path, ".config.json"), encoding="utf-8") as f:
      settings = json.load(f)
  except (OSError, ValueError):
    return None
  if not (isinstance(settings, dict) and isinstance(settings.get("source"), dict)):
    return None
  if settings.get("state_dict", os.path.basename(path)) != os.path.basename(path):
    return None  # written beside another state dict of the same stem (m.npz beside m.pt)
  odd = {k: settings.get(k) for k in _SHAPE_SETTINGS
         if not isinstance(settings.get(k), int) or isinstance(settings.get(k), bool)}
  if odd and strict:  # export's file, edited: ignoring it would skip every check it allows
    from infinito_jax.errors import ConfigError  # pylint: disable=g-import-not-at-top
    raise ConfigError(
        f"{_beside(path, '.config.json')} has "
        + ", ".join(f"{k}={json.dumps(v)}" for k, v in odd.items())
        + ": export writes these as JSON integers; correct the file (or delete it to import "
        "without the checks it allows).")
  return None if odd else settings


@errors.python_terms("export_original", {"out": "`out`", "format": "fmt", "step": "step",
                                          "replica": "replica"})
def export_original(workdir: str, out: str, fmt: str | None = None, *, step: int | None = None,
                    replica: int | None = None, make_folder: bool = False) -> dict:
  """Writes a run's model as the original's state dict, with its tokenizer and settings.

  Args:
    workdir: a run's workdir (or its checkpoints folder, or one step's folder).
    out: the state dict's path; `<out without suffix>.tokenizer.json` and `.config.json` go
      beside it. Not inside the run's checkpoints folder (Orbax removes what it prunes).
    fmt: 'pt' (torch.save of {'model_state_dict': ...}, needs torch), 'safetensors' or 'npz';
      by default from the suffix of `out`.
    step: the checkpoint step (default: the best, as evaluate.py chooses).
    replica: which replica of a population (default: the best one).
    make_folder: create `out`'s folder (once the run is restored) instead of refusing a
      missing one; a folder under the run's own `exported/` is always made.

  Returns:
    {'state_dict', 'tokenizer', 'config': paths, 'step', 'replica', 'chosen'}.
  """
  # pylint: disable=g-import-not-at-top
  import json
  from infinito_jax import checkpoint as ckpt_lib, evaluate, lifecycle
  from infinito_jax.errors import ConfigError
  out = os.fspath(out)  # a pathlib.Path too
  if out.endswith(os.sep) or os.path.isdir(out):
    name = f"model.{fmt or 'safetensors'}"
    example = os.path.join(out, name)
    try:  # never an example the next check refuses: inside the run's checkpoints folder
      run_dir, _ = evaluate.resolve_ckpt(workdir, step, what="the workdir")
      real = os.path.realpath(ckpt_lib.checkpoint_dir(run_dir))
      if os.path.commonpath([os.path.realpath(out), real]) == real:
        example = os.path.join(run_dir, "exported", fmt or "safetensors", name)
    except (ConfigError, ckpt_lib.CheckpointError, ValueError):
      pass
    raise ConfigError(f"--out {out} is a folder; give a file path, e.g. {example}.")
  suffix = _SUFFIXES.get(os.path.splitext(out)[1].lower())
  fmt = fmt or suffix
  if fmt not in FORMATS:
    raise ConfigError(f"--format must be one of {FORMATS} (or give --out a .pt, .safetensors "
                      f"or .npz name), got {fmt!r}.")
  if suffix != fmt:
    wanted = {"pt": ".pt", "safetensors": ".safetensors", "npz": ".npz"}[fmt]
    raise ConfigError(f"--out {out} does not end in {wanted}, the suffix of --format {fmt} "
                      "(import reads a file by its suffix): name it so.")
  if fmt == "pt":
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise ConfigError("--format pt needs PyTorch: pip install -e \".[torch]\"; "
                        "--format safetensors or npz need no torch.") from None
  out = os.path.abspath(out)
  folder = os.path.dirname(out)
  if os.path.exists(folder) and not os.path.isdir(folder):
    raise ConfigError(f"--out {out}: {folder} is a file, not a folder; choose another --out.")
  if not os.path.isdir(folder) and not make_folder:
    run_dir, _ = evaluate.resolve_ckpt(workdir, step, what="the workdir")
    exported = os.path.realpath(os.path.join(run_dir, "exported"))
    if os.path.commonpath([os.path.realpath(folder), exported]) == exported:
      make_folder = True  # the run's own folder for exports (the default --out lies there)
    else:
      raise ConfigError(f"--out {out}: the folder {folder} does not exist; create it first.")
  base = os.path.splitext(out)[0]
  paths = {"state_dict": out, "tokenizer": base + ".tokenizer.json",
           "config": base + ".config.json"}
  present = [p for p in paths.values() if os.path.exists(p)]
  if present and exported_settings(out) is None:  # only an earlier export of `out` is replaced
    try:
      with open(paths["config"], encoding="utf-8") as f:
        named = json.load(f).get("state_dict")
    except (OSError, ValueError, AttributeError):
      named = None
    other = isinstance(named, str) and named != os.path.basename(out)
    why = (f"they belong to the export of {named} (the same name with another suffix): give "
           "each format its own name" if other else "they are not an earlier export to this path: give a new name, or delete them "
           "first")
    raise ConfigError(f"--out {out}: {', '.join(present)} already exist(s), and are left as "
                      f"they are: {why}.")
  workdir, step = evaluate.resolve_ckpt(workdir, step, what="the workdir")
  ckpts = ckpt_lib.checkpoint_dir(workdir)
  real = os.path.realpath(ckpts)  # through links too: a link to a step folder is that folder
  if os.path.commonpath([os.path.realpath(folder), real]) == real:
    raise ConfigError(f"--out {out} lies inside the run's checkpoints folder {ckpts}, whose "
                      "step folders Orbax removes when it prunes them: write it elsewhere, e.g. "
                      f"{os.path.join(workdir, 'exported', os.path.basename(out))}.")
  restored = evaluate.restore_run(workdir, step, replica)
  lead = 0
  if replica is None and restored.record.best_replica in restored.replicas:
    lead = restored.replicas.index(restored.record.best_replica)
  state = to_torch_state_dict(restored.variables(lead))
  bad = non_finite(state)
  if bad:  # import refuses such weights: a file nothing can load is not written
    from infinito_jax.errors import DataError  # pylint: disable=g-import-not-at-top
    raise DataError(f"the weights of replica {restored.replicas[lead]} ({restored.notes[lead]}) "
                    f"hold NaN or infinite values in {len(bad)} tensor(s) "
                    f"({', '.join(bad[:4])}{', ...' if len(bad) > 4 else ''}): a diverged model, "
                    "which import would refuse; export a step saved before it diverged (--step "
                    f"S: the steps are the folders in {ckpts}). Nothing was written.")
  m = restored.model_cfg
  settings = {"vocab_size": m.vocab_size, "hidden_dim": m.hidden_dim,
              "num_layers": m.num_layers, "num_heads": m.num_heads,
              "memory_slots": m.memory_slots, "slot_size": m.slot_size, "max_len": m.max_len,
              "dropout": m.dropout, "causal": m.causal, "fuse_memory": m.fuse_memory,
              "state_dict": os.path.basename(out), "source": {"workdir": workdir, "step": restored.steps[lead],
                         "replica": restored.replicas[lead]}}

  def write_state(tmp):
    if fmt == "npz":
      with open(tmp, "wb") as f:
        np.savez(f, **state)
    elif fmt == "safetensors":
      from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
      save_file(state, tmp, metadata={"format": "infinito_v52", "source": workdir})
    else:
      torch.save({"model_state_dict": {k: torch.from_numpy(v) for k, v in state.items()}}, tmp)

  def write_text(text):
    def write(tmp):
      with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    return write

  try:
    if make_folder:
      os.makedirs(folder, exist_ok=True)
    # all three written before any is renamed into place (the settings first: they mark the
    # files as an export of `out`, which a retry may replace): a full disk leaves none behind
    lifecycle.write_atomically([(paths["config"], write_text(json.dumps(settings, indent=1))),
                                (paths["tokenizer"], write_text(restored.tokenizer.to_json())),
                                (out, write_state)])
  except Exception as e:  # OSError, or safetensors' own error for the same causes
    from infinito_jax.errors import DiskFullError  # pylint: disable=g-import-not-at-top
    if isinstance(e, OSError) and ckpt_lib.is_disk_full(e):
      raise DiskFullError(f"no space left on the device to write {out}: free space and export "
                          "again; the run is untouched.") from None
    if isinstance(e, OSError) or type(e).__name__ == "SafetensorError":
      raise ConfigError(f"--out {out}: cannot write in {folder} ({type(e).__name__}: "
                        f"{getattr(e, 'strerror', None) or e}); choose a folder you can write "
                        "to. The run is untouched.") from None
    raise
  chosen = restored.notes[lead]
  diverged = restored.record.replicas[restored.replicas[lead]].diverged
  if diverged and "diverged" not in chosen:  # (train.on_divergence='freeze'; evaluate's
    # note on the step may say it already)
    chosen += (f"; this replica diverged in training at step {diverged['step']}"
               + (" and was frozen with the weights it had then"
                  if restored.steps[lead] >= diverged["step"] else ", after this step"))
  return {**paths, "step": restored.steps[lead], "replica": restored.replicas[lead],
          "chosen": chosen}


def _cli() -> None:
  """`python -m infinito_jax.convert import|export ...` (see the module docstring)."""
  # pylint: disable=g-import-not-at-top
  import sys
  from absl import app, flags, logging
  from ml_collections import config_flags
  from infinito_jax import cli, evaluate
  from infinito_jax.errors import InfinitoError

  cli.survive_closed_output()
  config_flag = config_flags.DEFINE_config_file(
      "config", None, "import: the run config the weights are for, e.g. configs/wikitext2.py "
      "(set the model's shape with --config.model.FIELD=VALUE).", lock_config=True)
  workdir = flags.DEFINE_string("workdir", None, "import: the new run's folder.")
  vocab = flags.DEFINE_string("vocab", None, "import: a tokenizer JSON or a JSON list of words "
                              "in id order (default: built from the config's training split).")
  fmt = flags.DEFINE_enum("format", None, list(FORMATS), "export: the file format (default: "
                          "from --out's suffix, else safetensors).")
  out = flags.DEFINE_string("out", None, "export: the state dict's path (default: "
                            "<workdir>/exported/<format>/model.<format>).")
  step = flags.DEFINE_integer("step", None, "export: the checkpoint step (default: the best).")
  replica = flags.DEFINE_integer("replica", None, "export: the replica of a population "
                                 "(default: the best).")
  usage = ("usage: python -m infinito_jax.convert import MODEL.pt --config CONFIG --workdir W\n"
           "       python -m infinito_jax.convert export W [--format pt|safetensors|npz] "
           "[--out FILE]")

  def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)

  def parse(argv):
    from infinito_jax import config as config_lib
    for i, arg in enumerate(argv):  # a config imports `configs.default`: from its project root
      path = (arg.split("=", 1)[1] if arg.startswith("--config=") else
              argv[i + 1] if arg == "--config" and i + 1 < len(argv) else None)
      if path and os.path.isfile(path.split(":", 1)[0]):
        root = os.path.dirname(os.path.dirname(os.path.abspath(path.split(":", 1)[0])))
        if root not in sys.path:
          sys.path.insert(0, root)
    cli.check_config_fields(argv, config_lib.FIELDS)
    return cli.parse_flags(argv, "python -m infinito_jax.convert", "wikitext2.py, demo.py, ...",
                           "A config is a Python file whose get_config() returns a ConfigDict "
                           "built on configs/default.py.", nullable=config_lib.NULLABLE)

  @errors.on_command_line  # its errors name its flags
  def main(argv):
    if not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)
    if len(argv) != 3 or argv[1] not in ("import", "export"):
      fail(f"expected 'import FILE' or 'export WORKDIR', got {argv[1:]}.\n{usage}")
    command, path = argv[1], argv[2]
    own = {"import": ("config", "workdir", "vocab"), "export": ("format", "out", "step", "replica")}
    other = "export" if command == "import" else "import"
    stray = [f"--{n}" for n in own[other] if flags.FLAGS[n].present]
    if stray:
      fail(f"{', '.join(stray)} {'is' if len(stray) == 1 else 'are'} for {other}, not "
           f"{command}: drop {'it' if len(stray) == 1 else 'them'}.\n{usage}")
    try:
      if command == "import":
        if not flags.FLAGS["config"].present or not workdir.value:
          fail(f"import needs --config and --workdir.\n{usage}")
        config = cli.load_config(config_flag, "python -m infinito_jax.convert",
                                 "configs/wikitext2.py")
        s = import_original(path, config, workdir.value, vocab=vocab.value)
        if s["vocab"]:
          print(f"note: the vocabulary is {s['vocab']} (--vocab chooses another).")
        elif vocab.value:
          print(f"note: the vocabulary is {vocab.value} (--vocab), {s['vocab_words']} words.")
        elif s["rebuilt_vocab"]:
          print("note: the vocabulary was rebuilt from the config's training split by the "
                "original's rule: the original's ids only if that is the text it was trained on "
                "(--vocab FILE gives its word list).")
        if s["cast"]:
          print(f"note: entries of dtype {', '.join(s['cast'])} are kept as float32, as every "
                "weight here is (an export writes float32).")
        if s["ignored"]:
          print(f"note: ignored {len(s['ignored'])} attention-weight cache(s) of the original "
                f"({', '.join(s['ignored'])}): analysis caches of its last forward pass, "
                "used by nothing.")
        if config.model.causal and not (s["exported"] or {}).get("causal"):
          print("note: the original applies no causal mask, and this config is causal "
                "(model.causal=True): the imported model predicts each word from the earlier "
                "ones only, which it was not trained to do; fine-tune it, or pass "
                "--config.model.causal=false to score it as the original computes.")
        print(f"Imported {path} into {s['workdir']} (step 0, {s['parameters']:,} parameters).\n"
              f"Evaluate:  python {cli.script('evaluate.py')} --ckpt {workdir.value}\n"
              f"Fine-tune: python {cli.script('train.py')} --config "
              f"{flags.FLAGS['config'].config_filename} "
              f"--workdir {workdir.value} (with the same --config overrides)")
      else:
        kind = fmt.value or (_SUFFIXES.get(os.path.splitext(out.value)[1].lower())
                             if out.value else None) or "safetensors"
        if (out.value and not fmt.value  # no --format to blame: the suffix names no format
            and os.path.splitext(out.value)[1].lower() not in _SUFFIXES
            and not out.value.endswith(os.sep) and not os.path.isdir(out.value)):  # a folder:
          # export_original names it so
          cli.fail(f"--out {out.value}: the format is read from its suffix, one of "
                   f"{', '.join(sorted(_SUFFIXES))}; name the file with one (or pass --format "
                   f"{' | '.join(FORMATS)} and a name with its suffix).")
        target = out.value
        if target is None:  # in the run's workdir (also for a step's folder), a folder a format
          run_dir, _ = evaluate.resolve_ckpt(path, step.value, what="the workdir")
          target = os.path.join(run_dir, "exported", kind, f"model.{kind}")
        r = export_original(path, target, kind, step=step.value, replica=replica.value,
                            make_folder=out.value is None)
        print(f"Exported {r['chosen']} (replica {r['replica']}) as {kind}:\n"
              f"  state dict: {r['state_dict']}\n  tokenizer:  {r['tokenizer']}\n"
              f"  settings:   {r['config']}")
    except InfinitoError as e:
      fail(str(e))

  app.run(main, flags_parser=parse)


if __name__ == "__main__":
  _cli()
