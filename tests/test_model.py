"""Model properties: causality, keys as the only randomness, jit equality, init, bad input."""

import dataclasses
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infinito_jax.memory import MEMORY
from infinito_jax.model import ConfigError, InfinitoV52, ModelConfig

B, T = 2, 12


def ids_for(config, seed=0, shape=(B, T)):
  return jax.random.randint(jax.random.key(seed), shape, 0, config.vocab_size, jnp.int32)


def tree_equal(a, b):
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y))
                                    for x, y in zip(la, lb))


# ---------------------------------------------------------------- causality

@pytest.mark.parametrize("fuse_memory", [False, True])
def test_causal_logits_ignore_future_tokens(small_config, fuse_memory):
  """Changing tokens at positions >= t leaves logits at positions < t unchanged, for every t."""
  config = dataclasses.replace(small_config, fuse_memory=fuse_memory)
  model = InfinitoV52(config)
  ids = ids_for(config)
  variables = model.init(jax.random.key(0), ids)
  # a memory filled from an earlier batch, so the fused read has something to read
  _, upd = model.apply(variables, ids_for(config, 7), mutable=[MEMORY])
  variables = {"params": variables["params"], **upd}
  apply = jax.jit(lambda x: model.apply(variables, x)[0])
  base = apply(ids)
  for t in range(T):
    changed = ids.at[:, t:].set((ids[:, t:] + 1 + t) % config.vocab_size)
    out = apply(changed)
    np.testing.assert_allclose(out[:, :t], base[:, :t], atol=1e-5, rtol=0, err_msg=f"t={t}")
    assert np.max(np.abs(out[:, t:] - base[:, t:])) > 1e-4, f"t={t}: later logits must change"


def test_non_causal_switch_lets_future_tokens_leak(small_config):
  config = dataclasses.replace(small_config, causal=False)
  model = InfinitoV52(config)
  ids = ids_for(config)
  variables = model.init(jax.random.key(0), ids)
  base = model.apply(variables, ids)[0]
  out = model.apply(variables, ids.at[:, -1].set((ids[:, -1] + 1) % config.vocab_size))[0]
  assert np.max(np.abs(out[:, 0] - base[:, 0])) > 1e-4


def test_causal_gradient_of_position_t_reaches_no_later_input(small_config):
  """nanodo's check through gradients: d logits[t] / d embeddings[>t] == 0."""
  model = InfinitoV52(small_config)
  ids = ids_for(small_config)
  variables = model.init(jax.random.key(0), ids)

  def out_at(pos, t):
    p = dict(variables["params"], position_embedding=pos)
    return jnp.sum(model.apply({**variables, "params": p}, ids)[0][:, t])

  pos = variables["params"]["position_embedding"]
  for t in (0, T // 2, T - 2):
    g = jax.grad(out_at)(pos, t)
    assert np.all(np.asarray(g[t + 1:T]) == 0), t
    assert np.any(np.asarray(g[:t + 1]) != 0), t


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks the CPU's resolution")
def test_attention_impl_auto_is_xla_off_gpus_and_unknown_names_are_refused(small_config):
  """model.attention_impl='auto' picks cuDNN flash attention only on a GPU in 16-bit floats;
  on a CPU it resolves to XLA's kernel, bitwise what naming 'xla' computes, in float32 and
  bfloat16; an unknown name is refused with the choices."""
  from infinito_jax.model import fused_attention_impl  # pylint: disable=import-outside-toplevel
  config = dataclasses.replace(small_config, attention_dropout=0.0)
  ids = ids_for(config)
  variables = InfinitoV52(config).init(jax.random.key(0), ids)
  for dtype in (jnp.float32, jnp.bfloat16):
    auto = dataclasses.replace(config, dtype=dtype)
    assert fused_attention_impl(auto, dtype) == "xla"
    xla = dataclasses.replace(auto, attention_impl="xla")
    np.testing.assert_array_equal(InfinitoV52(auto).apply(variables, ids, with_metrics=False)[0],
                                  InfinitoV52(xla).apply(variables, ids, with_metrics=False)[0])
  with pytest.raises(ConfigError, match="attention_impl must be one of"):
    dataclasses.replace(config, attention_impl="flash")


def test_fused_attention_equals_the_exact_path_and_stays_causal(small_config):
  """Where no attention weights are needed (no metrics) and none are dropped out (evaluation,
  or attention_dropout=0 in training), attention runs through jax.nn.dot_product_attention:
  its logits equal the exact path's (which the metrics force) within 1e-5, feed-forward
  dropout still applies with the same keys, and d logits[t] / d inputs[>t] stays 0."""
  config = dataclasses.replace(small_config, attention_dropout=0.0)
  model = InfinitoV52(config)
  ids = ids_for(config)
  variables = model.init(jax.random.key(0), ids)
  rngs = {"dropout": jax.random.key(1), "explore": jax.random.key(2)}
  for train in (False, True):
    kw = dict(train=train, rngs=rngs, mutable=[MEMORY]) if train else {}
    fused = model.apply(variables, ids, with_metrics=False, **kw)
    exact = model.apply(variables, ids, with_metrics=True, **kw)
    if train:
      fused, exact = fused[0], exact[0]
    np.testing.assert_allclose(fused[0], exact[0], atol=1e-5, rtol=0)
  still_dropped = model.apply(variables, ids, train=True, mutable=[MEMORY],
                              rngs={**rngs, "dropout": jax.random.key(9)})[0][0]
  assert np.max(np.abs(still_dropped - fused[0])) > 1e-3  # feed-forward dropout is on

  def out_at(pos, t):
    p = dict(variables["params"], position_embedding=pos)
    return jnp.sum(model.apply({**variables, "params": p}, ids, train=True, rngs=rngs,
                               mutable=[MEMORY])[0][0][:, t])

  pos = variables["params"]["position_embedding"]
  for t in (0, T // 2, T - 2):
    g = jax.grad(out_at)(pos, t)
    assert np.all(np.asarray(g[t + 1:T]) == 0), t
    assert np.any(np.asarray(g[:t + 1]) != 0), t


@pytest.mark.parametrize("field", ["embed_dropout", "residual_dropout"])
def test_embed_and_residual_dropout_act_in_training_only(small_config, field):
  """model.embed_dropout / residual_dropout: above 0 the training logits change and the change
  scales with the rate, while evaluation and the parameter tree are exactly the original's
  (that runs at 0 keep their random streams is test_dropout_streams_keep_their_module_paths).
  A rate outside [0, 1) is refused."""
  config = dataclasses.replace(small_config, dropout=0.0)  # only `field` drops out
  ids = ids_for(config)
  variables = InfinitoV52(config).init(jax.random.key(0), ids)
  rngs = {"dropout": jax.random.key(1), "explore": jax.random.key(2)}

  def logits(rate, train):
    model = InfinitoV52(dataclasses.replace(config, **{field: rate}))
    if not train:
      return model.apply(variables, ids)[0]
    return model.apply(variables, ids, train=True, rngs=rngs, mutable=[MEMORY])[0][0]

  base = logits(0.0, True)
  small, large = (float(np.max(np.abs(logits(r, True) - base))) for r in (0.1, 0.5))
  assert 1e-3 < small < large, (small, large)
  np.testing.assert_array_equal(logits(0.5, False), logits(0.0, False))
  assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(
      InfinitoV52(dataclasses.replace(config, **{field: 0.3})).init(jax.random.key(0), ids))
  with pytest.raises(ConfigError, match=f"{field} must lie in"):
    dataclasses.replace(config, **{field: 1.0})


def test_dropout_streams_keep_their_module_paths(small_config):
  """flax folds a module's path into the keys it draws, so the paths of the dropout modules
  fix every existing run's masks: the feed-forward dropouts stay layers_i/Dropout_0 and
  Dropout_1 and the attention weights' layers_i/attention/Dropout_0 whatever other dropouts
  exist (an unnamed residual dropout once took Dropout_0 and changed every run's masks)."""
  seen = []

  def record(next_fun, args, kwargs, context):
    if (isinstance(context.module, nn.Dropout) and context.method_name == "__call__"
        and context.module.rate > 0):  # the ones that draw keys
      seen.append("/".join(context.module.scope.path))
    return next_fun(*args, **kwargs)

  ids = ids_for(small_config)
  rngs = {"dropout": jax.random.key(1), "explore": jax.random.key(2)}
  for extra, more in ((0.0, []), (0.1, ["embed_dropout", "layers_0/residual_dropout"])):
    config = dataclasses.replace(small_config, embed_dropout=extra, residual_dropout=extra)
    model = InfinitoV52(config)
    variables = model.init(jax.random.key(0), ids)
    seen.clear()
    with nn.intercept_methods(record):
      model.apply(variables, ids, train=True, with_metrics=True, rngs=rngs, mutable=[MEMORY])
    layer0 = {p for p in seen if p.startswith("layers_0")} | {p for p in seen if "/" not in p}
    assert layer0 == {"layers_0/Dropout_0", "layers_0/Dropout_1",
                      "layers_0/attention/Dropout_0", *more}, seen


def test_dropout_bits_32_is_flax_dropout_bitwise():
  """layers.Dropout at bits=32 (the default) is nn.Dropout: the same masks from the same key,
  and the same auto-name, so every existing run keeps its masks."""
  from infinito_jax.layers import Dropout  # pylint: disable=import-outside-toplevel
  x = jax.random.normal(jax.random.key(3), (4, 6, 10))
  for rate, dims in ((0.1, ()), (0.5, (1,))):
    ours = Dropout(rate, broadcast_dims=dims).apply({}, x, deterministic=False,
                                                    rngs={"dropout": jax.random.key(5)})
    flax = nn.Dropout(rate, broadcast_dims=dims).apply({}, x, deterministic=False,
                                                       rngs={"dropout": jax.random.key(5)})
    np.testing.assert_array_equal(ours, flax)

  class Two(nn.Module):
    @nn.compact
    def __call__(self, x):
      return Dropout(0.1, deterministic=False)(x), nn.Dropout(0.1, deterministic=False)(x)

  seen = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.Dropout) and context.method_name == "__call__":
      seen.append(context.module.name)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    Two().apply({}, x, rngs={"dropout": jax.random.key(0)})
  assert list(dict.fromkeys(seen)) == ["Dropout_0", "Dropout_1"]  # ours calls nn.Dropout's


@pytest.mark.parametrize("shape", [(64, 128, 96), (3, 50001)])  # an odd last axis too
def test_dropout_bits_16_keeps_the_rate_and_the_mean(shape):
  """bits=16: two decisions per 32-bit word. The kept fraction is the keep probability
  rounded to 2^-16 (within 5 standard errors), kept values are scaled by its inverse so the
  mean is the input's, the two halves of a word decide independently (the pair (keep, keep)
  occurs p^2 of the time), a key gives one mask and another key another, and evaluation is
  the identity."""
  from infinito_jax.layers import Dropout  # pylint: disable=import-outside-toplevel
  rate = 0.1
  x = jnp.ones(shape)
  drop = lambda key: Dropout(rate, bits=16).apply({}, x, deterministic=False,  # noqa: E731
                                                  rngs={"dropout": jax.random.key(key)})
  y = np.asarray(drop(0))
  assert y.shape == shape
  p = round(0.9 * 65536) / 65536
  kept = y != 0
  n = kept.size
  assert abs(kept.mean() - p) < 5 * np.sqrt(p * (1 - p) / n), kept.mean()
  np.testing.assert_allclose(np.unique(y[kept]), [1 / p], rtol=1e-7)
  assert abs(y.mean() - 1.0) < 5 * np.sqrt((1 - p) / p / n)
  flat = kept.reshape(-1, shape[-1])[:, : shape[-1] // 2 * 2]
  both = (flat[:, 0::2] & flat[:, 1::2]).mean()  # the two halves of one word
  m = flat[:, 0::2].size
  assert abs(both - p * p) < 5 * np.sqrt(p * p * (1 - p * p) / m), both
  np.testing.assert_array_equal(y, np.asarray(drop(0)))
  assert (np.asarray(drop(1)) != y).mean() > 0.1
  np.testing.assert_array_equal(
      Dropout(rate, bits=16).apply({}, x, deterministic=True), x)
  for near_one, threshold in ((0.999999, 0), (0.9999, 7)):  # keep probability * 2^16, rounded
    z = np.asarray(Dropout(near_one, bits=16).apply({}, x, deterministic=False,
                                                    rngs={"dropout": jax.random.key(0)}))
    assert np.all(np.isfinite(z))
    assert (threshold == 0) == np.all(z == 0)
    assert (z != 0).mean() <= 2 * threshold / 65536


def test_dropout_bits_16_changes_training_masks_only(small_config):
  """model.dropout_bits=16 gives other training logits of the same parameters (other masks),
  the same evaluation logits and parameter tree; a value other than 32 or 16 is refused by
  the model and by the run config's validator."""
  from infinito_jax.config import validate  # pylint: disable=import-outside-toplevel
  from configs import default  # pylint: disable=import-outside-toplevel
  ids = ids_for(small_config)
  variables = InfinitoV52(small_config).init(jax.random.key(0), ids)
  rngs = {"dropout": jax.random.key(1), "explore": jax.random.key(2)}
  fast = InfinitoV52(dataclasses.replace(small_config, dropout_bits=16))
  train = lambda m: m.apply(variables, ids, train=True, rngs=rngs,  # noqa: E731
                            mutable=[MEMORY])[0][0]
  assert float(np.max(np.abs(train(fast) - train(InfinitoV52(small_config))))) > 1e-3
  np.testing.assert_array_equal(fast.apply(variables, ids)[0],
                                InfinitoV52(small_config).apply(variables, ids)[0])
  assert jax.tree_util.tree_structure(fast.init(jax.random.key(0), ids)) == \
      jax.tree_util.tree_structure(variables)
  with pytest.raises(ConfigError, match="dropout_bits must be one of"):
    dataclasses.replace(small_config, dropout_bits=8)
  config = default.get_config()
  config.model.dropout_bits = 8
  with pytest.raises(ConfigError, match="model.dropout_bits"):
    validate(config)


def test_attention_impl_resolves_to_a_kernel_this_backend_runs(small_config):
  """model.attention_impl='auto' picks cuDNN flash attention only on a GPU in 16-bit floats;
  here (CPU) it is XLA's, which computes the same logits as naming 'xla'; an unknown name is
  refused with the choices."""
  from infinito_jax.model import fused_attention_impl  # pylint: disable=import-outside-toplevel
  config = dataclasses.replace(small_config, attention_dropout=0.0)
  on_gpu = jax.default_backend() == "gpu"
  for dtype in (jnp.float32, jnp.bfloat16):
    want = "cudnn" if on_gpu and dtype == jnp.bfloat16 else "xla"
    if not on_gpu or dtype == jnp.float32:
      assert fused_attention_impl(config, dtype) == want
  assert fused_attention_impl(dataclasses.replace(config, attention_impl="xla"),
                              jnp.bfloat16) == "xla"
  ids = ids_for(config)
  variables = InfinitoV52(config).init(jax.random.key(0), ids)
  auto = InfinitoV52(config).apply(variables, ids, with_metrics=False)[0]
  xla = InfinitoV52(dataclasses.replace(config, attention_impl="xla")).apply(
      variables, ids, with_metrics=False)[0]
  if not on_gpu:
    np.testing.assert_array_equal(auto, xla)
  with pytest.raises(ConfigError, match="attention_impl must be one of"):
    dataclasses.replace(config, attention_impl="flash")
  if not on_gpu:  # a GPU run's 'cudnn' scores on a CPU with XLA's kernel; training refuses it
    cudnn = dataclasses.replace(config, attention_impl="cudnn")
    assert fused_attention_impl(cudnn, jnp.bfloat16) == "xla"
    np.testing.assert_array_equal(
        InfinitoV52(cudnn).apply(variables, ids, with_metrics=False)[0], xla)
    from configs import tiny  # pylint: disable=import-outside-toplevel
    from infinito_jax.train import Trainer  # pylint: disable=import-outside-toplevel
    with pytest.raises(ConfigError, match=r"attention_impl=cudnn needs an NVIDIA GPU.*'xla'"):
      Trainer(tiny.get_config(), cudnn, steps_per_epoch=10)


@pytest.mark.slow
def test_pallas_flash_attention_equals_xla_in_value_and_gradient(small_config, monkeypatch):
  """attention_impl='pallas' (Pallas' Triton flash attention, which takes float32 where cuDNN's
  does not) computes XLA's attention: the kernel itself (run by Pallas' interpreter here, the
  same kernel code the GPU compiles) within float rounding in value and in the gradients of
  q, k, v, causal or not; through the model, the training loss and every parameter's gradient
  equal the 'xla' model's. Off a GPU, without the interpreter, it scores with XLA's kernel and
  the Trainer refuses it; a sequence the kernel's block does not divide is refused by name."""
  from infinito_jax import model as model_lib  # pylint: disable=import-outside-toplevel
  if not model_lib.pallas_available():
    pytest.skip(f"JAX {jax.__version__} has no {model_lib.PALLAS_MODULE} (the refusal: "
                "test_pallas_without_its_kernel_is_refused_by_name)")
  q, k, v, ct = (jax.random.normal(key, (2, 32, 4, 8), jnp.float32)
                 for key in jax.random.split(jax.random.key(0), 4))
  for causal in (True, False):
    ref = lambda q, k, v: jax.nn.dot_product_attention(  # noqa: E731
        q, k, v, scale=0.3, is_causal=causal, implementation="xla")
    pal = lambda q, k, v: model_lib.pallas_attention(q, k, v, 0.3, causal,  # noqa: E731
                                                     interpret=True)
    np.testing.assert_allclose(pal(q, k, v), ref(q, k, v), atol=2e-6)
    grads = [jax.grad(lambda *a, f=f: jnp.sum(f(*a) * ct), argnums=(0, 1, 2))(q, k, v)
             for f in (ref, pal)]
    for a, b in zip(*grads):
      np.testing.assert_allclose(b, a, atol=1e-5)
  with pytest.raises(ConfigError, match=r"multiple of 128 \(its kernel's block\) or shorter, "
                                        r"got 200"):
    model_lib.pallas_attention(*(jnp.zeros((1, 200, 1, 8)),) * 3, 1.0, True, interpret=True)

  config = dataclasses.replace(small_config, attention_dropout=0.0)
  ids = ids_for(config)
  variables = InfinitoV52(config).init(jax.random.key(0), ids)
  rngs = {"dropout": jax.random.key(1), "explore": jax.random.key(2)}

  def loss_and_grads(impl):
    m = InfinitoV52(dataclasses.replace(config, attention_impl=impl))

    def loss(params):
      (logits, _), _ = m.apply({**variables, "params": params}, ids, train=True, rngs=rngs,
                               with_metrics=False, mutable=[MEMORY])
      return jnp.mean(jax.nn.log_softmax(logits)[..., 0])
    return jax.value_and_grad(loss)(variables["params"])

  pallas = dataclasses.replace(config, attention_impl="pallas")
  if jax.default_backend() != "gpu":
    assert model_lib.fused_attention_impl(pallas, jnp.float32) == "xla"
    from configs import tiny  # pylint: disable=import-outside-toplevel
    from infinito_jax.train import Trainer  # pylint: disable=import-outside-toplevel
    with pytest.raises(ConfigError, match=r"attention_impl=pallas needs an NVIDIA GPU"):
      Trainer(tiny.get_config(), pallas, steps_per_epoch=10)
    monkeypatch.setattr(model_lib, "PALLAS_INTERPRET", True)
    assert model_lib.fused_attention_impl(pallas, jnp.float32) == "pallas"
  # a run whose windows the kernel's block does not divide is refused before anything is made
  from configs import default  # pylint: disable=import-outside-toplevel
  from infinito_jax.config import validate  # pylint: disable=import-outside-toplevel
  run = default.get_config()
  run.model.attention_impl, run.model.max_len, run.data.seq_len = "pallas", 1000, 200
  with pytest.raises(ConfigError, match=r"data.seq_len=200: must be a multiple of 128"):
    validate(run)
  run.data.seq_len = 256
  validate(run)
  # a length the kernel's block does not divide (a sampling buffer) takes XLA's attention
  assert model_lib.fused_attention_impl(pallas, jnp.float32, 200) == "xla"
  assert model_lib.fused_attention_impl(pallas, jnp.float32, 256) == "pallas"
  (l_x, g_x), (l_p, g_p) = loss_and_grads("xla"), loss_and_grads("pallas")
  np.testing.assert_allclose(l_p, l_x, rtol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(g_x), jax.tree_util.tree_leaves(g_p)):
    np.testing.assert_allclose(b, a, atol=1e-6, rtol=1e-4)


def test_pallas_without_its_kernel_is_refused_by_name(small_config, monkeypatch):
  """Under a JAX without Pallas' Triton attention (0.12 removed the module), training with
  attention_impl='pallas' is refused before anything is made, naming the module, the JAX and
  the settings that work; a model trained with it (under a JAX that had it) scores with XLA's
  attention, the same function, as it does off a GPU. Here the module is hidden where this JAX
  has it."""
  import importlib  # pylint: disable=import-outside-toplevel
  from configs import tiny  # pylint: disable=import-outside-toplevel
  from infinito_jax import model as model_lib  # pylint: disable=import-outside-toplevel
  from infinito_jax.train import Trainer  # pylint: disable=import-outside-toplevel
  if model_lib.pallas_available():
    package = importlib.import_module(model_lib.PALLAS_MODULE.rsplit(".", 1)[0])
    monkeypatch.delattr(package, "attention")
    monkeypatch.setitem(sys.modules, model_lib.PALLAS_MODULE, None)  # import: ImportError
    monkeypatch.setattr(model_lib, "PALLAS_INTERPRET", True)  # would run the kernel off a GPU
  assert not model_lib.pallas_available()
  want = (rf"attention_impl='pallas' needs Pallas' Triton flash attention "
          rf"\({model_lib.PALLAS_MODULE}\), which this JAX \({jax.__version__}\) does not "
          r"ship: use attention_impl 'auto' .* or 'xla'")
  pallas = dataclasses.replace(small_config, attention_dropout=0.0, attention_impl="pallas")
  with pytest.raises(ConfigError, match=want):
    Trainer(tiny.get_config(), pallas, steps_per_epoch=10)
  with pytest.raises(ConfigError, match=want):
    model_lib.pallas_attention(*(jnp.zeros((1, 32, 1, 8)),) * 3, 1.0, True, interpret=True)
  assert model_lib.fused_attention_impl(pallas, jnp.float32) == "xla"
  ids = ids_for(pallas)
  variables = InfinitoV52(pallas).init(jax.random.key(0), ids)
  xla = dataclasses.replace(pallas, attention_impl="xla")
  np.testing.assert_array_equal(InfinitoV52(pallas).apply(variables, ids)[0],
                                InfinitoV52(xla).apply(variables, ids)[0])
  from infinito_jax.evaluate import attention_note  # pylint: disable=import-outside-toplevel
  assert "model.attention_impl='pallas'" in attention_note(pallas)
  assert attention_note(xla) is None


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="cuDNN runs here")
def test_a_cudnn_run_sampled_off_a_gpu_says_that_xla_attention_drew_the_samples(small_config):
  """A run with attention_impl='cudnn' sampled where cuDNN cannot run takes XLA's attention,
  the same function: evaluate's report (with --prompt) says so in its note (it said nothing),
  and the outputs equal the 'xla' model's."""
  from infinito_jax.evaluate import attention_note  # pylint: disable=import-outside-toplevel
  cudnn = dataclasses.replace(small_config, attention_dropout=0.0, attention_impl="cudnn")
  note = attention_note(cudnn)
  assert note.startswith("the run chose model.attention_impl='cudnn', which runs on "
                         f"NVIDIA GPUs only (this process: {jax.default_backend()}): the samples "
                         "were drawn with XLA's attention instead"), note
  for quiet in ("auto", "xla"):
    assert attention_note(dataclasses.replace(cudnn, attention_impl=quiet)) is None
  ids = ids_for(cudnn)
  variables = InfinitoV52(cudnn).init(jax.random.key(0), ids)
  xla = dataclasses.replace(cudnn, attention_impl="xla")
  np.testing.assert_array_equal(InfinitoV52(cudnn).apply(variables, ids)[0],
                                InfinitoV52(xla).apply(variables, ids)[0])


# ---------------------------------------------------------------- randomness

def train_outputs(model, variables, ids, dropout_key, explore_key):
  (logits, metrics), upd = model.apply(variables, ids, train=True, with_metrics=True,
                                       rngs={"dropout": dropout_key, "explore": explore_key},
                                       mutable=[MEMORY])
  return logits, metrics, upd


def test_same_keys_give_bitwise_identical_outputs_in_train_mode(small_config):
  model = InfinitoV52(small_config)
  ids = ids_for(small_config)
  v1 = model.init(jax.random.key(3), ids)
  v2 = model.init(jax.random.key(3), ids)
  assert tree_equal(v1, v2)
  out1 = train_outputs(model, v1, ids, jax.random.key(1), jax.random.key(2))
  out2 = train_outputs(model, v2, ids, jax.random.key(1), jax.random.key(2))
  assert tree_equal(out1, out2)


def test_different_dropout_or_explore_keys_change_outputs(small_config):
  model = InfinitoV52(small_config)
  ids = ids_for(small_config)
  v = model.init(jax.random.key(3), ids)
  base = train_outputs(model, v, ids, jax.random.key(1), jax.random.key(2))[0]
  other_dropout = train_outputs(model, v, ids, jax.random.key(9), jax.random.key(2))[0]
  other_explore = train_outputs(model, v, ids, jax.random.key(1), jax.random.key(9))[0]
  assert np.max(np.abs(base - other_dropout)) > 1e-3
  assert np.max(np.abs(base - other_explore)) > 1e-3
  # each stream alone matters: no dropout, exploration only, still depends on the explore key
  no_dropout = InfinitoV52(dataclasses.replace(small_config, dropout=0.0))
  a = train_outputs(no_dropout, v, ids, jax.random.key(1), jax.random.key(2))[0]
  b = train_outputs(no_dropout, v, ids, jax.random.key(5), jax.random.key(2))[0]
  c = train_outputs(no_dropout, v, ids, jax.random.key(1), jax.random.key(5))[0]
  assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_different_init_keys_give_different_parameters(small_config):
  model = InfinitoV52(small_config)
  ids = ids_for(small_config)
  p1 = model.init(jax.random.key(0), ids)["params"]
  p2 = model.init(jax.random.key(1), ids)["params"]
  assert not np.array_equal(p1["token_embedding"]["embedding"], p2["token_embedding"]["embedding"])


def test_eval_mode_needs_no_keys_and_ignores_dropout_and_noise(small_config):
  model = InfinitoV52(small_config)
  ids = ids_for(small_config)
  v = model.init(jax.random.key(0), ids)
  plain = model.apply(v, ids, with_metrics=True)
  keyed = model.apply(v, ids, with_metrics=True,
                      rngs={"dropout": jax.random.key(1), "explore": jax.random.key(2)})
  assert tree_equal(plain, keyed)
  trained = train_outputs(model, v, ids, jax.random.key(1), jax.random.key(2))[0]
  assert np.max(np.abs(trained - plain[0])) > 1e-3  # train mode really is noisy


def test_train_mode_without_keys_names_the_missing_streams(small_config):
  model = InfinitoV52(small_config)
  ids = ids_for(small_config)
  v = model.init(jax.random.key(0), ids)
  with pytest.raises(ValueError, match=r"rngs=\{'dropout'.*'explore'"):
    model.apply(v, ids, train=True, rngs={"dropout": jax.random.key(1)})


def test_apply_with_params_alone_names_the_memory_and_mutable_starts_it_fresh(small_config):
  """apply({'params': ...}) without the memory state is an error naming the fix (it was flax's
  ScopeCollectionNotFound); with mutable=['memory'] it starts from the memory init makes, so
  its logits equal those of apply(variables) on a fresh model."""
  model = InfinitoV52(small_config)
  ids = ids_for(small_config)
  v = model.init(jax.random.key(0), ids)
  with pytest.raises(ValueError, match=r"pass the whole variables of model.init"):
    model.apply({"params": v["params"]}, ids)
  (logits, _), fresh = model.apply({"params": v["params"]}, ids, mutable=["memory"])
  np.testing.assert_array_equal(logits, model.apply(v, ids)[0])
  assert jax.tree_util.tree_structure(fresh) == jax.tree_util.tree_structure(
      {"memory": v["memory"]})


FRESH_PROCESS = textwrap.dedent("""
    import sys, jax, jax.numpy as jnp, numpy as np
    from infinito_jax.model import ConfigError, InfinitoV52, ModelConfig
    config = ModelConfig(vocab_size=97, hidden_dim=32, num_layers=2, num_heads=4, memory_slots=8)
    model = InfinitoV52(config)
    ids = jax.random.randint(jax.random.key(0), (2, 12), 0, 97, jnp.int32)
    v = model.init(jax.random.key(3), ids)
    (logits, m), upd = model.apply(v, ids, train=True, with_metrics=True, mutable=['memory'],
                                   rngs={'dropout': jax.random.key(1), 'explore': jax.random.key(2)})
    leaves = {str(i): np.asarray(x) for i, x in enumerate(jax.tree_util.tree_leaves((logits, m, upd)))}
    np.savez(sys.argv[1], **leaves)
""")


def test_same_keys_are_bitwise_identical_in_a_fresh_process(small_config, tmp_path):
  out = tmp_path / "fresh.npz"
  subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(out)], check=True)
  model = InfinitoV52(small_config)
  ids = ids_for(small_config)
  v = model.init(jax.random.key(3), ids)
  here = jax.tree_util.tree_leaves(train_outputs(model, v, ids, jax.random.key(1),
                                                 jax.random.key(2)))
  there = np.load(out)
  assert len(there.files) == len(here)
  for i, x in enumerate(here):
    assert np.array_equal(np.asarray(x), there[str(i)]), i


# ---------------------------------------------------------------- jit, init, memory

def test_jit_and_eager_give_the_same_outputs(small_config):
  model = InfinitoV52(small_config)
  ids = ids_for(small_config)
  v = model.init(jax.random.key(0), ids)
  keys = {"dropout": jax.random.key(1), "explore": jax.random.key(2)}

  def run(v, ids):
    return model.apply(v, ids, train=True, with_metrics=True, rngs=keys, mutable=[MEMORY])

  eager, jitted = run(v, ids), jax.jit(run)(v, ids)
  for x, y in zip(jax.tree_util.tree_leaves(eager), jax.tree_util.tree_leaves(jitted)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=2e-5, rtol=1e-5)
  assert np.isfinite(np.asarray(jitted[0][0])).all()


def test_init_follows_the_original_distributions():
  config = ModelConfig(vocab_size=500, hidden_dim=64, num_layers=1, num_heads=4, memory_slots=16)
  v = InfinitoV52(config).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  p, m = v["params"], v[MEMORY]["memory"]
  assert abs(float(jnp.std(p["token_embedding"]["embedding"])) - 1.0) < 0.02  # N(0, 1)
  assert abs(float(jnp.std(p["position_embedding"])) - 0.02) < 0.001  # N(0, 1) * 0.02
  ff_in = p["layers_0"]["ff_in"]["kernel"]  # U(+-1/sqrt(64)): std = bound / sqrt(3)
  assert abs(float(jnp.max(jnp.abs(ff_in))) - 1 / 8) < 1e-3
  assert abs(float(jnp.std(ff_in)) - 1 / 8 / np.sqrt(3)) < 2e-3
  assert float(jnp.max(jnp.abs(p["layers_0"]["ff_out"]["bias"]))) <= 1 / 16  # fan_in 256
  assert np.all(p["layers_0"]["ln1"]["scale"] == 1) and np.all(p["layers_0"]["ln1"]["bias"] == 0)
  assert float(p["adaptive_scale"]) == np.float32(0.1)
  # the initial memory is the original's, not the state after init's own forward pass
  assert np.all(m["slots"] == 0) and np.all(m["age"] == 0) and np.all(m["access_count"] == 0)
  assert np.all(m["importance"] == np.float32(0.1)) and float(m["utilization"]) == 0


def test_apply_without_mutable_is_read_only_and_returns_same_logits(small_config):
  model = InfinitoV52(small_config)
  ids = ids_for(small_config)
  v = model.init(jax.random.key(0), ids)
  logits, _ = model.apply(v, ids)
  (logits_m, _), upd = model.apply(v, ids, mutable=[MEMORY])
  np.testing.assert_array_equal(logits, logits_m)
  assert not tree_equal(upd[MEMORY], v[MEMORY])


def test_write_replaces_the_lowest_priority_slot_and_ages_the_rest(small_config):
  model = InfinitoV52(small_config)
  ids = ids_for(small_config)
  v = model.init(jax.random.key(0), ids)
  mem = dict(v[MEMORY]["memory"])
  mem["importance"] = jnp.array([0.5, 0.5, 0.05, 0.5, 0.5, 0.5, 0.5, 0.5])
  mem["age"] = jnp.arange(8.0)
  (_, metrics), upd = model.apply({"params": v["params"], MEMORY: {"memory": mem}}, ids,
                                  with_metrics=True, mutable=[MEMORY])
  new = upd[MEMORY]["memory"]
  np.testing.assert_array_equal(new["age"], np.array([1, 2, 0, 4, 5, 6, 7, 8], np.float32))
  assert float(new["access_count"][2]) == 0
  assert np.any(new["slots"][2] != 0) and np.all(new["slots"][np.arange(8) != 2] == 0)
  phi = float(metrics["integration_phi"])
  assert abs(float(new["importance"][2]) - phi * (1 + phi)) < 1e-5  # mean(level) * (1 + phi)
  # without metrics the level is 1 and phi_value 0: new importance 1
  _, upd2 = model.apply({"params": v["params"], MEMORY: {"memory": mem}}, ids, mutable=[MEMORY])
  assert float(upd2[MEMORY]["memory"]["importance"][2]) == 1.0


def test_fused_memory_read_changes_logits_and_trains_the_read_path(small_config):
  config = dataclasses.replace(small_config, fuse_memory=True)
  model = InfinitoV52(config)
  ids = ids_for(config)
  v = model.init(jax.random.key(0), ids)
  _, upd = model.apply(v, ids_for(config, 5), mutable=[MEMORY])
  v = {"params": v["params"], **upd}
  plain = InfinitoV52(small_config).apply(v, ids)[0]
  fused = model.apply(v, ids)[0]
  assert np.max(np.abs(fused - plain)) > 1e-4
  g = jax.grad(lambda p: jnp.sum(model.apply({**v, "params": p}, ids)[0] ** 2))(v["params"])
  assert np.any(g["memory"]["read_controller"]["kernel"] != 0)
  assert np.any(g["memory"]["importance_enhancer"]["kernel"] != 0)


def test_bfloat16_compute_stays_close_to_float32(small_config):
  ids = ids_for(small_config)
  v = InfinitoV52(small_config).init(jax.random.key(0), ids)
  f32 = InfinitoV52(small_config).apply(v, ids)[0]
  bf16 = InfinitoV52(dataclasses.replace(small_config, dtype=jnp.bfloat16)).apply(v, ids)[0]
  assert bf16.dtype == jnp.float32
  assert float(jnp.max(jnp.abs(f32 - bf16))) < 0.15 * float(jnp.max(jnp.abs(f32)))


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("bad, error, match", [
    (np.array([[0, 97]], np.int32), ValueError, r"\[0, vocab_size=97\).*97"),
    (np.array([[-1, 3]], np.int32), ValueError, r"\[0, vocab_size=97\).*-1"),
    (np.zeros((1, 1001), np.int32), ValueError, r"1001 exceeds the position table.*max_len=1000"),
    (np.zeros((4,), np.int32), ValueError, r"rank 2.*ids\[None\]"),
    (np.zeros((1, 2, 3), np.int32), ValueError, r"rank 2.*ids.reshape\(-1, ids.shape\[-1\]\)"),
    (np.zeros((1, 4), np.float32), TypeError, r"integers.*astype"),
    ([[1, 2]], TypeError, r"jnp.asarray"),
])
def test_bad_token_ids_are_refused_with_a_clear_error(small_config, bad, error, match):
  model = InfinitoV52(small_config)
  v = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  with pytest.raises(error, match=match):
    model.apply(v, bad)


def test_shape_errors_are_raised_under_jit_too(small_config):
  model = InfinitoV52(small_config)
  v = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  with pytest.raises(ValueError, match="exceeds the position table"):
    jax.jit(model.apply)(v, jnp.zeros((1, 1001), jnp.int32))


@pytest.mark.parametrize("kwargs, match", [
    (dict(hidden_dim=30, num_heads=4), r"hidden_dim \(30\) must be divisible by num_heads \(4\)"),
    (dict(vocab_size=0), r"vocab_size must be a positive integer"),
    (dict(dropout=1.0), r"dropout must lie in \[0, 1\)"),
    (dict(dtype=jnp.int32), r"floating dtype"),
    (dict(dtype=jnp.float64), r"float64 needs JAX's 64-bit mode"),  # it would run float32
])
def test_config_that_cannot_work_is_refused(kwargs, match):
  with pytest.raises(ValueError, match=match):
    ModelConfig(**kwargs)


@pytest.mark.parametrize("field,value,message", [
    ("noise_scale", float("nan"), "noise_scale must be a finite number, got nan"),
    ("dropout", "0.1", "dropout must be a finite number, got '0.1'"),
    ("attention_dropout", float("inf"), "attention_dropout must be a finite number"),
    ("causal", "no", "causal must be True or False, got 'no'"),
    ("exploration", 0, "exploration must be True or False, got 0"),
])
def test_model_config_in_a_notebook_refuses_what_the_command_line_refuses(field, value, message):
  """ModelConfig built by hand: a NaN noise scale trained to all-NaN logits, a string rate
  failed deep inside with a bare TypeError, a truthy string switched a flag on."""
  with pytest.raises(ConfigError, match=message):
    ModelConfig(**{field: value})
  ModelConfig(attention_dropout=None, causal=np.bool_(False), dropout=np.float32(0.1))


def test_one_number_of_phi_variance_keeps_the_memory_finite():
  """The smallest widths: at hidden_dim 2 a one-token sequence gives phi's variance a single
  number. Its variance is 0 (the original divides by N - 1 = 0): phi and the memory stay
  finite, and so do the logits of every later call that reads the memory."""
  from infinito_jax.metrics import _unbiased_var  # pylint: disable=g-import-not-at-top
  x = jnp.asarray([[1.0, 2.0, 4.0]])
  np.testing.assert_allclose(_unbiased_var(x), np.var(x, axis=-1, ddof=1), rtol=1e-6)
  np.testing.assert_array_equal(_unbiased_var(jnp.ones((3, 1))), np.zeros(3))
  config = ModelConfig(vocab_size=10, hidden_dim=2, num_layers=1, num_heads=1, memory_slots=4,
                       max_len=8, fuse_memory=True)
  model = InfinitoV52(config)
  one = jnp.asarray([[3]], jnp.int32)
  variables = model.init(jax.random.key(0), one)
  (_, metrics), upd = model.apply(variables, one, with_metrics=True, mutable=[MEMORY])
  assert np.isfinite(float(metrics["integration_phi"]))
  assert all(np.all(np.isfinite(np.asarray(v))) for v in jax.tree_util.tree_leaves(upd))
  logits, _ = model.apply({**variables, **upd}, jnp.asarray([[1, 2, 3, 4]], jnp.int32))
  assert np.all(np.isfinite(np.asarray(logits)))


@pytest.mark.parametrize("with_metrics", [False, True])
def test_rows_of_padding_leave_the_memory_as_the_short_batch_would(small_config, with_metrics):
  """The data fills a split's last batch with rows of id 0; the original's last batch is just
  shorter. So the memory after a padded batch is the memory after its real rows alone
  (slot written, importance, access counts, utilization), and a batch of padding alone (a
  micro-batch of gradient accumulation can be one) changes nothing."""
  model = InfinitoV52(small_config)
  real = ids_for(small_config, seed=3, shape=(3, T)).at[:, 0].set(5)  # no row of padding
  padded = jnp.concatenate([real, jnp.zeros((5, T), jnp.int32)])
  variables = model.init(jax.random.key(0), real)
  warm = model.apply(variables, ids_for(small_config, seed=4, shape=(3, T)),
                     mutable=[MEMORY])[1]  # a used memory: access counts, a written slot
  variables = {**variables, **warm}
  (_, m_real), short = model.apply(variables, real, with_metrics=with_metrics, mutable=[MEMORY])
  (_, m_pad), full = model.apply(variables, padded, with_metrics=with_metrics, mutable=[MEMORY])
  for a, b in zip(jax.tree_util.tree_leaves(short), jax.tree_util.tree_leaves(full)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-7)
  assert not tree_equal(short, variables[MEMORY])  # the real rows did write
  if with_metrics:
    assert float(m_pad["memory_utilization"]) == pytest.approx(
        float(m_real["memory_utilization"]), rel=1e-6)
  _, none = model.apply(variables, jnp.zeros((4, T), jnp.int32), with_metrics=with_metrics,
                        mutable=[MEMORY])
  assert tree_equal(none, {MEMORY: variables[MEMORY]})
