"""Run by test_hub.py in a fresh process whose HF_ENDPOINT points at the local Hub server (the endpoint is read when
huggingface_hub is imported). Modes:

    push WORKDIR     push a MocoModel and its exported encoder; write reference features
    load WORKDIR     load them back with AutoModel (moco_hf installed), timm, TimmWrapper and the pipeline, and the
                     full model's feature maps with AutoBackbone
    remote WORKDIR   load the full model with trust_remote_code in a process where moco_hf cannot be imported
    classifier WORKDIR  push a MocoForImageClassification with its accuracy; classify the images with the pipeline
    classifier-remote WORKDIR  the same pipeline as remote code, in a process where moco_hf cannot be imported
"""

import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FULL, ENCODER, CLASSIFIER = "tester/moco-resnet18", "tester/moco-resnet18-encoder", "tester/moco-classifier"
CIFAR_MEAN, CIFAR_STD = [0.4913, 0.4821, 0.4465], [0.2452, 0.2428, 0.2606]


def reference_inputs(workdir: Path) -> tuple[list, torch.Tensor]:
    """Real CIFAR images (PIL) saved by the test, and the same images normalised as the encoder expects."""
    from PIL import Image
    from torchvision.transforms.v2 import functional

    images = [Image.open(path).convert("RGB") for path in sorted(workdir.glob("image_*.png"))]
    pixels = torch.stack(
        [functional.to_dtype(functional.pil_to_tensor(im), torch.float32, scale=True) for im in images]
    )
    return images, functional.normalize(pixels, CIFAR_MEAN, CIFAR_STD)


def push(workdir: Path) -> None:
    from moco_hf import MocoConfig, MocoModel, export_encoder

    torch.manual_seed(0)
    config = MocoConfig.from_preset("v2", backbone="resnet18", queue_size=64, image_size=32,
                                    image_mean=CIFAR_MEAN, image_std=CIFAR_STD)  # fmt: skip
    model = MocoModel(config).eval()
    model.queue_ptr.fill_(5)
    model.push_to_hub(FULL)
    export_encoder(model, workdir / "encoder", repo_id=ENCODER)
    _, pixels = reference_inputs(workdir)
    with torch.no_grad():
        features = model.get_image_features(pixels).pooler_output
    save_file({"features": features, "queue": model.queue}, workdir / "reference.safetensors")


def load(workdir: Path) -> None:
    import timm
    from transformers import AutoBackbone, AutoModel, pipeline

    import moco_hf

    reference = load_file(workdir / "reference.safetensors")
    images, pixels = reference_inputs(workdir)
    full = AutoModel.from_pretrained(FULL).eval()
    assert isinstance(full, moco_hf.MocoModel), type(full)
    assert int(full.queue_ptr) == 5 and torch.equal(full.queue, reference["queue"])
    with torch.no_grad():
        results = {
            "AutoModel (moco_hf)": full.get_image_features(pixels).pooler_output,
            "timm hf-hub": timm.create_model(f"hf-hub:{ENCODER}", pretrained=True).eval()(pixels),
            "AutoModel (TimmWrapper)": AutoModel.from_pretrained(ENCODER).eval()(pixel_values=pixels).pooler_output,
        }
    extractor = pipeline("image-feature-extraction", model=ENCODER, pool=True)
    results["pipeline"] = torch.tensor(extractor(images)).reshape(len(images), -1)
    for name, features in results.items():
        torch.testing.assert_close(features, reference["features"], atol=1e-4, rtol=0, msg=name)
        print(f"{name}: same features as MocoModel.get_image_features")
    backbone = AutoBackbone.from_pretrained(FULL, out_indices=[1, 2, 3, 4]).eval()
    assert isinstance(backbone, moco_hf.MocoBackbone), type(backbone)
    with torch.no_grad():
        maps = backbone(pixels).feature_maps
        expected = full.encoder_q.backbone.forward_intermediates(pixels, indices=[1, 2, 3, 4], intermediates_only=True)
    for got, want in zip(maps, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    print("AutoBackbone: same feature maps as the query backbone's forward_intermediates")


def remote(workdir: Path) -> None:
    sys.modules["moco_hf"] = None  # `import moco_hf` now fails: only the repo's own code can build the model
    from transformers import AutoModel

    reference = load_file(workdir / "reference.safetensors")
    _, pixels = reference_inputs(workdir)
    model = AutoModel.from_pretrained(FULL, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    with torch.no_grad():
        features = model.get_image_features(pixels).pooler_output
    torch.testing.assert_close(features, reference["features"], atol=1e-5, rtol=0)
    print("trust_remote_code: same features")


CLASSES = ["airplane", "automobile", "bird"]


def classifier(workdir: Path) -> None:
    from moco_hf import MocoConfig, MocoForImageClassification

    torch.manual_seed(0)
    config = MocoConfig.from_preset("v2", backbone="resnet18", image_size=32, image_mean=CIFAR_MEAN,
                                    image_std=CIFAR_STD, id2label=dict(enumerate(CLASSES)),
                                    label2id={name: index for index, name in enumerate(CLASSES)})  # fmt: skip
    model = MocoForImageClassification(config).eval()
    model.push_to_hub(CLASSIFIER, eval_metrics={"eval_loss": 1.02, "eval_accuracy": 0.4321},
                      eval_dataset="uoft-cs/cifar10", eval_split="test[:100]")  # fmt: skip
    _, pixels = reference_inputs(workdir)
    with torch.no_grad():
        save_file({"probabilities": model(pixels).logits.softmax(-1)}, workdir / "classifier.safetensors")
    classify(workdir, "moco_hf")


def classify(workdir: Path, how: str) -> None:
    """The pushed classifier through the image-classification pipeline: its labels, the pushed model's scores."""
    if how == "remote code":
        sys.modules["moco_hf"] = None  # only the repo's own code can build the model
    from transformers import pipeline

    images, _ = reference_inputs(workdir)
    expected = load_file(workdir / "classifier.safetensors")["probabilities"]
    found = pipeline("image-classification", model=CLASSIFIER, trust_remote_code=how == "remote code")
    assert type(found.model).__module__.startswith("transformers_modules") == (how == "remote code")
    for prediction, probabilities in zip(found(images, top_k=3), expected, strict=True):
        scores = {entry["label"]: entry["score"] for entry in prediction}
        assert set(scores) == set(CLASSES), scores
        torch.testing.assert_close(torch.tensor([scores[name] for name in CLASSES]), probabilities, atol=1e-4, rtol=0)
    print(f"classifier pipeline ({how}): the pushed model's labels and scores")


if __name__ == "__main__":
    modes = {"push": push, "load": load, "remote": remote, "classifier": classifier,
             "classifier-remote": lambda workdir: classify(workdir, "remote code")}  # fmt: skip
    modes[sys.argv[1]](Path(sys.argv[2]))
