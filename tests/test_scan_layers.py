"""model.scan_layers (one nn.scan over stacked layers) and model.remat: the same function as the
unrolled model, a parameter layout the converters and checkpoints follow, and a clear refusal
when a run would switch layouts."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infinito_jax import config as config_lib
from infinito_jax.convert import from_torch_state_dict, to_torch_state_dict
from infinito_jax.errors import ConfigError
from infinito_jax.model import InfinitoV52, ModelConfig, stack_layers, unstack_layers

CFG = ModelConfig(vocab_size=97, hidden_dim=32, num_layers=3, num_heads=4, memory_slots=8,
                  max_len=32)
SCAN = dataclasses.replace(CFG, scan_layers=True)


def max_diff(a, b):
  return max(float(jnp.max(jnp.abs(jnp.asarray(x, jnp.float32) - y)))
             for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


@pytest.fixture(scope="module")
def setup():
  ids = jax.random.randint(jax.random.key(1), (2, 16), 0, CFG.vocab_size)
  v = InfinitoV52(CFG).init(jax.random.key(0), ids)
  return ids, v, {"params": stack_layers(v["params"]), "memory": v["memory"]}


def test_stacked_layout_is_what_a_scanned_model_initialises(setup):
  ids, _, stacked = setup
  fresh = InfinitoV52(SCAN).init(jax.random.key(0), ids)
  assert (jax.tree_util.tree_structure(fresh["params"])
          == jax.tree_util.tree_structure(stacked["params"]))
  ln1 = fresh["params"]["layers"]["block"]["ln1"]["scale"]
  assert ln1.shape == (CFG.num_layers, CFG.hidden_dim)
  assert "layers_0" not in fresh["params"]


def test_scanned_model_computes_the_unrolled_function(setup):
  """Logits, metrics, the layer-averaged attention and the memory update are equal (eval)."""
  ids, v, stacked = setup
  (a, ma), ua = InfinitoV52(CFG).apply(v, ids, with_metrics=True,
                                       mutable=["memory", "intermediates"])
  (b, mb), ub = InfinitoV52(SCAN).apply(stacked, ids, with_metrics=True,
                                        mutable=["memory", "intermediates"])
  assert max_diff(a, b) < 1e-5
  assert max_diff({k: ma[k] for k in ("integration_phi", "coherence", "complexity")},
                  {k: mb[k] for k in ("integration_phi", "coherence", "complexity")}) < 1e-5
  assert max_diff(ua["intermediates"], ub["intermediates"]) < 1e-6
  assert max_diff(ua["memory"], ub["memory"]) < 1e-5
  # and the gradients, mapped back to the unrolled layout
  def loss(params, cfg):
    (logits, _), _ = InfinitoV52(cfg).apply({"params": params, "memory": v["memory"]}, ids,
                                            mutable=["memory"])
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0])
  ga = jax.grad(loss)(v["params"], CFG)
  gb = unstack_layers(jax.grad(loss)(stacked["params"], SCAN))
  assert max_diff(ga, gb) < 1e-6
  assert max(float(jnp.max(jnp.abs(x))) for x in jax.tree_util.tree_leaves(ga)) > 1e-4


def test_scanned_model_is_causal_and_trains_with_its_keys(setup):
  ids, _, stacked = setup
  rngs = lambda: {"dropout": jax.random.key(3), "explore": jax.random.key(4)}
  model = InfinitoV52(SCAN)
  (a, _), _ = model.apply(stacked, ids, train=True, rngs=rngs(), mutable=["memory"])
  (b, _), _ = model.apply(stacked, ids, train=True, rngs=rngs(), mutable=["memory"])
  assert bool(jnp.all(a == b))  # the same keys: bitwise the same
  changed = ids.at[:, 10].set((ids[:, 10] + 1) % CFG.vocab_size)
  (c, _), _ = model.apply(stacked, changed, train=True, rngs=rngs(), mutable=["memory"])
  assert bool(jnp.all(a[:, :10] == c[:, :10])) and not bool(jnp.all(a[:, 10:] == c[:, 10:]))
  (d, _), _ = model.apply(stacked, ids, train=True,
                          rngs={"dropout": jax.random.key(5), "explore": jax.random.key(4)},
                          mutable=["memory"])
  assert max_diff(a, d) > 1e-3  # each layer draws its own dropout bits


@pytest.mark.parametrize("policy", ["nothing", "dots"])
@pytest.mark.parametrize("scan", [False, True])
def test_remat_recomputes_the_same_gradients(setup, scan, policy):
  """Whatever a rematerialised layer keeps (model.remat_policy), the gradients are the ones of
  the layer that keeps everything: the recomputed dropout masks come from the same keys."""
  ids, v, stacked = setup
  params = stacked["params"] if scan else v["params"]
  base = SCAN if scan else CFG

  def loss(p, cfg):
    (logits, _), _ = InfinitoV52(cfg).apply(
        {"params": p, "memory": v["memory"]}, ids, train=True,
        rngs={"dropout": jax.random.key(3), "explore": jax.random.key(4)}, mutable=["memory"])
    return jnp.mean(logits ** 2)

  g = jax.grad(loss)(params, base)
  gr = jax.grad(loss)(params, dataclasses.replace(base, remat=True, remat_policy=policy))
  assert jax.tree_util.tree_structure(g) == jax.tree_util.tree_structure(gr)  # same names
  assert max_diff(g, gr) < 1e-6


def test_remat_policies_keep_what_they_say_in_xla_memory_analysis():
  """model.remat_policy changes what the backward pass holds, in the promised order: XLA's
  memory analysis of the scanned training gradient needs most temporary memory without remat,
  less with remat keeping the matrix products ('dots'), least recomputing everything
  ('nothing'). A compile-time figure (no timing): it fails if a policy stops reaching the
  layers (two equal figures) or keeps more than it says."""
  cfg = ModelConfig(vocab_size=64, hidden_dim=64, num_layers=4, num_heads=4, memory_slots=8,
                    max_len=128, scan_layers=True)
  ids = jnp.zeros((8, 128), jnp.int32)
  v = InfinitoV52(cfg).init(jax.random.key(0), ids)

  def temp_bytes(**kw):
    model = InfinitoV52(dataclasses.replace(cfg, **kw))

    def loss(p):
      (logits, _), _ = model.apply({"params": p, "memory": v["memory"]}, ids, train=True,
                                   rngs={"dropout": jax.random.key(3),
                                         "explore": jax.random.key(4)}, mutable=["memory"])
      return jnp.mean(logits ** 2)

    compiled = jax.jit(jax.grad(loss)).lower(v["params"]).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  kept = temp_bytes(remat=False)
  dots = temp_bytes(remat=True, remat_policy="dots")
  nothing = temp_bytes(remat=True, remat_policy="nothing")
  assert kept > 1.2 * dots and dots > 1.2 * nothing, (kept, dots, nothing)


def test_a_remat_policy_without_remat_or_unknown_is_refused(small_config):
  with pytest.raises(ConfigError, match="remat_policy must be one of"):
    dataclasses.replace(CFG, remat=True, remat_policy="everything")
  with pytest.raises(ConfigError, match="remat_policy must be one of"):  # not a TypeError
    dataclasses.replace(CFG, remat=True, remat_policy=["dots"])
  with pytest.raises(ConfigError, match="remat is off; set remat=True"):
    dataclasses.replace(CFG, remat_policy="dots")
  from configs import tiny  # pylint: disable=import-outside-toplevel
  c = tiny.get_config()
  c.model.remat_policy = "dots"
  with pytest.raises(ConfigError, match=r"model.remat is off: add --config.model.remat=true"):
    config_lib.validate(c)
  c.model.remat = True
  config_lib.validate(c)
  c.model.remat_policy = "offload"
  with pytest.raises(ConfigError, match="config.model.remat_policy='offload': must be 'nothing'"):
    config_lib.validate(c)


def test_converters_follow_the_stacked_layout(reference):
  """The original's state dict imports into either layout and exports back bitwise."""
  cfg = dataclasses.replace(reference["config"], scan_layers=True)
  stacked = from_torch_state_dict(reference["state"], cfg)
  assert "layers" in stacked["params"] and "layers_0" not in stacked["params"]
  assert max_diff(stacked["params"], stack_layers(reference["variables"]["params"])) == 0
  back = to_torch_state_dict(stacked)
  assert set(back) == set(to_torch_state_dict(reference["variables"]))
  for k, want in to_torch_state_dict(reference["variables"]).items():
    np.testing.assert_array_equal(back[k], want)


def test_a_run_keeps_its_layout_and_old_checkpoints_mean_unrolled():
  saved_old = {"model": {"hidden_dim": 32}}  # a checkpoint from before the field existed
  assert config_lib.diff(saved_old, {"model": {"hidden_dim": 32, "scan_layers": False}}) == []
  change, = config_lib.diff(saved_old, {"model": {"hidden_dim": 32, "scan_layers": True}})
  assert change.kind == "fixed" and change.saved is False
  remat, = config_lib.diff({"model": {"remat": False}}, {"model": {"remat": True}})
  assert remat.kind == "free"  # recomputation changes memory, not the run
  policy, = config_lib.diff({"model": {"remat_policy": "nothing"}},
                            {"model": {"remat_policy": "dots"}})
  assert policy.kind == "free"
  assert config_lib.diff({"model": {}}, {"model": {"remat_policy": "nothing"}}) == []


def test_resuming_with_the_other_layout_is_refused_and_scan_runs_train(tmp_path):
  from configs import tiny  # pylint: disable=import-outside-toplevel
  from infinito_jax.train import train_and_evaluate  # pylint: disable=import-outside-toplevel
  c = tiny.get_config()
  c.model.scan_layers = True
  c.train.epochs = 2
  c.log.plot = False
  s = train_and_evaluate(c, str(tmp_path / "run"))
  losses = [r["loss"] for r in map(__import__("json").loads,
                                   open(tmp_path / "run" / "history.jsonl"))
            if r["kind"] == "validation"]
  assert s["status"] == "completed" and losses[-1] < losses[0]
  c.model.scan_layers = False
  c.train.epochs = 3
  with pytest.raises(ConfigError, match="model.scan_layers"):
    train_and_evaluate(c, str(tmp_path / "run"))


def test_remat_without_scan_is_noted_on_a_cpu_where_it_saves_nothing(tmp_path, capsys):
  """XLA:CPU holds as much memory with unrolled remat as without (measured, README): a run
  that asks for it is told so at start, one that scans its layers is not."""
  from configs import tiny  # pylint: disable=import-outside-toplevel
  from infinito_jax.train import train_and_evaluate  # pylint: disable=import-outside-toplevel
  if jax.devices()[0].platform != "cpu":
    pytest.skip("the note is about XLA:CPU")
  c = tiny.get_config()
  c.model.remat, c.train.stop_after_steps, c.log.plot = True, 1, False
  train_and_evaluate(c, str(tmp_path / "unrolled"))
  assert "note: model.remat without model.scan_layers" in capsys.readouterr().out
  c.model.scan_layers = True
  train_and_evaluate(c, str(tmp_path / "scanned"))
  assert "note: model.remat" not in capsys.readouterr().out


# ----- train.loss_chunk: the output projection + cross-entropy a chunk of positions at a time

def _loss_and_grads(model, params, memory, batch, chunk):
  from infinito_jax.train import _token_loss  # pylint: disable=import-outside-toplevel

  def f(p):
    total, count, _ = _token_loss(model, p, memory, batch,
                                  {"dropout": jax.random.key(3), "explore": jax.random.key(4)},
                                  chunk)
    return total / count
  return jax.value_and_grad(f)(params)


@pytest.mark.parametrize("chunk", [4, 8])
def test_chunked_loss_equals_the_whole_loss(setup, chunk):
  ids, v, _ = setup
  targets = jnp.roll(ids, -1, axis=1).at[:, -3:].set(0)  # some padding, not counted
  batch = {"inputs": ids, "targets": targets}
  model = InfinitoV52(CFG)
  l0, g0 = _loss_and_grads(model, v["params"], v["memory"], batch, 0)
  l1, g1 = _loss_and_grads(model, v["params"], v["memory"], batch, chunk)
  assert abs(float(l0 - l1)) < 1e-6 and float(l0) > 1.0
  assert max_diff(g0, g1) < 1e-6
  assert float(jnp.max(jnp.abs(g1["output_projection"]["kernel"]))) > 1e-4


def test_chunked_loss_holds_fewer_bytes_than_the_whole_logits():
  """The compiled train step's temporaries shrink: the [B, T, V] logits are not held whole."""
  from configs import tiny  # pylint: disable=import-outside-toplevel
  from infinito_jax.model import model_config  # pylint: disable=import-outside-toplevel
  from infinito_jax.train import Trainer  # pylint: disable=import-outside-toplevel
  temp = {}
  for chunk in (0, 8):
    c = tiny.get_config()
    c.model.vocab_size, c.data.seq_len, c.train.batch_size = 4096, 64, 16
    c.train.loss_chunk = chunk
    trainer = Trainer(c, model_config(c.model), steps_per_epoch=10)
    b = jax.ShapeDtypeStruct((1, 16, 64), np.int32, sharding=trainer.batch_sharding)
    compiled = trainer.train_step.lower(trainer.abstract_state(),
                                        {"inputs": b, "targets": b}).compile()
    temp[chunk] = compiled.memory_analysis().temp_size_in_bytes
  logits_bytes = 16 * 64 * 4096 * 4
  assert temp[8] < temp[0] - logits_bytes and temp[8] < 0.6 * temp[0], temp  # here 54 -> 26 MB


def test_loss_chunk_must_divide_the_sequence():
  from configs import tiny  # pylint: disable=import-outside-toplevel
  c = tiny.get_config()
  c.train.loss_chunk = 5
  with pytest.raises(ConfigError, match="train.loss_chunk=5 must divide data.seq_len=16"):
    config_lib.validate(c)
