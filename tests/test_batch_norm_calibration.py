"""The fair random baseline: BatchNorm statistics calibrated on real images, checked against a transcription of the
rule (the mean of per-batch statistics), in the library, the trainer and the evaluation commands."""

import json

import pytest
import torch
from conftest import FAST_TRAINING, REPO_ROOT, run_in_process, run_pretrain
from torch import nn

from moco_hf import MocoConfig, MocoModel
from moco_hf.batch_norm_calibration import calibrate_batch_norm
from moco_hf.evaluation import FeatureArguments, calibrate_random_encoder, evaluation_rows, load_encoder
from moco_hf.modeling_moco import SplitBatchNorm2d, convert_to_split_batch_norm


def two_conv_net() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 3), nn.BatchNorm2d(5))


def expected_statistics(net: nn.Sequential, batches: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """By hand: each BatchNorm's mean over batches of its input's per-batch channel mean and unbiased variance, the
    layers normalising with batch statistics (train mode) as they go."""
    conv1, bn1, _, conv2, _ = net
    sums = [[0, 0], [0, 0]]
    for images in batches:
        first = conv1(images)
        mean1, var1 = first.mean((0, 2, 3)), first.var((0, 2, 3), unbiased=False)
        hidden = (first - mean1[:, None, None]) / (var1[:, None, None] + bn1.eps).sqrt()
        second = conv2((hidden * bn1.weight[:, None, None] + bn1.bias[:, None, None]).relu())
        for index, tensor in enumerate((first, second)):
            sums[index][0] = sums[index][0] + tensor.mean((0, 2, 3))
            sums[index][1] = sums[index][1] + tensor.var((0, 2, 3), unbiased=True)
    return [(mean / len(batches), var / len(batches)) for mean, var in sums]


@pytest.mark.parametrize("split", [False, True], ids=["BatchNorm2d", "SplitBatchNorm2d"])
def test_calibration_replaces_the_statistics_by_their_mean_over_batches(cifar_tensor, split):
    net = two_conv_net()
    if split:  # with per-group statistics left over from a split training step, which calibration must drop
        convert_to_split_batch_norm(net)
        for layer in net.modules():
            if isinstance(layer, SplitBatchNorm2d):
                layer.num_splits = 4
        net.train()(cifar_tensor[:16])
        for layer in net.modules():
            if isinstance(layer, SplitBatchNorm2d):
                layer.num_splits = 1
    weights = {name: tensor.clone() for name, tensor in net.named_parameters()}
    batches = list(cifar_tensor[:80].split(16))
    with torch.no_grad():
        expected = expected_statistics(net, batches[:4])

    used = calibrate_batch_norm(net, iter(batches), num_images=60)  # whole batches: 4 of 16 images

    assert used == 64 and not net.training
    for (mean, var), layer in zip(expected, (net[1], net[4]), strict=True):
        torch.testing.assert_close(layer.running_mean, mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(layer.running_var, var, rtol=1e-4, atol=1e-5)
        assert layer.momentum == 0.1  # the layer's own momentum is back for training
    for name, tensor in net.named_parameters():
        assert torch.equal(tensor, weights[name]), name


def test_a_moco_encoder_with_the_cifar_stem_and_split_batch_norm_is_calibrated_everywhere(cifar_tensor):
    config = MocoConfig.from_preset("cifar10-demo", queue_size=64)
    model = MocoModel(config)
    encoder = model.encoder_q
    weights = {name: tensor.clone() for name, tensor in encoder.named_parameters()}
    assert calibrate_batch_norm(encoder, iter(cifar_tensor[:64].split(32))) == 64
    layers = [layer for layer in encoder.modules() if isinstance(layer, nn.modules.batchnorm._BatchNorm)]
    assert len(layers) == 20 and all(isinstance(layer, SplitBatchNorm2d) for layer in layers)
    for layer in layers:  # none keeps the initial statistics (mean 0, variance 1)
        assert layer.running_mean.abs().max() > 1e-3 and (layer.running_var - 1).abs().max() > 1e-3
        assert int(layer.num_batches_tracked) == 2
    assert all(torch.equal(tensor, weights[name]) for name, tensor in encoder.named_parameters())
    # In eval mode, the first BatchNorm now standardises real images' first-layer activations (as training would).
    with torch.no_grad():
        first = encoder.backbone.bn1(encoder.backbone.conv1(cifar_tensor[64:192]))
    bn1 = encoder.backbone.bn1
    standardised = (first - bn1.bias[:, None, None]) / bn1.weight[:, None, None]
    assert standardised.mean((0, 2, 3)).abs().max() < 0.15 and (standardised.std((0, 2, 3)) - 1).abs().max() < 0.15


@pytest.fixture(scope="module")
def random_moco(tmp_path_factory):
    folder = tmp_path_factory.mktemp("moco") / "model"
    cifar = {"image_size": 32, "image_mean": [0.4913, 0.4821, 0.4465], "image_std": [0.2452, 0.2428, 0.2606]}
    config = MocoConfig.from_preset("v2", backbone="resnet18", queue_size=64, cifar_stem=True, **cifar)
    MocoModel(config).save_pretrained(folder)
    return folder


def test_random_init_evaluation_calibrates_batch_norm_on_training_images(random_moco, small_dataset, tmp_path):
    args = FeatureArguments(model_name_or_path=str(random_moco), random_init=True, dataset_name=str(small_dataset),
                            batch_size=32, output_dir=str(tmp_path))  # fmt: skip
    train_rows, _ = evaluation_rows(args)
    encoder = load_encoder(args.model_name_or_path, random_init=True, seed=0)
    encoder = calibrate_random_encoder(args, encoder, train_rows.dataset)
    assert encoder.description == "resnet18 (random init (BatchNorm calibrated on 199 images))"  # one undecodable
    for layer in encoder.module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            assert layer.running_mean.abs().max() > 1e-3 and (layer.running_var - 1).abs().max() > 1e-3
    fresh = load_encoder(args.model_name_or_path, random_init=True, seed=0).module  # same seed: same weights
    assert all(torch.equal(a, b) for a, b in zip(encoder.module.parameters(), fresh.parameters(), strict=True))

    result = run_in_process(REPO_ROOT / "training" / "knn_eval.py", "--model_name_or_path", str(random_moco),
                            "--random_init", "--dataset_name", str(small_dataset), "--output_dir", str(tmp_path),
                            "--knn_k", "20")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "for resnet18 (random init (BatchNorm calibrated on 199 images))" in result.stdout
    assert json.loads((tmp_path / "knn_results.json").read_text())["encoder"].endswith("calibrated on 199 images))")


@pytest.mark.slow
def test_the_trainer_measures_the_random_encoder_calibrated_and_a_frozen_run_gains_nothing(small_dataset, tmp_path):
    """At learning rate 1e-12 the weights do not move: what the final kNN gains over the calibrated baseline is
    only the difference between two estimates of the same BatchNorm statistics (the training steps' running average
    and the calibration's), which must not show as learning."""
    out = tmp_path / "frozen"
    fast = list(FAST_TRAINING)
    fast[fast.index("--batch_norm_calibration_images") + 1] = "128"
    result = run_pretrain(*fast, "--dataset_name", str(small_dataset), "--output_dir", str(out), "--cifar_stem",
                          "--backbone", "resnet18", "--max_train_steps", "12", "--learning_rate", "1e-12",
                          "--knn_max_train_samples", "100", "--knn_max_eval_samples", "100")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["knn_initial_encoder"] == "random init (BatchNorm calibrated on 128 images)"
    assert abs(results["knn_gain"]) <= 4.0  # 100 queries: one is 1 point; the standard error of ~30% is ~4.6
    line = result.stdout.strip().splitlines()[-1]
    expected = (f"kNN top-1 (k=20) on test[:100]: random init (BatchNorm calibrated on 128 images) "
                f"{results['knn_top1_initial']:.2f}% -> MoCo {results['knn_top1']:.2f}% ({results['knn_gain']:+.2f}) "
                "after 12 steps")  # fmt: skip
    assert line.startswith(expected)
    assert "| before pretraining | gain |" in (out / "model" / "README.md").read_text()
