"""MoCo: Momentum Contrast (He et al. 2019, v1; Chen et al. 2020, v2) over any timm backbone.

Reading guide, in the paper's words (Algorithm 1):

* a query encoder `encoder_q` and a momentum key encoder `encoder_k` (timm backbone + projection head);
* `_momentum_update_key_encoder`: theta_k <- m * theta_k + (1 - m) * theta_q, before the keys are encoded;
* `_batch_shuffle_ddp` / `_batch_unshuffle_ddp` ("Shuffling BN"): the key batch is permuted across processes so
  that BatchNorm statistics cannot leak which key is the positive; `SplitBatchNorm2d` emulates that on one process;
* `_contrastive_logits`: positive logits q.k+ and negative logits q.queue, divided by T;
* `_dequeue_and_enqueue`: the newest keys replace the oldest ones in the queue (a ring buffer of size K).

The queue is stored as a `(K, dim)` buffer of L2-normalised keys (one key per row; the paper writes it `dim x K`),
with `queue_ptr` the row where the next keys go. Both are saved in the checkpoint so training resumes with the same
dictionary.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.models.resnet import ResNet
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput
from transformers.utils import ModelOutput, logging

from .configuration_moco import MocoConfig
from .image_processing import image_processor_for
from .loading_errors import check_is_moco_model, describe_shape_mismatch

logger = logging.get_logger(__name__)


@dataclass
class MocoOutput(ModelOutput):
    """Output of the contrastive forward pass of [`MocoModel`].

    Args:
        loss (`torch.FloatTensor` of shape `()`): InfoNCE loss, the cross-entropy of `logits` against `labels`.
        logits (`torch.FloatTensor` of shape `(N, 1 + K)`): column 0 holds the positive logits q.k+, the other
            columns q against each queued negative key; already divided by the temperature T.
        labels (`torch.LongTensor` of shape `(N,)`): index of the positive in each row (all zeros).
        q (`torch.FloatTensor` of shape `(N, dim)`): L2-normalised queries.
        k (`torch.FloatTensor` of shape `(N, dim)`): L2-normalised keys (no gradient).
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    labels: torch.LongTensor | None = None
    q: torch.FloatTensor | None = None
    k: torch.FloatTensor | None = None


def is_distributed() -> bool:
    """True when `torch.distributed` runs with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def concat_all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` (N, ...) from every process along dim 0, rank order: (world_size * N, ...).

    No gradient flows through the result; with a single process it is `tensor` itself, detached.
    """
    if not is_distributed():
        return tensor.detach()
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered)


class SplitBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that, while training, normalises `num_splits` groups of the batch separately.

    Sample i belongs to group i % S, as in the official single-GPU CIFAR demo's SplitBatchNorm: viewing
    (N, C, H, W) as (N/S, S*C, H, W) makes each group a block of channels without copying. The key batch is
    shuffled before it gets here, so each group is a random subset, as each process's share is in multi-process
    training. With `num_splits == 1`, or in eval mode, it is a plain `BatchNorm2d`; the state dict is the same, so
    checkpoints load into plain timm models.

    Few ops per step, since a small-image GPU step waits on kernel launches: each group keeps its running
    statistics (`grouped_running_mean`/`grouped_running_var`, S*C) from step to step, where the official layer
    repeats and averages them on every call. `running_mean`/`running_var` are their mean over the groups -- the
    official per-step averaging gives the same numbers, since an exponential moving average commutes with the
    mean -- written back whenever they are used or read: in eval mode, plain training, `state_dict()`, or
    `fold_running_stats()`.
    """

    num_splits: int = 1

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Non-persistent buffers: `.to()` moves them, checkpoints hold only the folded statistics.
        self.register_buffer("grouped_running_mean", None, persistent=False)
        self.register_buffer("grouped_running_var", None, persistent=False)
        self.register_state_dict_pre_hook(lambda module, prefix, keep_vars: module.fold_running_stats())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        splits = self.num_splits
        if splits == 1 or not self.training:
            self.fold_running_stats()
            return super().forward(x)
        n, c, h, w = x.shape
        if n % splits:
            raise ValueError(f"Split BatchNorm needs a batch size divisible by num_splits={splits}, got {n}.")
        factor = 0.0
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self._split_running_stats(splits)
        out = F.batch_norm(
            x.reshape(n // splits, splits * c, h, w),  # a view for contiguous (NCHW) activations
            self.grouped_running_mean,
            self.grouped_running_var,
            self.weight.repeat(splits) if self.affine else None,
            self.bias.repeat(splits) if self.affine else None,
            training=True,
            momentum=factor,
            eps=self.eps,
        )
        return out.view(n, c, h, w)

    def _split_running_stats(self, splits: int) -> None:
        """Give each of `splits` groups a copy of the running statistics, unless the groups already hold them."""
        if self.grouped_running_mean is not None and self.grouped_running_mean.numel() == splits * self.num_features:
            return
        self.fold_running_stats()
        self.grouped_running_mean = self.running_mean.repeat(splits)
        self.grouped_running_var = self.running_var.repeat(splits)

    @torch.no_grad()
    def fold_running_stats(self) -> None:
        """Write the groups' mean running statistics into `running_mean`/`running_var` and drop the groups'."""
        if self.grouped_running_mean is None:
            return
        torch.mean(self.grouped_running_mean.view(-1, self.num_features), 0, out=self.running_mean)
        torch.mean(self.grouped_running_var.view(-1, self.num_features), 0, out=self.running_var)
        self.grouped_running_mean = self.grouped_running_var = None

    def train(self, mode: bool = True) -> SplitBatchNorm2d:
        if not mode:
            self.fold_running_stats()
        return super().train(mode)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self.grouped_running_mean = self.grouped_running_var = None  # loaded statistics replace the groups'
        super()._load_from_state_dict(*args, **kwargs)


def batch_norm_groups(batch_size: int, num_splits: int) -> int:
    """SplitBatchNorm groups for a batch: the largest count up to `num_splits` that divides `batch_size` and leaves
    each group at least 2 images (BatchNorm needs 2 values per channel on the last, possibly 1x1, maps)."""
    groups = next((g for g in range(min(num_splits, batch_size // 2), 1, -1) if batch_size % g == 0), 1)
    if groups != num_splits:
        logger.warning_once(
            f"A batch of {batch_size} images does not split into `num_splits` {num_splits} BatchNorm groups of 2 or "
            f"more; using {groups} group{'s' if groups > 1 else ''}."
        )
    return groups


def convert_to_split_batch_norm(module: nn.Module) -> nn.Module:
    """Replace every plain `nn.BatchNorm2d` below `module` by a `SplitBatchNorm2d` sharing its tensors."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            split = SplitBatchNorm2d(
                child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats
            )
            split.weight, split.bias = child.weight, child.bias
            split.running_mean, split.running_var = child.running_mean, child.running_var
            split.num_batches_tracked = child.num_batches_tracked
            setattr(module, name, split)
        else:
            convert_to_split_batch_norm(child)
    return module


def build_mlp(num_layers: int, in_features: int, hidden: int, out_features: int, batch_norm: bool, last_bn: bool):
    """Linear layers with ReLU between them; with `batch_norm` (v3) the Linears lose their bias, a BatchNorm follows
    each hidden one, and `last_bn` adds an affine-free BatchNorm at the end (the official v3 `_build_mlp`)."""
    layers: list[nn.Module] = []
    for index in range(num_layers):
        last = index == num_layers - 1
        layers.append(nn.Linear(in_features if index == 0 else hidden, out_features if last else hidden,
                                bias=not batch_norm))  # fmt: skip
        if not last:
            layers += [nn.BatchNorm1d(hidden)] if batch_norm else []
            layers.append(nn.ReLU(inplace=True))
        elif last_bn:
            layers.append(nn.BatchNorm1d(out_features, affine=False))
    return nn.Sequential(*layers)


def build_projection_head(in_features: int, config: MocoConfig) -> nn.Module:
    """v1: Linear(num_features, dim); v2 (`mlp=True`): Linear-ReLU-Linear with hidden width `mlp_hidden_dim`;
    v3 (`head_batch_norm=True`): the same MLP with BatchNorm, `projector_layers` deep."""
    if not config.mlp:
        return nn.Linear(in_features, config.dim)
    hidden = config.mlp_hidden_dim or in_features
    batch_norm = config.head_batch_norm
    return build_mlp(config.projector_layers, in_features, hidden, config.dim, batch_norm, last_bn=batch_norm)


def use_cifar_stem(backbone: nn.Module, name: str) -> None:
    """Give a timm ResNet the CIFAR stem of the MoCo CIFAR demo: conv1 3x3 with stride 1 and no max-pool (keys kept)."""
    conv = getattr(backbone, "conv1", None)
    if not isinstance(backbone, ResNet) or not isinstance(conv, nn.Conv2d):
        raise ValueError(
            f"cifar_stem=True needs a timm ResNet with a single-convolution stem (resnet18, resnet50, ...); "
            f"{name!r} is a {type(backbone).__name__}" + (" with a deep stem" if conv is not None else "") + "."
        )
    # PyTorch's default initialisation of a new Conv2d, as the demo (and lightly, solo-learn) get by replacing conv1
    # after the ResNet's own init: its weights are ~2x those of the fan-out init, which trains the stem more slowly.
    backbone.conv1 = nn.Conv2d(conv.in_channels, conv.out_channels, 3, stride=1, padding=1, bias=False)
    backbone.maxpool = nn.Identity()


def build_backbone(config: MocoConfig) -> nn.Module:
    """The config's timm backbone, created with `num_classes=0` (it returns pooled features), CIFAR stem if asked."""
    backbone = timm.create_model(config.backbone, pretrained=False, num_classes=0, in_chans=config.num_channels,
                                 **config.backbone_kwargs)  # fmt: skip
    if config.cifar_stem:
        use_cifar_stem(backbone, config.backbone)
    return backbone


class MocoEncoder(nn.Module):
    """A timm backbone (created with `num_classes=0`, so it returns pooled features) and a projection head."""

    def __init__(self, config: MocoConfig) -> None:
        super().__init__()
        self.backbone = build_backbone(config)
        self.head = build_projection_head(self.backbone.num_features, config)
        if config.freeze_patch_embed:  # v3: a random, fixed patch projection keeps ViT training stable
            patch_embed = getattr(self.backbone, "patch_embed", None)
            if patch_embed is None:
                raise ValueError(
                    f"freeze_patch_embed=True needs a ViT-like backbone; {config.backbone} has no patch_embed."
                )
            patch_embed.requires_grad_(False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) images -> (N, dim) unnormalised embeddings."""
        return self.head(self.backbone(pixel_values))


def check_queue_holds_keys(queue: torch.Tensor, source: str | os.PathLike) -> None:
    """Every row of a loaded queue is a key, an L2-normalised vector: anything else (an integer tensor cast to zeros, a
    scaled or corrupted one) would be compared with every query as if it were."""
    norms = queue.detach().float().norm(dim=1)
    if not torch.allclose(norms, torch.ones_like(norms), atol=1e-2):
        bad = int((norms - 1).abs().argmax())
        raise ValueError(f"The `queue` in {source} does not hold keys: row {bad} has norm {norms[bad].item():.4g}, "
                         "not 1 (keys are L2-normalised; was it saved with another dtype or altered?).")  # fmt: skip


def keep_timm_initialisation(module: nn.Module) -> None:
    """Mark a newly built timm network's tensors as initialised, so `post_init` keeps timm's own initialisation
    (a model being loaded is built on the meta device, and its checkpoint fills these tensors instead)."""
    for tensor in [*module.parameters(), *module.buffers()]:
        tensor._is_hf_initialized = True


# What a MocoModel checkpoint holds for pretraining only: models built on its query backbone leave these out.
PRETRAINING_ONLY_KEYS = [r"^encoder_k\.", r"^queue", r"^(encoder_q\.)?head\.", r"^predictor\."]


# The Auto classes a saved model of the family loads with from its own copy of this module (`trust_remote_code`).
REMOTE_CODE_AUTO_MAP = {"AutoModel": "modeling_moco.MocoModel",
                        "AutoModelForImageClassification": "modeling_moco.MocoForImageClassification"}  # fmt: skip


class MocoPreTrainedModel(PreTrainedModel):
    config_class = MocoConfig
    base_model_prefix = "encoder_q"  # the checkpoint's key prefix of the query encoder (see `MocoModel.base_model`)
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    # `transformers.Trainer`: the loss is a per-batch mean, so gradient accumulation averages it (no token counts).
    accepts_loss_kwargs = False
    # The queue is a bank of unit vectors compared with every query: keep it in fp32 even when loading in bf16/fp16.
    _keep_in_fp32_modules_strict = ["^queue$"]  # a regex: `queue_ptr` stays an integer

    def _init_weights(self, module: nn.Module) -> None:
        """Fill what a checkpoint did not provide.

        A new model keeps timm's own initialisation (its tensors are marked initialised when built, see
        `MocoModel.__init__`). When `from_pretrained` builds on the meta device, only tensors missing from the
        checkpoint reach the `transformers.initialization` functions below, which skip loaded tensors.
        """
        if module is getattr(self, "classifier", None) and isinstance(module, nn.Linear):
            init.normal_(module.weight, std=0.01)  # main_lincls.py's initialisation of a new classifier
            init.zeros_(module.bias)
            return
        if isinstance(module, MocoModel):
            queue = F.normalize(torch.randn(module.queue.shape, device=module.queue.device), dim=1)
            init.copy_(module.queue, queue)
            init.zeros_(module.queue_ptr)
            return
        super()._init_weights(module)
        if hasattr(module, "init_non_persistent_buffers"):  # timm layers whose buffers are not in checkpoints
            module.init_non_persistent_buffers()

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        """`PreTrainedModel.save_pretrained`, plus the config's image processor (`preprocessor_config.json`): the
        folder then loads with `AutoImageProcessor` and the `image-feature-extraction` pipeline as it is (this also
        holds for `push_to_hub` and `transformers.Trainer` checkpoints, which save through here).

        With `trust_remote_code=True` (no `moco_hf` installed), any saved model of the family loads as either model of
        `modeling_moco.py`: `auto_map` names both, so `run_image_classification.py` can start from a MocoModel."""
        if self._auto_class is not None:  # moco_hf registers its models for `trust_remote_code` on import
            self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **REMOTE_CODE_AUTO_MAP}
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            image_processor_for(self.config).save_pretrained(save_directory)

    def _prepare_images(self, images: torch.Tensor, name: str) -> torch.Tensor:
        """Checked (N, C, H, W) images in the model's dtype (fp32 pixels into a bf16 model, as transformers' vision
        models accept them)."""
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape (N, C, H, W), got {type(images).__name__}.")
        if images.ndim != 4:
            raise ValueError(
                f"{name} must have shape (N, C, H, W), got {tuple(images.shape)}"
                + (" (a single image? add a batch dimension with .unsqueeze(0))" if images.ndim == 3 else "")
                + "."
            )
        channels = self.config.num_channels
        if images.shape[1] != channels:
            raise ValueError(
                f"{name} must have {channels} channels (`config.num_channels`), got {images.shape[1]} in shape "
                f"{tuple(images.shape)}" + ("; convert images to RGB first." if channels == 3 else ".")
            )
        return images.to(self.dtype) if images.is_floating_point() else images


class MocoModel(MocoPreTrainedModel):
    """MoCo with a query encoder, a momentum key encoder and a queue of negative keys.

    * `model(pixel_values=im_q, key_pixel_values=im_k)`: one contrastive step, returns [`MocoOutput`] and, in
      training, updates the key encoder (before encoding the keys) and the queue (after the logits).
    * `model(pixel_values=x)` / `model.get_image_features(x)`: the query backbone's features, the representation
      to transfer downstream, as a `BaseModelOutputWithPooling` (`pooler_output` is `(N, num_features)`).
    """

    def __init__(self, config: MocoConfig) -> None:
        super().__init__(config)
        self.encoder_q = MocoEncoder(config)
        self.encoder_k = MocoEncoder(config)
        # v3: a prediction MLP on the query side only (the key encoder has no counterpart).
        hidden = config.predictor_hidden_dim or config.mlp_hidden_dim or config.dim
        self.predictor = (
            build_mlp(2, config.dim, hidden, config.dim, config.head_batch_norm, last_bn=False)
            if config.predictor
            else None
        )
        self.key_momentum = config.momentum  # the trainer moves it along `config.momentum_schedule`
        if config.shuffle_bn in ("auto", "split"):
            convert_to_split_batch_norm(self.encoder_q)
            convert_to_split_batch_norm(self.encoder_k)
        self.register_buffer("queue", torch.empty(config.queue_size, config.dim))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        if self.queue.device.type != "meta":
            # A new model: the key encoder starts as a copy of the query encoder, both with timm's init.
            self.encoder_k.load_state_dict(self.encoder_q.state_dict())
            keep_timm_initialisation(self.encoder_q)
            keep_timm_initialisation(self.encoder_k)
        self.encoder_k.requires_grad_(False)  # updated by the momentum rule only
        self._has_batch_norm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.encoder_q.modules())
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs) -> MocoModel:
        check_is_moco_model(pretrained_model_name_or_path)  # one line for a training checkpoint or a timm export
        wants_info = kwargs.pop("output_loading_info", False)
        try:
            model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True,
                                                  **kwargs)  # fmt: skip
        except RuntimeError as error:
            if "mismatched" not in str(error):
                raise
            raise ValueError(describe_shape_mismatch(pretrained_model_name_or_path, kwargs)) from error
        if "queue" not in info["missing_keys"] and model.config.queue_size > 0:
            check_queue_holds_keys(model.queue, pretrained_model_name_or_path)
        if "queue" in info["missing_keys"] and model.config.queue_size > 0:
            logger.warning(  # said out loud: a fresh dictionary changes what the next steps compare against
                f"The weights in {pretrained_model_name_or_path} have no `queue`: a fresh random queue of "
                f"{model.config.queue_size} keys was made (the queue size its config.json states)."
            )
        model.encoder_k.requires_grad_(False)  # loading rebuilds parameters with requires_grad=True
        return (model, info) if wants_info else model

    @property
    def base_model(self) -> nn.Module:
        """The query encoder's backbone, the network users transfer: its pooled output is `get_image_features`'s
        `pooler_output` (not the query encoder with its projection head, which `base_model_prefix` names)."""
        return self.encoder_q.backbone

    @property
    def num_features(self) -> int:
        """Width of the backbone features returned by `get_image_features`."""
        return self.encoder_q.backbone.num_features

    # ---- MoCo, step by step -------------------------------------------------------------------------------

    @torch.no_grad()
    def _momentum_update_key_encoder(self) -> None:
        """theta_k <- m * theta_k + (1 - m) * theta_q, one fused op over all parameters.

        Buffers (BatchNorm running statistics) are not averaged: as in the official code, the key encoder keeps
        its own, tracked from the key batches it normalises; in training mode they do not affect its output.
        """
        key_params = list(self.encoder_k.parameters())
        query_params = [p.detach() for p in self.encoder_q.parameters()]
        torch._foreach_lerp_(key_params, query_params, 1.0 - self.key_momentum)

    @torch.no_grad()
    def _batch_shuffle_ddp(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather the key images of all processes, permute them (permutation from rank 0), keep this rank's shard."""
        x_all = concat_all_gather(x)
        idx_shuffle = torch.randperm(x_all.shape[0], device=x.device)
        dist.broadcast(idx_shuffle, src=0)
        idx_unshuffle = torch.argsort(idx_shuffle)
        idx_this = idx_shuffle.view(dist.get_world_size(), -1)[dist.get_rank()]
        return x_all[idx_this], idx_unshuffle

    @torch.no_grad()
    def _batch_unshuffle_ddp(self, x: torch.Tensor, idx_unshuffle: torch.Tensor) -> torch.Tensor:
        """Undo `_batch_shuffle_ddp`: gather the shuffled keys and take back this rank's own."""
        x_all = concat_all_gather(x)
        idx_this = idx_unshuffle.view(dist.get_world_size(), -1)[dist.get_rank()]
        return x_all[idx_this]

    @torch.no_grad()
    def _encode_keys(self, im_k: torch.Tensor, shuffle_bn: str) -> torch.Tensor:
        """Normalised keys (N, dim) from the key encoder, with the batch shuffled for BatchNorm."""
        if shuffle_bn == "ddp":
            im_k, idx_unshuffle = self._batch_shuffle_ddp(im_k)
            return self._batch_unshuffle_ddp(F.normalize(self.encoder_k(im_k), dim=1), idx_unshuffle)
        if shuffle_bn == "split":
            idx_shuffle = torch.randperm(im_k.shape[0], device=im_k.device)
            k = F.normalize(self.encoder_k(im_k[idx_shuffle]), dim=1)
            return k[torch.argsort(idx_shuffle)]
        return F.normalize(self.encoder_k(im_k), dim=1)

    def _contrastive_logits(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits divided by T and the index of each row's positive.

        With a queue: (N, 1 + K), column 0 is q.k+ and the rest q against the queued keys (labels all 0). Without
        (`queue_size=0`): (N, world_size * N), q against the keys of the whole global batch; the positive of row i
        is this process's i-th key.
        """
        q = q / self.config.softmax_temperature  # dividing (N, dim) costs less than dividing (N, 1 + K) logits
        if self.config.queue_size == 0:
            keys = concat_all_gather(k)
            offset = q.shape[0] * (dist.get_rank() if is_distributed() else 0)
            labels = torch.arange(q.shape[0], device=q.device) + offset
            return q @ keys.T.to(q.dtype), labels
        l_pos = (q * k).sum(dim=1, keepdim=True)
        # clone: the queue is updated in place after this, and autograd keeps it for the gradient of q.
        l_neg = q @ self.queue.clone().T.to(q.dtype)
        labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        return torch.cat([l_pos, l_neg], dim=1), labels

    def _contrastive_loss(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """InfoNCE of queries against their keys; with `symmetric_loss`, scaled by 2T (MoCo v3's `ctr`)."""
        logits, labels = self._contrastive_logits(q, k)
        loss = F.cross_entropy(logits.float(), labels)
        if self.config.symmetric_loss:
            loss = 2 * self.config.softmax_temperature * loss
        return loss, logits, labels

    def _query(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Normalised queries: query encoder, then (v3) the predictor."""
        q = self.encoder_q(pixel_values)
        return F.normalize(self.predictor(q) if self.predictor is not None else q, dim=1)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys: torch.Tensor) -> None:
        """Write the keys of all processes at `queue_ptr`, wrapping around the end of the queue.

        Works for any global batch size B: when K is not a multiple of B the write wraps; when B > K only the
        newest K keys are kept. Indices are computed on the device (no host synchronisation).
        """
        queue_size = self.queue.shape[0]
        if queue_size == 0:  # in-batch negatives: nothing to keep, so no gather either
            return
        keys = concat_all_gather(keys)
        batch_size = keys.shape[0]
        skipped = max(batch_size - queue_size, 0)
        keys = keys[skipped:]
        positions = torch.arange(keys.shape[0], device=keys.device)
        rows = (self.queue_ptr + skipped + positions) % queue_size
        self.queue.index_copy_(0, rows, keys.to(self.queue.dtype))
        self.queue_ptr.copy_((self.queue_ptr + batch_size) % queue_size)

    # ---- public API -------------------------------------------------------------------------------------------

    def resolve_shuffle_bn(self) -> str:
        """The shuffle mode in force now: `config.shuffle_bn`, with `"auto"` resolved."""
        mode = self.config.shuffle_bn
        if mode == "auto":
            mode = "ddp" if is_distributed() else "split"
        if mode == "ddp" and not is_distributed():
            raise RuntimeError(
                "shuffle_bn='ddp' needs torch.distributed with more than one process; "
                "use 'split' (or 'auto') on a single process."
            )
        return mode

    def get_image_features(self, pixel_values: torch.Tensor) -> BaseModelOutputWithPooling:
        """Query backbone features: `last_hidden_state` as timm's `forward_features`, `pooler_output` (N, F)."""
        pixel_values = self._prepare_images(pixel_values, "pixel_values")
        backbone = self.encoder_q.backbone
        hidden = backbone.forward_features(pixel_values)
        return BaseModelOutputWithPooling(
            last_hidden_state=hidden, pooler_output=backbone.forward_head(hidden, pre_logits=True)
        )

    def forward(
        self, pixel_values: torch.Tensor, key_pixel_values: torch.Tensor | None = None, **kwargs
    ) -> MocoOutput | BaseModelOutputWithPooling:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(N, C, H, W)`): the query view (or the images to embed).
            key_pixel_values (`torch.FloatTensor` of shape `(N, C, H, W)`, *optional*): the key view of the same
                N images. Without it, returns the query backbone's features (see `get_image_features`).
        """
        if key_pixel_values is None:
            return self.get_image_features(pixel_values)
        pixel_values = self._prepare_images(pixel_values, "pixel_values")
        key_pixel_values = self._prepare_images(key_pixel_values, "key_pixel_values")
        if key_pixel_values.shape[0] != pixel_values.shape[0]:
            raise ValueError(
                f"pixel_values and key_pixel_values must hold the same images: got batch sizes "
                f"{pixel_values.shape[0]} and {key_pixel_values.shape[0]}."
            )
        if self.training and pixel_values.shape[0] < 2 and self._has_batch_norm:
            raise ValueError("training needs at least 2 images per batch: BatchNorm cannot normalise a single one.")
        shuffle_bn = self.resolve_shuffle_bn()
        symmetric = self.config.symmetric_loss
        splits = batch_norm_groups(pixel_values.shape[0], self.config.num_splits) if shuffle_bn == "split" else 1
        with self._batch_norm_splits(splits):
            q = self._query(pixel_values)
            q_swapped = self._query(key_pixel_values) if symmetric else None
            with torch.no_grad():
                if self.training:
                    self._momentum_update_key_encoder()
                k_swapped = self._encode_keys(pixel_values, shuffle_bn) if symmetric else None  # Algorithm 1's k1
                k = self._encode_keys(key_pixel_values, shuffle_bn)
        loss, logits, labels = self._contrastive_loss(q, k)
        if symmetric:  # the key view as query, against the query view's key: ctr(q1, k2) + ctr(q2, k1)
            loss = loss + self._contrastive_loss(q_swapped, k_swapped)[0]
        if self.training:
            self._dequeue_and_enqueue(torch.cat([k, k_swapped]) if symmetric else k)
        return MocoOutput(loss=loss, logits=logits, labels=labels, q=q, k=k)

    # ---- helpers ----------------------------------------------------------------------------------------------

    @contextmanager
    def _batch_norm_splits(self, num_splits: int) -> Iterator[None]:
        layers = [m for m in self.modules() if isinstance(m, SplitBatchNorm2d)]
        for layer in layers:
            layer.num_splits = num_splits
        try:
            yield
        finally:
            for layer in layers:
                layer.num_splits = 1


class MocoForImageClassification(MocoPreTrainedModel):
    """The query encoder's backbone with a linear classifier on its pooled features: the model to fine-tune (or
    probe) on labelled images after pretraining, as transformers' `XForImageClassification` models.

    `from_pretrained(<a saved MocoModel>, num_labels=10, id2label=...)` loads the query backbone and starts a new
    classifier; the key encoder, projection head and queue only serve pretraining and are left out. The loss follows
    `config.problem_type` (single-label cross-entropy, multi-label BCE, regression MSE; inferred from the labels when
    unset), as in transformers. The whole network trains by default (fine-tuning); `freeze_backbone()` gives the
    linear protocol of MoCo's `main_lincls.py`.
    """

    _keys_to_ignore_on_load_unexpected = PRETRAINING_ONLY_KEYS
    _keys_to_ignore_on_load_missing = [r"^classifier\."]  # new when loading a MocoModel: said in one line instead

    def __init__(self, config: MocoConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.backbone = build_backbone(config)
        self.classifier = nn.Linear(self.backbone.num_features, config.num_labels) if config.num_labels > 0 \
            else nn.Identity()  # fmt: skip
        self.backbone_frozen = False
        if next(self.backbone.parameters()).device.type != "meta":  # a new model, not one being loaded
            keep_timm_initialisation(self.backbone)
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs) -> MocoForImageClassification:
        check_is_moco_model(pretrained_model_name_or_path)
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        loaded = model[0] if isinstance(model, tuple) else model
        if "MocoModel" in (loaded.config.architectures or []):
            logger.warning(
                f"Loaded the query backbone of the MocoModel in {pretrained_model_name_or_path}; its key encoder, "
                f"projection head and queue serve pretraining only and were left out. The classifier "
                f"({loaded.num_labels} labels) is new: train it."
            )
            loaded.config.architectures = [cls.__name__]
        return model

    @property
    def base_model(self) -> nn.Module:
        """The timm backbone (as `MocoModel.base_model`, the network that transfers)."""
        return self.backbone

    @property
    def label_names(self) -> list[str]:
        """The class names in output order (`config.id2label`)."""
        return [self.config.id2label[index] for index in range(self.num_labels)]

    def push_to_hub(
        self,
        repo_id: str,
        *,
        eval_metrics: dict[str, float] | None = None,
        eval_dataset: str | None = None,
        eval_split: str = "test",
        **kwargs: Any,
    ) -> str:
        """`PreTrainedModel.push_to_hub` with moco-hf's model card for a classifier (README.md): the task
        (image-classification), the labels, and the accuracy in `eval_metrics` (a dict as `Trainer.evaluate()`
        returns: `eval_accuracy` as a fraction), measured on `eval_split` of `eval_dataset`. `kwargs`: those of
        `PreTrainedModel.push_to_hub` (`private`, `token`, `revision`, `create_pr`, `commit_message`, ...).
        Loaded as remote code, where moco_hf is not installed: transformers' push and card."""
        try:  # by name, not a relative import: the remote code of this file must not carry the Hub tooling
            hub_upload = importlib.import_module("moco_hf.hub_upload")
        except ImportError:
            return super().push_to_hub(repo_id, **kwargs)
        return hub_upload.push_classifier(self, repo_id, eval_metrics, eval_dataset, eval_split, **kwargs)

    def freeze_backbone(self, frozen: bool = True) -> None:
        """The linear protocol: only the classifier trains; the backbone takes no gradient and stays in eval mode
        (its BatchNorm statistics are not updated), as in MoCo's `main_lincls.py`. `frozen=False` undoes it."""
        self.backbone.requires_grad_(not frozen)
        self.backbone_frozen = frozen
        self.train(self.training)

    def train(self, mode: bool = True) -> MocoForImageClassification:
        super().train(mode)
        if self.backbone_frozen:
            self.backbone.eval()
        return self

    def forward(
        self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None, **kwargs: Any
    ) -> ImageClassifierOutput:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(N, C, H, W)`): normalised images.
            labels (`torch.Tensor`, *optional*): targets, `(N,)` class ids (`torch.LongTensor`), or `(N, num_labels)`
                floats for multi-label or regression; the loss follows `config.problem_type`.

        Returns: [`ImageClassifierOutput`] with `logits` `(N, num_labels)` and `loss` when `labels` are given.
        """
        features = self.backbone(self._prepare_images(pixel_values, "pixel_values"))
        logits = self.classifier(features)
        loss = None
        if labels is not None:
            loss = self.loss_function(labels=labels, pooled_logits=logits, config=self.config)
        return ImageClassifierOutput(loss=loss, logits=logits)
