"""How many points MoCo pretraining buys when labels are few (issue 40): CIFAR-10 classifiers trained on 1% (500)
and 10% (5,000) of the training labels, tested on the 10,000 test images.

Encoders (`--encoder NAME=FOLDER`, saved MocoModels; `random` is built in): a random initialisation of the same
network (ResNet-18, CIFAR stem), the main job's encoder (`bash scripts/pretrain.sh`), a longer pretraining, and a
control that should gain nothing over random (the main job at learning rate 1e-12). Each gets both protocols:

* `finetune`: `MocoForImageClassification` trained whole with `transformers.Trainer` (SGD, momentum 0.9, Nesterov,
  weight decay 5e-4, lr 0.05, cosine to 0, batch 64, bf16 autocast where the CPU has it; random crop with 4-pixel
  padding and horizontal flip), the same step budget for every encoder;
* `linear`: the backbone frozen (`moco_hf.linear_probe`: features of the centre view, standardised, a linear layer
  trained 100 epochs with SGD); the random encoder's BatchNorm statistics are first calibrated on training images
  (`moco_hf.batch_norm_calibration`), as every random baseline of moco-hf is.

Label subsets are class-balanced and seeded (`--seeds`; seed s also seeds the classifier and the batch order). The
settings above were fixed before any run from the usual CIFAR ResNet recipe and were not tuned: no choice looked at
the test images (nor at any held-out split: there was none to make). Results go to `results/low_label-cpu.json`
after every run (a rerun skips the rows it has) and `plot` draws `results/low_label-cpu.png`.

The encoders of `results/low_label-cpu.json` (its `commands` list the runs): the main job of
`python -m benchmarks.main_job_recipe confirm` (seed 0) and its learning-rate-1e-12 control, and
`python training/pretrain.py --preset cifar10-demo --num_train_epochs 4 --mixed_precision bf16
--output_dir outputs/low_label/cifar10-demo-4ep` (the demo's per-epoch cosine: its 4th epoch runs at lr 0). Then

    python -m benchmarks.low_label run --encoder main-job=M --encoder cifar10-demo-4ep=D --encoder control=C \\
        --protocols linear
    python -m benchmarks.low_label run --encoder main-job=M --encoder cifar10-demo-4ep=D --protocols finetune
    python -m benchmarks.low_label plot
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms import v2

from .common import CIFAR10, RESULTS, machine

ROOT = Path(__file__).resolve().parents[1]
RESULT_FILE = RESULTS / "low_label-cpu.json"
WORK = ROOT / "outputs" / "low_label"
FRACTIONS = {"1%": 50, "10%": 500}  # labelled images per class (CIFAR-10 has 5,000 per class)
FINETUNE_STEPS = {"1%": 160, "10%": 240}  # ~20 epochs of 500 images, ~3 of 5,000, at batch 64 (~5 min on 2 cores)
FINETUNE = {"batch_size": 64, "learning_rate": 0.05, "momentum": 0.9, "weight_decay": 5e-4}
RANDOM = "random"


def cifar10_tensors(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3, 32, 32) uint8 images and (N,) labels of a CIFAR-10 split, decoded once and cached under outputs/."""
    cache = WORK / f"cifar10-{split}-uint8.pt"
    if not cache.exists():
        from datasets import load_dataset

        rows = load_dataset(CIFAR10, split=split)
        images = torch.stack([v2.functional.pil_to_tensor(row["image"].convert("RGB")) for row in rows])
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"images": images, "labels": torch.tensor(rows["label"])}, cache)
    stored = torch.load(cache)
    return stored["images"], stored["labels"]


def label_subset(labels: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
    """`per_class` indices of each class, drawn without replacement by a seeded generator, in a shuffled order."""
    generator = np.random.default_rng(seed)
    chosen = [generator.choice(np.flatnonzero(labels.numpy() == c), per_class, replace=False)
              for c in range(int(labels.max()) + 1)]  # fmt: skip
    return torch.from_numpy(generator.permutation(np.concatenate(chosen)))


class LabelledImages(torch.utils.data.Dataset):
    """uint8 images made into normalised `pixel_values` (augmented when `train`) with their `labels`."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean, std, train: bool) -> None:
        self.images, self.labels = images, labels
        augment = [v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()] if train else []
        self.transform = v2.Compose([*augment, v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.transform(self.images[index]), "labels": self.labels[index]}


def classifier_for(encoder: str, folders: dict[str, Path], seed: int):
    """A 10-class MocoForImageClassification on the encoder's backbone (a new one for `random`)."""
    from moco_hf import MocoConfig, MocoForImageClassification

    torch.manual_seed(seed)
    names = dict(enumerate(["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]))
    if encoder == RANDOM:
        config = MocoConfig.from_preset("v2", backbone="resnet18", cifar_stem=True, image_size=32,
                                        image_mean=[0.4913, 0.4821, 0.4465], image_std=[0.2452, 0.2428, 0.2606],
                                        num_labels=10, id2label=names)  # fmt: skip
        return MocoForImageClassification(config)
    return MocoForImageClassification.from_pretrained(folders[encoder], num_labels=10, id2label=names)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 in percent, computed by the package's `evaluate` metric."""
    from moco_hf.linear_probe import top_k_accuracies

    return top_k_accuracies(torch.nn.Identity(), logits.float(), labels, ks=(1,))["top1"]


def bf16_autocast() -> bool:
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def finetune(model, train: LabelledImages, test: LabelledImages, steps: int, seed: int, output_dir: Path) -> float:
    """Train the whole classifier for `steps` SGD steps with `transformers.Trainer`; top-1 on `test`."""
    from transformers import Trainer, TrainingArguments, get_cosine_schedule_with_warmup

    settings = FINETUNE
    optimizer = torch.optim.SGD(model.parameters(), lr=settings["learning_rate"], momentum=settings["momentum"],
                                nesterov=True, weight_decay=settings["weight_decay"])  # fmt: skip
    schedule = get_cosine_schedule_with_warmup(optimizer, 0, steps)
    args = TrainingArguments(output_dir=str(output_dir), per_device_train_batch_size=settings["batch_size"],
                             per_device_eval_batch_size=500, max_steps=steps, seed=seed, bf16=bf16_autocast(),
                             use_cpu=True, report_to="none", save_strategy="no", logging_steps=40,
                             dataloader_drop_last=True, disable_tqdm=True)  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=train, optimizers=(optimizer, schedule))
    trainer.train()
    prediction = trainer.predict(test)
    return accuracy(torch.from_numpy(prediction.predictions), test.labels)


def linear_protocol(model, images: torch.Tensor, labels: torch.Tensor, subsets: dict, test: LabelledImages,
                    calibrate: bool) -> dict[tuple[str, int], float]:  # fmt: skip
    """Frozen backbone: L2-normalised features of the centre views, a linear classifier per subset; top-1 on test."""
    import torch.nn.functional as F

    from moco_hf.batch_norm_calibration import calibrate_batch_norm
    from moco_hf.linear_probe import LinearArguments, top_k_accuracies, train_linear_classifier

    config = model.config
    backbone = model.backbone.eval()
    if calibrate:  # the random encoder's statistics, from augmented unlabelled training images
        augmented = LabelledImages(images, labels, config.image_mean, config.image_std, train=True)
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))[:4096]
        calibrate_batch_norm(backbone, (torch.stack([augmented[int(i)]["pixel_values"] for i in chunk])
                                        for chunk in order.split(256)))  # fmt: skip

    @torch.no_grad()
    def features(dataset: LabelledImages) -> torch.Tensor:
        parts = []
        for start in range(0, len(dataset), 500):
            batch = torch.stack([dataset[i]["pixel_values"] for i in range(start, min(start + 500, len(dataset)))])
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16_autocast()):
                parts.append(F.normalize(backbone(batch).float(), dim=1))
        return torch.cat(parts)

    test_features = features(test)
    results = {}
    for (fraction, seed), subset in subsets.items():
        train = LabelledImages(images[subset], labels[subset], config.image_mean, config.image_std, train=False)
        classifier = train_linear_classifier(features(train), train.labels, 10, LinearArguments(), seed=seed)
        results[fraction, seed] = top_k_accuracies(classifier, test_features, test.labels, ks=(1,))["top1"]
    return results


def load() -> dict:
    if RESULT_FILE.exists():
        return json.loads(RESULT_FILE.read_text())
    return {"benchmark": "low_label", "rows": []}


def save(results: dict, settings: dict) -> None:
    results.update(machine=machine(), settings=settings, summary=summarise(results["rows"]))
    RESULTS.mkdir(parents=True, exist_ok=True)
    RESULT_FILE.write_text(json.dumps(results, indent=2))


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and sd over seeds of each (protocol, fraction, encoder), and the gain over random with its sd (seeds
    paired: the same label subset for both encoders)."""
    by_key: dict[tuple, dict[int, float]] = {}
    for row in rows:
        by_key.setdefault((row["protocol"], row["fraction"], row["encoder"]), {})[row["seed"]] = row["top1"]
    summary = []
    for (protocol, fraction, encoder), by_seed in sorted(by_key.items()):
        values = list(by_seed.values())
        random = by_key.get((protocol, fraction, RANDOM), {})
        gains = [by_seed[seed] - random[seed] for seed in by_seed if seed in random]
        summary.append({
            "protocol": protocol, "fraction": fraction, "encoder": encoder, "seeds": sorted(by_seed),
            "top1_mean": statistics.mean(values), "top1_sd": statistics.stdev(values) if len(values) > 1 else None,
            "gain_over_random_mean": statistics.mean(gains) if gains and encoder != RANDOM else None,
            "gain_over_random_sd": statistics.stdev(gains) if len(gains) > 1 and encoder != RANDOM else None,
        })  # fmt: skip
    return summary


def run(folders: dict[str, Path], seeds: list[int], protocols: list[str]) -> None:
    images, labels = cifar10_tensors("train")
    test_images, test_labels = cifar10_tensors("test")
    subsets = {(fraction, seed): label_subset(labels, per_class, seed)
               for seed in seeds for fraction, per_class in FRACTIONS.items()}  # fmt: skip
    encoders = [RANDOM, *folders]
    settings = {"fractions_per_class": FRACTIONS, "finetune_steps": FINETUNE_STEPS, "finetune": FINETUNE,
                "bf16_autocast": bf16_autocast(), "encoders": {RANDOM: "new MocoForImageClassification (v2 config)",
                **{name: str(folder.relative_to(ROOT) if folder.is_relative_to(ROOT) else folder)
                   for name, folder in folders.items()}}}  # fmt: skip
    results = load()
    settings["encoders"] = {**results.get("settings", {}).get("encoders", {}), **settings["encoders"]}
    command = " ".join(["python -m benchmarks.low_label", *sys.argv[1:]])
    results["commands"] = [*dict.fromkeys([*results.get("commands", []), command])]
    done = {(row["protocol"], row["fraction"], row["encoder"], row["seed"]) for row in results["rows"]}

    def record(protocol: str, fraction: str, encoder: str, seed: int, top1: float, seconds: float) -> None:
        results["rows"].append({"protocol": protocol, "fraction": fraction, "encoder": encoder, "seed": seed,
                                "labelled_images": FRACTIONS[fraction] * 10, "top1": top1,
                                "seconds": round(seconds, 1)})  # fmt: skip
        save(results, settings)
        print(f"{protocol:8} {fraction:>3} {encoder:20} seed {seed}: {top1:.2f}% ({seconds:.0f} s)", flush=True)

    if "linear" in protocols:
        for encoder in encoders:
            wanted = {(fraction, seed): subset for (fraction, seed), subset in subsets.items()
                      if ("linear", fraction, encoder, seed) not in done}  # fmt: skip
            if not wanted:
                continue
            start = time.perf_counter()
            model = classifier_for(encoder, folders, seed=0)
            test = LabelledImages(test_images, test_labels, model.config.image_mean, model.config.image_std, False)
            measured = linear_protocol(model, images, labels, wanted, test, calibrate=encoder == RANDOM)
            for (fraction, seed), top1 in measured.items():
                record("linear", fraction, encoder, seed, top1, (time.perf_counter() - start) / len(measured))
    if "finetune" in protocols:
        for seed in seeds:  # seed-major, so that a stopped run leaves every encoder measured on the same subsets
            for fraction in FRACTIONS:
                for encoder in encoders:
                    if ("finetune", fraction, encoder, seed) in done:
                        continue
                    start = time.perf_counter()
                    model = classifier_for(encoder, folders, seed)
                    mean, std = model.config.image_mean, model.config.image_std
                    subset = subsets[fraction, seed]
                    train = LabelledImages(images[subset], labels[subset], mean, std, train=True)
                    test = LabelledImages(test_images, test_labels, mean, std, train=False)
                    top1 = finetune(model, train, test, FINETUNE_STEPS[fraction], seed, WORK / "finetune")
                    record("finetune", fraction, encoder, seed, top1, time.perf_counter() - start)


def plot() -> None:
    """Bars of mean top-1 (error bars: sd over seeds) per encoder, for each protocol and label fraction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = load()["summary"]
    panels = sorted({(row["protocol"], row["fraction"]) for row in summary}, key=lambda key: (key[0], len(key[1])))
    encoders = list(dict.fromkeys(row["encoder"] for row in summary))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.8), sharey=True, squeeze=False)
    for axis, (protocol, fraction) in zip(axes[0], panels, strict=True):
        rows = {row["encoder"]: row for row in summary if (row["protocol"], row["fraction"]) == (protocol, fraction)}
        shown = [name for name in encoders if name in rows]
        axis.bar(shown, [rows[name]["top1_mean"] for name in shown],
                 yerr=[rows[name]["top1_sd"] or 0 for name in shown], capsize=4,
                 color=["tab:gray" if name in (RANDOM, "control") else "tab:blue" for name in shown])  # fmt: skip
        for index, name in enumerate(shown):
            axis.annotate(f"{rows[name]['top1_mean']:.1f}", (index, rows[name]["top1_mean"]), xytext=(0, 3),
                          textcoords="offset points", ha="center", fontsize=8)  # fmt: skip
        axis.set_title(f"{protocol}, {fraction} labels (n={len(rows[shown[0]]['seeds'])} seeds)")
        axis.tick_params(axis="x", labelrotation=30)
    axes[0][0].set_ylabel("CIFAR-10 test top-1 (%)")
    fig.tight_layout()
    fig.savefig(RESULT_FILE.with_suffix(".png"), dpi=110)
    print(RESULT_FILE.with_suffix(".png"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    stages = parser.add_subparsers(dest="stage", required=True)
    running = stages.add_parser("run", help="train and test the classifiers (skips rows already in the results)")
    running.add_argument(
        "--encoder",
        action="append",
        default=[],
        metavar="NAME=FOLDER",
        help="a saved MocoModel to compare with the random initialisation (repeatable)",
    )
    running.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    running.add_argument("--protocols", nargs="+", choices=("linear", "finetune"), default=["linear", "finetune"])
    stages.add_parser("plot", help="the figure of the result file")
    args = parser.parse_args(argv)
    if args.stage == "plot":
        plot()
        return
    folders = dict(item.split("=", 1) for item in args.encoder)
    run({name: Path(folder).resolve() for name, folder in folders.items()}, args.seeds, args.protocols)


if __name__ == "__main__":
    main()
