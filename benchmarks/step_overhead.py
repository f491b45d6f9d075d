#!/usr/bin/env python
"""MoCo's own cost per training step: a full `MocoModel` step against its lower bound, measured side by side.

Lower bound: the same encoder's forward + backward on the queries, forward on the keys, and the optimizer step.
What MoCo adds on top (momentum update, batch shuffle or split BatchNorm, logits against the queue, enqueue) is
the overhead. Target: under 5% for ResNet-18, batch 256, 32x32 images.

    python -m benchmarks.step_overhead                      # CPU here, or the GPU when there is one
    python -m benchmarks.step_overhead --queue_sizes 4096 65536 --repeats 20
"""

from __future__ import annotations

import argparse
import copy

import torch

from moco_hf import MocoConfig, MocoModel
from moco_hf.modeling_moco import MocoEncoder

from .common import device_of_choice, interleaved_timings, write_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--queue_sizes", type=int, nargs="+", default=[4096, 65536])
    parser.add_argument("--shuffle_bn", nargs="+", default=["split", "none"])
    parser.add_argument("--bf16", action="store_true", help="Every candidate under bf16 autocast.")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    device = device_of_choice()
    torch.manual_seed(0)
    shape = (args.batch_size, 3, args.image_size, args.image_size)
    im_q, im_k = torch.randn(shape, device=device), torch.randn(shape, device=device)

    def autocast() -> torch.autocast:
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)

    candidates, labels = {}, {}
    for queue_size in args.queue_sizes:
        for shuffle_bn in args.shuffle_bn:
            config = MocoConfig.from_preset("v2", backbone=args.backbone, queue_size=queue_size, shuffle_bn=shuffle_bn)
            model = MocoModel(config).to(device).train()
            optimizer = torch.optim.SGD(model.encoder_q.parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4)

            def moco_step(model=model, optimizer=optimizer) -> None:
                with autocast():
                    loss = model(pixel_values=im_q, key_pixel_values=im_k).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            name = f"MoCo step (K={queue_size}, shuffle_bn={shuffle_bn})"
            candidates[name], labels[name] = moco_step, (queue_size, shuffle_bn)

    # The lower bound: plain timm encoders (no split BatchNorm), no momentum update, no queue.
    config = MocoConfig.from_preset("v2", backbone=args.backbone, shuffle_bn="none")
    encoder_q = MocoEncoder(config).to(device).train()
    encoder_k = copy.deepcopy(encoder_q).requires_grad_(False)
    optimizer = torch.optim.SGD(encoder_q.parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4)

    def lower_bound() -> None:
        with autocast():
            loss = encoder_q(im_q).float().square().mean()
            with torch.no_grad():
                encoder_k(im_k)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    candidates["lower bound (encoder fwd+bwd, key fwd, optimizer)"] = lower_bound
    timings = interleaved_timings(candidates, args.repeats, args.warmup, device)
    bound = timings["lower bound (encoder fwd+bwd, key fwd, optimizer)"]["median_s"]
    rows = []
    for name, timing in timings.items():
        overhead = None if name.startswith("lower") else 100 * (timing["median_s"] - bound) / timing["median_s"]
        rows.append({"step": name, "median_ms": 1e3 * timing["median_s"], "min_ms": 1e3 * timing["min_s"],
                     "moco_overhead_%": overhead, "images_per_s": args.batch_size / timing["median_s"]})  # fmt: skip
    write_results(
        "step_overhead-bf16" if args.bf16 else "step_overhead",
        vars(args) | {"device": str(device)},
        rows,
        ["step", "median_ms", "min_ms", "moco_overhead_%", "images_per_s"],
        notes="moco_overhead_% = (MoCo step - lower bound) / MoCo step, medians of interleaved repetitions.",
    )


if __name__ == "__main__":
    main()
