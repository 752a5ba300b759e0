"""The demo train step's pieces on their own, XLA against PyTorch in one process (issue 10, CPU).

  python bench/cpu_ops.py            # JSON lines: ms of each op on each side, and the ratio

Why the CPU step is slower than the peer's: XLA's float32 and bfloat16 matrix products are as
fast as PyTorch's here, while its elementwise work (random bits for dropout, GELU, the softmax
over the vocabulary) is slower, because XLA:CPU runs those fusions on one thread.
`python bench/kernel_profile.py --preset demo --by_op` shows the same inside the real step
(busy thread time against wall time). Needs torch (pip install -e ".[torch]").
"""

import json
import os
import sys

import jax
import jax.numpy as jnp

from step_speed import median_time  # noqa: E402  (bench/ is this script's folder)

try:
  import torch
except ImportError:
  sys.exit('bench/cpu_ops.py compares against PyTorch: pip install -e ".[torch]"')

# the demo preset: 16 x 128 tokens, D 256, feed-forward 1024, vocabulary 5000
TOKENS, D, FF, VOCAB = 2048, 256, 1024, 5000


def median_ms(fn, repeats: int = 20) -> float:
  fn()  # warm-up (compiles the jitted side)
  return 1e3 * median_time(fn, repeats)


def one_thread(fn):
  """fn timed with PyTorch on one thread (how fast one core does the op)."""
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  try:
    return median_ms(fn)
  finally:
    torch.set_num_threads(threads)


def row(op: str, ours: float, peer: float, flops: float = 0.0, peer_one: float = 0.0) -> None:
  out = {"op": op, "xla_ms": round(ours, 3), "torch_ms": round(peer, 3),
         "xla_over_torch_speed": round(peer / ours, 2)}
  if peer_one:
    out["torch_one_thread_ms"] = round(peer_one, 3)
  if flops:
    out.update(xla_gflops=round(flops / ours / 1e6), torch_gflops=round(flops / peer / 1e6))
  print(json.dumps(out), flush=True)


def layer_rows():
  """One demo layer (attention, LayerNorms, feed-forward with GELU; dropout off), forward and
  forward + backward of sum(h * h): our Block against the peer's layer written in torch."""
  import math  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from infinito_jax.model import Block, ModelConfig  # pylint: disable=import-outside-toplevel
  b, t, heads = 16, TOKENS // 16, 4
  x = np.random.default_rng(0).normal(size=(b, t, D)).astype(np.float32)
  block = Block(ModelConfig(vocab_size=VOCAB, hidden_dim=D, num_layers=3, num_heads=heads,
                            dropout=0.0))
  xj = jnp.asarray(x)
  params = block.init(jax.random.key(0), xj, True, False)
  loss = lambda p, x: jnp.sum(jnp.square(block.apply(p, x, True, False)[0]))  # noqa: E731
  fwd, grad = jax.jit(loss), jax.jit(jax.grad(loss, argnums=(0, 1)))
  nn_ = torch.nn
  q, k, v, o = (nn_.Linear(D, D) for _ in range(4))
  ff = nn_.Sequential(nn_.Linear(D, 4 * D), nn_.GELU(), nn_.Linear(4 * D, D))
  n1, n2 = nn_.LayerNorm(D), nn_.LayerNorm(D)
  xt = torch.from_numpy(x).requires_grad_()

  def torch_loss():
    split = lambda z: z.view(b, t, heads, D // heads).transpose(1, 2)  # noqa: E731
    w = torch.softmax(split(q(xt)) @ split(k(xt)).transpose(-2, -1) / math.sqrt(D // heads), -1)
    h = n1(xt + o((w @ split(v(xt))).transpose(1, 2).reshape(b, t, D)))
    return torch.square(n2(h + ff(h))).sum()

  def torch_fwd():
    with torch.no_grad():
      return torch_loss()

  row("demo layer forward", median_ms(lambda: fwd(params, xj).block_until_ready()),
      median_ms(torch_fwd))
  row("demo layer forward + backward",
      median_ms(lambda: jax.block_until_ready(grad(params, xj))),
      median_ms(lambda: torch_loss().backward()))


def main():
  print(json.dumps({"jax": jax.__version__, "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                    "xla_flags": os.environ.get("XLA_FLAGS", "")}), flush=True)
  for m, k, n in [(TOKENS, D, VOCAB), (TOKENS, VOCAB, D), (TOKENS, D, FF), (TOKENS, FF, D),
                  (TOKENS, D, D)]:
    for jdt, tdt in [(jnp.float32, torch.float32), (jnp.bfloat16, torch.bfloat16)]:
      a, b = jnp.ones((m, k), jdt), jnp.ones((k, n), jdt)
      dot = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
      ta, tb = torch.ones(m, k, dtype=tdt), torch.ones(k, n, dtype=tdt)
      row(f"dot {m}x{k}x{n} {jnp.dtype(jdt).name}",
          median_ms(lambda: dot(a, b).block_until_ready()), median_ms(lambda: ta @ tb),
          2.0 * m * k * n)
  x, tx = jnp.ones((TOKENS, FF)), torch.ones(TOKENS, FF)
  gelu = jax.jit(lambda x: jax.nn.gelu(x, approximate=False))
  tgelu = lambda: torch.nn.functional.gelu(tx)
  row(f"gelu (erf) {TOKENS}x{FF}", median_ms(lambda: gelu(x).block_until_ready()),
      median_ms(tgelu), peer_one=one_thread(tgelu))
  key = jax.random.key(0)
  drop = jax.jit(lambda k, x: jnp.where(jax.random.bernoulli(k, 0.9, x.shape), x / 0.9, 0))
  tdrop = lambda: torch.nn.functional.dropout(tx, 0.1, True)
  row(f"dropout 0.1 (threefry bits) {TOKENS}x{FF}",
      median_ms(lambda: drop(key, x).block_until_ready()), median_ms(tdrop),
      peer_one=one_thread(tdrop))
  from infinito_jax.layers import Dropout  # pylint: disable=import-outside-toplevel
  drop16 = jax.jit(lambda k, x: Dropout(0.1, bits=16).apply({}, x, deterministic=False,
                                                            rngs={"dropout": k}))
  row(f"dropout 0.1, model.dropout_bits=16 {TOKENS}x{FF}",
      median_ms(lambda: drop16(key, x).block_until_ready()), median_ms(tdrop),
      peer_one=one_thread(tdrop))
  z, tz = jnp.ones((TOKENS, VOCAB)), torch.ones(TOKENS, VOCAB)
  lsm = jax.jit(lambda z: jax.nn.log_softmax(z, axis=-1))
  tlsm = lambda: torch.log_softmax(tz, -1)
  row(f"log_softmax {TOKENS}x{VOCAB}", median_ms(lambda: lsm(z).block_until_ready()),
      median_ms(tlsm), peer_one=one_thread(tlsm))
  layer_rows()
  axpb = jax.jit(lambda z: z * 2.0 + 1.0)
  taxpb = lambda: tz.mul(2.0).add_(1.0)
  row(f"x * 2 + 1 {TOKENS}x{VOCAB}", median_ms(lambda: axpb(z).block_until_ready()),
      median_ms(taxpb), peer_one=one_thread(taxpb))


if __name__ == "__main__":
  import argparse  # pylint: disable=g-import-not-at-top
  argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()  # --help; no flags
  import _cli  # pylint: disable=g-import-not-at-top
  _cli.run_main(main)
