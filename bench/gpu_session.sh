#!/usr/bin/env bash
# The GPU measurements of issues #6 and #7 in six device calls of under 10 minutes each (a lease holds 15
# minutes of device time since 2026-12 (30 before), 10 per call, and a machine start takes 1-2 of them: plan one or two
# stages per lease, 1 and 3a first, calls back to back so the machine stays warm). From the repo root on the GPU machine:
#   bash bench/gpu_session.sh 1   # the targets: whole Trainer step vs diffusers at 256 and 512 px, eager + compiled
#   bash bench/gpu_session.sh 1b  # the same step at 256 px with CUDA graphs (compile_mode reduce-overhead), one process
#   bash bench/gpu_session.sh 1c  # the same step at 256 px with the whole model one graph (compile_scope model)
#   bash bench/gpu_session.sh 2   # why: profile, attention kernels (SDPA vs flex), largest batch with checkpointing
#   bash bench/gpu_session.sh 3a  # gpu-marked tests but the engines: no host sync, flex, zoo offload
#   bash bench/gpu_session.sh 3b  # the engine tests: FSDP2 / DeepSpeed on the deep preset, save + resume
#   bash bench/gpu_session.sh 4   # cache build at 256 / 512 px and sampling with the real model sizes: random weights
#   bash bench/gpu_session.sh 5   # the streaming reader; sampling with the compiled deep transformer
# Each stage writes at most 8 logs to $OUT (else runs/gpu_session). Wheels the GPU image lacks (diffusers, webdataset,
# deepspeed: bench/README.md says how to fetch them) are installed from .whl/ when it exists.
# SMOKE=1 runs the same sequence at tiny sizes and short timeouts, to check this script on a CPU.
set -uo pipefail
stage=${1:?usage: bash bench/gpu_session.sh 1|1b|1c|2|3a|3b|4|5}
out=${OUT:-runs/gpu_session}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
py=${PYTHON:-python3}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site" || exit 1
fi
# Fail in seconds, not after a machine start and a compile, when a carried wheel is missing.
"$py" -c "import webdataset, braceexpand, diffusers" || { echo "carry the wheels in .whl/ (bench/README.md)" >&2; exit 3; }

if [ "${SMOKE:-0}" = 1 ]; then
  train="--preset tiny --batch 2 --text_len 16 --rounds 1 --steps 2 --warmup 1"
  train_hi=$train
  stream="--preset tiny --samples 64 --rounds 1 --workers 0 2"
  sample="--preset tiny --batch 2 --rounds 1 --steps 4"
  lo=8 hi=16 short=120 long=240 compile=""
  zoo_size=small cache="--images 8 --batch_size 4 --rounds 1" sample4=""
  zoo_s=120 cache_lo_s=120 cache_hi_s=120 sample_s=120
else
  train="--preset deep --batch 16"
  train_hi="--preset deep --batch 8"  # batch 16 at 512 px eager would need ~80 GiB of activations (5.3 GiB a sample)
  stream="--preset deep --workers 0 4 8"
  sample="--preset deep --batch 16"
  lo=32 hi=64 short=200 long=300 compile="--compile"  # a call may run 600 s: each stage sums to <= 570
  # Stage 4 must fit one 10-minute call: N = 64 images (builds of 64 and 128 give the steady rate), batch 32 (two and
  # four build batches), 2 timed rounds per stage; sampling eager at batch 8 (16 rows with CFG), 2 rounds: 11 generate
  # calls per size. bench/README.md has the estimate per run.
  zoo_size=full cache="--images 64 --batch_size 32 --rounds 2" sample4="--batch 8 --rounds 2"
  zoo_s=90 cache_lo_s=130 cache_hi_s=150 sample_s=190
fi

run() {  # run NAME LIMIT_S COMMAND...: tee into $out/NAME.log, never let one hang take the stage down
  local name=$1 limit=$2
  shift 2
  echo "== $name ($(date +%T), limit ${limit}s): $*"
  # SIGINT, not SIGTERM: the Trainer turns SIGTERM into "save a checkpoint, then stop", which can outlast the limit.
  timeout -s INT -k 10 "$limit" "$@" 2>&1 | tee "$out/$name.log"
  echo "== $name: exit ${PIPESTATUS[0]}" | tee -a "$out/$name.log"
}

"$py" - <<'EOF' | tee "$out/device.log"
import torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "cudnn", torch.backends.cudnn.version())
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(), f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
import shutil
for p in ("/tmp", "."):
    print(p, f"{shutil.disk_usage(p).free / 2**30:.0f} GiB free")
EOF

case $stage in
1)
  run train_256 "$long" "$py" bench/bench_train.py $train --latent $lo $compile
  run train_512 $((long - 30)) "$py" bench/bench_train.py $train_hi --latent $hi $compile
  ;;
1b)
  # Static shapes (deep's padded regime: 128 text tokens; masked runs pad to text_buckets) let each block's graph
  # replay; the Trainer refuses this mode under FSDP2 / ZeRO-3 (runtime.check_compile_mode).
  run train_256_cudagraphs "$long" "$py" bench/bench_train.py $train --latent $lo $compile --compile_mode reduce-overhead
  ;;
1c)
  # One graph for the whole forward and one for the backward instead of one per block: fewer guards and launches, and
  # with CUDA graphs one replay a step. Against the peer's regional compile (the issue's peer), then its whole one.
  # --compile_scope is a no-op without $compile (SMOKE): these runs then repeat the eager step.
  # --warm_cache on both: the default inductor cache, which stages 1 and 1b (cold, temporary caches) leave empty, so
  # the first run's compile is still a cold one and the second reuses TinyFlux's graphs from it.
  whole="--compile_scope model --compile_mode reduce-overhead --warm_cache"
  run train_256_whole_cudagraphs $((long - 20)) "$py" bench/bench_train.py $train --latent $lo $compile $whole \
    --peer_compile_scope blocks
  run train_256_whole_vs_whole $((long - 20)) "$py" bench/bench_train.py $train --latent $lo $compile $whole
  ;;
2)
  run profile_256 "$short" "$py" bench/bench_train.py $train --latent $lo --profile $compile
  run attention_256 80 "$py" bench/bench_train.py $train --latent $lo --attention
  run attention_512 80 "$py" bench/bench_train.py $train_hi --latent $hi --attention
  # Eager: each batch size tried would otherwise be a cold compile of its own.
  run max_batch_256 "$short" "$py" bench/bench_train.py $train --latent $lo --grad_ckpt --find_max_batch
  ;;
3a)
  run gpu_tests "$long" "$py" -m pytest -q -m gpu --durations=0 tests/test_attention_backend.py tests/test_trainer.py \
    tests/test_verdict.py tests/test_zoo.py
  ;;
3b)
  mkdir -p runs/scale_report
  run engine_tests $((long + 260)) env TINYFLUX_SCALE_REPORT=runs/scale_report "$py" -m pytest -q -m gpu -s \
    --durations=0 tests/test_scale.py
  cp runs/scale_report/* "$out/" 2>/dev/null || echo "no scale reports (the engine tests did not run)"
  ;;
4)
  # The zoo is written outside $OUT (4.1 GB) and reused while the machine stays warm (its marker says it is whole).
  # Sampling runs eager here: stage 5 has the compiled transformer; this stage adds the real encoders and VAE.
  zoo_dir=${RANDOM_ZOO_DIR:-runs/random_zoo_$zoo_size}
  zoo="--zoo random-$zoo_size --random_zoo_dir $zoo_dir"
  run random_zoo "$zoo_s" "$py" -m tinyflux.frozen.zoo make-random "$zoo_dir" --size "$zoo_size" --reuse
  run cache_$((lo * 8)) "$cache_lo_s" "$py" bench/bench_cache.py $zoo $cache --resolutions $((lo * 8))
  run cache_$((hi * 8)) "$cache_hi_s" "$py" bench/bench_cache.py $zoo $cache --resolutions $((hi * 8))
  run sample_zoo "$sample_s" "$py" bench/bench_sample.py $zoo $sample --latents $lo $hi $sample4
  ;;
5)
  run stream_256 150 "$py" bench/bench_stream.py $stream --latents $lo --batch_dtype float32 float16
  run sample $((long + 100)) "$py" bench/bench_sample.py $sample --latents $lo $hi $compile
  ;;
*)
  echo "unknown stage $stage: 1, 1b, 1c, 2, 3a, 3b, 4 or 5" >&2
  exit 2
  ;;
esac
