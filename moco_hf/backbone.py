"""The MoCo query encoder as a transformers backbone: multi-scale feature maps for detectors and segmenters.

`AutoBackbone.from_pretrained(<a saved MocoModel>)` gives a `MocoBackbone` holding the query encoder's timm backbone
with the trained weights (the key encoder, projection head and queue are left out). It follows transformers'
backbone API (`BackboneMixin`: `stage_names`, `out_features`/`out_indices`, `channels`, `BackboneOutput`), so
UperNet, DETR and the other models that take a `backbone_config` build on it. The stages are timm's `feature_info`
(ResNet: `act1`, `layer1` ... `layer4`; ViT: one per block, `blocks.0` ...), computed by timm's
`forward_intermediates` (ViT maps in `(N, C, H/patch, W/patch)`, without the class token).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.backbone_utils import BackboneMixin
from transformers.modeling_outputs import BackboneOutput

from .configuration_moco import MocoConfig
from .modeling_moco import PRETRAINING_ONLY_KEYS, MocoPreTrainedModel, build_backbone, keep_timm_initialisation


class MocoBackbone(BackboneMixin, MocoPreTrainedModel):
    """The query encoder's timm backbone, returning the feature maps of the stages in `config.out_indices`.

    `config.out_indices` (or `out_features`, stage names) chooses them; default: the last stage, as transformers'
    backbones do. Pass them when loading, e.g. `AutoBackbone.from_pretrained(path, out_indices=[1, 2, 3, 4])` for
    the four ResNet stages that UperNet or an FPN read.
    """

    has_attentions = False
    # A MocoModel checkpoint also holds what a backbone does not use: the head, the key encoder, the queue.
    _keys_to_ignore_on_load_unexpected = PRETRAINING_ONLY_KEYS

    def __init__(self, config: MocoConfig, out_indices: list[int] | None = None,
                 out_features: list[str] | None = None) -> None:  # fmt: skip
        if out_indices is not None or out_features is not None:
            config.out_indices, config.out_features = out_indices, out_features
        MocoPreTrainedModel.__init__(self, config)  # BackboneMixin's own __init__ expects a backbone config class
        self.backbone = build_backbone(config)
        if not hasattr(self.backbone, "forward_intermediates"):
            raise ValueError(f"{config.backbone!r} has no forward_intermediates in timm: it cannot be a backbone.")
        self.stage_names = [stage["module"] for stage in self.backbone.feature_info]
        self.num_features = [stage["num_chs"] for stage in self.backbone.feature_info]
        self._out_indices = self._chosen_stages(config)
        if next(self.backbone.parameters()).device.type != "meta":  # a new model, not one being loaded
            keep_timm_initialisation(self.backbone)
        self.post_init()

    def _chosen_stages(self, config: MocoConfig) -> list[int]:
        """Stage indices from `config.out_features` (names) or `config.out_indices` (negative ones count from the
        end), checked against `stage_names`."""
        names, indices = getattr(config, "out_features", None), getattr(config, "out_indices", None)
        if names is not None:
            unknown = [name for name in names if name not in self.stage_names]
            if unknown:
                raise ValueError(f"out_features {unknown} are not stages of {config.backbone}: {self.stage_names}.")
            indices = [self.stage_names.index(name) for name in names]
        indices = [-1] if indices is None else list(indices)
        count = len(self.stage_names)
        if any(not -count <= index < count for index in indices):
            raise ValueError(f"out_indices {indices} out of range for the {count} stages of {config.backbone}: "
                             f"{self.stage_names}.")  # fmt: skip
        positive = [index % count for index in indices]
        if positive != sorted(set(positive)):
            raise ValueError(f"out_indices must be increasing and without repeats, got {indices}.")
        config.out_indices, config.out_features = positive, [self.stage_names[i] for i in positive]
        return positive

    @property
    def out_indices(self) -> list[int]:
        return self._out_indices

    @property
    def out_features(self) -> list[str]:
        return [self.stage_names[index] for index in self._out_indices]

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> BackboneOutput | tuple:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(N, C, H, W)`): normalised images.
            output_hidden_states (`bool`, *optional*): also return every stage's map as `hidden_states`.

        Returns: [`BackboneOutput`] with `feature_maps`, one `(N, channels[i], H_i, W_i)` map per chosen stage.
        """
        if output_attentions:
            raise ValueError("MocoBackbone cannot return attentions.")
        output_hidden_states = output_hidden_states if output_hidden_states is not None else \
            self.config.output_hidden_states  # fmt: skip
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        stages = list(range(len(self.stage_names))) if output_hidden_states else self._out_indices
        maps = self.backbone.forward_intermediates(pixel_values.to(self.dtype), indices=stages,
                                                   intermediates_only=True)  # fmt: skip
        by_stage = dict(zip(stages, maps, strict=True))
        feature_maps = tuple(by_stage[index] for index in self._out_indices)
        hidden_states = tuple(maps) if output_hidden_states else None
        if not return_dict:
            return (feature_maps, hidden_states) if output_hidden_states else (feature_maps,)
        return BackboneOutput(feature_maps=feature_maps, hidden_states=hidden_states, attentions=None)
