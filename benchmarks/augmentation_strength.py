"""How hard the demo recipe's two views are to match, made three ways from the same images: moco-hf's batched
on-device augmentation (the trainer's default), its per-image torchvision v2 path (`--augment_on_device false`),
and the official demo's own torchvision v1 transforms on PIL images. One fixed encoder (eval mode) embeds each
pair; the mean cosine of the two views' head embeddings and the in-batch InfoNCE loss (T=0.1) say how different the
views are. Equal augmentations give equal numbers up to sampling noise (the standard error is printed).

    python benchmarks/augmentation_strength.py --model outputs/cifar10-demo-cpu/model
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from the repository root
import torch
import torch.nn.functional as F

from benchmarks.cifar10_demo_notebook import demo_train_transform
from benchmarks.common import RESULTS
from moco_hf import MocoModel
from moco_hf.augmentation import build_two_crops
from moco_hf.batched_augmentation import OnDeviceTwoCrops
from moco_hf.data import collate, load_image_dataset


def demo_v1_views(images: list, mean: list[float], std: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """The notebook's `train_transform`, applied twice to each PIL image (its CIFAR10Pair)."""
    transform = demo_train_transform(mean, std)
    return torch.stack([transform(im) for im in images]), torch.stack([transform(im) for im in images])


def measure(model: MocoModel, query: torch.Tensor, key: torch.Tensor, temperature: float) -> dict[str, float]:
    with torch.no_grad():
        q = F.normalize(model.encoder_q(query), dim=1)
        k = F.normalize(model.encoder_q(key), dim=1)
    cosines = (q * k).sum(dim=1)
    loss = F.cross_entropy(q @ k.T / temperature, torch.arange(len(q)), reduction="none")
    return {"positive_cosine": cosines.mean().item(), "positive_cosine_se": (cosines.std() / len(q) ** 0.5).item(),
            "in_batch_loss": loss.mean().item(), "in_batch_loss_se": (loss.std() / len(q) ** 0.5).item(),
            "pixel_std": query.std().item()}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data_dir", default="../shared/data/cifar10")
    parser.add_argument("--images", type=int, default=2048)
    args = parser.parse_args()

    model = MocoModel.from_pretrained(args.model).eval()
    config = model.config
    mean, std = list(config.image_mean), list(config.image_std)
    images = [row["image"].convert("RGB") for row in load_image_dataset(args.data_dir, "train", False).select(
        range(args.images))]  # fmt: skip
    on_device = OnDeviceTwoCrops(config.augmentation, config.image_size, mean, std)
    per_image = build_two_crops(config.augmentation, config.image_size, mean, std)
    torch.manual_seed(0)
    batch = collate([on_device.loader_item(image, seed) for seed, image in enumerate(images)])
    views = {
        "moco-hf on device (default)": on_device.on_device(batch, torch.device("cpu")),
        "moco-hf per image (torchvision v2)": tuple(
            torch.stack(v) for v in zip(*[per_image(image) for image in images], strict=True)
        ),
        "official demo (torchvision v1, PIL)": demo_v1_views(images, mean, std),
    }
    result = {name: measure(model, q, k, 0.1) for name, (q, k) in views.items()}
    result["model"], result["images"] = str(args.model), args.images
    print(json.dumps(result, indent=2))
    (RESULTS / "augmentation_strength-cpu.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
