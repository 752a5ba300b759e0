"""Compile time of the jitted train and eval steps, unrolled layers against model.scan_layers.

  python bench/compile_time.py --preset full            # D 512, 6 layers
  python bench/compile_time.py --preset large --remat   # D 1024, 12 layers

Each (mode, step) pair is lowered and compiled from scratch (no persistent cache) in this one
process, alternating the modes, and the medians are printed as JSON lines with the ratio.
"""

import argparse
import json
import os
import sys
import time

os.environ["JAX_COMPILATION_CACHE_DIR"] = ""  # compile for real: no persistent cache
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

if __name__ == "__main__":  # the host allocator as train.py sets it, before JAX starts threads
  from infinito_jax import hostmem as _hostmem  # noqa: E402  pylint: disable=g-import-not-at-top
  _hostmem.at_startup()

import jax  # noqa: E402
import numpy as np  # noqa: E402

import _cli  # noqa: E402
from infinito_jax.model import model_config  # noqa: E402
from infinito_jax.train import Trainer  # noqa: E402
from step_speed import PRESETS, check_configs, make_config  # noqa: E402


def compile_seconds(preset: str, scan: bool, remat: bool) -> tuple[float, float]:
  config = make_config(preset, False, scan_layers=scan, remat=remat)
  trainer = Trainer(config, model_config(config.model), steps_per_epoch=1000)
  _, _, _, _, b, t = PRESETS[preset]
  state = trainer.abstract_state()
  batch = jax.ShapeDtypeStruct((1, b, t), np.int32, sharding=trainer.batch_sharding)
  t0 = time.perf_counter()
  trainer.train_step.lower(state, {"inputs": batch, "targets": batch}).compile()
  train_s = time.perf_counter() - t0
  eval_batch = jax.ShapeDtypeStruct((trainer.eval_batch_size, t), np.int32,
                                    sharding=trainer.scorer.batch_sharding)
  t0 = time.perf_counter()
  trainer.eval_step.lower(state.params, state.memory,
                          {"inputs": eval_batch, "targets": eval_batch}).compile()
  return train_s, time.perf_counter() - t0


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--preset", default="full", choices=sorted(PRESETS))
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--remat", action="store_true", help="also model.remat in the scanned mode")
  a = p.parse_args()
  if a.repeats < 1:
    p.error(f"--repeats must be a positive integer, got {a.repeats}")
  # both modes' configs and the INFINITO_* forms of the environment, before anything compiles
  check_configs(p, a.preset, False, [("unrolled", {}),
                                     ("scanned", {"scan_layers": True, "remat": a.remat})],
                flags_only=True)
  times = {False: [], True: []}
  for _ in range(a.repeats):
    for scan in (False, True):
      times[scan].append(compile_seconds(a.preset, scan, a.remat and scan))
  med = {k: np.median(np.array(v), axis=0) for k, v in times.items()}
  for scan in (False, True):
    print(json.dumps(dict(preset=a.preset, scan_layers=scan, remat=a.remat and scan,
                          platform=jax.devices()[0].platform,
                          device=str(jax.devices()[0].device_kind),
                          train_compile_s=round(float(med[scan][0]), 2),
                          eval_compile_s=round(float(med[scan][1]), 2))), flush=True)
  print(json.dumps(dict(preset=a.preset,
                        train_compile_ratio=round(float(med[False][0] / med[True][0]), 2),
                        eval_compile_ratio=round(float(med[False][1] / med[True][1]), 2))))


if __name__ == "__main__":
  _cli.run_main(main)
