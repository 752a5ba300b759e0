"""Throughput of a population: tokens/s of N = 1, 4, 8 replicas in one jitted step, one command.

  python bench/population.py --preset demo [--replicas 1 4 8] [--steps 5]

Each N times the Trainer's vmapped train_step (what train.py --config.train.replicas=N runs:
N independent runs, each with its own batch of the preset's shape), median of --steps after
compilation, in this process one after another; prints a JSON line per N and the speed-up
tokens/s(N) / tokens/s(1). On an accelerator a population fills the device that one small run
leaves idle; on a CPU the cores are already busy with one run, so expect about 1x.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from step_speed import PRESETS, time_ours  # noqa: E402


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--preset", default="demo", choices=sorted(PRESETS))
  p.add_argument("--replicas", type=int, nargs="+", default=[1, 4, 8])
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--bf16", action="store_true")
  a = p.parse_args()
  rows = []
  for n in a.replicas:
    rows.append(time_ours(a.preset, a.steps, a.bf16, replicas=n))
    print(json.dumps(rows[-1]), flush=True)
  one = next((r for r in rows if r["replicas"] == 1), rows[0])
  print(json.dumps({"speedup_vs_1": {r["replicas"]: round(r["tokens_per_s"] / one["tokens_per_s"], 2)
                                     for r in rows}, "preset": a.preset,
                    "platform": one["platform"], "device": one["device"]}))


if __name__ == "__main__":
  main()
