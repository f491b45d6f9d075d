"""The shape of the house: one installed package, thin commands, short functions, one-way imports."""

import ast
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import REPO_ROOT

LIBRARY, COMMANDS = REPO_ROOT / "moco_hf", REPO_ROOT / "training"
MAX_FUNCTION_LINES = 100


def python_files(*folders: Path) -> list[Path]:
    return sorted(path for folder in folders for path in folder.rglob("*.py"))


@pytest.mark.slow
def test_the_wheel_installs_the_moco_hf_package_only(tmp_path):
    source = tmp_path / "source"  # setuptools builds in the source tree: a copy keeps the checkout clean
    shutil.copytree(REPO_ROOT, source, ignore=shutil.ignore_patterns(".venv", ".git", "outputs", "build", "*.egg-info"))
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path)]
    result = subprocess.run([*command, str(source)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = tmp_path.glob("moco_hf-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"moco_hf"}, top_level
    # The package data the library reads at run time travels with it.
    assert "moco_hf/templates/model_card.md" in names
    assert "moco_hf/metrics/top_k_accuracy/top_k_accuracy.py" in names
    assert "moco_hf/pretraining/preset_help.json" in names  # what `moco-hf train --help` states of the presets


def test_no_function_is_longer_than_a_hundred_lines():
    too_long = []
    for path in python_files(LIBRARY, COMMANDS):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno} {node.name} ({length} lines)")
    assert not too_long, too_long


def imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module)
    return modules


def test_the_library_never_imports_the_commands():
    offenders = {
        str(path.relative_to(REPO_ROOT)): sorted(m for m in imported_modules(path) if m.split(".")[0] == "training")
        for path in python_files(LIBRARY)
    }
    assert not {path: modules for path, modules in offenders.items() if modules}


def test_the_library_knows_nothing_of_this_repository_s_folders():
    """Where this repository keeps its data (../shared) is for its scripts and tests to say, not the package."""
    folder = re.compile(r"""shared/data|["']shared["']""")  # as a path or as a part joined with /
    assert not [str(path.relative_to(REPO_ROOT)) for path in python_files(LIBRARY) if folder.search(path.read_text())]


def test_the_commands_import_the_library_not_each_other():
    for path in python_files(COMMANDS):
        modules = imported_modules(path)
        assert "moco_hf" in {m.split(".")[0] for m in modules}, path
        assert not {m for m in modules if m.split(".")[0] in ("training", "pretrain", "knn_eval", "linear_eval")}


def test_the_scripts_are_thin_commands_over_the_library():
    for name, entry in (("pretrain", "moco_hf.pretraining"), ("knn_eval", "moco_hf.evaluation_command"),
                        ("linear_eval", "moco_hf.evaluation_command")):  # fmt: skip
        script = (COMMANDS / f"{name}.py").read_text()
        assert len(script.splitlines()) < 30 and f"from {entry} import main" in script, name


COMMAND_LINE_MODULES = {"moco_hf/cli.py", "moco_hf/command_line.py", "moco_hf/evaluation_command.py",
                        "moco_hf/pretraining/command.py"}  # fmt: skip


def test_the_library_raises_errors_in_its_own_terms_and_the_commands_name_flags():
    """Messages raised in moco_hf name fields and parameters (`image_column`); only the command-line modules speak
    of flags, and they turn those names into flags (`as_flags`)."""
    from moco_hf.command_line import as_flags

    flagged = []
    for path in sorted((REPO_ROOT / "moco_hf").rglob("*.py")):
        name = path.relative_to(REPO_ROOT).as_posix()
        if name in COMMAND_LINE_MODULES:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and node.exc is not None:
                texts = [n.value for n in ast.walk(node.exc) if isinstance(n, ast.Constant)]
                flagged += [f"{name}:{node.lineno}" for text in texts if re.search(r"(?<![\w-])--[a-z]", str(text))]
    assert not flagged, f"messages naming a --flag outside the command line: {flagged}"
    message = "pass `image_column` NAME; `queue` is not an argument"
    assert as_flags(message, {"image_column"}) == "pass --image_column NAME; `queue` is not an argument"


def test_each_recipe_setting_has_one_home():
    """The trainer's arguments named after `MocoConfig` fields are those fields (they override the preset's value),
    with no rename table: every argument sharing a field's name is marked so, and every marked one is a field."""
    from dataclasses import fields

    from moco_hf import MocoConfig, MocoTrainingArguments
    from moco_hf.pretraining.arguments import build_config

    config_fields = set(MocoConfig().to_dict())
    arguments = {argument.name: argument for argument in fields(MocoTrainingArguments)}
    marked = {name for name, argument in arguments.items() if argument.metadata.get("config_field")}
    assert marked <= config_fields
    assert (set(arguments) & config_fields) - marked == {"backbone_kwargs"}  # JSON text on the command line
    given = {"lr_schedule": "step", "weight_decay": 0.25, "optimizer": "lars", "image_size": 64, "queue_size": 96,
             "softmax_temperature": 0.3, "cifar_stem": True, "num_splits": 4}  # fmt: skip
    config = build_config(MocoTrainingArguments(**given))
    assert {name: getattr(config, name) for name in given} == given


MESSAGE_CALLS = {"debug", "info", "warning", "warning_once", "error", "UsageError", "DataError", "RunError",
                 "CheckpointError"}  # fmt: skip


def test_messages_name_settings_in_backticks_so_the_command_line_shows_them_as_flags():
    """Every message the library can log or raise names a setting as `name`: the command turns each into --name
    (`as_flags`), in errors and log lines alike. A bare snake_case name would reach the user as a field name."""
    from dataclasses import fields

    from moco_hf.command_line import as_flags
    from moco_hf.pretraining import MocoTrainingArguments

    names = sorted(argument.name for argument in fields(MocoTrainingArguments) if "_" in argument.name)
    bare = re.compile(r"(?<![`\-\w<])(" + "|".join(names) + r")(?![`\w>])")
    found = []
    for path in python_files(LIBRARY):
        for call in ast.walk(ast.parse(path.read_text())):
            function = getattr(call, "func", None)
            if getattr(function, "attr", getattr(function, "id", None)) not in MESSAGE_CALLS:
                continue
            for node in ast.walk(call):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and bare.search(node.value):
                    found.append(f"{path.relative_to(REPO_ROOT)}:{call.lineno}: {node.value[:80]!r}")
    assert not found, "\n".join(found)
    assert as_flags("pass `knn_monitor` false", names) == "pass --knn_monitor false"  # what the command shows


@pytest.mark.slow
def test_the_command_logs_settings_as_flags(small_dataset, tmp_path):
    from conftest import FAST_TRAINING, run_pretrain

    result = run_pretrain(*FAST_TRAINING, "--dataset_name", str(small_dataset), "--output_dir", str(tmp_path / "run"),
                          "--max_train_steps", "1", "--knn_at_start", "false", "--queue_size", "8")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--shuffle_bn=split" in result.stderr and "`shuffle_bn`" not in result.stderr


BENCHMARKS = REPO_ROOT / "benchmarks"


def test_no_test_imports_a_benchmark_and_no_benchmark_edits_sys_path():
    """Tests use the reference transcriptions under tests/; the benchmarks run as modules (`python -m benchmarks.X`)."""
    importing = [path.name for path in python_files(REPO_ROOT / "tests") if any(
        module == "benchmarks" or module.startswith("benchmarks.") for module in imported_modules(path))]  # fmt: skip
    assert not importing, importing
    editing = [str(path.relative_to(REPO_ROOT)) for path in python_files(BENCHMARKS) if "sys.path" in path.read_text()]
    assert not editing, editing


def benchmark_modules() -> list[str]:
    return [".".join(path.relative_to(REPO_ROOT).with_suffix("").parts) for path in python_files(BENCHMARKS)
            if path.stem not in ("__init__", "common") and not path.stem.startswith("test_")]  # fmt: skip


@pytest.mark.parametrize("module", benchmark_modules())
def test_each_benchmark_answers_help_as_a_module(module, capsys, monkeypatch):
    """`python -m MODULE --help`, in this process (the imports are shared): usage and exit status 0."""
    import runpy

    monkeypatch.setattr(sys, "argv", [module, "--help"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    assert exit_.value.code == 0 and "usage:" in capsys.readouterr().out
