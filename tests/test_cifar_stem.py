"""`MocoConfig(cifar_stem=True)`: the official CIFAR demo's ResNet (3x3/1 first conv, no max-pool) from timm's."""

import json
import math
import subprocess
import sys

import pytest
import torch
import torchvision
from conftest import FAST_TRAINING, REPO_ROOT, run_pretrain
from reference_cifar10_demo import ModelMoCo, demo_as_moco_model, demo_state_in_our_names
from torch import nn
from transformers import AutoModel

from moco_hf import MocoConfig, MocoModel, export_encoder
from moco_hf.cli import main as moco_hf_cli
from moco_hf.optimization import build_optimizer


def cifar_model(**overrides) -> MocoModel:
    config = MocoConfig.from_preset("v2", backbone="resnet18", cifar_stem=True, queue_size=64, image_size=32,
                                    **overrides)  # fmt: skip
    return MocoModel(config).eval()


def official_demo_resnet18() -> nn.Module:
    """The encoder of facebookresearch/moco's CIFAR demo: torchvision's resnet18 with its stem changed, no fc."""
    net = torchvision.models.resnet18()
    net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    return net.eval()


def test_the_backbone_is_the_official_demo_network(cifar_tensor):
    model = cifar_model()
    backbone = model.encoder_q.backbone
    assert (backbone.conv1.kernel_size, backbone.conv1.stride) == ((3, 3), (1, 1))
    assert isinstance(backbone.maxpool, nn.Identity)
    images = cifar_tensor[:8]
    with torch.no_grad():
        assert backbone.forward_features(images).shape == (8, 512, 4, 4)  # timm's stem ends at 1x1
        reference = official_demo_resnet18()
        reference.load_state_dict(backbone.state_dict())  # same keys as torchvision's, conv1 now 3x3
        torch.testing.assert_close(model.get_image_features(images).pooler_output, reference(images), atol=1e-5,
                                   rtol=0)  # fmt: skip
    plain = MocoModel(MocoConfig.from_preset("v2", backbone="resnet18", queue_size=64))
    assert model.state_dict().keys() == plain.state_dict().keys()
    assert model.state_dict()["encoder_q.backbone.conv1.weight"].shape == (64, 3, 3, 3)


def test_training_steps_are_the_demos_own_step_by_step(cifar_tensor):
    """The cifar10-demo preset and its optimizer against the notebook's ModelMoCo and SGD (its own code, transcribed
    in tests/reference_cifar10_demo.py), from the same weights and queue, on the same real images and key
    shuffles: SplitBatchNorm in 8 groups, the single-GPU batch shuffle, momentum update, queue and weight decay."""
    torch.manual_seed(0)
    demo = ModelMoCo(K=64).train()
    ours = demo_as_moco_model(demo).train()
    demo_optimizer = torch.optim.SGD(demo.parameters(), lr=0.06, weight_decay=5e-4, momentum=0.9)
    our_optimizer = build_optimizer(ours, ours.config, 0.06)
    for step in range(3):  # the queue (64 keys) fills in 2 steps of 32, then wraps
        query, key = cifar_tensor[64 * step : 64 * step + 32], cifar_tensor[64 * step + 32 : 64 * step + 64]
        torch.manual_seed(100 + step)  # the same key shuffle: each draws one randperm
        demo_loss = train_step(demo_optimizer, demo(query, key))
        torch.manual_seed(100 + step)
        our_loss = train_step(our_optimizer, ours(pixel_values=query, key_pixel_values=key).loss)
        assert our_loss == pytest.approx(demo_loss, abs=1e-4), step
        if step == 1:  # float32 rounding grows tenfold a step as SGD feeds it back: tensors compared after 2 steps
            for name, tensor in demo_state_in_our_names(demo.state_dict()).items():
                if not name.endswith("num_batches_tracked"):  # the demo's layer does not count
                    torch.testing.assert_close(ours.state_dict()[name], tensor, atol=1e-4, rtol=1e-4, msg=name)


def train_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> float:
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


def official_demo_model_base(feature_dim: int = 128) -> nn.Module:
    """The demo's `ModelBase` (in eval mode, where its SplitBatchNorm is a BatchNorm): torchvision's resnet18 with
    `num_classes=feature_dim`, conv1 3x3/1, no max-pool; its own fc is the MoCo head."""
    net = torchvision.models.resnet18(num_classes=feature_dim)
    net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return net.eval()


def test_the_demo_preset_builds_the_demos_network_and_recipe(cifar_tensor):
    config = MocoConfig.from_preset("cifar10-demo")
    model = MocoModel(config).eval()
    reference = official_demo_model_base()
    ours = {name.replace("backbone.", "", 1).replace("head.", "fc.", 1): tensor
            for name, tensor in model.encoder_q.state_dict().items()}  # fmt: skip
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in reference.state_dict().items()}
    reference.load_state_dict(ours)
    with torch.no_grad():
        torch.testing.assert_close(model.encoder_q(cifar_tensor[:8]), reference(cifar_tensor[:8]), atol=1e-5, rtol=0)
    # torchvision's initialisation: no zero-initialised last BatchNorm in the blocks (timm's default).
    blocks = [block for layer in (1, 2, 3, 4) for block in getattr(model.encoder_q.backbone, f"layer{layer}")]
    assert all(torch.equal(block.bn2.weight, torch.ones_like(block.bn2.weight)) for block in blocks)
    # The notebook's arguments: K, m, T, asymmetric loss, bn_splits, wd, lr 0.06 at batch 512.
    assert (config.queue_size, config.momentum, config.softmax_temperature, config.symmetric_loss) == (
        4096, 0.99, 0.1, False)  # fmt: skip
    assert (config.shuffle_bn, config.num_splits, config.weight_decay, config.optimizer) == ("split", 8, 5e-4, "sgd")
    assert config.base_learning_rate * 512 / 256 == pytest.approx(0.06) and config.sgd_momentum == 0.9
    assert (config.image_size, config.image_mean) == (32, [0.4914, 0.4822, 0.4465])


def test_the_demo_preset_draws_its_initial_weights_from_the_notebooks_laws():
    """Each initial tensor (the query encoder's, the queue) has the spread and centre of the notebook's, tensor by
    tensor: timm's init against torchvision's, the stem's and the head's PyTorch defaults, unit BatchNorm, random
    unit keys. A tensor's sample deviation lies within a few `1 / sqrt(2 n)` of the law's, so the bound is that."""
    torch.manual_seed(0)
    ours = MocoModel(MocoConfig.from_preset("cifar10-demo")).state_dict()
    demo = demo_state_in_our_names(ModelMoCo().state_dict())

    def drawn(state: dict[str, torch.Tensor]) -> set[str]:
        return {name for name in state if name.split(".")[0] in ("encoder_q", "queue") and "num_batches" not in name}

    assert drawn(ours) == drawn(demo)
    for name in sorted(drawn(ours)):
        ours_tensor, demo_tensor = ours[name].float(), demo[name].float()
        assert ours_tensor.shape == demo_tensor.shape, name
        if demo_tensor.std() == 0:  # BatchNorm's ones and zeros, running statistics
            assert torch.equal(ours_tensor, demo_tensor), name
            continue
        tolerance = 8 / math.sqrt(2 * demo_tensor.numel())
        assert ours_tensor.std() / demo_tensor.std() == pytest.approx(1, abs=tolerance), name
        assert abs(ours_tensor.mean() - demo_tensor.mean()) < tolerance * demo_tensor.std(), name


def test_saves_and_loads_with_auto_model_and_with_remote_code_alone(cifar_tensor, tmp_path):
    model = cifar_model()
    model.save_pretrained(tmp_path / "model")
    images = cifar_tensor[:4]
    with torch.no_grad():
        expected = model.get_image_features(images).pooler_output
        loaded = AutoModel.from_pretrained(tmp_path / "model").eval()
        torch.testing.assert_close(loaded.get_image_features(images).pooler_output, expected, atol=0, rtol=0)
    torch.save({"images": images, "expected": expected}, tmp_path / "reference.pt")
    # A fresh interpreter where `import moco_hf` fails: the folder's own code must build the CIFAR stem.
    script = (
        "import sys, torch; sys.modules['moco_hf'] = None\n"
        "from transformers import AutoModel\n"
        f"ref = torch.load({str(tmp_path / 'reference.pt')!r})\n"
        f"model = AutoModel.from_pretrained({str(tmp_path / 'model')!r}, trust_remote_code=True).eval()\n"
        "assert type(model).__module__.startswith('transformers_modules'), type(model).__module__\n"
        "with torch.no_grad(): out = model.get_image_features(ref['images']).pooler_output\n"
        "torch.testing.assert_close(out, ref['expected'], atol=1e-6, rtol=0)\n"
        "print('remote code: same features')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0 and "remote code: same features" in result.stdout, result.stderr[-3000:]


def test_export_refuses_what_timm_would_load_as_a_different_network(tmp_path, capsys):
    model = cifar_model()
    with pytest.raises(ValueError, match="CIFAR stem"):
        export_encoder(model, tmp_path / "encoder")
    assert not (tmp_path / "encoder").exists()
    model.save_pretrained(tmp_path / "model")
    capsys.readouterr()
    assert moco_hf_cli(["export", str(tmp_path / "model"), str(tmp_path / "encoder")]) == 2
    stderr = capsys.readouterr().err
    (error,) = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert "CIFAR stem" in error and "AutoModel" in error and "Traceback" not in stderr
    assert not (tmp_path / "encoder").exists()
    # The official layout cannot hold it either (main_lincls.py builds the 7x7 stem): refused, nothing written.
    official = tmp_path / "official.pth.tar"
    assert moco_hf_cli(["convert", str(tmp_path / "model"), str(official), "--to", "official"]) == 2
    stderr = capsys.readouterr().err
    (error,) = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert "CIFAR-stem encoder" in error and "Traceback" not in stderr and not official.exists()


@pytest.mark.parametrize("backbone", ["vit_tiny_patch16_224", "resnet18d"])
def test_a_clear_error_where_it_does_not_apply(backbone):
    with pytest.raises(ValueError, match="cifar_stem=True needs a timm ResNet with a single-convolution stem"):
        MocoModel(MocoConfig(backbone=backbone, cifar_stem=True, queue_size=8))


@pytest.mark.slow
def test_the_trainer_flag_builds_it(small_dataset, tmp_path):
    out = tmp_path / "run"
    result = run_pretrain(*FAST_TRAINING, "--dataset_name", str(small_dataset), "--output_dir", str(out),
                          "--max_train_steps", "2", "--backbone", "resnet18", "--cifar_stem",
                          "--knn_at_start", "false")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = AutoModel.from_pretrained(out / "model")
    assert loaded.config.cifar_stem and loaded.encoder_q.backbone.conv1.kernel_size == (3, 3)


REPRODUCE = REPO_ROOT / "scripts" / "reproduce_cifar10.sh"
# The recipe at CPU scale: 200 images (12 steps of 16 per epoch), kNN on a slice each epoch.
TINY = ["--per_device_train_batch_size", "16", "--learning_rate", "0.06", "--queue_size", "64", "--knn_k", "20",
        "--knn_max_train_samples", "64", "--knn_max_eval_samples", "32", "--dataloader_num_workers", "1",
        "--logging_steps", "2", "--batch_norm_calibration_images", "64"]  # fmt: skip


def run_recipe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPRODUCE), *TINY, *args], capture_output=True, text=True, timeout=900,
                          cwd=REPO_ROOT)  # fmt: skip


@pytest.mark.slow
def test_the_reproduction_recipe_runs_the_first_epochs_of_the_demos_schedule(small_dataset, tmp_path):
    out = tmp_path / "recipe"
    # 48 of the 199 decodable images: 200 epochs of 3 steps of 16
    common = ["--dataset_name", str(small_dataset), "--max_train_samples", "48", "--output_dir", str(out)]
    result = run_recipe(*common, "--stop_after_epochs", "2", "--checkpointing_steps", "3")
    assert result.returncode == 0, result.stderr[-3000:]
    # The last step is also a checkpointing step: its checkpoint is written after the final kNN and holds it.
    state = json.loads((out / "checkpoints" / "step_6" / "trainer_state.json").read_text())
    assert [point["step"] for point in state["knn_history"]] == [3, 6]
    results = json.loads((out / "results.json").read_text())
    assert {"knn_top1", "epochs", "train_seconds", "seconds_per_epoch", "device", "command"} <= results.keys()
    assert results["epochs"] == 2 and results["steps"] == 6 and "cifar10-demo" in results["command"]
    assert results["knn_feature"] == "head" and results["seconds_per_epoch"] == pytest.approx(
        results["train_seconds"] / 2
    )
    curve = json.loads((out / "knn_curve.json").read_text())
    assert [point["epoch"] for point in curve] == [1, 2]  # every epoch, both features
    assert all(0 <= point["knn_top1_head"] <= 100 and 0 <= point["knn_top1_backbone"] <= 100 for point in curve)
    assert curve[-1]["knn_top1"] == curve[-1]["knn_top1_head"] == results["knn_top1"]
    assert (out / "knn_curve.png").stat().st_size > 5_000
    # The stop leaves the 200-epoch schedule alone: each epoch's lr is the demo's formula for its epoch.
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    lr_of_step = {row["step"]: row["lr"] for row in metrics}
    for step in (2, 4, 6):  # logged every 2 steps
        epoch = (step - 1) // 3 + 1
        assert lr_of_step[step] == pytest.approx(0.06 * 0.5 * (1 + math.cos(math.pi * epoch / 200)), rel=1e-9)
    config = AutoModel.from_pretrained(out / "model").config
    assert (config.queue_size, config.momentum, config.softmax_temperature, config.mlp) == (64, 0.99, 0.1, False)
    assert config.cifar_stem and config.augmentation == "cifar10-demo" and config.image_std == [0.2023, 0.1994, 0.201]

    resumed = run_recipe(*common, "--stop_after_epochs", "3", "--resume_from_checkpoint", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    curve = json.loads((out / "knn_curve.json").read_text())
    assert [point["epoch"] for point in curve] == [1, 2, 3]
    assert json.loads((out / "results.json").read_text())["steps"] == 9


@pytest.mark.slow
def test_a_wall_time_budget_stops_the_run_cleanly(small_dataset, tmp_path):
    out = tmp_path / "budget"
    result = run_recipe("--dataset_name", str(small_dataset), "--max_train_steps", "10000",
                        "--max_train_minutes", "0.05", "--knn_at_start", "false", "--output_dir", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--max_train_minutes 0.05 reached" in result.stderr
    results = json.loads((out / "results.json").read_text())
    assert 0 < results["steps"] < 10000 and results["train_seconds"] >= 3
    # Stopped at a step boundary, evaluated, checkpointed and saved like a finished run.
    assert (out / "checkpoints" / f"step_{results['steps']}" / "trainer_state.json").is_file()
    assert (out / "model" / "model.safetensors").is_file() and 0 <= results["knn_top1"] <= 100
