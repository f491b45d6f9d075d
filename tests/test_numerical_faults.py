"""Numerical faults and failing workers: a NaN/Inf loss or weights stop the run at its last good checkpoint, and the
advised resume is accepted; a loader worker that fails ends the process instead of hanging."""

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from conftest import (
    FAST_TRAINING,
    REPO_ROOT,
    assert_loadable,
    complete_checkpoints,
    one_line_error,
    run_pretrain,
)
from safetensors.torch import load_file, save_file

from moco_hf import MocoConfig, MocoModel
from moco_hf.checkpointing import TrainerState, non_finite_tensors, save_checkpoint, write_manifest
from moco_hf.errors import RunError

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


@pytest.mark.slow  # two interpreters and their loader workers, one of which must be seen hanging for 5 s
def test_a_failing_loader_worker_ends_the_process_instead_of_hanging_at_exit(small_dataset):
    """Workers ignore SIGTERM (so that a Ctrl-C to the process group leaves them to the checkpoint save); at exit,
    multiprocessing terminates them with SIGTERM and waits: without `close_loader` (as the trainer calls it
    whatever ends its loop) an error in a worker left the process hanging for ever."""
    command = [sys.executable, "-c", LOADER_WORKER_FAILS, str(small_dataset)]
    # The control, without `close_loader`: once the error's traceback is out, the interpreter only has to exit, and
    # 5 s later it still has not (it never would; with `close_loader` it exits within a second of its traceback).
    left = subprocess.Popen([*command, "leave"], cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    try:
        result = subprocess.run([*command, "close"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
        assert result.returncode == 1 and "IndexError: augmentation failed" in result.stderr
        for line in left.stderr:
            if "IndexError: augmentation failed" in line:
                break
        time.sleep(5)
        assert left.poll() is None, "without close_loader the process was expected to hang at exit"
    finally:
        left.kill()
        left.communicate()


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
    # resnet18: its first convolution is one layer (`plant_first_convolution_weights`)
    args = [*FAST_TRAINING, "--backbone", "resnet18", "--dataset_name", str(small_dataset), "--checkpointing_steps",
            "1", "--knn_at_start", "false", "--output_dir", str(out)]  # fmt: skip
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


@pytest.mark.slow
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
