#!/usr/bin/env python
"""The whole trainer against its own model step and against a plain lightly MoCo loop, end to end, on real data.

Candidates, each in a fresh process, interleaved over `--rounds` (A, B, C, D, A, B, ...):

* `step alone`: `MocoModel` forward, backward and SGD step on fixed tensors: what the trainer could reach;
* `trainer`: `training/pretrain.py` as a user runs it (real CIFAR-10 parquet files, batched augmentation on the
  device, logging on; kNN monitor and checkpoints off), images/s from its `metrics.jsonl`;
* `trainer, per-image augmentation`: the same with `--augment_on_device false` (torchvision v2 in the workers);
* `trainer, bf16 autocast` (on request): the trainer with `--mixed_precision bf16`, against fp32 in one run;
* `lightly loop`: lightly's MoCo v2 example over the same parquet files (`MoCoV2Transform` per image in 2 DataLoader
  workers, `MoCoProjectionHead`, `update_momentum`, `NTXentLoss` with a memory bank of K), the same timm backbone,
  batch, K, T, m and SGD settings.

Each reports the median images/s over windows of `--window` steps after the first window (start-up and warm-up).
Main-job settings by default: ResNet-18 at 32 px, batch 128, K=1024, m=0.99, T=0.2, 2 loader workers.

    pip install -e ".[bench]" && python -m benchmarks.trainer_throughput            # timm's stem
    python -m benchmarks.trainer_throughput --cifar_stem --steps 20 --window 5      # the main job's CIFAR stem
    python -m benchmarks.trainer_throughput --batch_size 512 --mixed_precision bf16 --channels_last \
        --candidates "step alone" trainer                                           # a GPU
"""

from __future__ import annotations

import argparse
import copy
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from moco_hf import MocoConfig, MocoModel
from moco_hf.data import load_image_dataset

from .common import CIFAR10, device_of_choice, trainer_images_per_second, write_results

ROOT = Path(__file__).resolve().parents[1]
CIFAR_MEAN, CIFAR_STD = (0.4913, 0.4821, 0.4465), (0.2452, 0.2428, 0.2606)
CANDIDATES = ("step alone", "trainer", "trainer, per-image augmentation", "lightly loop")
BF16_TRAINER = "trainer, bf16 autocast"  # on request (--candidates): bf16 against fp32 in one run


def moco_config(args: argparse.Namespace) -> MocoConfig:
    return MocoConfig.from_preset("v2", backbone=args.backbone, cifar_stem=args.cifar_stem, image_size=args.image_size,
                                  queue_size=args.queue_size, momentum=args.momentum)  # fmt: skip


def windowed_rate(step: Callable[[], None], args: argparse.Namespace, device: torch.device) -> float:
    """Median images/s over windows of `args.window` steps, the first window left out."""
    rates = []
    for _ in range(args.steps // args.window):
        start = time.perf_counter()
        for _ in range(args.window):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        rates.append(args.window * args.batch_size / (time.perf_counter() - start))
    return statistics.median(rates[1:])


def step_alone(args: argparse.Namespace) -> float:
    """The trainer's step with the same speed options (bf16 autocast, channels_last, compiled backbones)."""
    device = device_of_choice()
    model = MocoModel(moco_config(args)).to(device).train()
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    if args.torch_compile:
        model.encoder_q.backbone.compile()
        model.encoder_k.backbone.compile()
    optimizer = torch.optim.SGD(model.encoder_q.parameters(), lr=args.learning_rate, momentum=0.9, weight_decay=1e-4)
    shape = (args.batch_size, 3, args.image_size, args.image_size)
    query, key = (torch.randn(shape, device=device).contiguous(memory_format=memory_format) for _ in range(2))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.mixed_precision == "bf16")

    def step() -> None:
        with autocast:
            loss = model(pixel_values=query, key_pixel_values=key).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return windowed_rate(step, args, device)


class ParquetImages(torch.utils.data.Dataset):
    """The CIFAR-10 train split through `transform`, as a lightly user would wrap a `datasets.Dataset`."""

    def __init__(self, transform: Callable) -> None:
        self.images = load_image_dataset(CIFAR10, "train", streaming=False)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.transform(self.images[index]["img" if "img" in self.images.features else "image"])


def lightly_loop(args: argparse.Namespace) -> float:
    from lightly.loss import NTXentLoss
    from lightly.models.modules import MoCoProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    from lightly.transforms import MoCoV2Transform
    from lightly.transforms.utils import IMAGENET_NORMALIZE

    device = device_of_choice()
    normalize = {"mean": CIFAR_MEAN, "std": CIFAR_STD} if args.image_size <= 64 else IMAGENET_NORMALIZE
    transform = MoCoV2Transform(input_size=args.image_size, normalize=normalize)
    loader = torch.utils.data.DataLoader(ParquetImages(transform), batch_size=args.batch_size, shuffle=True,
                                         num_workers=args.workers, drop_last=True, persistent_workers=True)  # fmt: skip
    backbone = MocoModel(moco_config(args)).encoder_q.backbone  # the same timm network (and stem) as ours
    head = MoCoProjectionHead(backbone.num_features, backbone.num_features, 128)  # v2's MLP, as ours
    query_encoder = torch.nn.Sequential(backbone, head).to(device).train()
    key_encoder = copy.deepcopy(query_encoder)
    deactivate_requires_grad(key_encoder)
    criterion = NTXentLoss(temperature=0.2, memory_bank_size=(args.queue_size, 128))
    optimizer = torch.optim.SGD(query_encoder.parameters(), lr=args.learning_rate, momentum=0.9, weight_decay=1e-4)
    batches = iter(loader)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.mixed_precision == "bf16")

    def step() -> None:
        nonlocal batches
        try:
            view_q, view_k = next(batches)
        except StopIteration:
            batches = iter(loader)
            view_q, view_k = next(batches)
        update_momentum(query_encoder, key_encoder, m=args.momentum)
        with autocast:
            query = query_encoder(view_q.to(device))
            with torch.no_grad():
                key = key_encoder(view_k.to(device))
        criterion(query.float(), key.float()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return windowed_rate(step, args, device)


def trainer(args: argparse.Namespace, on_device: bool, mixed_precision: str) -> float:
    return trainer_images_per_second([
        "--preset", "v2", "--backbone", args.backbone, "--image_size", str(args.image_size), "--image_mean",
        *map(str, CIFAR_MEAN), "--image_std", *map(str, CIFAR_STD), "--per_device_train_batch_size",
        str(args.batch_size), "--learning_rate", str(args.learning_rate), "--momentum", str(args.momentum),
        "--queue_size", str(args.queue_size), "--max_train_steps", str(args.steps), "--logging_steps",
        str(args.window), "--knn_monitor", "false", "--dataloader_num_workers", str(args.workers),
        "--augment_on_device", str(on_device).lower(), "--mixed_precision", mixed_precision,
        *(["--cifar_stem"] if args.cifar_stem else []), *(["--channels_last"] if args.channels_last else []),
        *(["--torch_compile"] if args.torch_compile else []),
    ])  # fmt: skip


def measure(candidate: str, args: argparse.Namespace) -> float:
    """`candidate`'s images/s, from a fresh process (so that none inherits another's threads or caches)."""
    if candidate.startswith("trainer"):
        precision = "bf16" if candidate == BF16_TRAINER else args.mixed_precision
        return trainer(args, on_device=candidate != "trainer, per-image augmentation", mixed_precision=precision)
    command = [sys.executable, __file__, "--role", candidate, *sys.argv[1:]]
    output = subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT).stdout
    return float(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--cifar_stem", action="store_true")
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--queue_size", type=int, default=1024)
    parser.add_argument("--momentum", type=float, default=0.99)
    parser.add_argument("--learning_rate", type=float, default=0.03)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--mixed_precision", choices=["no", "bf16"], default="no", help="Step alone and trainer.")
    parser.add_argument("--channels_last", action="store_true", help="Step alone and trainer.")
    parser.add_argument("--torch_compile", action="store_true", help="Step alone and trainer.")
    parser.add_argument("--candidates", nargs="+", choices=[*CANDIDATES, BF16_TRAINER], default=list(CANDIDATES))
    parser.add_argument("--role", choices=["step alone", "lightly loop"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role is not None:  # one measurement, in this fresh process
        print(step_alone(args) if args.role == "step alone" else lightly_loop(args))
        return
    rates: dict[str, list[float]] = {candidate: [] for candidate in args.candidates}
    for _ in range(args.rounds):
        for candidate in args.candidates:
            rates[candidate].append(measure(candidate, args))
            print(f"{candidate}: {rates[candidate][-1]:.1f} images/s", flush=True)
    medians = {candidate: statistics.median(values) for candidate, values in rates.items()}
    rows = [
        {
            "candidate": candidate,
            "images_per_s": medians[candidate],
            "per_round": [round(value, 1) for value in rates[candidate]],
            **{
                f"vs_{reference.replace(' ', '_')}": medians[candidate] / medians[reference]
                for reference in ("step alone", "lightly loop")
                if reference in medians
            },
        }
        for candidate in args.candidates
    ]
    options = [name for name in ("cifar_stem", "channels_last", "torch_compile") if getattr(args, name)]
    options += ["bf16"] if args.mixed_precision == "bf16" else []
    options += ["vs_bf16"] if BF16_TRAINER in args.candidates else []
    name = "-".join(["trainer_throughput", *options])
    settings = {k: v for k, v in vars(args).items() if k != "role"} | {"device": str(device_of_choice())}
    write_results(name, settings, rows, list(rows[0]),
                  notes="Median images/s over windows after the first; each candidate in a fresh process, "
                  "interleaved over the rounds. The trainer uses its default shuffle (split BatchNorm in one "
                  "process); lightly's example has none.")  # fmt: skip


if __name__ == "__main__":
    main()
