#!/usr/bin/env bash
# One command for a lent GPU: build fastrl, run the tests that exercise CUDA, FSDP2 on one nccl
# rank, tune and run the kernel benchmark, and a few trainer steps on CUDA (bf16 autocast, Liger
# layer kernels, gradient checkpointing). Logs and results land in $OUT (default bench/results/gpu).
#
#   bash bench/gpu_check.sh                 # quick benchmark shape (N=8192, H=4096, V=151936)
#   BENCH_ARGS="" bash bench/gpu_check.sh   # the whole protocol sweep (bench/kernels.py)
#   TEST_TIMEOUT / DIST_TIMEOUT / BENCH_TIMEOUT / MEM_TIMEOUT / TRAIN_TIMEOUT (seconds; 0 skips
#   the step), TRAIN_SFT_STEPS and TRAIN_ARGS (extra --set overrides) for the trainer steps.
#
# Wheels of missing pure-Python packages (liger-kernel) may be put in .whl/ beforehand.
set -u
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
BENCH_ARGS=${BENCH_ARGS---quick}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 && rm "$OUT/install.log" || { tail -30 "$OUT/install.log"; exit 1; }
python3 -c "import fastrl, json; print(json.dumps(fastrl.info()))"

# A step's timeout of 0 skips it (to save device time when only some parts changed).
echo "== GPU tests $(date +%T)"
[ "${TEST_TIMEOUT:-100}" -gt 0 ] && timeout "${TEST_TIMEOUT:-100}" python3 -m pytest -q -p no:cacheprovider tests/test_linear_token_stats.py \
  tests/test_linear_policy_loss.py tests/test_softmax_row_stats.py tests/test_package.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -15

echo "== FSDP2 on CUDA: one nccl rank against one CPU process $(date +%T)"
[ "${DIST_TIMEOUT:-90}" -gt 0 ] && timeout "${DIST_TIMEOUT:-90}" python3 -m pytest -q -p no:cacheprovider \
  tests/test_distributed.py -k cuda 2>&1 | tee "$OUT/gpu_dist_tests.log" | tail -15

echo "== kernel benchmark $(date +%T)"
[ "${BENCH_TIMEOUT:-200}" -gt 0 ] && timeout "${BENCH_TIMEOUT:-200}" python3 -m bench.kernels --tune --breakdown --profile $BENCH_ARGS --out "$OUT" 2>&1 | tee "$OUT/bench.log" | tail -45

echo "== peak extra memory of fastrl across N (the smallest and largest N of the protocol) $(date +%T)"
[ "${MEM_TIMEOUT:-80}" -gt 0 ] && timeout "${MEM_TIMEOUT:-80}" python3 -m bench.kernels --shapes 2048x4096x151936 32768x4096x151936 \
  --impls fastrl cublas_floor --rep-ms 50 --tag _memory --out "$OUT" 2>&1 | tee "$OUT/bench_memory.log" | tail -20

echo "== trainer on CUDA (bf16 autocast, liger layer kernels, gradient checkpointing) $(date +%T)"
[ "${TRAIN_TIMEOUT:-110}" -gt 0 ] && timeout "${TRAIN_TIMEOUT:-110}" python3 -m fastrl train configs/synthetic_cpu.yaml --set run_dir=/tmp/gpu_run \
  --set steps=2 --set sft_warmup_steps=${TRAIN_SFT_STEPS:-20} --set model.autocast=bfloat16 --set model.liger_kernels=true \
  --set model.gradient_checkpointing=true --set rollout.engine=hf --set env.eval_tasks=16 \
  --set checkpoint_every=3 ${TRAIN_ARGS:-} 2>&1 | tee "$OUT/train.log" | tail -20
date +%T; tail -n 3 /tmp/gpu_run/metrics.jsonl 2>/dev/null
