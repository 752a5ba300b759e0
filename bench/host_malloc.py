"""The host allocator's share of a CPU step, in one command: glibc as it is, glibc tuned
(infinito_jax/hostmem.py, what train.py does), and tcmalloc or jemalloc preloaded where the
machine has them.

  python bench/host_malloc.py --preset demo [--steps 6] [--rounds 2] [--peer ../shared/bench/torch_peer.py]

Each setting runs in its own process (the allocator is chosen when a process starts), and the
settings take turns for --rounds rounds, so a slow spell of a shared machine falls on all.
Each process builds the Trainer's train and eval steps on the preset's shapes and times
--steps calls of each after two warm-up calls: wall ms per step, CPU ms per step (user +
kernel, both threads' work: on a busy 2-core machine the better measure of work done), the
kernel's share and the page faults per step. With --peer, the PyTorch peer runs the same way
under glibc and under each preloaded allocator, for the ratios. Prints JSON lines: one per
process, then the medians per setting with their ratios to glibc as it is.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBS = {"tcmalloc": ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
                     "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4",
                     "/usr/lib64/libtcmalloc_minimal.so.4"),
        "jemalloc": ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
                     "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2", "/usr/lib64/libjemalloc.so.2")}


def settings(preloads: bool) -> list[tuple[str, dict]]:
  """(name, environment changes) of each allocator setting this machine can run."""
  # an LD_PRELOAD this command was started with must not turn the glibc rows into its allocator
  out = [("glibc", {"INFINITO_MALLOC": "system", "LD_PRELOAD": ""}),
         ("glibc-tuned", {"INFINITO_MALLOC": "tuned", "LD_PRELOAD": ""})]
  for name, paths in LIBS.items():
    path = next((p for p in paths if os.path.exists(p)), None)
    if path and preloads:
      out.append((name, {"LD_PRELOAD": path, "INFINITO_MALLOC": "system"}))
  return out


def child(preset: str, steps: int) -> None:
  """One process: tune (or not) as INFINITO_MALLOC says, then time the train and eval steps.
  Nothing that starts threads (numpy's BLAS) is imported before the tuning, as in train.py."""
  sys.path.insert(0, ROOT)
  from infinito_jax import hostmem  # pylint: disable=import-outside-toplevel
  allocator = hostmem.tune_malloc()
  sys.path.insert(0, os.path.join(ROOT, "bench"))
  import jax  # pylint: disable=import-outside-toplevel
  from step_speed import prepare_ours  # pylint: disable=import-outside-toplevel
  ours = prepare_ours(preset, False, with_eval=True)
  row = {"allocator": allocator, "preset": preset}
  for name in ("train", "eval"):
    fn = ours[name]
    for _ in range(2):
      jax.block_until_ready(fn())
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(steps):
      jax.block_until_ready(fn())
    t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    user, kernel = r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime
    row[name] = {"wall_ms": round((t1 - t0) / steps * 1e3, 1),
                 "cpu_ms": round((user + kernel) / steps * 1e3, 1),
                 "kernel_ms": round(kernel / steps * 1e3, 1),
                 "page_faults": round((r1.ru_minflt - r0.ru_minflt) / steps)}
  print(json.dumps(row), flush=True)


def run(cmd: list[str], env: dict) -> dict | None:
  out = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True)
  lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
  if out.returncode or not lines:
    print(json.dumps({"failed": cmd[1:3], "env": env, "stderr": out.stderr[-500:]}), flush=True)
    return None
  return json.loads(lines[-1])


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--preset", default="demo", choices=["tiny", "demo", "full"])
  p.add_argument("--steps", type=int, default=6)
  p.add_argument("--rounds", type=int, default=2)
  p.add_argument("--peer", default=None, help="path of torch_peer.py to run the same way")
  p.add_argument("--no_preload", action="store_true", help="glibc settings only")
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  a = p.parse_args()
  if a.steps < 1 or a.rounds < 1:
    p.error("--steps and --rounds must be at least 1")
  if a.child:
    child(a.preset, a.steps)
    return
  if a.peer and not os.path.isfile(a.peer):
    p.error(f"--peer {a.peer}: no such file (the peer is ../shared/bench/torch_peer.py)")
  ours = settings(not a.no_preload)
  peers = ([(n, e) for n, e in ours if n != "glibc-tuned"] if a.peer else [])
  results = {("ours", n): [] for n, _ in ours} | {("peer", n): [] for n, _ in peers}
  for _ in range(a.rounds):
    for name, env in ours:
      row = run([sys.executable, os.path.abspath(__file__), "--child", "--preset", a.preset,
                 "--steps", str(a.steps)], env)
      if row:
        print(json.dumps({"impl": "infinito_jax", "setting": name, **row}), flush=True)
        results[("ours", name)].append(row)
    for name, env in peers:
      row = run([sys.executable, a.peer, "--preset", a.preset, "--steps", str(a.steps)], env)
      if row:
        print(json.dumps({"impl": "peer", "setting": name, **row}), flush=True)
        results[("peer", name)].append(row)
  import numpy as np  # pylint: disable=g-import-not-at-top  (not in a child: see child())
  summary = {}
  for (impl, name), rows in results.items():
    if not rows:
      continue
    if impl == "ours":
      summary[(impl, name)] = {step: {k: round(float(np.median([r[step][k] for r in rows])), 1)
                                      for k in rows[0][step]} for step in ("train", "eval")}
    else:
      summary[(impl, name)] = {"train": {"wall_ms": round(float(np.median(
          [r["step_s_median"] * 1e3 for r in rows])), 1)}}
  base = summary.get(("ours", "glibc"))
  peer_base = summary.get(("peer", "glibc"))
  for (impl, name), s in summary.items():
    out = {"summary": impl, "setting": name, "rounds": len(results[(impl, name)]), **s}
    if impl == "ours" and base:
      out["train_wall_vs_glibc"] = round(base["train"]["wall_ms"] / s["train"]["wall_ms"], 2)
      out["train_cpu_vs_glibc"] = round(base["train"]["cpu_ms"] / s["train"]["cpu_ms"], 2)
      out["eval_wall_vs_glibc"] = round(base["eval"]["wall_ms"] / s["eval"]["wall_ms"], 2)
      for peer_name in ("glibc", name):
        peer = summary.get(("peer", peer_name))
        if peer:
          out[f"train_speedup_vs_peer_{peer_name}"] = round(
              peer["train"]["wall_ms"] / s["train"]["wall_ms"], 2)
    elif impl == "peer" and peer_base:
      out["train_wall_vs_glibc"] = round(peer_base["train"]["wall_ms"] / s["train"]["wall_ms"],
                                         2)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
  import _cli  # pylint: disable=g-import-not-at-top
  _cli.run_main(main)
