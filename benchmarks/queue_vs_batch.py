#!/usr/bin/env python
"""MoCo's queue against in-batch negatives (a SimCLR-style dictionary with MoCo's encoders), measured on real
CIFAR-10: for each global batch size, the same number of seen images with a queue of K keys or with
`queue_size=0`; peak memory, time per step and kNN accuracy of the result. Writes a table and a plot.

    python -m benchmarks.queue_vs_batch --seen_images 12800 --batch_sizes 32 64 128 256 --queue_sizes 4096 16384
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from .common import RESULTS, write_results

PRETRAIN = Path(__file__).resolve().parents[1] / "training" / "pretrain.py"
CIFAR = [
    "--image_size",
    "32",
    "--image_mean",
    "0.4913",
    "0.4821",
    "0.4465",
    "--image_std",
    "0.2452",
    "0.2428",
    "0.2606",
]


def run(batch_size: int, queue_size: int, args: argparse.Namespace, output: Path) -> dict:
    """One short pretraining in a fresh process; its peak memory comes from wait4's rusage of that process."""
    learning_rate = args.lr_per_256 * batch_size / 256
    command = [sys.executable, str(PRETRAIN), "--preset", "v2", "--backbone", args.backbone, *CIFAR,
               "--per_device_train_batch_size", str(batch_size), "--queue_size", str(queue_size),
               "--softmax_temperature", "0.2", "--momentum", "0.99", "--learning_rate", str(learning_rate),
               "--max_train_steps", str(args.seen_images // batch_size), "--logging_steps", "5",
               "--knn_at_start", "false", "--knn_max_train_samples", str(args.knn_bank),
               "--knn_max_eval_samples", str(args.knn_queries), "--output_dir", str(output)]  # fmt: skip
    env = {**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    if status != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{process.stderr.read()[-3000:]}")
    metrics = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    images_per_second = statistics.median(m["images_per_second"] for m in metrics[1:] or metrics)
    return {
        "negatives": f"queue K={queue_size}" if queue_size else "in-batch",
        "global_batch": batch_size,
        "knn_top1": json.loads((output / "results.json").read_text())["knn_top1"],
        "ms_per_step": 1e3 * batch_size / images_per_second,
        "images_per_s": images_per_second,
        "peak_rss_mib": usage.ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--seen_images", type=int, default=12800)
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--queue_sizes", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--lr_per_256", type=float, default=0.03)
    parser.add_argument("--knn_bank", type=int, default=5000)
    parser.add_argument("--knn_queries", type=int, default=1000)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for batch_size in args.batch_sizes:
            for queue_size in [*args.queue_sizes, 0]:
                row = run(batch_size, queue_size, args, Path(scratch) / f"b{batch_size}-k{queue_size}")
                print(row, flush=True)
                rows.append(row)
    write_results("queue_vs_batch", vars(args), rows,
                  ["negatives", "global_batch", "knn_top1", "ms_per_step", "images_per_s", "peak_rss_mib"],
                  notes=f"Each run sees {args.seen_images} images (steps = seen images / batch); kNN k=200 on "
                        f"{args.knn_bank} train / {args.knn_queries} test images.")  # fmt: skip
    fig, ax = plt.subplots(figsize=(6, 4))
    for negatives in dict.fromkeys(row["negatives"] for row in rows):
        chosen = [row for row in rows if row["negatives"] == negatives]
        ax.plot([r["global_batch"] for r in chosen], [r["knn_top1"] for r in chosen], marker="o", label=negatives)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("global batch size")
    ax.set_ylabel("kNN top-1 (%)")
    ax.set_title(f"{args.backbone}, CIFAR-10, {args.seen_images} images seen")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "queue_vs_batch.png", dpi=120)


if __name__ == "__main__":
    main()
