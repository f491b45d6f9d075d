"""Publishing against a real HTTP server on 127.0.0.1 speaking the Hub API (tests/hub_server.py), model cards, and
conversion of official facebookresearch/moco checkpoints."""

import json
import os
import socket
import threading
import time

import huggingface_hub.constants
import pytest
import torch
import torchvision
import yaml
from conftest import FAST_TRAINING, REPO_ROOT, free_port, launch, run_pretrain
from hub_server import start_hub_server
from huggingface_hub import ModelCard
from huggingface_hub.repocard_data import model_index_to_eval_results
from safetensors.torch import load_file

from moco_hf import MocoConfig, MocoModel
from moco_hf.cli import main as moco_hf_cli
from moco_hf.model_card import EvaluationResult, TrainingSummary, render_model_card

ROUNDTRIP = REPO_ROOT / "tests" / "hub_roundtrip.py"


def use_endpoint(monkeypatch, endpoint: str) -> None:
    """Talk to `endpoint` online: subprocesses through the environment (huggingface_hub reads HF_ENDPOINT and
    HF_HUB_OFFLINE when it loads), this process through the settings huggingface_hub loaded them into."""
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A local Hub, for this process and the subprocesses a test starts."""
    server, state, endpoint = start_hub_server()
    use_endpoint(monkeypatch, endpoint)
    monkeypatch.setenv("HF_TOKEN", "hf_local_test_token")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # a cache of this server's files only
    yield state
    server.shutdown()


def card_of(state, repo: str) -> ModelCard:
    return ModelCard(state.repos[repo]["README.md"].decode())


@pytest.mark.slow
def test_push_then_load_with_auto_model_timm_pipeline_and_remote_code(hub, cifar_images, tmp_path):
    for i, image in enumerate(cifar_images[0][:6]):
        image.save(tmp_path / f"image_{i}.png")
    printed = ""
    for mode in ("push", "load", "remote"):
        result = launch(ROUNDTRIP, mode, str(tmp_path), timeout=300)
        assert result.returncode == 0, f"{mode}: {result.stderr[-3000:]}"
        printed += result.stdout
    full, encoder = hub.repos["tester/moco-resnet18"], hub.repos["tester/moco-resnet18-encoder"]
    assert {"config.json", "model.safetensors", "configuration_moco.py", "modeling_moco.py"} <= set(full)
    assert not any(name.endswith((".bin", ".pt", ".pth", ".pkl")) for name in [*full, *encoder])
    assert json.loads(encoder["config.json"])["architecture"] == "resnet18"
    for path in ("AutoModel (moco_hf)", "timm hf-hub", "AutoModel (TimmWrapper)", "pipeline", "trust_remote_code"):
        assert f"{path}: same features" in printed
    assert "AutoBackbone: same feature maps" in printed


FAST = [*FAST_TRAINING, "--dataloader_num_workers", "1", "--max_train_steps", "4", "--checkpointing_steps", "2"]


def train_and_push(dataset, out, repo_id: str, *extra: str, pushed: bool = True):
    """A short real pretraining with `--push_to_hub` to `repo_id`; it must finish whatever the Hub does, with exit
    status 0 when the model reached the Hub and 3 (its last line saying what to upload) when it did not."""
    result = run_pretrain(*FAST, "--dataset_name", str(dataset), "--output_dir", str(out), "--push_to_hub",
                          "--hub_model_id", repo_id, *extra)  # fmt: skip
    assert result.returncode == (0 if pushed else 3), result.stderr[-3000:]
    last_line = result.stdout.strip().splitlines()[-1]
    if pushed:
        assert last_line == f"Pushed to the Hub: {repo_id}"
    else:
        assert last_line.startswith("NOT pushed to the Hub (") and f"`hf upload {repo_id} {out / 'model'}`" in last_line
    assert json.loads((out / "results.json").read_text())["pushed_to_hub"] is pushed
    return result


@pytest.mark.slow
def test_trainer_pushes_every_save_with_a_model_card_of_the_run(hub, small_dataset, tmp_path):
    out = tmp_path / "run"
    result = train_and_push(small_dataset, out, "tester/cifar-moco", "--hub_strategy", "every_save")
    assert "Pushed to the Hub: tester/cifar-moco" in result.stdout
    commits = [r for r in hub.requests if r.startswith("POST /api/models/tester/cifar-moco/commit")]
    # Checkpoints at steps 2 and 4, then the final model; step 4's push is skipped if step 2's is still going on.
    skipped = result.stderr.count("The previous upload to the Hub is not done: step 4 is not pushed")
    assert len(commits) == 3 - skipped
    repo = hub.repos["tester/cifar-moco"]
    weights = load_file(out / "model" / "model.safetensors")
    assert repo["model.safetensors"] == (out / "model" / "model.safetensors").read_bytes()
    assert int(weights["queue_ptr"]) == (4 * 16) % 64
    assert not list(out.glob(".hub-upload-*"))  # snapshots are removed once uploaded

    # The card shows this run's real values and metrics, and its metadata parses as the Hub's.
    card = card_of(hub, "tester/cifar-moco")
    results = json.loads((out / "results.json").read_text())
    final_knn = results["knn_top1"]
    assert card.data.pipeline_tag == "image-feature-extraction" and card.data.library_name == "transformers"
    assert {"moco", "self-supervised", "timm"} <= set(card.data.tags)
    (evaluation,) = card.data.eval_results
    assert evaluation.metric_value == pytest.approx(round(final_knn, 2)) and evaluation.dataset_split == "test[:32]"
    assert "| queue size K | 64 |" in card.text and "| steps | 4 |" in card.text
    assert (
        "| global batch size | 16 |" in card.text
        and f"{results['skipped_images']} images could not be decoded" in card.text
    )
    assert f"{round(final_knn, 2):.2f}%" in card.text
    assert "| optimizer | SGD (momentum 0.9, weight decay 0.0001) |" in card.text  # v2's recipe, as trained


@pytest.mark.slow
def test_a_classifier_pushes_with_a_card_of_its_task_labels_and_accuracy(hub, cifar_images, tmp_path):
    for i, image in enumerate(cifar_images[0][:4]):
        image.save(tmp_path / f"image_{i}.png")
    for mode, how in (("classifier", "moco_hf"), ("classifier-remote", "remote code")):
        result = launch(ROUNDTRIP, mode, str(tmp_path), timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"classifier pipeline ({how}): the pushed model's labels and scores" in result.stdout
    repo = hub.repos["tester/moco-classifier"]
    assert {"config.json", "model.safetensors", "modeling_moco.py", "preprocessor_config.json"} <= set(repo)
    assert "model_card.py" not in repo and "hub_upload.py" not in repo  # the remote code stays the model's own
    card = card_of(hub, "tester/moco-classifier")
    assert card.data.pipeline_tag == "image-classification" and card.data.library_name == "transformers"
    (evaluation,) = card.data.eval_results
    assert (evaluation.task_type, evaluation.metric_value, evaluation.dataset_type, evaluation.dataset_split) == (
        "image-classification", 43.21, "uoft-cs/cifar10", "test[:100]")  # fmt: skip
    assert "An image classifier over 3 labels (airplane, automobile, bird)" in card.text
    assert "| top-1 accuracy | uoft-cs/cifar10 | test[:100] | 43.21% |" in card.text
    assert 'pipeline("image-classification", model="tester/moco-classifier", trust_remote_code=True)' in card.text


@pytest.mark.slow
def test_push_to_a_branch(hub, small_dataset, tmp_path):
    # (--create_pr goes through the Hub's discussions API, which the local server does not speak: not tested here.)
    out = tmp_path / "run"
    train_and_push(small_dataset, out, "tester/pr", "--hub_revision", "dev")
    assert "POST /api/models/tester/pr/branch/dev" in hub.requests
    (commit,) = [r for r in hub.requests if r.startswith("POST /api/models/tester/pr/commit")]
    assert commit == "POST /api/models/tester/pr/commit/dev"


def test_a_pull_request_is_opened_against_the_default_branch_only(tmp_path):
    result = run_pretrain("--push_to_hub", "--create_pr", "--hub_revision", "dev", "--output_dir", str(tmp_path))
    assert result.returncode == 2 and "--create_pr opens a pull request against the default branch" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("failure", ["server error", "unreachable"])
def test_failed_push_warns_once_and_training_finishes(hub, small_dataset, tmp_path, monkeypatch, failure):
    strategy = "every_save"
    if failure == "server error":
        hub.fail_commits = True
    else:
        use_endpoint(monkeypatch, f"http://127.0.0.1:{free_port()}")  # a port nobody listens on
    out = tmp_path / "run"
    result = train_and_push(small_dataset, out, "tester/failing", "--hub_strategy", strategy, pushed=False)
    assert result.stderr.count("Pushing to the Hub repo tester/failing failed") == 1
    assert "training goes on" in result.stderr
    assert "Pushed to the Hub" not in result.stdout
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_2", "step_4"]
    assert not list(out.glob(".hub-upload-*"))  # no snapshot is left behind by a failed push
    assert MocoModel.from_pretrained(out / "model").config.queue_size == 64
    assert "kNN top-1" in result.stdout


@pytest.fixture
def silent_hub(monkeypatch, tmp_path):
    """An endpoint that accepts connections and never answers (a hung proxy or server)."""
    server = socket.create_server(("127.0.0.1", 0), backlog=64)
    held = []

    def accept_forever() -> None:
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:  # closed by the fixture
                return

    threading.Thread(target=accept_forever, daemon=True).start()
    use_endpoint(monkeypatch, f"http://127.0.0.1:{server.getsockname()[1]}")
    monkeypatch.setenv("HF_TOKEN", "hf_local_test_token")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    yield
    server.close()
    for connection in held:
        connection.close()


@pytest.mark.slow
def test_a_hub_that_never_answers_costs_a_bounded_wait_at_the_end(silent_hub, small_dataset, tmp_path):
    out = tmp_path / "run"
    started = time.monotonic()
    result = train_and_push(small_dataset, out, "tester/hung", "--hub_strategy", "every_save", "--hub_wait_seconds",
                            "3", pushed=False)  # fmt: skip
    assert "The Hub did not answer within 3 s" in result.stderr
    # One push at a time: step 2's snapshot waits on the hung Hub, so step 4 makes none (they would fill the disk).
    assert "The previous upload to the Hub is not done: step 4 is not pushed" in result.stderr
    assert "not uploaded to tester/hung" in result.stderr and f"hf upload tester/hung {out / 'model'}" in result.stderr
    assert not list(out.glob(".hub-upload-*"))  # the snapshots made for the hung uploads are deleted
    assert MocoModel.from_pretrained(out / "model").config.queue_size == 64 and (out / "results.json").is_file()
    assert time.monotonic() - started < 240


def test_model_card_metadata_and_content():
    config = MocoConfig.from_preset("v1", backbone="resnet18", queue_size=4096, image_size=32)
    summary = TrainingSummary(
        dataset="uoft-cs/cifar10",
        hyperparameters={"steps": 400, "global batch size": 128},
        results=[EvaluationResult("kNN top-1 (k=200, T=0.1)", "uoft-cs/cifar10", "test", 41.234)],
        training_time="7.5 min",
        hardware="1 x CPU",
        skipped_images=0,
    )
    card = render_model_card(config, "someone/moco-v1-r18", kind="encoder", summary=summary)
    metadata = yaml.safe_load(str(card).split("---")[1])
    assert metadata["license"] == "apache-2.0" and metadata["library_name"] == "timm"
    assert metadata["datasets"] == ["uoft-cs/cifar10"] and "moco-v1" in metadata["tags"]
    # `model-index` is what the Hub parses into evaluation results: it must convert back.
    model_name, results = model_index_to_eval_results(metadata["model-index"])
    assert model_name == "moco-v1-r18" and results[0].metric_value == 41.23 and results[0].metric_type == "accuracy"
    expected = [
        "MoCo v1",
        "| queue size K | 4096 |",
        "| key encoder momentum m | 0.999 |",
        "41.23%",
        "7.5 min",
        'timm.create_model("hf-hub:someone/moco-v1-r18", pretrained=True)',
        'pipeline("image-feature-extraction"',
        "Momentum Contrast for Unsupervised Visual Representation Learning",
    ]
    for text in expected:
        assert text in card.text, text


# ---- conversion of official checkpoints ------------------------------------------------------------------------


def official_checkpoint(mlp: bool) -> tuple[dict, torchvision.models.ResNet]:
    """A checkpoint in the layout of facebookresearch/moco's main_moco.py, built from torchvision's resnet50."""
    torch.manual_seed(0)
    reference = torchvision.models.resnet50()
    for module in reference.modules():  # non-trivial BN statistics, so eval-mode features test them too
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
            module.weight.data.uniform_(0.5, 1.5)
    head = torch.nn.Sequential(torch.nn.Linear(2048, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 128)) if mlp \
        else torch.nn.Linear(2048, 128)  # fmt: skip
    reference.fc = head
    state = {}
    for encoder in ("encoder_q", "encoder_k"):
        for key, value in reference.state_dict().items():
            offset = 0.01 if encoder == "encoder_k" and value.is_floating_point() else 0  # k differs from q
            state[f"module.{encoder}.{key}"] = value.clone() + offset
    state["module.queue"] = torch.nn.functional.normalize(torch.randn(128, 256), dim=0)
    state["module.queue_ptr"] = torch.tensor([96])
    optimizer = {"state": {}, "param_groups": []}
    return {"epoch": 200, "arch": "resnet50", "state_dict": state, "optimizer": optimizer}, reference


@pytest.mark.parametrize("mlp", [False, True])
def test_convert_official_checkpoint_gives_torchvision_features(tmp_path, cifar_tensor, mlp, capsys):
    checkpoint, reference = official_checkpoint(mlp)
    torch.save(checkpoint, tmp_path / "official.pth.tar")
    assert moco_hf_cli(["convert", str(tmp_path / "official.pth.tar"), str(tmp_path / "converted")]) == 0
    model = MocoModel.from_pretrained(tmp_path / "converted").eval()
    assert model.config.mlp == mlp and model.config.queue_size == 256 and int(model.queue_ptr) == 96
    torch.testing.assert_close(model.queue, checkpoint["state_dict"]["module.queue"].T, atol=0, rtol=0)

    images = torch.nn.functional.interpolate(cifar_tensor[:4], size=64)
    reference.eval()
    with torch.no_grad():
        ours = model.get_image_features(images).pooler_output
        head = reference.fc
        reference.fc = torch.nn.Identity()
        theirs = reference(images)
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
        torch.testing.assert_close(model.encoder_q.head(ours), head(theirs), atol=1e-5, rtol=0)

    # And back: the official layout again, tensor for tensor.
    assert (
        moco_hf_cli(["convert", str(tmp_path / "converted"), str(tmp_path / "back.pth.tar"), "--to", "official"]) == 0
    )
    back = torch.load(tmp_path / "back.pth.tar", weights_only=True)["state_dict"]
    original = checkpoint["state_dict"]
    assert set(back) == set(original)
    for key, value in original.items():
        torch.testing.assert_close(back[key], value, atol=0, rtol=0, msg=key)


def test_convert_reads_the_architecture_and_input_size_a_checkpoint_records(tmp_path, capsys):
    """A ResNet-18 checkpoint of the official layout converts without --backbone; official -> moco-hf -> official ->
    moco-hf keeps every tensor and the input size; a wrong --backbone is one line naming the first mismatch."""
    reference = torchvision.models.resnet18()
    reference.fc = torch.nn.Linear(512, 128)
    state = {f"module.{encoder}.{key}": value.clone() for encoder in ("encoder_q", "encoder_k")
             for key, value in reference.state_dict().items()}  # fmt: skip
    state |= {"module.queue": torch.nn.functional.normalize(torch.randn(128, 64), dim=0),
              "module.queue_ptr": torch.tensor([0])}  # fmt: skip
    torch.save({"arch": "resnet18", "epoch": 1, "state_dict": state}, tmp_path / "r18.pth.tar")
    assert moco_hf_cli(["convert", str(tmp_path / "r18.pth.tar"), str(tmp_path / "a")]) == 0
    assert "resnet18, image size 224 (from the checkpoint, else the official 224)." in capsys.readouterr().out
    first = MocoModel.from_pretrained(tmp_path / "a")
    assert first.config.backbone == "resnet18" and first.config.image_size == 224
    first.config.image_size = 32  # as if it had been pretrained on 32-pixel images
    first.save_pretrained(tmp_path / "a32")
    assert moco_hf_cli(["convert", str(tmp_path / "a32"), str(tmp_path / "back.pth.tar"), "--to", "official"]) == 0
    assert moco_hf_cli(["convert", str(tmp_path / "back.pth.tar"), str(tmp_path / "b")]) == 0
    second = MocoModel.from_pretrained(tmp_path / "b")
    assert second.config.backbone == "resnet18" and second.config.image_size == 32
    assert first.state_dict().keys() == second.state_dict().keys()
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, second.state_dict()[name]), name
    capsys.readouterr()
    assert moco_hf_cli(["convert", str(tmp_path / "r18.pth.tar"), str(tmp_path / "c"), "--backbone", "resnet50"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "error: the checkpoint does not fit timm's 'resnet50': " in error
    assert "mismatches); pass the checkpoint's architecture as --backbone." in error and "Traceback" not in error


class RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_convert_refuses_a_pickle_that_runs_code(tmp_path, capsys):
    payload = RunsCode()
    payload.marker = tmp_path / "pwned"
    torch.save({"state_dict": payload}, tmp_path / "evil.pth.tar")
    assert moco_hf_cli(["convert", str(tmp_path / "evil.pth.tar"), str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert "refused" in error and "weights_only" in error
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "out").exists()


def official_v3_mlp(num_layers: int, in_dim: int, hidden: int, out_dim: int, last_bn: bool) -> torch.nn.Sequential:
    """facebookresearch/moco-v3's `_build_mlp`, as written there."""
    layers = []
    for layer in range(num_layers):
        dim1 = in_dim if layer == 0 else hidden
        dim2 = out_dim if layer == num_layers - 1 else hidden
        layers.append(torch.nn.Linear(dim1, dim2, bias=False))
        if layer < num_layers - 1:
            layers += [torch.nn.BatchNorm1d(dim2), torch.nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(torch.nn.BatchNorm1d(dim2, affine=False))
    return torch.nn.Sequential(*layers)


def test_convert_official_moco_v3_resnet_checkpoint(tmp_path, cifar_tensor):
    torch.manual_seed(0)
    base = torchvision.models.resnet50()
    base.fc = official_v3_mlp(2, 2048, 512, 64, last_bn=True)  # the paper: 4096 hidden, 256 out; smaller here
    predictor = official_v3_mlp(2, 64, 512, 64, last_bn=False)
    for module in [*base.modules(), *predictor.modules()]:
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    state = {f"module.base_encoder.{k}": v for k, v in base.state_dict().items()}
    state |= {f"module.momentum_encoder.{k}": v + 0.01 if v.is_floating_point() else v
              for k, v in base.state_dict().items()}  # fmt: skip
    state |= {f"module.predictor.{k}": v for k, v in predictor.state_dict().items()}
    torch.save({"epoch": 300, "arch": "resnet50", "state_dict": state}, tmp_path / "v3.pth.tar")
    assert moco_hf_cli(["convert", str(tmp_path / "v3.pth.tar"), str(tmp_path / "converted")]) == 0
    model = MocoModel.from_pretrained(tmp_path / "converted").eval()
    assert model.config.queue_size == 0 and model.config.dim == 64 and model.config.mlp_hidden_dim == 512

    images = torch.nn.functional.interpolate(cifar_tensor[:4], size=64)
    base.eval()
    predictor.eval()
    with torch.no_grad():  # query path: backbone -> projector -> predictor, as the official model computes q
        torch.testing.assert_close(model.predictor(model.encoder_q(images)), predictor(base(images)), atol=1e-5, rtol=0)
    assert (
        moco_hf_cli(["convert", str(tmp_path / "converted"), str(tmp_path / "back.pth.tar"), "--to", "official"]) == 0
    )
    back = torch.load(tmp_path / "back.pth.tar", weights_only=True)["state_dict"]
    assert set(back) == set(state)
    for key, value in state.items():
        torch.testing.assert_close(back[key], value, atol=0, rtol=0, msg=key)


def test_convert_official_moco_v3_vit_checkpoint(tmp_path, cifar_tensor):
    """A checkpoint as moco-v3's `MoCo_ViT` saves it: its `vits.py` ViT-Small (timm's VisionTransformer with 12
    heads) with a 3-layer BatchNorm projector as `head`, and a predictor (small MLPs and images here, for speed)."""
    from functools import partial

    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    layer_norm = partial(torch.nn.LayerNorm, eps=1e-6)
    base = VisionTransformer(img_size=32, patch_size=8, embed_dim=384, depth=12, num_heads=12, mlp_ratio=4,
                             qkv_bias=True, num_classes=0, norm_layer=layer_norm)  # fmt: skip
    base.head = official_v3_mlp(3, 384, 128, 32, last_bn=True)  # the paper: 4096 hidden, 256 out
    predictor = official_v3_mlp(2, 32, 128, 32, last_bn=False)
    state = {f"module.base_encoder.{k}": v for k, v in base.state_dict().items()}
    state |= {f"module.momentum_encoder.{k}": v + 0.01 if v.is_floating_point() else v
              for k, v in base.state_dict().items()}  # fmt: skip
    state |= {f"module.predictor.{k}": v for k, v in predictor.state_dict().items()}
    torch.save({"epoch": 300, "arch": "vit_small", "state_dict": state}, tmp_path / "v3-vit.pth.tar")
    assert moco_hf_cli(["convert", str(tmp_path / "v3-vit.pth.tar"), str(tmp_path / "converted")]) == 0
    model = MocoModel.from_pretrained(tmp_path / "converted").eval()
    config = model.config
    assert (config.backbone, config.backbone_kwargs) == ("vit_small_patch16_224", {"num_heads": 12, "patch_size": 8,
                                                                                    "img_size": 32})  # fmt: skip
    assert (config.projector_layers, config.mlp_hidden_dim, config.dim, config.freeze_patch_embed) == (3, 128, 32, True)
    base.eval()
    predictor.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.predictor(model.encoder_q(cifar_tensor[:4])),
                                   predictor(base(cifar_tensor[:4])), atol=1e-5, rtol=0)  # fmt: skip
    assert (
        moco_hf_cli(["convert", str(tmp_path / "converted"), str(tmp_path / "back.pth.tar"), "--to", "official"]) == 0
    )
    back = torch.load(tmp_path / "back.pth.tar", weights_only=True)["state_dict"]
    assert set(back) == set(state)
    for key, value in state.items():
        torch.testing.assert_close(back[key], value, atol=0, rtol=0, msg=key)
