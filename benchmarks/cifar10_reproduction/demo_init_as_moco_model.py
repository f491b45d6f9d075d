"""The CIFAR-10 demo's initial network and queue (its seed-`--seed` draw) saved as a MocoModel folder.

`cifar10_demo_notebook.py --seed S` starts from `torch.manual_seed(S); ModelMoCo(K=4096)`; this script makes the
same draw and saves it with moco-hf's names, so that our trainer can start from the very weights and queue the
control started from (`--model_name_or_path`) and the two runs differ only in their training loops and data:

    python -m benchmarks.cifar10_reproduction.demo_init_as_moco_model --output outputs/demo-init-seed0
    bash scripts/reproduce_cifar10.sh --mixed_precision bf16 --model_name_or_path outputs/demo-init-seed0 ...
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from tests.reference_cifar10_demo import ModelMoCo, demo_as_moco_model


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
