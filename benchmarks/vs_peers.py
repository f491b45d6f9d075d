#!/usr/bin/env python
"""Our MoCo training step against peers on the same backbone, batch, queue size and precision:

* `lightly`'s MoCo (`MoCoProjectionHead` + `update_momentum` + `NTXentLoss(memory_bank_size=...)`, its
  MemoryBankModule queue), as in lightly's own MoCo example;
* a faithful port of the official facebookresearch/moco builder (Python loop of `.data` momentum updates, queue
  `dim x K`), the transcription our tests check `MocoModel` against (`tests/reference_moco.py`).

All single-process without batch shuffle (the official code's shuffle needs several GPUs; lightly has none), so
we run `shuffle_bn="none"` too. Interleaved repetitions in one process; ratios of medians. Peak memory of each in
a fresh process (CPU: peak RSS; GPU: the allocator's peak).

    pip install -e ".[bench]" && python -m benchmarks.vs_peers
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch
from torch import nn

from moco_hf import MocoConfig, MocoModel
from tests.reference_moco import ReferenceMoCo

from .common import (
    device_of_choice,
    interleaved_timings,
    last_number_printed_by,
    peak_memory_mib,
    write_results,
)

PEERS = ("moco-hf", "official port", "lightly")


def build_step(name: str, args: argparse.Namespace, device: torch.device):
    """A closure doing one full training step (forward, loss, backward, optimizer step) of `name`."""
    torch.manual_seed(0)
    shape = (args.batch_size, 3, args.image_size, args.image_size)
    im_q, im_k = torch.randn(shape, device=device), torch.randn(shape, device=device)
    config = MocoConfig.from_preset("v2", backbone=args.backbone, queue_size=args.queue_size, shuffle_bn="none")
    ours = MocoModel(config).to(device).train()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)

    if name == "moco-hf":
        optimizer = torch.optim.SGD(ours.encoder_q.parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4)

        def step() -> None:
            with autocast:
                loss = ours(pixel_values=im_q, key_pixel_values=im_k).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    if name == "official port":
        queue = nn.functional.normalize(torch.randn(args.queue_size, config.dim, device=device), dim=1)
        official = ReferenceMoCo(ours.encoder_q, queue, m=config.momentum, T=config.softmax_temperature).to(device)
        optimizer = torch.optim.SGD(official.encoder_q.parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4)

        def step() -> None:
            with autocast:
                logits, labels = official(im_q, im_k)
                loss = nn.functional.cross_entropy(logits.float(), labels.to(device))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    from lightly.loss import NTXentLoss
    from lightly.models.modules import MoCoProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum

    backbone = ours.encoder_q.backbone
    head = MoCoProjectionHead(backbone.num_features, backbone.num_features, config.dim).to(device)
    backbone_k, head_k = copy.deepcopy(backbone), copy.deepcopy(head)
    deactivate_requires_grad(backbone_k)
    deactivate_requires_grad(head_k)
    criterion = NTXentLoss(temperature=config.softmax_temperature, memory_bank_size=(args.queue_size, config.dim))
    optimizer = torch.optim.SGD([*backbone.parameters(), *head.parameters()], lr=0.03, momentum=0.9, weight_decay=1e-4)

    def step() -> None:
        update_momentum(backbone, backbone_k, m=config.momentum)
        update_momentum(head, head_k, m=config.momentum)
        with autocast:
            query = head(backbone(im_q))
            with torch.no_grad():
                key = head_k(backbone_k(im_k))
            loss = criterion(query, key)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--queue_size", type=int, default=4096)
    parser.add_argument("--bf16", action="store_true", help="Run every peer under bf16 autocast.")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--only", choices=PEERS, help="Run a few steps of one peer (memory measurement).")
    args = parser.parse_args()
    device = device_of_choice()
    if args.only:
        step = build_step(args.only, args, device)
        step()
        print(peak_memory_mib(device, lambda: [step() for _ in range(3)]))
        return

    timings = interleaved_timings({n: build_step(n, args, device) for n in PEERS}, args.repeats, args.warmup, device)
    rows = []
    for name in PEERS:
        memory = last_number_printed_by([__file__, *sys.argv[1:], "--only", name])
        median = timings[name]["median_s"]
        rows.append({
            "implementation": name,
            "median_ms": 1e3 * median,
            "min_ms": 1e3 * timings[name]["min_s"],
            "time_vs_moco_hf": median / timings["moco-hf"]["median_s"],
            "peak_memory_mib": memory,
        })  # fmt: skip
    write_results(
        "vs_peers-bf16" if args.bf16 else "vs_peers",
        vars(args) | {"device": str(device)},
        rows,
        ["implementation", "median_ms", "min_ms", "time_vs_moco_hf", "peak_memory_mib"],
        notes="time_vs_moco_hf > 1: slower than moco-hf. Peak memory: "
        + ("CUDA allocator peak of a step." if device.type == "cuda" else "peak RSS of a fresh process doing 3 steps."),
    )


if __name__ == "__main__":
    main()
