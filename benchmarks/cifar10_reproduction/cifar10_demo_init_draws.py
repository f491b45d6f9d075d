"""Do moco-hf's fresh cifar10-demo models start where the demo's do? The first forward pass of many initial draws.

Per-tensor statistics of the weights can agree while the networks they make do not, so this compares what the
networks compute: for `--draws` seeds each, the demo's `ModelMoCo` (torchvision's ResNet-18 init, carried into
moco-hf's names) and moco-hf's `MocoModel` of the cifar10-demo preset (timm's init) encode one batch of real
CIFAR-10 views (moco-hf's loader, seed 0) in training mode under bf16 autocast: the InfoNCE loss against the random
initial queue, the positive logit q.k+/T, and the mean cosine between the queries of different images (how collapsed
the random features are). Means and standard deviations over draws, in `benchmarks/results/`.

    python -m benchmarks.cifar10_reproduction.cifar10_demo_init_draws --draws 24
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from moco_hf import MocoConfig, MocoModel
from tests.reference_cifar10_demo import ModelMoCo, autocast, demo_as_moco_model

from . import RESULTS
from .cifar10_demo_swap import moco_hf_batches


@torch.no_grad()
def first_forward(model: MocoModel, query: torch.Tensor, key: torch.Tensor) -> dict[str, float]:
    with autocast("bf16"):
        output = model.train()(pixel_values=query, key_pixel_values=key)
    queries = output.q.float()
    off_diagonal = (queries @ queries.T).fill_diagonal_(0).sum() / (len(queries) * (len(queries) - 1))
    return {"loss": output.loss.item(), "positive_logit": output.logits[:, 0].float().mean().item(),
            "query_cosine": off_diagonal.item()}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=24)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--data_dir", default="../shared/data/cifar10")
    args = parser.parse_args()
    query, key = (views[: args.images] for views in next(moco_hf_batches(args.data_dir, 0, 0, True)))
    draws: dict[str, list[dict[str, float]]] = {"demo (torchvision init)": [], "moco-hf (timm init)": []}
    for seed in range(100, 100 + args.draws):
        torch.manual_seed(seed)
        draws["demo (torchvision init)"].append(first_forward(demo_as_moco_model(ModelMoCo(K=4096)), query, key))
        torch.manual_seed(seed)
        draws["moco-hf (timm init)"].append(
            first_forward(MocoModel(MocoConfig.from_preset("cifar10-demo")), query, key)
        )
    summary = {
        name: {metric: {"mean": statistics.mean(row[metric] for row in rows),
                        "sd": statistics.stdev(row[metric] for row in rows)} for metric in rows[0]}
        for name, rows in draws.items()
    }  # fmt: skip
    print(json.dumps(summary, indent=2))
    result = {"settings": vars(args), "summary": summary, "draws": draws}
    (RESULTS / "cifar10_demo_init_draws-cpu.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
