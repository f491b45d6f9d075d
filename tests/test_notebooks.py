"""The notebooks run top to bottom (nbclient, a real kernel) with small settings on real CIFAR-10 images."""

import nbformat
import pytest
from conftest import REPO_ROOT
from nbclient import NotebookClient

from moco_hf import MocoConfig, MocoModel

pytestmark = pytest.mark.slow


def run_notebook(name: str, parameters: dict) -> str:
    """Execute notebooks/<name> with its `parameters` cell replaced; return all the text it printed."""
    notebook = nbformat.read(REPO_ROOT / "notebooks" / name, as_version=4)
    (cell,) = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    cell.source = "\n".join(f"{key} = {value!r}" for key, value in parameters.items())
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(REPO_ROOT / "notebooks")}}).execute()  # fmt: skip
    return "\n".join(
        output.get("text", "") for c in notebook.cells if c.cell_type == "code" for output in c.get("outputs", [])
    )


@pytest.mark.parametrize("cifar_stem", [True, False], ids=["cifar stem (the main job)", "timm stem"])
def test_feature_extraction_notebook(tmp_path, cifar_stem):
    cifar = {"image_size": 32, "image_mean": [0.4913, 0.4821, 0.4465], "image_std": [0.2452, 0.2428, 0.2606]}
    config = MocoConfig.from_preset("v2", backbone="resnet18", queue_size=64, cifar_stem=cifar_stem, **cifar)
    MocoModel(config).save_pretrained(tmp_path / "model")
    printed = run_notebook("feature_extraction.ipynb", {
        "MODEL_DIR": str(tmp_path / "model"), "NUM_BANK_IMAGES": 200, "NUM_QUERY_IMAGES": 50,
        "EXPORT_DIR": str(tmp_path / "encoder"),
    })  # fmt: skip
    timm_type = "NoneType" if cifar_stem else "ResNet"
    assert f"MocoModel | ImageFeatureExtractionPipeline | {timm_type}" in printed
    assert "kNN top-1 on 50 test images" in printed
    assert (tmp_path / "encoder" / "model.safetensors").is_file() != cifar_stem


def test_pretrain_quickstart_notebook(tmp_path):
    printed = run_notebook("pretrain_quickstart.ipynb", {
        "MAX_TRAIN_STEPS": 4, "BATCH_SIZE": 16, "KNN_BANK": 128, "KNN_QUERIES": 32,
        "OUTPUT_DIR": str(tmp_path / "run"),
    })  # fmt: skip
    assert "kNN top-1: random init (BatchNorm calibrated on " in printed and "after 4 steps" in printed
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
