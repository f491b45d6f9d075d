"""How much bf16 autocast changes a MoCo step on this CPU: the loss and the query encoder's gradient of the same
batch (same views, same key-encoder shuffle) in fp32 and under bf16 autocast, beside the difference between two
batches in fp32 (the scale of SGD's own noise). A check of one candidate cause of a gap to an fp32 reference run.

    python -m benchmarks.cifar10_reproduction.bf16_gradient_agreement --model outputs/cifar10-demo-cpu/model
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from moco_hf import MocoModel
from moco_hf.augmentation import build_two_crops
from moco_hf.data import load_image_dataset

from . import RESULTS


def gradient(model: MocoModel, query: torch.Tensor, key: torch.Tensor, bf16: bool) -> tuple[float, torch.Tensor]:
    """The loss and the flattened query-encoder gradient of one step, on a copy (the queue is left as it was)."""
    model = copy.deepcopy(model).train()
    torch.manual_seed(0)  # the same key-encoder batch shuffle in both precisions
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(pixel_values=query, key_pixel_values=key).loss
    loss.backward()
    grads = [p.grad.flatten() for p in model.encoder_q.parameters() if p.grad is not None]
    return loss.item(), torch.cat(grads).double()  # float64: a cosine over 11M entries needs it


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="A MocoModel folder (e.g. a demo run's model).")
    parser.add_argument("--data_dir", default="../shared/data/cifar10")
    parser.add_argument("--batch_size", type=int, default=512)
    args = parser.parse_args()

    model = MocoModel.from_pretrained(args.model)
    config = model.config
    two_crops = build_two_crops(config.augmentation, config.image_size, config.image_mean, config.image_std)
    rows = load_image_dataset(args.data_dir, "train", streaming=False).select(range(2 * args.batch_size))
    torch.manual_seed(1)
    views = [two_crops(row["image"].convert("RGB")) for row in rows]
    batches = [
        tuple(torch.stack([v[i] for v in views[b * args.batch_size : (b + 1) * args.batch_size]]) for i in (0, 1))
        for b in (0, 1)
    ]
    loss_fp32, grad_fp32 = gradient(model, *batches[0], bf16=False)
    loss_bf16, grad_bf16 = gradient(model, *batches[0], bf16=True)
    _, grad_other = gradient(model, *batches[1], bf16=False)
    result = {
        "model": str(args.model),
        "batch_size": args.batch_size,
        "loss_fp32": loss_fp32,
        "loss_bf16": loss_bf16,
        "cosine_bf16_vs_fp32_same_batch": F.cosine_similarity(grad_bf16, grad_fp32, dim=0).item(),
        "relative_norm_of_difference": ((grad_bf16 - grad_fp32).norm() / grad_fp32.norm()).item(),
        "cosine_fp32_batch_a_vs_batch_b": F.cosine_similarity(grad_fp32, grad_other, dim=0).item(),
        "torch": torch.__version__,
    }
    print(json.dumps(result, indent=2))
    (RESULTS / "bf16_gradient_agreement-cpu.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
