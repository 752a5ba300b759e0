"""Compile the train and eval steps for an NVIDIA GPU on a machine without one (XLA's deviceless
compilation), to see the GPU program and where its compile time goes, with no GPU at hand.

  pip install "jax[cuda12]"   # the CUDA plugin; no GPU or driver is needed for this tool
  python bench/gpu_aot.py --preset full --bf16
  python bench/gpu_aot.py --preset demo --replicas 1 8 --no_eval --dump /tmp/hlo
  python bench/gpu_aot.py --preset full --variant exact: --variant scan:scan_layers=1

Each (variant, replicas, step) is lowered and compiled in a process of its own for the target
GPU (default: an H100 SXM, `--target_config FILE` for another, a GpuTargetConfigProto in text
form) and printed as a JSON line: compile seconds, split into XLA's HLO passes and its
back end (LLVM and ptxas) with the slowest passes named, the HLO instructions before
optimisation, the kernels the optimised program launches (fusions and custom calls at its top
level and in its loops' bodies times their trip counts, GEMM fusions among them, cuDNN calls
by name), the loops left in it, and an estimate of the memory its kernels read and write per
step (program_traffic: comparable between variants of a step; `--top N` names the N kernels
that move the most, with the JAX op each came from). The project's
choices that depend on the platform (attention kernel, population form) are made as on a GPU.

What it cannot show: there is no device, so XLA autotunes nothing (each GEMM gets its default
configuration, where a GPU measures candidates: on an H100 that is much of a step's compile
time), nothing runs, so there are no step times, and Pallas kernels
(model.attention_impl=pallas) cannot be built (they ask the device for its properties).
Compile seconds are this machine's: XLA's back end compiles kernels on every core.
"""

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

# An H100 SXM (80 GB HBM3) as XLA describes it: what a GPU machine's
# xla_client.get_topology_for_devices(jax.devices()).target_config holds, less the versions
# of the software on it.
H100 = """
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 84929347584
  shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 minor: 0 }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
runtime_version { major: 12 minor: 8 }
dnn_version_info { major: 9 minor: 7 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""

RESULT = "GPU_AOT_RESULT "
# XLA's timers (VLOG 1 of these files): the whole of the HLO passes and of the back end, and
# each pass
XLA_LOGGING = {"TF_CPP_MIN_LOG_LEVEL": "0",
               "TF_CPP_VMODULE": "gpu_compiler=1,hlo_pass_pipeline=1"}
_UNIT = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def _seconds(value: str, unit: str) -> float:
  return float(value) * _UNIT[unit]


def xla_times(log: str) -> dict:
  """The compile phases of the step's module in XLA's timer lines: hlo_passes_s, backend_s and
  the slowest passes (seconds summed over every run of a pass, nested pipelines included)."""
  out = {}
  for key, phase in (("hlo_passes_s", "RunHloPasses"), ("backend_s", "RunBackend")):
    m = re.findall(rf"GpuCompiler::{phase} for (\S+) time: ([\d.]+) (us|ms|s) ", log)
    steps = [(name, _seconds(v, u)) for name, v, u in m if "step" in name] or \
        [(name, _seconds(v, u)) for name, v, u in m]
    if steps:
      out[key] = round(max(s for _, s in steps), 2)
  passes = collections.Counter()
  for name, value, unit in re.findall(r"HLO pass: (\S+) time: ([\d.]+) (us|ms|s) ", log):
    passes[name] += _seconds(value, unit)
  out["slowest_passes_s"] = {k: round(v, 2) for k, v in passes.most_common(5)}
  return out


_OP = re.compile(r"\s=\s(?:\(.*?\)|\S+)\s([a-z][\w-]*)\(")  # a tuple shape may hold "=" (/*index=5*/)


def _computations(text: str) -> dict:
  """An HLO module's text by computation: {name: its lines}; the entry's under 'ENTRY'."""
  out, name = {}, None
  for line in text.splitlines():
    head = re.match(r"(ENTRY )?%?([\w.-]+) .*\{\s*$", line)
    if name is None and head:
      name = "ENTRY" if head.group(1) else head.group(2)
      out[name] = []
    elif name is not None and line.strip() == "}":
      name = None
    elif name is not None:
      out[name].append(line)
  return out


def program_counts(text: str) -> dict:
  """What an optimised GPU program launches: `kernels`, the fusions (a kernel each, GEMM fusions
  among them) and custom calls (cuBLAS, cuDNN, ...) at its top level (ENTRY) and in the bodies
  of its loops, times their known trip counts (`kernels_per_step`); `while_loops` at the top."""
  comps = _computations(text)

  def count(name: str, depth: int = 0) -> tuple:
    lines = comps.get(name, [])
    ops = collections.Counter(m.group(1) for l in lines if (m := _OP.search(l)))
    calls = collections.Counter(t for l in lines
                                for t in re.findall(r'custom_call_target="([^"]+)"', l))
    gemms = sum(len(re.findall(r"calls=%gemm_fusion", l)) for l in lines)
    kernels = ops["fusion"] + ops["custom-call"]
    for l in lines:
      body = re.search(r"\swhile\(.*?body=%([\w.-]+)", l)
      if body and depth < 4:
        trips = re.search(r'known_trip_count":\{"n":"(\d+)"', l)
        k, c, g = count(body.group(1), depth + 1)
        n = int(trips.group(1)) if trips else 1
        kernels, gemms = kernels + n * k, gemms + n * g
        calls.update({t: n * v for t, v in c.items()})
    return kernels, calls, gemms

  ops = collections.Counter(m.group(1) for l in comps.get("ENTRY", []) if (m := _OP.search(l)))
  per_step, calls, gemms = count("ENTRY")
  return {"kernels": ops["fusion"] + ops["custom-call"], "kernels_per_step": per_step,
          "gemm_fusions_per_step": gemms, "custom_calls_per_step": dict(calls),
          "while_loops": ops["while"]}


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
                "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
_SHAPE = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(ROOT )?%([\w.-]+) = (\(.*?\)|\S+) ([a-z][\w-]*)\((.*?)\)(.*)$")


def shape_bytes(shape: str) -> int:
  """Bytes of an HLO shape ('f32[8,16]{1,0}', or a tuple of them)."""
  total = 0
  for dtype, dims in _SHAPE.findall(shape):
    n = 1
    for d in filter(None, dims.split(",")):
      n *= int(d)
    total += n * _DTYPE_BYTES[dtype]
  return total


def _instructions(lines: list) -> list:
  """(is_root, name, shape, opcode, operand names, rest of the line) of each instruction."""
  out = []
  for line in lines:
    m = _INSTRUCTION.match(line)
    if m:
      root, name, shape, op, args, rest = m.groups()
      operands = re.findall(r"%([\w.-]+)", args)
      out.append((bool(root), name, shape, op, operands, rest, line))
  return out


def _fusion_traffic(comps: dict, name: str, operand_bytes: list) -> int:
  """Bytes a fusion kernel reads and writes: each operand whole, but only the slices of those
  it only slices, nothing of a buffer it updates in place (dynamic-update-slice), and of its
  output only the updates where its root is such an update."""
  insts = _instructions(comps.get(name, []))
  by_name = {i[1]: i for i in insts}
  users = collections.defaultdict(list)
  for inst in insts:
    for operand in inst[4]:
      users[operand].append(inst)

  def written(inst) -> int:
    _, _, shape, op, operands, _, _ = inst
    if op == "dynamic-update-slice" and len(operands) > 1 and operands[1] in by_name:
      return shape_bytes(by_name[operands[1]][2])
    if op in ("tuple", "bitcast"):
      return sum(written(by_name[o]) for o in operands if o in by_name)
    return shape_bytes(shape)

  roots = [i for i in insts if i[0]]
  total = written(roots[0]) if roots else 0
  for inst in insts:
    if inst[3] != "parameter":
      continue
    index = int(re.search(r"parameter\((\d+)", inst[6]).group(1))
    sliced, whole = 0, False
    for u in users[inst[1]]:
      if u[3] in ("dynamic-slice", "slice") and u[4][0] == inst[1]:
        sliced += shape_bytes(u[2])
      elif not (u[3] == "dynamic-update-slice" and u[4][0] == inst[1]):  # not updated in place
        whole = True  # read whole (an index of a slice among them)
    if whole and index < len(operand_bytes):
      total += operand_bytes[index]
    else:
      total += sliced
  return total


def kernel_traffic(text: str) -> list:
  """Each kernel an optimised GPU program launches per step (fusion, custom call, copy; those
  in its loops' bodies times their trip counts) with the bytes it reads and writes: a dict of
  `bytes`, `kind` (the fusion's kind or the opcode), `shape` (its output) and `op` (the JAX op
  it came from: its metadata, or the op most of a fusion's instructions came from)."""
  comps = _computations(text)
  out = []

  def walk(name: str, times: int = 1, depth: int = 0) -> None:
    sizes = {}
    for _, iname, shape, op, operands, rest, line in _instructions(comps.get(name, [])):
      sizes[iname] = shape_bytes(shape)
      operand_bytes = [sizes.get(o, 0) for o in operands]
      called = re.search(r"calls=%([\w.-]+)", rest)
      op_name = re.search(r'op_name="([^"]*)"', line)
      if op == "fusion" and called:
        inner = collections.Counter(re.findall(r'op_name="([^"]*)"',
                                               "\n".join(comps.get(called.group(1), []))))
        kind = re.search(r"kind=(\w+)", rest)
        out.append({"bytes": times * _fusion_traffic(comps, called.group(1), operand_bytes),
                    "kind": kind.group(1) if kind else "fusion", "shape": shape,
                    "op": op_name.group(1) if op_name else
                          (inner.most_common(1)[0][0] if inner else "")})
      elif op in ("custom-call", "copy"):
        out.append({"bytes": times * (sizes[iname] + sum(operand_bytes)), "kind": op,
                    "shape": shape, "op": op_name.group(1) if op_name else ""})
      elif op == "while" and depth < 4:
        body = re.search(r"body=%([\w.-]+)", rest)
        trips = re.search(r'known_trip_count":\{"n":"(\d+)"', rest)
        if body:
          walk(body.group(1), times * (int(trips.group(1)) if trips else 1), depth + 1)

  walk("ENTRY")
  return out


def program_traffic(text: str) -> int:
  """An estimate of the bytes an optimised GPU program's kernels read and write per step: each
  kernel (fusion, custom call, copy) at its top level and in its loops' bodies, times their
  trip counts, as its operands' bytes plus its output's (_fusion_traffic for what a fusion only
  slices or updates in place). Caches and reuse between kernels are not modelled, so it is an
  upper bound of the memory traffic, comparable between variants of one step: the measure of
  a change to a step bound by memory, where no GPU is at hand to time it."""
  return sum(k["bytes"] for k in kernel_traffic(text))


def top_kernels(text: str, n: int) -> list:
  """The `n` kernels of kernel_traffic that move the most bytes, largest first, as short rows
  (MiB, kind, output shape, the JAX op without its jit/jvp/transpose/vmap wrappers)."""
  def short(op: str) -> str:
    return "/".join(p for p in op.split("/") if not re.match(
        r"(jit|jvp|transpose|vmap|pjit|remat|checkpoint)\(", p)) or op
  rows = sorted(kernel_traffic(text), key=lambda k: -k["bytes"])[:n]
  return [{"mib": round(k["bytes"] / 2**20, 1), "kind": k["kind"],
           "shape": re.sub(r"\{[\d,]*\}|/\*index=\d+\*/", "", k["shape"]), "op": short(k["op"])}
          for k in rows]


def hlo_instructions(text: str) -> int:
  """Instructions (parameters aside) of an HLO module's text, every computation included."""
  return sum(1 for line in text.splitlines()
             if re.match(r"\s*(ROOT )?%?[\w.-]+ = ", line) and " parameter(" not in line)


def child(spec: dict) -> None:
  """Compile one step for the target GPU in this process and print its RESULT line."""
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update("jax_platforms", "cpu")
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  try:
    topology = topologies.get_topology_desc(platform="cuda", target_config=spec["target"],
                                            topology="1x1x1")
  except Exception as e:  # pylint: disable=broad-except
    why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if spec.get("custom_target") and "parse" in str(e).lower():
      raise SystemExit(f"gpu_aot: XLA cannot read the --target_config file ({why}); give a "
                       "GpuTargetConfigProto in text form, or leave the flag out for an "
                       "H100.") from None
    raise SystemExit(f"gpu_aot: no compile-only CUDA backend ({why}). It needs JAX's CUDA "
                     "plugin: pip install \"jax[cuda12]\" (no GPU needed).") from None
  devices = list(topology.devices)
  # the project asks JAX for the platform and its devices to choose kernels and forms: here
  # they are the target GPU's
  jax.devices = lambda backend=None: devices  # type: ignore[assignment]
  jax.local_devices = lambda *a, **k: devices  # type: ignore[assignment]
  jax.default_backend = lambda: "gpu"  # type: ignore[assignment]
  import numpy as np  # pylint: disable=import-outside-toplevel
  from infinito_jax.model import model_config  # pylint: disable=import-outside-toplevel
  from infinito_jax.train import Trainer  # pylint: disable=import-outside-toplevel
  from step_speed import (COMPILE_FORMS, PRESETS, make_config,  # pylint: disable=import-outside-toplevel
                          single_replica, threefry_kernel_lowering)

  kw = dict(spec["variant"])
  forms = [kw.pop(k, "auto") for k in COMPILE_FORMS]
  config = make_config(spec["preset"], spec["bf16"], spec["replicas"], **kw)
  with single_replica(*forms):
    trainer = Trainer(config, model_config(config.model), steps_per_epoch=1000)
  _, _, _, _, b, t = PRESETS[spec["preset"]]
  state = trainer.abstract_state()
  if spec["step"] == "train":
    batch = jax.ShapeDtypeStruct((spec["replicas"], b, t), np.int32,
                                 sharding=trainer.batch_sharding)
    args = (state, {"inputs": batch, "targets": batch})
    fn = trainer.train_step
  else:
    batch = jax.ShapeDtypeStruct((trainer.eval_batch_size, t), np.int32,
                                 sharding=trainer.scorer.batch_sharding)
    args = (state.params, state.memory, {"inputs": batch, "targets": batch})
    fn = trainer.eval_step
  t0 = time.perf_counter()
  with threefry_kernel_lowering(bool(kw.get("threefry_kernel", False))):
    lowered = fn.lower(*args)
  lower_s = time.perf_counter() - t0
  before = hlo_instructions(lowered.as_text(dialect="hlo"))
  t0 = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  text = compiled.as_text()
  if spec["dump"]:
    os.makedirs(spec["dump"], exist_ok=True)
    name = f"{spec['name']}_r{spec['replicas']}_{spec['step']}.hlo"
    with open(os.path.join(spec["dump"], name), "w", encoding="utf-8") as f:
      f.write(text)
  row = dict(device=devices[0].device_kind, lower_s=round(lower_s, 2),
             compile_s=round(compile_s, 2), hlo_before=before, **program_counts(text),
             traffic_mib_per_step=round(program_traffic(text) / 2**20, 1))
  if spec.get("top"):
    row["top_kernels"] = top_kernels(text, spec["top"])
  print(RESULT + json.dumps(row), flush=True)


def run_one(spec: dict, timeout: int) -> dict:
  """child(spec) in a new process (nothing cached from an earlier compile), its XLA timers
  read from its log."""
  env = dict(os.environ, **XLA_LOGGING, JAX_COMPILATION_CACHE_DIR="",
             PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]).rstrip(
                 os.pathsep))
  try:
    p = subprocess.run([sys.executable, os.path.abspath(__file__), "--_child", json.dumps(spec)],
                       capture_output=True, text=True, env=env, timeout=timeout, check=False)
  except subprocess.TimeoutExpired:
    return {"error": f"building and compiling the step took over {timeout} s (--timeout)"}
  line = next((l for l in p.stdout.splitlines() if l.startswith(RESULT)), None)
  if line is None:
    tail = [l for l in p.stderr.splitlines()
            if l.strip() and not re.match(r"[IWE]\d{4} ", l)][-6:]
    return {"error": f"exit {p.returncode}: " + " | ".join(tail)[-1500:]}
  return dict(json.loads(line[len(RESULT):]), **xla_times(p.stderr))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=__doc__.split("\n\n", 1)[1])
  p.add_argument("--_child", help=argparse.SUPPRESS)
  p.add_argument("--preset", default="full")
  p.add_argument("--bf16", action="store_true", help="compute in bfloat16")
  p.add_argument("--replicas", type=int, nargs="+", default=[1],
                 help="population sizes to compile (train.replicas), one after another")
  p.add_argument("--variant", action="append", default=[],
                 help="NAME:key=value,... as in bench/step_speed.py (attention_dropout, "
                      "rng_impl, scan_layers, remat, remat_policy, loss_chunk, attention_impl, "
                      "dropout_bits, single, population, optimizer, loss_grad, threefry_kernel); "
                      "repeat for several")
  p.add_argument("--no_eval", action="store_true", help="compile the train step only")
  p.add_argument("--target_config", default=None, metavar="FILE",
                 help="the target GPU as a GpuTargetConfigProto in text form (default: an "
                      "H100 SXM)")
  p.add_argument("--dump", default="", metavar="DIR",
                 help="write each optimised program's HLO text into DIR")
  p.add_argument("--timeout", type=int, default=600, help="seconds per compile (default 600)")
  p.add_argument("--top", type=int, default=0, metavar="N",
                 help="add each row's N kernels that move the most memory (top_kernels: MiB, "
                      "kind, output shape, the JAX op they came from)")
  a = p.parse_args(argv)
  if a._child:
    child(json.loads(a._child))
    return 0
  from step_speed import (COMPILE_FORMS, PRESETS,  # pylint: disable=import-outside-toplevel
                          check_environment, in_bench_terms, make_config, parse_variants)
  if a.preset not in PRESETS:
    p.error(f"--preset {a.preset!r}: choose one of {sorted(PRESETS)}")
  if any(n < 1 for n in a.replicas):
    p.error(f"--replicas must be positive integers, got {a.replicas}")
  if a.timeout < 1:
    p.error(f"--timeout must be a positive number of seconds, got {a.timeout}")
  if a.top < 0:
    p.error(f"--top must be 0 (none) or a positive number of kernels, got {a.top}")
  target = H100
  if a.target_config:
    try:
      with open(a.target_config, encoding="utf-8") as f:
        target = f.read()
    except (OSError, UnicodeDecodeError) as e:
      p.error(f"--target_config {a.target_config}: cannot read it ({e})")
    # XLA takes a description without these and then divides by zero (SIGFPE) while compiling
    missing = [f for f, pattern in (("gpu_device_info", r"\bgpu_device_info\s*\{"),
                                     ("a core_count above 0", r"\bcore_count:\s*[1-9]"),
                                     ("cuda_compute_capability",
                                      r"\bcuda_compute_capability\s*\{"))
               if not re.search(pattern, target)]
    if missing:
      p.error(f"--target_config {a.target_config} lacks {', '.join(missing)}: give the whole "
              "GpuTargetConfigProto of the GPU (this script's H100, with its numbers changed)")
  check_environment(p)
  variants = parse_variants(p, a.variant, {}) or [("default", {})]
  from infinito_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  from infinito_jax.errors import ConfigError  # pylint: disable=import-outside-toplevel
  for name, kw in variants:  # as train.py checks a config; the platform's checks: in the child
    for n in a.replicas:
      try:
        config_lib.validate(make_config(a.preset, a.bf16, n, **{
            k: v for k, v in kw.items() if k not in COMPILE_FORMS}))
      except ConfigError as e:
        p.error(f"--variant {name} on preset {a.preset}: {in_bench_terms(str(e))}")
  steps = ["train"] if a.no_eval else ["train", "eval"]
  failed = False
  for name, variant in variants:
    for n in a.replicas:
      for step in steps:
        spec = dict(name=name, variant=variant, preset=a.preset, bf16=a.bf16, replicas=n,
                    step=step, target=target, dump=a.dump, top=a.top,
                    custom_target=a.target_config is not None)
        row = dict(variant=name, settings=variant, preset=a.preset, bf16=a.bf16, replicas=n,
                   step=step, **run_one(spec, a.timeout))
        failed |= "error" in row
        print(json.dumps(row), flush=True)
        if "no compile-only CUDA backend" in row.get("error", "") or \
            "cannot read the --target_config" in row.get("error", ""):
          return 1  # the same for every other row
  return 1 if failed else 0


if __name__ == "__main__":
  import _cli  # pylint: disable=g-import-not-at-top
  sys.exit(_cli.run_main(main))
