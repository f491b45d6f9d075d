#!/usr/bin/env python
"""How the key encoder's BatchNorm is kept from leaking the positive pair, and what it costs, on N processes:

* `ddp shuffle`: the paper's gather, permute, unshuffle of the key batch across processes (`--shuffle_bn ddp`);
* `SyncBatchNorm`: the query encoder's statistics synchronised across processes (`--sync_bn`), keys shuffled too;
* `none`: neither (each process normalises its own batch; the leak the paper warns about).

The whole trainer (`training/pretrain.py` under `accelerate launch`, real CIFAR-10, batched augmentation) for each,
interleaved over `--rounds`; images/s is the median of its `metrics.jsonl` windows after the first.

    python -m benchmarks.batch_norm_modes --processes 2
"""

from __future__ import annotations

import argparse
import statistics

import torch

from .common import trainer_images_per_second, write_results

MODES = {
    "ddp shuffle": ["--shuffle_bn", "ddp"],
    "SyncBatchNorm": ["--shuffle_bn", "ddp", "--sync_bn"],
    "none": ["--shuffle_bn", "none"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=64, help="Per process.")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--window", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    common = ["--backbone", args.backbone, "--image_size", str(args.image_size), "--per_device_train_batch_size",
              str(args.batch_size), "--queue_size", "4096", "--max_train_steps", str(args.steps), "--logging_steps",
              str(args.window), "--knn_monitor", "false", "--dataloader_num_workers", "1"]  # fmt: skip
    # PyTorch's DDP runs SyncBatchNorm on GPU modules only (the trainer refuses it on CPU processes).
    modes = {mode: flags for mode, flags in MODES.items() if torch.cuda.is_available() or mode != "SyncBatchNorm"}
    rates: dict[str, list[float]] = {mode: [] for mode in modes}
    for _ in range(args.rounds):
        for mode, flags in modes.items():
            rates[mode].append(trainer_images_per_second([*common, *flags], processes=args.processes))
            print(f"{mode}: {rates[mode][-1]:.1f} images/s", flush=True)
    reference = statistics.median(rates["ddp shuffle"])
    rows = [
        {"mode": mode, "images_per_s": statistics.median(values), "per_round": [round(v, 1) for v in values],
         "step_time_vs_ddp_shuffle": reference / statistics.median(values)}
        for mode, values in rates.items()
    ]  # fmt: skip
    write_results(f"batch_norm_modes-{args.processes}proc", vars(args), rows,
                  ["mode", "images_per_s", "per_round", "step_time_vs_ddp_shuffle"],
                  notes="images/s of all processes together. step_time_vs_ddp_shuffle > 1: slower than the "
                  "paper's shuffle. SyncBatchNorm is measured only where there are GPUs.")  # fmt: skip


if __name__ == "__main__":
    main()
