"""The MoCo encoder in detectors and segmenters: `MocoBackbone` (transformers' backbone API) under UperNet and DETR,
and the torchvision and detectron2 exports. References are independent of `moco_hf`: timm networks built from the
saved safetensors file, ResNet stages run by hand, torchvision's own ResNet, and a transcription of detectron2's
ResNet parameter names and shapes."""

import json
import pickle
import re

import pytest
import timm
import torch
import torchvision
from conftest import FAST_TRAINING, run_pretrain
from doc_examples import example
from huggingface_hub.errors import HFValidationError
from safetensors.torch import load_file
from torch import nn
from transformers import (
    AutoBackbone,
    DetrConfig,
    DetrForObjectDetection,
    UperNetConfig,
    UperNetForSemanticSegmentation,
)

from moco_hf import MocoBackbone, MocoConfig, MocoModel
from moco_hf.cli import main as moco_hf_cli

VIT = {"backbone": "vit_tiny_patch16_224", "backbone_kwargs": {"img_size": 32, "patch_size": 8}}


@pytest.fixture(scope="module")
def trainer_folder(small_dataset, tmp_path_factory):
    """The model folder of a short real pretraining (CIFAR stem), as the trainer writes it."""
    out = tmp_path_factory.mktemp("backbone") / "run"
    result = run_pretrain(*FAST_TRAINING, "--backbone", "resnet18", "--cifar_stem", "--dataset_name",
                          str(small_dataset), "--output_dir", str(out), "--max_train_steps", "3", "--knn_monitor",
                          "false")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return out / "model"


def saved_model(folder, cifar_tensor, **config_fields):
    """A MocoModel after two contrastive steps' forward passes on real images (so BatchNorm statistics are not the
    initial ones), saved with save_pretrained."""
    torch.manual_seed(0)
    model = MocoModel(MocoConfig(queue_size=64, image_size=32, **config_fields)).train()
    with torch.no_grad():
        for _ in range(2):
            model(pixel_values=cifar_tensor[:16], key_pixel_values=cifar_tensor[16:32])
    model.save_pretrained(folder)
    return folder


def timm_network_of(folder) -> nn.Module:
    """The query backbone rebuilt with timm alone from config.json and model.safetensors."""
    config = json.loads((folder / "config.json").read_text())
    network = timm.create_model(config["backbone"], num_classes=0, **config["backbone_kwargs"])
    if config["cifar_stem"]:  # the CIFAR demo's stem: 3x3/1 conv1, no max-pool
        network.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        network.maxpool = nn.Identity()
    prefix = "encoder_q.backbone."
    weights = {k.removeprefix(prefix): v for k, v in load_file(folder / "model.safetensors").items() if
               k.startswith(prefix)}  # fmt: skip
    network.load_state_dict(weights)
    return network.eval()


def resnet_stages_by_hand(network: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """ResNet's five stages (stem activation, layer1-4), each module called in turn."""
    stem = network.act1(network.bn1(network.conv1(images)))
    maps, x = [stem], network.maxpool(stem)
    for layer in (network.layer1, network.layer2, network.layer3, network.layer4):
        x = layer(x)
        maps.append(x)
    return maps


@pytest.mark.parametrize("kind", ["resnet18 CIFAR stem, trainer", "resnet18", "ViT"])
def test_feature_maps_are_timms_of_the_saved_weights(kind, trainer_folder, cifar_tensor, tmp_path):
    if kind.endswith("trainer"):
        folder = trainer_folder
    else:
        fields = VIT if kind == "ViT" else {"backbone": "resnet18"}
        folder = saved_model(tmp_path / "model", cifar_tensor, **fields)
    network = timm_network_of(folder)
    stages = list(range(len(network.feature_info)))
    backbone = MocoBackbone.from_pretrained(folder, out_indices=stages).eval()
    images = cifar_tensor[:8]
    with torch.no_grad():
        maps = backbone(images).feature_maps
        expected = network.forward_intermediates(images, indices=stages, intermediates_only=True)
    assert backbone.stage_names == [info["module"] for info in network.feature_info]
    assert len(maps) == len(expected) == len(stages)
    for got, want in zip(maps, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    if kind == "ViT":
        assert maps[-1].shape == (8, 192, 4, 4)  # one map per block: 32 px / patch 8, without the class token
        return
    with torch.no_grad():
        by_hand = resnet_stages_by_hand(network, images)
    for got, want in zip(maps, by_hand, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    sizes = [m.shape[-1] for m in maps]
    assert sizes == ([32, 32, 16, 8, 4] if "CIFAR" in kind else [16, 8, 4, 2, 1])
    assert backbone.channels == [64, 64, 128, 256, 512]


def test_stages_are_chosen_by_index_or_name_and_bad_choices_get_one_line(tmp_path, cifar_tensor):
    folder = saved_model(tmp_path / "model", cifar_tensor, backbone="resnet18")
    default = MocoBackbone.from_pretrained(folder)
    assert default.out_features == ["layer4"] and default.channels == [512]  # transformers' default: the last stage
    by_name = MocoBackbone.from_pretrained(folder, out_features=["layer2", "layer4"])
    assert by_name.out_indices == [2, 4] and by_name.channels == [128, 512]
    assert MocoBackbone.from_pretrained(folder, out_indices=[-2, -1]).out_features == ["layer3", "layer4"]
    with pytest.raises(ValueError, match=r"out_indices \[5\] out of range for the 5 stages of resnet18"):
        MocoBackbone.from_pretrained(folder, out_indices=[5])
    with pytest.raises(ValueError, match=r"out_features \['stage9'\] are not stages of resnet18"):
        MocoBackbone.from_pretrained(folder, out_features=["stage9"])


@pytest.mark.xfail(raises=HFValidationError, strict=True,
                   reason="transformers 5.24 and 5.25: AutoBackbone.from_pretrained asks the Hub whether a local "
                          "folder is a repo; MocoBackbone.from_pretrained loads folders, AutoBackbone loads Hub repos "
                          "(tests/hub_roundtrip.py)")  # fmt: skip
def test_auto_backbone_loads_a_local_folder(tmp_path, cifar_tensor):
    folder = saved_model(tmp_path / "model", cifar_tensor, backbone="resnet18")
    assert isinstance(AutoBackbone.from_pretrained(str(folder)), MocoBackbone)


def assert_holds_the_moco_weights(module: nn.Module, folder) -> None:
    """Every tensor of the saved query backbone is in `module`, equal (BatchNorm counters aside)."""
    prefix = "encoder_q.backbone."
    state = module.state_dict()
    saved = {k.removeprefix(prefix): v for k, v in load_file(folder / "model.safetensors").items()
             if k.startswith(prefix) and not k.endswith("num_batches_tracked")}  # fmt: skip
    for key, value in saved.items():
        assert torch.equal(state[key], value), key


def train_steps(model: nn.Module, inputs: dict, steps: int) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**inputs).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def assert_round_trip(model: nn.Module, inputs: dict, folder) -> None:
    model.eval()
    model.save_pretrained(folder)
    reloaded = type(model).from_pretrained(folder).eval()
    assert isinstance(reloaded.config.backbone_config, MocoConfig)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, model(**inputs).logits, atol=1e-5, rtol=0)


def test_upernet_segments_with_the_moco_backbone(trainer_folder, cifar_tensor, tmp_path):
    backbone = MocoBackbone.from_pretrained(trainer_folder, out_indices=[1, 2, 3, 4])
    config = UperNetConfig(backbone_config=backbone.config, hidden_size=32, num_labels=2, use_auxiliary_head=False)
    model = UperNetForSemanticSegmentation(config)
    model.backbone.load_state_dict(backbone.state_dict())  # the README's one line
    assert_holds_the_moco_weights(model.backbone.backbone, trainer_folder)
    images = cifar_tensor[:8]
    labels = (images.mean(dim=1) > 0).long()  # made-up masks: the brighter pixels of real images
    losses = train_steps(model, {"pixel_values": images, "labels": labels}, steps=4)
    assert losses[-1] < losses[0], losses
    assert_round_trip(model, {"pixel_values": images}, tmp_path / "upernet")


def test_detr_detects_with_the_moco_backbone(trainer_folder, cifar_tensor, tmp_path):
    backbone = MocoBackbone.from_pretrained(trainer_folder)
    config = DetrConfig(use_timm_backbone=False, backbone_config=backbone.config, num_queries=4, d_model=32,
                        encoder_layers=1, decoder_layers=1, encoder_ffn_dim=32, decoder_ffn_dim=32,
                        encoder_attention_heads=2, decoder_attention_heads=2, num_labels=2)  # fmt: skip
    model = DetrForObjectDetection(config)
    model.model.backbone.model.load_state_dict(backbone.state_dict())  # BatchNorm frozen by DETR, same tensors
    assert_holds_the_moco_weights(model.model.backbone.model.backbone, trainer_folder)
    images = cifar_tensor[:4]
    labels = [{"class_labels": torch.tensor([i % 2]), "boxes": torch.tensor([[0.5, 0.5, 0.6, 0.6]])} for i in range(4)]
    losses = train_steps(model, {"pixel_values": images, "labels": labels}, steps=4)
    assert losses[-1] < losses[0], losses
    assert_round_trip(model, {"pixel_values": images}, tmp_path / "detr")


def test_torchvision_export_loads_strictly_with_the_same_features(tmp_path, cifar_tensor):
    folder = saved_model(tmp_path / "model", cifar_tensor, backbone="resnet18")
    assert moco_hf_cli(["export", str(folder), str(tmp_path / "r18.pth"), "--format", "torchvision"]) == 0
    weights = torch.load(tmp_path / "r18.pth", weights_only=True)
    resnet = torchvision.models.resnet18()
    resnet.fc = nn.Identity()
    resnet.load_state_dict(weights)  # strict
    moco = MocoModel.from_pretrained(folder).eval()
    images = cifar_tensor[:8]
    with torch.no_grad():
        torch.testing.assert_close(resnet.eval()(images), moco.get_image_features(images).pooler_output,
                                   atol=1e-5, rtol=0)  # fmt: skip
    # torchvision's detection models take it as their ResNet body, strictly too.
    detection_backbone = torchvision.models.detection.backbone_utils.resnet_fpn_backbone(
        backbone_name="resnet18", weights=None, trainable_layers=5
    )
    detection_backbone.body.load_state_dict(weights)
    detector = torchvision.models.detection.FasterRCNN(detection_backbone, num_classes=3, min_size=64, max_size=64)
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 24.0, 24.0]]), "labels": torch.tensor([1])} for _ in range(2)]
    losses = detector.train()(list(images[:2]), targets)
    assert all(torch.isfinite(loss) for loss in losses.values())


def detectron2_resnet_parameters(depth: int) -> dict[str, tuple[int, ...]]:
    """detectron2's ResNet (`build_resnet_backbone`, `BasicStem`, `BasicBlock`/`BottleneckBlock`, FrozenBN) names and
    shapes, transcribed from its structure: stem `stem.conv1` 7x7, stages `res2`-`res5`, a `shortcut` conv where
    the channels or the stride change, each conv followed by `.norm`."""
    blocks = {18: [2, 2, 2, 2], 50: [3, 4, 6, 3]}[depth]
    bottleneck = depth >= 50
    parameters: dict[str, tuple[int, ...]] = {}

    def conv(name: str, out_channels: int, in_channels: int, kernel: int) -> None:
        parameters[f"{name}.weight"] = (out_channels, in_channels, kernel, kernel)
        for statistic in ("weight", "bias", "running_mean", "running_var"):
            parameters[f"{name}.norm.{statistic}"] = (out_channels,)

    conv("stem.conv1", 64, 3, 7)
    in_channels = 64
    for stage, count in enumerate(blocks):
        width = 64 * 2**stage
        out_channels = width * 4 if bottleneck else width
        for block in range(count):
            name = f"res{stage + 2}.{block}"
            if block == 0 and (in_channels != out_channels or stage > 0):
                conv(f"{name}.shortcut", out_channels, in_channels, 1)
            if bottleneck:
                conv(f"{name}.conv1", width, in_channels, 1)
                conv(f"{name}.conv2", width, width, 3)
                conv(f"{name}.conv3", out_channels, width, 1)
            else:
                conv(f"{name}.conv1", width, in_channels, 3)
                conv(f"{name}.conv2", width, width, 3)
            in_channels = out_channels
    return parameters


@pytest.mark.parametrize("depth", [18, 50])
def test_detectron2_export_has_detectron2s_resnet_names_and_shapes(depth, tmp_path):
    folder = tmp_path / "model"
    MocoModel(MocoConfig(backbone=f"resnet{depth}", queue_size=64)).save_pretrained(folder)
    assert moco_hf_cli(["export", str(folder), str(tmp_path / "r.pkl"), "--format", "detectron2"]) == 0
    with (tmp_path / "r.pkl").open("rb") as file:
        exported = pickle.load(file)
    assert exported["matching_heuristics"] is True
    shapes = {name: tuple(array.shape) for name, array in exported["model"].items()}
    assert shapes == detectron2_resnet_parameters(depth)
    saved = load_file(folder / "model.safetensors")
    assert (exported["model"]["res3.0.shortcut.norm.running_var"] ==
            saved["encoder_q.backbone.layer2.0.downsample.1.running_var"].numpy()).all()  # fmt: skip


@pytest.mark.parametrize(("fields", "message"), [
    ({"backbone": "resnet18", "cifar_stem": True}, "CIFAR stem"),
    (VIT, "only timm ResNets that torchvision also defines"),
])  # fmt: skip
@pytest.mark.parametrize("export_format", ["torchvision", "detectron2"])
def test_exports_refuse_what_the_target_cannot_express(fields, message, export_format, tmp_path, capsys):
    folder = tmp_path / "model"
    MocoModel(MocoConfig(queue_size=64, image_size=32, **fields)).save_pretrained(folder)
    assert moco_hf_cli(["export", str(folder), str(tmp_path / "out"), "--format", export_format]) == 2
    stderr = capsys.readouterr().err
    (error,) = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert message in error and "Traceback" not in stderr
    assert not (tmp_path / "out").exists()


def test_the_docs_example_builds_upernet_and_detr_on_a_trained_model(trainer_folder):
    code = example("docs/using-encoders.md", "backbone")
    code = code.replace('"outputs/cifar10-resnet18/model"', f'"{trainer_folder}"')  # the main job's kind of folder
    namespace: dict = {}
    exec(compile(code, "docs/using-encoders.md", "exec"), namespace)  # the example as a user would paste it
    maps, backbone = namespace["maps"], namespace["backbone"]
    assert [m.shape[1] for m in maps] == backbone.channels == [64, 128, 256, 512]
    assert [m.shape[-1] for m in maps] == [32, 16, 8, 4]  # the CIFAR stem keeps full resolution through layer1
    assert_holds_the_moco_weights(namespace["segmenter"].backbone.backbone, trainer_folder)
    assert_holds_the_moco_weights(namespace["detector"].model.backbone.model.backbone, trainer_folder)


def test_the_model_card_of_a_trained_model_says_how_and_its_code_runs(trainer_folder):
    card = (trainer_folder / "README.md").read_text()
    (code,) = [block for block in re.findall(r"```python\n(.*?)```", card, re.DOTALL) if "MocoBackbone" in block]
    repo_id = re.search(r'MocoBackbone.from_pretrained\("([^"]+)"', code).group(1)
    namespace: dict = {}
    exec(compile(code.replace(f'"{repo_id}"', f'"{trainer_folder}"'), "README.md", "exec"), namespace)
    assert namespace["backbone"].out_features == ["layer1", "layer2", "layer3", "layer4"]
    assert_holds_the_moco_weights(namespace["model"].backbone.backbone, trainer_folder)
