"""The official CIFAR-10 demo's own code, run on this machine: the control for `cifar10_demo_curve.py`.

The code (tests/reference_cifar10_demo.py) is a plain transcription of facebookresearch/moco's
`colab/moco_cifar10_demo.ipynb` (colab-notebook branch, f7364915): its ModelBase (torchvision ResNet-18 with a 3x3
conv1, no max-pool, fc 512 -> 128), SplitBatchNorm, ModelMoCo with the single-GPU batch shuffle, its PIL transforms
(torchvision v1 ops in worker processes), SGD with its per-epoch cosine and its weighted kNN monitor. Nothing from
`moco_hf` is used, so the two runs share only the data and the machine: where they agree with each other and not
with the demo's log, the difference is in the conditions (data, precision, seed), not in moco-hf's implementation.

Differences from the notebook, all of them conditions: the images are `../shared/data/cifar10` (JPEG re-encodings
of CIFAR-10, read with `datasets`), `--precision bf16` runs forward passes under CPU autocast as our run did, the
run is seeded, and it stops after `--epochs_to_run` epochs of the 200-epoch schedule.

    python -m benchmarks.cifar10_reproduction.cifar10_demo_notebook --epochs_to_run 6 --precision bf16 \
        --output benchmarks/cifar10_reproduction/results/cifar10_demo_notebook-cpu.json
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision import transforms

from tests.reference_cifar10_demo import (
    DEMO_MEAN,
    DEMO_STD,
    CifarArrays,
    ModelMoCo,
    cifar_arrays,
    demo_train_transform,
    knn_test,
    train_epoch,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default="../shared/data/cifar10")
    parser.add_argument("--epochs_to_run", type=int, default=6)
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--batch_size", type=int, default=512)
    parser.add_argument("--limit", type=int, default=None, help="first N images of each split (a quick trial)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--transforms",
        choices=["v1", "v2"],
        default="v1",
        help="v1: the notebook's PIL ops; v2: torchvision.transforms.v2 on tensors (moco-hf's ops)",
    )
    parser.add_argument("--knn", default=True, action=argparse.BooleanOptionalAction, help="kNN after each epoch")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    train_transform = demo_train_transform(ops=args.transforms)
    test_transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(DEMO_MEAN, DEMO_STD)])
    train_images, train_labels = cifar_arrays(args.data_dir, "train", args.limit)
    test_images, test_labels = cifar_arrays(args.data_dir, "test", args.limit and args.limit // 5)
    loader = partial(DataLoader, num_workers=args.workers, persistent_workers=args.workers > 0)
    train_loader = loader(CifarArrays(train_images, train_labels, train_transform, pair=True),
                          batch_size=args.batch_size, shuffle=True, drop_last=True)  # fmt: skip
    memory_loader = loader(CifarArrays(train_images, train_labels, test_transform, pair=False), batch_size=512)
    test_loader = loader(CifarArrays(test_images, test_labels, test_transform, pair=False), batch_size=512)

    model = ModelMoCo(K=min(4096, args.batch_size * (len(train_images) // args.batch_size)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.06, weight_decay=5e-4, momentum=0.9)
    epochs, train_seconds = [], 0.0
    for epoch in range(1, args.epochs_to_run + 1):
        start = time.perf_counter()
        loss = train_epoch(model, train_loader, optimizer, epoch, 200, 0.06, args.precision)
        train_seconds += time.perf_counter() - start
        knn = knn_test(model.encoder_q, memory_loader, test_loader, args.precision) if args.knn else None
        epochs.append({"epoch": epoch, "knn_top1_head": knn, "loss": loss, "train_seconds": train_seconds,
                       "lr": optimizer.param_groups[0]["lr"]})  # fmt: skip
        print(json.dumps(epochs[-1]), flush=True)
        args.output.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()},
                                           "torch": torch.__version__, "epochs": epochs}, indent=2) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
