#!/usr/bin/env python
"""Weighted kNN evaluation of a frozen encoder: `moco-hf evaluate knn` (Wu et al. 2018; k=200, T=0.1 as in the MoCo
CIFAR demo).

python training/knn_eval.py --model_name_or_path outputs/cifar10-resnet18/model
python training/knn_eval.py --model_name_or_path outputs/cifar10-resnet18/model --random_init  # baseline
"""

import sys

from moco_hf.evaluation_command import main

if __name__ == "__main__":
    sys.exit(main(None, "knn"))
