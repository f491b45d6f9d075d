"""Shuffling BN across 2 real processes (accelerate launch, gloo) against a single-process replay."""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO_ROOT, TINY_BACKBONE, launch, run_pretrain
from safetensors.torch import load_file, save_file

from moco_hf import MocoConfig, MocoModel

pytestmark = pytest.mark.slow


def test_ddp_shuffle_matches_a_replay_of_each_rank(cifar_tensor, tmp_path):
    steps, global_batch = 3, 16
    query = cifar_tensor[: steps * global_batch]
    key = torch.flip(cifar_tensor[1 : steps * global_batch + 1], dims=[3])
    save_file({"query": query.contiguous(), "key": key.contiguous()}, tmp_path / "images.safetensors")
    result = launch(REPO_ROOT / "tests" / "ddp_worker.py", str(tmp_path), processes=2, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in range(2)]

    # The replay: one process doing what each rank did, one rank at a time, with plain BatchNorm.
    replay = MocoModel(MocoConfig(backbone="resnet18", queue_size=40, dim=16, momentum=0.9, shuffle_bn="none"))
    replay.load_state_dict(load_file(tmp_path / "initial.safetensors"))
    replay.train()
    optimizer = torch.optim.SGD(replay.encoder_q.parameters(), lr=0.05, momentum=0.9)
    per_rank = global_batch // 2
    for step in range(steps):
        # The queue is the same on both ranks, and holds the keys of both, in rank order, at the pointer.
        torch.testing.assert_close(ranks[0][f"queue{step}"], ranks[1][f"queue{step}"], atol=0, rtol=0)
        gathered = torch.cat([ranks[0][f"k{step}"], ranks[1][f"k{step}"]])
        rows = torch.arange(step * global_batch, (step + 1) * global_batch) % 40
        torch.testing.assert_close(ranks[0][f"queue{step}"][rows], gathered, atol=0, rtol=0)
        assert int(ranks[0][f"queue_ptr{step}"]) == int(ranks[1][f"queue_ptr{step}"]) == rows[-1] + 1

        batch = slice(step * global_batch, (step + 1) * global_batch)
        queries = [F.normalize(replay.encoder_q(part), dim=1) for part in query[batch].split(per_rank)]
        with torch.no_grad():
            replay._momentum_update_key_encoder()
            torch.manual_seed(100 + step)
            shuffle = torch.randperm(global_batch)  # the permutation rank 0 drew and broadcast
            shards = key[batch][shuffle].split(per_rank)  # rank r encoded shard r of the shuffled global batch
            keys = torch.cat([F.normalize(replay.encoder_k(shard), dim=1) for shard in shards])[torch.argsort(shuffle)]
        torch.testing.assert_close(keys, gathered, atol=1e-5, rtol=0)
        losses = []
        for rank, (q, k) in enumerate(zip(queries, keys.split(per_rank), strict=True)):
            logits = torch.cat([(q * k).sum(1, keepdim=True), q @ replay.queue.T], dim=1) / 0.07
            losses.append(F.cross_entropy(logits, torch.zeros(per_rank, dtype=torch.long)))
            torch.testing.assert_close(losses[-1], ranks[rank][f"loss{step}"], atol=1e-5, rtol=0)
        optimizer.zero_grad()
        (sum(losses) / 2).backward()  # DDP averages the two ranks' gradients
        optimizer.step()
        replay._dequeue_and_enqueue(keys)
    torch.testing.assert_close(replay.queue, ranks[0][f"queue{steps - 1}"], atol=1e-5, rtol=0)


def test_pretrain_script_with_two_processes(small_dataset, tmp_path):
    out = tmp_path / "ddp"
    result = run_pretrain(
        "--backbone", TINY_BACKBONE, "--image_size", "32", "--per_device_train_batch_size", "8", "--queue_size", "64",
        "--dataset_name", str(small_dataset), "--max_train_steps", "4", "--logging_steps", "2",
        "--knn_max_train_samples", "64", "--knn_max_eval_samples", "32", "--knn_k", "10",
        "--dataloader_num_workers", "1", "--output_dir", str(out), "--checkpointing_steps", "2",
        "--batch_norm_calibration_images", "32", processes=2,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    assert "2 processes x 8 images x 1 accumulation = 16 per step" in result.stderr
    assert "shuffle_bn=ddp" in result.stderr
    results = json.loads((out / "results.json").read_text())
    # What was typed: the launcher's command line (its flags, the script, the script's flags), read in each rank.
    assert results["command"].startswith("python -m accelerate.commands.launch --multi_gpu --num_processes 2 ")
    assert results["command"].endswith("--checkpointing_steps 2 --batch_norm_calibration_images 32")
    assert results["knn_initial_encoder"] == "random init (BatchNorm calibrated on 32 images)"  # 16 per process
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_2", "step_4"]
    assert sorted(p.name for p in (out / "checkpoints" / "step_4").glob("random_states_*")) == [
        "random_states_0.pkl",
        "random_states_1.pkl",
    ]
    weights = load_file(out / "model" / "model.safetensors")
    assert int(weights["queue_ptr"]) == (4 * 16) % 64
