"""Training-step speed of infinito_jax against the PyTorch peer, in one command.

  python bench/step_speed.py --preset demo                         # ours only, JSON line
  python bench/step_speed.py --preset demo --peer ../shared/bench/torch_peer.py   # and the ratio

Times the jitted train_step (train mode: dropout, exploration noise, memory read and write,
clip + AdamW) on the peer's shapes, median of --steps after compilation; the peer runs in a
subprocess of the same command on the same machine, and the ratio is ours / theirs.
"""

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import default  # noqa: E402
from infinito_jax.model import model_config  # noqa: E402
from infinito_jax.train import Trainer  # noqa: E402

PRESETS = {  # vocab, hidden, layers, heads, batch, seq_len (the peer's)
    "tiny": (1000, 64, 2, 4, 8, 64),
    "demo": (5000, 256, 3, 4, 16, 128),
    "full": (10000, 512, 6, 8, 32, 256),
}


def time_ours(preset: str, steps: int, bf16: bool, replicas: int = 1) -> dict:
  """Median step time of the Trainer's jitted train_step (the one train.py runs), for a
  population of `replicas` (each its own batch of the preset's shape)."""
  vocab, d, layers, heads, b, t = PRESETS[preset]
  config = default.get_config()
  m = config.model
  m.vocab_size, m.hidden_dim, m.num_layers, m.num_heads = vocab, d, layers, heads
  m.dtype = "bfloat16" if bf16 else "float32"
  config.train.batch_size, config.data.seq_len = b, t
  config.train.replicas = replicas
  trainer = Trainer(config, model_config(config.model), steps_per_epoch=1000)
  state = trainer.new_state()
  rng = np.random.default_rng(0)
  batch = trainer.put({k: rng.integers(3, vocab, (replicas, b, t)).astype(np.int32)
                       for k in ("inputs", "targets")})
  t0 = time.perf_counter()
  state, m = trainer.train_step(state, batch)
  jax.block_until_ready(m)
  first = time.perf_counter() - t0
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, m = trainer.train_step(state, batch)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
  med = float(np.median(times))
  return dict(impl="infinito_jax", preset=preset, platform=jax.devices()[0].platform,
              device=str(jax.devices()[0].device_kind), devices=trainer.mesh.size, bf16=bf16,
              replicas=replicas, first_step_s=round(first, 3), step_s_median=round(med, 5),
              tokens_per_s=round(replicas * b * t / med, 1))


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--preset", default="demo", choices=sorted(PRESETS))
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--bf16", action="store_true", help="compute in bfloat16 (both sides)")
  p.add_argument("--peer", default=None, help="path of torch_peer.py to run for the ratio")
  a = p.parse_args()
  ours = time_ours(a.preset, a.steps, a.bf16)
  print(json.dumps(ours), flush=True)
  if a.peer:
    cmd = [sys.executable, a.peer, "--preset", a.preset, "--steps", str(a.steps)]
    if a.bf16:
      cmd.append("--bf16")
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
      print(f"peer failed: {out.stderr[-2000:]}", file=sys.stderr)
      sys.exit(1)
    peer = json.loads(out.stdout.strip().splitlines()[-1])
    print(json.dumps(peer))
    print(json.dumps(dict(preset=a.preset, bf16=a.bf16, device=ours["device"],
                          speedup_tokens_per_s=round(ours["tokens_per_s"] / peer["tokens_per_s"], 2))))


if __name__ == "__main__":
  main()
