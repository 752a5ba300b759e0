"""The cross-entropy's written-out derivative (loss.token_cross_entropy, grad='fused'): the same
loss as optax's, bitwise, and the gradient JAX derives for optax's, to float rounding, in every
way JAX differentiates (reverse, forward, under vmap and remat); and the train step under
either form (train.loss_gradient_form)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import tiny
from infinito_jax.errors import ConfigError
from infinito_jax.loss import chunked_token_cross_entropy, token_cross_entropy
from infinito_jax.model import model_config
from infinito_jax.train import Trainer, _token_loss, loss_gradient_form


def _case(dtype, scale=3.0, offset=0.0, vocab=300):
  k1, k2 = jax.random.split(jax.random.key(7))
  logits = (scale * jax.random.normal(k1, (3, 17, vocab)) + offset).astype(dtype)
  targets = jax.random.randint(k2, (3, 17), 0, vocab)  # id 0 (padding) among them
  targets = targets.at[0, :5].set(0)
  return logits, targets


def _optax(logits, targets):
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  w = (targets != 0).astype(jnp.float32)
  return jnp.sum(losses * w), jnp.sum(w)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("offset", [0.0, 1e4])  # 1e4: exp would overflow without the shift
def test_fused_loss_equals_optax_bitwise_and_its_gradient_to_rounding(dtype, offset):
  logits, targets = _case(dtype, offset=offset)
  ref_fn = jax.jit(jax.value_and_grad(lambda x: _optax(x, targets)[0]))
  for grad in ("fused", "autodiff"):
    fn = jax.jit(jax.value_and_grad(lambda x, g=grad: token_cross_entropy(x, targets, g)[0]))
    (loss, g), (ref, ref_g) = fn(logits), ref_fn(logits)
    assert loss.dtype == ref.dtype and float(loss) == float(ref)
    assert g.dtype == logits.dtype
    assert np.all(np.isfinite(np.asarray(g, np.float32)))
    g, ref_g = np.asarray(g, np.float32), np.asarray(ref_g, np.float32)
    # the padded positions get no gradient at all
    assert not np.any(g[0, :5]) and not np.any(ref_g[0, :5])
    # float32 logits near 1e4 carry 1e-3 of rounding, and exp(x - lse) that relatively;
    # bfloat16: the result's own rounding
    tol = 4e-3 if dtype == jnp.bfloat16 else 2e-3 if offset else 1e-6
    np.testing.assert_allclose(g, ref_g, atol=tol, rtol=0)
  # the gradient is softmax - one-hot per counted token (a check of the formula itself)
  if dtype == jnp.float32 and offset == 0.0:
    p = jax.nn.softmax(logits, axis=-1) - jax.nn.one_hot(targets, logits.shape[-1])
    p = p * (targets != 0)[..., None]
    fused = jax.grad(lambda x: token_cross_entropy(x, targets, "fused")[0])(logits)
    np.testing.assert_allclose(fused, p, atol=1e-6, rtol=0)


def test_fused_loss_differentiates_forward_under_vmap_and_under_remat():
  logits, targets = _case(jnp.float32)
  fused = lambda x: token_cross_entropy(x, targets, "fused")[0]  # noqa: E731
  auto = lambda x: token_cross_entropy(x, targets, "autodiff")[0]  # noqa: E731
  tangent = jax.random.normal(jax.random.key(3), logits.shape)
  _, jf = jax.jvp(fused, (logits,), (tangent,))
  _, ja = jax.jvp(auto, (logits,), (tangent,))
  np.testing.assert_allclose(jf, ja, rtol=1e-5)
  batched = jnp.stack([logits, 2 * logits])
  per_fused = jax.vmap(jax.grad(fused))(batched)
  per_auto = jax.vmap(jax.grad(auto))(batched)
  np.testing.assert_allclose(per_fused, per_auto, atol=1e-6, rtol=0)
  np.testing.assert_allclose(jax.grad(jax.checkpoint(fused))(logits), per_auto[0], atol=1e-6,
                             rtol=0)


def test_chunked_loss_takes_either_form_with_the_same_value_and_gradient():
  k = jax.random.split(jax.random.key(11), 4)
  h = jax.random.normal(k[0], (2, 16, 8))
  kernel, bias = jax.random.normal(k[1], (8, 50)), jax.random.normal(k[2], (50,))
  targets = jax.random.randint(k[3], (2, 16), 0, 50)
  out = {g: jax.value_and_grad(lambda w, g=g: chunked_token_cross_entropy(
      h, w, bias, targets, 4, grad=g)[0])(kernel) for g in ("fused", "autodiff")}
  assert float(out["fused"][0]) == float(out["autodiff"][0])
  np.testing.assert_allclose(out["fused"][1], out["autodiff"][1], atol=1e-5, rtol=0)


def test_an_unknown_form_is_refused():
  logits, targets = _case(jnp.float32)
  with pytest.raises(ValueError, match="grad='exact'"):
    token_cross_entropy(logits, targets, "exact")


def test_the_model_s_gradient_is_the_same_under_either_form():
  """Through the whole model (tiny config, dropout and exploration on): the same loss, bitwise,
  and the same gradient of every parameter to float rounding."""
  c = tiny.get_config()
  trainer = Trainer(c, model_config(c.model), steps_per_epoch=10)
  state = trainer.new_state()
  params = jax.tree_util.tree_map(lambda x: x[0], state.params)
  memory = jax.tree_util.tree_map(lambda x: x[0], state.memory)
  rng = np.random.default_rng(0)
  batch = {k: jnp.asarray(rng.integers(0, c.model.vocab_size, (c.train.batch_size,
                                                                c.data.seq_len)), jnp.int32)
           for k in ("inputs", "targets")}
  rngs = {"dropout": jax.random.key(1), "explore": jax.random.key(2)}

  def grads(form):
    def loss(p):
      total, count, _ = _token_loss(trainer.model, p, memory, batch, rngs, 0, form)
      return total / count
    return jax.jit(jax.value_and_grad(loss))(params)

  (lf, gf), (la, ga) = grads("fused"), grads("autodiff")
  assert float(lf) == float(la)
  # against the gradient's scale: some gradients are 0 but for rounding (the key projection's
  # bias, to which softmax is blind), where a relative comparison would compare noise
  scale = max(float(np.max(np.abs(b))) for b in jax.tree_util.tree_leaves(ga))
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(gf), jax.tree_util.tree_leaves(ga)):
    assert float(np.max(np.abs(a - b))) <= 1e-6 * scale, jax.tree_util.keystr(path)


def test_the_trainer_takes_the_form_from_the_environment(monkeypatch):
  """INFINITO_LOSS_GRADIENT chooses the train step's form (an A/B switch for benchmarks): the
  two steps' first losses are equal, their updates differ only by rounding (AdamW's first step
  moves each parameter by at most the learning rate, so a gradient near 0 whose sign rounding
  flips moves its parameter by up to twice that), and a bad value is refused."""
  def two_steps(form):
    monkeypatch.setenv("INFINITO_LOSS_GRADIENT", form)
    assert loss_gradient_form() == form
    c = tiny.get_config()
    trainer = Trainer(c, model_config(c.model), steps_per_epoch=10)
    state = trainer.new_state()
    rng = np.random.default_rng(0)
    batch = trainer.put({k: rng.integers(0, c.model.vocab_size, (
        1, c.train.batch_size, c.data.seq_len)).astype(np.int32) for k in ("inputs", "targets")})
    losses = []
    for _ in range(2):
      state, m = trainer.train_step(state, batch)
      losses.append(float(m["loss"][0]))
    return losses, jax.device_get(state.params), c.train.learning_rate

  (fused_losses, fused, lr), (auto_losses, auto, _) = two_steps("fused"), two_steps("autodiff")
  assert fused_losses[0] == auto_losses[0]
  assert fused_losses[1] == pytest.approx(auto_losses[1], rel=1e-5)
  diffs = [float(np.max(np.abs(a - b))) for a, b in zip(jax.tree_util.tree_leaves(fused),
                                                          jax.tree_util.tree_leaves(auto))]
  assert 0 < max(diffs) <= 4 * lr, diffs  # the switch took effect; rounding alone differs
  monkeypatch.delenv("INFINITO_LOSS_GRADIENT")  # 'auto': the platform's choice
  assert loss_gradient_form() == ("autodiff" if jax.default_backend() == "cpu" else "fused")
  monkeypatch.setenv("INFINITO_LOSS_GRADIENT", "exact")
  with pytest.raises(ConfigError, match="INFINITO_LOSS_GRADIENT='exact'"):
    loss_gradient_form()
