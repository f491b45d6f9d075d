"""Shared fixtures: offline Hub, the real CIFAR-10 images in ../shared/data, small models."""

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
CIFAR10_DIR = REPO_ROOT.parent / "shared" / "data" / "cifar10"

# Per-channel statistics of CIFAR-10's train split (../shared/data/README.md).
CIFAR_MEAN = torch.tensor([0.4913, 0.4821, 0.4465]).view(1, 3, 1, 1)
CIFAR_STD = torch.tensor([0.2452, 0.2428, 0.2606]).view(1, 3, 1, 1)


@pytest.fixture(scope="session")
def cifar10_dir() -> Path:
    if not CIFAR10_DIR.is_dir():
        pytest.fail(f"The real CIFAR-10 data is expected at {CIFAR10_DIR} (see ../shared/data/README.md).")
    return CIFAR10_DIR


@pytest.fixture(scope="session")
def cifar_images(cifar10_dir: Path) -> tuple[list, list[int]]:
    """The first 512 images of CIFAR-10's test split (PIL) and their labels, read with `datasets`."""
    from datasets import load_dataset

    stream = load_dataset(str(cifar10_dir), split="test", streaming=True)
    rows = list(stream.take(512))
    return [row["image"].convert("RGB") for row in rows], [row["label"] for row in rows]


@pytest.fixture(scope="session")
def cifar_tensor(cifar_images) -> torch.Tensor:
    """(512, 3, 32, 32) normalised CIFAR-10 test images."""
    from torchvision.transforms.v2.functional import pil_to_tensor

    images = torch.stack([pil_to_tensor(img) for img in cifar_images[0]]).float() / 255.0
    return (images - CIFAR_MEAN) / CIFAR_STD


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
