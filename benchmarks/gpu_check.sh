#!/usr/bin/env bash
# The GPU numbers of docs/benchmarks.md and docs/launching.md in one run, on one CUDA host
# with the project installed (torch too for `compare`). Each part writes its log (and JSON
# where the script has one) to OUT_DIR and the run goes on if one part fails; the last lines
# say which parts failed.
#
#   bash benchmarks/gpu_check.sh OUT_DIR [PART ...]     # default: every part, ~8-10 min on an H100
#
# Parts:
#   tests     the model, masking and step tests on the GPU (cuDNN parity, the einsum backward)
#   step      step_bench, large config, bf16 + cuDNN attention (waited, pipelined, device times)
#   compare   compare_torch $CMP_ARGS (default: the default config, f32, --packing)
#   variants  jax_variants: the mask draws' cost (bf16 cuDNN step with and without jax.random)
#   train     the demo's training loop at batch 32, bf16 + cuDNN, 8 input workers, 800 steps:
#             steps/s and the input wait of each 200-step window (metrics.jsonl)
# A second call for the large bf16 row: CMP_ARGS="--config=large --dtype=bfloat16
# --attention=cudnn" bash benchmarks/gpu_check.sh OUT_DIR compare
set -uo pipefail
OUT_DIR=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR [tests step compare variants train]}
shift
PARTS=${*:-tests step compare variants train}
CMP_ARGS=${CMP_ARGS:---config=default --packing}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 JAX_PLATFORMS=${JAX_PLATFORMS:-cuda}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)  # absolute: the parts run from the repository root
cd "$(dirname "$0")/.."

# Stop at once, in one line, where there is nothing to measure.
if ! "$PY" -c "import jax; jax.devices('cuda')" >"$OUT_DIR/machine_check.log" 2>&1; then
  echo "gpu_check.sh: no CUDA GPU that JAX can use here (jax.devices('cuda') failed; see" \
       "$OUT_DIR/machine_check.log). It needs an NVIDIA GPU and the CUDA build of JAX:" \
       "pip install -U 'jax[cuda13]' (docs/launching.md)" >&2
  exit 2
fi

failed=()
run_part() {  # run_part NAME COMMAND...: logs to OUT_DIR/NAME.log, prints its time
  local name=$1 start=$SECONDS
  shift
  echo "== $name: $*"
  if "$@" >"$OUT_DIR/$name.log" 2>&1; then
    echo "   ok in $((SECONDS - start)) s"
  else
    echo "   FAILED (status $?) in $((SECONDS - start)) s; last lines:"
    failed+=("$name")
  fi
  tail -n 12 "$OUT_DIR/$name.log" | sed 's/^/   | /'
}

{ nvidia-smi -L; "$PY" -c 'import jax, flax, optax; print("jax", jax.__version__,
  "flax", flax.__version__, "optax", optax.__version__, jax.devices())'; } >"$OUT_DIR/machine.txt" 2>&1
cat "$OUT_DIR/machine.txt"

for part in $PARTS; do
  case $part in
    tests) run_part tests "$PY" -m pytest -q -p no:cacheprovider tests/model_test.py \
             tests/masking_test.py tests/steps_test.py ;;
    step) run_part step "$PY" -m benchmarks.step_bench --config=large --dtype=bfloat16 \
            --attention=cudnn --json="$OUT_DIR/step.json" ;;
    compare) # shellcheck disable=SC2086  # CMP_ARGS is a list of flags
      run_part compare "$PY" -m benchmarks.compare_torch $CMP_ARGS --rounds=3 --steps=10 \
        --json="$OUT_DIR/compare.json" ;;
    variants) run_part variants "$PY" -m benchmarks.jax_variants --config=large \
                --only=bfloat16_cudnn,bfloat16_cudnn_fixed_mask --rounds=8 --steps=100 \
                --json="$OUT_DIR/variants.json" ;;
    train) workdir=$(mktemp -d)
      run_part train "$PY" train.py --config=configs/demo.py --workdir="$workdir" \
        --config.train.batch_size=32 --config.train.num_steps=800 --config.train.log_every=200 \
        --config.model.dtype=bfloat16 --config.model.attention=cudnn --config.data.workers=8
      cp "$workdir/metrics.jsonl" "$OUT_DIR/train_metrics.jsonl" 2>/dev/null
      "$PY" - "$OUT_DIR/train_metrics.jsonl" <<'EOF' 2>/dev/null
import json, sys
for line in open(sys.argv[1]):
    row = json.loads(line)
    if "steps_per_sec" in row:
        print(f"   step {row['step']}: {row['steps_per_sec']:.1f} steps/s, "
              f"input wait {100 * row.get('data_wait_fraction', float('nan')):.1f}%")
EOF
      rm -rf "$workdir" ;;
    *) echo "unknown part '$part' (have: tests step compare variants train)" >&2; exit 2 ;;
  esac
done

if ((${#failed[@]})); then echo "failed parts: ${failed[*]}"; exit 1; fi
echo "all parts passed: $PARTS"
