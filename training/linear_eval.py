#!/usr/bin/env python
"""Linear evaluation of a frozen encoder: `moco-hf evaluate linear` (the protocol of the official `main_lincls.py`,
adapted for speed: features of centre crops extracted once and cached, a linear classifier trained on them,
`moco_hf.linear_probe`; top-1/top-5 through `evaluate`).

    python training/linear_eval.py --model_name_or_path outputs/cifar10-resnet18/model
    python training/linear_eval.py --model_name_or_path outputs/cifar10-resnet18/model --random_init  # baseline
"""

import sys

from moco_hf.evaluation_command import main

if __name__ == "__main__":
    sys.exit(main(None, "linear"))
