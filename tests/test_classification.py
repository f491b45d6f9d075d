"""MocoForImageClassification: from a pretrained MocoModel to a classifier, through transformers' own paths (the Auto
classes, `Trainer`, the image-classification pipeline, the calls of `run_image_classification.py`) and timm's."""

import logging

import pytest
import timm
import torch
from doc_examples import example
from safetensors.torch import load_file
from torch import nn
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    Trainer,
    TrainingArguments,
    pipeline,
)

from moco_hf import MocoConfig, MocoForImageClassification, MocoModel
from moco_hf.export import export_encoder

CLASS_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
ID2LABEL = dict(enumerate(CLASS_NAMES))


@pytest.fixture(scope="module")
def pretrained_folder(tmp_path_factory):
    """A saved MocoModel (timm stem, so timm can rebuild it) whose query and key encoders differ, as after training."""
    torch.manual_seed(0)
    model = MocoModel(MocoConfig.from_preset("v2", backbone="test_resnet", queue_size=32, image_size=32))
    with torch.no_grad():
        for tensor in model.encoder_q.parameters():
            tensor.add_(0.01 * torch.randn_like(tensor))
    folder = tmp_path_factory.mktemp("pretrained") / "moco"
    model.save_pretrained(folder)
    return folder


def labelled_cifar(cifar_images, folder, count: int):
    """`count` real CIFAR-10 images with their labels, preprocessed by the folder's saved image processor, as
    `run_image_classification.py` prepares them."""
    from datasets import ClassLabel, Dataset, Features, Image

    images, labels = cifar_images
    features = Features({"image": Image(), "label": ClassLabel(names=CLASS_NAMES)})
    dataset = Dataset.from_dict({"image": images[:count], "label": labels[:count]}, features=features)
    processor = AutoImageProcessor.from_pretrained(folder)

    def transform(batch: dict) -> dict:
        return {"pixel_values": processor(batch["image"], return_tensors="pt")["pixel_values"],
                "labels": batch["label"]}  # fmt: skip

    return dataset.with_transform(transform)


def train(model, dataset, output_dir, steps: int = 3) -> Trainer:
    args = TrainingArguments(output_dir=str(output_dir), per_device_train_batch_size=16, max_steps=steps,
                             learning_rate=0.05, optim="sgd", report_to="none", save_strategy="no",
                             remove_unused_columns=False, use_cpu=True)  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=dataset)
    trainer.train()
    return trainer


def test_a_moco_model_becomes_a_classifier_that_trainer_trains_saves_and_the_pipeline_names(
    pretrained_folder, cifar_images, tmp_path, caplog
):
    with caplog.at_level(logging.WARNING, logger="moco_hf"):
        model = AutoModelForImageClassification.from_pretrained(pretrained_folder, num_labels=10, id2label=ID2LABEL)
    assert type(model) is MocoForImageClassification
    notes = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert len(notes) == 1 and "left out" in notes[0] and "classifier (10 labels) is new" in notes[0], notes
    saved = load_file(pretrained_folder / "model.safetensors")
    backbone = model.backbone.state_dict()
    assert backbone.keys() == {key.removeprefix("encoder_q.backbone.") for key in saved
                               if key.startswith("encoder_q.backbone.")}  # fmt: skip
    for name, tensor in backbone.items():
        torch.testing.assert_close(tensor, saved[f"encoder_q.backbone.{name}"], atol=0, rtol=0, msg=name)
    assert model.classifier.weight.shape == (10, model.backbone.num_features)

    dataset = labelled_cifar(cifar_images, pretrained_folder, 48)
    pixels = torch.stack([dataset[i]["pixel_values"] for i in range(4)])
    with torch.no_grad():
        before = model.eval()(pixels).logits
    trainer = train(model, dataset, tmp_path / "run")
    with torch.no_grad():
        after = model.eval()(pixels).logits
    assert not torch.allclose(before, after)

    folder = tmp_path / "classifier"
    trainer.save_model(str(folder))
    reloaded = AutoModelForImageClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixels).logits, after, atol=0, rtol=0)
    assert reloaded.config.id2label == ID2LABEL and reloaded.config.architectures == ["MocoForImageClassification"]

    classify = pipeline("image-classification", model=str(folder), top_k=10)
    predictions = classify(cifar_images[0][:2])
    expected = after[:2].softmax(dim=1)
    for scores, probabilities in zip(predictions, expected, strict=True):
        assert {p["label"] for p in scores} == set(CLASS_NAMES)
        assert scores[0]["label"] == CLASS_NAMES[int(probabilities.argmax())]
        assert scores[0]["score"] == pytest.approx(float(probabilities.max()), abs=1e-5)


def test_the_calls_of_transformers_run_image_classification(pretrained_folder, tmp_path):
    """AutoConfig with labels and `finetuning_task`, AutoImageProcessor, and the model with
    `ignore_mismatched_sizes`, as examples/pytorch/image-classification/run_image_classification.py makes them."""
    label2id = {name: str(index) for index, name in enumerate(CLASS_NAMES[:5])}
    id2label = {str(index): name for index, name in enumerate(CLASS_NAMES[:5])}
    config = AutoConfig.from_pretrained(pretrained_folder, num_labels=5, label2id=label2id, id2label=id2label,
                                        finetuning_task="image-classification")  # fmt: skip
    processor = AutoImageProcessor.from_pretrained(pretrained_folder)
    model = AutoModelForImageClassification.from_pretrained(pretrained_folder, config=config,
                                                            ignore_mismatched_sizes=True)  # fmt: skip
    assert model.num_labels == 5 and model.config.id2label == id2label
    assert processor.crop_size == {"height": 32, "width": 32}
    model.save_pretrained(tmp_path / "five")
    ten = AutoModelForImageClassification.from_pretrained(tmp_path / "five", num_labels=10,
                                                          ignore_mismatched_sizes=True)  # fmt: skip
    assert ten.classifier.weight.shape[0] == 10
    torch.testing.assert_close(ten.backbone.state_dict(), model.backbone.state_dict(), atol=0, rtol=0)


@pytest.mark.parametrize("problem_type", ["multi_label_classification", "regression"])
def test_the_loss_follows_the_problem_type(problem_type, cifar_tensor):
    config = MocoConfig.from_preset("v2", backbone="test_resnet", image_size=32, num_labels=3,
                                    problem_type=problem_type)  # fmt: skip
    model = MocoForImageClassification(config).eval()
    pixels = cifar_tensor[:4]
    targets = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    if problem_type == "regression":
        targets = torch.randn(4, 3)
    output = model(pixels, labels=targets)
    logits = model.classifier(model.backbone(pixels))
    by_hand = nn.BCEWithLogitsLoss() if problem_type == "multi_label_classification" else nn.MSELoss()
    torch.testing.assert_close(output.loss, by_hand(logits, targets))
    single = MocoForImageClassification(MocoConfig.from_preset("v2", backbone="test_resnet", image_size=32,
                                                               num_labels=3)).eval()  # fmt: skip
    labels = torch.tensor([0, 2, 1, 1])
    torch.testing.assert_close(single(pixels, labels=labels).loss,
                               nn.functional.cross_entropy(single(pixels).logits, labels))  # fmt: skip


def test_the_frozen_protocol_trains_the_classifier_only(pretrained_folder, cifar_images, tmp_path):
    model = MocoForImageClassification.from_pretrained(pretrained_folder, num_labels=10)
    model.freeze_backbone()
    backbone_before = {name: tensor.clone() for name, tensor in model.backbone.state_dict().items()}
    classifier_before = model.classifier.weight.detach().clone()
    train(model, labelled_cifar(cifar_images, pretrained_folder, 48), tmp_path)
    assert model.training and not model.backbone.training  # Trainer's model.train() left BatchNorm in eval mode
    for name, tensor in model.backbone.state_dict().items():  # weights and BatchNorm running statistics alike
        torch.testing.assert_close(tensor, backbone_before[name], atol=0, rtol=0, msg=name)
    assert not torch.equal(model.classifier.weight, classifier_before)
    model.freeze_backbone(False)
    assert model.backbone.training and all(p.requires_grad for p in model.backbone.parameters())


@pytest.mark.parametrize(
    "settings",
    [
        {"backbone": "test_resnet"},
        {"backbone": "resnet18", "cifar_stem": True},
        {"backbone": "vit_tiny_patch16_224", "backbone_kwargs": {"img_size": 32, "patch_size": 8}},
    ],
    ids=["timm stem", "CIFAR stem", "v3 ViT"],
)
def test_classifiers_of_every_backbone_kind_give_logits_and_timm_exports_give_the_same(settings, cifar_tensor,
                                                                                      tmp_path):  # fmt: skip
    preset = "v3-vit" if "vit" in settings["backbone"] else "v2"
    config = MocoConfig.from_preset(preset, image_size=32, num_labels=10, id2label=ID2LABEL, **settings)
    model = MocoForImageClassification(config).eval()
    with torch.no_grad():
        model.classifier.weight.normal_()  # a classifier that ranks classes, not the near-zero new one
        logits = model(cifar_tensor[:4]).logits
    assert logits.shape == (4, 10)
    if config.cifar_stem:  # timm cannot express the CIFAR stem: the export says so
        with pytest.raises(ValueError, match="CIFAR stem"):
            export_encoder(model, tmp_path / "timm")
        return
    export_encoder(model, tmp_path / "timm")
    network = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
    assert network.num_classes == 10 and network.pretrained_cfg["label_names"] == CLASS_NAMES
    with torch.no_grad():
        torch.testing.assert_close(network(cifar_tensor[:4]), logits, atol=1e-5, rtol=1e-5)


# The Hub's `evaluate-metric/accuracy`, which `evaluate.load("accuracy")` downloads: no network in the tests, and a
# local folder of that name comes first in `evaluate.load`'s search.
ACCURACY_METRIC = """
import datasets
import evaluate


class Accuracy(evaluate.Metric):
    def _info(self):
        features = datasets.Features({"predictions": datasets.Value("int32"), "references": datasets.Value("int32")})
        return evaluate.MetricInfo(description="accuracy", citation="", inputs_description="", features=features)

    def _compute(self, predictions, references):
        return {"accuracy": sum(int(p == r) for p, r in zip(predictions, references)) / len(references)}
"""


def test_the_docs_example_fine_tunes_evaluates_saves_and_classifies(pretrained_folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "accuracy").mkdir()
    (tmp_path / "accuracy" / "accuracy.py").write_text(ACCURACY_METRIC)
    code = example("docs/classification.md", "classifier")
    namespace: dict = {}
    exec(compile(code.replace('"outputs/cifar10-resnet18/model"', f'"{pretrained_folder}"'),
                 "docs/classification.md", "exec"), namespace)  # fmt: skip
    metrics = namespace["trainer"].evaluate()
    assert 0 <= metrics["eval_accuracy"] <= 1 and namespace["trainer"].state.global_step == 8  # 512 images / 64
    predictions = namespace["classify"](namespace["test"][0]["image"])
    assert {p["label"] for p in predictions} <= set(CLASS_NAMES) and len(predictions) == 5
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / "outputs" / "cifar10-classifier")
    assert reloaded.config.id2label == ID2LABEL


def test_moco_hf_export_of_a_classifier_writes_timm_with_its_head_and_a_card_whose_code_runs(
    pretrained_folder, cifar_images, tmp_path
):
    import re

    from moco_hf.cli import main

    classifier = MocoForImageClassification.from_pretrained(pretrained_folder, num_labels=10, id2label=ID2LABEL)
    classifier.save_pretrained(tmp_path / "classifier")
    assert main(["export", str(tmp_path / "classifier"), str(tmp_path / "timm")]) == 0
    card = (tmp_path / "timm" / "README.md").read_text()
    assert "pipeline_tag: image-classification" in card and ", ".join(CLASS_NAMES) in card
    (code,) = re.findall(r"```python\n(.*?)```", card, re.DOTALL)
    repo_id = re.search(r'"hf-hub:([^"]+)"', code).group(1)
    namespace = {"image": cifar_images[0][0]}
    exec(code.replace(f"hf-hub:{repo_id}", f"local-dir:{tmp_path / 'timm'}"), namespace)  # as a user pastes it
    assert namespace["logits"].shape == (1, 10) and namespace["names"] == CLASS_NAMES
