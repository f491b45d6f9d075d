"""The run's folder and resume rules (`moco_hf.run_policy`): one run per folder (the lock), no symbolic link
followed, never mixed with another run; resume refuses changed settings or data, accepts what may change, rolls
back to an older checkpoint cleanly."""

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    FAST_TRAINING,
    TINY_BACKBONE,
    complete_checkpoints,
    one_line_error,
    run_pretrain,
    start_pretrain,
)
from safetensors.torch import load_file

from moco_hf import MocoConfig
from moco_hf.errors import UsageError


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
        (
            ["--backbone", "resnet34"],
            f"backbone is 'resnet34' but checkpoint step_4 was trained with {TINY_BACKBONE!r}",
        ),
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


@pytest.mark.slow
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


@pytest.mark.slow
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
