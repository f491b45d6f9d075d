"""How hard the demo recipe's two views are to match, made three ways from the same images: moco-hf's batched
on-device augmentation (the trainer's default), its per-image torchvision v2 path (`--augment_on_device false`),
and the official demo's own torchvision v1 transforms on PIL images. One fixed encoder (eval mode) embeds each
pair; the mean cosine of the two views' head embeddings and the in-batch InfoNCE loss (T=0.1) say how different the
views are. Equal augmentations give equal numbers up to sampling noise (the standard error is printed). As the
three pipelines see the same images, each is also compared with the demo's image by image (`vs_demo`: the mean of
the per-image differences in positive cosine and its standard error), which takes the images' own spread out of the
comparison.

    python -m benchmarks.cifar10_reproduction.augmentation_strength --model outputs/cifar10-demo-cpu/model \
        --images 10000
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from moco_hf import MocoModel
from moco_hf.augmentation import build_two_crops
from moco_hf.batched_augmentation import OnDeviceTwoCrops
from moco_hf.data import collate, load_image_dataset
from tests.reference_cifar10_demo import demo_train_transform

from . import RESULTS


def demo_v1_views(images: list, mean: list[float], std: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """The notebook's `train_transform`, applied twice to each PIL image (its CIFAR10Pair)."""
    transform = demo_train_transform(mean, std)
    return torch.stack([transform(im) for im in images]), torch.stack([transform(im) for im in images])


def mean_and_se(values: torch.Tensor) -> tuple[float, float]:
    return values.mean().item(), (values.std() / len(values) ** 0.5).item()


@torch.no_grad()
def embed(model: MocoModel, views: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    return F.normalize(torch.cat([model.encoder_q(part) for part in views.split(chunk)]), dim=1)


def measure(q: torch.Tensor, k: torch.Tensor, positives: torch.Tensor, temperature: float) -> dict[str, float]:
    """Positive cosine and in-batch InfoNCE of L2-normalised view embeddings `q`, `k` (N, D), whose per-image
    cosines are `positives` (N,)."""
    cosine, cosine_se = mean_and_se(positives)
    loss, loss_se = mean_and_se(F.cross_entropy(q @ k.T / temperature, torch.arange(len(q)), reduction="none"))
    return {"positive_cosine": cosine, "positive_cosine_se": cosine_se,
            "in_batch_loss": loss, "in_batch_loss_se": loss_se}  # fmt: skip


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
    embeddings = {name: (embed(model, q), embed(model, k)) for name, (q, k) in views.items()}
    positives = {name: (q * k).sum(dim=1) for name, (q, k) in embeddings.items()}
    demo_positives = positives["official demo (torchvision v1, PIL)"]
    result = {}
    for name, (q, k) in embeddings.items():
        difference, difference_se = mean_and_se(positives[name] - demo_positives)
        result[name] = measure(q, k, positives[name], 0.1) | {
            "pixel_std": views[name][0].std().item(),
            "vs_demo": {"positive_cosine_difference": difference, "se": difference_se},
        }
    result["model"], result["images"] = str(args.model), args.images
    print(json.dumps(result, indent=2))
    (RESULTS / "augmentation_strength-cpu.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
