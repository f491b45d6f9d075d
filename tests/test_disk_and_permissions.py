"""Disk and permissions: an unwritable or too small output folder fails before training; a disk that fills up
mid-run keeps the earlier checkpoints (small tmpfs mounts, which need root)."""

import os
import subprocess
from pathlib import Path

import pytest
from conftest import FAST_TRAINING, TINY_BACKBONE, assert_loadable, complete_checkpoints, one_line_error, run_pretrain


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
    assert f"Training {TINY_BACKBONE}" not in result.stderr  # stopped before the first step


@pytest.mark.slow
def test_disk_full_mid_run_keeps_the_earlier_checkpoints(small_dataset, small_filesystem):
    # One checkpoint of resnet18 is ~140 MiB: 200 MiB hold the first, not the second.
    disk = small_filesystem(200)
    out = disk / "run"
    args = ["--backbone", "resnet18", "--max_train_steps", "3", "--checkpointing_steps", "1", "--knn_at_start", "false"]
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
    args = [*FAST_TRAINING, "--backbone", "resnet18", "--dataset_name", str(small_dataset), "--output_dir", str(out),
            "--knn_at_start", "false", "--checkpointing_steps", "1"]  # fmt: skip
    assert run_pretrain(*args, "--max_train_steps", "2").returncode == 0
    resume = [*args, "--max_train_steps", "3", "--resume_from_checkpoint", "latest"]
    refused = run_pretrain(*resume)
    assert refused.returncode == 2 and "lower --checkpoints_total_limit" in one_line_error(refused)
    # Limit 1: step_1 goes before step_3 is written (step_2, the newest, stays until then), which the check counts.
    result = run_pretrain(*resume, "--checkpoints_total_limit", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert [p.name for p in complete_checkpoints(out)] == ["step_3"]
    assert_loadable(complete_checkpoints(out)[0])
