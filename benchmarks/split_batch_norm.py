#!/usr/bin/env python
"""What split BatchNorm costs over plain BatchNorm, per model's worth of layers: ours against the official demo's.

The official SplitBatchNorm repeats the running statistics, weight and bias S times and averages the statistics
back on every call: about five times the ops of BatchNorm. A small-image GPU step waits on kernel launches (the
H100 step of ResNet-18 at 32 px, batch 256, took 36.5 ms with split BatchNorm and 19.9 ms without,
`results/step_overhead-gpu.md`), so each op costs about a launch there. Ours (`moco_hf.SplitBatchNorm2d`) keeps
each group's running statistics from step to step instead: this counts the ops each layer dispatches (torch
profiler; the same on any device) and times all of ResNet-18's BatchNorm layers, forward + backward (query encoder)
and forward only (key encoder), interleaved.

    python -m benchmarks.split_batch_norm                   # CPU here, or the GPU when there is one
"""

from __future__ import annotations

import argparse

import timm
import torch
from torch import nn
from torch.profiler import profile

from moco_hf import SplitBatchNorm2d
from tests.reference_cifar10_demo import SplitBatchNorm as OfficialSplitBatchNorm  # the demo's layer, transcribed

from .common import device_of_choice, interleaved_timings, write_results

LAYERS = {
    "BatchNorm2d (no split)": lambda channels, splits: nn.BatchNorm2d(channels),
    "official SplitBatchNorm": lambda channels, splits: OfficialSplitBatchNorm(channels, num_splits=splits),
    "moco_hf SplitBatchNorm2d": lambda channels, splits: moco_hf_split_batch_norm(channels, splits),
}


def moco_hf_split_batch_norm(channels: int, splits: int) -> SplitBatchNorm2d:
    layer = SplitBatchNorm2d(channels)
    layer.num_splits = splits  # as `MocoModel` sets it for each forward in split mode
    return layer


def batch_norm_input_shapes(backbone: str, batch_size: int, image_size: int) -> list[torch.Size]:
    """The input shape of every BatchNorm2d in `backbone` (timm) at this batch and image size."""
    model = timm.create_model(backbone, num_classes=0)
    shapes: list[torch.Size] = []
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.register_forward_hook(lambda module, inputs, output: shapes.append(inputs[0].shape))
    with torch.no_grad():
        model(torch.zeros(2, 3, image_size, image_size))
    return [torch.Size([batch_size, *shape[1:]]) for shape in shapes]


def ops_per_call(layer: nn.Module, x: torch.Tensor, backward: bool) -> int:
    """Ops (aten and autograd functions) a warm layer dispatches for one call and its backward, less those of the
    harness (`sum().backward()`): on a GPU, about one kernel launch each but for views."""

    def count(module: nn.Module) -> int:
        for _ in range(2):  # the first split call seeds the groups' statistics
            run_layer(module, x, backward)
        with profile() as profiler:
            run_layer(module, x, backward)
        # Top-level events only: an op that calls others (batch_norm -> native_batch_norm) dispatches as one.
        names = [event.name for event in profiler.events() if event.cpu_parent is None]
        return sum(name.startswith(("aten::", "autograd::engine::evaluate_function")) for name in names)

    return count(layer) - count(nn.Identity())


def run_layer(layer: nn.Module, x: torch.Tensor, backward: bool) -> None:
    if backward:
        layer(x).sum().backward()
    else:
        with torch.no_grad():
            layer(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--num_splits", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    device = device_of_choice()
    shapes = batch_norm_input_shapes(args.backbone, args.batch_size, args.image_size)
    inputs = [torch.randn(shape, device=device, requires_grad=True) for shape in shapes]
    candidates, rows = {}, []
    for name, make in LAYERS.items():
        layers = [make(shape[1], args.num_splits).to(device).train() for shape in shapes]
        for backward in (True, False):

            def run(layers=layers, backward=backward) -> None:
                for layer, x in zip(layers, inputs, strict=True):
                    run_layer(layer, x, backward)

            candidates[(name, backward)] = run
        rows += [
            {"layer": name, "pass": "fwd+bwd" if backward else "fwd (no grad)",
             "ops_per_layer": ops_per_call(layers[-1], inputs[-1], backward)}
            for backward in (True, False)
        ]  # fmt: skip
    timings = interleaved_timings(candidates, args.repeats, args.warmup, device)
    plain = {backward: timings[("BatchNorm2d (no split)", backward)]["median_s"] for backward in (True, False)}
    for row in rows:
        backward = row["pass"] == "fwd+bwd"
        median = timings[(row["layer"], backward)]["median_s"]
        row["ms_all_layers"] = 1000 * median
        row["vs_no_split"] = median / plain[backward]
    notes = (
        f"{len(shapes)} BatchNorm layers of {args.backbone} at batch {args.batch_size}, {args.image_size} px, "
        f"{args.num_splits} groups; ms_all_layers: median of {args.repeats} interleaved repetitions; "
        "ops_per_layer: ops dispatched by one warm call of the last layer, forward and backward (profiler)."
    )
    write_results(
        "split_batch_norm",
        vars(args),
        rows,
        ["layer", "pass", "ops_per_layer", "ms_all_layers", "vs_no_split"],
        notes,
    )


if __name__ == "__main__":
    main()
