"""What a Hugging Face user tries first: kNN without a test split, the pipeline on the full model, exports that
never write random weights, warm starts, the arguments HF users expect, and `transformers.Trainer`."""

import json
import logging
import re
import shutil
from dataclasses import replace

import pytest
import torch
from conftest import FAST_TRAINING, REPO_ROOT, run_pretrain
from datasets import load_dataset
from doc_examples import example
from huggingface_hub import ModelCard
from transformers import AutoImageProcessor, AutoModel, TrainerCallback, pipeline
from transformers.utils import logging as hf_logging

from moco_hf import MocoConfig, MocoModel, export_encoder
from moco_hf.augmentation import evaluation_transform
from moco_hf.cli import main as moco_hf_cli
from moco_hf.errors import UsageError
from moco_hf.warm_start import load_pretrained_weights


def one_error_line(stderr: str) -> str:
    (line,) = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert "Traceback" not in stderr
    return line


@pytest.fixture(scope="module")
def train_only_dataset(small_dataset, tmp_path_factory):
    """The small CIFAR parquet dataset without its test split (an image collection with no held-out data)."""
    root = tmp_path_factory.mktemp("train_only")
    shutil.copytree(small_dataset / "data", root / "data", ignore=shutil.ignore_patterns("test-*"))
    return root


@pytest.fixture(scope="module")
def saved_moco(tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved") / "moco"
    torch.manual_seed(1)
    config = MocoConfig.from_preset("v2", backbone="resnet18", queue_size=64, image_size=32)
    MocoModel(config).save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_no_test_split_holds_queries_out_of_the_bank_and_hf_arguments_work(train_only_dataset, saved_moco, tmp_path):
    out = tmp_path / "run"
    args = [*FAST_TRAINING, "--backbone", "resnet18", "--dataset_name", str(train_only_dataset), "--output_dir",
            str(out), "--max_train_samples", "64", "--num_train_epochs", "1", "--report_to", "tensorboard",
            "--model_name_or_path", str(saved_moco), "--num_warmup_steps", "2"]  # fmt: skip
    result = run_pretrain(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        "has no split 'test': the kNN queries are 32 images of 'train' held out of the bank (a seeded sample, "
        "each class in proportion)" in result.stderr
    )
    assert f"Initialised from the MocoModel {saved_moco}" in result.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["knn_initial_encoder"] == "initial (loaded from moco)"  # a warm start is not a random init
    assert "initial (loaded from moco) " in result.stdout
    assert results["knn_split"] == "train, 32 held out (seed 0)" and results["steps"] == 4  # 64 images, 16 a step
    peak = 0.03 * 16 / 256  # the lr each step trained at: warmup over 2 steps, then a cosine over the last 2
    logged = [row["lr"] for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]
    assert logged == pytest.approx([peak / 2, peak, peak, peak / 2])
    card = ModelCard.load(out / "model" / "README.md")
    (evaluation,) = card.data.eval_results
    assert evaluation.dataset_split == "train, 32 held out (seed 0)"
    assert evaluation.dataset_name == train_only_dataset.name
    assert str(train_only_dataset.parent) not in card.content  # no local paths of this machine in the card
    assert list((out / "moco").glob("events.out.tfevents.*")), "--report_to alone must turn tracking on"
    assert json.loads((out / "run_config.json").read_text())["mixed_precision"] == "no"


@pytest.mark.slow
def test_save_to_disk_folders_small_batches_and_no_monitor(small_dataset, tmp_path):
    saved = tmp_path / "saved"
    load_dataset(str(small_dataset)).save_to_disk(saved)
    out = tmp_path / "run"
    args = [*FAST_TRAINING, "--dataset_name", str(saved), "--output_dir", str(out), "--max_train_steps", "3",
            "--per_device_train_batch_size", "6", "--queue_size", "4", "--knn_monitor", "false"]  # fmt: skip
    result = run_pretrain(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "using 3 groups" in result.stderr  # 6 images cannot make 8 BatchNorm groups of 2
    assert "The queue (K=4) is smaller than the global batch (6)" in result.stderr
    assert "(kNN monitor off)" in result.stdout and json.loads((out / "results.json").read_text())["knn_top1"] is None


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--eval_split", "train"], "the kNN bank and queries are both split 'train': every query would find itself"),
        (["--per_device_train_batch_size", "1"], "--per_device_train_batch_size must be at least 2"),
        (["--image_size", "1"], "MocoConfig.image_size must be an integer from 8 to 4096, got 1"),
    ],
)
def test_unusable_settings_stop_before_any_work(small_dataset, tmp_path, extra, message):
    result = run_pretrain(*FAST_TRAINING, "--dataset_name", str(small_dataset), "--output_dir", str(tmp_path), *extra)
    assert result.returncode == 2 and message in one_error_line(result.stderr), result.stderr[-2000:]
    assert not (tmp_path / "checkpoints").exists()


@pytest.fixture(scope="module")
def trained_run(small_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "cifar-moco"
    result = run_pretrain(*FAST_TRAINING, "--dataset_name", str(small_dataset), "--output_dir", str(out),
                          "--max_train_steps", "2", "--checkpointing_steps", "2")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.slow
def test_the_pipeline_and_image_processor_load_the_full_model(trained_run, cifar_images):
    folder = trained_run / "model"
    images = cifar_images[0][:4]
    model = AutoModel.from_pretrained(folder).eval()
    transform = evaluation_transform(32, model.config.image_mean, model.config.image_std)
    with torch.no_grad():
        expected = model.get_image_features(torch.stack([transform(im) for im in images])).pooler_output
    processor = AutoImageProcessor.from_pretrained(folder)
    pixels = processor(images, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(pixels, torch.stack([transform(im) for im in images]), atol=1e-5, rtol=0)
    extractor = pipeline("image-feature-extraction", model=str(folder), pool=True)
    features = torch.tensor(extractor(images)).reshape(len(images), -1)
    torch.testing.assert_close(features, expected, atol=1e-4, rtol=0)


def test_the_pipeline_loads_a_folder_written_by_save_pretrained(cifar_images, tmp_path, caplog):
    config = MocoConfig.from_preset("cifar10-demo", queue_size=64)
    model = MocoModel(config).eval()
    model.save_pretrained(tmp_path / "model")  # no trainer: the folder alone must serve the pipeline
    images = cifar_images[0][:4]
    transform = evaluation_transform(32, config.image_mean, config.image_std)
    with torch.no_grad():
        expected = model.get_image_features(torch.stack([transform(im) for im in images])).pooler_output
    hf_logging.warning_once.cache_clear()  # a warning given earlier in the session must be given again here
    hf_logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            assert type(AutoImageProcessor.from_pretrained(tmp_path / "model")).__name__ == "BitImageProcessor"
            extractor = pipeline("image-feature-extraction", model=str(tmp_path / "model"), pool=True)
    finally:
        hf_logging.disable_propagation()
    assert "backend" not in caplog.text  # e.g. "Requested torchvision backend is not available" where it is
    features = torch.tensor(extractor(images)).reshape(len(images), -1)
    torch.testing.assert_close(features, expected, atol=1e-4, rtol=0)


def test_base_model_is_the_backbone_whose_features_users_transfer(cifar_tensor):
    model = MocoModel(MocoConfig(backbone="resnet18", queue_size=64, mlp=True)).eval()
    with torch.no_grad():
        pooled = model.base_model(cifar_tensor[:4])
        expected = model.get_image_features(cifar_tensor[:4]).pooler_output
    assert pooled.shape == (4, model.num_features) == (4, 512)  # not the 128-d projection
    torch.testing.assert_close(pooled, expected, atol=0, rtol=0)


@pytest.mark.slow
def test_export_carries_the_runs_card_and_refuses_what_is_not_a_moco_model(trained_run, small_dataset, tmp_path,
                                                                          capsys):  # fmt: skip
    summary = (trained_run / "model" / "training_summary.json").read_text()  # uploaded with the model
    assert str(small_dataset.parent) not in summary and json.loads(summary)["dataset"] == small_dataset.name
    encoder = tmp_path / "encoder"
    assert moco_hf_cli(["export", str(trained_run / "model"), str(encoder)]) == 0
    card = ModelCard.load(encoder / "README.md")
    results = json.loads((trained_run / "results.json").read_text())
    (evaluation,) = card.data.eval_results
    assert evaluation.metric_value == pytest.approx(round(results["knn_top1"], 2))
    assert evaluation.dataset_split == "test[:32]" and "| steps | 2 |" in card.content
    assert "hf-hub:<your-username>/encoder" in card.content and "hf-hub:encoder" not in card.content
    capsys.readouterr()
    for not_a_model, message in (
        (encoder, "holds an exported timm encoder, not a MocoModel"),
        (trained_run / "checkpoints" / "step_2", "is a training checkpoint (Accelerate state, no config.json): load "
                                                 "the model folder its run saved"),
    ):  # fmt: skip
        target = tmp_path / "not-written"
        assert moco_hf_cli(["export", str(not_a_model), str(target)]) == 2
        assert message in one_error_line(capsys.readouterr().err) and not target.exists()
        with pytest.raises(UsageError, match=re.escape(message)):
            MocoModel.from_pretrained(not_a_model)


def test_warm_start_from_a_moco_model_or_timm_weights(saved_moco, tmp_path):
    source = MocoModel.from_pretrained(saved_moco)
    model = MocoModel(source.config)
    assert "MocoModel" in load_pretrained_weights(model, str(saved_moco))
    for name, tensor in source.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    exported = export_encoder(source, tmp_path / "encoder")
    fresh = MocoModel(source.config)
    head_before = fresh.encoder_q.head.state_dict()
    assert "timm weights" in load_pretrained_weights(fresh, str(exported))
    for encoder in (fresh.encoder_q, fresh.encoder_k):
        for name, tensor in source.encoder_q.backbone.state_dict().items():
            assert torch.equal(encoder.backbone.state_dict()[name], tensor), name
    assert all(torch.equal(head_before[k], v) for k, v in fresh.encoder_q.head.state_dict().items())
    other = MocoModel(MocoConfig.from_preset("v2", backbone="resnet34", queue_size=64))
    with pytest.raises(UsageError, match="could not start from"):
        load_pretrained_weights(other, str(exported))
    # What is neither: one line saying what it is (a KeyError traceback before).
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(UsageError, match="holds a 'bert' model, not a MocoModel or an exported timm encoder"):
        load_pretrained_weights(fresh, str(tmp_path / "bert"))
    (tmp_path / "pickle-only").mkdir()
    torch.save(source.state_dict(), tmp_path / "pickle-only" / "pytorch_model.bin")
    with pytest.raises(UsageError, match=r"has no config.json, so it is not a MocoModel .* \['pytorch_model.bin'\]"):
        load_pretrained_weights(fresh, str(tmp_path / "pickle-only"))


@pytest.mark.slow
def test_the_docs_example_with_transformers_trainer_runs(tmp_path, monkeypatch):
    code = example("docs/training.md", "trainer")
    monkeypatch.chdir(REPO_ROOT)
    code = code.replace('output_dir="outputs/trainer-moco"', f'output_dir="{tmp_path}"')
    namespace: dict = {}
    exec(compile(code, "docs/training.md", "exec"), namespace)  # the example as a user would paste it
    model, trainer = namespace["model"], namespace["trainer"]
    assert trainer.state.global_step == 3 and int(model.queue_ptr) == (3 * 16) % 1024
    assert all(torch.isfinite(torch.tensor(log["loss"])) for log in trainer.state.log_history if "loss" in log)


def test_the_trainer_callback_applies_the_v3_momentum_schedule(cifar_tensor, tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from moco_hf.schedules import momentum_at
    from moco_hf.trainer_callbacks import KeyMomentumScheduleCallback

    config = MocoConfig.from_preset("v3", backbone="test_resnet", momentum=0.9, mlp_hidden_dim=32, image_size=32)
    model = MocoModel(config)
    images = cifar_tensor[:64]
    train = Dataset.from_dict({"pixel_values": images.numpy(), "key_pixel_values": images.flip(3).numpy()})
    name, parameter = next(iter(model.encoder_k.named_parameters()))  # the key encoder's first weight
    query_parameter = dict(model.encoder_q.named_parameters())[name]
    recorded = []

    class MeasureAppliedMomentum(TrainerCallback):
        """m of the update k <- m k + (1 - m) q done in this step's forward, solved by least squares from k and q."""

        def on_step_begin(self, args, state, control, **kwargs):
            self.before = parameter.detach().clone(), query_parameter.detach().clone()

        def on_step_end(self, args, state, control, **kwargs):
            key_before, query_before = self.before
            gap = key_before - query_before
            if gap.abs().max() > 0:  # at step 0 the key encoder is a copy of the query encoder
                recorded.append(float(((parameter.detach() - query_before) * gap).sum() / (gap * gap).sum()))

    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=16, max_steps=4,
                             learning_rate=0.5, optim="sgd", report_to="none", save_strategy="no",
                             dataloader_drop_last=True)  # fmt: skip
    callbacks = [KeyMomentumScheduleCallback(), MeasureAppliedMomentum()]
    Trainer(model=model, args=args, train_dataset=train.with_format("torch"), callbacks=callbacks).train()
    # v3: m = 1 - (1 - 0.9) * 0.5 * (1 + cos(pi * step / 4)) at steps 1, 2, 3 (0.9146, 0.95, 0.9854).
    expected = [momentum_at(step, 4, 0.9, "cosine") for step in (1, 2, 3)]
    assert recorded == pytest.approx(expected, abs=1e-4)
    assert expected[0] != expected[-1]


@pytest.fixture(scope="module")
def class_sorted_folder(cifar_images, tmp_path_factory):
    """An image folder of one's own: 10 class subfolders of 20 real CIFAR images each, no test split (so sorted by
    class, as `datasets` lists it), and the same 200 images flat, without labels."""
    images, labels = cifar_images
    root = tmp_path_factory.mktemp("folders")
    counts = dict.fromkeys(range(10), 0)
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        if counts[label] == 20:
            continue
        counts[label] += 1
        for folder in (root / "labelled" / f"class_{label}", root / "unlabelled"):
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{index:04d}.png")
    assert set(counts.values()) == {20}
    return root


@pytest.mark.parametrize("streaming", [False, True], ids=["dataset", "stream"])
def test_held_out_queries_are_a_class_balanced_sample_with_class_mates_in_the_bank(class_sorted_folder, streaming):
    from accelerate import Accelerator

    from moco_hf.knn import KnnMonitor, KnnSplits

    # the trainer's defaults: 2,000 queries, 10,000 bank
    splits = KnnSplits(str(class_sorted_folder / "labelled"), streaming=streaming)
    monitor = KnnMonitor(splits, Accelerator(cpu=True), 32, (0.5,) * 3, (0.25,) * 3)
    queries, bank = monitor.splits["queries"]["label"], monitor.splits["bank"]["label"]
    assert len(queries) == 40 and len(bank) == 160  # a fifth of the folder, not its first 2,000 rows
    assert all(queries.count(label) == 4 and bank.count(label) == 16 for label in range(10))
    assert monitor.query_description == "train, 40 held out (seed 0)"
    # seeded: the same every run; a stream (read whole: it is smaller than bank + queries) is split as the dataset
    again = KnnMonitor(replace(splits, streaming=False), Accelerator(cpu=True), 32, (0.5,) * 3, (0.25,) * 3)
    assert again.splits["queries"]["image"] == monitor.splits["queries"]["image"]


@pytest.mark.slow
@pytest.mark.parametrize("folder", ["labelled", "unlabelled"])
def test_a_small_folder_of_ones_own_trains_with_default_flags(class_sorted_folder, folder, tmp_path):
    out = tmp_path / "run"
    result = run_pretrain(*FAST_TRAINING, "--dataset_name", str(class_sorted_folder / folder), "--output_dir",
                          str(out), "--max_train_steps", "2", "--knn_max_eval_samples", "2000",
                          "--knn_max_train_samples", "10000", "--knn_at_start", "false")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    if folder == "labelled":  # was: IndexError: Index 200 out of range
        assert results["knn_split"] == "train, 40 held out (seed 0)" and 0 <= results["knn_top1"] <= 100
    else:  # was: IndexError, or "cannot tell the label column": trains, without the monitor, saying so once
        assert results["knn_top1"] is None and result.stderr.count("Training without the kNN monitor") == 1
        assert "cannot tell the label column" in result.stderr


def test_a_transformers_trainer_checkpoint_loads_with_auto_model_and_the_pipeline(cifar_tensor, cifar_images, tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    model = MocoModel(MocoConfig.from_preset("v2", backbone="test_resnet", queue_size=32, image_size=32))
    images = cifar_tensor[:32]
    train = Dataset.from_dict({"pixel_values": images.numpy(), "key_pixel_values": images.flip(3).numpy()})
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=16, max_steps=2, save_steps=2,
                             optim="sgd", report_to="none", dataloader_drop_last=True)  # fmt: skip
    Trainer(model=model, args=args, train_dataset=train.with_format("torch")).train()
    checkpoint = tmp_path / "checkpoint-2"
    assert (checkpoint / "trainer_state.json").is_file()  # transformers' own, beside config.json: not ours
    loaded = AutoModel.from_pretrained(checkpoint).eval()  # was refused as "a training checkpoint, no config.json"
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, atol=0, rtol=0, msg=name)
    extractor = pipeline("image-feature-extraction", model=str(checkpoint), pool=True)
    assert torch.tensor(extractor(cifar_images[0][:2])).reshape(2, -1).shape == (2, model.num_features)
