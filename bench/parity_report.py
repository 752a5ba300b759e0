"""Worst absolute error per group against the original's fixture (the numbers tests/test_parity.py bounds).

  python bench/parity_report.py
"""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from infinito_jax.convert import from_torch_state_dict, to_torch_state_dict  # noqa: E402
from infinito_jax.loss import mean_token_cross_entropy  # noqa: E402
from infinito_jax.model import InfinitoV52, ModelConfig  # noqa: E402
from infinito_jax.optim import make_optimizer  # noqa: E402

FIX = os.path.join(ROOT, "..", "shared", "fixtures", "reference_v52_small")


def worst(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def main():
  a = dict(np.load(FIX + ".npz"))
  meta = json.load(open(FIX + ".json"))
  cfg = ModelConfig(vocab_size=97, hidden_dim=32, num_layers=2, num_heads=4, memory_slots=8,
                    causal=False)
  state = {k[6:]: v for k, v in a.items() if k.startswith("state/")}
  v = from_torch_state_dict(state, cfg)
  model = InfinitoV52(cfg)
  r = {}
  with jax.default_matmul_precision("highest"):
    (l1, m1), u1 = model.apply(v, a["x1"], with_metrics=True, mutable=["memory", "intermediates"])
    v2 = {"params": v["params"], "memory": u1["memory"]}
    (l2, _), u2 = model.apply(v2, a["x2"], mutable=["memory"])

    def loss_fn(p):
      (logits, _), upd = model.apply({"params": p, "memory": v["memory"]}, a["x1"], mutable=["memory"])
      return mean_token_cross_entropy(logits, a["y1"]), upd["memory"]

    (loss, mem), g = jax.value_and_grad(loss_fn, has_aux=True)(v["params"])
    tx = make_optimizer(1e-4, cfg, v["params"])
    upd, _ = tx.update(g, tx.init(v["params"]), v["params"])
    p1 = optax.apply_updates(v["params"], upd)
  r["call1/logits"] = worst(l1, a["call1/logits"])
  r["call1/avg_attention"] = worst(u1["intermediates"]["avg_attention"][0], a["call1/avg_attention"])
  r["call1/per_example"] = max(worst(m1["per_example"][k], a[f"call1/per_example/{k}"])
                               for k in m1["per_example"])
  r["call1/scalar_metrics"] = max(abs(float(m1[k]) - x) for k, x in meta["call1_metrics"].items())
  for call, u in (("call1", u1), ("call2", u2)):
    sd = to_torch_state_dict({"params": v["params"], "memory": u["memory"]})
    r[f"{call}/memory_state"] = max(worst(sd[k[len(call) + 7:]], a[k]) for k in a
                                    if k.startswith(f"{call}/state/"))
  r["call2/logits"] = worst(l2, a["call2/logits"])
  r["step_loss"] = abs(float(loss) - meta["step_loss"])
  r["grad_norm_before_clip"] = abs(float(optax.tree.norm(g)) - meta["step_grad_norm_before_clip"])
  gsd = to_torch_state_dict({"params": g, "memory": mem})
  r["grad"] = max(worst(gsd[k[5:]], a[k]) for k in a if k.startswith("grad/"))
  after = to_torch_state_dict({"params": p1, "memory": mem})
  big = small = 0.0
  for k in (k for k in a if k.startswith("after_step/")):
    name = k[len("after_step/"):]
    err = np.abs(after[name].astype(np.float64) - a[k])
    mask = np.abs(gsd[name]) > 1e-6
    big = max(big, float(err[mask].max()) if mask.any() else 0.0)
    small = max(small, float(err[~mask].max()) if (~mask).any() else 0.0)
  r["after_step/|grad|>1e-6"] = big
  r["after_step/elsewhere"] = small
  r["platform"] = jax.devices()[0].platform
  print(json.dumps(r, indent=1))


if __name__ == "__main__":
  import argparse  # pylint: disable=g-import-not-at-top
  argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()  # --help; no flags
  if not os.path.isfile(FIX + ".npz"):
    sys.exit(f"error: no fixture at {FIX}.npz: the shared folder ../shared (beside the project) "
             "holds it.")
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import _cli  # pylint: disable=g-import-not-at-top
  _cli.run_main(main)
