#!/usr/bin/env bash
# Fine-tuning from imported weights vs training from scratch, on a CPU, offline.
#
#   python /work/shared/tools/cifar10_jpeg.py folder /tmp/cifar10     # CIFAR-10 as JPEG files
#   nice -n 5 bash experiments/finetune_cifar.sh /tmp/cifar10 /tmp/vgg_jax_finetune
#
# No network here, so no real ImageNet weights. The "pretrained" weights come from a short
# pre-training run on six CIFAR-10 classes (airplane .. dog, 1000 images each), exported to
# torchvision's .pth layout with `python -m vgg_jax.export` and read back with
# --config.init_from=FILE.pth: the path torchvision's ImageNet files take. The target task
# is the other four classes (frog, horse, ship, truck) with only 100 training images each
# (250 test images each). Model: VGG11-BN at width 0.25 with torchvision's head, 64x64
# pixels (CIFAR upscaled), recipe configs/vgg16_finetune.py. Three runs of 15 epochs:
#   imported         the preset as it is: classifier re-initialised, backbone at 0.1x
#   imported_frozen  plus --config.freeze=features: only the head learns
#   scratch          --config.init_from= (empty): random init, one rate (0.05) for all
# Curves: OUT/*/curve.csv, plotted to experiments/finetune_cifar4.png.
set -euo pipefail
CIFAR=${1:?usage: finetune_cifar.sh CIFAR10_IMAGE_FOLDER [OUT_DIR]}
OUT=${2:-/tmp/vgg_jax_finetune}
cd "$(dirname "$0")/.."
python experiments/cifar_subset.py "$CIFAR" "$OUT/six" \
    --classes=airplane,automobile,bird,cat,deer,dog --train=1000 --test=200
python experiments/cifar_subset.py "$CIFAR" "$OUT/four" \
    --classes=frog,horse,ship,truck --train=100 --test=250

MODEL=(--config.model=vgg11 --config.width=0.25 --config.head=torchvision
       --config.image_size=64)
RUN=(python experiments/run_experiment.py --config=configs/vgg16_finetune.py)

"${RUN[@]}" --workdir="$OUT/pretrain" -- "${MODEL[@]}" --config.data_dir="$OUT/six" \
    --config.init_from= --config.backbone_lr_factor=1.0 --config.learning_rate=0.05 \
    --config.batch_size=64 --config.num_epochs=4 --config.warmup_epochs=0.5
python -m vgg_jax.export --workdir="$OUT/pretrain" --format=torchvision "$OUT/pretrained.pth"

TUNE=("${MODEL[@]}" --config.data_dir="$OUT/four" --config.num_epochs=15)
"${RUN[@]}" --workdir="$OUT/imported" -- "${TUNE[@]}" --config.init_from="$OUT/pretrained.pth"
"${RUN[@]}" --workdir="$OUT/imported_frozen" -- "${TUNE[@]}" \
    --config.init_from="$OUT/pretrained.pth" --config.freeze=features
"${RUN[@]}" --workdir="$OUT/scratch" -- "${TUNE[@]}" \
    --config.init_from= --config.backbone_lr_factor=1.0 --config.learning_rate=0.05

python experiments/plot_curves.py --out experiments/finetune_cifar4.png \
    --title="4 CIFAR-10 classes, 100 train images each, 64 px: test accuracy" \
    "imported=$OUT/imported" "imported, features frozen=$OUT/imported_frozen" \
    "from scratch=$OUT/scratch"
