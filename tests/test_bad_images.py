"""Bad images in real files and datasets: each is converted, or skipped and counted; one that cannot stop the run
(a FIFO, a device), and one file that stops `datasets`, named."""

import io
import json
import os
import shutil
import struct
import time
import zlib
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from conftest import (
    FAST_TRAINING,
    expected_skips,
    one_line_error,
    run_pretrain,
)
from PIL import Image

from moco_hf.data import decode_image, decode_image_or_reason
from moco_hf.errors import DataError


def png_with_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (a decompression bomb's signature) and holds no pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def bad_files(cifar_images) -> dict[str, tuple[str, bytes]]:
    """name -> (file suffix, bytes), built from a real CIFAR image."""
    photo = cifar_images[0][3].resize((64, 64))
    palette = photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = palette.getpixel((0, 0))
    grey = np.asarray(photo.convert("L"), dtype=np.float64)
    sixteen_bit = Image.fromarray(grey.astype(np.uint16) * 257)  # mode I;16
    float_grey = Image.fromarray((grey / 255).astype(np.float32))  # mode F, values in [0, 1]
    int32_grey = Image.fromarray((grey * (np.iinfo(np.int32).max / 255)).astype(np.int32))  # mode I, full range
    rotated = photo.resize((64, 48)).getexif()
    rotated[0x0112] = 6  # EXIF Orientation: the camera was turned, show the pixels rotated 90 degrees clockwise
    jpeg = encoded(photo, "JPEG", quality=95)
    return {
        "truncated_jpeg": (".jpg", jpeg[: len(jpeg) // 2]),
        "zero_bytes": (".jpg", b""),
        "text_named_png": (".png", b"this is a text file, not a PNG\n"),
        "cmyk_jpeg": (".jpg", encoded(photo.convert("CMYK"), "JPEG", quality=95)),
        "png_16bit": (".png", encoded(sixteen_bit, "PNG")),
        "float_tiff": (".tiff", encoded(float_grey, "TIFF")),
        "int32_tiff": (".tiff", encoded(int32_grey, "TIFF")),
        "exif_rotated_jpeg": (".jpg", encoded(photo.resize((64, 48)), "JPEG", quality=95, exif=rotated)),
        "palette_with_transparency": (".png", encoded(palette, "PNG")),
        "one_pixel": (".png", encoded(photo.resize((1, 1)), "PNG")),
        "much_larger_than_crop": (".jpg", encoded(photo.resize((2400, 1800)), "JPEG")),
        "bomb_header": (".png", png_with_header_only(100_000, 100_000)),
    }


UNDECODABLE = {"truncated_jpeg", "zero_bytes", "text_named_png", "bomb_header"}


def test_each_bad_image_is_converted_or_skipped(bad_files, cifar_images):
    photo = np.asarray(cifar_images[0][3].resize((64, 64)), dtype=np.float32)
    for name, (_, data) in bad_files.items():
        start = time.monotonic()
        image = decode_image({"bytes": data, "path": None})
        assert time.monotonic() - start < 5, name  # no hang
        if name in UNDECODABLE:
            assert image is None, name
            continue
        assert image.mode == "RGB", name
        pixels = np.asarray(image, dtype=np.float32)
        if name == "cmyk_jpeg":
            assert np.abs(pixels - photo).mean() < 12  # the same photo, through CMYK and JPEG
        grey = np.asarray(cifar_images[0][3].resize((64, 64)).convert("L"), dtype=np.float32)
        if name == "png_16bit":  # 16-bit grey scaled back to 8 bits, in all three channels
            assert np.array_equal(pixels[..., 0], grey) and np.array_equal(pixels[..., 2], grey)
        if name in ("float_tiff", "int32_tiff"):  # [0, 1] floats and full-range int32 scaled to the same grey
            assert np.abs(pixels[..., 1] - grey).max() <= 1, name
        if name == "exif_rotated_jpeg":  # upright, as datasets.Image decodes it
            reference = datasets.Image().decode_example({"bytes": data, "path": None}).convert("RGB")
            assert image.size == reference.size == (48, 64) and np.array_equal(pixels, np.asarray(reference))
            continue
        if name == "palette_with_transparency":  # transparent pixels composited over black
            assert pixels[0, 0].tolist() == [0, 0, 0]
        expected_size = {"one_pixel": (1, 1), "much_larger_than_crop": (2400, 1800)}.get(name, (64, 64))
        assert image.size == expected_size, name


class ImageAndSeed:
    """A `TwoViewAugmentation` that keeps what the loader hands it: each slot's decoded image and seed."""

    def loader_item(self, image: Image.Image, seed: int) -> dict[str, torch.Tensor]:
        return {"red": torch.tensor(image.getpixel((0, 0))[0]), "seed": torch.tensor(seed)}


def test_an_undecodable_image_gets_the_same_treatment_on_both_data_paths():
    """One rule, read from the slots themselves: an undecodable image's slot gets the next decodable image (seeded
    by its own slot) and is counted; that image is seen twice; every batch stays full. Rows 3 and 4 of 12 are
    broken; row r is an image whose red value is 10 r."""
    from datasets import Dataset, Features
    from datasets import Image as ImageFeature

    from moco_hf.data import GlobalOrder, MapStyleBatches, StreamBatches, as_iterable

    values = [{"bytes": b"" if row in (3, 4) else encoded(Image.new("RGB", (4, 4), (10 * row, 0, 0)), "PNG"),
               "path": None} for row in range(12)]  # fmt: skip
    dataset = Dataset.from_dict({"image": values}, features=Features({"image": ImageFeature(decode=False)}))
    expected_red = [0, 10, 20, 50, 50, 50, 60, 70, 80, 90, 100, 110]  # in data order: the slots of 3 and 4 get 5
    stream = next(iter(StreamBatches(as_iterable(dataset, 1), "image", ImageAndSeed(), batch_size=12, seed=0)))
    assert stream["red"].tolist() == expected_red and stream["skipped"] == 2
    assert len(set(stream["seed"].tolist())) == 12  # the repeated image is augmented with each slot's own seed
    # A slot per row, so a resumed stream (one batch of 4 done) goes on exactly: the slot of row 4 gets row 5 again.
    batches = iter(StreamBatches(as_iterable(dataset, 1), "image", ImageAndSeed(), batch_size=4, seed=0))
    uninterrupted = [next(batches) for _ in range(3)]
    resumed = StreamBatches(as_iterable(dataset, 1), "image", ImageAndSeed(), batch_size=4, seed=0, skip_batches=1)
    for expected, batch in zip(uninterrupted[1:], iter(resumed), strict=False):
        assert batch["red"].tolist() == expected["red"].tolist() and torch.equal(batch["seed"], expected["seed"])
    order = GlobalOrder(12, 12, seed=0)
    rows = order.permutation(0).tolist()
    batch = MapStyleBatches(dataset, "image", ImageAndSeed(), order).__getitems__([(0, p) for p in range(12)])
    next_decodable = [next(rows[q % 12] for q in range(p, p + 12) if rows[q % 12] not in (3, 4)) for p in range(12)]
    assert batch["red"].tolist() == [10 * row for row in next_decodable] and batch["skipped"] == 2
    assert len(set(batch["seed"].tolist())) == 12


@pytest.fixture(scope="module")
def undecodable_dataset(tmp_path_factory) -> Path:
    """Train and test splits whose image column holds no image: empty values and paths to missing files."""
    from datasets import ClassLabel, Dataset, Features, Value

    # Image's storage struct, written as such (encoding or embedding would read the missing files): the run is told
    # the column with --image_column.
    raw = Features({"image": {"bytes": Value("binary"), "path": Value("string")}, "label": ClassLabel(num_classes=10)})
    root = tmp_path_factory.mktemp("undecodable")
    (root / "data").mkdir()
    values = [None, {"bytes": None, "path": "/no/such/image.jpg"}] * 30
    for split in ("train", "test"):
        dataset = Dataset.from_dict({"image": values, "label": [0] * len(values)}, features=raw)
        dataset.to_parquet(root / "data" / f"{split}-00000-of-00001.parquet")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("knn", ["kNN at start", "no kNN"])
def test_a_dataset_with_no_decodable_image_stops_with_one_line(undecodable_dataset, small_dataset, tmp_path, knn):
    # With kNN at start, the training images decode (the calibration of the initial encoder reads them first) and
    # the evaluation images do not; without it, the training images do not.
    if knn == "kNN at start":
        data = ["--dataset_name", str(small_dataset), "--eval_dataset_name", str(undecodable_dataset)]
    else:
        data = ["--dataset_name", str(undecodable_dataset), "--knn_at_start", "false",
                "--eval_dataset_name", str(small_dataset)]  # fmt: skip
    args = [*FAST_TRAINING, *data, "--output_dir", str(tmp_path), "--max_train_steps", "3", "--image_column", "image"]
    result = run_pretrain(*args, timeout=300)
    assert result.returncode == 2
    error = one_line_error(result)
    if knn == "kNN at start":
        assert "the kNN bank of" in error and "hold no decodable image (column 'image')" in error
    else:
        assert "1000 images in a row of column 'image' could not be decoded" in error
        assert "no image bytes or path" in error and "FileNotFoundError" in error


@pytest.mark.slow
def test_training_on_a_folder_of_bad_images_skips_and_reports_them(bad_files, cifar_images, tmp_path):
    images, labels = cifar_images
    root = tmp_path / "folder"
    for split, rows in (("train", range(0, 48)), ("test", range(48, 72))):
        for index in rows:
            (root / split / f"class{labels[index]}").mkdir(parents=True, exist_ok=True)
            images[index].save(root / split / f"class{labels[index]}" / f"{index}.png")
    for name, (suffix, data) in bad_files.items():
        (root / "train" / f"class{labels[0]}" / f"{name}{suffix}").write_bytes(data)
    out = tmp_path / "run"
    # 48 + 8 decodable training images and 4 undecodable; 8 steps of 16 = 128 images: three epochs of 3 steps.
    result = run_pretrain(*FAST_TRAINING, "--dataset_name", str(root), "--max_train_steps", "8",
                          "--output_dir", str(out), "--dataloader_num_workers", "1", timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    skipped = json.loads((out / "results.json").read_text())["skipped_images"]
    assert skipped == expected_skips(str(root), 16, 8) >= 1
    assert f"{skipped} images could not be decoded and were skipped" in result.stderr
    assert f"{skipped} images could not be decoded" in (out / "model" / "README.md").read_text()


@pytest.mark.parametrize("fault", ["a file name that is not UTF-8", "a truncated parquet shard"])
def test_the_one_file_that_stops_datasets_is_named_with_its_cause(cifar10_dir, cifar_images, tmp_path, fault):
    from moco_hf.data import load_image_dataset

    if fault == "a truncated parquet shard":
        (tmp_path / "data").mkdir()
        shutil.copy(cifar10_dir / "data" / "test-00000-of-00002.parquet", tmp_path / "data" / "train-0-of-2.parquet")
        culprit = tmp_path / "data" / "train-1-of-2.parquet"
        culprit.write_bytes((cifar10_dir / "data" / "test-00001-of-00002.parquet").read_bytes()[:5000])
        expected = f"{culprit}: not a readable parquet file (ArrowInvalid: Parquet magic bytes not found"
    else:
        (tmp_path / "train" / "cat").mkdir(parents=True)
        for index in range(4):
            cifar_images[0][index].save(tmp_path / "train" / "cat" / f"{index}.png")
        culprit = os.fsencode(tmp_path / "train" / "cat") + b"/\xff\xfe.png"
        os.rename(os.fsencode(tmp_path / "train" / "cat" / "3.png"), culprit)
        expected = f"{culprit!r}: its name is not UTF-8"
    with pytest.raises(DataError) as error:
        load_image_dataset(str(tmp_path), "train", streaming=False)
    assert str(error.value).startswith(expected) and "\n" not in str(error.value)


def test_a_read_that_never_returns_costs_its_bound_and_the_next_read_works(tmp_path, cifar_images):
    """The time bound on every image read (`read_image_file` runs it through `BoundedCalls`): a read that blocks for
    good (here a FIFO opened for reading with no writer, as a read from a hung network mount blocks) gives up after
    the bound; the next read is served by a new helper thread."""
    from moco_hf.image_files import BoundedCalls

    calls, fifo, photo = BoundedCalls(), tmp_path / "never", tmp_path / "photo.png"
    os.mkfifo(fifo)
    cifar_images[0][0].save(photo)
    start = time.monotonic()
    try:
        with pytest.raises(TimeoutError, match="took more than 1 s"):
            calls(1, Path.read_bytes, fifo)
        assert time.monotonic() - start < 5
        assert calls(5, Path.read_bytes, photo) == photo.read_bytes()
    finally:  # let the abandoned thread's open return
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


@pytest.mark.slow
@pytest.mark.timeout(300)  # before the fix, the run waited at step 0 for a FIFO writer forever
def test_a_fifo_or_device_among_the_image_paths_is_skipped_not_waited_for(cifar_images, tmp_path):
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature

    images, labels = cifar_images
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    start = time.monotonic()
    for path in (fifo, Path("/dev/zero")):  # a FIFO no one writes to; a device whose read never ends
        image, reason = decode_image_or_reason({"bytes": None, "path": str(path)})
        assert image is None and "not a regular file" in reason, reason
    assert time.monotonic() - start < 5
    # The run: a parquet dataset whose rows name image files; two rows of 32 name the FIFO and the device.
    paths = []
    for index in range(32):
        paths.append(str(tmp_path / f"{index}.png"))
        images[index].save(paths[-1])
    paths[5], paths[20] = str(fifo), "/dev/zero"
    features = Features({"image": ImageFeature(), "label": ClassLabel(num_classes=10)})
    (tmp_path / "data" / "data").mkdir(parents=True)
    for split, rows in (("train", range(32)), ("test", range(32, 48))):
        values = [{"bytes": None, "path": paths[row] if row < 32 else None} for row in rows]
        if split == "test":
            values = [{"bytes": encoded(images[row], "PNG"), "path": None} for row in rows]
        Dataset.from_dict({"image": values, "label": [labels[row] for row in rows]}, features=features).to_parquet(
            tmp_path / "data" / "data" / f"{split}-00000-of-00001.parquet"
        )
    out = tmp_path / "run"
    result = run_pretrain(*FAST_TRAINING, "--dataset_name", str(tmp_path / "data"), "--max_train_steps", "2",
                          "--dataloader_num_workers", "0", "--output_dir", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "results.json").read_text())["skipped_images"] == 2  # one epoch of 2 x 16 rows
