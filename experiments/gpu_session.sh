#!/usr/bin/env bash
# One prepared GPU session (experiments/gpu_session.py says what it runs, in which order,
# and which environment variables it reads). From the repository root:
#
#   bash experiments/gpu_session.sh              # on the device: BUDGET_S=540 by default
#   SMALL=1 bash experiments/gpu_session.sh      # tiny settings on any machine, CPU included
#
# The device image lacks ml-collections and tensorboardX: carry their wheels in .whl/
# (see experiments/RESULTS.md for the download line) and the CIFAR-10 JPEG archive in
# .devdata/; both folders are git-ignored. Everything printed also goes to $OUT/session.log.
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT="${OUT:-$PWD/experiments/results/gpu_session}"
mkdir -p "$OUT"
PYTHON="${PYTHON:-python3}"
export PYTHON PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
# The glibc malloc restart (vgg_jax/host_memory.py) is for XLA:CPU's step buffers; a GPU
# run gains nothing from it and its single malloc arena would slow threaded host work.
[[ "${SMALL:-0}" == 1 ]] || export VGG_JAX_KEEP_MEMORY=0

# Install each carried wheel whose module is missing, into /tmp/site.
missing=()
for pair in ml_collections:ml_collections tensorboardX:tensorboardx; do
  module=${pair%%:*} wheel=${pair##*:}
  "$PYTHON" -c "import $module" 2>/dev/null && continue
  for file in .whl/${wheel}-*.whl .whl/${module}-*.whl; do
    [[ -e $file ]] && missing+=("$file") && break
  done
done
if ((${#missing[@]})); then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --disable-pip-version-check --root-user-action=ignore --target /tmp/site "${missing[@]}" \
    || { echo "STOP: could not install ${missing[*]}" >&2; exit 3; }
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

"$PYTHON" experiments/gpu_session.py 2>&1 | tee "$OUT/session.log"
exit "${PIPESTATUS[0]}"
