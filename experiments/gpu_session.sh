#!/usr/bin/env bash
# One prepared GPU session: experiments/gpu_session.py says what it runs, in which order,
# and which environment variables it reads. From the repository root:
#
#   BUDGET_S=540 SKIP_DONE=1 bash experiments/gpu_session.sh   # on the device
#   SMALL=1 bash experiments/gpu_session.sh                    # tiny, on any machine
#
# Carried in git-ignored folders: the wheels the device image lacks in .whl/ and the
# CIFAR-10 JPEG archive in .devdata/ (experiments/RESULTS.md, 'Prepared GPU session v2').
# Everything printed also goes to $OUT/session.log.
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT="${OUT:-$PWD/experiments/results/gpu_session}"
mkdir -p "$OUT"
PYTHON="${PYTHON:-python3}"
export PYTHON PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
# The glibc malloc restart (vgg_jax/cpu/host_memory.py) is for XLA:CPU's step buffers; a
# GPU run gains nothing from it and its single malloc arena would slow threaded host work.
[[ "${SMALL:-0}" == 1 ]] || export VGG_JAX_KEEP_MEMORY=0
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" experiments/gpu_session.py 2>&1 | tee "$OUT/session.log"
exit "${PIPESTATUS[0]}"
