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


def test_a_populations_variables_are_refused_by_name_not_written_misshaped(reference):
  """to_torch_state_dict takes one model's variables: a leading replica axis (a population's
  state, restore_run's stacked params) would come out as state-dict entries of shapes the
  original cannot load, (32, 32, 1) for a [32, 32] weight; it is refused, saying what to pass."""
  for n in (1, 2):
    stacked = jax.tree_util.tree_map(lambda x, n=n: np.stack([np.asarray(x)] * n),
                                     reference["variables"])
    with pytest.raises(ValueError, match=rf"a leading axis of {n} .*run.variables\(i\)"):
      to_torch_state_dict(stacked)
  one = jax.tree_util.tree_map(lambda x: x[1], stacked)  # as the message says: the same state
  back = to_torch_state_dict(one)
  for name, value in reference["state"].items():
    np.testing.assert_array_equal(back[name], value, err_msg=name)


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
  # nothing of the original's at all: no config would fit, and the message says so
  for other, says in (({}, "it is empty"), ({"encoder.weight": np.zeros(3)},
                                            "its entries are ['encoder.weight']")):
    with pytest.raises(ValueError, match=r"holds none of INFINITO V5.2's entries .*: "
                                         + re.escape(says) + r". Not a state dict of this model"):
      from_torch_state_dict(other, reference["config"])


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


# ----- the original's real trained checkpoint, and workdirs in and out -----

import dataclasses  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import pathlib  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from conftest import need_fixture  # noqa: E402
from infinito_jax.convert import (drop_cache_buffers, export_original,  # noqa: E402
                                  exported_settings, import_original, read_state_dict)
from infinito_jax.errors import CheckpointError, ConfigError, DataError, WorkdirError  # noqa: E402
from infinito_jax.memory import MEMORY  # noqa: E402
from infinito_jax.model import ModelConfig, model_config  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the model of ../shared/fixtures/original_trained_checkpoint (its JSON says so), as overrides
TRAINED_FLAGS = ["--config.model.vocab_size=89", "--config.model.hidden_dim=24",
                 "--config.model.num_heads=3", "--config.model.memory_slots=6",
                 "--config.model.max_len=1000", "--config.model.causal=false",
                 "--config.data.corpus.num_words=80"]  # a vocabulary that fits 89 ids


@pytest.fixture(scope="module")
def trained():
  """The state dict the original trainer saved after 3 AdamW steps, with its eval call."""
  z = np.load(need_fixture("original_trained_checkpoint.npz"))
  meta = json.loads(need_fixture("original_trained_checkpoint.json").read_text())
  c = meta["config"]
  config = ModelConfig(vocab_size=c["vocab_size"], hidden_dim=c["hidden_dim"],
                       num_layers=c["num_layers"], num_heads=c["num_heads"],
                       memory_slots=c["memory_slots"], causal=False)
  state = {k[len("state/"):]: z[k] for k in z.files if k.startswith("state/")}
  return dict(z=z, meta=meta, config=config, state=state)


def test_trained_original_checkpoint_loads_and_matches_its_eval(trained):
  """A real state dict of the original (with its last_attention_weights caches) loads, and its
  eval call is reproduced within SPEC's 1e-5: logits, the memory after the call, and phi."""
  assert any("last_attention_weights" in k for k in trained["state"])
  variables = from_torch_state_dict(trained["state"], trained["config"])
  z = trained["z"]
  (logits, metrics), upd = InfinitoV52(trained["config"]).apply(
      variables, jnp.asarray(z["x"]), with_metrics=True, mutable=[MEMORY])
  np.testing.assert_allclose(logits, z["eval/logits"], atol=1e-5, rtol=0)
  after = to_torch_state_dict({"params": variables["params"], MEMORY: upd[MEMORY]})
  for name in ("memory.memory", "memory.memory_age", "memory.memory_importance",
               "memory.access_count", "memory.memory_utilization_tracker"):
    np.testing.assert_allclose(after[name], z[f"eval/state/{name}"], atol=1e-5, rtol=0,
                               err_msg=name)
  assert abs(float(metrics["integration_phi"]) - trained["meta"]["eval_integration_phi"]) < 1e-5


def test_cache_buffers_are_the_only_entries_dropped(trained):
  """drop_cache_buffers removes exactly the per-layer caches; every other entry must match."""
  kept, ignored = drop_cache_buffers(trained["state"])
  assert ignored == ["attention_layers.0.last_attention_weights",
                     "attention_layers.1.last_attention_weights"]
  assert set(kept) | set(ignored) == set(trained["state"])
  bad = dict(kept, **{"attention_layers.0.last_attention_weightz": np.zeros(1)})
  with pytest.raises(ValueError, match="unknown: \\['attention_layers.0.last_attention_weightz"):
    from_torch_state_dict(bad, trained["config"])


def _tiny(**model):
  from configs import tiny  # pylint: disable=g-import-not-at-top
  c = tiny.get_config()
  for k, v in model.items():
    setattr(c.model, k, v)
  return c


def test_import_names_the_flags_a_mismatched_config_needs(trained, tmp_path):
  """A config of another shape is refused before anything is written, and the message gives
  the --config.model flags that the state dict's shapes imply."""
  src = tmp_path / "orig.npz"
  np.savez(src, **trained["state"])
  with pytest.raises(ConfigError) as err:
    import_original(str(src), _tiny(), str(tmp_path / "w"))
  msg = str(err.value)
  for flag in ("config.model.vocab_size = 89", "config.model.hidden_dim = 24",
               "config.model.num_heads = 3", "config.model.memory_slots = 6"):
    assert flag in msg
  assert "more)" in msg  # dozens of mis-shaped entries are summed up, not all listed
  assert not (tmp_path / "w").exists()


def test_bad_state_dict_files_are_named(tmp_path):
  """Missing, foreign and damaged files give a DataError that names the file."""
  with pytest.raises(DataError, match="no checkpoint file at"):
    read_state_dict(tmp_path / "none.npz")
  (tmp_path / "x.ckpt").write_text("x")
  with pytest.raises(DataError, match=r"unknown kind of file; give a \.pt"):
    read_state_dict(tmp_path / "x.ckpt")
  (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 not really a zip")
  with pytest.raises(DataError, match="bad.npz cannot be read as a npz state dict"):
    read_state_dict(tmp_path / "bad.npz")
  (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 3)
  with pytest.raises(DataError, match="cannot be read as a safetensors"):
    read_state_dict(tmp_path / "bad.safetensors")


def _cli(*args, cwd=ROOT):
  return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                        timeout=600)


@pytest.mark.slow
def test_import_then_export_is_bitwise_and_the_workdir_is_a_run(trained, tmp_path):
  """import -> export gives back the input bitwise (caches aside) as npz and safetensors
  (and pt where torch is installed); the imported workdir is a run that evaluate.py scores
  through each --ckpt form (workdir, checkpoints folder, step folder) and train.py fine-tunes;
  a used workdir is refused."""
  src = tmp_path / "orig.npz"
  np.savez(src, **trained["state"])
  work = tmp_path / "imported"
  out = _cli("-m", "infinito_jax.convert", "import", str(src), "--config", "configs/tiny.py",
             "--workdir", str(work), *TRAINED_FLAGS)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "ignored 2 attention-weight cache(s)" in out.stdout
  assert "note: the vocabulary was rebuilt from the config's training split" in out.stdout
  assert "kept as float32" not in out.stdout  # the original's float32, as it is
  with pytest.raises(WorkdirError, match="already holds a run"):
    import_original(str(src), _tiny(vocab_size=89, hidden_dim=24, num_heads=3, memory_slots=6,
                                    max_len=1000, causal=False), str(work))

  expected, _ = drop_cache_buffers(trained["state"])
  formats = ["npz", "safetensors"] + (["pt"] if _has_torch() else [])
  for fmt in formats:
    dest = tmp_path / f"back_{fmt}.{fmt}"  # a stem each: the side files are the stem's
    out = _cli("-m", "infinito_jax.convert", "export", str(work), "--out", str(dest))
    assert out.returncode == 0, out.stderr[-3000:]
    back = read_state_dict(dest)
    assert set(back) == set(expected), fmt
    for k, v in expected.items():
      assert back[k].dtype == v.dtype and back[k].shape == v.shape, (fmt, k)
      np.testing.assert_array_equal(back[k], v, err_msg=f"{fmt} {k}")
    words = json.loads((tmp_path / f"back_{fmt}.tokenizer.json").read_text())["words"]
    assert words[:3] == ["<pad>", "<unk>", "<eos>"] and len(words) <= 89
    settings = json.loads((tmp_path / f"back_{fmt}.config.json").read_text())
    assert settings["num_heads"] == 3 and settings["state_dict"] == dest.name

  reports = []
  for ckpt in (work, work / "checkpoints", work / "checkpoints" / "0"):
    out = _cli("evaluate.py", "--ckpt", str(ckpt), "--out", str(tmp_path / "r.json"))
    assert out.returncode == 0, (ckpt, out.stderr[-3000:])
    reports.append(json.loads((tmp_path / "r.json").read_text()))
  assert {r["step"] for r in reports} == {0}
  assert len({r["loss"] for r in reports}) == 1  # the same model scored, whatever the form
  # imported as the original computes (causal=false): the report says what its perplexity is
  assert all(r["note"].startswith("model.causal=false: each position attends to the later")
             for r in reports)
  assert "note: model.causal=false" in out.stdout
  out = _cli("train.py", "--config", "configs/tiny.py", "--workdir", str(work),
             "--config.train.epochs=1", *TRAINED_FLAGS)
  assert out.returncode == 0, out.stderr[-3000:]
  summary = json.loads((work / "summary.json").read_text())
  assert summary["steps"] > 0 and summary["best_val_loss"] < reports[0]["loss"]  # it learned
  history = [json.loads(l) for l in (work / "history.jsonl").read_text().splitlines()]
  assert history[0]["kind"] == "import" and history[0]["source"] == str(src)


def _has_torch() -> bool:
  try:
    import torch  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    return True
  except ImportError:
    return False


def test_export_refuses_unknown_format_and_missing_folder(tmp_path):
  """Export checks its output before restoring anything."""
  with pytest.raises(ConfigError, match=r"^fmt must be one of .*\(or give `out` a .pt"):
    export_original(str(tmp_path), str(tmp_path / "m.bin"))
  with pytest.raises(ConfigError, match="does not exist"):
    export_original(str(tmp_path), str(tmp_path / "no" / "m.npz"))


def test_a_state_dict_kept_beside_other_arrays_is_found(trained):
  """The original fixture file itself (state/* beside x and eval/*) reads as its state dict."""
  state = read_state_dict(need_fixture("original_trained_checkpoint.npz"))
  assert set(state) == set(trained["state"])


def test_export_refuses_a_folder_and_a_suffix_that_is_not_the_format(tmp_path):
  """--out naming a folder, or a suffix other than the format's, is refused before any work
  (import reads a file by its suffix); nothing is left behind."""
  with pytest.raises(ConfigError, match="is a folder"):
    export_original(str(tmp_path), str(tmp_path), "npz")
  with pytest.raises(ConfigError, match=r"does not end in \.safetensors"):
    export_original(str(tmp_path), str(tmp_path / "m.npz"), "safetensors")
  assert os.listdir(tmp_path) == []


def test_the_readmes_python_snippet_runs_as_written(tmp_path, monkeypatch):
  """README's converter snippet, with its file name pointing at a state dict of that shape
  (npz: no torch needed), gives the variables that made the file, and back the state dict."""
  from configs import wikitext2  # noqa: PLC0415
  from infinito_jax.model import model_config  # noqa: PLC0415
  readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
  [snippet] = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S)
               if "from_torch_state_dict" in b]
  cfg = model_config(wikitext2.get_config().model)
  made = jax.jit(lambda k: InfinitoV52(cfg).init(
      k, jnp.zeros((1, 4), jnp.int32), train=False))(jax.random.key(0))
  state = to_torch_state_dict(made)
  np.savez(tmp_path / "infinito_v52.npz", **state)
  monkeypatch.chdir(tmp_path)
  scope = {}
  exec(snippet.replace("infinito_v52.pt", "infinito_v52.npz"), scope)  # pylint: disable=exec-used
  assert jax.tree_util.tree_all(jax.tree_util.tree_map(
      np.array_equal, made["params"], scope["variables"]["params"]))
  assert sorted(scope["state"]) == sorted(state)
  assert all(np.array_equal(scope["state"][k], state[k]) for k in state)


def test_a_run_config_in_place_of_a_model_config_is_named(reference):
  from configs import tiny  # noqa: PLC0415
  with pytest.raises(TypeError, match=r"needs a ModelConfig, got ConfigDict.*model_config"):
    from_torch_state_dict(reference["state"], tiny.get_config())


def test_export_replaces_only_an_earlier_export(tmp_path):
  """--out naming a file that is not an earlier export (no export's .config.json beside it),
  or a foreign .config.json, is refused before any work and left byte for byte as it was."""
  precious = tmp_path / "precious.npz"
  precious.write_bytes(b"my data")
  with pytest.raises(ConfigError, match="are not an earlier export"):
    export_original(str(tmp_path / "run"), str(precious))
  assert precious.read_bytes() == b"my data"
  notes = tmp_path / "m.config.json"
  notes.write_text('{"my": "important config"}')
  with pytest.raises(ConfigError, match="m.config.json already exist.*not an earlier export"):
    export_original(str(tmp_path / "run"), str(tmp_path / "m.safetensors"))
  assert notes.read_text() == '{"my": "important config"}'
  assert sorted(os.listdir(tmp_path)) == ["m.config.json", "precious.npz"]
  # side files of another format's export to the same stem are that export's, not this one's
  notes.write_text(json.dumps({"vocab_size": 9, "hidden_dim": 8, "num_layers": 1,
                               "num_heads": 2, "memory_slots": 4, "slot_size": 64,
                               "max_len": 16, "state_dict": "m.npz", "source": {}}))
  with pytest.raises(ConfigError, match=r"they belong to the export of m.npz \(the same name "
                                        r"with another suffix\): give each format its own name"):
    export_original(str(tmp_path / "run"), str(tmp_path / "m.safetensors"))
  assert exported_settings(str(tmp_path / "m.npz"))["state_dict"] == "m.npz"
  assert exported_settings(str(tmp_path / "m.safetensors")) is None  # import will not pair them


def _exported(trained, tmp_path, **settings):
  """The fixture's state dict as export writes it: the file, its tokenizer and its settings."""
  from infinito_jax.tokenizer import SPECIALS, WordTokenizer  # pylint: disable=g-import-not-at-top
  src = tmp_path / "model.npz"
  np.savez(src, **drop_cache_buffers(trained["state"])[0])
  words = list(SPECIALS) + [f"w{i}" for i in range(86)]
  (tmp_path / "model.tokenizer.json").write_text(WordTokenizer(words).to_json())
  c = trained["config"]
  meta = {"vocab_size": c.vocab_size, "hidden_dim": c.hidden_dim, "num_layers": c.num_layers,
          "num_heads": c.num_heads, "memory_slots": c.memory_slots, "slot_size": c.slot_size,
          "max_len": c.max_len, "dropout": 0.1, "causal": False, "fuse_memory": False,
          "source": {"workdir": "elsewhere", "step": 3, "replica": 0}, **settings}
  (tmp_path / "model.config.json").write_text(json.dumps(meta))
  return src, words


def _trained_tiny():
  c = _tiny(vocab_size=89, hidden_dim=24, num_heads=3, memory_slots=6, max_len=1000,
            causal=False)
  c.data.corpus.num_words = 80
  return c


def test_import_takes_the_vocabulary_and_checks_the_settings_export_wrote(trained, tmp_path):
  """Beside an exported file: its .tokenizer.json is the vocabulary by default (the ids the
  weights were trained with, not one rebuilt from the config's text), and its .config.json
  must agree with the config, num_heads too, which no shape shows."""
  from infinito_jax import evaluate  # pylint: disable=g-import-not-at-top
  src, words = _exported(trained, tmp_path, num_heads=4)
  with pytest.raises(ConfigError, match=r"num_heads=4 .*pass config.model.num_heads = 4\."):
    import_original(str(src), _trained_tiny(), str(tmp_path / "w0"))
  assert not (tmp_path / "w0").exists()
  src, words = _exported(trained, tmp_path)
  summary = import_original(str(src), _trained_tiny(), str(tmp_path / "w1"))
  assert summary["vocab"] == str(tmp_path / "model.tokenizer.json")
  assert evaluate.restore_run(str(tmp_path / "w1")).tokenizer.words == words
  summary = import_original(str(src), _trained_tiny(), str(tmp_path / "w2"),
                            vocab=str(tmp_path / "model.tokenizer.json"))
  assert summary["vocab"] is None  # chosen by the caller: the command line says which
  vocab = tmp_path / "words.json"
  vocab.write_text(json.dumps(words))
  out = _cli("-m", "infinito_jax.convert", "import", str(src), "--config", "configs/tiny.py",
             "--workdir", str(tmp_path / "w3"), "--vocab", str(vocab), *TRAINED_FLAGS)
  assert out.returncode == 0, out.stderr[-3000:]
  assert f"note: the vocabulary is {vocab} (--vocab), {len(words)} words." in out.stdout


def test_import_refuses_weights_that_are_not_finite(trained, tmp_path):
  """A diverged model (a NaN or inf anywhere) is refused with the tensor's name, before a
  workdir is made."""
  state = dict(trained["state"])
  emb = state["token_embedding.weight"].copy()
  emb[3, 5] = np.nan
  state["token_embedding.weight"] = emb
  np.savez(tmp_path / "nan.npz", **state)
  with pytest.raises(DataError, match=r"NaN or infinite values in 1 tensor\(s\) "
                                      r"\(token_embedding.weight\)"):
    import_original(str(tmp_path / "nan.npz"), _trained_tiny(), str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()
  # finite in float64, infinite in float32 (where every weight is kept): refused as well
  state = dict(trained["state"])
  bias = state["output_projection.bias"].astype(np.float64)
  bias[0] = 1e300
  state["output_projection.bias"] = bias
  np.savez(tmp_path / "big.npz", **state)
  with pytest.raises(DataError, match=r"in 1 tensor\(s\) \(output_projection.bias\) as float32 "
                                      r"\(output_projection.bias: finite as saved, but beyond "
                                      r"float32's range"):
    import_original(str(tmp_path / "big.npz"), _trained_tiny(), str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()
  # and the Python API refuses what the command refuses
  with pytest.raises(ValueError, match=r"NaN or infinite values in 1 entry as float32 "
                                       r"\(output_projection.bias\)"):
    from_torch_state_dict(state, model_config(_trained_tiny().model))
  # a finite float64 entry is imported as float32, and the summary says which dtypes were cast
  state["output_projection.bias"] = trained["state"]["output_projection.bias"].astype(np.float64)
  np.savez(tmp_path / "f64.npz", **state)
  summary = import_original(str(tmp_path / "f64.npz"), _trained_tiny(), str(tmp_path / "w"))
  assert summary["cast"] == ["float64"]


def test_import_refuses_an_unreadable_settings_file_beside_the_weights(trained, tmp_path):
  """A <name>.config.json beside the weights that export's settings cannot be read from (a
  damaged edit) is refused, not passed over: passing over it would skip the checks it allows
  and the vocabulary beside it. Moved away, the import goes on without them."""
  src, _ = _exported(trained, tmp_path)
  settings = tmp_path / "model.config.json"
  for damaged in ("{broken", "[1, 2]", '{"state_dict": 5}'):
    settings.write_text(damaged)
    with pytest.raises(ConfigError, match=r"model.config.json, beside .*model.npz where export "
                                          r"writes its settings, cannot be read as them"):
      import_original(str(src), _trained_tiny(), str(tmp_path / "w"))
    assert not (tmp_path / "w").exists() and settings.read_text() == damaged
  settings.rename(tmp_path / "aside.json")
  summary = import_original(str(src), _trained_tiny(), str(tmp_path / "w"))
  assert summary["vocab"] is None and summary["rebuilt_vocab"]


def test_evaluate_refuses_a_non_finite_loss_and_says_why(trained, tmp_path):
  """A NaN or infinite loss is not reported as a score (exit 0, "perplexity nan"): evaluate.py
  says which replica and why, with one error line, and writes no report. Finite but extreme
  weights (importable: every value fits float32) overflow in the activations; weights that
  hold a NaN are named by the array."""
  from infinito_jax import evaluate  # pylint: disable=g-import-not-at-top
  state = dict(trained["state"])
  emb = np.asarray(state["token_embedding.weight"], np.float32)
  state["token_embedding.weight"] = np.where(emb > 0, 3e38, -3e38).astype(np.float32)
  np.savez(tmp_path / "extreme.npz", **state)
  import_original(str(tmp_path / "extreme.npz"), _trained_tiny(), str(tmp_path / "run"))
  out = _cli("evaluate.py", "--ckpt", str(tmp_path / "run"))
  line = _one_error_line(out)
  assert re.search(r"the loss on validation is not finite for replica 0 at step 0 \((nan|inf)\): "
                   r"its weights are finite, and its activations overflow on this text\. "
                   r"Nothing is written\. A diverged or extreme model: no other step is left "
                   r"to choose\.$", line), line  # an import is step 0 alone
  assert not [f for f in os.listdir(tmp_path / "run") if f.startswith("eval_")]
  restored = evaluate.restore_run(str(tmp_path / "run"))
  params = jax.tree_util.tree_map(np.array, restored.params)
  params["layers_1"]["ff_out"]["bias"][0, 3] = np.nan
  broken = dataclasses.replace(restored, params=params)
  with pytest.raises(CheckpointError, match=r"its weights hold NaN or infinite values in 1 "
                     r"array\(s\) \(\['layers_1'\]\['ff_out'\]\['bias'\]\)"):
    evaluate.refuse_non_finite(broken, evaluate.evaluate_split(broken, "validation"),
                               "validation")
  # a replica frozen by a divergence at step 7 holds the same weights from step 6 on: only the
  # steps before score it otherwise (it offered 6 and 8, which hold the same, in a loop)
  import copy  # pylint: disable=g-import-not-at-top
  for step in (5, 6, 8):
    (tmp_path / "frozen" / "checkpoints" / str(step)).mkdir(parents=True)
  record = copy.deepcopy(broken.record)
  record.replicas[0].diverged = {"step": 7}
  frozen = dataclasses.replace(broken, record=record, steps=[8])
  scores = evaluate.evaluate_split(frozen, "validation")
  with pytest.raises(CheckpointError, match=r"restore_run's step=\) \(available: \[5\]\)\.$"):
    evaluate.refuse_non_finite(frozen, scores, "validation", workdir=str(tmp_path / "frozen"))
  record.replicas[0].diverged = {"step": 6}
  with pytest.raises(CheckpointError, match=r"no step the run keeps holds other weights for it "
                                            r"\(it froze before its earliest kept step\)\.$"):
    evaluate.refuse_non_finite(frozen, scores, "validation", workdir=str(tmp_path / "frozen"))


def test_convert_cli_config_mistakes_are_one_line(tmp_path):
  """A missing --config file and an unknown --config field are one `error:` line, as in
  train.py, not a traceback."""
  for flags, says in ((["--config", "configs/nonexist.py"], "no such file"),
                      (["--config", "configs/tiny.py", "--config.model.nosuch=1"],
                       "the config has no field 'model.nosuch'; fields of model:")):
    out = _cli("-m", "infinito_jax.convert", "import", str(tmp_path / "x.npz"), *flags,
               "--workdir", str(tmp_path / "w"))
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert out.stderr.startswith("error: ") and says in out.stderr, out.stderr


def test_a_vocabulary_with_entries_no_text_can_produce_is_refused(trained, tmp_path):
  """--vocab entries must be single words: 'a b' or '' can never come out of the whitespace
  split, so their ids would be unreachable (a list from another tokenizer, most likely)."""
  src = tmp_path / "orig.npz"
  np.savez(src, **trained["state"])
  vocab = tmp_path / "v.json"
  vocab.write_text(json.dumps(["<pad>", "<unk>", "<eos>", "new york", "the"]))
  with pytest.raises(DataError, match=r"^vocab .*1 entries are not single lower-case words \(\['new york'\]"):
    import_original(str(src), _trained_tiny(), str(tmp_path / "w"), vocab=str(vocab))
  assert not (tmp_path / "w").exists()


@pytest.fixture(scope="module")
def imported(trained, tmp_path_factory):
  """A run at step 0 holding the fixture's weights (what export reads), made in-process."""
  root = tmp_path_factory.mktemp("imported")
  src = root / "orig.npz"
  np.savez(src, **trained["state"])
  import_original(str(src), _trained_tiny(), str(root / "run"))
  return root / "run"


def _one_error_line(out) -> str:
  assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
  lines = [l for l in out.stderr.splitlines() if l.strip()]
  assert lines[0].startswith("error: "), out.stderr[-2000:]
  return lines[0]


@pytest.mark.slow
def test_export_defaults_go_to_the_workdir_and_never_into_orbax_folders(imported, tmp_path):
  """Without --out, each format has its own default path in <workdir>/exported (the README's
  'safetensors, or npz' both work), also when a step's folder is given: never inside
  checkpoints/, whose step folders Orbax deletes when it prunes; an --out there is refused."""
  import shutil  # pylint: disable=g-import-not-at-top
  run = tmp_path / "run"
  shutil.copytree(imported, run)
  for fmt, given in (("safetensors", run), ("npz", run / "checkpoints" / "0")):
    out = _cli("-m", "infinito_jax.convert", "export", str(given), "--format", fmt)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (run / "exported" / fmt / f"model.{fmt}").is_file(), out.stdout
  assert sorted(os.listdir(run / "checkpoints")) == ["0"]  # nothing added among the steps
  assert os.listdir(run / "checkpoints" / "0") == os.listdir(imported / "checkpoints" / "0")
  a = read_state_dict(run / "exported" / "safetensors" / "model.safetensors")
  b = read_state_dict(run / "exported" / "npz" / "model.npz")
  assert all(np.array_equal(a[k], b[k]) for k in a) and set(a) == set(b)
  out = _cli("-m", "infinito_jax.convert", "export", str(run), "--out",
             str(run / "checkpoints" / "0" / "m.npz"))
  assert "inside the run's checkpoints folder" in _one_error_line(out)
  # a folder there: the example path offered is one that export takes
  out = _cli("-m", "infinito_jax.convert", "export", str(run), "--out", str(run / "checkpoints"),
             "--format", "npz")
  example = run / "exported" / "npz" / "model.npz"
  assert _one_error_line(out).endswith(f"is a folder; give a file path, e.g. {example}.")
  shutil.rmtree(run / "exported" / "npz")  # and it is taken as given: its folder is made
  out = _cli("-m", "infinito_jax.convert", "export", str(run), "--out", str(example))
  assert out.returncode == 0 and example.is_file(), out.stderr[-2000:]
  (tmp_path / "steplink").symlink_to(run / "checkpoints" / "0")  # nor through a link
  out = _cli("-m", "infinito_jax.convert", "export", str(run), "--out",
             str(tmp_path / "steplink" / "m.npz"))
  assert "inside the run's checkpoints folder" in _one_error_line(out)
  # an --out whose suffix names no format, and no --format: the suffixes are the fix (it
  # said "does not end in .safetensors, the suffix of --format safetensors", never given)
  out = _cli("-m", "infinito_jax.convert", "export", str(run), "--out", str(tmp_path / "x.txt"))
  line = _one_error_line(out)
  assert "the format is read from its suffix, one of .npz, .pt, .pth, .safetensors" in line
  assert "does not end in" not in line
  # an existing folder as --out, no --format: named a folder, not a suffix to fix
  out = _cli("-m", "infinito_jax.convert", "export", str(run), "--out", str(tmp_path))
  assert _one_error_line(out).endswith(f"is a folder; give a file path, e.g. "
                                       f"{tmp_path / 'model.safetensors'}.")
  # a workdir that is a file, or none at all: one line, and no folder made
  (tmp_path / "afile").write_text("x")
  for bad, says in ((tmp_path / "afile", "is a file"), (tmp_path / "none", "no such folder")):
    out = _cli("-m", "infinito_jax.convert", "export", str(bad))
    assert says in _one_error_line(out)
  assert sorted(os.listdir(tmp_path)) == ["afile", "run", "steplink"]


def test_export_writes_atomically_beside_files_it_does_not_own(imported, tmp_path):
  """The temporary file is export's own (a file named <out>.tmp is not touched); the state
  dict gets a plain file's permissions; a folder that cannot be written is one error naming
  it, with nothing else changed."""
  (tmp_path / "m.npz.tmp").write_text("mine")
  export_original(imported, tmp_path / "m.safetensors")  # pathlib.Path arguments too
  assert (tmp_path / "m.npz.tmp").read_text() == "mine"
  umask = os.umask(0)
  os.umask(umask)
  assert os.stat(tmp_path / "m.safetensors").st_mode & 0o777 == 0o666 & ~umask
  assert sorted(os.listdir(tmp_path)) == ["m.config.json", "m.npz.tmp", "m.safetensors",
                                          "m.tokenizer.json"]
  with pytest.raises(ConfigError, match=r"`out` /proc/m.npz: cannot write in /proc .*choose a "
                                        r"folder you can write to"):
    export_original(str(imported), "/proc/m.npz")
  (tmp_path / "f").write_text("x")
  with pytest.raises(ConfigError, match="is a file, not a folder"):
    export_original(str(imported), str(tmp_path / "f" / "m.npz"), make_folder=True)


def test_import_refuses_an_export_whose_causality_or_memory_use_differs(trained, tmp_path):
  """causal and fuse_memory change what the weights compute, so an export's .config.json is
  checked for them as for shapes, with the flag that agrees."""
  src, _ = _exported(trained, tmp_path, fuse_memory=True)
  with pytest.raises(ConfigError, match=r"fuse_memory=true .*pass config.model.fuse_memory = True"):
    import_original(str(src), _trained_tiny(), str(tmp_path / "w"))
  src, _ = _exported(trained, tmp_path, causal=True)
  with pytest.raises(ConfigError, match=r"causal=true .*pass config.model.causal = True"):
    import_original(str(src), _trained_tiny(), str(tmp_path / "w"))
  # a hand-edited "true" (a string) or 1 is not taken for "no setting": it names the file
  src, _ = _exported(trained, tmp_path, causal="true", fuse_memory=1)
  with pytest.raises(ConfigError, match=r'model.config.json has causal="true", fuse_memory=1: '
                                        r"export writes these as JSON true or false"):
    import_original(str(src), _trained_tiny(), str(tmp_path / "w"))
  # nor a shape written as 24.0 or "24", which made the whole file count as absent
  src, _ = _exported(trained, tmp_path, hidden_dim=24.0, num_heads="3", causal=True)
  with pytest.raises(ConfigError, match=r'has hidden_dim=24.0, num_heads="3": export writes '
                                        r"these as JSON integers"):
    import_original(str(src), _trained_tiny(), str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


def test_import_refuses_repeated_words_foreign_dtypes_and_a_used_folder(trained, tmp_path):
  """A --vocab repeating a word (its earlier id could never be produced), a tensor that is
  not floating point (the original saves float32 only), a .npz that is no zip, and a folder
  holding a run's config.json or summary.json are refused, each by name."""
  src = tmp_path / "orig.npz"
  np.savez(src, **trained["state"])
  vocab = tmp_path / "v.json"
  vocab.write_text(json.dumps(["<pad>", "<unk>", "<eos>", "the", "a", "the"]))
  with pytest.raises(DataError, match=r"1 words appear twice \(\['the'\]\)"):
    import_original(str(src), _trained_tiny(), str(tmp_path / "w"), vocab=str(vocab))
  vocab.write_text(json.dumps(["<pad>", "<unk>", "<eos>", "the", "Paris"]))  # text is lowered
  with pytest.raises(DataError, match=r"not single lower-case words \(\['Paris'\]\)"):
    import_original(str(src), _trained_tiny(), str(tmp_path / "w"), vocab=str(vocab))
  state = dict(trained["state"])
  state["layer_norms_1.0.weight"] = state["layer_norms_1.0.weight"].astype(np.int64)
  np.savez(tmp_path / "ints.npz", **state)
  with pytest.raises(ConfigError, match=r"1 entry is not floating point "
                                        r"\(layer_norms_1.0.weight \(int64\)\)"):
    import_original(str(tmp_path / "ints.npz"), _trained_tiny(), str(tmp_path / "w"))
  (tmp_path / "text.npz").write_text("not a zip")
  with pytest.raises(DataError, match="is not an .npz archive"):
    read_state_dict(tmp_path / "text.npz")
  (tmp_path / "used").mkdir()
  (tmp_path / "used" / "summary.json").write_text('{"mine": 1}')
  with pytest.raises(WorkdirError, match="already holds a run"):
    import_original(str(src), _trained_tiny(), str(tmp_path / "used"))
  assert (tmp_path / "used" / "summary.json").read_text() == '{"mine": 1}'
  assert not (tmp_path / "w").exists()


def test_convert_refuses_the_other_commands_flags(tmp_path):
  """export's flags given to import (and the reverse) are named, not silently ignored."""
  out = _cli("-m", "infinito_jax.convert", "export", str(tmp_path), "--vocab", "v.json")
  assert "--vocab is for import, not export" in _one_error_line(out)
  out = _cli("-m", "infinito_jax.convert", "import", str(tmp_path / "x.npz"), "--config",
             "configs/tiny.py", "--workdir", str(tmp_path / "w"), "--step", "5")
  assert "--step is for export, not import" in _one_error_line(out)


def test_restored_variables_index_is_checked_and_step_folders_restore(imported):
  """restore_run takes what --ckpt takes (a step's folder too); variables(i) refuses an index
  past the replicas restored instead of clamping it to the last one."""
  from infinito_jax import evaluate  # pylint: disable=g-import-not-at-top
  a = evaluate.restore_run(str(imported))
  b = evaluate.restore_run(str(imported / "checkpoints" / "0"))
  # a folder inside a step's (as a file browser shows it) is that step too
  assert evaluate.resolve_ckpt(str(imported / "checkpoints" / "0" / "params")) == (
      str(imported), 0)
  with pytest.raises(ConfigError, match=r"is in step 0's folder but step 5 was asked for"):
    evaluate.resolve_ckpt(str(imported / "checkpoints" / "0" / "params"), 5)
  assert b.steps == [0] and jax.tree_util.tree_all(jax.tree_util.tree_map(
      np.array_equal, a.variables(0)["params"], b.variables(0)["params"]))
  with pytest.raises(IndexError, match=r"variables\(1\): 1 replica\(s\) restored"):
    a.variables(1)
  with pytest.raises(ConfigError, match="replica must be an integer"):
    evaluate.restore_run(str(imported), replica="0")


def test_an_export_that_fills_the_disk_leaves_nothing_and_can_be_retried(imported, tmp_path):
  """A real full disk (a tmpfs with room for the state dict alone; needs root): export fails
  with the disk-full line and leaves no file, and once there is room the retry it asks for
  works (it used to rename the state dict into place before writing the JSON files beside it,
  which then did not fit: a half export that the retry refused as 'not an earlier export')."""
  from infinito_jax.errors import DiskFullError  # pylint: disable=g-import-not-at-top
  from test_processes import _can_mount_tmpfs  # pylint: disable=g-import-not-at-top
  mnt = tmp_path / "disk"
  if not _can_mount_tmpfs(mnt):
    pytest.skip("mounting a tmpfs is not permitted here (needs root)")
  export_original(str(imported), str(tmp_path / "probe.npz"))
  pages = -(-os.path.getsize(tmp_path / "probe.npz") // 4096)
  subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
  try:
    st = os.statvfs(mnt)
    filler = (st.f_bavail * st.f_frsize // 4096 - pages) * 4096
    (mnt / "filler").write_bytes(b"\0" * filler)  # room for the state dict, not one page more
    with pytest.raises(DiskFullError, match="no space left on the device .*export again"):
      export_original(str(imported), str(mnt / "m.npz"))
    assert os.listdir(mnt) == ["filler"]
    (mnt / "filler").unlink()
    export_original(str(imported), str(mnt / "m.npz"))
    assert (mnt / "m.npz").read_bytes() == (tmp_path / "probe.npz").read_bytes()
  finally:
    subprocess.run(["umount", "-l", str(mnt)])


def test_a_head_count_the_caches_contradict_is_refused(trained, tmp_path):
  """No weight's shape shows num_heads; a trained original's attention caches do (3 here). A
  config with another count is refused, by import (naming the flag) and by
  from_torch_state_dict: it used to load, and its logits differed from the original's by 0.1."""
  import dataclasses as dc  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="caches .* hold 3 heads and the config 4.*num_heads=3"):
    from_torch_state_dict(trained["state"], dc.replace(trained["config"], num_heads=4))
  src = tmp_path / "orig.npz"
  np.savez(src, **trained["state"])
  config = _trained_tiny()
  config.model.num_heads = 4
  with pytest.raises(ConfigError, match=r"pass config.model.num_heads = 3 .*hold 3 heads"):
    import_original(str(src), config, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


def test_bfloat16_pt_extras_and_a_damaged_tokenizer_beside_the_weights(trained, tmp_path):
  """A bfloat16 .pt imports as its bfloat16 .safetensors does (values kept, in float32); a .pt
  with a non-tensor object beside the weights is refused with the fix, in clean text (torch's
  own message carries terminal codes); a damaged .tokenizer.json beside the weights is named
  as that file, not as a --vocab the user never gave."""
  torch = pytest.importorskip("torch", reason="reading .pt needs the 'torch' extra")
  state = drop_cache_buffers(trained["state"])[0]
  bf16 = {k: torch.from_numpy(np.array(v)).to(torch.bfloat16) for k, v in state.items()}
  torch.save({"model_state_dict": bf16}, tmp_path / "bf16.pt")
  read = read_state_dict(tmp_path / "bf16.pt")
  for k, v in state.items():
    assert str(read[k].dtype) == "bfloat16", k
    np.testing.assert_array_equal(read[k].astype(np.float32),
                                  bf16[k].float().numpy(), err_msg=k)
  assert any(not np.array_equal(read[k].astype(np.float32), v)
             for k, v in state.items())  # the bfloat16 rounding is kept
  torch.save({"model_state_dict": {k: torch.from_numpy(np.array(v)) for k, v in state.items()},
              "val_loss": np.float64(3.2)}, tmp_path / "extra.pt")
  with pytest.raises(DataError, match=r"besides tensors and plain numbers") as e:
    read_state_dict(tmp_path / "extra.pt")
  said = str(e.value)
  assert "\x1b" not in said and "weights_only=False" in said and "weights.pt" in said
  src, _ = _exported(trained, tmp_path)
  (tmp_path / "model.tokenizer.json").write_text('{"words": [')
  with pytest.raises(DataError) as e:
    import_original(str(src), _trained_tiny(), str(tmp_path / "w"))
  said = str(e.value)
  assert said.startswith(f"{tmp_path / 'model.tokenizer.json'}, the tokenizer beside"), said
  assert "--vocab FILE" in said and not said.startswith("--vocab")
  assert not (tmp_path / "w").exists()


def test_export_refuses_weights_that_are_not_finite(tmp_path):
  """A checkpoint whose weights hold a NaN (saved by a run before runs checked their weights
  at each save) exported without a word, into a file import then refused: export refuses it,
  naming the step and how to choose another, and writes nothing."""
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from infinito_jax import lifecycle, train as train_lib  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "run")
  with lifecycle.WorkdirLock(workdir):
    run = train_lib.Run(tiny.get_config(), workdir, announce=False)
    try:
      run.write_config()
      params = jax.tree_util.tree_map(np.array, run.state.params)
      params["layers_0"]["ff_out"]["bias"][0, 1] = np.nan
      run.state = run.state.replace(params=params)
      run.save(0, wait=True)
    finally:
      run.checkpointer.close()
  out = tmp_path / "out"
  out.mkdir()
  with pytest.raises(DataError, match=r"the weights of replica 0 \(the latest step 0: .*\) hold "
                                      r"NaN or infinite values in 1 tensor\(s\) \(ff_layers\.0\.3\."
                                      r"bias\): a diverged model, which import would refuse; "
                                      r"export a step saved before"):
    export_original(workdir, str(out / "m.npz"))
  assert os.listdir(out) == []
