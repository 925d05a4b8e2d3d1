#!/usr/bin/env bash
# Speed check on one GPU: our JAX train step and forward pass against the same network in
# PyTorch, for the CIFAR recipe (configs/vgg16.py, bf16, batch 512) and the TF seed's
# ImageNet shape (configs/vgg16_imagenet.py, bf16, batch 128). Under 8 minutes on an H100.
#
#   bash experiments/gpu_check.sh               # from the repository root
#   SMALL=1 bash experiments/gpu_check.sh       # tiny settings: any machine, CPU included
#
# Needs jax (with CUDA on a GPU), flax, optax, orbax, absl, torch; no network, no
# TensorFlow. Wheels in .whl/ (ml-collections, tqdm, pillow) are installed into /tmp/site
# when their module is missing. Results: one JSON and one log per run in $OUT, or in
# experiments/results/ when $OUT is unset. Env: SMALL=1, STEPS, BURN_IN, DTYPE,
# TORCH_COMPILE=0 (time PyTorch eager only), RUN_TIMEOUT (seconds per run), PYTHON.
set -uo pipefail

cd "$(dirname "$0")/.."
RESULTS="${OUT:-experiments/results}"
mkdir -p "$RESULTS"
export PYTHONPATH="/tmp/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
# JAX must leave GPU memory to PyTorch, which runs in the same process after it.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export TF_CPP_MIN_LOG_LEVEL=2
PYTHON="${PYTHON:-python3}"

# Install each carried wheel whose module is not importable yet.
install_missing() {
  local module=$1 pattern=$2
  "$PYTHON" -c "import $module" 2>/dev/null && return 0
  local wheels=(.whl/$pattern)
  if [[ -e "${wheels[0]}" ]]; then
    "$PYTHON" -m pip install -q --no-index --no-deps --disable-pip-version-check \
      --root-user-action=ignore --target /tmp/site "${wheels[@]}"
  else
    echo "missing python module $module and no .whl/$pattern to install" >&2
  fi
}
install_missing ml_collections "ml_collections-*.whl"
install_missing tqdm "tqdm-*.whl"
install_missing PIL "pillow-*.whl"

if [[ "${SMALL:-0}" == 1 ]]; then
  # 3 burn-in steps: PyTorch (oneDNN) needs ~3 calls per shape to warm up.
  STEPS="${STEPS:-3}" BURN_IN="${BURN_IN:-3}" DTYPE="${DTYPE:-float32}"
  SIZE=(--config.width=0.125 --config.batch_size=16)
  CIFAR_BATCH=() IMAGENET_BATCH=() RUN_TIMEOUT="${RUN_TIMEOUT:-600}"
else
  STEPS="${STEPS:-20}" BURN_IN="${BURN_IN:-10}" DTYPE="${DTYPE:-bfloat16}"
  SIZE=() CIFAR_BATCH=(--config.batch_size=512) IMAGENET_BATCH=(--config.batch_size=128)
  RUN_TIMEOUT="${RUN_TIMEOUT:-210}"
fi
COMPILE_FLAG=--torch_compile
[[ "${TORCH_COMPILE:-1}" == 0 ]] && COMPILE_FLAG=--notorch_compile

{
  date
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
    || lscpu | grep -E "Model name|^CPU\(s\)"
  "$PYTHON" -c "import jax, torch; print('jax', jax.__version__, jax.devices());
print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
} | tee "$RESULTS/gpu_check_env.txt"

status=0
run() {  # name config batch-flags...
  local name=$1 config=$2
  shift 2
  echo "== $name: $config $DTYPE $*"
  timeout "$RUN_TIMEOUT" "$PYTHON" -m vgg_jax.benchmark --config="$config" \
    --config.dtype="$DTYPE" "${SIZE[@]}" "$@" --steps="$STEPS" --burn_in="$BURN_IN" \
    --compare=torch "$COMPILE_FLAG" --json="$RESULTS/$name.json" 2>&1 | tee "$RESULTS/$name.log"
  local code=${PIPESTATUS[0]}
  if [[ $code != 0 ]]; then
    echo "!! $name failed (exit $code; 124 = over ${RUN_TIMEOUT}s)" | tee -a "$RESULTS/$name.log"
    status=1
  fi
}

start=$SECONDS
run "vgg16_cifar_${DTYPE}" configs/vgg16.py "${CIFAR_BATCH[@]}"
run "vgg16_imagenet_${DTYPE}" configs/vgg16_imagenet.py "${IMAGENET_BATCH[@]}"
echo "done in $((SECONDS - start)) s; results in $RESULTS"
exit $status
