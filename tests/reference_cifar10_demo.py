"""The official CIFAR-10 demo's own code, transcribed: facebookresearch/moco's `colab/moco_cifar10_demo.ipynb`
(colab-notebook branch, f7364915): its ModelBase (torchvision ResNet-18 with a 3x3 conv1, no max-pool, fc 512 -> 128),
SplitBatchNorm, ModelMoCo with the single-GPU batch shuffle, its PIL transforms, SGD with its per-epoch cosine and
its weighted kNN monitor, with nothing from `moco_hf`; and the map from its weights to a `MocoModel`'s.

The tests compare moco-hf with it (tests/test_cifar_stem.py, test_modeling.py); the reproduction study runs it as
its control (`python -m benchmarks.cifar10_reproduction.cifar10_demo_notebook`).
"""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from datasets import load_dataset
from PIL import Image
from torch import nn
from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.models import resnet
from torchvision.transforms import v2

from moco_hf import MocoConfig, MocoModel  # the map from the demo's weights to moco-hf's (the transcription uses none)

DEMO_MEAN, DEMO_STD = [0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010]


def demo_train_transform(mean: list[float] = DEMO_MEAN, std: list[float] = DEMO_STD,
                         ops: str = "v1") -> transforms.Compose:  # fmt: skip
    """The notebook's `train_transform`: torchvision v1 ops on PIL images, or (`ops="v2"`) the same ops from
    `torchvision.transforms.v2` on uint8 tensors, as moco-hf's per-image path applies them."""
    library = transforms if ops == "v1" else v2
    to_tensor = [transforms.ToTensor()] if ops == "v1" else [v2.ToDtype(torch.float32, scale=True)]
    return library.Compose([
        *([] if ops == "v1" else [v2.ToImage()]),
        library.RandomResizedCrop(32),
        library.RandomHorizontalFlip(p=0.5),
        library.RandomApply([library.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        library.RandomGrayscale(p=0.2),
        *to_tensor,
        library.Normalize(mean, std)])  # fmt: skip


class CifarArrays(Dataset):
    """The notebook's CIFAR10 / CIFAR10Pair over uint8 arrays: two views when `pair`, else (image, label)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: transforms.Compose, pair: bool) -> None:
        self.images, self.labels, self.transform, self.pair = images, labels, transform, pair

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        image = Image.fromarray(self.images[index])
        if self.pair:
            return self.transform(image), self.transform(image)
        return self.transform(image), int(self.labels[index])


class SplitBatchNorm(nn.BatchNorm2d):
    def __init__(self, num_features: int, num_splits: int, **kw) -> None:
        super().__init__(num_features, **kw)
        self.num_splits = num_splits

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        N, C, H, W = input.shape
        if self.training or not self.track_running_stats:
            running_mean_split = self.running_mean.repeat(self.num_splits)
            running_var_split = self.running_var.repeat(self.num_splits)
            outcome = F.batch_norm(
                input.view(-1, C * self.num_splits, H, W), running_mean_split, running_var_split,
                self.weight.repeat(self.num_splits), self.bias.repeat(self.num_splits),
                True, self.momentum, self.eps).view(N, C, H, W)  # fmt: skip
            self.running_mean.data.copy_(running_mean_split.view(self.num_splits, C).mean(dim=0))
            self.running_var.data.copy_(running_var_split.view(self.num_splits, C).mean(dim=0))
            return outcome
        return F.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias, False, self.momentum,
                            self.eps)  # fmt: skip


class ModelBase(nn.Module):
    def __init__(self, feature_dim: int = 128, bn_splits: int = 8) -> None:
        super().__init__()
        norm_layer = partial(SplitBatchNorm, num_splits=bn_splits) if bn_splits > 1 else nn.BatchNorm2d
        net = resnet.resnet18(num_classes=feature_dim, norm_layer=norm_layer)
        layers = []
        for name, module in net.named_children():
            if name == "conv1":
                module = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            if isinstance(module, nn.MaxPool2d):
                continue
            if isinstance(module, nn.Linear):
                layers.append(nn.Flatten(1))
            layers.append(module)
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ModelMoCo(nn.Module):
    def __init__(self, dim: int = 128, K: int = 4096, m: float = 0.99, T: float = 0.1, bn_splits: int = 8) -> None:
        super().__init__()
        self.K, self.m, self.T = K, m, T
        self.encoder_q = ModelBase(feature_dim=dim, bn_splits=bn_splits)
        self.encoder_k = ModelBase(feature_dim=dim, bn_splits=bn_splits)
        for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters(), strict=True):
            param_k.data.copy_(param_q.data)
            param_k.requires_grad = False
        self.register_buffer("queue", F.normalize(torch.randn(dim, K), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def _momentum_update_key_encoder(self) -> None:
        for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters(), strict=True):
            param_k.data = param_k.data * self.m + param_q.data * (1.0 - self.m)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys: torch.Tensor) -> None:
        batch_size = keys.shape[0]
        ptr = int(self.queue_ptr)
        assert self.K % batch_size == 0
        self.queue[:, ptr : ptr + batch_size] = keys.t()
        self.queue_ptr[0] = (ptr + batch_size) % self.K

    def contrastive_loss(self, im_q: torch.Tensor, im_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = F.normalize(self.encoder_q(im_q), dim=1)
        with torch.no_grad():
            idx_shuffle = torch.randperm(im_k.shape[0])
            idx_unshuffle = torch.argsort(idx_shuffle)
            k = F.normalize(self.encoder_k(im_k[idx_shuffle]), dim=1)[idx_unshuffle]
        l_pos = torch.einsum("nc,nc->n", [q, k]).unsqueeze(-1)
        l_neg = torch.einsum("nc,ck->nk", [q, self.queue.clone().detach()])
        logits = torch.cat([l_pos, l_neg], dim=1) / self.T
        labels = torch.zeros(logits.shape[0], dtype=torch.long)
        return nn.CrossEntropyLoss()(logits, labels), k

    def forward(self, im1: torch.Tensor, im2: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self._momentum_update_key_encoder()
        loss, k = self.contrastive_loss(im1, im2)
        self._dequeue_and_enqueue(k)
        return loss


def knn_predict(feature, feature_bank, feature_labels, classes: int, knn_k: int, knn_t: float) -> torch.Tensor:
    sim_matrix = torch.mm(feature, feature_bank)
    sim_weight, sim_indices = sim_matrix.topk(k=knn_k, dim=-1)
    sim_labels = torch.gather(feature_labels.expand(feature.size(0), -1), dim=-1, index=sim_indices)
    sim_weight = (sim_weight / knn_t).exp()
    one_hot_label = torch.zeros(feature.size(0) * knn_k, classes)
    one_hot_label = one_hot_label.scatter(dim=-1, index=sim_labels.view(-1, 1), value=1.0)
    pred_scores = torch.sum(one_hot_label.view(feature.size(0), -1, classes) * sim_weight.unsqueeze(dim=-1), dim=1)
    return pred_scores.argsort(dim=-1, descending=True)


def autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


def train_epoch(net, loader, optimizer, epoch: int, epochs: int, lr: float, precision: str) -> float:
    net.train()
    for group in optimizer.param_groups:
        group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    total_loss, total_num = 0.0, 0
    for step, (im_1, im_2) in enumerate(loader, 1):
        with autocast(precision):
            loss = net(im_1, im_2)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total_num += loader.batch_size
        total_loss += loss.item() * loader.batch_size
        if step % 10 == 0:
            print(f"epoch {epoch} step {step}/{len(loader)} loss {total_loss / total_num:.4f}", flush=True)
    return total_loss / total_num


@torch.no_grad()
def knn_test(net, memory_loader, test_loader, precision: str, knn_k: int = 200, knn_t: float = 0.1) -> float:
    net.eval()
    with autocast(precision):
        bank = torch.cat([F.normalize(net(data).float(), dim=1) for data, _ in memory_loader]).t().contiguous()
    bank_labels = torch.cat([target for _, target in memory_loader])
    total_top1 = total_num = 0
    for data, target in test_loader:
        with autocast(precision):
            feature = F.normalize(net(data).float(), dim=1)
        pred_labels = knn_predict(feature, bank, bank_labels, 10, knn_k, knn_t)
        total_num += data.size(0)
        total_top1 += (pred_labels[:, 0] == target).float().sum().item()
    return total_top1 / total_num * 100


def cifar_arrays(data_dir: str, split: str, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    rows = load_dataset(data_dir, split=split)
    if limit:
        rows = rows.select(range(limit))
    images = np.stack([np.asarray(image.convert("RGB")) for image in rows["image"]])
    return images, np.asarray(rows["label"])


DEMO_LAYERS = {"0": "backbone.conv1", "1": "backbone.bn1", "3": "backbone.layer1", "4": "backbone.layer2",
               "5": "backbone.layer3", "6": "backbone.layer4", "9": "head"}  # fmt: skip


def demo_state_in_our_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A `ModelMoCo` state dict with `MocoModel`'s keys (the demo's queue is dim x K, ours K x dim)."""
    ours = {"queue": state["queue"].T.contiguous(), "queue_ptr": state["queue_ptr"]}
    for key, value in state.items():
        if key.startswith("encoder_"):
            encoder, _, index, *rest = key.split(".")
            ours[".".join([encoder, DEMO_LAYERS[index], *rest])] = value
    return ours


def demo_as_moco_model(demo: ModelMoCo) -> MocoModel:
    """`demo`'s weights, BatchNorm statistics and queue in a MocoModel of the cifar10-demo preset."""
    model = MocoModel(MocoConfig.from_preset("cifar10-demo", queue_size=demo.K))
    model.load_state_dict(demo_state_in_our_names(demo.state_dict()))
    return model
