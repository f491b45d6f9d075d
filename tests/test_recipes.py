"""The papers' augmentation recipes and the run's schedules, checked against transcriptions and hand values."""

import json
import math

import pytest
import torch
from conftest import REPO_ROOT
from torchvision.transforms import v2

from moco_hf.augmentation import build_two_crops
from moco_hf.configuration_moco import MocoConfig
from moco_hf.schedules import learning_rate_factor, learning_rate_scheduler, momentum_at


def describe(transform) -> list[tuple]:
    """The random transforms of a `v2.Compose` as (name, parameters, probability) rows."""
    rows = []
    for step in transform.transforms:
        p = 1.0
        if isinstance(step, v2.RandomApply):
            (step,), p = step.transforms, step.p
        if isinstance(step, v2.RandomResizedCrop):
            rows.append(("crop", (step.size[0], step.scale, tuple(round(r, 4) for r in step.ratio)), p))
        elif isinstance(step, v2.ColorJitter):
            ranges = [step.brightness, step.contrast, step.saturation, step.hue]
            rows.append(("jitter", tuple(tuple(round(x, 4) for x in r) for r in ranges), p))
        elif isinstance(step, v2.RandomGrayscale):
            rows.append(("grayscale", (), step.p))
        elif isinstance(step, v2.GaussianBlur):
            rows.append(("blur", (step.kernel_size, tuple(step.sigma)), p))
        elif isinstance(step, v2.RandomSolarize):
            rows.append(("solarize", (step.threshold,), step.p * p))
        elif isinstance(step, v2.RandomHorizontalFlip):
            rows.append(("flip", (), step.p))
    return rows


RATIO = (round(3 / 4, 4), round(4 / 3, 4))
# Transcribed from facebookresearch/moco main_moco.py (v1, and v2's --aug-plus) and moco-v3 main_moco.py, with
# torchvision's ColorJitter(b, c, s, h) ranges [1-b, 1+b], [1-c, 1+c], [1-s, 1+s], [-h, h]; blur kernel 3 at 32 px.
OFFICIAL = {
    "v1": [
        [("crop", (32, (0.2, 1.0), RATIO), 1.0), ("grayscale", (), 0.2),
         ("jitter", ((0.6, 1.4), (0.6, 1.4), (0.6, 1.4), (-0.4, 0.4)), 1.0), ("flip", (), 0.5)],
    ] * 2,
    "v2": [
        [("crop", (32, (0.2, 1.0), RATIO), 1.0), ("jitter", ((0.6, 1.4), (0.6, 1.4), (0.6, 1.4), (-0.1, 0.1)), 0.8),
         ("grayscale", (), 0.2), ("blur", ((3, 3), (0.1, 2.0)), 0.5), ("flip", (), 0.5)],
    ] * 2,
    "v3": [
        [("crop", (32, (0.08, 1.0), RATIO), 1.0), ("jitter", ((0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)), 0.8),
         ("grayscale", (), 0.2), ("blur", ((3, 3), (0.1, 2.0)), 1.0), ("flip", (), 0.5)],
        [("crop", (32, (0.08, 1.0), RATIO), 1.0), ("jitter", ((0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)), 0.8),
         ("grayscale", (), 0.2), ("blur", ((3, 3), (0.1, 2.0)), 0.1), ("solarize", (128,), 0.2), ("flip", (), 0.5)],
    ],
    # colab/moco_cifar10_demo.ipynb: RandomResizedCrop(32), flip, RandomApply([ColorJitter(0.4, 0.4, 0.4, 0.1)],
    # p=0.8), RandomGrayscale(0.2); its flip comes first (it commutes with the colour ops).
    "cifar10-demo": [
        [("crop", (32, (0.08, 1.0), RATIO), 1.0), ("jitter", ((0.6, 1.4), (0.6, 1.4), (0.6, 1.4), (-0.1, 0.1)), 0.8),
         ("grayscale", (), 0.2), ("flip", (), 0.5)],
    ] * 2,
}  # fmt: skip


@pytest.mark.parametrize("recipe", ["v1", "v2", "v3", "cifar10-demo"])
def test_each_recipe_is_the_papers(recipe):
    two_crops = build_two_crops(recipe, 32)
    assert [describe(two_crops.transform), describe(two_crops.key_transform)] == OFFICIAL[recipe]


def test_views_are_normalised_crops_of_real_images(cifar_images):
    query, key = build_two_crops("v2", 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))(cifar_images[0][0])
    assert query.shape == key.shape == (3, 32, 32) and query.dtype == torch.float32
    assert not torch.equal(query, key) and float(query.min()) >= -2.0 - 1e-6 and float(query.max()) <= 2.0 + 1e-6


def test_cosine_learning_rate_with_warmup_by_hand():
    # 10 steps, 2 of warmup: 1/2, 2/2, then 0.5 * (1 + cos(pi * t / 8)) for t = 0..7, and 0 at the end.
    expected = [0.5, 1.0] + [0.5 * (1 + math.cos(math.pi * t / 8)) for t in range(8)] + [0.0]
    assert [learning_rate_factor(s, "cosine", 10, 2) for s in range(11)] == pytest.approx(expected)
    # v1's steps: x0.1 at 60% and 80% of training.
    assert [learning_rate_factor(s, "step", 10) for s in (0, 5, 6, 7, 8, 9)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01, 0.01]
    )


def test_the_scheduler_steps_the_optimizer_through_the_same_factors():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.4)
    scheduler = learning_rate_scheduler(optimizer, "cosine", total_steps=10, warmup_steps=2)
    seen = []
    for _ in range(10):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([0.4 * learning_rate_factor(s, "cosine", 10, 2) for s in range(10)])


def test_momentum_follows_the_same_cosine_up_to_one():
    assert momentum_at(5, 10, 0.99, "constant") == 0.99
    assert [momentum_at(s, 10, 0.99, "cosine") for s in (0, 5, 10)] == pytest.approx([0.99, 0.995, 1.0])


def test_the_demos_per_epoch_cosine_gives_the_learning_rates_its_log_printed():
    # The notebook's adjust_learning_rate: lr = 0.06 * 0.5 * (1 + cos(pi * epoch / 200)) at the start of each epoch
    # (counted from 1), printed to 6 decimals in its log; 97 steps an epoch.
    log = json.loads(
        (REPO_ROOT / "benchmarks" / "cifar10_reproduction" / "references" / "moco_cifar10_demo_log.json").read_text()
    )
    printed = {row[0]: row[3] for row in log["rows"]}
    config = MocoConfig.from_preset("cifar10-demo")
    peak = config.base_learning_rate * 512 / 256
    for epoch in (1, 2, 10, 100, 199, 200):
        for step in ((epoch - 1) * 97, epoch * 97 - 1):  # first and last step of the epoch
            lr = peak * learning_rate_factor(step, config.lr_schedule, total_steps=200 * 97, steps_per_epoch=97)
            assert round(lr, 6) == pytest.approx(printed[epoch], abs=1e-6), (epoch, step)


@pytest.mark.parametrize("preset", ["v1", "v2", "v3", "v3-vit", "cifar10-demo"])
def test_help_states_what_each_preset_saves(preset, tmp_path):
    """`moco-hf train --help` names each preset's value of every flag a preset sets; a model built by the command's
    own path (`--preset NAME`, no other flag) saves exactly those values in its config.json."""
    import re

    from moco_hf import MocoModel
    from moco_hf.command_line import CommandLineParser
    from moco_hf.pretraining.arguments import MocoTrainingArguments, build_config, preset_help
    from moco_hf.pretraining.command import parse_arguments

    with torch.device("meta"):  # the network as the run builds it, without its weights
        model = MocoModel(build_config(parse_arguments(["--preset", preset])))
    model.config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    parser = CommandLineParser(MocoTrainingArguments, help_suffix=preset_help)
    stated = {}
    for action in parser._actions:
        found = re.search(r"(?:Presets|Base lr of the presets): (.*)\.$", action.help or "")
        if found:
            groups = dict(re.match(r"(\S+) (.*)", group).groups() for group in found[1].split(", "))
            (value,) = [value for presets, value in groups.items() if preset in presets.split("/")]
            stated[action.dest] = value
    assert len(stated) == 21  # the 20 config flags and --learning_rate's base rate
    for flag, value in stated.items():
        expected = saved["base_learning_rate" if flag == "learning_rate" else flag]
        if isinstance(expected, list):
            assert [float(v) for v in value.split()] == expected, flag
        elif isinstance(expected, bool):
            assert value == str(expected).lower(), flag
        elif isinstance(expected, (int, float)):
            assert float(value) == expected, flag
        else:
            assert value == str(expected), flag
    help_text = parser.format_help()
    assert "(default: None)" not in help_text and "(preset:" not in help_text
