"""Throughput of a population: tokens/s of N = 1, 4, 8 replicas in one jitted step, one command.

  python bench/population.py --preset demo [--replicas 1 4 8] [--steps 5] [--forms vmap map]
  python bench/population.py --preset demo --replicas 1 8 --no_eval \
      --variant exact: --variant fused:attention_dropout=0,rng_impl=rbg

Each N times the Trainer's train step (what train.py --config.train.replicas=N runs: N
independent runs, each with its own batch of the preset's shape) and its eval step (unless
--no_eval), compiled in each population form (infinito_jax.train.population_form: 'vmap', one
batched program; 'map', the replicas one after another inside the program; the default --forms
is the platform's automatic choice, and both on a CPU), for each --variant (settings as in
bench/step_speed.py, the same for every N). Every program is built first (a line per build with
its compile seconds, so a run cut short still says how far it got), then all are timed in turns
(one call of each per round, median of --steps rounds), so a slow spell of a shared machine
falls on all alike. Prints a JSON line per variant, N and form, then per variant the speed-ups
tokens/s(N, form) / tokens/s(1). On an accelerator a population fills the device that one small
run leaves idle; on a CPU one run already keeps the cores busy, so expect about 1x at best.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if __name__ == "__main__":  # the host allocator as train.py sets it, before JAX starts threads
  from infinito_jax import hostmem as _hostmem  # noqa: E402  pylint: disable=g-import-not-at-top
  _hostmem.at_startup()

import jax  # noqa: E402

import _cli  # noqa: E402
from step_speed import (PRESETS, VARIANT_DEFAULTS, check_configs,  # noqa: E402
                        interleaved_times, make_config, parse_variants, prepare_ours)
from infinito_jax.train import POPULATION_FORMS, check_fits  # noqa: E402

def variants(p: argparse.ArgumentParser, specs: list[str]) -> list[tuple[str, dict]]:
  """--variant specs on top of the defaults; the forms are --forms' business, not a variant's."""
  out = []
  for spec, (name, kw) in zip(specs or ["default:"],
                              parse_variants(p, specs or ["default:"], VARIANT_DEFAULTS)):
    if kw.pop("single") != "auto" or kw.pop("population") != "auto":
      p.error(f"--variant {spec!r}: choose population forms with --forms, not in a "
              "variant (a one-replica run is always compiled the platform's way)")
    out.append((name, kw))
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--preset", default="demo", choices=sorted(PRESETS))
  p.add_argument("--replicas", type=int, nargs="+", default=[1, 4, 8])
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--bf16", action="store_true")
  p.add_argument("--forms", nargs="+", default=None, choices=POPULATION_FORMS[1:],
                 help="population forms to time for N > 1 (default: vmap and map on a CPU, "
                      "the automatic form elsewhere)")
  p.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                 help="model/run settings as in bench/step_speed.py (repeatable), e.g. "
                      "fused:attention_dropout=0,rng_impl=rbg")
  p.add_argument("--no_eval", action="store_true",
                 help="time the train step only (the eval step's compile can take as long)")
  p.add_argument("--compilation_cache", default="",
                 help="a persistent compilation cache directory (a second command with the same "
                      "shapes loads its programs instead of compiling them)")
  a = p.parse_args()
  if any(n < 1 for n in a.replicas):
    p.error(f"--replicas must be positive integers, got {a.replicas}")
  if a.steps < 1:
    p.error(f"--steps must be a positive integer, got {a.steps}")
  chosen = variants(p, a.variant)
  check_configs(p, a.preset, a.bf16, chosen, a.replicas)
  for n in sorted(set(a.replicas)):  # the largest population fits, before the first build
    check_fits(make_config(a.preset, a.bf16, n))
  if a.compilation_cache:
    from infinito_jax.train import use_compilation_cache  # pylint: disable=import-outside-toplevel
    use_compilation_cache(a.compilation_cache, setting="--compilation_cache")
  forms = a.forms or (["vmap", "map"] if jax.default_backend() == "cpu" else ["auto"])
  runs = [(name, kw, n, "auto" if n == 1 else form) for name, kw in chosen for n in a.replicas
          for form in (["auto"] if n == 1 else forms)]
  steps = ("train",) if a.no_eval else ("train", "eval")
  prepared = []
  for name, kw, n, form in runs:
    t0 = time.perf_counter()
    prepared.append(prepare_ours(a.preset, a.bf16, n, with_eval=not a.no_eval, population=form,
                                 **kw))
    print(json.dumps({"built": name, "replicas": n, "population_form": form,
                      "seconds": round(time.perf_counter() - t0, 1)}), flush=True)
  med = interleaved_times([q[step] for q in prepared for step in steps], a.steps)
  rows = []
  for i, ((name, _, _, _), q) in enumerate(zip(runs, prepared)):
    got = q["rows"](*med[len(steps) * i:len(steps) * (i + 1)])
    for row in got:
      row["timing"], row["variant"] = "interleaved", name
      print(json.dumps(row), flush=True)
    rows.append((name, got))
  for name, _ in chosen:
    mine = [got for v, got in rows if v == name]
    one = next((got for got in mine if got[0]["replicas"] == 1), mine[0])
    for k, step in enumerate(steps):
      print(json.dumps({
          "step": step, "variant": name, "preset": a.preset, "bf16": a.bf16,
          "platform": one[0]["platform"], "device": one[0]["device"],
          "baseline_replicas": one[0]["replicas"],
          f"speedup_vs_{one[0]['replicas']}": {f"{got[k]['replicas']}/{got[k]['population_form'] or 'single'}":
                           round(got[k]["tokens_per_s"] / one[k]["tokens_per_s"], 2)
                           for got in mine}}), flush=True)


if __name__ == "__main__":
  _cli.run_main(main)
