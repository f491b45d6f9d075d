#!/usr/bin/env python
"""MoCo pretraining of a timm backbone on any image dataset, with Accelerate: the command over
`moco_hf.pretraining` (where the run lives; `moco-hf train` and `python -m moco_hf.pretraining` are the same).

One process:          python training/pretrain.py --backbone resnet18 --image_size 32 --max_train_steps 500
Several (GPUs):       accelerate launch --multi_gpu --num_processes 8 training/pretrain.py --preset v2 ...
Two CPU processes:    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \
                          --dynamo_backend no training/pretrain.py ...
Arguments may also come from a YAML or JSON file: python training/pretrain.py config.yaml
From Python:          moco_hf.pretraining.train(MocoTrainingArguments(backbone="resnet18", ...))

With no --dataset_name it trains on the Hub's CIFAR-10 (uoft-cs/cifar10; the environment variable
MOCO_HF_DEFAULT_DATASET names another default, as the repository's scripts do for a local copy) and reports the
weighted kNN accuracy of the encoder before and after training. Exit status: 0 done, 1 the run cannot go on
(checkpoints intact), 2 a usage or data error, 128 + N stopped by signal N after a checkpoint.
"""

import sys

from moco_hf.pretraining import main

if __name__ == "__main__":
    sys.exit(main())
