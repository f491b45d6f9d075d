"""Shared fixtures: offline Hub, the real CIFAR-10 images in ../shared/data, small models."""

import json
import os
import shutil
import subprocess
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from safetensors.torch import load_file

REPO_ROOT = Path(__file__).resolve().parents[1]
CIFAR10_DIR = REPO_ROOT.parent / "shared" / "data" / "cifar10"
os.environ.setdefault("MOCO_HF_DEFAULT_DATASET", str(CIFAR10_DIR))  # as scripts/test.sh sets it

# Per-channel statistics of CIFAR-10's train split (../shared/data/README.md).
CIFAR_MEAN = torch.tensor([0.4913, 0.4821, 0.4465]).view(1, 3, 1, 1)
CIFAR_STD = torch.tensor([0.2452, 0.2428, 0.2606]).view(1, 3, 1, 1)


@pytest.fixture(scope="session")
def cifar10_dir() -> Path:
    if not CIFAR10_DIR.is_dir():
        pytest.fail(f"The real CIFAR-10 data is expected at {CIFAR10_DIR} (see ../shared/data/README.md).")
    return CIFAR10_DIR


@pytest.fixture(scope="session")
def cifar_images(cifar10_dir: Path) -> tuple[list, list[int]]:
    """The first 512 images of CIFAR-10's test split (PIL) and their labels, read with `datasets`."""
    from datasets import load_dataset

    stream = load_dataset(str(cifar10_dir), split="test", streaming=True)
    rows = list(stream.take(512))
    return [row["image"].convert("RGB") for row in rows], [row["label"] for row in rows]


@pytest.fixture(scope="session")
def cifar_tensor(cifar_images) -> torch.Tensor:
    """(512, 3, 32, 32) normalised CIFAR-10 test images."""
    from torchvision.transforms.v2.functional import pil_to_tensor

    images = torch.stack([pil_to_tensor(img) for img in cifar_images[0]]).float() / 255.0
    return (images - CIFAR_MEAN) / CIFAR_STD


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now: each multi-process launch rendezvouses on its own
    (not on accelerate's default 29500, which another run on this machine may hold)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def command_and_env(script: Path, *args: str, processes: int = 1) -> tuple[list[str], dict[str, str]]:
    """The command line (a fresh Python, or `accelerate launch` with N gloo processes on the CPU) and environment."""
    import sys

    env = {**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1", "OMP_NUM_THREADS": "1" if processes > 1 else "2"}
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                     "--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", "no",
                     "--dynamo_backend", "no"]  # fmt: skip
    return [*launcher, str(script), *args], env


def launch(script: Path, *args: str, processes: int = 1, timeout: int = 600):
    """Run a script to completion in a fresh process (or N processes); returns the CompletedProcess. For tests where
    the process itself is the subject (several processes, a fresh interpreter); otherwise `run_in_process`."""
    import subprocess

    command, env = command_and_env(script, *args, processes=processes)
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO_ROOT)


def run_in_process(script: Path, *args: str):
    """Run `script` as `__main__` in this process with `args` on its command line, as transformers tests its example
    scripts: no interpreter start-up, the imports shared. What it prints and logs is captured, and a `SystemExit`
    or an uncaught exception gives the exit status a fresh process would have; returns a CompletedProcess."""
    import io
    import logging
    import runpy
    import subprocess
    import sys
    import traceback
    from contextlib import redirect_stderr, redirect_stdout
    from unittest.mock import patch

    stdout, stderr = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root, level = logging.getLogger(), logging.getLogger().level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        with patch.object(sys, "argv", [str(script), *args]), redirect_stdout(stdout), redirect_stderr(stderr):
            try:
                runpy.run_path(str(script), run_name="__main__")
                returncode = 0
            except SystemExit as exit_:
                returncode = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
                if isinstance(exit_.code, str):
                    print(exit_.code, file=sys.stderr)
            except Exception:
                traceback.print_exc()
                returncode = 1
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    return subprocess.CompletedProcess([str(script), *args], returncode, stdout.getvalue(), stderr.getvalue())


PRETRAIN = REPO_ROOT / "training" / "pretrain.py"
# The backbone of the tests' training runs: a real ResNet (BatchNorm, timm's stages), at 5M parameters and ~40% of
# resnet18's time per step on 32x32 images, with checkpoints of less than half its size.
TINY_BACKBONE = "resnet10t"
# A tiny but real pretraining: that ResNet on 32x32 images, 16 per batch, a 64-key queue, a small kNN monitor.
FAST_TRAINING = ["--backbone", TINY_BACKBONE, "--image_size", "32", "--per_device_train_batch_size", "16",
                 "--queue_size", "64", "--knn_max_train_samples", "64", "--knn_max_eval_samples", "32", "--knn_k", "20",
                 "--logging_steps", "1", "--dataloader_num_workers", "2",
                 "--batch_norm_calibration_images", "64"]  # fmt: skip


def expected_skips(dataset_name: str, global_batch: int, steps: int, seed: int = 0) -> int:
    """Undecodable images a run without --streaming meets: the positions its steps read in each epoch's
    permutation that hold an undecodable image (each slot counted once; the next decodable image fills it)."""
    from datasets import Image

    from moco_hf.data import GlobalOrder, decode_image, find_image_column, load_image_dataset

    dataset = load_image_dataset(dataset_name, "train", streaming=False)
    column = find_image_column(dataset, None)
    values = dataset.cast_column(column, Image(decode=False))[column]
    broken = {row for row, value in enumerate(values) if decode_image(value) is None}
    order, skips = GlobalOrder(len(dataset), global_batch, seed), 0
    for step in range(steps):
        epoch, positions = order.positions(step, 0, 0, global_batch, 1)
        rows = order.permutation(epoch).tolist()
        skips += sum(rows[position % len(rows)] in broken for position in positions)
    return skips


def run_pretrain(*args: str, timeout: int = 600, processes: int = 1):
    """Run training/pretrain.py in this process, or under `accelerate launch` with N > 1 processes."""
    if processes > 1:
        return launch(PRETRAIN, *args, processes=processes, timeout=timeout)
    return run_in_process(PRETRAIN, *args)


@pytest.fixture(scope="session")
def small_dataset(cifar_images, tmp_path_factory) -> Path:
    """A parquet dataset folder in the Hub layout: 2 train shards (200 real CIFAR images, one corrupt file and one
    grayscale image among them) and 1 test shard (100 images)."""
    import io

    from datasets import ClassLabel, Dataset, Features, Image

    images, labels = cifar_images
    features = Features({"image": Image(), "label": ClassLabel(num_classes=10)})

    def png_bytes(image) -> dict:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return {"bytes": buffer.getvalue(), "path": None}

    train_images = [png_bytes(img) for img in images[:200]]
    train_images[17] = {"bytes": b"this is not an image", "path": None}
    train_images[42] = png_bytes(images[42].convert("L"))
    root = tmp_path_factory.mktemp("small_cifar")
    (root / "data").mkdir()
    for shard in range(2):
        part = slice(shard * 100, (shard + 1) * 100)
        Dataset.from_dict({"image": train_images[part], "label": labels[:200][part]}, features=features).to_parquet(
            root / "data" / f"train-0000{shard}-of-00002.parquet"
        )
    test = [png_bytes(img) for img in images[200:300]]
    Dataset.from_dict({"image": test, "label": labels[200:300]}, features=features).to_parquet(
        root / "data" / "test-00000-of-00001.parquet"
    )
    return root


# ---- what the fault-injection tests share (test_kill_and_resume.py, test_untrusted_files.py, ...) ----
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


def two_checkpoint_arguments(dataset: Path, out: Path) -> list[str]:
    return [*FAST_TRAINING, "--dataset_name", str(dataset), "--knn_at_start", "false", "--output_dir", str(out),
            "--checkpointing_steps", "2"]  # fmt: skip


@pytest.fixture(scope="session")
def trained_with_two_checkpoints(small_dataset, tmp_path_factory):
    """One finished 4-step run with checkpoints at steps 2 and 4, trained once for the session."""
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
