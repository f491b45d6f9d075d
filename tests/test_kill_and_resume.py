"""Kills and signals on real processes (one and several), and resuming from what they leave: the run ends with the
weights an uninterrupted run would have, or at a checkpoint every process agrees on."""

import contextlib
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    FAST_TRAINING,
    PRETRAIN,
    assert_loadable,
    complete_checkpoints,
    launch,
    run_pretrain,
    start_pretrain,
)
from safetensors.torch import load_file


@pytest.mark.slow
def test_sigkill_mid_step_and_mid_save_then_resume_matches_an_uninterrupted_run(small_dataset, tmp_path):
    args = [*FAST_TRAINING, "--dataset_name", str(small_dataset), "--max_train_steps", "8",
            "--checkpointing_steps", "1", "--knn_at_start", "false"]  # fmt: skip
    # Every run of this test in its own process, as the killed ones must be: the same threads, the same numerics.
    reference = launch(PRETRAIN, *args, "--output_dir", str(tmp_path / "reference"))
    assert reference.returncode == 0, reference.stderr[-3000:]

    out, rng = tmp_path / "killed", random.Random(0)
    caught_mid_save = 0
    for target in ("mid-save", "mid-step", "mid-save"):
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
    if (signum, target) != (signal.SIGTERM, "process group"):
        return  # the same kind of checkpoint in each case: one resume from it is enough
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
    collective, not gloo's 30 minutes, and says so in one line. The frozen rank is then let go (SIGCONT), as a node
    that comes back: the launcher has told it to stop, and it ends at once (frozen, the launcher would end it after
    torch elastic's fixed 30-second grace)."""
    import psutil

    process, ranks = start_two_processes(small_dataset, tmp_path / "run", "--peer_timeout_seconds", "5")
    os.kill(ranks[1], signal.SIGSTOP)
    start, stderr = time.monotonic(), []
    for line in process.stderr:  # until rank 0's error
        stderr.append(line)
        if line.startswith("error: "):
            break
    noticed = time.monotonic() - start
    os.kill(ranks[1], signal.SIGCONT)
    stderr = "".join(stderr) + process.communicate(timeout=180)[1]
    assert process.returncode != 0 and noticed < 30, stderr[-3000:]  # 5 s to notice, a step or two before
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert "process 0 lost another process of the run at step" in errors[0] and "the last intact checkpoint is step_" \
        in errors[0], stderr[-3000:]  # fmt: skip
    assert all("lost another process of the run" in error for error in errors)  # the one let go ends the same way
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
