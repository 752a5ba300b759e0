"""Where a train step's device time goes: a jax.profiler trace of a few steps, summed by kernel.

  python bench/kernel_profile.py --preset full --bf16 [--variant flags as step_speed.py]
  python bench/kernel_profile.py --preset demo --replicas 8 --by_op   # a population's step

Traces --steps calls of the Trainer's jitted train step (after compilation) with
`jax.profiler.trace(..., create_perfetto_trace=True)`, then reads the Perfetto JSON back and
sums the durations of the events on the device's streams by kernel name, and on its 'XLA Ops'
line by HLO op. Prints one JSON line per kernel and per op (top --top by time: ms per step and
share of the device time) and a total line with
the device-busy ms per step against the wall ms per step (the gap is host or launch time) and
the kernel launches per step (many short kernels: a step bound by launches, not by work).
On a CPU there are no device streams: the XLA ops the host's threads ran are summed instead
(the events XLA names by their HLO op; the runtime's own events, such as PjRt's execute
helpers and the thunk executor, left out). Kernels are leaf events only: a `while` loop's or
a `call`'s event, whose body's kernels are events of their own, is not counted again, and
the busy time is each thread's (stream's) union of its kernels' intervals, summed over the
threads (busy_threads: how many): on a CPU several threads run at once, so it can exceed the
wall time. One --variant a command: it profiles one setting.

With --by_op, XLA also dumps the optimised HLO of the step (into --out), and each kernel is
named by the JAX operation its fusion came from (the HLO's op_name metadata, layer numbers
folded: 'layers_*/attention/...'); a GPU trace runs the step as CUDA graphs, whose kernels
carry no op names of their own. Prints one JSON line per operation ("op": ...), GEMM
libraries' kernels as "gemm (library)".
"""

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if __name__ == "__main__":  # the host allocator as train.py sets it, before JAX starts threads
  from infinito_jax import hostmem as _hostmem  # noqa: E402  pylint: disable=g-import-not-at-top
  _hostmem.at_startup()

import jax  # noqa: E402
import numpy as np  # noqa: E402

import _cli  # noqa: E402
from step_speed import (COMPILE_FORMS, PRESETS, VARIANT_DEFAULTS, check_configs,  # noqa: E402
                        make_config, parse_variants, single_replica)
from infinito_jax.model import model_config  # noqa: E402
from infinito_jax.train import Trainer, population_form, use_threefry_kernel  # noqa: E402


# HLO control flow: its body's ops are events of their own (on this thread or others)
_CONTROL_FLOW = re.compile(r"(while|conditional|call)([._]\d+)?$")


def _union_us(intervals: list[tuple[float, float]]) -> float:
  """The time covered by (start, end) intervals, overlaps counted once."""
  total, reached = 0.0, float("-inf")
  for start, end in sorted(intervals):
    if end > reached:
      total += end - max(start, reached)
      reached = end
  return total


def _leaves(events: list[dict]) -> list[dict]:
  """The events of one thread that hold no other of them (a timed event's children start
  within it and end within it); events without a start time count as leaves."""
  timed = sorted((e for e in events if "ts" in e),
                 key=lambda e: (float(e["ts"]), -float(e["dur"])))
  out = [e for e in events if "ts" not in e]
  for i, e in enumerate(timed):
    end = float(e["ts"]) + float(e["dur"])
    nxt = timed[i + 1] if i + 1 < len(timed) else None
    if nxt is None or not (float(nxt["ts"]) < end
                           and float(nxt["ts"]) + float(nxt["dur"]) <= end):
      out.append(e)
  return out


def _host_kernel(e: dict, thread: str, by_hlo_op: bool) -> bool:
  """Whether an event of a host-only trace is an XLA kernel: one XLA names by its HLO op
  (args.hlo_op) where the trace has such events, else (an older XLA) one that is no Python
  frame, no runtime event (the thunk executor, PjRt's execute helpers and their parts on the
  Python thread, thread-pool bookkeeping: 'Class::Method') and no op's 'end:' marker."""
  name = e["name"]
  if _CONTROL_FLOW.match(name):
    return False
  if by_hlo_op:
    return "hlo_op" in (e.get("args") or {})
  return not (name.startswith(("$", "end: ")) or "Thunk" in name or "PjitFunction" in name
              or "::" in name or thread == "python")


def device_times(trace_file: str, launches: collections.Counter | None = None,
                 busy: collections.Counter | None = None) -> tuple[dict, dict, str]:
  """From a Perfetto JSON trace: ({kernel: total µs} over the device's stream threads,
  {XLA op: total µs} over its 'XLA Ops' thread, which processes were counted). On a host-only
  trace the XLA ops the host's threads ran count as kernels, leaf events only (see
  _host_kernel, _leaves). `launches`, if given, gets each kernel's number of events; `busy`,
  each stream's or thread's busy µs (a host thread's: the union of its kernels' intervals)."""
  with gzip.open(trace_file, "rt") as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  procs = {e["pid"]: e["args"]["name"] for e in events
           if e.get("ph") == "M" and e.get("name") == "process_name" and "args" in e}
  threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name" and "args" in e}
  gpu = {pid for pid, n in procs.items() if "/device:GPU" in n or "/device:TPU" in n}
  pids = gpu or {pid for pid, n in procs.items() if "/host:CPU" in n}
  timed = [e for e in events if e.get("ph") == "X" and e.get("pid") in pids and "dur" in e]
  kernels, ops = collections.Counter(), collections.Counter()
  busy = collections.Counter() if busy is None else busy

  def count(e):
    kernels[e["name"]] += float(e["dur"])
    if launches is not None:
      launches[e["name"]] += 1

  if gpu:  # a stream runs its kernels one at a time: each event is a kernel
    for e in timed:
      thread = threads.get((e["pid"], e.get("tid")), "")
      if thread.startswith("Stream"):
        count(e)
        busy[f"{procs[e['pid']]}/{thread}"] += float(e["dur"])
      elif thread == "XLA Ops":
        ops[e["name"]] += float(e["dur"])
  else:
    by_hlo_op = any("hlo_op" in (e.get("args") or {}) for e in timed)
    by_thread = collections.defaultdict(list)
    for e in timed:
      thread = threads.get((e["pid"], e.get("tid")), "")
      if _host_kernel(e, thread, by_hlo_op):
        by_thread[(e["pid"], e.get("tid"), thread)].append(e)
    for (pid, tid, thread), mine in by_thread.items():
      leaves = _leaves(mine)
      for e in leaves:
        count(e)
      spans = [(float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in leaves if "ts" in e]
      busy[f"{procs[pid]}/{thread or tid}"] = _union_us(spans) + sum(
          float(e["dur"]) for e in leaves if "ts" not in e)
  return kernels, ops, ", ".join(sorted(procs[p] for p in pids))


def _kernel_name(hlo_name: str) -> str:
  """A kernel's name in a trace: its HLO instruction's name with '.' and '-' as '_'."""
  return re.sub(r"[.\-]", "_", hlo_name)


def kernel_ops(hlo_text: str) -> dict:
  """{kernel name: the JAX op path of its HLO instruction} from an optimised HLO dump (kernel
  names are instruction names with '.' and '-' as '_'; layer numbers folded to '*')."""
  out = {}
  for m in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = (?:\(.*?\)|\S+) [\w\-]+\((.*)$",
                       hlo_text, re.M):
    op = re.search(r'op_name="([^"]*)"', m.group(2))
    if op:
      path = re.sub(r"layers_\d+", "layers_*", op.group(1))
      out[_kernel_name(m.group(1))] = path.replace("jit(train_step)/", "")
  return out


def by_op(kernels: dict, hlo_dir: str) -> collections.Counter:
  """Kernel times summed by the JAX op each kernel came from (see kernel_ops)."""
  names = {}
  for f in glob.glob(os.path.join(hlo_dir, "*train_step*after_optimizations.txt")):
    with open(f) as fh:
      names.update(kernel_ops(fh.read()))
  ops = collections.Counter()
  for kernel, us in kernels.items():
    key = _kernel_name(kernel)
    if key in names:
      ops[names[key]] += us
    elif re.search(r"gemm|xmma|nvjet|cutlass|cublas", kernel):
      ops["gemm (library)"] += us
    elif kernel.startswith("ynn_fusion"):  # the CPU's XNNPACK fusions: dots and their epilogues
      ops["ynn_fusion (CPU library: dots)"] += us
    else:
      ops[f"(no op) {kernel}"] += us
  return ops


def check_out(p: argparse.ArgumentParser, out: str) -> None:
  """--out can hold the trace: a folder this process can write in, or a path that can be made
  one (its nearest existing parent a writable folder); else the parser's error, before anything
  is compiled (the profiler would fail only after the compile)."""
  path = os.path.abspath(out)
  if os.path.exists(path) and not os.path.isdir(path):
    p.error(f"--out {out}: is a file, not a folder (the trace is written into a folder)")
  parent = path
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    p.error(f"--out {out}: {parent} is a file, not a folder")
  try:  # try it: os.access says yes to root where the file system still refuses (/proc)
    os.rmdir(tempfile.mkdtemp(prefix=".kernel_profile_check_", dir=parent))
  except OSError as e:
    p.error(f"--out {out}: cannot write in {parent} ({e.strerror or e})")


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--preset", default="demo", choices=sorted(PRESETS))
  p.add_argument("--bf16", action="store_true")
  p.add_argument("--variant", action="append", default=[],
                 help="NAME:key=value,... as in step_speed.py (one: this profiles one setting)")
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--replicas", type=int, default=1,
                 help="a population of N (train.replicas; the variant's population=vmap|map "
                      "chooses its form)")
  p.add_argument("--top", type=int, default=30)
  p.add_argument("--out", default=None, help="keep the trace here (default: a temp dir)")
  p.add_argument("--by_op", action="store_true",
                 help="also sum kernel times by the JAX op they came from (dumps the HLO)")
  a = p.parse_args()
  if len(a.variant) > 1:
    p.error(f"--variant given {len(a.variant)} times ({', '.join(map(repr, a.variant))}): this "
            "profiles one setting; run it once per variant (bench/step_speed.py times several "
            "in turns)")
  ((name, kw),) = parse_variants(p, a.variant or ["flags:"], VARIANT_DEFAULTS)
  if a.replicas < 1:
    p.error(f"--replicas must be a positive integer, got {a.replicas}")
  if a.steps < 1 or a.top < 1:
    p.error(f"--steps and --top must be positive integers, got {a.steps} and {a.top}")
  if a.out is not None:
    check_out(p, a.out)
  # the default folder is named now and made once every check has passed (none left behind)
  out = a.out or os.path.join(tempfile.gettempdir(),
                              f"kernel_profile_{os.getpid()}_{os.urandom(4).hex()}")
  if a.by_op:  # before the backend starts (check_configs starts it): XLA reads its flags once
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={out}/hlo "
                               "--xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*train_step.*")
  check_configs(p, a.preset, a.bf16, [(name, kw)], [a.replicas])
  forms = [kw.pop(k) for k in COMPILE_FORMS]
  vocab, _, _, _, b, t = PRESETS[a.preset]
  use_threefry_kernel(kw["threefry_kernel"])
  config = make_config(a.preset, a.bf16, a.replicas, **kw)
  with single_replica(*forms) as form:
    # its checks (the population fits this host) come before the folder is made
    trainer = Trainer(config, model_config(config.model), steps_per_epoch=1000)
    pop_form = population_form(trainer.scorer.by_replica) if a.replicas > 1 else None
  os.makedirs(out, mode=0o700, exist_ok=a.out is not None)
  state = trainer.new_state()
  rng = np.random.default_rng(0)
  batch = trainer.put({k: rng.integers(3, vocab, (a.replicas, b, t)).astype(np.int32)
                       for k in ("inputs", "targets")})
  for _ in range(3):
    state, m = trainer.train_step(state, batch)
  jax.block_until_ready(m)
  started = time.time()  # a reused --out holds older traces: this run's is newer than this
  with jax.profiler.trace(out, create_perfetto_trace=True):
    t0 = time.perf_counter()
    for _ in range(a.steps):
      state, m = trainer.train_step(state, batch)
    jax.block_until_ready(m)
    wall = (time.perf_counter() - t0) / a.steps
  files = sorted((f for f in glob.glob(os.path.join(out, "**", "*perfetto_trace.json.gz"),
                                       recursive=True) if os.path.getmtime(f) >= started - 1),
                 key=os.path.getmtime, reverse=True)  # this run's trace, the newest
  if not files:
    raise SystemExit(f"no Perfetto trace was written under {out}")
  launches, threads = collections.Counter(), collections.Counter()
  kernels, ops, where = device_times(files[0], launches, threads)
  busy = sum(threads.values()) / a.steps
  tables = [("kernel", kernels), ("xla_op", ops)]
  if a.by_op:
    tables.append(("op", by_op(kernels, os.path.join(out, "hlo"))))
  for kind, totals in tables:
    for label, us in totals.most_common(a.top):
      print(json.dumps({kind: label[:160], "ms_per_step": round(us / a.steps / 1e3, 4),
                        "share": round(us / a.steps / busy, 4) if busy else None}), flush=True)
  # the value used, as step_speed.py's rows show it (unset: model.dropout's)
  kw["attention_dropout"] = trainer.model_cfg.attn_dropout
  print(json.dumps(dict(preset=a.preset, bf16=a.bf16, variant=name, **kw, replicas=a.replicas,
                        single_replica=form if a.replicas == 1 else None,
                        population_form=pop_form, counted=where, kernels=len(kernels),
                        launches_per_step=round(sum(launches.values()) / a.steps, 1),
                        device_busy_ms_per_step=round(busy / 1e3, 3), busy_threads=len(threads),
                        wall_ms_per_step=round(wall * 1e3, 3), trace=files[0])), flush=True)


if __name__ == "__main__":
  _cli.run_main(main)
