#!/usr/bin/env bash
# The whole speed comparison on one GPU in one command (issue 10), each part with its own limit:
#
#   bash bench/gpu_all.sh [PATH/torch_peer.py] [OUTDIR]
#
# bf16:       full preset, bfloat16: the exact path (the default recipe) and the fused path with
#             cheap random bits, against the peer's bf16 and bf16 + torch.compile, with ratios;
# threefry:   the exact path with threefry's bits from JAX's CUDA kernel (train.threefry_kernel)
#             against the inlined hash, and in bf16 with rbg bits (no hash at all: how much of
#             the compile time is the hash's): compile seconds and ms/step, bf16 and fp32, each
#             build in a process of its own (no autotuning results shared); first the test that
#             the kernel draws the same bits;
# profile:    where the fused bf16 step spends its device time (bench/kernel_profile.py);
# fp32:       the same in float32 (and the fused path with 16-bit dropout draws, and with
#             Pallas' flash attention, which unlike cuDNN's takes float32), against the peer's
#             eager fp32, TF32 and TF32 + compile;
# tf32:       the float32 goal alone, quickly: the fused path (its update in the GPU's form,
#             the global gradient norm over one vector: optimizer=norm), the same with the
#             update leaf by leaf (optimizer=leaves: the form before, ~110 more kernels) and all
#             on vectors (optimizer=vectors: ~270 fewer kernels, copies of the whole state), the
#             fused path with Pallas' flash attention, and with 16-bit dropout draws (train
#             steps only), against the peer's TF32 and TF32 + compile;
# lossgrad:   the cross-entropy's written-out derivative (loss_grad=fused, the GPU's default)
#             against JAX's own (autodiff: a scatter-add and a product over [B, T, V] of their
#             own), train steps timed in turns: bf16 and fp32 on the fused path, and 8 replicas
#             at demo size;
# profile32:  the fused fp32 step's device time by kernel and by JAX op (with hlo32.tar.gz);
# notriton:   compile and step time with the GEMMs from cuBLAS only (no Triton GEMM fusions);
# layout:     the fused step with nn.scan over layers (alone, and keeping only the matrix
#             products: remat_policy=dots), and with the chunked loss, apart;
# profilescan: where the scanned bf16 step (nn.scan over layers) spends its device time, by
#             kernel and by JAX op (with hloscan.tar.gz), to set against the profile part's;
# cache:      the scanned step again in a new process with the persistent compilation cache;
# compileflags: the exact bf16 train step (unrolled: the compile-time goal's hard case) built in
#             a new process under each of XLA's settings that trade autotuning work for compile
#             time: autotuning on uninitialised data without correctness checks
#             (--xla_gpu_autotune_level=1), without the fusion autotuner, and both; compile
#             seconds and ms/step against the default, to keep one only if the step stays as fast;
# population: 1, 8, 4 replicas at demo size (train step; exact and fused paths);
# population16: 1 and 8 replicas in bfloat16 on the fused path;
# profilepop: the demo train step of 1 and of 8 replicas by kernel and by JAX op, launches per step;
# freezepop: 8 replicas with and without train.on_divergence='freeze' (the default: a select
#             that keeps a diverged replica's state) in one command, its cost on the device
#             (XLA:CPU: none, README); not in the default PARTS;
# study:      the shipped V5.1-vs-V5.2 study run to the end (configs/study_v51_v52.py: 5 variants
#             x 5 seeds, 3 epochs), with WikiText-2 from $WIKITEXT (default ../shared/data/
#             wikitext-2; a copy inside the checkout when ../shared does not travel); its
#             study.json, study.md and PNGs land in OUTDIR/study (the runs in $STUDY_DIR, a
#             new temporary folder unless set: run it again with the same one to resume);
#             STUDY_CONFIG=configs/study_tiny.py tries the part quickly. Not in the default PARTS.
# PARTS="bf16 fp32" runs only those parts (all take about 15 minutes on an H100; split them over
# calls where one command is limited to 10).
# PRESET=tiny POP=tiny bash bench/gpu_all.sh ... tries the script itself quickly on a CPU.
# Everything printed goes to OUTDIR/gpu.log as well (JSON lines from each benchmark).
# PYTHON=... names the interpreter (default: the checkout's .venv/bin/python where there is
# one, else python3); CACHE=DIR keeps the compilation cache across calls (the part `cache` then
# reads what earlier calls wrote; default: a new folder per call). Exit code: 1 if any part failed.
set -u
case "${1:-}" in -h|--help) sed -n '2,/^set -u/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0;; esac
PEER=${1:-../shared/bench/torch_peer.py}
OUTDIR=${2:-gpu_results}
HERE=$(cd "$(dirname "$0")/.." && pwd)
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x "$HERE/.venv/bin/python" ]; then PY=$HERE/.venv/bin/python
else PY=python3; fi
PRESET=${PRESET:-full}
POP=${POP:-demo}
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1
# JAX takes half the GPU, leaving room for the peer, which runs while this process lives
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.5}
CACHE=${CACHE:-$(mktemp -d)}
FAILED=0
FAST=attention_dropout=0,rng_impl=rbg
LOG="$OUTDIR/gpu.log"

part() {  # part NAME SECONDS args...
  local name=$1 limit=$2
  shift 2
  echo "=== $name ($(date +%T), limit ${limit}s): $*" | tee -a "$LOG"
  timeout "$limit" "$PY" "$@" 2>&1 | grep -v "^WARNING\|^I0000\|^W0000" | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "=== $name done: exit $rc" | tee -a "$LOG"
  [ "$rc" = 0 ] || FAILED=1
}

{ nvidia-smi -L; "$PY" -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"; "$PY" -c "import torch; print('torch', torch.__version__)"; } 2>&1 | tee -a "$LOG"

want() { [[ " ${PARTS:-threefry bf16 profile fp32 lossgrad profile32 notriton layout profilescan cache compileflags population population16 profilepop} " == *" $1 "* ]]; }

want bf16 && part bf16 300 bench/step_speed.py --preset $PRESET --bf16 --steps 20 --peer "$PEER" \
  --compilation_cache "$CACHE" --variant exact: --variant "fused:$FAST" \
  --variant "fused_b16:$FAST,dropout_bits=16"
if want threefry; then
  part threefry_bits 120 -m pytest -q -o addopts= -p no:cacheprovider tests/test_speed_tools.py \
    -k same_bits_on_a_gpu
  for dt in "--bf16" ""; do  # the inlined hash, the kernel (and rbg in bf16): a process each
    vs="exact: exact_kernel:threefry_kernel=1"
    [ -n "$dt" ] && vs="$vs exact_rbg:rng_impl=rbg"  # bf16 only: the part's time is short
    for v in $vs; do
      part "threefry${dt:+_bf16} ${v%%:*}" 100 bench/step_speed.py --preset $PRESET $dt \
        --steps 20 --variant "$v"
    done
  done
fi
want profile && part profile 90 bench/kernel_profile.py --by_op --preset $PRESET --bf16 \
  --variant "fused:$FAST" --top 40 --out "$OUTDIR/trace"
want fp32 && part fp32 300 bench/step_speed.py --preset $PRESET --steps 20 --peer "$PEER" \
  --variant exact: --variant "fused:$FAST" --variant "fused_b16:$FAST,dropout_bits=16" \
  --variant "pallas:$FAST,attention_impl=pallas"
want tf32 && part tf32 300 bench/step_speed.py --preset $PRESET --steps 20 --no_eval --peer "$PEER" \
  --peer_modes tf32 tf32+compile --variant "fused:$FAST" \
  --variant "fused_leaves:$FAST,optimizer=leaves" --variant "fused_vectors:$FAST,optimizer=vectors" \
  --variant "pallas:$FAST,attention_impl=pallas" --variant "fused_b16:$FAST,dropout_bits=16"
# the loss's derivative: compiled for an H100 without a device (bench/gpu_aot.py) the fused
# form moves 8% less per full bf16 step (13764 against 15014 MiB, its traffic_mib_per_step);
# these time it
if want lossgrad; then
  for dt in "--bf16" ""; do
    part "lossgrad${dt:+_bf16}" 150 bench/step_speed.py --preset $PRESET $dt --steps 20 --no_eval \
      --interleave --variant "fused:$FAST,loss_grad=fused" \
      --variant "autodiff:$FAST,loss_grad=autodiff"
  done
  part lossgrad_pop 200 bench/population.py --preset $POP --replicas 8 --steps 10 --no_eval \
    --compilation_cache "$CACHE" --variant "grad_fused:loss_grad=fused" \
    --variant "grad_autodiff:loss_grad=autodiff"
fi
# where the fp32 step spends its time, by kernel and by the JAX op each kernel came from
want profile32 && part profile32 90 bench/kernel_profile.py --by_op \
  --preset $PRESET --variant "fused:$FAST" --top 40 --out "$OUTDIR/trace32"
# the GEMMs from cuBLAS only (no Triton GEMM fusions, so far fewer autotuning candidates)
want notriton && XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_triton_gemm=false" part notriton 120 \
  bench/step_speed.py --preset $PRESET --bf16 --steps 20 --variant exact: --variant "fused:$FAST"
want notriton && XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_triton_gemm=false" part notriton32 \
  90 bench/step_speed.py --preset $PRESET --steps 20 --variant "fused:$FAST"
# scan_dots: the scanned layers keep only their matrix products for the backward pass
# (model.remat_policy=dots): fewer stacked buffers for the loop to initialise and copy
want layout && part layout 200 bench/step_speed.py --preset $PRESET --bf16 --steps 20 \
  --compilation_cache "$CACHE" --variant "scan:$FAST,scan_layers=1" \
  --variant "scan_dots:$FAST,scan_layers=1,remat=1,remat_policy=dots" \
  --variant "chunk:$FAST,loss_chunk=64"
# where the scanned step's extra time goes (against the profile part's unrolled step): by
# kernel and by JAX op, with the HLO. On XLA:CPU the scanned full step copies 2517 MiB a step at
# its top level against 0.7 MiB unrolled: lax.scan starts each stacked output (the residuals the
# backward pass reads, the stacked gradients) from a zero broadcast, XLA merges the equal
# broadcasts into one, and each loop then takes a copy of it; look for those copies here
want profilescan && part profilescan 120 bench/kernel_profile.py --by_op --preset $PRESET --bf16 \
  --variant "scan:$FAST,scan_layers=1" --top 40 --out "$OUTDIR/tracescan"
want cache && part cache 60 bench/step_speed.py --preset $PRESET --bf16 --steps 5 \
  --compilation_cache "$CACHE" --variant "scan:$FAST,scan_layers=1"
if want compileflags; then
  SAVED_XLA_FLAGS=${XLA_FLAGS:-}
  NOFA=--xla_gpu_experimental_enable_fusion_autotuner=false
  for flags in "" "--xla_gpu_autotune_level=1" "$NOFA" "--xla_gpu_autotune_level=1 $NOFA"; do
    xf=$(echo "${XLA_FLAGS:-} $flags" | xargs)  # XLA reads a blank XLA_FLAGS as a file name
    if [ -n "$xf" ]; then export XLA_FLAGS="$xf"; else unset XLA_FLAGS; fi
    part "compileflags [${flags:-default}]" 90 \
      bench/step_speed.py --preset $PRESET --bf16 --steps 10 --no_eval --variant exact:
  done
  if [ -n "$SAVED_XLA_FLAGS" ]; then export XLA_FLAGS=$SAVED_XLA_FLAGS; else unset XLA_FLAGS; fi
fi
# (--xla_gpu_autotune_level=0 was tried: bf16 compile 21 s instead of 22-33 s, but steps 8x
# slower, 85 ms on an H200; not worth a part)
# the train step only (its goal: 8 replicas at >= 6x one's tokens/s), the default recipe and the
# fused path; each program's compile seconds are printed as it is built
want population && part population 300 bench/population.py --preset $POP --replicas 1 8 4 \
  --steps 10 --no_eval --compilation_cache "$CACHE" --variant exact: --variant "fused:$FAST"
# the same in bfloat16 on the fused path: the least work per replica, so the most a population
# can gain over one run (whose step is mostly fixed costs at demo size)
want population16 && part population16 200 bench/population.py --preset $POP --bf16 \
  --replicas 1 8 --steps 10 --no_eval --compilation_cache "$CACHE" --variant "fused:$FAST"
# the freeze select's cost: the same population step with and without it, timed in turns
want freezepop && part freezepop 200 bench/population.py --preset $POP --replicas 8 --steps 10 \
  --no_eval --compilation_cache "$CACHE" --variant freeze:on_divergence=freeze \
  --variant stop:on_divergence=stop
# where a population's step spends its device time against one run's, by JAX op, with the
# kernel launches per step (a step bound by launches scales with N; one bound by work does not)
want profilepop && part profilepop1 90 bench/kernel_profile.py --by_op --preset $POP \
  --replicas 1 --top 25 --out "$OUTDIR/tracepop1"
want profilepop && part profilepop8 120 bench/kernel_profile.py --by_op --preset $POP \
  --replicas 8 --top 25 --out "$OUTDIR/tracepop8"
WIKITEXT=${WIKITEXT:-../shared/data/wikitext-2}
if [[ " ${PARTS:-} " == *" study "* ]]; then
  STUDY_DIR=${STUDY_DIR:-$(mktemp -d)/study}  # checkpoints stay out of OUTDIR (gigabytes)
  part study "${STUDY_LIMIT:-540}" -m infinito_jax.study --config "${STUDY_CONFIG:-configs/study_v51_v52.py}" \
    --workdir "$STUDY_DIR" --config.base.data.files.train="$WIKITEXT/test.txt" \
    --config.base.data.files.validation="$WIKITEXT/valid.txt"
  mkdir -p "$OUTDIR/study" && cp "$STUDY_DIR"/study.* "$STUDY_DIR"/*.png "$OUTDIR/study/" 2>/dev/null
fi
# the traces themselves come back too (OUTDIR/trace.json.gz, trace32.json.gz, hlo32.tar.gz, ...)
for t in trace trace32 tracescan; do
  find "$OUTDIR/$t" -name '*perfetto_trace.json.gz' -exec cp {} "$OUTDIR/$t.json.gz" \; 2>/dev/null
  if [ -d "$OUTDIR/$t/hlo" ]; then
    (cd "$OUTDIR/$t/hlo" && tar czf "../../${t/trace/hlo}.tar.gz" $(ls | grep 'after_optimizations\.txt$'))
  fi
  rm -rf "${OUTDIR:?}/$t"
done
exit $FAILED
