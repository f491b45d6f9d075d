"""Past one machine: `accelerate launch` over 2 "machines" of 2 processes each (gloo on the CPU, one host), against
the same 4 processes on one machine; the global data order that lets a run resume on another process count; and
SyncBatchNorm's limits."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import PRETRAIN, REPO_ROOT, TINY_BACKBONE, command_and_env, free_port, run_pretrain
from safetensors.torch import load_file

from moco_hf.batched_augmentation import OnDeviceTwoCrops
from moco_hf.data import (
    GlobalOrder,
    MapStyleBatches,
    MicroBatchKeys,
    as_iterable,
    init_loader_worker,
    keep_batch,
    load_image_dataset,
    shard_for_process,
    usable_workers,
)

pytestmark = pytest.mark.slow

TINY_RUN = ["--backbone", TINY_BACKBONE, "--image_size", "32", "--per_device_train_batch_size", "4",
            "--queue_size", "64", "--max_train_steps", "3", "--logging_steps", "1", "--knn_monitor", "false",
            "--dataloader_num_workers", "1", "--checkpointing_steps", "3"]  # fmt: skip


def launch_on_two_machines(*args: str, per_machine: int = 2, timeout: int = 600) -> list[subprocess.CompletedProcess]:
    """Both "machines" of a 2-node `accelerate launch`, started together and rendezvousing on 127.0.0.1."""
    _, env = command_and_env(PRETRAIN, processes=2)
    port = free_port()
    launches = []
    for machine_rank in range(2):
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                   str(2 * per_machine), "--num_machines", "2", "--machine_rank", str(machine_rank),
                   "--main_process_ip", "127.0.0.1", "--main_process_port", str(port), "--mixed_precision", "no",
                   "--dynamo_backend", "no", str(PRETRAIN), *args]  # fmt: skip
        launches.append(subprocess.Popen(command, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True))  # fmt: skip
    results = []
    for process in launches:
        stdout, stderr = process.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
    return results


def losses(output_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_machines_train_exactly_as_the_same_processes_on_one(small_dataset, tmp_path):
    """Two "machines" of one process each against two processes on one machine: machine 1's process is global rank
    1 but local rank 0, so any mix-up of the two ranks (data shards, key shuffle, saved states) shows."""
    one_machine, two_machines = tmp_path / "1x2", tmp_path / "2x1"
    data = ["--dataset_name", str(small_dataset)]
    reference = run_pretrain(*TINY_RUN, *data, "--output_dir", str(one_machine), processes=2)
    assert reference.returncode == 0, reference.stderr[-3000:]
    machines = launch_on_two_machines(*TINY_RUN, *data, "--output_dir", str(two_machines), per_machine=1)
    for machine in machines:
        assert machine.returncode == 0, machine.stderr[-3000:]
    assert "2 processes x 4 images x 1 accumulation = 8 per step" in machines[0].stderr
    assert "shuffle_bn=ddp" in machines[0].stderr  # the key batch is shuffled across both machines' ranks
    assert losses(two_machines) == losses(one_machine)
    ours, theirs = (load_file(run / "model" / "model.safetensors") for run in (two_machines, one_machine))
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], atol=0, rtol=0, msg=name)
    states = sorted(p.name for p in (two_machines / "checkpoints" / "step_3").glob("random_states_*"))
    assert states == ["random_states_0.pkl", "random_states_1.pkl"]  # machine 1's rank saved its own too


def test_four_ranks_read_disjoint_parts_of_the_data(small_dataset):
    """The trainer's sharding (`as_iterable` into world x workers shards, then `shard_for_process`): every training
    image goes to exactly one of 4 ranks."""
    train = load_image_dataset(str(small_dataset), "train", streaming=False)
    stream = as_iterable(train, num_shards=4 * 1)
    per_rank = []
    for rank in range(4):
        shard = shard_for_process(stream, rank, 4)
        assert usable_workers(shard, 1) == 1
        per_rank.append([row["image"]["bytes"] for row in shard.cast_column("image", train.features["image"].__class__(
            decode=False))])  # fmt: skip
    seen = [image for rank in per_rank for image in rank]
    assert all(len(rank) == 50 for rank in per_rank)
    assert sorted(seen) == sorted(row["bytes"] for row in train.cast_column("image", type(train.features["image"])(
        decode=False))["image"])  # fmt: skip


def test_sync_batch_norm_on_cpu_processes_is_refused_before_any_work(small_dataset, tmp_path):
    """PyTorch's DDP runs SyncBatchNorm on GPU modules only: on CPU processes the flag crashed inside DDP."""
    out = tmp_path / "sync"
    result = run_pretrain(*TINY_RUN, "--dataset_name", str(small_dataset), "--sync_bn", "--output_dir", str(out),
                          processes=2)  # fmt: skip
    assert result.returncode != 0  # each process exits 2; torchrun reports its children's failure as 1
    assert "error: --sync_bn needs CUDA GPUs" in result.stderr and "ValueError" not in result.stderr
    assert not (out / "checkpoints").exists()


@pytest.mark.parametrize("num_rows,global_batch", [(200, 16), (203, 24)])
def test_the_images_of_a_step_do_not_depend_on_the_process_layout(num_rows, global_batch):
    """Every layout of the global batch (processes x per-process batch x accumulation) reads the same positions at
    each step; over an epoch the steps read each position of the permutation at most once, and all but the
    `num_rows % global_batch` last."""
    order = GlobalOrder(num_rows, global_batch, seed=3)
    layouts = [(world, global_batch // (world * accumulation), accumulation) for world in (1, 2, 4)
               for accumulation in (1, 2) if global_batch % (world * accumulation) == 0]  # fmt: skip
    assert len(layouts) >= 5
    epoch_positions = []
    for step in range(2 * order.steps_per_epoch):
        per_layout = set()
        for world, micro_batch, accumulation in layouts:
            read = [(epoch, position) for rank in range(world) for micro_step in range(accumulation)
                    for epoch, positions in [order.positions(step, micro_step, rank, micro_batch, world)]
                    for position in positions]  # fmt: skip
            assert len(set(read)) == global_batch
            per_layout.add(frozenset(read))
        assert len(per_layout) == 1
        epoch_positions.extend(per_layout.pop())
    for epoch in (0, 1):
        positions = sorted(position for e, position in epoch_positions if e == epoch)
        assert positions == list(range(order.steps_per_epoch * global_batch))
    assert not torch.equal(order.permutation(0), order.permutation(1))
    assert torch.equal(torch.sort(order.permutation(1)).values, torch.arange(num_rows))


def micro_batches(dataset, two_crops, order, micro_batch, rank, world, workers, start_step, count):
    keys = MicroBatchKeys(order, micro_batch, rank, world, accumulation=1, start_step=start_step)
    loader = torch.utils.data.DataLoader(MapStyleBatches(dataset, "image", two_crops, order), batch_sampler=keys,
                                         collate_fn=keep_batch, num_workers=workers,
                                         worker_init_fn=init_loader_worker)  # fmt: skip
    batches = iter(loader)
    return [next(batches) for _ in range(count)]


def test_one_and_two_processes_read_the_same_images_with_the_same_augmentation(small_dataset):
    """Real loaders (2 workers per process against none) over the small dataset, whose row 17 does not decode:
    the two processes' micro-batches, put together, are the one process's batch, pixels and parameters, from the
    start and from a resumed position."""
    dataset = load_image_dataset(str(small_dataset), "train", streaming=False)
    two_crops = OnDeviceTwoCrops("v2", 32, (0.5,) * 3, (0.25,) * 3)
    order = GlobalOrder(len(dataset), 16, seed=0)
    for start_step in (0, 5):
        alone = micro_batches(dataset, two_crops, order, 16, 0, 1, 0, start_step, count=13)
        ranks = [micro_batches(dataset, two_crops, order, 8, rank, 2, 2, start_step, count=13) for rank in (0, 1)]
        for step, batch in enumerate(alone):
            for name in ("image", "query_params", "key_params"):
                together = torch.cat([ranks[0][step][name], ranks[1][step][name]])
                assert torch.equal(together, batch[name]), (start_step, step, name)
        skipped = sum(batch["skipped"] for batch in alone)  # row 17, once per epoch it falls in
        assert skipped == sum(b["skipped"] for rank in ranks for b in rank) >= 1


@pytest.mark.parametrize("before,after", [(1, 2), (2, 1)])
def test_a_run_resumes_on_another_process_count_at_the_same_global_batch(small_dataset, tmp_path, before, after):
    """1 -> 2 and 2 -> 1 processes, 8 images per step either way (8 x 1 or 4 x 2): resumed at step 2 with a
    warning, then trained to the end; a different global batch is refused with the fix named."""
    out = tmp_path / "run"
    common = [*TINY_RUN, "--dataset_name", str(small_dataset), "--output_dir", str(out), "--checkpointing_steps", "2",
              "--max_train_steps", "4"]  # fmt: skip
    first = run_pretrain(*common, "--per_device_train_batch_size", str(8 // before), processes=before)
    assert first.returncode == 0, first.stderr[-3000:]
    step_2 = str(out / "checkpoints" / "step_2")
    resumed = run_pretrain(*common, "--per_device_train_batch_size", str(8 // after), "--resume_from_checkpoint",
                           step_2, processes=after)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    layout = {1: "1 processes x 8 images x 1 accumulation", 2: "2 processes x 4 images x 1 accumulation"}
    assert f"Resuming step_2 on {layout[after]} (checkpoint: {layout[before]})" in resumed.stderr
    assert "Resumed from" in resumed.stderr and "at step 2" in resumed.stderr
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[-2:] == [3, 4]
    assert int(load_file(out / "model" / "model.safetensors")["queue_ptr"]) == (4 * 8) % 64
    # The global batch is checked alike on any process count: one process, in this one, suffices to see the refusal.
    refused = run_pretrain(*common, "--per_device_train_batch_size", "16", "--resume_from_checkpoint", step_2)
    assert refused.returncode == 2
    assert "`global_batch_size` is 16 but checkpoint step_2 was trained with 8" in refused.stderr
    assert "keep processes x --per_device_train_batch_size x --gradient_accumulation_steps equal to 8" in (
        refused.stderr
    )


@pytest.mark.slow
def test_fewer_processes_than_the_launcher_was_asked_for_are_said_out_loud(small_dataset, tmp_path):
    # On a CPU machine `accelerate launch --num_processes 2` without --multi_gpu starts one process (exit 0).
    _, env = command_and_env(PRETRAIN)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
               "--mixed_precision", "no", "--dynamo_backend", "no", str(PRETRAIN), *TINY_RUN, "--dataset_name",
               str(small_dataset), "--output_dir", str(tmp_path / "run"), "--knn_monitor", "false"]  # fmt: skip
    result = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "accelerate launch was asked for 2 processes, but 1 runs" in result.stderr and "--multi_gpu" in result.stderr
