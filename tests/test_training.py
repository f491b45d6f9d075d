"""training/pretrain.py end to end on real images: streaming or not, bad files, resume, clear errors."""

import json
import re
import shlex
import shutil
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from conftest import FAST_TRAINING as FAST
from conftest import expected_skips, run_pretrain
from safetensors.torch import load_file
from transformers import AutoModel

import moco_hf
from moco_hf.cli import main as moco_hf_cli
from moco_hf.pretraining import MocoTrainingArguments


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("streaming", [False, True])
def test_trains_and_counts_undecodable_images(small_dataset, tmp_path, streaming):
    out = tmp_path / "run"
    args = [*FAST, "--dataset_name", str(small_dataset), "--output_dir", str(out), "--max_train_steps", "14"]
    result = run_pretrain(*args, *(["--streaming"] if streaming else []))
    assert result.returncode == 0, result.stderr[-3000:]
    # 14 steps x 16 = 224 images > 199 decodable ones: the corrupt file was met and skipped (a stream reads it once;
    # the global order once in each epoch where it falls among the positions read).
    skips = 1 if streaming else expected_skips(str(small_dataset), 16, 14)
    results = json.loads((out / "results.json").read_text())
    assert skips >= 1 and results["skipped_images"] == skips and results["steps"] == 14
    assert f"{skips} images could not be decoded and were skipped" in result.stderr
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, 15))
    assert metrics[-1]["skipped_images"] == skips and metrics[-1]["queue_fill"] == 1.0
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)
    assert 0 <= results["knn_top1"] <= 100 and results["knn_top1_initial"] is not None
    assert "kNN top-1 (k=20) on test[:32]: random init" in result.stdout
    assert (out / "training_curves.png").stat().st_size > 10_000
    model = AutoModel.from_pretrained(out / "model")
    assert isinstance(model, moco_hf.MocoModel) and int(model.queue_ptr) == (14 * 16) % 64


@pytest.mark.slow
def test_resume_gives_the_same_state_as_an_uninterrupted_run(small_dataset, tmp_path):
    common = [*FAST, "--dataset_name", str(small_dataset), "--max_train_steps", "6", "--knn_at_start", "false"]
    full = run_pretrain(*common, "--output_dir", str(tmp_path / "full"), "--checkpointing_steps", "3")
    assert full.returncode == 0, full.stderr[-3000:]
    # The interrupted run: all it kept is the step-3 checkpoint of the same run; it resumes from there.
    part = tmp_path / "part"
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step_3", part / "checkpoints" / "step_3")
    second = run_pretrain(*common, "--output_dir", str(part), "--resume_from_checkpoint", "latest")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Resumed from" in second.stderr and "at step 3" in second.stderr

    a, b = tmp_path / "full" / "checkpoints" / "step_6", part / "checkpoints" / "step_6"
    weights_a, weights_b = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert weights_a.keys() == weights_b.keys() and {"queue", "queue_ptr"} <= weights_a.keys()
    for name in weights_a:
        torch.testing.assert_close(weights_a[name], weights_b[name], atol=1e-6, rtol=0, msg=name)
    opt_a = torch.load(a / "optimizer.bin", weights_only=True)
    opt_b = torch.load(b / "optimizer.bin", weights_only=True)
    for index, state in opt_a["state"].items():
        torch.testing.assert_close(
            state["momentum_buffer"], opt_b["state"][index]["momentum_buffer"], atol=1e-6, rtol=0
        )
    assert json.loads((b / "trainer_state.json").read_text())["completed_steps"] == 6


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--image_size", "0"], "error: MocoConfig.image_size must be an integer from 8 to 4096, got 0."),
        (["--backbone", "resnet19"], "error: MocoConfig.backbone 'resnet19' is not a timm model. Did you mean"),
        (
            ["--lerning_rate", "0.1"],
            "error: Some specified arguments are not used by the HfArgumentParser: "
            "['--lerning_rate', '0.1'] (see --help).",
        ),
        (["--max_train_step", "5"], "['--max_train_step', '5']"),  # no silent abbreviation of --max_train_steps
        (["--preset", "v4"], "argument --preset: invalid choice: 'v4'"),
    ],
)
def test_invalid_values_and_unknown_arguments_stop_at_once_with_one_line(tmp_path, extra, message):
    result = run_pretrain("--output_dir", str(tmp_path), *extra, timeout=120)
    assert result.returncode == 2
    error_lines = [line for line in result.stderr.splitlines() if "error: " in line]
    assert len(error_lines) == 1 and message in error_lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr and not (tmp_path / "checkpoints").exists()


COMMAND_IMPORTS = """
import sys
sys.argv[0] = "/somewhere/bin/moco-hf"  # as the console script starts
from moco_hf.cli import main
try:
    status = main(sys.argv[1:])
except SystemExit as exit_:  # argparse's --help
    status = exit_.code
heavy = sorted(name for name in ("torch", "timm", "accelerate", "datasets", "transformers.modeling_utils")
               if name in sys.modules)
print(f"status {status}, imported {heavy}")
"""


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["train", "--learning_rate", "-1"],
                                  ["train", "--per_device_train_batch_size", "1"]],
                         ids=["help", "train help", "usage error", "batch of one"])  # fmt: skip
def test_help_and_usage_errors_load_neither_torch_nor_the_model(argv):
    """They answer in well under 2 s because they import none of it (timed in benchmarks/command_latency.py; here
    the imports are checked, which a busy machine cannot make flaky). A fresh process: its imports are the subject."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", COMMAND_IMPORTS, *argv], capture_output=True, text=True,
                            timeout=120)  # fmt: skip
    help_asked = "--help" in argv
    assert result.stdout.strip().endswith(f"status {0 if help_asked else 2}, imported []"), result.stderr[-2000:]
    assert ("usage: " in result.stdout) if help_asked else (result.stderr.count("error: ") == 1)


def test_the_command_registers_the_auto_classes_before_any_work():
    """Under the console script, `import moco_hf` leaves registration to the subcommand; a subcommand that runs
    registers first (so its saved models carry `auto_map`, and AutoModel loads MoCo folders)."""
    import subprocess
    import sys

    snippet = """
import sys
sys.argv[0] = "/somewhere/bin/moco-hf"
import moco_hf
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
before = "moco" in CONFIG_MAPPING
from moco_hf.cli import main
status = main(["convert", "no-such-checkpoint.pth.tar", "out"])
print(before, "moco" in CONFIG_MAPPING, status)
"""
    result = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["False", "True", "2"], result.stderr[-2000:]


def test_help_lists_the_choices_and_documents_every_argument(capsys):
    from moco_hf.cli import main as moco_hf_cli
    from moco_hf.pretraining import MocoTrainingArguments

    result = run_pretrain("--help", timeout=120)
    assert result.returncode == 0
    assert "{v1,v2,v3,v3-vit,cifar10-demo,v2-multiband}" in result.stdout and "{auto,ddp,split,none}" in result.stdout
    assert not [argument.name for argument in fields(MocoTrainingArguments) if not argument.metadata.get("help")]
    # `moco-hf train` is the same command: the same flags.
    with pytest.raises(SystemExit) as exit_status:
        moco_hf_cli(["train", "--help"])
    assert exit_status.value.code == 0
    flags = re.compile(r"(--\w+)")
    assert set(flags.findall(capsys.readouterr().out)) == set(flags.findall(result.stdout)) != set()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--dataset_name", "/no/such/folder"], "could not load --dataset_name '/no/such/folder'"),
        (["--image_column", "picture"], "--image_column 'picture' is not a column of the dataset"),
        (["--per_device_train_batch_size", "4096"], "is larger than the dataset (200 images)"),
        (["--learning_rate", "0"], "--learning_rate must be > 0, got 0.0"),  # was silently the preset's lr
        (["--learning_rate", "-1"], "--learning_rate must be > 0, got -1.0"),  # was a traceback
        (["--backbone_kwargs", "{img_size: 32"], "--backbone_kwargs is not valid JSON"),  # was a 26-line traceback
        (["--per_device_train_batch_size", "abc"], "invalid int value: 'abc'"),  # was 60 lines of usage first
        (["--preset", "v9"], "invalid choice: 'v9'"),
        (["--report_to", "wandb"], "--report_to names wandb, which is not installed here"),  # was exit 0, no log
        (["--batch_norm_calibration_images", "0"], "--batch_norm_calibration_images must be at least 1"),
    ],
)
def test_bad_arguments_stop_with_one_clear_line(small_dataset, tmp_path, extra, message):
    args = [*FAST, "--dataset_name", str(small_dataset), "--output_dir", str(tmp_path), "--max_train_steps", "2"]
    result = run_pretrain(*args, *extra)
    assert result.returncode == 2
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1 and message in error_lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "usage:" not in result.stderr


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--per_device_train_batch_size", "1"], "--per_device_train_batch_size must be at least 2"),
        (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be at least 1, got 0"),
        (["--max_train_steps", "0"], "--max_train_steps must be at least 1, got 0"),
        (["--checkpointing_steps", "0"], "--checkpointing_steps must be at least 1, got 0"),
        (["--checkpoints_total_limit", "0"], "--checkpoints_total_limit must be at least 1, got 0"),
        (["--logging_steps", "0"], "--logging_steps must be at least 1, got 0"),
        (["--knn_k", "0"], "--knn_k must be at least 1, got 0"),
        (["--num_train_epochs", "0"], "--num_train_epochs must be > 0, got 0"),
        (["--knn_temperature", "-0.1"], "--knn_temperature must be > 0, got -0.1"),
        (["--max_grad_norm", "0"], "--max_grad_norm must be > 0, got 0.0"),
        (["--warmup_ratio", "1.5"], "--warmup_ratio must be in [0, 1), got 1.5"),
        (["--create_pr", "--hub_revision", "dev"], "--create_pr opens a pull request against the default branch"),
        (["--resume_from_checkpoint", "latest", "--overwrite_output_dir"], "--overwrite_output_dir would delete"),
        (["--queue_size", "-1"], "MocoConfig.queue_size must be an integer >= 0"),
        (["--softmax_temperature", "0.001"], "MocoConfig.softmax_temperature must be"),
        (["--preset", "v3", "--shuffle_bn", "banana"], "invalid choice: 'banana'"),
    ],
)
def test_settings_are_checked_before_any_data_or_output_folder_is_touched(tmp_path, extra, message):
    """A dataset that does not exist and an output folder that does not exist yet: the error must be the setting's,
    and the folder still absent (nothing opened, nothing written)."""
    out = tmp_path / "never-written"
    result = run_pretrain("--dataset_name", str(tmp_path / "no-such-dataset"), "--output_dir", str(out), *extra)
    assert result.returncode == 2
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1 and message in error_lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr and not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    "speed_flags",
    # timm's tiny test_resnet under torch.compile with aot_eager: dynamo's graph capture and AOTAutograd's
    # forward/backward split, without generating kernels. Inductor compiles each kernel in C++ with an empty cache
    # (resnet18 took 336 s, test_resnet 217 s on a fresh clone), and what is tested here (training compiled,
    # saving plain names) does not depend on the kernels.
    [
        ["--channels_last", "--mixed_precision", "bf16"],
        ["--torch_compile", "--torch_compile_backend", "aot_eager", "--backbone", "test_resnet"],
    ],
    ids=["channels_last+bf16", "torch_compile"],
)
def test_speed_options_train_and_save_a_loadable_model(small_dataset, tmp_path, speed_flags):
    out = tmp_path / "run"
    result = run_pretrain(*FAST, "--dataset_name", str(small_dataset), "--output_dir", str(out), "--max_train_steps",
                          "3", "--knn_at_start", "false", *speed_flags, timeout=900)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_jsonl(out / "metrics.jsonl")
    assert len(metrics) == 3 and all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)
    assert json.loads((out / "run_config.json").read_text())["mixed_precision"] == (
        "bf16" if "bf16" in speed_flags else "no"
    )
    model = AutoModel.from_pretrained(out / "model")  # compiled backbones save under their plain names
    assert model.queue.dtype == torch.float32 and int(model.queue_ptr) == (3 * 16) % 64


@pytest.mark.slow
def test_the_hub_token_reaches_no_file_and_no_output(small_dataset, tmp_path):
    token = "hf_NotARealToken1234567890"
    out = tmp_path / "run"
    result = run_pretrain(*FAST, "--dataset_name", str(small_dataset), "--output_dir", str(out), "--max_train_steps",
                          "2", "--knn_at_start", "false", "--hub_token", token, "--with_tracking")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    written = [path for path in out.rglob("*") if path.is_file()]
    assert any("tfevents" in path.name for path in written) and (out / "run_config.json").is_file()
    assert not [path for path in written if token.encode() in path.read_bytes()]
    assert token not in result.stdout + result.stderr
    assert json.loads((out / "run_config.json").read_text())["hub_token"] == "<hidden>"
    assert "--hub_token '<hidden>'" in json.loads((out / "results.json").read_text())["command"]


@pytest.mark.parametrize("preset,how", [("v3", "yaml"), ("cifar10-demo", "flags")])
def test_records_hold_the_settings_as_built_and_the_command_as_typed(
    small_dataset, tmp_path, preset, how, capsys, monkeypatch
):
    """run_config.json: every model setting resolved (the preset chose optimizer, shuffle_bn, weight decay...), as
    the saved config.json holds it; results.json: `moco-hf train` with the flags or the YAML file typed."""
    monkeypatch.chdir(tmp_path)  # a relative output folder, as users type it
    out = Path("run")
    flags = {"preset": preset, "backbone": "resnet18", "image_size": 32, "per_device_train_batch_size": 8,
             "queue_size": 64, "dataset_name": str(small_dataset), "output_dir": "run", "max_train_steps": 1,
             "knn_monitor": False, "dataloader_num_workers": 0}  # fmt: skip
    if how == "yaml":
        (tmp_path / "run.yaml").write_text("".join(f"{name}: {json.dumps(value)}\n" for name, value in flags.items()))
        argv = [str(tmp_path / "run.yaml")]
    else:
        argv = [word for name, value in flags.items() for word in (f"--{name}", str(value).lower()
                if isinstance(value, bool) else str(value))]  # fmt: skip
    assert moco_hf_cli(["train", *argv]) == 0
    run_config = json.loads((out / "run_config.json").read_text())
    saved = json.loads((out / "model" / "config.json").read_text())
    config_fields = [f.name for f in fields(MocoTrainingArguments) if f.metadata.get("config_field")]
    assert {"optimizer", "weight_decay", "shuffle_bn", "momentum", "lr_schedule", "augmentation"} <= set(config_fields)
    for name in config_fields:
        expected = saved[name]
        assert run_config[name] == (list(expected) if isinstance(expected, tuple) else expected), name
    assert run_config["shuffle_bn"] == {"v3": "none", "cifar10-demo": "split"}[preset]
    assert json.loads((out / "results.json").read_text())["command"] == shlex.join(["moco-hf", "train", *argv])
    # Nothing was pushed: the model card's snippets load the run's folder, as written (relative: no machine paths).
    snippet = f'AutoModel.from_pretrained("{out / "model"}")'
    assert snippet in (out / "model" / "README.md").read_text()
    assert isinstance(AutoModel.from_pretrained(str(out / "model")), moco_hf.MocoModel)
    assert moco_hf_cli(["export", str(out), str(tmp_path / "encoder")]) == 2  # the run's folder, not its model
    assert f"{out} is a training run's folder: its model is {out / 'model'}." in capsys.readouterr().err
