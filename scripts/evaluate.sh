#!/usr/bin/env bash
# The evaluation table of docs/evaluation.md (written to benchmarks/results/cifar10_evaluation-cpu.json): kNN and
# linear evaluation on CIFAR-10 (all 50,000 train / 10,000 test images) of the main job's encoder and of a randomly
# initialised encoder of the same architecture (BatchNorm calibrated). Run `bash scripts/pretrain.sh` first;
# MODEL=path overrides the encoder. Features are extracted once per encoder and cached in outputs/eval-*.
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
import json, platform, subprocess, sys
from datetime import datetime, timezone
from pathlib import Path

rows = []
for init in ("random", "pretrained"):
    knn = json.load(open(f"outputs/eval-{init}/knn_results.json"))
    linear = json.load(open(f"outputs/eval-{init}/linear_results.json"))
    rows.append({"encoder": knn["encoder"], "knn_top1": knn["knn_top1"], "linear_top1": linear["linear_top1"],
                 "linear_top5": linear["linear_top5"], "train_images": knn["train_samples"],
                 "test_images": knn["eval_samples"]})
cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")), platform.machine())
result = {"benchmark": "cifar10_evaluation", "model": sys.argv[1], "command": "bash scripts/evaluate.sh",
          "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
          "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": cpu, "results": rows}
Path("benchmarks/results/cifar10_evaluation-cpu.json").write_text(json.dumps(result, indent=2) + "\n")
for row in rows:
    print(f"| {row['encoder']} | {row['knn_top1']:.2f}% | {row['linear_top1']:.2f}% | {row['linear_top5']:.2f}% |")
print("written to benchmarks/results/cifar10_evaluation-cpu.json (docs/evaluation.md: python scripts/docs_tables.py)")
PY
