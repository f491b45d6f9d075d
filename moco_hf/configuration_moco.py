"""Configuration of MoCo (Momentum Contrast) models over timm backbones."""

from __future__ import annotations

import difflib
import inspect
from typing import Any

from transformers import PretrainedConfig

from .presets import (  # noqa: F401 (re-exported: the config's vocabulary)
    AUGMENTATIONS,
    LR_SCHEDULES,
    MAX_BACKBONE_DEPTH,
    MAX_BACKBONE_INT,
    MAX_CHANNELS,
    MAX_HEAD_LAYERS,
    MAX_IMAGE_SIZE,
    MAX_QUEUE_NUMBERS,
    MAX_QUEUE_SIZE,
    MAX_WIDTH,
    MAY_CHANGE_ON_RESUME,
    MIN_IMAGE_SIZE,
    MIN_TEMPERATURE,
    MOMENTUM_SCHEDULES,
    OPTIMIZERS,
    PRESET_NAMES,
    PRESETS,
    SHUFFLE_BN_MODES,
)


class MocoConfig(PretrainedConfig):
    r"""Configuration of a [`MocoModel`].

    Defaults follow MoCo v1 (He et al. 2019); `MocoConfig.from_preset("v2")` gives MoCo v2 (Chen et al. 2020).

    The fields fall in three groups. To build a loaded model (the network and its buffers): `backbone`,
    `backbone_kwargs`, `cifar_stem`, `dim`, `queue_size`, `mlp`, `mlp_hidden_dim`, `projector_layers`,
    `head_batch_norm`, `predictor`, `predictor_hidden_dim`, `shuffle_bn` (SplitBatchNorm layers or not). To
    preprocess its inputs (image processor, exports): `image_size`, `image_mean`, `image_std`. To continue
    pretraining as it was trained, a record of the run's recipe that using the encoder does not need: `momentum`,
    `momentum_schedule`, `softmax_temperature`, `symmetric_loss`, `num_splits`, `freeze_patch_embed`,
    `augmentation`, `lr_schedule`, `optimizer`, `base_learning_rate`, `weight_decay`, `sgd_momentum`. Each is also
    the trainer's argument of the same name (`MocoTrainingArguments`), which overrides the preset's value.

    Args:
        backbone (`str`, defaults to `"resnet50"`):
            Name of a timm model (`timm.list_models()`), created with `num_classes=0` so that it returns pooled
            features of size `num_features`.
        cifar_stem (`bool`, defaults to `False`):
            For timm ResNets on 32x32 images (the official CIFAR demo, lightly, solo-learn): the first convolution
            becomes 3x3 with stride 1 and the max-pool is removed, so the last stage sees 4x4 maps instead of 1x1.
            State-dict keys are unchanged; `conv1.weight` is (width, in_chans, 3, 3).
        backbone_kwargs (`dict`, *optional*):
            Extra keyword arguments for `timm.create_model`, e.g. `{"img_size": 32, "patch_size": 4}` for a ViT on
            CIFAR-sized images.
        dim (`int`, defaults to 128):
            Dimension of the embedding the contrastive loss compares (output of the projection head).
        queue_size (`int`, defaults to 65536):
            K, the number of negative keys kept in the queue. Need not be a multiple of the batch size: the queue
            wraps around. `0`: no queue; the negatives are the other keys of the (global) batch, as in SimCLR and
            MoCo v3.
        momentum (`float`, defaults to 0.999):
            m in `theta_k <- m * theta_k + (1 - m) * theta_q`.
        softmax_temperature (`float`, defaults to 0.07):
            T of the InfoNCE loss (the paper's "temperature"; named so because `temperature` is reserved for
            generation parameters by `transformers`).
        mlp (`bool`, defaults to `False`):
            Projection head: `False` is v1's single Linear layer, `True` is v2's Linear-ReLU-Linear.
        mlp_hidden_dim (`int`, *optional*):
            Hidden width of the MLP head; defaults to the backbone's `num_features` (as in v2).
        projector_layers (`int`, defaults to 2):
            Linear layers of the MLP projection head (v2: 2; v3: 2 for ResNets, 3 for ViTs).
        head_batch_norm (`bool`, defaults to `False`):
            v3 heads: BatchNorm after each hidden Linear (bias-free) and a final affine-free BatchNorm.
        predictor (`bool`, defaults to `False`):
            v3: a 2-layer prediction MLP (`predictor_hidden_dim`, default `mlp_hidden_dim`) on the query side only.
        predictor_hidden_dim (`int`, *optional*): hidden width of the predictor.
        symmetric_loss (`bool`, defaults to `False`):
            Both views serve as queries: `ctr(q1, k2) + ctr(q2, k1)`, each term scaled by 2T as in MoCo v3.
        momentum_schedule (`str`, defaults to `"constant"`):
            `"cosine"` raises m from `momentum` to 1 over training (v3); the trainer sets it each step.
        freeze_patch_embed (`bool`, defaults to `False`):
            v3's stability trick for ViTs: a frozen (random) patch projection.
        shuffle_bn (`str`, defaults to `"auto"`):
            How the key encoder's batch statistics are kept from leaking the positive pair: `"ddp"` shuffles the key
            batch across processes (gather, permute, encode the local shard, unshuffle); `"split"` emulates that on
            one process by normalising `num_splits` groups of the batch separately (SplitBatchNorm) after a shuffle;
            `"none"` does nothing. `"auto"` picks `"ddp"` when `torch.distributed` runs with more than one process,
            else `"split"`.
        num_splits (`int`, defaults to 8):
            Number of BatchNorm groups of the `"split"` emulation (the official CIFAR demo's `bn_splits`).
        num_channels (`int`, defaults to 3):
            Channels (bands) of the input images: 3 for RGB, 1 for grey or single-band images, e.g. 13 for Sentinel-2;
            timm builds the first layer for them (`in_chans`), and `image_mean`/`image_std` hold one value each. A
            count other than 3 makes the trainer read images as float bands at their own bit depth
            (`moco_hf.bands`), and needs the `"multiband"` augmentation. A config with `backbone_kwargs["in_chans"]`
            (before this field) loads with that count.
        image_size (`int`, defaults to 224):
            Side of the square crop the encoder was trained on; exported encoders carry it in timm's
            `pretrained_cfg`, with the mean and standard deviation below.
        image_mean (`tuple[float, ...]`, defaults to ImageNet's `(0.485, 0.456, 0.406)`):
            Per-channel mean subtracted from the images.
        image_std (`tuple[float, ...]`, defaults to ImageNet's `(0.229, 0.224, 0.225)`):
            Per-channel standard deviation the images are divided by.
        augmentation (`str`, defaults to `"v1"`):
            The two-crop augmentation recipe the trainer builds (`moco_hf.augmentation`): `"v1"`, `"v2"`, `"v3"`,
            `"cifar10-demo"` (RGB) or `"multiband"` (any band count). This and the fields below
            are the training recipe, stored so that a checkpoint says how it was trained.
        lr_schedule (`str`, defaults to `"step"`):
            The learning-rate schedule: `"step"` (v1: x0.1 at 60% and 80% of training), `"cosine"` (per step) or
            `"cosine-per-epoch"` (the official CIFAR demo: set once per epoch).
        optimizer (`str`, defaults to `"sgd"`):
            SGD, or a timm optimizer (v3: LARS for ResNets, AdamW for ViTs).
        base_learning_rate (`float`, defaults to 0.03):
            Learning rate per 256 images; it scales linearly with the global batch.
        weight_decay (`float`, defaults to 1e-4):
            Weight decay of the optimizer.
        sgd_momentum (`float`, defaults to 0.9):
            Momentum of SGD (not MoCo's key-encoder momentum `momentum`).
    """

    model_type = "moco"

    def __init__(
        self,
        backbone: str = "resnet50",
        backbone_kwargs: dict[str, Any] | None = None,
        cifar_stem: bool = False,
        dim: int = 128,
        queue_size: int = 65536,
        momentum: float = 0.999,
        softmax_temperature: float = 0.07,
        mlp: bool = False,
        mlp_hidden_dim: int | None = None,
        projector_layers: int = 2,
        head_batch_norm: bool = False,
        predictor: bool = False,
        predictor_hidden_dim: int | None = None,
        symmetric_loss: bool = False,
        momentum_schedule: str = "constant",
        freeze_patch_embed: bool = False,
        shuffle_bn: str = "auto",
        num_splits: int = 8,
        num_channels: int = 3,
        image_size: int = 224,
        image_mean: list[float] | tuple[float, ...] = (0.485, 0.456, 0.406),
        image_std: list[float] | tuple[float, ...] = (0.229, 0.224, 0.225),
        augmentation: str = "v1",
        lr_schedule: str = "step",
        optimizer: str = "sgd",
        base_learning_rate: float = 0.03,
        weight_decay: float = 1e-4,
        sgd_momentum: float = 0.9,
        **kwargs: Any,
    ) -> None:
        self.backbone = backbone
        self.backbone_kwargs = dict(backbone_kwargs or {})
        self.cifar_stem = cifar_stem
        self.dim = dim
        self.queue_size = queue_size
        self.momentum = momentum
        self.softmax_temperature = softmax_temperature
        self.mlp = mlp
        self.mlp_hidden_dim = mlp_hidden_dim
        self.projector_layers = projector_layers
        self.head_batch_norm = head_batch_norm
        self.predictor = predictor
        self.predictor_hidden_dim = predictor_hidden_dim
        self.symmetric_loss = symmetric_loss
        self.momentum_schedule = momentum_schedule
        self.freeze_patch_embed = freeze_patch_embed
        self.shuffle_bn = shuffle_bn
        self.num_splits = num_splits
        in_chans = self.backbone_kwargs.pop("in_chans", None)  # timm's name, where configs kept it before
        if in_chans is not None and num_channels not in (3, in_chans):
            raise ValueError(f"MocoConfig.num_channels is {num_channels} but backbone_kwargs['in_chans'] is "
                             f"{in_chans}: give one of them.")  # fmt: skip
        self.num_channels = num_channels if in_chans is None else in_chans
        self.image_size = image_size
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        self.augmentation = augmentation
        self.lr_schedule = lr_schedule
        self.optimizer = optimizer
        self.base_learning_rate = base_learning_rate
        self.weight_decay = weight_decay
        self.sgd_momentum = sgd_momentum
        super().__init__(**kwargs)
        self.validate_moco()

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """The MoCo fields, in the order of `__init__` (`PretrainedConfig`'s own attributes left out)."""
        return tuple(name for name in inspect.signature(cls.__init__).parameters if name not in ("self", "kwargs"))

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> MocoConfig:
        """A config with the recipe `name` (`"v1"`, `"v2"`, `"v3"`, `"v3-vit"`, `"cifar10-demo"` or
        `"v2-multiband"`); `overrides` replace any field."""
        if name not in PRESETS:
            raise ValueError(f"Unknown MoCo preset {name!r}; choose one of {sorted(PRESETS)}.")
        return cls(**{**PRESETS[name], **overrides})

    def validate_moco(self) -> None:
        """Raise `ValueError` naming the first field that is out of range."""
        _check(isinstance(self.backbone, str) and self.backbone, "backbone", self.backbone, "a timm model name")
        _check_backbone_exists(self.backbone)
        _check_backbone_kwargs(self.backbone_kwargs)
        _check(isinstance(self.cifar_stem, bool), "cifar_stem", self.cifar_stem, "True or False")
        _check(_is_int(self.dim) and 0 < self.dim <= MAX_WIDTH, "dim", self.dim, f"an integer from 1 to {MAX_WIDTH}")
        _check(
            _is_int(self.queue_size) and 0 <= self.queue_size <= MAX_QUEUE_SIZE,
            "queue_size",
            self.queue_size,
            f"an integer >= 0 and <= {MAX_QUEUE_SIZE} (K, the number of negative keys; the papers use up to 65536)",
        )
        _check(
            self.queue_size * self.dim <= MAX_QUEUE_NUMBERS,
            "queue_size",
            self.queue_size,
            f"at most {MAX_QUEUE_NUMBERS} / dim = {MAX_QUEUE_NUMBERS // self.dim} with dim {self.dim} (the queue holds "
            f"queue_size x dim numbers, at most {MAX_QUEUE_NUMBERS})",
        )
        _check(
            _is_number(self.momentum) and 0.0 <= self.momentum <= 1.0, "momentum", self.momentum, "a number in [0, 1]"
        )
        _check(
            _is_number(self.softmax_temperature) and self.softmax_temperature >= MIN_TEMPERATURE,
            "softmax_temperature",
            self.softmax_temperature,
            f"a number >= {MIN_TEMPERATURE} (the papers use 0.07 to 1)",
        )
        for name in ("mlp_hidden_dim", "predictor_hidden_dim"):
            value = getattr(self, name)
            ok = value is None or (_is_int(value) and 0 < value <= MAX_WIDTH)
            _check(ok, name, value, f"an integer from 1 to {MAX_WIDTH}, or None")
        _check(
            _is_int(self.projector_layers) and 2 <= self.projector_layers <= MAX_HEAD_LAYERS,
            "projector_layers",
            self.projector_layers,
            f"an integer from 2 to {MAX_HEAD_LAYERS}",
        )
        _check(
            self.momentum_schedule in MOMENTUM_SCHEDULES,
            "momentum_schedule",
            self.momentum_schedule,
            f"one of {MOMENTUM_SCHEDULES}",
        )
        _check(self.optimizer in OPTIMIZERS, "optimizer", self.optimizer, f"one of {OPTIMIZERS}")
        _check(self.shuffle_bn in SHUFFLE_BN_MODES, "shuffle_bn", self.shuffle_bn, f"one of {SHUFFLE_BN_MODES}")
        _check(_is_int(self.num_splits) and self.num_splits >= 1, "num_splits", self.num_splits, "a positive integer")
        ok = _is_int(self.image_size) and MIN_IMAGE_SIZE <= self.image_size <= MAX_IMAGE_SIZE
        _check(ok, "image_size", self.image_size, f"an integer from {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE}")
        ok = _is_int(self.num_channels) and 1 <= self.num_channels <= MAX_CHANNELS
        _check(ok, "num_channels", self.num_channels, f"an integer from 1 to {MAX_CHANNELS}")
        for name in ("image_mean", "image_std"):
            value, count = getattr(self, name), self.num_channels
            _check(len(value) == count and all(_is_number(v) for v in value), name, value,
                   f"{count} numbers (one per channel, `num_channels` {count})")  # fmt: skip
        _check(all(v > 0 for v in self.image_std), "image_std", self.image_std, "positive numbers")
        _check(self.augmentation in AUGMENTATIONS, "augmentation", self.augmentation, f"one of {AUGMENTATIONS}")
        _check(self.lr_schedule in LR_SCHEDULES, "lr_schedule", self.lr_schedule, f"one of {LR_SCHEDULES}")
        for name in ("base_learning_rate", "weight_decay", "sgd_momentum"):
            value = getattr(self, name)
            _check(_is_number(value) and value >= 0, name, value, "a number >= 0")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check(ok: Any, field: str, value: Any, expected: str) -> None:
    if not ok:
        raise ValueError(f"MocoConfig.{field} must be {expected}, got {value!r}.")


def _check_backbone_kwargs(kwargs: Any) -> None:
    _check(isinstance(kwargs, dict) and all(isinstance(k, str) for k in kwargs), "backbone_kwargs", kwargs,
           "a dict of timm.create_model keyword arguments")  # fmt: skip
    for key, value in kwargs.items():
        bound = MAX_BACKBONE_DEPTH if "depth" in key or "layers" in key else MAX_BACKBONE_INT
        values = value if isinstance(value, (list, tuple)) else [value]
        too_big = [v for v in values if _is_number(v) and v > bound]
        _check(not too_big, f"backbone_kwargs[{key!r}]", value, f"at most {bound} (a bound on what a config builds)")


def _check_backbone_exists(name: str) -> None:
    import timm

    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else " See timm.list_models()."
    raise ValueError(f"MocoConfig.backbone {name!r} is not a timm model.{hint}")
