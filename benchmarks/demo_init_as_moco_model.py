"""The CIFAR-10 demo's initial network and queue (its seed-`--seed` draw) saved as a MocoModel folder.

`cifar10_demo_notebook.py --seed S` starts from `torch.manual_seed(S); ModelMoCo(K=4096)`; this script makes the
same draw and saves it with moco-hf's names, so that our trainer can start from the very weights and queue the
control started from (`--model_name_or_path`) and the two runs differ only in their training loops and data:

    python benchmarks/demo_init_as_moco_model.py --output outputs/demo-init-seed0
    bash scripts/reproduce_cifar10.sh --mixed_precision bf16 --model_name_or_path outputs/demo-init-seed0 ...
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from the repository root

from benchmarks.cifar10_demo_notebook import ModelMoCo
from moco_hf import MocoConfig, MocoModel

# The demo's ModelBase is an nn.Sequential: its indices, in moco-hf's names.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    torch.manual_seed(args.seed)  # as cifar10_demo_notebook.main, whose first draw is ModelMoCo's
    demo_as_moco_model(ModelMoCo(K=4096)).save_pretrained(args.output)
    print(f"saved the demo's seed-{args.seed} initial model as a MocoModel in {args.output}")


if __name__ == "__main__":
    main()
