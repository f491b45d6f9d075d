"""The optimizers of the papers, through timm's optimizer factory."""

from __future__ import annotations

import torch
from timm.optim import create_optimizer_v2

from .configuration_moco import MocoConfig

TIMM_OPTIMIZERS = {"sgd": "momentum", "lars": "lars", "adamw": "adamw"}  # timm's "sgd" is Nesterov


def build_optimizer(model: torch.nn.Module, config: MocoConfig, learning_rate: float) -> torch.optim.Optimizer:
    """timm's optimizer of `config.optimizer` over the trainable parameters (query encoder, predictor).

    SGD (v1/v2) decays every parameter, as the official code; LARS and AdamW (v3) leave biases and normalisation
    weights out of weight decay and (LARS) out of the trust-ratio scaling, as the official v3 code.
    """
    return create_optimizer_v2(
        model,
        opt=TIMM_OPTIMIZERS[config.optimizer],
        lr=learning_rate,
        weight_decay=config.weight_decay,
        momentum=config.sgd_momentum,
        filter_bias_and_bn=config.optimizer != "sgd",
    )
