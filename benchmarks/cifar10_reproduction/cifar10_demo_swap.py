"""Which half makes the difference: the CIFAR-10 demo's training step or moco-hf's, fed by the demo's loader or
moco-hf's, from the same initial weights and queue (the control's seed-0 draw).

`cifar10_demo_notebook.py` (the demo's own code) and `moco-hf train --preset cifar10-demo` started from the same
weights (`demo_init_as_moco_model.py`) differ in their loss from the first steps. This script swaps the halves:

* `--step demo`: the notebook's `ModelMoCo` and SGD (its `train_epoch` body);
* `--step moco-hf`: `MocoModel` of the cifar10-demo preset, `build_optimizer` and the per-epoch cosine schedule;
* `--data demo`: the notebook's loader (PIL images, its v1 transform per image, `shuffle=True`, `drop_last`);
* `--data moco-hf`: the trainer's loader (`plan_data`, `build_loader`; batched augmentation on the CPU, or
  `--augment_on_device false` for torchvision v2 per image in the workers).

Every 10 steps it prints the mean loss of those 10 steps, under bf16 autocast as the CPU runs were (`--precision
fp32`: in fp32, as the published run was), and writes them to `results/cifar10_demo_swap-<leg>.json` (here);
`--trainer_metrics` records the trainer's own run from the same start (its `metrics.jsonl` with `--logging_steps
10`) beside them, and `--plot` draws them all:

    python -m benchmarks.cifar10_reproduction.cifar10_demo_swap --step demo --data moco-hf --steps 40
    python -m benchmarks.cifar10_reproduction.cifar10_demo_swap \
        --trainer_metrics outputs/cifar10-from-demo-init/metrics.jsonl \
        --plot benchmarks/cifar10_reproduction/results/cifar10_demo_swap-cpu.png
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from moco_hf.optimization import build_optimizer
from moco_hf.plotting import plt, save_figure
from moco_hf.pretraining.arguments import MocoTrainingArguments, build_config
from moco_hf.pretraining.data_plan import build_augmentation, build_loader, plan_data
from moco_hf.schedules import learning_rate_scheduler
from tests.reference_cifar10_demo import (
    CifarArrays,
    ModelMoCo,
    autocast,
    cifar_arrays,
    demo_as_moco_model,
    demo_train_transform,
)

from . import RESULTS

BATCH, LR, EPOCHS = 512, 0.06, 200
STEPS_PER_EPOCH = 50_000 // BATCH  # drop_last: 97


def demo_batches(data_dir: str, workers: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The control's loader; it draws its order from the global RNG, as the control's does after its model."""
    images, labels = cifar_arrays(data_dir, "train", None)
    pairs = CifarArrays(images, labels, demo_train_transform(), pair=True)
    yield from torch.utils.data.DataLoader(pairs, batch_size=BATCH, shuffle=True, drop_last=True, num_workers=workers)


def moco_hf_batches(data_dir: str, seed: int, workers: int, on_device: bool) -> Iterator[tuple[torch.Tensor, ...]]:
    args = MocoTrainingArguments(preset="cifar10-demo", dataset_name=data_dir, per_device_train_batch_size=BATCH,
                                 num_train_epochs=EPOCHS, seed=seed, dataloader_num_workers=workers,
                                 augment_on_device=on_device, output_dir="unused")  # fmt: skip
    accelerator = Accelerator(cpu=True)
    plan = plan_data(args, accelerator)
    two_crops = build_augmentation(build_config(args), args)
    for batch in build_loader(plan, two_crops, args, accelerator, start_step=0):
        yield two_crops.on_device(batch, accelerator.device)


def demo_step(demo: ModelMoCo, precision: str) -> Callable[[torch.Tensor, torch.Tensor], float]:
    """The notebook's `train_epoch` body, at its learning rate of epoch 1."""
    optimizer = torch.optim.SGD(demo.train().parameters(), lr=LR, weight_decay=5e-4, momentum=0.9)
    for group in optimizer.param_groups:
        group["lr"] = LR * 0.5 * (1.0 + math.cos(math.pi / EPOCHS))

    def step(query: torch.Tensor, key: torch.Tensor) -> float:
        with autocast(precision):
            loss = demo(query, key)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def moco_hf_step(demo: ModelMoCo, precision: str) -> Callable[[torch.Tensor, torch.Tensor], float]:
    """The trainer's step (`moco_hf.pretraining.loop.training_step` without Accelerate) on `demo`'s weights."""
    with torch.random.fork_rng():  # building a MocoModel draws weights: leave the global RNG where the demo's is
        model = demo_as_moco_model(demo).train()
    optimizer = build_optimizer(model, model.config, LR)
    scheduler = learning_rate_scheduler(
        optimizer, model.config.lr_schedule, EPOCHS * STEPS_PER_EPOCH, 0, STEPS_PER_EPOCH
    )

    def step(query: torch.Tensor, key: torch.Tensor) -> float:
        with autocast(precision):
            loss = model(pixel_values=query, key_pixel_values=key).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def window_means(losses: list[float], steps: list[int]) -> list[dict[str, float]]:
    """The mean loss of each logging window: `steps[i]` ends window i (the steps after the previous one)."""
    windows, start = [], 0
    for end in steps:
        windows.append({"first_step": start + 1, "last_step": end, "loss": sum(losses[start:end]) / (end - start)})
        start = end
    return windows


def run_leg(args: argparse.Namespace) -> Path:
    """Train `args.steps` steps of one combination; the mean loss of every 10 steps, in RESULTS."""
    torch.manual_seed(args.seed)  # the control's initial draw, as cifar10_demo_notebook.main
    step = (demo_step if args.step == "demo" else moco_hf_step)(ModelMoCo(K=4096), args.precision)
    if args.data_seed is not None:
        torch.manual_seed(args.data_seed)
    if args.data == "demo":
        batches = demo_batches(args.data_dir, args.workers)
    else:
        data_seed = args.seed if args.data_seed is None else args.data_seed
        batches = moco_hf_batches(args.data_dir, data_seed, args.workers, args.augment_on_device)
    losses = []
    for query, key in batches:
        losses.append(step(query, key))
        if len(losses) % 10 == 0:
            print(f"steps {len(losses) - 9}-{len(losses)}: loss {sum(losses[-10:]) / 10:.4f}", flush=True)
        if len(losses) == args.steps:
            break
    name = f"step_{args.step}-data_{args.data}{'' if args.augment_on_device else '-per_image'}"
    name += "" if args.data_seed is None else f"-data_seed{args.data_seed}"
    name += "" if args.precision == "bf16" else f"-{args.precision}"
    return write_leg(name, vars(args), window_means(losses, list(range(10, len(losses) + 1, 10))))


def write_leg(name: str, settings: dict[str, Any], windows: list[dict[str, float]]) -> Path:
    path = RESULTS / f"cifar10_demo_swap-{name}.json"
    path.write_text(json.dumps({"name": name, "settings": settings, "windows": windows}, indent=2) + "\n")
    return path


def trainer_leg(metrics_path: Path) -> Path:
    """The trainer's own run from the control's initial model (`--logging_steps 10`), as a leg."""
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    windows, start = [], 0
    for row in rows:
        windows.append({"first_step": start + 1, "last_step": row["step"], "loss": row["loss"]})
        start = row["step"]
    run_config = json.loads((metrics_path.parent / "run_config.json").read_text())
    return write_leg("trainer", {"metrics": str(metrics_path), "run_config": run_config}, windows)


def plot_legs(output: Path) -> Path:
    """Every leg's window means against the step, in one panel."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    # A marker and a line style per leg, so that legs which overlap stay visible; repeated past six legs.
    styles = itertools.cycle(zip("os^Dvx", ["-", "--", ":", "-.", (0, (1, 3)), (0, (5, 2))], strict=True))
    for path in sorted(RESULTS.glob("cifar10_demo_swap-*.json")):
        marker, line = next(styles)
        leg = json.loads(path.read_text())
        ends = [window["last_step"] for window in leg["windows"]]
        ax.plot(ends, [window["loss"] for window in leg["windows"]], marker=marker, linestyle=line, label=leg["name"],
                alpha=0.8, markerfacecolor="none")  # fmt: skip
    ax.set(title="Same initial model (the control's seed 0): mean loss of each 10 steps", xlabel="step",
           ylabel="InfoNCE loss")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, output)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--step", choices=["demo", "moco-hf"])
    parser.add_argument("--data", choices=["demo", "moco-hf"])
    parser.add_argument("--augment_on_device", default=True, action=argparse.BooleanOptionalAction)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0, help="the initial weights and queue: the control's draw")
    parser.add_argument(
        "--data_seed",
        type=int,
        default=None,
        help="another data order and augmentation draw (default: the control's, after --seed)",
    )
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16", help="bf16: autocast, as the runs")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--data_dir", default="../shared/data/cifar10")
    parser.add_argument("--trainer_metrics", type=Path, help="record a trainer run's metrics.jsonl as a leg")
    parser.add_argument("--plot", type=Path, help="draw every recorded leg into this PNG")
    args = parser.parse_args()  # fmt: skip
    if args.trainer_metrics:
        print(trainer_leg(args.trainer_metrics))
    elif args.step and args.data:
        print(run_leg(args))
    elif not args.plot:
        parser.error("give --step and --data (a leg to run), --trainer_metrics or --plot")
    if args.plot:
        print(plot_legs(args.plot))


if __name__ == "__main__":
    main()
