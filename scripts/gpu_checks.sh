#!/usr/bin/env bash
# Every GPU check in one call on a lent GPU machine (docs/benchmarks.md#gpus), from the repository root, with the
# machine's own JAX (CUDA), torch and transformers; prepared to finish in under 10 minutes on one H100:
#
#   bash scripts/gpu_checks.sh [all|attention|memory|train|decode|extra]     (JSON lines and logs into $OUT)
#
#   attention  cuDNN's fused attention in the compiled train step, the pipeline's stage program and the 20B's
#              (2, 4, 2) layout compiled without devices, heads 96 and 128; loss and gradients against XLA's
#              attention within bf16's tolerance                                           pass: every check ok
#   memory     pythia-1.4b's bf16 train step (seq 2048, micro batch 4) and its decode step compiled for this GPU
#              and for a compile-only one of the same card (the planner's way)            pass: within 10%
#   train      pythia-1.4b, seq 2048, micro batch 4, bf16: tokens/s and MFU beside transformers (one pair)
#                                                                                            pass: ratio >= 1.0
#   decode     pythia-6.9b with random bf16 weights, batch 1, 128 new tokens: tokens/s beside transformers and
#              against the HBM bound (one pair)                                pass: >= 50% of the bound
#   extra      (not in all) the train step without the default XLA options, and decode with the CPU's layouts
#
# It ends with a table of every figure and criterion, and exits 1 if a criterion failed.
set -uo pipefail
parts=${1:-all}
out=${OUT:-gpu_checks}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/neox_jax_compile_cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
py=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/device.csv" 2>&1 || true
"$py" -c "import jax, torch, transformers, flax; print(jax.__version__, jax.devices(), torch.__version__, \
transformers.__version__, flax.__version__)" | tee "$out/versions.txt"

want() { [[ $parts == all && $1 != extra ]] || [[ $parts == "$1" ]]; }
run() {  # name, then the command: its JSON lines into $out/name.jsonl, its log into $out/name.log
    local name=$1; shift
    echo "== $name: $*"
    SECONDS=0
    "$@" 2> >(tee "$out/$name.log" >&2) | tee "$out/$name.jsonl"
    echo "{\"part\": \"$name\", \"exit\": ${PIPESTATUS[0]}, \"seconds\": $SECONDS}" >> "$out/parts.jsonl"
}
train=(--preset pythia-1.4b --seq 2048 --micro-batch 4 --precision bf16 --steps 3)
decode=(--presets pythia-6.9b --batches 1 --dtype bfloat16 --calls 1)
want attention && run attention "$py" scripts/check_fused_attention.py --heads 96 128
want memory && run memory "$py" scripts/check_gpu_memory.py --preset pythia-1.4b --seq 2048 --micro-batch 4
want train && run train "$py" scripts/bench_train.py "${train[@]}" --pairs 1 --compare transformers
want decode && run decode "$py" scripts/bench_decode.py "${decode[@]}" --pairs 1 --compare transformers
if want extra; then
    run train_xla_defaults_off "$py" scripts/bench_train.py "${train[@]}" --pairs 1 --xla-defaults off
    run decode_weight_copies "$py" scripts/bench_decode.py "${decode[@]}" --pairs 1 --weight-copies on
fi

"$py" - "$out" <<'EOF'
import json, pathlib, sys

out = pathlib.Path(sys.argv[1])
def rows(name):
    path = out / f"{name}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")] if path.exists() else []

table, failed = [], []
def check(what, figure, ok):
    table.append((what, figure, "pass" if ok else "FAIL"))
    if not ok:
        failed.append(what)

for r in rows("attention"):
    check(r["check"], f"fused {','.join(r['fused_calls']) or 'none'}; worst grad diff {r.get('worst_grad_rel_diff', '-')}",
          r["ok"])
for r in rows("memory"):
    check(r["check"], f"real {r['real_gb']:.2f} GB, deviceless {r['deviceless_gb']:.2f} GB "
                      f"({r['difference']:.1%})", r["ok"])
for r in rows("train"):
    n, t, ratio = r["neox_jax"], r.get("transformers", {}), r.get("neox_jax/transformers", {}).get("median", 0)
    check("train pythia-1.4b bf16 vs transformers", f"{n['median']:,.0f} vs {t.get('median', 0):,.0f} tokens/s "
          f"(ratio {ratio:.2f}), MFU {n.get('mfu_6n', 0):.1%} (6N)", ratio >= 1.0)
for r in rows("decode"):
    n, ratio = r["neox_jax"], r.get("neox_jax/transformers", {}).get("median", 0)
    fraction = r.get("fraction_of_bound", {}).get("median", 0)
    check("decode pythia-6.9b batch 1 vs the HBM bound", f"{n['median']:.1f} tokens/s, {fraction:.0%} of the bound "
          f"(ratio to transformers {ratio:.2f})", fraction >= 0.5)
for r in rows("parts"):
    if r["exit"] not in (0, 1):  # 1 is a failed criterion, reported above
        check(f"part {r['part']}", f"exit {r['exit']} after {r['seconds']} s", False)
width = max((len(w) for w, _, _ in table), default=10)
print("\n" + "\n".join(f"{w:{width}s}  {v}  {s}" for w, v, s in table))
print(f"\n{len(table) - len(failed)} passed, {len(failed)} failed")
sys.exit(1 if failed or not table else 0)
EOF
