"""Images that are not RGB, in the model (issue 41, its first part): `MocoConfig.num_channels` builds every network
path for N input bands: save and reload, the timm export, MocoBackbone, and the conversion of an official checkpoint
whose first convolution takes 13 bands (the layout of SSL4EO-S12's Sentinel-2 MoCo checkpoints)."""

import pytest
import timm
import torch
import torchvision
from transformers import AutoModel

from moco_hf import MocoBackbone, MocoConfig, MocoModel, export_encoder
from moco_hf.cli import main as moco_hf_cli


def bands_of(images: torch.Tensor, count: int) -> torch.Tensor:
    """(N, count, H, W) bands that are known functions of real images: the three colours, then sums and differences
    of them with a little noise, as a multispectral sensor's neighbouring bands are."""
    torch.manual_seed(0)
    red, green, blue = images.unbind(dim=1)
    derived = [red - green, green - blue, red + blue, (red + green + blue) / 3]
    extra = [derived[i % len(derived)] + 0.05 * torch.randn_like(red) for i in range(max(0, count - 3))]
    return torch.stack([red, green, blue, *extra][:count], dim=1) if count >= 3 else images.mean(1, keepdim=True)


@pytest.mark.parametrize("bands", [1, 13])
def test_a_model_of_n_bands_saves_reloads_exports_and_gives_feature_maps(bands, cifar_tensor, tmp_path):
    config = MocoConfig.from_preset("v2", backbone="resnet18", queue_size=64, image_size=32, num_channels=bands,
                                    image_mean=[0.0] * bands, image_std=[1.0] * bands)  # fmt: skip
    model = MocoModel(config).eval()
    images = bands_of(cifar_tensor[:4], bands)
    with torch.no_grad():
        features = model.get_image_features(images).pooler_output
    model.save_pretrained(tmp_path / "model")
    reloaded = AutoModel.from_pretrained(tmp_path / "model").eval()
    assert reloaded.config.num_channels == bands
    export_encoder(model, tmp_path / "timm")
    encoder = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
    assert encoder.pretrained_cfg["input_size"] == (bands, 32, 32)
    backbone = MocoBackbone.from_pretrained(tmp_path / "model", out_indices=[1, 4]).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded.get_image_features(images).pooler_output, features, atol=1e-5, rtol=0)
        torch.testing.assert_close(encoder(images), features, atol=1e-5, rtol=0)
        maps = backbone(images).feature_maps
    assert [tuple(m.shape) for m in maps] == [(4, 64, 8, 8), (4, 512, 1, 1)]
    with pytest.raises(ValueError, match=f"must have {bands} channels"):
        model.get_image_features(torch.zeros(1, 3 if bands != 3 else 1, 32, 32))


def test_mean_and_std_must_hold_one_value_per_band_and_in_chans_still_loads():
    with pytest.raises(ValueError, match=r"image_mean .* 13 numbers"):
        MocoConfig(backbone="resnet18", num_channels=13)  # ImageNet's 3 values for 13 bands
    older = MocoConfig(backbone="resnet18", backbone_kwargs={"in_chans": 1}, image_mean=[0.5], image_std=[0.2])
    assert older.num_channels == 1 and older.backbone_kwargs == {}


def test_convert_an_official_checkpoint_with_a_13_band_first_convolution(tmp_path, cifar_tensor, capsys):
    """An official-layout MoCo v2 checkpoint (torchvision ResNet-18 whose conv1 takes 13 bands): the converted model
    has 13 input channels and the reference network's features."""
    torch.manual_seed(0)
    reference = torchvision.models.resnet18()
    reference.conv1 = torch.nn.Conv2d(13, 64, kernel_size=7, stride=2, padding=3, bias=False)
    reference.fc = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.ReLU(), torch.nn.Linear(512, 128))
    state = {f"module.{encoder}.{key}": value.clone() for encoder in ("encoder_q", "encoder_k")
             for key, value in reference.state_dict().items()}  # fmt: skip
    state["module.queue"] = torch.nn.functional.normalize(torch.randn(128, 64), dim=0)
    state["module.queue_ptr"] = torch.tensor([0])
    torch.save({"arch": "resnet18", "state_dict": state}, tmp_path / "sentinel2.pth.tar")
    assert moco_hf_cli(["convert", str(tmp_path / "sentinel2.pth.tar"), str(tmp_path / "converted")]) == 0
    assert "13 input bands" in capsys.readouterr().out
    model = MocoModel.from_pretrained(tmp_path / "converted").eval()
    assert model.config.num_channels == 13 and model.config.image_mean == [0.0] * 13
    images = bands_of(torch.nn.functional.interpolate(cifar_tensor[:4], size=64), 13)
    reference.fc = torch.nn.Identity()
    with torch.no_grad():
        torch.testing.assert_close(model.get_image_features(images).pooler_output, reference.eval()(images),
                                   atol=1e-5, rtol=0)  # fmt: skip
