"""kNN and linear evaluation: the classifiers on features with known answers, and the commands on real images."""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO_ROOT, run_in_process

from moco_hf import MocoConfig, MocoModel, export_encoder
from moco_hf.knn import knn_accuracy
from moco_hf.linear_probe import LinearArguments, top_k_accuracies, train_linear_classifier

NUM_CLASSES = 10


def separable(n: int, dim: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Each class a tight cluster around its own orthogonal direction."""
    labels = torch.arange(n) % NUM_CLASSES
    features = torch.eye(dim)[labels] + 0.05 * torch.randn(n, dim)
    return torch.nn.functional.normalize(features, dim=1), labels


def unrelated(n: int, dim: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Features that carry no information about the labels."""
    return torch.nn.functional.normalize(torch.randn(n, dim), dim=1), torch.randint(0, NUM_CLASSES, (n,))


def test_knn_is_perfect_on_separable_features_and_chance_on_unrelated_ones():
    bank, bank_labels = separable(1000)
    queries, query_labels = separable(500)
    assert knn_accuracy(bank, bank_labels, queries, query_labels, NUM_CLASSES, k=200, temperature=0.1) == 100.0
    bank, bank_labels = unrelated(5000)
    queries, query_labels = unrelated(5000)
    chance = knn_accuracy(bank, bank_labels, queries, query_labels, NUM_CLASSES, k=200, temperature=0.1)
    assert abs(chance - 10.0) < 2.0  # 5000 queries: the standard error of 10% is 0.42%


def test_knn_votes_by_hand():
    bank = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]]), dim=1)
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[1.0, 0.0]])
    # k=2: neighbours 0 (sim 1, class 0) and 1 (sim 0.9939, class 1); class 0 wins by exp(1/T) > exp(0.994/T).
    assert knn_accuracy(bank, labels, query, torch.tensor([0]), 2, k=2, temperature=0.1) == 100.0
    # k=3 adds neighbour 2 (sim 0, class 1): exp(9.939) + exp(0) = 20754 < exp(10) = 22026: still 0.
    assert knn_accuracy(bank, labels, query, torch.tensor([0]), 2, k=3, temperature=0.1) == 100.0
    # T=1 flattens the weights: e^1 = 2.72 < e^0.9939 + e^0 = 3.70, so class 1 wins.
    assert knn_accuracy(bank, labels, query, torch.tensor([1]), 2, k=3, temperature=1.0) == 100.0


def test_linear_probe_is_perfect_on_separable_features_and_chance_on_unrelated_ones():
    args = LinearArguments(epochs=20)
    train, train_labels = separable(1000)
    test, test_labels = separable(500)
    classifier = train_linear_classifier(train, train_labels, NUM_CLASSES, args)
    assert top_k_accuracies(classifier, test, test_labels) == {"top1": 100.0, "top5": 100.0}
    train, train_labels = unrelated(5000)
    test, test_labels = unrelated(5000)
    accuracy = top_k_accuracies(train_linear_classifier(train, train_labels, NUM_CLASSES, args), test, test_labels)
    assert abs(accuracy["top1"] - 10.0) < 2.0 and abs(accuracy["top5"] - 50.0) < 3.0


@pytest.fixture(scope="module")
def random_moco(tmp_path_factory):
    """A freshly initialised MocoModel saved as a folder, with CIFAR preprocessing."""
    folder = tmp_path_factory.mktemp("moco") / "model"
    cifar = {"image_size": 32, "image_mean": [0.4913, 0.4821, 0.4465], "image_std": [0.2452, 0.2428, 0.2606]}
    config = MocoConfig.from_preset("v2", backbone="resnet18", queue_size=64, **cifar)
    MocoModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def dataset_with_seen_queries(small_dataset, tmp_path_factory):
    """small_dataset plus a "validation" split that repeats its first training shard: queries the bank holds."""
    import shutil

    root = tmp_path_factory.mktemp("seen") / "data"
    shutil.copytree(small_dataset / "data", root)
    shutil.copy(root / "train-00000-of-00002.parquet", root / "validation-00000-of-00001.parquet")
    return root.parent


@pytest.mark.parametrize("script", ["knn_eval", "linear_eval"])
@pytest.mark.parametrize("exported", [False, True], ids=["moco_model", "timm_export"])
def test_evaluation_commands_on_real_images(script, exported, random_moco, dataset_with_seen_queries, tmp_path):
    model = random_moco
    if exported:
        model = export_encoder(MocoModel.from_pretrained(random_moco), tmp_path / "encoder")
    out = tmp_path / "eval"
    # Queries that are training images: kNN with k=1 must be perfect (each image is its own nearest neighbour); a
    # linear probe on 512 features of 199 images must nearly fit them (chance is 10%).
    args = ["--model_name_or_path", str(model), "--dataset_name", str(dataset_with_seen_queries), "--output_dir",
            str(out), "--eval_split", "validation",
            *(["--knn_k", "1"] if script == "knn_eval" else ["--epochs", "200"])]  # fmt: skip
    result = run_in_process(REPO_ROOT / "training" / f"{script}.py", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / f"{script.split('_')[0]}_results.json").read_text())
    assert results["train_samples"] == 199 and results["eval_samples"] == 99  # the corrupt image is left out
    if script == "knn_eval":
        assert results["knn_top1"] == 100.0 and results["feature"] == "backbone"
    else:
        assert results["linear_top1"] >= 90.0 and results["linear_top5"] >= results["linear_top1"]
    assert len(list((out / "features").glob("*.safetensors"))) == 2  # each split extracted once, cached

    # The test split next: its features are extracted, the training split's come from the cache.
    args[args.index("--eval_split") + 1] = "test"
    test_run = run_in_process(REPO_ROOT / "training" / f"{script}.py", *args)
    assert test_run.returncode == 0, test_run.stderr[-3000:]
    assert json.loads((out / f"{script.split('_')[0]}_results.json").read_text())["eval_samples"] == 100
    assert len(list((out / "features").glob("*.safetensors"))) == 3
    assert "Extracted 100 features of split 'test'" in test_run.stderr
    assert "features of 'test'" in test_run.stderr and "/100 [" in test_run.stderr  # a progress bar while it reads
    assert "of split 'train'" not in test_run.stderr


@pytest.mark.parametrize("protocol", ["knn", "linear"])
def test_moco_hf_evaluate_is_the_scripts_command(protocol, random_moco, dataset_with_seen_queries, tmp_path, capsys):
    """`moco-hf evaluate knn|linear` (the installed command, no repository needed) prints and writes what
    training/knn_eval.py and linear_eval.py do, from the same arguments."""
    from moco_hf.cli import main

    args = ["--model_name_or_path", str(random_moco), "--dataset_name", str(dataset_with_seen_queries),
            "--eval_split", "validation", *(["--knn_k", "5"] if protocol == "knn" else ["--epochs", "3"])]  # fmt: skip
    assert main(["evaluate", protocol, *args, "--output_dir", str(tmp_path / "command")]) == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    script = run_in_process(REPO_ROOT / "training" / f"{protocol}_eval.py", *args, "--output_dir", str(tmp_path / "s"))
    assert script.returncode == 0 and script.stdout.strip().splitlines()[-1] == printed
    from_command, from_script = (json.loads((tmp_path / folder / f"{protocol}_results.json").read_text())
                                 for folder in ("command", "s"))  # fmt: skip
    assert {k: v for k, v in from_command.items() if k != "settings"} == \
        {k: v for k, v in from_script.items() if k != "settings"}  # fmt: skip
    assert main(["evaluate", "svm"]) == 2 and "takes knn or linear" in capsys.readouterr().err


@pytest.fixture(scope="module")
def train_only(small_dataset, tmp_path_factory):
    """small_dataset's training shards alone: a folder with no test split, as users' folders often are."""
    import shutil

    root = tmp_path_factory.mktemp("train_only") / "data"
    root.mkdir()
    for shard in (small_dataset / "data").glob("train-*.parquet"):
        shutil.copy(shard, root / shard.name)
    return root.parent


@pytest.mark.parametrize("script", ["knn_eval", "linear_eval"])
@pytest.mark.parametrize("train_split,held_out", [("train", 40), ("train[:100]", 20)])
def test_evaluation_holds_out_part_of_the_training_images_without_a_test_split(
    script, train_split, held_out, random_moco, train_only, tmp_path
):
    out = tmp_path / "eval"
    args = [
        "--model_name_or_path",
        str(random_moco),
        "--dataset_name",
        str(train_only),
        "--output_dir",
        str(out),
        "--train_split",
        train_split,
        *(["--knn_k", "20"] if script == "knn_eval" else ["--epochs", "5"]),
    ]
    result = run_in_process(REPO_ROOT / "training" / f"{script}.py", *args)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = f"{train_split}, {held_out} held out (seed 0)"
    assert f"has no split 'test': evaluating on {held_out} images of {train_split!r} held out" in result.stderr
    assert "each class in proportion" in result.stderr and f"on {rows} (" in result.stdout
    results = json.loads((out / f"{script.split('_')[0]}_results.json").read_text())
    assert results["eval_rows"] == rows and results["train_rows"] == f"{train_split} less the held-out images"
    total = 199 if train_split == "train" else 99  # row 17 is the corrupt image
    assert results["train_samples"] + results["eval_samples"] == total
    assert results["eval_samples"] in (held_out, held_out - 1)


@pytest.mark.parametrize(
    "script, extra, message",
    [
        ("knn_eval", ["--train_split", "train[:abc]"], "split 'train[:abc]' of"),
        ("knn_eval", ["--knn_k", "0"], "--knn_k must be at least 1, got 0"),
        ("linear_eval", ["--epochs", "0"], "--epochs must be at least 1, got 0"),
        ("knn_eval", ["--no_such_flag", "1"], "--no_such_flag"),
        ("knn_eval", ["--knn", "3"], "--knn"),  # an abbreviation of --knn_k
        ("knn_eval", ["--knn_k", "three"], "invalid int value: 'three'"),
        ("knn_eval", ["--feature", "pixels"], "invalid choice: 'pixels'"),
        ("knn_eval", ["--output_dir", "{file}"], "--output_dir"),
        ("knn_eval", ["--model_name_or_path", "{checkpoint}"], "is a training checkpoint"),
        ("knn_eval", ["--model_name_or_path", "no-such/model-anywhere"], "is neither a local folder nor a Hub model"),
        ("knn_eval", ["--model_name_or_path", "{bert}"], "holds a 'bert' model, not a MocoModel or an exported timm"),
        ("knn_eval", ["--model_name_or_path", "{moco}", "--feature", "head", "--exported"], "only ['backbone']"),
    ],
)
def test_evaluation_commands_refuse_what_cannot_measure_anything_in_one_line(
    script, extra, message, random_moco, small_dataset, tmp_path
):
    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "trainer_state.json").write_text("{}")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
    model = str(random_moco)
    if "--exported" in extra:
        extra = [word for word in extra if word != "--exported"]
        model = str(export_encoder(MocoModel.from_pretrained(random_moco), tmp_path / "encoder"))
    places = {"{file}": str(tmp_path / "file"), "{checkpoint}": str(tmp_path / "checkpoint"), "{moco}": model,
              "{bert}": str(tmp_path / "bert")}  # fmt: skip
    extra = [places.get(word, word) for word in extra]
    args = ["--model_name_or_path", model, "--dataset_name", str(small_dataset), "--output_dir", str(tmp_path / "o")]
    result = run_in_process(REPO_ROOT / "training" / f"{script}.py", *args, *extra)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "usage:" not in result.stderr


@pytest.mark.parametrize(
    "labels, message",
    [
        ([0] * 20, "holds a single class (column 'label'): an evaluation needs at least two"),
        (["cat", "dog"] * 10, "label 'cat' of column 'label' is not a class id"),
        ([0, 1] * 9 + [-1, 1], "label -1 of column 'label' is not a class id"),
        ([0, 1] * 9 + [10**12, 1], "label 1000000000000 of column 'label' is not a class id"),
    ],
    ids=["one class", "strings", "negative", "huge"],
)
@pytest.mark.parametrize("script", ["knn_eval", "linear_eval"])
def test_evaluation_refuses_labels_that_are_not_class_ids_in_one_line(
    script, labels, message, cifar_images, random_moco, tmp_path
):
    from datasets import Dataset, Features, Image, Value

    kind = Value("string") if isinstance(labels[0], str) else Value("int64")
    for split in ("train", "test"):
        rows = Dataset.from_dict({"image": cifar_images[0][:20], "label": labels},
                                 features=Features({"image": Image(), "label": kind}))  # fmt: skip
        rows.to_parquet(tmp_path / "data" / f"{split}-00000-of-00001.parquet")
    args = ["--model_name_or_path", str(random_moco), "--dataset_name", str(tmp_path), "--output_dir",
            str(tmp_path / "o")]  # fmt: skip
    result = run_in_process(REPO_ROOT / "training" / f"{script}.py", *args)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "o" / "features").exists()  # refused before any image was encoded


def demo_knn_predict(feature, feature_bank, feature_labels, classes, knn_k, knn_t):
    """The official CIFAR demo's `knn_predict`, transcribed (feature_bank is D x N)."""
    sim_matrix = torch.mm(feature, feature_bank)
    sim_weight, sim_indices = sim_matrix.topk(k=knn_k, dim=-1)
    sim_labels = torch.gather(feature_labels.expand(feature.size(0), -1), dim=-1, index=sim_indices)
    sim_weight = (sim_weight / knn_t).exp()
    one_hot_label = torch.zeros(feature.size(0) * knn_k, classes, device=sim_labels.device)
    one_hot_label = one_hot_label.scatter(dim=-1, index=sim_labels.view(-1, 1), value=1.0)
    pred_scores = torch.sum(one_hot_label.view(feature.size(0), -1, classes) * sim_weight.unsqueeze(dim=-1), dim=1)
    return pred_scores.argsort(dim=-1, descending=True)


def test_the_knn_monitor_measures_the_head_as_the_demo_and_the_backbone_beside_it(cifar10_dir, capsys):
    from accelerate import Accelerator
    from datasets import load_dataset
    from torchvision.transforms.v2.functional import normalize, pil_to_tensor

    from moco_hf.knn import KnnMonitor, KnnSplits

    config = MocoConfig.from_preset("cifar10-demo", queue_size=64)
    model = MocoModel(config).eval()
    splits = KnnSplits(str(cifar10_dir), max_bank_samples=300, max_query_samples=100)
    monitor = KnnMonitor(splits, Accelerator(cpu=True), 32, config.image_mean, config.image_std, k=20,
                         temperature=0.1, batch_size=128, feature="head")  # fmt: skip
    accuracies = monitor(model)
    progress = capsys.readouterr().err
    assert "kNN bank" in progress and "/300 [" in progress and "kNN queries" in progress and "/100 [" in progress

    # The demo's test(): its test_transform (ToTensor, Normalize), net = the query encoder, features normalised.
    def features_and_labels(split: str, rows: int, net) -> tuple[torch.Tensor, torch.Tensor]:
        data = load_dataset(str(cifar10_dir), split=f"{split}[:{rows}]")
        images = torch.stack([pil_to_tensor(row["image"].convert("RGB")) for row in data]).float() / 255
        with torch.no_grad():
            features = net(normalize(images, config.image_mean, config.image_std))
        return F.normalize(features, dim=1), torch.tensor(data["label"])

    nets = {"head": model.encoder_q, "backbone": model.encoder_q.backbone}
    for name, net in nets.items():
        bank, bank_labels = features_and_labels("train", 300, net)
        queries, query_labels = features_and_labels("test", 100, net)
        predicted = demo_knn_predict(queries, bank.t().contiguous(), bank_labels, 10, 20, 0.1)[:, 0]
        expected = 100.0 * (predicted == query_labels).float().mean().item()
        assert accuracies[name] == pytest.approx(expected, abs=1.0), name  # one query in 100 for float ties
