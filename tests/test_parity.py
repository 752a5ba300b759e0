"""Parity with the original PyTorch V5.2 (fixture from its code), within SPEC's tolerances."""

import jax
import numpy as np
import optax
import pytest

from infinito_jax.convert import to_torch_state_dict
from infinito_jax.loss import mean_token_cross_entropy
from infinito_jax.metrics import PER_EXAMPLE
from infinito_jax.model import InfinitoV52
from infinito_jax.optim import make_optimizer

TOL = 1e-5  # logits, metrics, memory
GRAD_TOL = 1e-6


@pytest.fixture(scope="module")
def highest_precision():
  """float32 matmuls at full precision on every backend (GPUs/TPUs default to faster ones)."""
  with jax.default_matmul_precision("highest"):
    yield


def memory_in_torch_names(params, memory):
  sd = to_torch_state_dict({"params": params, "memory": memory})
  return {k: v for k, v in sd.items() if k in (
      "memory.memory", "memory.memory_age", "memory.memory_importance", "memory.access_count",
      "memory.memory_utilization_tracker")}


def worst(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.fixture(scope="module")
def eval_calls(reference, highest_precision):
  """call1 (metrics, x1) then call2 (no metrics, x2) from the fixture's state, as the original."""
  model = InfinitoV52(reference["config"])
  v = reference["variables"]
  x1, x2 = reference["arrays"]["x1"], reference["arrays"]["x2"]
  (logits1, metrics1), upd1 = model.apply(v, x1, with_metrics=True,
                                          mutable=["memory", "intermediates"])
  v2 = {"params": v["params"], "memory": upd1["memory"]}
  (logits2, metrics2), upd2 = model.apply(v2, x2, mutable=["memory"])
  return dict(logits1=logits1, metrics1=metrics1, upd1=upd1, logits2=logits2,
              metrics2=metrics2, upd2=upd2)


def test_call1_logits_and_attention_match_original(reference, eval_calls):
  a = reference["arrays"]
  assert worst(eval_calls["logits1"], a["call1/logits"]) < TOL
  avg = eval_calls["upd1"]["intermediates"]["avg_attention"][0]
  assert worst(avg, a["call1/avg_attention"]) < TOL


@pytest.mark.parametrize("name", PER_EXAMPLE)
def test_call1_per_example_metrics_match_original(reference, eval_calls, name):
  got = eval_calls["metrics1"]["per_example"][name]
  assert worst(got, reference["arrays"][f"call1/per_example/{name}"]) < TOL


def test_call1_scalar_metrics_match_original(reference, eval_calls):
  for name, want in reference["meta"]["call1_metrics"].items():
    assert abs(float(eval_calls["metrics1"][name]) - want) < TOL, name


@pytest.mark.parametrize("call", ["call1", "call2"])
def test_memory_state_after_each_call_matches_original(reference, eval_calls, call):
  upd = eval_calls["upd1" if call == "call1" else "upd2"]
  got = memory_in_torch_names(reference["variables"]["params"], upd["memory"])
  for name, value in got.items():
    assert worst(value, reference["arrays"][f"{call}/state/{name}"]) < TOL, name
  # The write must have moved something: the state is not the initial one.
  before = memory_in_torch_names(reference["variables"]["params"],
                                 reference["variables"]["memory"])
  assert worst(got["memory.memory_age"], before["memory.memory_age"]) > 0


def test_call2_logits_match_original_and_need_no_metrics(reference, eval_calls):
  assert eval_calls["metrics2"] is None
  assert worst(eval_calls["logits2"], reference["arrays"]["call2/logits"]) < TOL


@pytest.fixture(scope="module")
def one_step(reference, highest_precision):
  """Loss and gradients on (x1, y1) in eval mode, then one clip(1.0) + AdamW(1e-4) step."""
  model = InfinitoV52(reference["config"])
  v = reference["variables"]
  a = reference["arrays"]

  def loss_fn(params):
    (logits, _), upd = model.apply({"params": params, "memory": v["memory"]}, a["x1"],
                                   mutable=["memory"])
    return mean_token_cross_entropy(logits, a["y1"]), upd["memory"]

  (loss, memory), grads = jax.value_and_grad(loss_fn, has_aux=True)(v["params"])
  tx = make_optimizer(1e-4, reference["config"], v["params"])
  updates, _ = tx.update(grads, tx.init(v["params"]), v["params"])
  params = optax.apply_updates(v["params"], updates)
  return dict(loss=loss, grads=grads, params=params, memory=memory)


def test_loss_and_grad_norm_match_original(reference, one_step):
  meta = reference["meta"]
  assert abs(float(one_step["loss"]) - meta["step_loss"]) < TOL
  assert abs(float(optax.tree.norm(one_step["grads"])) - meta["step_grad_norm_before_clip"]) < TOL


def test_gradients_match_original(reference, one_step):
  sd = to_torch_state_dict({"params": one_step["grads"], "memory": one_step["memory"]})
  names = [k[len("grad/"):] for k in reference["arrays"] if k.startswith("grad/")]
  assert len(names) == 36
  for name in names:
    assert worst(sd[name], reference["arrays"][f"grad/{name}"]) < GRAD_TOL, name
  for name in reference["meta"]["params_without_grad"]:
    if name != "memory.memory_utilization_tracker":  # state here, not a parameter
      assert np.all(sd[name] == 0), name


def test_parameters_after_one_adamw_step_match_original(reference, one_step):
  a = reference["arrays"]
  grads = to_torch_state_dict({"params": one_step["grads"], "memory": one_step["memory"]})
  # the tracker is a torch Parameter changed by the forward pass, not by AdamW: here it is the
  # memory state the loss pass returned.
  after = to_torch_state_dict({"params": one_step["params"], "memory": one_step["memory"]})
  names = [k[len("after_step/"):] for k in a if k.startswith("after_step/")]
  assert len(names) == 50
  for name in names:
    want, got = a[f"after_step/{name}"], after[name]
    big = np.abs(grads[name]) > 1e-6
    err = np.abs(got.astype(np.float64) - want)
    assert np.all(err[big] < GRAD_TOL), name
    assert np.all(err < TOL), name
  # parameters the loss never reaches are left untouched, as torch's AdamW does (the
  # exploration scale is trained in train mode, so only this eval-mode step leaves it alone)
  before = reference["state"]
  for name in reference["meta"]["params_without_grad"]:
    if name not in ("memory.memory_utilization_tracker", "explorer.adaptive_scale"):
      np.testing.assert_array_equal(after[name], before[name], err_msg=name)
