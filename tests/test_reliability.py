"""Fault injection on real files and real processes: kills, signals, bad images, NaN, untrusted pickles, disk."""

import contextlib
import io
import json
import logging
import os
import random
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from accelerate import Accelerator
from conftest import FAST_TRAINING, PRETRAIN, REPO_ROOT, command_and_env, expected_skips, launch, run_pretrain
from PIL import Image
from safetensors.torch import load_file, save_file

from moco_hf import MocoConfig, MocoModel
from moco_hf.checkpointing import TrainerState, non_finite_tensors, save_checkpoint, write_manifest
from moco_hf.data import decode_image, decode_image_or_reason
from moco_hf.errors import DataError, RunError, UsageError


def start_pretrain(*args: str, processes: int = 1) -> subprocess.Popen:
    """training/pretrain.py in its own process group (so a kill also takes its DataLoader workers)."""
    command, env = command_and_env(PRETRAIN, *args, processes=processes)
    return subprocess.Popen(command, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)  # fmt: skip


def complete_checkpoints(output_dir: Path) -> list[Path]:
    root = output_dir / "checkpoints"
    return sorted((p for p in root.glob("step_*")), key=lambda p: int(p.name[5:])) if root.is_dir() else []


def assert_loadable(checkpoint: Path) -> None:
    """A complete checkpoint: trainer state, finite safetensors weights, an optimizer state loadable safely."""
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["completed_steps"] == int(checkpoint.name[5:])
    weights = load_file(checkpoint / "model.safetensors")
    assert {"queue", "queue_ptr"} <= weights.keys()
    assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())
    torch.load(checkpoint / "optimizer.bin", weights_only=True)


def one_line_error(result) -> str:
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return errors[0]


# ---- 1. kill and resume -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigkill_mid_step_and_mid_save_then_resume_matches_an_uninterrupted_run(small_dataset, tmp_path):
    args = [*FAST_TRAINING, "--dataset_name", str(small_dataset), "--max_train_steps", "8",
            "--checkpointing_steps", "1", "--knn_at_start", "false"]  # fmt: skip
    # Every run of this test in its own process, as the killed ones must be: the same threads, the same numerics.
    reference = launch(PRETRAIN, *args, "--output_dir", str(tmp_path / "reference"))
    assert reference.returncode == 0, reference.stderr[-3000:]

    out, rng = tmp_path / "killed", random.Random(0)
    caught_mid_save = 0
    for target in ("mid-save", "mid-step", "mid-save", "mid-step"):
        process = start_pretrain(*args, "--output_dir", str(out), "--resume_from_checkpoint", "latest")
        known = len(complete_checkpoints(out))
        deadline, kill_at = time.monotonic() + 120, None
        while process.poll() is None and time.monotonic() < deadline:
            if target == "mid-save" and list((out / "checkpoints").glob(".tmp-*")):
                break
            if target == "mid-step" and len(complete_checkpoints(out)) > known:
                kill_at = kill_at or time.monotonic() + rng.uniform(0.05, 0.6)  # somewhere in the next step
                if time.monotonic() >= kill_at:
                    break
            time.sleep(0.002)
        if process.poll() is not None:
            break  # the run finished before this kill
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        caught_mid_save += target == "mid-save" and bool(list((out / "checkpoints").glob(".tmp-*")))
        for checkpoint in complete_checkpoints(out):
            assert_loadable(checkpoint)
    assert caught_mid_save >= 1  # a save really was interrupted half-written

    final = launch(PRETRAIN, *args, "--output_dir", str(out), "--resume_from_checkpoint", "latest")
    assert final.returncode == 0, final.stderr[-3000:]
    assert not list((out / "checkpoints").glob(".tmp-*"))  # the half-written save was removed, never resumed
    ours, theirs = (
        load_file(out / "model" / "model.safetensors"),
        load_file(tmp_path / "reference/model/model.safetensors"),
    )
    for name, tensor in theirs.items():
        torch.testing.assert_close(ours[name], tensor, atol=1e-6, rtol=0, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("target", ["process", "process group"])  # a terminal's Ctrl-C, `timeout`, schedulers: group
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sigterm_and_sigint_save_a_checkpoint_before_exiting(small_dataset, tmp_path, signum, target):
    out = tmp_path / "run"
    args = [*FAST_TRAINING, "--dataset_name", str(small_dataset), "--knn_at_start", "false"]
    process = start_pretrain(*args, "--max_train_steps", "500", "--output_dir", str(out))
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not metrics.is_file() or len(metrics.read_text().splitlines()) < 2):
        time.sleep(0.05)
    if target == "process":
        process.send_signal(signum)
    else:  # the DataLoader workers get it too: they must leave the save to the main process
        os.killpg(process.pid, signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, stderr[-3000:]
    assert f"{signal.Signals(signum).name} received: saving a checkpoint" in stderr
    (checkpoint,) = complete_checkpoints(out)
    assert_loadable(checkpoint)
    steps = int(checkpoint.name[5:])
    assert steps >= 2
    resumed = run_pretrain(*args, "--max_train_steps", str(steps + 2), "--output_dir", str(out),
                           "--resume_from_checkpoint", "latest")  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {steps}" in resumed.stderr


def ranks_of(launcher: subprocess.Popen) -> dict[int, int]:
    """rank -> pid of the training processes an `accelerate launch` started (run without loader workers)."""
    import psutil

    ranks = {}
    for child in psutil.Process(launcher.pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "RANK" in child.environ() and str(PRETRAIN) in child.cmdline():
                ranks[int(child.environ()["RANK"])] = child.pid
    return ranks


def start_two_processes(small_dataset: Path, out: Path, *extra: str) -> tuple[subprocess.Popen, dict[int, int]]:
    """A long 2-process run, returned once it has logged 3 steps (a checkpoint every 2), with its ranks' pids."""
    process = start_pretrain(*FAST_TRAINING, "--dataset_name", str(small_dataset), "--knn_at_start", "false",
                             "--dataloader_num_workers", "0", "--per_device_train_batch_size", "8",
                             "--checkpointing_steps", "2", "--max_train_steps", "500", "--output_dir", str(out),
                             *extra, processes=2)  # fmt: skip
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and (not metrics.is_file() or len(metrics.read_text().splitlines()) < 3):
        assert process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(0.05)
    ranks = ranks_of(process)
    assert sorted(ranks) == [0, 1]
    return process, ranks


@pytest.mark.slow
def test_a_stopped_process_ends_every_process_within_the_peer_timeout(small_dataset, tmp_path):
    """SIGSTOP to one rank (a frozen node, a debugger): the other waits `--peer_timeout_seconds` in its next
    collective, not gloo's 30 minutes, says so in one line, and the launcher ends the stopped one (30 s more)."""
    import psutil

    process, ranks = start_two_processes(small_dataset, tmp_path / "run", "--peer_timeout_seconds", "10")
    os.kill(ranks[1], signal.SIGSTOP)
    start = time.monotonic()
    _, stderr = process.communicate(timeout=180)
    assert process.returncode != 0 and time.monotonic() - start < 60  # 10 s to notice, at most 30 s to end rank 1
    (error,) = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert "process 0 lost another process of the run at step" in error and "the last intact checkpoint is step_" \
        in error, stderr[-3000:]  # fmt: skip
    # No traceback through our code or the training script (the launcher adds its own report of a failed child).
    assert not [
        line
        for line in stderr.splitlines()
        if line.startswith('  File "') and ("moco_hf" in line or "pretrain.py" in line)
    ]
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie" for pid in ranks.values())


@pytest.mark.slow
def test_sigterm_to_one_process_ends_every_process_at_the_same_checkpoint(small_dataset, tmp_path):
    """The signal is agreed at the end of the step (an all-reduce of it), so both ranks save the same step: before,
    rank 1 saved alone while rank 0 stepped on, and the mismatched collectives hung for 30 minutes."""
    out = tmp_path / "run"
    process, ranks = start_two_processes(small_dataset, out, "--peer_timeout_seconds", "60")
    os.kill(ranks[1], signal.SIGTERM)
    _, stderr = process.communicate(timeout=180)
    assert process.returncode != 0
    step = int(stderr.split("SIGTERM received: saving a checkpoint at step ")[1].split()[0].rstrip("."))
    assert f"SIGTERM received by another process: saving a checkpoint at step {step} " in stderr, stderr[-3000:]
    assert complete_checkpoints(out)[-1].name == f"step_{step}"
    assert_loadable(out / "checkpoints" / f"step_{step}")
    assert {p.name for p in (out / "checkpoints" / f"step_{step}").glob("random_states_*")} == {
        "random_states_0.pkl", "random_states_1.pkl"}  # fmt: skip
    assert not [line for line in stderr.splitlines() if line.startswith("error: ")]


# ---- 2. bad images ----------------------------------------------------------------------------------------------


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


# ---- 3. numerical faults ----------------------------------------------------------------------------------------


LOADER_WORKER_FAILS = """
import sys, torch
from moco_hf.data import StreamBatches, as_iterable, close_loader, init_loader_worker, load_image_dataset

class FailsAfterTwenty:  # an augmentation that breaks mid-stream, inside a loader worker
    calls = 0
    def loader_item(self, image, seed):
        FailsAfterTwenty.calls += 1
        if FailsAfterTwenty.calls > 20:
            raise IndexError("augmentation failed")
        return {"query": torch.zeros(3)}

stream = as_iterable(load_image_dataset(sys.argv[1], "train", False), 4)
loader = torch.utils.data.DataLoader(StreamBatches(stream, "image", FailsAfterTwenty(), 8, seed=0), batch_size=None,
                                     num_workers=2, worker_init_fn=init_loader_worker)
batches = iter(loader)
try:
    for _ in range(20):
        next(batches)
finally:
    if sys.argv[2] == "close":
        close_loader(batches)
"""


def test_a_failing_loader_worker_ends_the_process_instead_of_hanging_at_exit(small_dataset):
    """Workers ignore SIGTERM (so that a Ctrl-C to the process group leaves them to the checkpoint save); at exit,
    multiprocessing terminates them with SIGTERM and waits: without `close_loader` (as the trainer calls it
    whatever ends its loop) an error in a worker left the process hanging for ever."""
    command = [sys.executable, "-c", LOADER_WORKER_FAILS, str(small_dataset)]
    with pytest.raises(subprocess.TimeoutExpired):
        subprocess.run([*command, "leave"], cwd=REPO_ROOT, capture_output=True, timeout=45)
    result = subprocess.run([*command, "close"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "IndexError: augmentation failed" in result.stderr


def plant_first_convolution_weights(checkpoint: Path, value: float) -> None:
    """Both encoders' first convolution set to `value` in a checkpoint (its manifest rewritten to match): weights at
    the edge of float32, a fault the next step meets with the run's own settings."""
    weights = load_file(checkpoint / "model.safetensors")
    for name in [name for name in weights if name.endswith("backbone.conv1.weight")]:
        weights[name] = torch.full_like(weights[name], value)
    save_file(weights, checkpoint / "model.safetensors", metadata={"format": "pt"})
    write_manifest(checkpoint)


@pytest.mark.slow
@pytest.mark.parametrize(
    "value, message",
    [
        # Weights of 3e38 overflow the first convolution's outputs: the loss itself is NaN.
        (3e38, "the loss became nan at step 3"),
        # Weights of 1e30: BatchNorm keeps the loss finite, but its running variance (~1e62) becomes inf.
        (1e30, "the weights became non-finite at step 3"),
    ],
    ids=["nan_loss", "inf_weights"],
)
def test_numerical_fault_stops_the_run_and_keeps_the_last_good_checkpoint(small_dataset, tmp_path, value, message):
    out = tmp_path / "run"
    args = [*FAST_TRAINING, "--dataset_name", str(small_dataset), "--checkpointing_steps", "1",
            "--knn_at_start", "false", "--output_dir", str(out)]  # fmt: skip
    assert run_pretrain(*args, "--max_train_steps", "2").returncode == 0
    model_before = (out / "model" / "model.safetensors").read_bytes()
    plant_first_convolution_weights(out / "checkpoints" / "step_2", value)
    result = run_pretrain(*args, "--max_train_steps", "4", "--resume_from_checkpoint", "latest")
    assert result.returncode == 1
    assert message in one_line_error(result) and "The last checkpoint, step_2, is intact" in one_line_error(result)
    assert [p.name for p in complete_checkpoints(out)] == ["step_1", "step_2"]
    for checkpoint in complete_checkpoints(out):
        assert_loadable(checkpoint)
    assert (out / "model" / "model.safetensors").read_bytes() == model_before


def test_the_resume_the_divergence_advice_names_is_accepted_with_the_lower_learning_rate(small_dataset, tmp_path,
                                                                                       caplog):  # fmt: skip
    """The advice "lower `learning_rate` ... and resume from it" holds: the resume takes the new peak, and the cosine
    goes on from the checkpoint's step with it (hand-computed: peak x (1 + cos(pi * step / total)) / 2)."""
    import math

    out = tmp_path / "run"
    args = [*FAST_TRAINING, "--dataset_name", str(small_dataset), "--checkpointing_steps", "1", "--max_train_steps",
            "4", "--lr_schedule", "cosine", "--no_knn_monitor", "--output_dir", str(out)]  # fmt: skip
    assert run_pretrain(*args, "--learning_rate", "0.05").returncode == 0
    with caplog.at_level(logging.WARNING, logger="moco_hf"):
        result = run_pretrain(*args, "--learning_rate", "0.01", "--resume_from_checkpoint",
                              str(out / "checkpoints" / "step_2"))  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert any("with --learning_rate 0.01 (it was trained with 0.05)" in r.getMessage() for r in caplog.records)
    rows = {row["step"]: row["lr"] for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    for step, peak in ((1, 0.05), (2, 0.05), (3, 0.01), (4, 0.01)):  # the lr of step n is the factor at n - 1
        assert rows[step] == pytest.approx(peak * (1 + math.cos(math.pi * (step - 1) / 4)) / 2, rel=1e-6), step
    assert json.loads((out / "run_config.json").read_text())["learning_rate"] == 0.01


def test_non_finite_weights_are_never_saved_as_a_checkpoint(tmp_path):
    model = MocoModel(MocoConfig(backbone="resnet18", queue_size=16, dim=8))
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(model)
    save_checkpoint(accelerator, model, tmp_path, TrainerState(completed_steps=1), limit=None)
    with torch.no_grad():
        model.encoder_q.backbone.layer3[0].conv1.weight[0, 0, 0, 0] = float("nan")
    assert non_finite_tensors(model) == ["encoder_q.backbone.layer3.0.conv1.weight"]
    with pytest.raises(
        RunError, match=r"non-finite at step 2 \(encoder_q\.backbone\.layer3\.0\.conv1\.weight"
    ) as error:
        save_checkpoint(accelerator, model, tmp_path, TrainerState(completed_steps=2), limit=None)
    assert "The last checkpoint, step_1, is intact" in str(error.value)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_1"]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    with pytest.raises(RunError, match="No checkpoint was saved before it"):  # not "the last one is intact"
        save_checkpoint(accelerator, model, tmp_path / "fresh", TrainerState(completed_steps=2), limit=None)


def test_a_failed_save_advises_freeing_space_only_when_space_ran_out(tmp_path):
    """Another failure (here a file where the checkpoints folder should be; in a real cluster, a peer process that
    died during the save) is not reported as a full disk."""
    model = Accelerator(cpu=True).prepare(MocoModel(MocoConfig(backbone="resnet18", queue_size=16, dim=8)))
    (tmp_path / "checkpoints").write_text("not a folder")
    with pytest.raises(RunError, match="could not write checkpoint step_1") as error:
        save_checkpoint(Accelerator(cpu=True), model, tmp_path, TrainerState(completed_steps=1), limit=None)
    assert "free some space" not in str(error.value) and "resume with" in str(error.value)


# ---- 4. untrusted files -----------------------------------------------------------------------------------------


class RunsCode:
    """Unpickling this runs a shell command: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.slow
def test_resume_refuses_a_checkpoint_whose_pickle_runs_code(small_dataset, tmp_path):
    out = tmp_path / "run"
    args = [*FAST_TRAINING, "--dataset_name", str(small_dataset), "--knn_at_start", "false", "--output_dir", str(out)]
    assert run_pretrain(*args, "--max_train_steps", "1").returncode == 0
    (checkpoint,) = complete_checkpoints(out)
    torch.save({"python": RunsCode(tmp_path / "pwned")}, checkpoint / "random_states_0.pkl")
    write_manifest(checkpoint)  # whoever planted it can also write a matching manifest: the pickle check still holds
    result = run_pretrain(*args, "--max_train_steps", "2", "--resume_from_checkpoint", str(checkpoint))
    assert result.returncode == 2
    assert "would import or run code, so it was refused" in one_line_error(result)
    assert not (tmp_path / "pwned").exists()


def two_checkpoint_arguments(dataset: Path, out: Path) -> list[str]:
    return [*FAST_TRAINING, "--dataset_name", str(dataset), "--knn_at_start", "false", "--output_dir", str(out),
            "--checkpointing_steps", "2"]  # fmt: skip


@pytest.fixture(scope="module")
def trained_with_two_checkpoints(small_dataset, tmp_path_factory):
    """One finished 4-step run with checkpoints at steps 2 and 4, trained once for the module."""
    out = tmp_path_factory.mktemp("two_checkpoints") / "run"
    result = run_pretrain(*two_checkpoint_arguments(small_dataset, out), "--max_train_steps", "4")
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture
def run_with_two_checkpoints(trained_with_two_checkpoints, small_dataset, tmp_path):
    """A copy of that run for this test to change, and the arguments that made it (pointing at the copy)."""
    out = tmp_path / "run"
    shutil.copytree(trained_with_two_checkpoints, out, ignore=shutil.ignore_patterns(".lock"))
    return out, two_checkpoint_arguments(small_dataset, out)


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGES = {
    "flipped byte in the weights": (lambda c: flip_a_byte(c / "model.safetensors"), "model.safetensors is damaged"),
    "RNG state deleted": (lambda c: (c / "random_states_0.pkl").unlink(), "random_states_0.pkl is missing"),
    "RNG state emptied": (lambda c: (c / "random_states_0.pkl").write_bytes(b""), "random_states_0.pkl is damaged"),
    "trainer state edited": (lambda c: (c / "trainer_state.json").write_text("{}"), "trainer_state.json is damaged"),
    "truncated optimizer": (lambda c: (c / "optimizer.bin").write_bytes(b"\x80"), "optimizer.bin is damaged"),
    "manifest not a mapping": (lambda c: (c / "manifest.json").write_text("[]"), "manifest.json is malformed"),
}


def rewrite_manifest(checkpoint: Path, change) -> None:
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    (checkpoint / "manifest.json").write_text(json.dumps(change(manifest)))


@pytest.mark.parametrize(
    "spoil, message",
    [
        (lambda c: (c / "manifest.json").write_text("[]"), "manifest.json is malformed"),
        (lambda c: (c / "manifest.json").write_text('"step_2"'), "manifest.json is malformed"),
        (lambda c: rewrite_manifest(c, lambda m: {**m, "a.bin": {"sha256": "0" * 64}}), "manifest.json is malformed"),
        (lambda c: rewrite_manifest(c, lambda m: {**m, "a.bin": {"bytes": "3", "sha256": ""}}), "is malformed"),
        # an empty manifest beside truncated weights vouches for nothing
        (
            lambda c: [(c / "manifest.json").write_text("{}"), (c / "model.safetensors").write_bytes(b"{")],
            "a.bin is not listed in manifest.json",
        ),
        (lambda c: (c / "b.bin").write_bytes(b"planted"), "b.bin is not listed in manifest.json"),
        (lambda c: (c / "a.bin").write_bytes(b"\x00" * 4), "a.bin is damaged"),
    ],
    ids=["a list", "a string", "an entry without bytes", "bytes as text", "empty", "a file more", "altered"],
)
def test_a_malformed_manifest_is_a_damaged_checkpoint(tmp_path, spoil, message):
    from moco_hf.checkpointing import checkpoint_damage

    checkpoint = tmp_path / "step_2"
    checkpoint.mkdir()
    (checkpoint / "a.bin").write_bytes(b"\x01" * 4)
    (checkpoint / "model.safetensors").write_bytes(b"weights")
    write_manifest(checkpoint)
    assert checkpoint_damage(checkpoint) is None
    spoil(checkpoint)
    assert message in checkpoint_damage(checkpoint)


@pytest.mark.slow
@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_checkpoint_is_never_trusted(run_with_two_checkpoints, damage):
    out, args = run_with_two_checkpoints
    spoil, message = DAMAGES[damage]
    spoil(out / "checkpoints" / "step_4")
    explicit = run_pretrain(
        *args, "--max_train_steps", "6", "--resume_from_checkpoint", str(out / "checkpoints" / "step_4")
    )
    assert explicit.returncode == 2 and message in one_line_error(explicit)
    latest = run_pretrain(*args, "--max_train_steps", "6", "--resume_from_checkpoint", "latest")
    assert latest.returncode == 0, latest.stderr[-3000:]
    assert "Skipping checkpoint" in latest.stderr and message in latest.stderr
    assert "Resumed from" in latest.stderr and "at step 2" in latest.stderr  # the newest intact one


@pytest.mark.slow
def test_rolling_back_keeps_the_abandoned_checkpoints_aside_and_latest_means_the_new_ones(run_with_two_checkpoints):
    out, args = run_with_two_checkpoints
    old_step_4 = (out / "checkpoints" / "step_4" / "model.safetensors").read_bytes()
    with (out / "metrics.jsonl").open("a") as metrics:
        metrics.write('{"step": 5, "loss": 4.')  # a row torn by a kill in mid-write
    (out / ".hub-upload-step_4").mkdir()  # a model snapshot of an upload the kill interrupted
    result = run_pretrain(*args, "--max_train_steps", "6", "--checkpoints_total_limit", "2",
                          "--resume_from_checkpoint", str(out / "checkpoints" / "step_2"))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Rolled back to step_2" in result.stderr
    # metrics.jsonl: steps 3 and 4 of the abandoned branch and the torn row are dropped, each step logged once.
    assert not (out / ".hub-upload-step_4").exists()
    assert [row["step"] for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())] == [
        1,
        2,
        3,
        4,
        5,
        6,
    ]
    assert [p.name for p in complete_checkpoints(out)] == ["step_4", "step_6"]  # the new run's, rotated by the limit
    (abandoned,) = (out / "checkpoints" / "abandoned").iterdir()
    assert abandoned.name.startswith("step_4-") and (abandoned / "model.safetensors").read_bytes() == old_step_4


@pytest.mark.slow
def test_a_second_run_in_the_same_folder_is_refused_and_a_killed_ones_lock_is_not_stale(small_dataset, tmp_path):
    out = tmp_path / "run"
    args = [*FAST_TRAINING, "--dataset_name", str(small_dataset), "--knn_at_start", "false", "--output_dir", str(out)]
    first = start_pretrain(*args, "--max_train_steps", "500")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (out / "metrics.jsonl").is_file():
        time.sleep(0.05)
    second = run_pretrain(*args, "--max_train_steps", "2", timeout=120)
    assert second.returncode == 2 and f"another run (pid {first.pid}) is writing to" in one_line_error(second)
    os.killpg(first.pid, signal.SIGKILL)
    first.communicate()
    third = run_pretrain(*args, "--max_train_steps", "2", "--overwrite_output_dir")  # the killed run left metrics
    assert third.returncode == 0, third.stderr[-3000:]


def test_every_config_field_is_compared_on_resume_unless_it_may_change():
    """A field added to MocoConfig is compared on resume by itself: each field but those `MAY_CHANGE_ON_RESUME`
    names is refused when it differs from the checkpoint's, in the settings the trainer records."""
    from types import SimpleNamespace

    from moco_hf.configuration_moco import MAY_CHANGE_ON_RESUME
    from moco_hf.pretraining import MocoTrainingArguments
    from moco_hf.pretraining.setup import run_settings
    from moco_hf.run_policy import check_resume_settings

    args = MocoTrainingArguments(backbone="resnet18")
    plan = SimpleNamespace(order=object(), global_batch=16, micro_batch=16, total_steps=10, fingerprint="f")
    config = MocoConfig.from_preset("v2", backbone="resnet18")
    saved = run_settings(config, plan, args, 0.03, 1)
    assert set(MocoConfig.field_names()) > MAY_CHANGE_ON_RESUME
    for name in MocoConfig.field_names():
        changed = run_settings(config, plan, args, 0.03, 1)
        changed[name] = ["a value no config holds"]
        if name in MAY_CHANGE_ON_RESUME:
            check_resume_settings(saved, changed, Path("step_4"))
        else:
            with pytest.raises(UsageError, match=f"^`{name}` is "):
                check_resume_settings(saved, changed, Path("step_4"))


@pytest.mark.slow
@pytest.mark.parametrize(
    "changed, message",
    [
        (["--per_device_train_batch_size", "8"], "`global_batch_size` is 8 but checkpoint step_4 was trained with 16"),
        (["--queue_size", "128"], "queue_size is 128 but checkpoint step_4 was trained with 64"),
        (["--backbone", "resnet34"], "backbone is 'resnet34' but checkpoint step_4 was trained with 'resnet18'"),
        # Once resumed silently, the run then described by the new values:
        (["--image_size", "64"], "image_size is 64 but checkpoint step_4 was trained with 32"),
        (["--softmax_temperature", "0.5"], "softmax_temperature is 0.5 but checkpoint step_4 was trained with 0.2"),
        (["--momentum", "0.9"], "momentum is 0.9 but checkpoint step_4 was trained with 0.999"),
        (["--image_mean", "0.5", "0.5", "0.5"], "image_mean is [0.5, 0.5, 0.5] but checkpoint step_4 was trained"),
        (["--weight_decay", "0.01"], "weight_decay is 0.01 but checkpoint step_4 was trained with 0.0001"),
        (["--lr_schedule", "step"], "lr_schedule is 'step' but checkpoint step_4 was trained with 'cosine'"),
        (["--max_train_samples", "100"], "max_train_samples is 100 but checkpoint step_4 was trained with None"),
        (["--dataset_name", "{other}"], "the dataset '{other}' (100 rows, sha256 of the first 8 "),
        (["--dataset_name", "{other}"], "is not the one checkpoint step_4 was trained on, '{dataset}' (200 rows, "),
    ],
)
def test_changed_settings_on_resume_are_refused_with_the_field_named(
    run_with_two_checkpoints, small_dataset, tmp_path, changed, message
):
    _, args = run_with_two_checkpoints
    other = tmp_path / "other_dataset"  # the dataset's second shard alone
    shutil.copytree(small_dataset, other, ignore=shutil.ignore_patterns("train-00000-*"))
    places = {"{other}": str(other), "{dataset}": str(small_dataset)}
    changed = [places.get(word, word) for word in changed]
    for place, value in places.items():
        message = message.replace(place, value)
    result = run_pretrain(*args, "--max_train_steps", "6", "--resume_from_checkpoint", "latest", *changed)
    assert result.returncode == 2 and message in one_line_error(result)


@pytest.mark.slow
def test_the_same_data_under_another_path_resumes(run_with_two_checkpoints, small_dataset, tmp_path):
    """Resume compares the data (row count and a digest of the first rows, `dataset_fingerprint`), not its path."""
    out, args = run_with_two_checkpoints
    moved = tmp_path / "moved" / "the same images"
    shutil.copytree(small_dataset, moved)
    result = run_pretrain(*args, "--max_train_steps", "5", "--resume_from_checkpoint", "latest", "--dataset_name",
                          str(moved))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "results.json").read_text())["steps"] == 5


@pytest.mark.slow
def test_another_worker_count_resumes_bit_identically(run_with_two_checkpoints):
    """Each image's augmentation is seeded by its place in the global order, not by the worker that reads it."""
    out, args = run_with_two_checkpoints
    result = run_pretrain(*args, "--max_train_steps", "4", "--dataloader_num_workers", "0",
                          "--resume_from_checkpoint", str(out / "checkpoints" / "step_2"))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "bit-identical" not in result.stderr and "Resuming" not in result.stderr
    (abandoned,) = (out / "checkpoints" / "abandoned").iterdir()  # the uninterrupted run's step 4
    resumed, uninterrupted = (load_file(c / "model.safetensors") for c in (out / "checkpoints" / "step_4", abandoned))
    for name in uninterrupted:
        torch.testing.assert_close(resumed[name], uninterrupted[name], atol=0, rtol=0, msg=name)


@pytest.mark.slow
def test_a_stream_resumed_with_another_worker_count_warns(small_dataset, tmp_path):
    args = [*FAST_TRAINING, "--dataset_name", str(small_dataset), "--knn_monitor", "false", "--streaming",
            "--output_dir", str(tmp_path / "run"), "--checkpointing_steps", "2"]  # fmt: skip
    assert run_pretrain(*args, "--max_train_steps", "2").returncode == 0
    result = run_pretrain(*args, "--max_train_steps", "4", "--resume_from_checkpoint", "latest",
                          "--dataloader_num_workers", "1")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--dataloader_num_workers is 1 but the checkpoint was written with 2" in result.stderr
    state = json.loads((tmp_path / "run" / "checkpoints" / "step_4" / "trainer_state.json").read_text())
    assert state["settings"]["dataloader_num_workers"] == 1 and state["settings"]["data_order"] == "stream"


def test_checkpoint_that_does_not_match_its_config_names_the_field(tmp_path):
    MocoModel(MocoConfig(backbone="resnet18", queue_size=64, dim=16)).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for field, value, message in (
        ("dim", 32, "dim=32 in config.json but 16 in the weights"),
        ("queue_size", 128, "queue_size=128 in config.json but 64 in the weights"),
    ):
        (tmp_path / "config.json").write_text(json.dumps({**config, field: value}))
        with pytest.raises(ValueError, match=message):
            MocoModel.from_pretrained(tmp_path)


# ---- 5. disk and permissions ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "planted, resume",
    [(".lock", False), ("run_config.json", True), ("checkpoints", False), ("checkpoints/step_2", True)],
    ids=["lock", "run_config on resume", "checkpoints with overwrite", "a checkpoint on resume"],
)
def test_a_symbolic_link_in_the_output_folder_is_refused_and_its_target_untouched(small_dataset, tmp_path, planted,
                                                                                  resume):  # fmt: skip
    """A link planted where the run writes, replaces or deletes would make it write (or delete) a file elsewhere:
    the PID into the lock's target, the settings into run_config.json's, rmtree through checkpoints/."""
    out = tmp_path / "run"
    args = [*FAST_TRAINING, "--dataset_name", str(small_dataset), "--checkpointing_steps", "2", "--max_train_steps",
            "2", "--no_knn_monitor", "--output_dir", str(out)]  # fmt: skip
    if resume:
        assert run_pretrain(*args).returncode == 0
    target = tmp_path / "elsewhere"
    if planted.startswith("checkpoints"):
        target.mkdir()
        (target / "precious.txt").write_text("keep me")
    else:
        target.write_text("keep me")
    link = out / planted
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.exists():
        shutil.rmtree(link) if link.is_dir() else link.unlink()
    link.symlink_to(target)
    extra = ["--resume_from_checkpoint", "latest"] if resume else ["--overwrite_output_dir"]
    result = run_pretrain(*args, *extra)
    assert result.returncode == 2 and "is a symbolic link" in one_line_error(result) and planted in one_line_error(
        result)  # fmt: skip
    assert (target / "precious.txt" if target.is_dir() else target).read_text() == "keep me"
    assert link.is_symlink()


@pytest.fixture
def small_filesystem(tmp_path):
    """Mount a tmpfs of a given size (MiB) and options; unmounted afterwards. Needs root (as on this project's
    machines); otherwise the test is skipped with the reason."""
    mounts = []

    def mount(size_mib: int, options: str = "") -> Path:
        point = tmp_path / f"fs{len(mounts)}"
        point.mkdir()
        command = [
            "mount",
            "-t",
            "tmpfs",
            "-o",
            f"size={size_mib}m{',' + options if options else ''}",
            "tmpfs",
            str(point),
        ]
        if os.geteuid() != 0 or subprocess.run(command, capture_output=True).returncode != 0:
            pytest.skip("mounting a small tmpfs needs root")
        mounts.append(point)
        return point

    yield mount
    for point in mounts:
        subprocess.run(["umount", str(point)], check=False)


@pytest.mark.slow
def test_unwritable_or_too_small_output_dir_fails_before_training(small_dataset, small_filesystem):
    args = [*FAST_TRAINING, "--dataset_name", str(small_dataset), "--max_train_steps", "2", "--knn_at_start", "false"]
    read_only = small_filesystem(10, "ro")
    result = run_pretrain(*args, "--output_dir", str(read_only / "run"))
    assert result.returncode == 2 and "is not writable: Read-only file system" in one_line_error(result)
    tiny = small_filesystem(20)
    result = run_pretrain(*args, "--output_dir", str(tiny / "run"))
    assert result.returncode == 2
    assert "MiB free, but one checkpoint needs about" in one_line_error(result)
    assert "Training resnet18" not in result.stderr  # stopped before the first step


@pytest.mark.slow
def test_disk_full_mid_run_keeps_the_earlier_checkpoints(small_dataset, small_filesystem):
    # One checkpoint of this model is ~140 MiB: 200 MiB hold the first, not the second.
    disk = small_filesystem(200)
    out = disk / "run"
    args = ["--max_train_steps", "3", "--checkpointing_steps", "1", "--knn_at_start", "false"]
    result = run_pretrain(*FAST_TRAINING, *args, "--dataset_name", str(small_dataset), "--output_dir", str(out))
    assert result.returncode == 1
    assert "could not write checkpoint step_2" in one_line_error(result) and "No space left on device" in result.stderr
    assert "free some space" in one_line_error(result)
    assert [p.name for p in complete_checkpoints(out)] == ["step_1"]
    assert_loadable(complete_checkpoints(out)[0])
    assert not list((out / "checkpoints").glob(".tmp-*"))


@pytest.mark.slow
def test_a_lower_checkpoint_limit_lets_a_full_disk_resume(small_dataset, small_filesystem):
    # ~140 MiB a checkpoint, ~90 MiB the model: 400 MiB hold two checkpoints and the model, then ~30 MiB are free.
    out = small_filesystem(400) / "run"
    args = [*FAST_TRAINING, "--dataset_name", str(small_dataset), "--output_dir", str(out), "--knn_at_start", "false",
            "--checkpointing_steps", "1"]  # fmt: skip
    assert run_pretrain(*args, "--max_train_steps", "2").returncode == 0
    resume = [*args, "--max_train_steps", "3", "--resume_from_checkpoint", "latest"]
    refused = run_pretrain(*resume)
    assert refused.returncode == 2 and "lower --checkpoints_total_limit" in one_line_error(refused)
    # Limit 1: step_1 goes before step_3 is written (step_2, the newest, stays until then), which the check counts.
    result = run_pretrain(*resume, "--checkpoints_total_limit", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert [p.name for p in complete_checkpoints(out)] == ["step_3"]
    assert_loadable(complete_checkpoints(out)[0])


def test_a_loaded_config_cannot_ask_for_a_huge_or_silently_random_queue(tmp_path, caplog):
    from safetensors.torch import save_file

    model = MocoModel(MocoConfig(backbone="resnet18", queue_size=64, dim=16))
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["queue"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with caplog.at_level("WARNING"):
        loaded = MocoModel.from_pretrained(tmp_path)
    assert "have no `queue`: a fresh random queue of 64 keys was made" in caplog.text
    assert loaded.queue.shape == (64, 16)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "queue_size": 10_000_000}))
    with pytest.raises(ValueError, match=r"MocoConfig.queue_size must be an integer >= 0 and <= 1048576"):
        MocoModel.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"depth": 100_000}, r"MocoConfig.backbone_kwargs\['depth'\] must be at most 1000"),
        ({"embed_dim": 10**9}, r"MocoConfig.backbone_kwargs\['embed_dim'\] must be at most 65536"),
        ({"depths": [2, 2, 100_000, 2]}, r"MocoConfig.backbone_kwargs\['depths'\] must be at most 1000"),
    ],
)
def test_a_loaded_config_cannot_make_timm_build_for_minutes(tmp_path, kwargs, message):
    MocoModel(MocoConfig(backbone="resnet18", queue_size=8, dim=16)).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "backbone_kwargs": kwargs}))
    started = time.monotonic()
    with pytest.raises(ValueError, match=message):
        MocoModel.from_pretrained(tmp_path)
    assert time.monotonic() - started < 30


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("dim", 10**7, "dim must be an integer from 1 to 65536"),
        ("dim", 5000, r"queue_size must be at most 134217728 / dim = 26843 with dim 5000"),  # K = 2^20 from the file
        ("mlp_hidden_dim", 10**6, "mlp_hidden_dim must be an integer from 1 to 65536, or None"),
        ("projector_layers", 200_000, "projector_layers must be an integer from 2 to 16"),
        ("image_size", 60_000, "image_size must be an integer from 8 to 4096"),
        ("softmax_temperature", 1e-9, r"softmax_temperature must be a number >= 0.01"),
    ],
)
def test_a_loaded_config_cannot_dictate_an_allocation(tmp_path, field, value, message):
    MocoModel(MocoConfig(backbone="resnet18", queue_size=8, dim=16)).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "queue_size": 2**20, field: value}))
    started, peak = time.monotonic(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ValueError, match=f"MocoConfig.{message}"):
        MocoModel.from_pretrained(tmp_path)
    assert time.monotonic() - started < 30
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 1024**2  # KiB: under 1 GiB more than before


def test_a_queue_that_holds_no_keys_is_refused(tmp_path):
    MocoModel(MocoConfig(backbone="resnet18", queue_size=8, dim=16)).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    assert torch.allclose(MocoModel.from_pretrained(tmp_path).queue, weights["queue"])  # saved keys load as they are
    weights["queue"] = weights["queue"].to(torch.int64)  # unit vectors as integers: zeros, a row at most +-1
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"The `queue` in .* does not hold keys: row \d+ has norm 0"):
        MocoModel.from_pretrained(tmp_path)


def test_a_fresh_run_never_mixes_with_the_run_already_in_its_folder(small_dataset, cifar10_dir, tmp_path):
    out = tmp_path / "run"
    common = [*FAST_TRAINING, "--knn_at_start", "false", "--checkpointing_steps", "2", "--checkpoints_total_limit",
              "2", "--output_dir", str(out)]  # fmt: skip
    first = run_pretrain(*common, "--dataset_name", str(small_dataset), "--max_train_steps", "6")
    assert first.returncode == 0, first.stderr[-3000:]

    def files() -> dict:
        return {path: path.read_bytes() for path in out.rglob("*") if path.is_file() and path.name != ".lock"}

    before = files()
    # Another run into the same folder, without resuming: refused in one line naming both ways on, nothing touched.
    other = [*common, "--dataset_name", str(cifar10_dir), "--max_train_samples", "64", "--seed", "3"]
    second = run_pretrain(*other, "--max_train_steps", "4")
    assert second.returncode == 2
    error = one_line_error(second)
    assert "holds another run (checkpoints, model, metrics.jsonl)" in error
    assert "--resume_from_checkpoint latest" in error and "--overwrite_output_dir" in error
    assert files() == before
    # Told to overwrite: the first run's files go first, so nothing of it is left to mix with.
    third = run_pretrain(*other, "--max_train_steps", "4", "--overwrite_output_dir")
    assert third.returncode == 0, third.stderr[-3000:]
    assert [p.name for p in complete_checkpoints(out)] == ["step_2", "step_4"]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in metrics] == [1, 2, 3, 4]
    assert json.loads((out / "results.json").read_text())["steps"] == 4
