"""Images that are not RGB (issue 41). In the model: `MocoConfig.num_channels` builds every network path for N input
bands: save and reload, the timm export, MocoBackbone, and the conversion of an official checkpoint whose first
convolution takes 13 bands (the layout of SSL4EO-S12's Sentinel-2 MoCo checkpoints). In the data: 16-bit and
multi-band files and array columns read as float bands without loss, the band rules of bad input, the multiband
augmentation on both paths, the band image processor, and whole runs on 13-band and 16-bit data."""

import json
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import tifffile
import timm
import torch
import torchvision
from conftest import FAST_TRAINING, complete_checkpoints, run_pretrain
from datasets import Array3D, ClassLabel, Dataset, DatasetDict, Features
from PIL import Image
from timm.models import adapt_input_conv
from torchvision.transforms.v2.functional import pil_to_tensor
from transformers import AutoImageProcessor, AutoModel

from moco_hf import MocoBackbone, MocoConfig, MocoForImageClassification, MocoModel, export_encoder
from moco_hf.augmentation import build_two_crops
from moco_hf.batched_augmentation import OnDeviceTwoCrops, PerImageTwoCrops, adjust_brightness, adjust_contrast
from moco_hf.cli import main as moco_hf_cli
from moco_hf.data import (
    GlobalOrder,
    ImageReader,
    MapStyleBatches,
    StreamBatches,
    as_iterable,
    collate,
    dataset_fingerprint,
    find_image_column,
    usable_images,
)
from moco_hf.errors import DataError, UsageError
from moco_hf.pretraining import MocoTrainingArguments
from moco_hf.pretraining.arguments import build_config
from moco_hf.warm_start import load_pretrained_weights


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


# ---- data of N bands and their bit depth (issue 41, points 2-5) ----


def sixteen_bit_photo() -> np.ndarray:
    """A real photo (scikit-image's camera) at 16 bits with more than 256 levels: upsampled bilinearly in float, so
    that pixels fall between the 8-bit levels, then quantised to 0..65535."""
    camera = torch.from_numpy(skimage.data.camera()).float()[None, None]
    upsampled = torch.nn.functional.interpolate(camera, scale_factor=1.5, mode="bilinear", align_corners=False)
    return (upsampled[0, 0] * (65535 / 255)).round().to(torch.int32).numpy().astype(np.uint16)


def band_rows(cifar_images, count: int, bands: int) -> np.ndarray:
    """(count, bands, 32, 32) uint16 bands derived from real CIFAR images (`bands_of`), scaled to 16 bits."""
    images = torch.stack([pil_to_tensor(image) for image in cifar_images[0][:count]]).float() / 255
    return (bands_of(images, bands).clamp(0, 1) * 65535).round().numpy().astype(np.uint16)


def test_16_bit_grey_files_keep_every_level(tmp_path):
    photo = sixteen_bit_photo()
    assert len(np.unique(photo)) > 256
    png = tmp_path / "photo.png"
    Image.fromarray(photo).save(png)  # Pillow writes uint16 as a 16-bit grey PNG ("I;16")
    tifffile.imwrite(tmp_path / "photo.tif", photo)
    reader = ImageReader(num_channels=1, bands=True)
    expected = torch.from_numpy(photo.astype(np.float32) / 65535)[None]
    for file in (png, tmp_path / "photo.tif"):
        bands, reason = reader({"bytes": file.read_bytes(), "path": None})
        assert reason is None and bands.dtype == torch.float32 and bands.shape == (1, *photo.shape)
        torch.testing.assert_close(bands, expected, atol=0, rtol=0)
        assert len(bands.unique()) == len(np.unique(photo)) > 256
        pixels = OnDeviceTwoCrops("multiband", 64, [0.5], [0.25], max_short_side=10_000).loader_item(bands, seed=0)
        assert len(pixels["image"].unique()) > 256  # what the loader hands to the device is not 8-bit either


def test_array_columns_files_and_layouts_decode_to_the_same_bands(cifar_images, tmp_path):
    """The same 13-band images as an Array3D uint16 column (C, H, W), a numpy column stored (H, W, C), and TIFF
    files: every way gives the same float bands, scaled by 65535."""
    rows = band_rows(cifar_images, 4, 13)
    expected = torch.from_numpy(rows.astype(np.float32) / 65535)
    first = Dataset.from_dict({"image": rows}, features=Features({"image": Array3D((13, 32, 32), "uint16")}))
    last = Dataset.from_dict({"image": rows.transpose(0, 2, 3, 1)})  # nested lists of uint16, bands last
    for dataset, layout in ((first, "auto"), (first, "channels_first"), (last, "auto"), (last, "channels_last")):
        reader = ImageReader.for_column(dataset, find_image_column(dataset, None), 13, layout)
        decoded = torch.stack([image for _, image in usable_images(dataset, "image", reader)])
        torch.testing.assert_close(decoded, expected, atol=0, rtol=0)
    for index, row in enumerate(rows):
        tifffile.imwrite(tmp_path / f"{index}.tif", row, photometric="minisblack")  # band-interleaved, (C, H, W)
        tifffile.imwrite(tmp_path / f"{index}-last.tif", row.transpose(1, 2, 0), planarconfig="contig")
        for name in (f"{index}.tif", f"{index}-last.tif"):
            bands, reason = ImageReader(13, bands=True)({"bytes": None, "path": str(tmp_path / name)})
            assert reason is None, reason
            torch.testing.assert_close(bands, expected[index], atol=0, rtol=0)


def test_wrong_band_counts_and_nan_are_skipped_but_a_wrong_first_image_stops(cifar_images):
    rows = band_rows(cifar_images, 8, 4).astype(np.float32) / 65535
    values = [row for row in rows]
    values[3] = rows[3][:3]  # 3 bands among 4-band images
    values[5] = rows[5].copy()
    values[5][1, 2, 2] = np.nan
    dataset = Dataset.from_dict({"image": values})
    reader = ImageReader.for_column(dataset, "image", 4)
    reasons = [reader(value)[1] for value in ImageReader.prepare(dataset, "image")["image"]]
    assert [i for i, reason in enumerate(reasons) if reason] == [3, 5]
    assert "3 band(s)" in reasons[3] and "NaN" in reasons[5]
    order = GlobalOrder(8, 8, seed=0)
    two_crops = OnDeviceTwoCrops("multiband", 16, [0.5] * 4, [0.25] * 4)
    batch = MapStyleBatches(dataset, "image", two_crops, order, reader).__getitems__([(0, p) for p in range(8)])
    assert batch["skipped"] == 2 and batch["image"].shape == (8, 4, 32, 32)
    reader.check_band_count(dataset, "image")  # the first readable image has 4 bands: fine
    with pytest.raises(DataError, match=r"first readable image .* has 4 band\(s\) .* the model takes 13"):
        ImageReader.for_column(dataset, "image", 13).check_band_count(dataset, "image")


def test_rgb_recipes_are_refused_for_other_band_counts_in_one_line(capsys):
    with pytest.raises(UsageError, match=r"`augmentation` 'v2' jitters hue and saturation .* `num_channels` 13"):
        MocoTrainingArguments(num_channels=13, output_dir="unused")
    for build in (OnDeviceTwoCrops, PerImageTwoCrops, build_two_crops):
        with pytest.raises(ValueError, match="multiband"):
            build("v1", 32, [0.5] * 13, [0.25] * 13)
    assert moco_hf_cli(["train", "--num_channels", "13", "--augmentation", "v3"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and "'v3' jitters hue" in errors[0]
    config = MocoTrainingArguments(preset="v2-multiband", num_channels=13, output_dir="unused")
    assert config.augmentation is None and build_config(config).augmentation == "multiband"


def test_band_jitter_keeps_the_values_range_and_both_paths_give_the_same_views(cifar_images):
    """Brightness and contrast on float bands, against a hand computation: b * x, then c * x + (1 - c) * mean(x),
    with no clamp to [0, 1] (reflectances above 1 stay). Then the per-image path equals the batched one for the
    same seeds, on images of several sizes."""
    image = torch.linspace(0.0, 3.0, 2 * 4 * 4).view(1, 2, 4, 4)
    brightened = adjust_brightness(image.clone(), torch.tensor([1.5]), bounded=False)
    torch.testing.assert_close(brightened, 1.5 * image)
    contrasted = adjust_contrast(image.clone(), torch.tensor([0.5]), bounded=False)
    torch.testing.assert_close(contrasted, 0.5 * image + 0.5 * image.mean())
    assert brightened.max() > 1
    bands = torch.from_numpy(band_rows(cifar_images, 6, 13).astype(np.float32) / 65535)
    images = [bands[0], bands[1, :, :24, :], bands[2, :, 4:, 2:], *bands[3:]]
    batched = OnDeviceTwoCrops("multiband", 16, [0.5] * 13, [0.25] * 13)
    per_image = PerImageTwoCrops("multiband", 16, [0.5] * 13, [0.25] * 13)
    query, key = batched.on_device(collate([batched.loader_item(im, seed) for seed, im in enumerate(images)]),
                                   torch.device("cpu"))  # fmt: skip
    one_by_one = [per_image.loader_item(im, seed) for seed, im in enumerate(images)]
    torch.testing.assert_close(torch.stack([item["query"] for item in one_by_one]), query, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.stack([item["key"] for item in one_by_one]), key, atol=1e-5, rtol=0)
    assert not torch.equal(query, key)


def test_the_band_image_processor_takes_either_axis_order(cifar_images, tmp_path):
    config = MocoConfig.from_preset("v2-multiband", backbone="resnet18", queue_size=16, image_size=32,
                                    num_channels=13, image_mean=[0.4] * 13, image_std=[0.2] * 13)  # fmt: skip
    MocoModel(config).save_pretrained(tmp_path)
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(processor).__name__ == "MocoBandImageProcessor"
    rows = band_rows(cifar_images, 2, 13)
    expected = (torch.from_numpy(rows.astype(np.float32) / 65535) - 0.4) / 0.2  # 32 px: no resize, no crop
    torch.testing.assert_close(processor(list(rows))["pixel_values"], expected)
    torch.testing.assert_close(processor(rows.transpose(0, 2, 3, 1))["pixel_values"], expected)
    with pytest.raises(ValueError, match="an image of 3 band"):
        processor(np.zeros((3, 32, 32), np.uint8), input_data_format="channels_first")


def band_dataset(kind: str, cifar_images, root: Path) -> tuple[Path, int]:
    """48 training and 16 test images of real-derived bands, stored as `kind`: an Array3D uint16 `save_to_disk`
    folder, an image folder of 13-band TIFF files, or an image folder of 16-bit grey PNG files; and the band count."""
    bands = 1 if kind == "png16" else 13
    rows, labels = band_rows(cifar_images, 64, bands), cifar_images[1][:64]
    splits = {"train": slice(0, 48), "test": slice(48, 64)}
    if kind == "array3d":
        features = Features({"image": Array3D((13, 32, 32), "uint16"), "label": ClassLabel(num_classes=10)})
        DatasetDict({split: Dataset.from_dict({"image": rows[part], "label": labels[part]}, features=features)
                     for split, part in splits.items()}).save_to_disk(root)  # fmt: skip
        return root, bands
    for split, part in splits.items():
        for index in range(part.start, part.stop):
            folder = root / split / str(labels[index])
            folder.mkdir(parents=True, exist_ok=True)
            if kind == "tiff":
                tifffile.imwrite(folder / f"{index}.tif", rows[index], photometric="minisblack")
            else:  # 16-bit PNG, upsampled so that it holds more than 256 levels
                grey = torch.from_numpy(rows[index, 0].astype(np.float32))[None, None]
                grey = torch.nn.functional.interpolate(grey, size=48, mode="bilinear").round()
                Image.fromarray(grey[0, 0].numpy().astype(np.uint16)).save(folder / f"{index}.png")
    return root, bands


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["array3d", "tiff", "png16"])
def test_band_datasets_train_resume_save_reload_export_and_evaluate(kind, cifar_images, tmp_path, capsys):
    data, bands = band_dataset(kind, cifar_images, tmp_path / "data")
    out = tmp_path / "run"
    # resnet18: torchvision's format (exported below) has no resnet10t
    args = [*FAST_TRAINING, "--preset", "v2-multiband", "--num_channels", str(bands), "--dataset_name", str(data),
            "--backbone", "resnet18", "--per_device_train_batch_size", "8", "--num_train_epochs", "1",
            "--knn_max_train_samples", "48", "--knn_max_eval_samples", "16", "--knn_k", "5",
            "--batch_norm_calibration_images", "16", "--knn_monitor", str(kind == "array3d"),
            "--output_dir", str(out)]  # fmt: skip
    if kind != "png16":  # 3 steps, then a resume to the end of the epoch
        first = run_pretrain(*args, "--stop_after_epochs", "0.5")
        assert first.returncode == 0, first.stderr[-3000:]
        assert [c.name for c in complete_checkpoints(out)] == ["step_3"]
    last = run_pretrain(*args, *(["--resume_from_checkpoint", "latest"] if kind != "png16" else []))
    assert last.returncode == 0, last.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 6 and results["skipped_images"] == 0
    assert (results["knn_top1"] is not None) == (kind == "array3d")
    model = AutoModel.from_pretrained(out / "model").eval()
    assert model.config.num_channels == bands and model.config.augmentation == "multiband"
    card = (out / "model" / "README.md").read_text()
    assert f"images of {bands} band(s)" in card and f"| {bands} | {model.config.image_mean[-1]:.6g} |" in card
    images = AutoImageProcessor.from_pretrained(out / "model")(list(band_rows(cifar_images, 4, bands)))
    export_encoder(model, tmp_path / "timm")
    encoder = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
    backbone = MocoBackbone.from_pretrained(out / "model", out_indices=[4]).eval()
    with torch.no_grad():
        features = model.get_image_features(images["pixel_values"]).pooler_output
        torch.testing.assert_close(encoder(images["pixel_values"]), features, atol=1e-5, rtol=0)
        assert backbone(images["pixel_values"]).feature_maps[0].shape == (4, 512, 1, 1)
    if kind == "array3d":  # a torchvision state dict and a classifier take the bands too
        assert moco_hf_cli(["export", str(out / "model"), str(tmp_path / "tv.pth"), "--format", "torchvision"]) == 0
        assert torch.load(tmp_path / "tv.pth", weights_only=True)["conv1.weight"].shape == (64, 13, 7, 7)
        classifier = MocoForImageClassification.from_pretrained(out / "model", num_labels=10).eval()
        assert classifier(**images).logits.shape == (4, 10)
    capsys.readouterr()
    assert moco_hf_cli(["evaluate", "knn", "--model_name_or_path", str(out / "model"), "--dataset_name", str(data),
                        "--knn_k", "5", "--output_dir", str(tmp_path / "eval")]) == 0  # fmt: skip
    knn = json.loads((tmp_path / "eval" / "knn_results.json").read_text())
    assert knn["train_samples"] == 48 and knn["eval_samples"] == 16 and 0 <= knn["knn_top1"] <= 100
    if kind == "tiff":  # the linear protocol reads the same way
        assert moco_hf_cli(["evaluate", "linear", "--model_name_or_path", str(out / "model"), "--dataset_name",
                            str(data), "--epochs", "2", "--output_dir", str(tmp_path / "eval")]) == 0  # fmt: skip
        assert json.loads((tmp_path / "eval" / "linear_results.json").read_text())["eval_samples"] == 16


@pytest.mark.parametrize("bands", [1, 13])
def test_a_warm_start_from_rgb_timm_weights_adapts_the_first_convolution(bands, tmp_path):
    """RGB weights (an encoder exported in timm's format) into an N-band model: the first convolution is timm's
    `adapt_input_conv` of the RGB one (the reference: timm's function on the RGB weights), the rest unchanged."""
    rgb = MocoModel(MocoConfig.from_preset("v2", backbone="resnet18", queue_size=16, image_size=32))
    export_encoder(rgb, tmp_path / "rgb")
    config = MocoConfig.from_preset("v2-multiband", backbone="resnet18", queue_size=16, image_size=32,
                                    num_channels=bands, image_mean=[0.0] * bands, image_std=[1.0] * bands)  # fmt: skip
    model = MocoModel(config)
    said = load_pretrained_weights(model, str(tmp_path / "rgb"))
    assert f"first convolution adapted from 3 to {bands} bands" in said
    expected = adapt_input_conv(bands, rgb.encoder_q.backbone.conv1.weight.detach().clone())
    for encoder in (model.encoder_q, model.encoder_k):
        torch.testing.assert_close(encoder.backbone.conv1.weight, expected, atol=0, rtol=0)
        torch.testing.assert_close(
            encoder.backbone.layer4[1].conv2.weight, rgb.encoder_q.backbone.layer4[1].conv2.weight
        )


def test_a_stream_of_array_images_gives_band_batches(cifar_images):
    rows = band_rows(cifar_images, 12, 13)
    features = Features({"image": Array3D((13, 32, 32), "uint16")})
    stream = as_iterable(Dataset.from_dict({"image": rows}, features=features), 1)
    reader = ImageReader.for_column(stream, "image", 13)
    two_crops = OnDeviceTwoCrops("multiband", 16, [0.5] * 13, [0.25] * 13)
    batch = next(iter(StreamBatches(stream, "image", two_crops, batch_size=6, seed=0, reader=reader)))
    assert batch["skipped"] == 0 and batch["image"].dtype == torch.float32
    torch.testing.assert_close(batch["image"], torch.from_numpy(rows[:6].astype(np.float32) / 65535))


def test_the_resume_fingerprint_of_array_images_follows_their_values(cifar_images):
    rows = band_rows(cifar_images, 10, 13)
    features = Features({"image": Array3D((13, 32, 32), "uint16")})
    fingerprints = [dataset_fingerprint(Dataset.from_dict({"image": images}, features=features), "image", 10)
                    for images in (rows, rows.copy(), rows[::-1].copy())]  # fmt: skip
    assert fingerprints[0] == fingerprints[1] != fingerprints[2]


def test_hostile_band_files_and_values_are_counted_not_fatal(cifar_images, tmp_path, monkeypatch):
    """A TIFF over Pillow's decompression-bomb rule (its pixel limit lowered here, so that a small file is over it)
    and an array column of values that are no numbers: each is one undecodable image with its reason."""
    rows = band_rows(cifar_images, 1, 13)
    tifffile.imwrite(tmp_path / "big.tif", rows[0], photometric="minisblack", compression="zlib")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 400)  # 32 x 32 = 1024 pixels > 2 x 400
    bands, reason = ImageReader(13, bands=True)({"bytes": (tmp_path / "big.tif").read_bytes(), "path": None})
    assert bands is None and "decompression-bomb" in reason
    monkeypatch.undo()
    assert ImageReader(13, bands=True)({"bytes": (tmp_path / "big.tif").read_bytes(), "path": None})[1] is None
    reader = ImageReader(1, bands=True, array_dtype="uint16")
    assert reader([["a", "b"], ["c", "d"]])[0] is None and "ValueError" in reader([["a", "b"], ["c", "d"]])[1]


def test_evaluating_a_band_model_on_rgb_images_stops_with_one_line(small_dataset, tmp_path, capsys):
    config = MocoConfig.from_preset("v2-multiband", backbone="resnet18", queue_size=16, image_size=32,
                                    num_channels=13, image_mean=[0.5] * 13, image_std=[0.25] * 13)  # fmt: skip
    MocoModel(config).save_pretrained(tmp_path / "model")
    capsys.readouterr()
    assert moco_hf_cli(["evaluate", "knn", "--model_name_or_path", str(tmp_path / "model"), "--dataset_name",
                        str(small_dataset), "--output_dir", str(tmp_path / "eval")]) == 2  # fmt: skip
    (error,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert "has 3 band(s)" in error and "the model takes 13" in error and "evaluate it on images of its bands" in error
