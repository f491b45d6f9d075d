#!/usr/bin/env bash
# The reproduction recipe: facebookresearch/moco's CIFAR-10 demo (colab/moco_cifar10_demo.ipynb on its
# colab-notebook branch: 82.6% weighted kNN, k=200, T=0.1, after 200 epochs on one V100), run by this package's
# trainer with the demo's own settings (preset cifar10-demo): ResNet-18 with the CIFAR stem and its fc (512 -> 128)
# as the head, K=4096, m=0.99, T=0.1, asymmetric loss, SplitBatchNorm with 8 groups on one process (the ddp shuffle
# on several), batch 512 (97 steps an epoch), SGD lr 0.06 with weight decay 5e-4 on a cosine set once per epoch,
# crop scale 0.08-1 without blur, kNN on the projection head's output over all 50,000 training images against the
# 10,000 test images after every epoch (the backbone features' kNN is recorded beside it).
# Writes outputs/cifar10-reproduction/: results.json, knn_curve.json/png (both features), metrics.jsonl, model/.
# Extra arguments override, e.g. the first epochs of the 200-epoch schedule: --stop_after_epochs 10 (resume with
# --resume_from_checkpoint latest and a larger value), or --mixed_precision bf16 where the device runs it natively.
# VARIANT=lightly trains lightly's benchmark variant instead (v2 MLP head and blur, symmetric loss, crop 0.2-1).
# RUN_PYTHON=python3 runs with an interpreter that already has moco-hf's dependencies instead of setting up .venv
# (benchmarks/gpu_session.sh does, on a device machine).
set -euo pipefail
cd "$(dirname "$0")/.."
# This repository's copy of CIFAR-10 (../shared/data, see its README), when there is one, is the default dataset.
if [ -d ../shared/data/cifar10 ]; then export MOCO_HF_DEFAULT_DATASET="$(cd ../shared/data/cifar10 && pwd)"; fi
if [ -z "${RUN_PYTHON:-}" ]; then
    bash scripts/setup.sh
    RUN_PYTHON=.venv/bin/python
fi
export HF_HUB_DISABLE_PROGRESS_BARS=1
case "${VARIANT:-demo}" in
    demo) recipe=(--preset cifar10-demo --knn_feature head) ;;
    lightly) recipe=(--preset v2 --backbone resnet18 --cifar_stem --image_size 32 --symmetric_loss
                     --image_mean 0.4914 0.4822 0.4465 --image_std 0.2023 0.1994 0.2010
                     --queue_size 4096 --momentum 0.99 --softmax_temperature 0.1 --weight_decay 5e-4) ;;
    *) echo "VARIANT must be demo or lightly, got ${VARIANT}" >&2; exit 2 ;;
esac
exec "$RUN_PYTHON" training/pretrain.py "${recipe[@]}" \
    --per_device_train_batch_size 512 --num_train_epochs 200 --eval_every 1 --knn_at_start false \
    --knn_k 200 --knn_temperature 0.1 --knn_max_train_samples 50000 --knn_max_eval_samples 10000 \
    --logging_steps 97 --checkpointing_steps 97 --checkpoints_total_limit 2 \
    --output_dir outputs/cifar10-reproduction "$@"
