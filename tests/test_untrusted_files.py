"""Untrusted and damaged files: pickles that run code, damaged or lying checkpoints and manifests, hostile
config.json values, weights that do not match their config."""

import json
import os
import resource
import time
from pathlib import Path

import pytest
import torch
from conftest import FAST_TRAINING, complete_checkpoints, one_line_error, run_pretrain
from safetensors.torch import load_file, save_file

from moco_hf import MocoConfig, MocoModel
from moco_hf.checkpointing import write_manifest


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
