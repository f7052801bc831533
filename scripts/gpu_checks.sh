#!/usr/bin/env bash
# The GPU checks of the speed work, prepared to run in one call on a lent GPU machine (docs/benchmarks.md#gpus),
# from the repository root, with the machine's own JAX (CUDA), torch and transformers:
#
#   bash scripts/gpu_checks.sh attention|train|decode|all      (JSON lines into $OUT, or ./gpu_checks)
#
#   attention  cuDNN's fused attention in the compiled train step, the pipeline's stage program and the 20B's
#              (data 2, pipe 4, tensor 2) layout, head sizes 96 and 128; its loss and gradients against XLA's
#   train      pythia-1.4b, seq 2048, micro batch 4, bf16: tokens/s and MFU against transformers (3 interleaved
#              pairs), then neox_jax once more without the default XLA options
#   decode     pythia-6.9b with random bf16 weights, batch 1, 128 new tokens: tokens/s against transformers'
#              generate and the fraction of the HBM bound (2 pairs), then neox_jax once more with the CPU's decode
#              layouts (fused per-layer weight copies, per-layer caches: --weight-copies on)
#
# Unmeasured estimate on an H200: attention 1 min, train 6 min, decode 6 min: give `train` and `decode` calls of
# their own within a 10-minute command limit. Compiled programs are cached across the benchmark's processes.
set -euo pipefail
part=${1:-all}
out=${OUT:-gpu_checks}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/neox_jax_compile_cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
py=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/device.csv" 2>&1 || true
"$py" -c "import jax, torch, transformers, flax; print(jax.__version__, jax.devices(), torch.__version__, \
transformers.__version__, flax.__version__)" | tee "$out/versions.txt"

failed=()
run() {  # name, then the command: its JSON lines into $out/name.jsonl, its log into $out/name.log; a failure is
    local name=$1; shift  # reported at the end, and the other parts still run
    echo "== $name: $*"
    "$@" 2> >(tee "$out/$name.log" >&2) | tee "$out/$name.jsonl" || failed+=("$name")
}
if [[ $part == attention || $part == all ]]; then
    run attention "$py" scripts/check_fused_attention.py --heads 96 128
fi
if [[ $part == train || $part == all ]]; then
    common=(--preset pythia-1.4b --seq 2048 --micro-batch 4 --precision bf16 --steps 5)
    run train "$py" scripts/bench_train.py "${common[@]}" --pairs 3 --compare transformers
    run train_xla_defaults_off "$py" scripts/bench_train.py "${common[@]}" --pairs 1 --xla-defaults off
fi
if [[ $part == decode || $part == all ]]; then
    common=(--presets pythia-6.9b --batches 1 --dtype bfloat16 --calls 2)
    run decode "$py" scripts/bench_decode.py "${common[@]}" --pairs 2 --compare transformers
    run decode_weight_copies "$py" scripts/bench_decode.py "${common[@]}" --pairs 1 --weight-copies on
fi
if (( ${#failed[@]} )); then
    echo "FAILED: ${failed[*]} (logs in $out)"
    exit 1
fi
