#!/usr/bin/env bash
# The README's results table: kNN and linear evaluation on CIFAR-10 (all 50,000 train / 10,000 test images) of the
# main job's encoder and of a randomly initialised encoder of the same architecture. Run `bash scripts/pretrain.sh`
# first; MODEL=path overrides the encoder. Features are extracted once per encoder and cached in outputs/eval-*.
set -euo pipefail
cd "$(dirname "$0")/.."
# This repository's copy of CIFAR-10 (../shared/data, see its README), when there is one, is the default dataset.
if [ -d ../shared/data/cifar10 ]; then export MOCO_HF_DEFAULT_DATASET="$(cd ../shared/data/cifar10 && pwd)"; fi
bash scripts/setup.sh
export HF_HUB_DISABLE_PROGRESS_BARS=1
MODEL=${MODEL:-outputs/cifar10-resnet18/model}
for init in pretrained random; do
    extra=(); [ "$init" = random ] && extra=(--random_init)
    for protocol in knn linear; do
        .venv/bin/python "training/${protocol}_eval.py" --model_name_or_path "$MODEL" "${extra[@]}" \
            --output_dir "outputs/eval-$init" > /dev/null
    done
done
.venv/bin/python - "$MODEL" <<'PY'
import json, sys
print(f"| encoder ({sys.argv[1]}) | kNN top-1 (k=200) | linear top-1 | linear top-5 |\n| --- | --- | --- | --- |")
for init in ("random", "pretrained"):
    knn = json.load(open(f"outputs/eval-{init}/knn_results.json"))
    linear = json.load(open(f"outputs/eval-{init}/linear_results.json"))
    print(f"| {knn['encoder']} | {knn['knn_top1']:.2f}% | {linear['linear_top1']:.2f}% | {linear['linear_top5']:.2f}% |")
PY
