"""The settings' vocabulary and the papers' recipes (`PRESETS`), importable without torch or transformers: the
command line states them in `--help` and checks the flags before anything heavy is loaded. `configuration_moco`
builds configs from them."""

from __future__ import annotations

from typing import Any

SHUFFLE_BN_MODES = ("auto", "ddp", "split", "none")
AUGMENTATIONS = ("v1", "v2", "v3", "cifar10-demo", "multiband")
# The recipes that jitter hue and saturation or turn images grey: they mean something for RGB images only.
RGB_ONLY_AUGMENTATIONS = frozenset({"v1", "v2", "v3", "cifar10-demo"})
# How an image held as an array (a `datasets` Array3D or numpy column) orders its axes: (C, H, W) or (H, W, C); auto
# reads the band count from the axis of `num_channels` length (an image file says its own order).
BAND_LAYOUTS = ("auto", "channels_first", "channels_last")
LR_SCHEDULES = ("step", "cosine", "cosine-per-epoch")
MOMENTUM_SCHEDULES = ("constant", "cosine")
OPTIMIZERS = ("sgd", "lars", "adamw")
KNN_FEATURES = ("backbone", "head")  # which representation of the query encoder a kNN measures
BATCH_NORM_CALIBRATION_IMAGES = 4096  # ~32 training batches of 128: the estimate's noise is far below a kNN point's
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # timm's IMAGENET_DEFAULT_MEAN / _STD
MAX_QUEUE_SIZE = 2**20  # 16x the papers' K: a bound on what a loaded config.json can make us allocate
# Bounds on the integers a config.json may pass to timm, so that a loaded file cannot make us build for minutes:
# widths, sizes and counts up to 2^16, depths (keys naming depth or layers) up to 1000 blocks per stage.
MAX_BACKBONE_INT, MAX_BACKBONE_DEPTH = 2**16, 1000
# The same for the sizes MoCo itself allocates: embedding and hidden widths, head depth, input size, and the queue as
# a whole (K x dim fp32 numbers: 2^27 is 512 MiB, the papers' 65536 x 128 is 2^23).
MAX_WIDTH, MAX_HEAD_LAYERS, MAX_IMAGE_SIZE, MAX_QUEUE_NUMBERS = 2**16, 16, 4096, 2**27
MAX_CHANNELS = 256  # input bands: RGB 3, Sentinel-2 13, hyperspectral cameras a few hundred
MIN_IMAGE_SIZE = 8  # the views' 3x3 blur needs more than its padding; ResNets reduce 32x (to 1x1 at 32 px)
MIN_TEMPERATURE = 0.01  # the papers use 0.07-1; below this the logits (cosine / T) overflow and the loss is noise

# The papers' recipes. Model fields shape the network and the loss; the trainer reads the others.
PRESETS: dict[str, dict[str, Any]] = {
    # He et al. 2019, "Momentum Contrast for Unsupervised Visual Representation Learning".
    "v1": {
        "dim": 128,
        "queue_size": 65536,
        "momentum": 0.999,
        "softmax_temperature": 0.07,
        "mlp": False,
        "augmentation": "v1",
        "lr_schedule": "step",
        "base_learning_rate": 0.03,
        "weight_decay": 1e-4,
        "sgd_momentum": 0.9,
    },
    # Chen et al. 2020, "Improved Baselines with Momentum Contrastive Learning": MLP head, T=0.2,
    # blur augmentation, cosine schedule.
    "v2": {
        "dim": 128,
        "queue_size": 65536,
        "momentum": 0.999,
        "softmax_temperature": 0.2,
        "mlp": True,
        "augmentation": "v2",
        "lr_schedule": "cosine",
        "base_learning_rate": 0.03,
        "weight_decay": 1e-4,
        "sgd_momentum": 0.9,
    },
    # Chen, Xie, He 2021, "An Empirical Study of Training Self-Supervised Vision Transformers" (the ResNet-50
    # recipe; "v3-vit" below for ViTs): no queue, the other keys of the
    # global batch are the negatives; BatchNorm MLP heads and a predictor; symmetric loss scaled by 2T; momentum
    # on a cosine schedule from 0.99 to 1; LARS; asymmetric blur/solarize augmentation.
    "v3": {
        "dim": 256,
        "queue_size": 0,
        "momentum": 0.99,
        "momentum_schedule": "cosine",
        "softmax_temperature": 1.0,
        "mlp": True,
        "mlp_hidden_dim": 4096,
        "projector_layers": 2,
        "head_batch_norm": True,
        "predictor": True,
        "symmetric_loss": True,
        "shuffle_bn": "none",
        "augmentation": "v3",
        "lr_schedule": "cosine",
        "optimizer": "lars",
        "base_learning_rate": 0.6,
        "weight_decay": 1e-6,
        "sgd_momentum": 0.9,
    },
}
# The v3 recipe for ViTs (the official `main_moco.py` ViT settings, on the paper's ViT-Small unless a backbone is
# given): T=0.2, a 3-layer projector, AdamW at 1.5e-4 per 256 images with weight decay 0.1, and a frozen random patch
# projection (a preset without a ViT would not build).
PRESETS["v3-vit"] = {
    **PRESETS["v3"],
    "backbone": "vit_small_patch16_224",
    "softmax_temperature": 0.2,
    "projector_layers": 3,
    "optimizer": "adamw",
    "base_learning_rate": 1.5e-4,
    "weight_decay": 0.1,
    "freeze_patch_embed": True,
}
# facebookresearch/moco's CIFAR-10 demo (`colab/moco_cifar10_demo.ipynb`, 82.6% weighted kNN after 200 epochs), as
# its notebook trains it: a ResNet-18 with the CIFAR stem whose own `fc` (512 -> 128, v1 style) is the head, K=4096,
# m=0.99, T=0.1, asymmetric loss, SplitBatchNorm in 8 groups, SGD 0.06 at batch 512 with weight decay 5e-4 on a
# cosine set once per epoch, the demo's augmentation (crop scale 0.08-1, no blur) and CIFAR-10 statistics. torchvision
# ResNets do not zero-init the last BatchNorm of each block; timm's do unless told not to.
PRESETS["cifar10-demo"] = {
    "backbone": "resnet18",
    "backbone_kwargs": {"zero_init_last": False},
    "cifar_stem": True,
    "dim": 128,
    "queue_size": 4096,
    "momentum": 0.99,
    "softmax_temperature": 0.1,
    "mlp": False,
    "shuffle_bn": "split",
    "num_splits": 8,
    "image_size": 32,
    "image_mean": (0.4914, 0.4822, 0.4465),
    "image_std": (0.2023, 0.1994, 0.2010),
    "augmentation": "cifar10-demo",
    "lr_schedule": "cosine-per-epoch",
    "base_learning_rate": 0.03,
    "weight_decay": 5e-4,
    "sgd_momentum": 0.9,
}
# v2 for images that are not RGB (multispectral, medical, microscopy): the v2 recipe with the "multiband"
# augmentation, which crops, flips, blurs and jitters brightness and contrast on any number of bands, and leaves out
# hue, saturation and grayscale (RGB only). Per-band mean and std are computed from the training data unless given.
PRESETS["v2-multiband"] = {**PRESETS["v2"], "augmentation": "multiband"}
PRESET_NAMES = tuple(PRESETS)
# The fields a resumed run may hold at another value than its checkpoint (every other field must match, see
# `checkpointing.check_resume_settings`): the way key batches are kept from leaking follows the process count, which
# a resume may change; the learning rate per 256 images is compared as the run's own learning rate instead.
MAY_CHANGE_ON_RESUME = frozenset({"shuffle_bn", "base_learning_rate"})


def evaluation_resize(size: int) -> int:
    """The short side evaluation resizes to before the centre crop: size / 0.875 (the ImageNet convention), or the
    crop size itself for CIFAR-sized images."""
    return size if size <= 64 else round(size / 0.875)


def check_augmentation_channels(augmentation: str, num_channels: int) -> None:
    """A recipe that jitters hue or saturation or turns images grey needs RGB: with another band count, a ValueError
    that names the recipe that works on any."""
    if num_channels != 3 and augmentation in RGB_ONLY_AUGMENTATIONS:
        raise ValueError(
            f"`augmentation` {augmentation!r} jitters hue and saturation and turns images grey, which only 3-channel "
            f"RGB images have; with `num_channels` {num_channels} use `augmentation` multiband (or `preset` "
            "v2-multiband): crops, flips, blur, brightness and contrast on any number of bands."
        )
