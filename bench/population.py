"""Throughput of a population: tokens/s of N = 1, 4, 8 replicas in one jitted step, one command.

  python bench/population.py --preset demo [--replicas 1 4 8] [--steps 5] [--forms vmap map]

Each N times the Trainer's train step (what train.py --config.train.replicas=N runs: N
independent runs, each with its own batch of the preset's shape) and its eval step, compiled in
each population form (infinito_jax.train.population_form: 'vmap', one batched program; 'map',
the replicas one after another inside the program; the default --forms is the platform's
automatic choice, and both on a CPU). Every program is built first, then all are timed in
turns (one call of each per round, median of --steps rounds), so a slow spell of a shared
machine falls on all alike. Prints a JSON line per N and form, then the speed-ups
tokens/s(N, form) / tokens/s(1). On an accelerator a population fills the device that one small
run leaves idle; on a CPU one run already keeps the cores busy, so expect about 1x at best.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402

from step_speed import PRESETS, interleaved_times, prepare_ours  # noqa: E402
from infinito_jax.train import POPULATION_FORMS  # noqa: E402


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--preset", default="demo", choices=sorted(PRESETS))
  p.add_argument("--replicas", type=int, nargs="+", default=[1, 4, 8])
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--bf16", action="store_true")
  p.add_argument("--forms", nargs="+", default=None, choices=POPULATION_FORMS[1:],
                 help="population forms to time for N > 1 (default: vmap and map on a CPU, "
                      "the automatic form elsewhere)")
  a = p.parse_args()
  if any(n < 1 for n in a.replicas):
    p.error(f"--replicas must be positive integers, got {a.replicas}")
  forms = a.forms or (["vmap", "map"] if jax.default_backend() == "cpu" else ["auto"])
  runs = [(n, "auto" if n == 1 else form) for n in a.replicas
          for form in (["auto"] if n == 1 else forms)]
  prepared = [prepare_ours(a.preset, a.bf16, n, with_eval=True, population=form)
              for n, form in runs]
  med = interleaved_times([q[step] for q in prepared for step in ("train", "eval")], a.steps)
  rows = []
  for i, q in enumerate(prepared):
    train, ev = q["rows"](med[2 * i], med[2 * i + 1])
    for row in (train, ev):
      row["timing"] = "interleaved"
      print(json.dumps(row), flush=True)
    rows.append((train, ev))
  one = next(((t, e) for t, e in rows if t["replicas"] == 1), rows[0])
  for step, k in (("train", 0), ("eval", 1)):
    print(json.dumps({
        "step": step, "preset": a.preset, "platform": one[0]["platform"],
        "device": one[0]["device"], "baseline_replicas": one[0]["replicas"],
        "speedup_vs_1": {f"{r[k]['replicas']}/{r[k]['population_form'] or 'single'}":
                         round(r[k]["tokens_per_s"] / one[k]["tokens_per_s"], 2)
                         for r in rows}}), flush=True)


if __name__ == "__main__":
  main()
