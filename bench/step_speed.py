"""Step speed of infinito_jax against the PyTorch peer, in one command: the whole story.

  python bench/step_speed.py --preset demo                                   # ours: train + eval
  python bench/step_speed.py --preset full --bf16 --peer ../shared/bench/torch_peer.py
  python bench/step_speed.py --preset demo --attention_dropout 0             # the fused path
  python bench/step_speed.py --preset demo --rng_impl rbg                    # cheaper random bits
  python bench/step_speed.py --preset full --threefry_kernel                 # threefry, CUDA kernel
  python bench/step_speed.py --preset full --scan_layers [--remat]           # nn.scan over layers
  python bench/step_speed.py --preset full --scan_layers --remat --remat_policy dots  # keep dots
  python bench/step_speed.py --preset full --bf16 --peer ../shared/bench/torch_peer.py \
      --variant exact: --variant fast:attention_dropout=0,rng_impl=rbg,scan_layers=1
  python bench/step_speed.py --preset demo --steps 10 --alternate 3 \
      --peer ../shared/bench/torch_peer.py --variant exact: --variant b16:dropout_bits=16

Prints JSON lines. For our jitted train step (train mode: dropout, exploration noise, memory
read and write, clip + AdamW; the one train.py runs) and eval step (loss sums and the metrics
validation reports): compile seconds (lower + compile, and the first call), median ms/step of
--steps, tokens/s, peak device memory (where the backend reports it), FLOPs per step (the
model's: XLA's cost analysis of the step lowered with no loops, the same for a scanned, chunked
or mapped form of one model, and about 3% below XLA's count of the optimised loop-free program;
`compiled_flops` is XLA's count of the program itself, whose loops count once), MFU
against the device's peak (where known), XLA's temporary memory (`temp_mib`) and the MiB its
optimised program copies whole at the top level (`copy_mib`). With --peer, the PyTorch peer
runs in subprocesses of the same command on the same machine in each of its modes (eager
fp32, TF32, bf16, bf16 + torch.compile on a GPU; eager fp32 and bf16 on a CPU), followed by
the ratios ours / peer. With --interleave, every variant is built first and the steps are
timed in turns (one call of each per round): a slow spell of a shared machine then falls on
all of them alike. With --peer_in_process (CPU) the peer's step joins the turns, built in
this process; that slows our step (the two thread pools compete), so the default keeps the
peer in subprocesses. With --alternate K (the fair comparison on a shared CPU), K rounds each
time our variants in turns and then run the peer in a subprocess: the two never share the
cores, and a slow spell of the machine falls on both; rows give the medians over the rounds
and each round's figure.
"""

import argparse
import contextlib
import copy
import importlib.util
import json
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

if __name__ == "__main__":  # the host allocator as train.py sets it, before JAX starts threads
  from infinito_jax import hostmem as _hostmem  # noqa: E402  pylint: disable=g-import-not-at-top
  _hostmem.at_startup()

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import default  # noqa: E402
from infinito_jax import hostmem  # noqa: E402
from infinito_jax.layers import DROPOUT_BITS  # noqa: E402
from infinito_jax.model import ATTENTION_IMPLS, REMAT_POLICIES, model_config  # noqa: E402
from infinito_jax.optim import OPTIMIZER_FORMS  # noqa: E402
from infinito_jax.train import (LOSS_GRADIENT_CHOICES, POPULATION_FORMS,  # noqa: E402
                                SINGLE_REPLICA_FORMS, Trainer, loss_gradient_form,
                                optimizer_form, population_form, single_replica_form,
                                use_threefry_kernel)

PEER_PRESETS = ("tiny", "demo", "full")  # ../shared/bench/torch_peer.py's
PRESETS = {  # vocab, hidden, layers, heads, batch, seq_len (the peer's; 'large' is ours only)
    "tiny": (1000, 64, 2, 4, 8, 64),
    "demo": (5000, 256, 3, 4, 16, 128),
    "full": (10000, 512, 6, 8, 32, 256),
    "large": (10000, 1024, 12, 16, 32, 256),
}
# dense peak FLOP/s by device kind: (bfloat16, float32 at default precision)
PEAKS = {"H100": (989e12, 494e12), "H200": (989e12, 494e12), "A100": (312e12, 156e12)}


def make_config(preset: str, bf16: bool, replicas: int = 1, attention_dropout=None,
                rng_impl: str = "threefry", scan_layers: bool = False, remat: bool = False,
                loss_chunk: int = 0, attention_impl: str = "auto", dropout_bits: int = 32,
                threefry_kernel: bool = False, remat_policy: str = "nothing",
                on_divergence: str = "freeze"):
  vocab, d, layers, heads, b, t = PRESETS[preset]
  config = default.get_config()
  m = config.model
  m.vocab_size, m.hidden_dim, m.num_layers, m.num_heads = vocab, d, layers, heads
  m.dtype = "bfloat16" if bf16 else "float32"
  m.attention_dropout = attention_dropout
  m.scan_layers, m.remat, m.remat_policy = scan_layers, remat, remat_policy
  m.attention_impl = attention_impl
  m.dropout_bits = dropout_bits
  config.train.loss_chunk = loss_chunk
  config.train.batch_size, config.data.seq_len = b, t
  config.train.replicas = replicas
  config.train.rng_impl = rng_impl
  config.train.threefry_kernel = threefry_kernel
  config.train.on_divergence = on_divergence
  return config


@contextlib.contextmanager
def threefry_kernel_lowering(on: bool):
  """train.threefry_kernel for what is built and run inside (JAX's switch is process-wide and
  part of every jit key: a variant's step is called under its own value, never recompiled)."""
  old = jax.config.jax_threefry_gpu_kernel_lowering
  use_threefry_kernel(on)
  try:
    yield
  finally:
    jax.config.update("jax_threefry_gpu_kernel_lowering", old)


@contextlib.contextmanager
def _env(name: str, value: str):
  old = os.environ.get(name)
  os.environ[name] = value
  try:
    yield
  finally:
    if old is None:
      del os.environ[name]
    else:
      os.environ[name] = old


@contextlib.contextmanager
def single_replica(form: str, population: str = "auto", optimizer: str = "auto",
                   loss_grad: str = "auto"):
  """Builds a Trainer under INFINITO_SINGLE_REPLICA=form ('auto', 'vmap' or 'plain': how a
  one-replica step is compiled, infinito_jax.train.single_replica_form),
  INFINITO_POPULATION=population ('auto', 'vmap' or 'map': how a population's is,
  population_form), INFINITO_OPTIMIZER_FORM=optimizer ('auto', 'leaves', 'norm' or
  'vectors': how its update is applied, optimizer_form) and INFINITO_LOSS_GRADIENT=loss_grad
  ('auto', 'fused' or 'autodiff': how its loss is differentiated, loss_gradient_form).
  Yields the single-replica form."""
  with contextlib.ExitStack() as stack:
    for name, value in (("INFINITO_SINGLE_REPLICA", form), ("INFINITO_POPULATION", population),
                        ("INFINITO_OPTIMIZER_FORM", optimizer),
                        ("INFINITO_LOSS_GRADIENT", loss_grad)):
      if value != "auto":  # 'auto' leaves the process's own (the environment's, or the platform's)
        stack.enter_context(_env(name, value))
    yield single_replica_form()


def peak_flops(bf16: bool):
  kind = jax.devices()[0].device_kind
  for name, peaks in PEAKS.items():
    if name in kind:
      return peaks[0 if bf16 else 1]
  return None


def median(times) -> float:
  """The median as the peer takes it: the upper middle value of an even count (np.median's
  mean of the two middle values would lean the ratios our way at an even --steps)."""
  return float(sorted(times)[len(times) // 2])


def median_time(fn, steps):
  """Median seconds of `steps` calls of fn (each waited for); call it once first to warm up."""
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return median(times)


def _peak_memory():
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else round(peak / 2**20, 1)


_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f16": 2, "bf16": 2, "s16": 2, "u16": 2, "f32": 4,
          "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}


def copy_mib(hlo_text: str) -> float:
  """MiB written by the `copy` instructions at the top level (the ENTRY computation) of an
  optimised HLO program: whole-buffer copies XLA inserts, e.g. of a zero broadcast that several
  loops start from (inside fusions a copy is a transpose, not counted)."""
  entry = hlo_text[hlo_text.find("\nENTRY"):] if "\nENTRY" in hlo_text else ""
  entry = entry.split("\n}\n", 1)[0]
  total = 0
  for dtype, dims in re.findall(r"= (\w+)\[([\d,]*)\]\S* copy\(", entry):
    total += _BYTES.get(dtype, 4) * int(np.prod([int(d) for d in dims.split(",") if d]))
  return round(total / 2**20, 1)


def _copy_mib(compiled):
  try:
    return copy_mib(compiled.as_text())
  except Exception:  # pylint: disable=broad-except  # a backend without the text
    return None


def _temp_mib(compiled):
  """The compiled step's temporary buffers (XLA's memory analysis; any backend)."""
  try:
    return round(compiled.memory_analysis().temp_size_in_bytes / 2**20, 1)
  except Exception:  # pylint: disable=broad-except
    return None


def model_flops(config, batch: dict, eval_batch: dict | None = None) -> list:
  """FLOPs per call of the train step (and of the eval step, given its batch) of `config`'s
  model, from XLA's cost analysis of the step lowered with nothing in a loop: layers unrolled,
  the whole loss at once, replicas vmapped, no rematerialisation. XLA counts a while loop's body
  once, so a scanned (model.scan_layers), chunked (train.loss_chunk) or mapped (the 'map'
  population form) program's own figure misses its trip count; this one is the same for every
  form of one model, as MFU wants; attention is counted as XLA's matrix products, whatever
  kernel runs it. Lowering only: nothing is compiled."""
  config = copy.deepcopy(config)
  config.model.scan_layers, config.model.remat, config.train.loss_chunk = False, False, 0
  config.model.remat_policy = "nothing"
  # attention as XLA's own matrix products: a cuDNN or Pallas kernel is a custom call, whose
  # FLOPs the cost analysis does not count (about 6% of the full preset's step)
  config.model.attention_impl = "xla"
  with single_replica("auto", "vmap"):
    ref = Trainer(config, model_config(config.model), steps_per_epoch=1000)
  state = ref.abstract_state()
  shaped = lambda b: {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in b.items()}  # noqa: E731
  out = [_cost(ref.train_step.lower(state, shaped(batch)))]
  if eval_batch is not None:
    out.append(_cost(ref.scorer.step.lower(state.params, state.memory, shaped(eval_batch))))
  return out


def _cost(staged):
  """The 'flops' of a lowered or compiled program's cost analysis (None where not reported)."""
  try:
    cost = staged.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0)) or None
  except Exception:  # pylint: disable=broad-except  # some backends report nothing
    return None


def prepare_ours(preset: str, bf16: bool, replicas: int = 1, attention_dropout=None,
                 with_eval: bool = False, rng_impl: str = "threefry", scan_layers: bool = False,
                 remat: bool = False, loss_chunk: int = 0, attention_impl: str = "auto",
                 single: str = "auto", dropout_bits: int = 32, population: str = "auto",
                 threefry_kernel: bool = False, remat_policy: str = "nothing",
                 optimizer: str = "auto", loss_grad: str = "auto",
                 on_divergence: str = "freeze") -> dict:
  """Builds and compiles the Trainer's jitted train step (and with `with_eval` its eval step)
  on the preset's shapes, for a population of `replicas` (each its own batch). Returns
  {'train': fn, 'eval': fn or None, 'rows': rows(train_s, eval_s)}: one timed call each, and
  the JSON rows for given seconds per call. `single` and `population`: how the step is compiled
  for one replica and for several (single_replica); `threefry_kernel`: built, and every call
  made, under that train.threefry_kernel."""
  with threefry_kernel_lowering(threefry_kernel):
    ours = _prepare(preset, bf16, replicas, attention_dropout, with_eval, rng_impl, scan_layers,
                    remat, loss_chunk, attention_impl, single, dropout_bits, population,
                    threefry_kernel, remat_policy, optimizer, loss_grad, on_divergence)

  def under(fn):
    def call():
      with threefry_kernel_lowering(threefry_kernel):
        return fn()
    return call

  return dict(ours, train=under(ours["train"]), eval=ours["eval"] and under(ours["eval"]))


def _prepare(preset, bf16, replicas, attention_dropout, with_eval, rng_impl, scan_layers, remat,
             loss_chunk, attention_impl, single, dropout_bits, population, threefry_kernel,
             remat_policy="nothing", optimizer="auto", loss_grad="auto", on_divergence="freeze"):
  vocab, d, layers, heads, b, t = PRESETS[preset]
  config = make_config(preset, bf16, replicas, attention_dropout, rng_impl, scan_layers, remat,
                       loss_chunk, attention_impl, dropout_bits, threefry_kernel, remat_policy,
                       on_divergence)
  with single_replica(single, population, optimizer, loss_grad) as form:
    trainer = Trainer(config, model_config(config.model), steps_per_epoch=1000)
    pop_form = population_form(trainer.scorer.by_replica)
    opt_form = optimizer_form(trainer.scorer.fsdp)
    grad_form = loss_gradient_form()
  state = trainer.new_state()
  rng = np.random.default_rng(0)
  batch = trainer.put({k: rng.integers(3, vocab, (replicas, b, t)).astype(np.int32)
                       for k in ("inputs", "targets")})
  common = dict(impl="infinito_jax", preset=preset, platform=jax.devices()[0].platform,
                host_malloc=hostmem.status(),
                device=str(jax.devices()[0].device_kind), devices=trainer.mesh.size, bf16=bf16,
                replicas=replicas, rng_impl=rng_impl, scan_layers=scan_layers, remat=remat,
                remat_policy=remat_policy,
                loss_chunk=loss_chunk, attention_impl=attention_impl, dropout_bits=dropout_bits,
                threefry_kernel=threefry_kernel, single_replica=form if replicas == 1 else None,
                population_form=pop_form if replicas > 1 else None, optimizer_form=opt_form,
                loss_grad=grad_form, on_divergence=on_divergence if replicas > 1 else None,
                attention_dropout=model_config(config.model).attn_dropout)
  peak = peak_flops(bf16)

  def row(step, compiled, compile_s, first_s, med, flops):
    out = dict(common, step=step, compile_s=round(compile_s, 2), first_call_s=round(first_s, 2),
               ms_per_step=round(med * 1e3, 3), tokens_per_s=round(replicas * b * t / med, 1),
               peak_memory_mib=_peak_memory(), temp_mib=_temp_mib(compiled),
               copy_mib=_copy_mib(compiled),
               flops_per_step=flops, compiled_flops=_cost(compiled))
    out["mfu"] = round(flops / med / peak, 4) if flops and peak else None
    return out

  t0 = time.perf_counter()
  compiled = trainer.train_step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  state, m = trainer.train_step(state, batch)
  jax.block_until_ready(m)
  first = time.perf_counter() - t0
  holder = {"state": state}
  made = [("train", compiled, compile_s, first)]

  def train_once():
    holder["state"], metrics = trainer.train_step(holder["state"], batch)
    return metrics

  eval_once = None
  if with_eval:
    scorer = trainer.scorer
    eval_batch = jax.device_put({k: v[0] for k, v in batch.items()}, scorer.batch_sharding)
    # copies: the train step donates its state, and it runs again after this
    params, memory = jax.tree_util.tree_map(lambda x: x.copy(),
                                            (holder["state"].params, holder["state"].memory))
    t0 = time.perf_counter()
    compiled = scorer.step.lower(params, memory, eval_batch).compile()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    jax.block_until_ready(scorer.step(params, memory, eval_batch))
    made.append(("eval", compiled, compile_s, time.perf_counter() - t0))
    eval_once = lambda: scorer.step(params, memory, eval_batch)  # noqa: E731

  flops = model_flops(config, batch, eval_batch if with_eval else None)

  def rows(*seconds):
    return [row(step, compiled, c, f, med, fl)
            for (step, compiled, c, f), med, fl in zip(made, seconds, flops)]

  return {"train": train_once, "eval": eval_once, "rows": rows}


def time_ours(preset: str, steps: int, bf16: bool, replicas: int = 1, with_eval: bool = False,
              **kw) -> dict | list[dict]:
  """prepare_ours, then the median of `steps` timed calls of each step. Returns the train
  row, or [train row, eval row]."""
  ours = prepare_ours(preset, bf16, replicas, with_eval=with_eval, **kw)
  med = [median_time(ours["train"], steps)]
  if with_eval:
    med.append(median_time(ours["eval"], steps))
  rows = ours["rows"](*med)
  return rows if with_eval else rows[0]


def interleaved_times(fns: list, steps: int) -> list[float]:
  """Median seconds of each fn over `steps` rounds in which every fn is called once, in turn
  (after one warm-up call each): a slow spell of the machine falls on all of them alike,
  which timing one after the other does not give."""
  times = [[] for _ in fns]
  for fn in fns:
    jax.block_until_ready(fn())
  for _ in range(steps):
    for fn, ts in zip(fns, times):
      t0 = time.perf_counter()
      jax.block_until_ready(fn())
      ts.append(time.perf_counter() - t0)
  return [median(ts) for ts in times]


def peer_in_process(path: str, preset: str, flags: list) -> tuple:
  """The peer's training step built in this process as its main() builds it (CPU modes only:
  eager float32, or bfloat16 autocast with --bf16), for timing in turns with ours. Returns
  (one step, its JSON row for given seconds per step)."""
  import torch  # pylint: disable=import-outside-toplevel
  import torch.nn.functional as F  # pylint: disable=import-outside-toplevel
  spec = importlib.util.spec_from_file_location("torch_peer", path)
  peer = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(peer)
  vocab, d, layers, heads, b, t = peer.PRESETS[preset]
  torch.manual_seed(0)
  model = peer.PeerV52(vocab, d, layers, heads).train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
  x = torch.randint(3, vocab, (b, t))
  y = torch.randint(3, vocab, (b, t))
  bf16 = "--bf16" in flags

  def step():
    opt.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
      loss = F.cross_entropy(model(x).float().reshape(-1, vocab), y.reshape(-1), ignore_index=0)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()

  def row(seconds):
    return dict(peer="pytorch-v52", preset=preset, device="cpu", bf16=bf16, compile=False,
                tf32=False, torch=torch.__version__, threads=torch.get_num_threads(),
                step_s_median=round(seconds, 5), tokens_per_s=round(b * t / seconds, 1),
                timing="interleaved")

  return step, row


def peer_modes(platform: str, bf16: bool):
  if platform == "gpu":
    return ([("bf16", ["--bf16"]), ("bf16+compile", ["--bf16", "--compile"])] if bf16 else
            [("eager fp32", []), ("tf32", ["--tf32"]), ("tf32+compile", ["--tf32", "--compile"])])
  return [("bf16", ["--bf16"])] if bf16 else [("eager fp32", [])]


# variant keys that choose how a step is compiled (environment switches), not config fields
COMPILE_FORMS = ("single", "population", "optimizer", "loss_grad")
VARIANT_KEYS = {"attention_dropout": float, "rng_impl": str, "scan_layers": int, "remat": int,
                "loss_chunk": int, "attention_impl": str, "single": str, "dropout_bits": int,
                "population": str, "threefry_kernel": int, "remat_policy": str,
                "optimizer": str, "loss_grad": str, "on_divergence": str}
# the settings of a variant that names none (the model's and the run's defaults)
VARIANT_DEFAULTS = {"attention_dropout": None, "rng_impl": "threefry", "scan_layers": False,
                    "remat": False, "loss_chunk": 0, "attention_impl": "auto", "single": "auto",
                    "dropout_bits": 32, "population": "auto", "threefry_kernel": False,
                    "remat_policy": "nothing", "optimizer": "auto", "loss_grad": "auto",
                    "on_divergence": "freeze"}
VARIANT_CHOICES = {"rng_impl": ("threefry", "rbg", "unsafe_rbg"), "attention_impl": ATTENTION_IMPLS,
                   "single": SINGLE_REPLICA_FORMS, "dropout_bits": DROPOUT_BITS,
                   "population": POPULATION_FORMS, "scan_layers": (0, 1), "remat": (0, 1),
                   "threefry_kernel": (0, 1), "remat_policy": tuple(REMAT_POLICIES),
                   "optimizer": OPTIMIZER_FORMS, "loss_grad": LOSS_GRADIENT_CHOICES,
                   "on_divergence": ("freeze", "stop")}


def in_bench_terms(message: str) -> str:
  """A config error's fix in this benchmark's terms: '--config.model.remat=true' (train.py's
  flag) becomes 'remat=1 in the --variant (or the flag --remat)'; fields that are no variant
  key stay as they are."""
  def sub(m):
    key, value = m.group(1), m.group(2)
    if key not in VARIANT_KEYS:
      return m.group(0)
    value = {"true": "1", "false": "0"}.get(value.lower(), value)
    return f"{key}={value} in the --variant (or the flag --{key})"
  return re.sub(r"--config\.(?:model|train)\.(\w+)=([^\s,;)]+)", sub, message)


def check_environment(p: argparse.ArgumentParser) -> None:
  """INFINITO_SINGLE_REPLICA, INFINITO_POPULATION, INFINITO_OPTIMIZER_FORM and
  INFINITO_LOSS_GRADIENT, which a variant's 'auto' leaves standing, checked before anything is built (a bad value: the parser's error)."""
  from infinito_jax.errors import ConfigError  # pylint: disable=import-outside-toplevel
  try:
    single_replica_form(), population_form(), optimizer_form(), loss_gradient_form()
  except ConfigError as e:
    p.error(str(e))


def check_configs(p: argparse.ArgumentParser, preset: str, bf16: bool,
                  variants: list[tuple[str, dict]], replicas=(1,), flags_only=False) -> None:
  """Each variant's run config checked as train.py checks its config (e.g. a loss_chunk that
  does not divide the preset's sequence length), refused by the parser before anything is
  built. flags_only: no --variant was given (the one variant is the command's flags)."""
  check_environment(p)
  from infinito_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  from infinito_jax.errors import ConfigError  # pylint: disable=import-outside-toplevel
  from infinito_jax.train import check_platform  # pylint: disable=import-outside-toplevel
  skip = COMPILE_FORMS  # how a step is compiled, not config fields
  for name, kw in variants:
    for n in replicas:
      try:
        config = make_config(preset, bf16, n, **{k: v for k, v in kw.items() if k not in skip})
        config_lib.validate(config)
        check_platform(config)
      except ConfigError as e:
        where = "the command's flags" if flags_only else f"--variant {name}"
        p.error(f"{where} on preset {preset}: {in_bench_terms(str(e))}")


class VariantError(ValueError):
  """A --variant that cannot work; the scripts turn it into their parser's error (exit 2)."""


def parse_variants(p: argparse.ArgumentParser, specs: list[str], base: dict
                   ) -> list[tuple[str, dict]]:
  """parse_variant of each spec; a bad one is the parser's error (one line, exit 2)."""
  try:
    out = [parse_variant(spec, base) for spec in specs]
  except VariantError as e:
    p.error(str(e))
  names = [name for name, _ in out]
  if twice := sorted({n for n in names if names.count(n) > 1}):
    p.error(f"--variant names {twice} more than once: give each variant its own name (the "
            "rows and ratios are labelled by it)")
  return out


def parse_variant(spec: str, base: dict) -> tuple[str, dict]:
  """'NAME:key=value,...' (keys of VARIANT_KEYS) on top of the command's own flags ('NAME:'
  alone: the flags as they are); a key or value that cannot work raises VariantError here,
  before anything is built."""
  name, colon, rest = spec.partition(":")
  if not colon or not name.strip():
    raise VariantError(f"--variant {spec!r}: write NAME:KEY=VALUE,... (NAME: alone for the "
                       "command's own settings), e.g. --variant exact: --variant "
                       "fused:attention_dropout=0")
  out = dict(base)
  seen = set()
  for item in filter(None, rest.split(",")):
    key, eq, value = item.partition("=")
    if key in seen:
      raise VariantError(f"--variant {spec!r} sets {key} twice; set it once")
    seen.add(key)
    if key not in VARIANT_KEYS or not eq:
      raise VariantError(f"--variant {spec!r}: {item!r} is not KEY=VALUE with KEY one of "
                       f"{sorted(VARIANT_KEYS)}")
    try:
      out[key] = VARIANT_KEYS[key](value)
    except ValueError:
      kind = {int: "an integer", float: "a number"}[VARIANT_KEYS[key]]
      raise VariantError(f"--variant {spec!r}: {key}={value!r} is not {kind}") from None
    if key in VARIANT_CHOICES and out[key] not in VARIANT_CHOICES[key]:
      raise VariantError(f"--variant {spec!r}: {key} must be one of {VARIANT_CHOICES[key]}, "
                       f"got {value!r}")
    if key == "attention_dropout" and not 0.0 <= out[key] < 1.0:
      raise VariantError(f"--variant {spec!r}: attention_dropout must lie in [0, 1)")
    if key == "loss_chunk" and out[key] < 0:
      raise VariantError(f"--variant {spec!r}: loss_chunk must be >= 0")
  for key in ("scan_layers", "remat", "threefry_kernel"):
    if key in out:
      out[key] = bool(out[key])
  return name, out


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--preset", default="demo", choices=sorted(PRESETS))
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--bf16", action="store_true", help="compute in bfloat16 (both sides)")
  p.add_argument("--attention_dropout", type=float, default=None,
                 help="model.attention_dropout (0: fused attention in training)")
  p.add_argument("--rng_impl", default="threefry", choices=["threefry", "rbg", "unsafe_rbg"])
  p.add_argument("--scan_layers", action="store_true", help="model.scan_layers (nn.scan)")
  p.add_argument("--remat", action="store_true", help="model.remat (recompute activations)")
  p.add_argument("--remat_policy", default="nothing", choices=tuple(REMAT_POLICIES),
                 help="model.remat_policy: what a recomputed layer keeps (with --remat)")
  p.add_argument("--loss_chunk", type=int, default=0,
                 help="train.loss_chunk: positions per chunk of the projection + loss")
  p.add_argument("--dropout_bits", type=int, default=32, choices=[32, 16],
                 help="model.dropout_bits (16: two dropout decisions per random word)")
  p.add_argument("--threefry_kernel", action="store_true",
                 help="train.threefry_kernel (GPU: threefry's bits from JAX's CUDA kernel)")
  p.add_argument("--variant", action="append", default=[],
                 help="NAME:key=value,... (attention_dropout, rng_impl, scan_layers, remat, "
                      "remat_policy, "
                      "loss_chunk, attention_impl, dropout_bits, single=auto|vmap|plain: how a "
                      "one-replica step is compiled, population=auto|vmap|map: how a "
                      "population's is, optimizer=auto|leaves|norm|vectors: how the update is "
                      "applied, loss_grad=auto|fused|autodiff: how the loss is differentiated) "
                      "on top of the flags above; repeat to time "
                      "several settings in this one command, each with its ratios to the peer")
  p.add_argument("--interleave", action="store_true",
                 help="build every --variant first, then time them in turns (one call of each "
                      "per round, --steps rounds): the fair comparison on a noisy machine")
  p.add_argument("--peer_in_process", action="store_true",
                 help="with --interleave on a CPU, build the peer's step in this process and time "
                      "it in the same turns; measured to slow our step (torch's and XLA's "
                      "thread pools compete: tiny preset 12.4 -> 17.1 ms), so its ratios are "
                      "not the fair ones; default: the peer runs in subprocesses")
  p.add_argument("--alternate", type=int, default=0, metavar="K",
                 help="with --peer: K rounds, each timing our variants in turns (--steps "
                      "rounds) and then the peer in a subprocess; medians over the rounds. The "
                      "fair CPU comparison: the two never share the cores, and a slow spell of "
                      "the machine falls on both")
  p.add_argument("--compilation_cache", default="",
                 help="use JAX's persistent compilation cache in this folder (as train.py does); "
                      "a second command with the same folder shows the cached start")
  p.add_argument("--peer", default=None, help="path of torch_peer.py to run for the ratios")
  p.add_argument("--peer_modes", nargs="+", default=None, metavar="MODE",
                 help="run only these of the peer's modes (GPU: 'eager fp32', tf32, "
                      "tf32+compile, or with --bf16 bf16, bf16+compile; CPU: 'eager fp32', or "
                      "bf16); default: all of the platform's")
  p.add_argument("--no_eval", action="store_true",
                 help="build and time the train step only (on a GPU the eval step's compile "
                      "can take as long as the train step's)")
  a = p.parse_args()
  if a.steps < 1:
    p.error(f"--steps must be a positive integer, got {a.steps}")
  if a.alternate < 0:
    p.error(f"--alternate must be >= 0 (0: off), got {a.alternate}")
  if a.loss_chunk < 0:
    p.error(f"--loss_chunk must be >= 0 (0: off), got {a.loss_chunk}")
  if a.peer and os.path.isfile(a.peer) and importlib.util.find_spec("torch") is None and (
      re.search(r"^\s*(import|from)\s+torch\b", open(a.peer, encoding="utf-8",
                                                    errors="replace").read(), re.M)):
    p.error("--peer runs the PyTorch peer, and torch is not installed here: "
            "pip install -e \".[torch]\" (or leave out --peer)")
  # the host allocator was set as train.py sets it at the top (infinito_jax/hostmem.py); the
  # peer's subprocesses keep the system's (both inherit an LD_PRELOAD)
  if a.peer and not os.path.isfile(a.peer):
    p.error(f"--peer {a.peer}: no such file (the peer is ../shared/bench/torch_peer.py)")
  if a.peer:
    try:
      with open(a.peer, encoding="utf-8") as f:
        compile(f.read(), a.peer, "exec")
    except (SyntaxError, UnicodeDecodeError, ValueError) as e:
      p.error(f"--peer {a.peer} is not a Python program ({type(e).__name__}: {e}); the peer is "
              "../shared/bench/torch_peer.py")
  if a.peer_in_process and not (a.peer and a.interleave):
    p.error("--peer_in_process times the peer in our turns: it needs --peer and --interleave")
  if a.peer and a.preset not in PEER_PRESETS:
    p.error(f"--peer: the peer has no preset {a.preset} (it has {', '.join(PEER_PRESETS)}); "
            "leave out --peer for this preset")
  if a.compilation_cache:
    from infinito_jax.train import use_compilation_cache  # pylint: disable=import-outside-toplevel
    use_compilation_cache(a.compilation_cache, setting="--compilation_cache")
  base = dict(attention_dropout=a.attention_dropout, rng_impl=a.rng_impl,
              scan_layers=a.scan_layers, remat=a.remat, loss_chunk=a.loss_chunk,
              attention_impl="auto", single="auto", dropout_bits=a.dropout_bits,
              threefry_kernel=a.threefry_kernel, remat_policy=a.remat_policy)
  variants = parse_variants(p, a.variant, base) or [("flags", base)]
  check_configs(p, a.preset, a.bf16, variants, flags_only=not a.variant)
  ours = []
  platform = jax.devices()[0].platform
  if a.alternate and not a.peer:
    p.error("--alternate K alternates our steps with the peer's runs: give --peer")
  # --peer_in_process (CPU, with --interleave): the peer's step joins our turns in this process
  peers_inside = bool(a.interleave and a.peer_in_process and a.peer and platform == "cpu"
                      and not a.alternate and importlib.util.find_spec("torch") is not None)
  modes = peer_modes(platform, a.bf16)
  if a.peer_modes and not a.peer:
    p.error("--peer_modes chooses among the peer's modes: give --peer too")
  if a.peer_modes:
    unknown = [m for m in a.peer_modes if m not in dict(modes)]
    if unknown:
      other = [m for m in unknown if m in dict(peer_modes(platform, not a.bf16))]
      p.error(f"--peer_modes {unknown}: the peer's modes here (platform {platform}"
              f"{', --bf16' if a.bf16 else ''}) are {[m for m, _ in modes]}"
              + (f"; {other} {'are' if len(other) > 1 else 'is'} "
                 f"{'without' if a.bf16 else 'with'} --bf16" if other else ""))
    modes = [(m, f) for m, f in modes if m in a.peer_modes]
  steps = ("train",) if a.no_eval else ("train", "eval")

  def subprocess_peer(flags):
    cmd = [sys.executable, a.peer, "--preset", a.preset, "--steps", str(a.steps), *flags]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
      return {"failed": out.stderr[-500:]}
    return json.loads(out.stdout.strip().splitlines()[-1])

  failed = []  # the peer's modes that failed: the command exits 1 after every row

  peer_rows, timing = [], ("alternated" if a.alternate else
                           "interleaved" if a.interleave else "sequential")
  if a.interleave or a.alternate:
    prepared = [prepare_ours(a.preset, a.bf16, with_eval=not a.no_eval, **kw)
                for _, kw in variants]
    fns = [q[step] for q in prepared for step in steps]
    inside = ([(mode, *peer_in_process(a.peer, a.preset, flags)) for mode, flags in modes]
              if peers_inside else [])
    if a.alternate:  # K rounds: ours in turns, then each peer mode in a subprocess
      ours_rounds, peer_rounds = [], {mode: [] for mode, _ in modes}
      for _ in range(a.alternate):
        ours_rounds.append(interleaved_times(fns, a.steps))
        for mode, flags in modes:
          peer_rounds[mode].append(subprocess_peer(flags))
      med = [float(np.median(col)) for col in zip(*ours_rounds)]
      for mode, runs in peer_rounds.items():
        good = [r for r in runs if "failed" not in r]
        if not good:
          print(json.dumps({"peer_mode": mode, "failed": runs[-1]["failed"]}), flush=True)
          failed.append(mode)
          continue
        sec = float(np.median([r["step_s_median"] for r in good]))
        peer_rows.append((mode, dict(good[0], step_s_median=round(sec, 5),
                                     tokens_per_s=round(good[0]["tokens_per_s"]
                                                        * good[0]["step_s_median"] / sec, 1),
                                     rounds=[r["step_s_median"] for r in good],
                                     timing="alternated")))
    else:
      med = interleaved_times(fns + [step for _, step, _ in inside], a.steps)
      peer_rows = [(mode, row(sec)) for (mode, _, row), sec in zip(inside, med[len(fns):])]
    k = len(steps)
    pairs = [q["rows"](*med[k * i:k * i + k]) for i, q in enumerate(prepared)]
  else:
    pairs = (time_ours(a.preset, a.steps, a.bf16, with_eval=True, **kw) if not a.no_eval
             else [time_ours(a.preset, a.steps, a.bf16, **kw)] for _, kw in variants)
  for i, ((name, _), rows) in enumerate(zip(variants, pairs)):
    for r in rows:
      r["variant"], r["timing"] = name, timing
    if a.alternate:
      rows[0]["rounds_ms"] = [round(r[len(steps) * i] * 1e3, 1) for r in ours_rounds]
    for r in rows:
      print(json.dumps(r), flush=True)
    ours.append(rows[0])
  if not a.peer:
    return

  def subprocess_peers():
    for mode, flags in modes:
      row = subprocess_peer(flags)
      if "failed" in row:
        print(json.dumps({"peer_mode": mode, "failed": row["failed"]}), flush=True)
        failed.append(mode)
        continue
      yield mode, dict(row, timing="subprocess")

  for mode, peer in (peer_rows if peers_inside or a.alternate else subprocess_peers()):
    print(json.dumps(dict(peer, mode=mode)), flush=True)
    for train in ours:
      print(json.dumps(dict(preset=a.preset, bf16=a.bf16, device=train["device"], peer_mode=mode,
                            variant=train["variant"], attention_dropout=train["attention_dropout"],
                            rng_impl=train["rng_impl"], scan_layers=train["scan_layers"],
                            remat=train["remat"], remat_policy=train["remat_policy"],
                            loss_chunk=train["loss_chunk"], dropout_bits=train["dropout_bits"],
                            threefry_kernel=train["threefry_kernel"],
                            timing=peer["timing"],
                            speedup_tokens_per_s=round(train["tokens_per_s"]
                                                       / peer["tokens_per_s"], 2))), flush=True)
  if failed:
    print(f"error: the peer failed in mode(s) {', '.join(failed)} (its rows say why); the other "
          "rows stand.", file=sys.stderr, flush=True)
    sys.exit(1)


if __name__ == "__main__":
  import _cli  # pylint: disable=g-import-not-at-top
  _cli.run_main(main)
