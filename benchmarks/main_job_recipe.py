"""Which recipe makes the main job learn most in its budget, measured against a fair random baseline (issue 37).

Every kNN figure here is weighted kNN top-1 (k=200, T=0.1) on the L2-normalised backbone features, and every gain is
taken over the same encoder before training with its BatchNorm statistics calibrated on training images
(`moco_hf.batch_norm_calibration`): the trainer's own first and last kNN points.

* `search`: each candidate recipe trains on CIFAR-10's training split minus a validation hold-out (its first 5,000
  rows, shuffled once by the data's packer), and is judged on that hold-out (queries: the 5,000 held-out images;
  bank: 10,000 of the others). The test images are never looked at. Every candidate gets the same budget in images
  (two forward/backward passes per image for a symmetric loss count twice).
* `confirm`: the main job as `scripts/pretrain.sh` runs it (test images), for several seeds, and its control at
  learning rate 1e-12, whose gain should be ~0.
* `demo-epoch0`: the CIFAR-10 reproduction's starting point, measured as its epochs are: the `cifar10-demo` preset's
  random encoder, BatchNorm calibrated, head-feature kNN with all 50,000 training images as the bank and the
  10,000 test images as queries (`training/knn_eval.py --random_init --feature head`), so that the docs can say
  how much of the demo's epoch-1 figure is learning.
* `grey`: the main job on CIFAR-10 turned into one grey channel (ITU-R 601 luma, Pillow's "L", stored as 8-bit PNG),
  a model of `num_channels` 1 (not the grey repeated three times), with the `multiband` augmentation (hue,
  saturation and grayscale need colour) and the grey training images' mean and std; and its control at learning
  rate 1e-12. Beside `confirm`'s RGB rows of the same seed (issue 41).
* `plot`: the figure of the search and the confirmation. The tables are in `docs/main-job.md`, generated from the
  result file by `scripts/docs_tables.py`.

    python -m benchmarks.main_job_recipe search --only base lr_0.06
    python -m benchmarks.main_job_recipe confirm --seeds 0 1 2
    python -m benchmarks.main_job_recipe demo-epoch0 --seeds 0
    python -m benchmarks.main_job_recipe grey --seeds 0
    python -m benchmarks.main_job_recipe plot
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .common import CIFAR10, RESULTS, machine

ROOT = Path(__file__).resolve().parents[1]
RESULT_FILE = RESULTS / "main_job_recipe-cpu.json"
WORK = ROOT / "outputs" / "main_job_recipe"
VALIDATION_ROWS = 5_000

# The main job before this search (scripts/pretrain.sh at commit fb83fb4), less its step budget and data.
SEARCH_BASE = {
    "--preset": "v2", "--backbone": "resnet18", "--image_size": "32", "--cifar_stem": None,
    "--image_mean": "0.4913 0.4821 0.4465", "--image_std": "0.2452 0.2428 0.2606",
    "--per_device_train_batch_size": "128", "--learning_rate": "0.03", "--momentum": "0.99", "--queue_size": "1024",
    "--mixed_precision": "bf16", "--knn_max_train_samples": "10000", "--knn_max_eval_samples": str(VALIDATION_ROWS),
}  # fmt: skip
BUDGET_IMAGES = 256 * 128  # ~7 minutes of training at batch 128 on this project's 2-core Xeon (1.6 s a step)

# Candidate name -> flags that differ from SEARCH_BASE. One change at a time first, then combinations of winners.
CANDIDATES: dict[str, dict[str, str | None]] = {
    "base": {},
    "lr_0.06": {"--learning_rate": "0.06"},
    "lr_0.12_warmup": {"--learning_rate": "0.12", "--warmup_ratio": "0.05"},
    "aug_cifar10_demo": {"--augmentation": "cifar10-demo"},
    "T_0.1": {"--softmax_temperature": "0.1"},
    "m_0.9": {"--momentum": "0.9"},
    "batch_64": {"--per_device_train_batch_size": "64"},
    "batch_32": {"--per_device_train_batch_size": "32"},
    "K_4096": {"--queue_size": "4096"},
    "symmetric": {"--symmetric_loss": "true"},
    "linear_head": {"--mlp": "false"},
}


def validation_dataset() -> Path:
    """CIFAR-10's training split as two splits: `test`, its first VALIDATION_ROWS rows (the hold-out), and `train`,
    the rest. Written once under outputs/."""
    folder = WORK / "cifar10-validation" / "data"
    if not folder.is_dir():
        table = pa.concat_tables(pq.read_table(f) for f in sorted((Path(CIFAR10) / "data").glob("train-*.parquet")))
        folder.mkdir(parents=True)
        pq.write_table(table.slice(VALIDATION_ROWS), folder / "train-00000-of-00001.parquet")
        pq.write_table(table.slice(0, VALIDATION_ROWS), folder / "test-00000-of-00001.parquet")
    return folder.parent


def as_words(flags: dict[str, str | None]) -> list[str]:
    words: list[str] = []
    for flag, value in flags.items():
        words += [flag, *(value.split() if value is not None else [])]
    return words


def steps_for(flags: dict[str, str | None]) -> int:
    batch = int(flags["--per_device_train_batch_size"])
    passes = 2 if flags.get("--symmetric_loss") == "true" else 1
    return BUDGET_IMAGES // (batch * passes)


def run(command: list[str], output_dir: Path) -> dict:
    """Run `command`, then its results.json with the wall time (training, both kNN measurements and saving)."""
    start = time.perf_counter()
    with output_dir.with_suffix(".log").open("w") as log:
        subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=log)
    results = json.loads((output_dir / "results.json").read_text())
    return {
        "wall_seconds": round(time.perf_counter() - start, 1),
        **{
            key: results[key]
            for key in (
                "knn_top1_initial",
                "knn_top1",
                "knn_gain",
                "knn_initial_encoder",
                "knn_split",
                "steps",
                "train_seconds",
            )
        },
    }


def load() -> dict:
    if RESULT_FILE.is_file():
        return json.loads(RESULT_FILE.read_text())
    return {"benchmark": "main_job_recipe", "search": {}, "confirm": {}}


def save(results: dict) -> None:
    results["machine"] = machine()
    RESULT_FILE.parent.mkdir(parents=True, exist_ok=True)
    RESULT_FILE.write_text(json.dumps(results, indent=2) + "\n")


def search(names: list[str], seed: int) -> None:
    data = validation_dataset()
    for name in names:
        flags = {**SEARCH_BASE, **CANDIDATES[name], "--seed": str(seed)}
        flags["--max_train_steps"] = str(steps_for(flags))
        output_dir = WORK / f"search-{name}-seed{seed}"
        command = [sys.executable, "training/pretrain.py", *as_words(flags), "--dataset_name", str(data),
                   "--output_dir", str(output_dir), "--overwrite_output_dir"]  # fmt: skip
        measured = run(command, output_dir)
        results = load()
        results["search"][f"{name} seed {seed}"] = {"name": name, "seed": seed, "changes": CANDIDATES[name],
                                                    "flags": as_words(flags), **measured}  # fmt: skip
        save(results)
        print(f"{name} seed {seed}: {measured['knn_top1_initial']:.2f} -> {measured['knn_top1']:.2f} "
              f"({measured['knn_gain']:+.2f}) in {measured['wall_seconds']:.0f} s", flush=True)  # fmt: skip


def main_job_runs(section: str, seeds: list[int], control: bool, flags: tuple[str, ...] = (), label: str = "",
                  folder_prefix: str = "", hidden: dict[str, str] | None = None) -> None:  # fmt: skip
    """`bash scripts/pretrain.sh` with `flags`, for each seed and, with `control`, at learning rate 1e-12; each run's
    measurements saved under `section` of the result file as they come (paths in `hidden` shown by their names)."""
    runs = [(f"{label}seed {seed}", ["--seed", str(seed)]) for seed in seeds]
    runs += [(f"{label}control lr 1e-12 seed 0", ["--learning_rate", "1e-12"])] if control else []
    for name, extra in runs:
        output_dir = WORK / (folder_prefix + name.replace(" ", "_"))
        command = ["bash", "scripts/pretrain.sh", *flags, *extra]
        measured = run([*command, "--output_dir", str(output_dir)], output_dir)
        shown = " ".join(command)
        for path, shown_as in (hidden or {}).items():
            shown = shown.replace(path, shown_as)
        results = load()
        results.setdefault(section, {})[name] = {"command": shown, **measured}
        save(results)
        print(f"{name}: {measured['knn_top1_initial']:.2f} -> {measured['knn_top1']:.2f} "
              f"({measured['knn_gain']:+.2f}) in {measured['wall_seconds']:.0f} s", flush=True)  # fmt: skip


def grey_dataset() -> tuple[Path, float, float]:
    """CIFAR-10 (both splits) with each image turned into one grey channel, written once under outputs/; and the
    mean and std of the grey training pixels (in [0, 1])."""
    import io

    import numpy as np
    from PIL import Image

    folder = WORK / "cifar10-grey" / "data"
    statistics = folder.parent / "statistics.json"
    if not statistics.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        for split in ("train", "test"):
            table = pa.concat_tables(pq.read_table(f) for f in sorted((Path(CIFAR10) / "data").glob(f"{split}-*")))
            grey, pixels = [], []
            for image in table.column("image").to_pylist():
                picture = Image.open(io.BytesIO(image["bytes"])).convert("L")
                buffer = io.BytesIO()
                picture.save(buffer, format="PNG")
                grey.append({"bytes": buffer.getvalue(), "path": None})
                pixels.append(np.asarray(picture, dtype=np.float64) / 255.0)
            column = pa.array(grey, type=table.schema.field("image").type)
            pq.write_table(table.set_column(table.schema.get_field_index("image"), "image", column),
                           folder / f"{split}-00000-of-00001.parquet")  # fmt: skip
            if split == "train":
                values = np.stack(pixels)
                statistics.write_text(json.dumps({"mean": float(values.mean()), "std": float(values.std())}))
    measured = json.loads(statistics.read_text())
    return folder.parent, measured["mean"], measured["std"]


def grey(seeds: list[int], control: bool) -> None:
    data, mean, std = grey_dataset()
    flags = ("--dataset_name", str(data), "--num_channels", "1", "--augmentation", "multiband", "--image_mean",
             f"{mean:.4f}", "--image_std", f"{std:.4f}")  # fmt: skip
    main_job_runs("grey", seeds, control, flags, label="grey ", hidden={str(data): "<grey CIFAR-10>"})


def demo_epoch0(seeds: list[int]) -> None:
    """The cifar10-demo preset's random encoder, calibrated, measured as the reproduction measures its epochs."""
    from moco_hf import MocoConfig, MocoModel

    folder = WORK / "cifar10-demo-random" / "model"
    MocoModel(MocoConfig.from_preset("cifar10-demo")).save_pretrained(folder)  # its config; knn_eval draws the weights
    for seed in seeds:
        for feature in ("head", "backbone"):
            output_dir = WORK / f"demo-epoch0-{feature}-seed{seed}"
            output_dir.mkdir(parents=True, exist_ok=True)
            command = [sys.executable, "training/knn_eval.py", "--model_name_or_path", str(folder), "--random_init",
                       "--dataset_name", CIFAR10, "--seed", str(seed), "--feature", feature,
                       "--output_dir", str(output_dir)]  # fmt: skip
            with output_dir.with_suffix(".log").open("w") as log:
                subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=log)
            measured = json.loads((output_dir / "knn_results.json").read_text())
            results = load()
            results.setdefault("demo_epoch0", {})[f"{feature} seed {seed}"] = {
                "command": " ".join(["python", *command[1:]])
                .replace(str(folder), "<cifar10-demo config folder>")
                .replace(CIFAR10, "../shared/data/cifar10"),
                **{key: measured[key] for key in ("encoder", "knn_top1", "train_samples", "eval_samples")},
            }
            save(results)
            print(f"demo epoch 0, {feature}, seed {seed}: {measured['knn_top1']:.2f}%", flush=True)


def plot() -> None:
    """Validation gain of each searched recipe (seed 0), and the main job's test gain per seed beside its control."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = load()
    search_rows = sorted(results["search"].values(), key=lambda row: row["knn_gain"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    names = [f"{row['name']} (s{row['seed']})" for row in search_rows]
    left.barh(names, [row["knn_gain"] for row in search_rows], color="tab:blue")
    for index, row in enumerate(search_rows):
        left.annotate(f"{row['knn_top1_initial']:.1f} -> {row['knn_top1']:.1f}", (max(row["knn_gain"], 0), index),
                      xytext=(4, 0), textcoords="offset points", va="center", fontsize=8)  # fmt: skip
    left.axvline(0, color="black", lw=0.8)
    left.set_xlabel("kNN gain over the calibrated random encoder (points)")
    left.set_title(f"Search: validation hold-out ({VALIDATION_ROWS} train images), {BUDGET_IMAGES} images each")
    confirm_rows = results["confirm"]
    if confirm_rows:
        labels = list(confirm_rows)
        colours = ["tab:gray" if "control" in label else "tab:green" for label in labels]
        right.bar(labels, [confirm_rows[label]["knn_gain"] for label in labels], color=colours)
        for index, label in enumerate(labels):
            row = confirm_rows[label]
            right.annotate(f"{row['knn_top1_initial']:.1f}\n-> {row['knn_top1']:.1f}", (index, max(row["knn_gain"], 0)),
                           xytext=(0, 3), textcoords="offset points", ha="center", fontsize=8)  # fmt: skip
        right.axhline(0, color="black", lw=0.8)
        right.set_ylabel("kNN gain (points)")
        right.set_title("The main job (bash scripts/pretrain.sh): test[:2000]")
        right.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    fig.savefig(RESULT_FILE.with_suffix(".png"), dpi=110)
    print(RESULT_FILE.with_suffix(".png"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    stages = parser.add_subparsers(dest="stage", required=True)
    searching = stages.add_parser("search", help="candidates on the validation hold-out")
    searching.add_argument("--only", nargs="+", choices=sorted(CANDIDATES), default=list(CANDIDATES))
    searching.add_argument("--seed", type=int, default=0)
    confirming = stages.add_parser("confirm", help="the main job on the test images, and its control")
    confirming.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    confirming.add_argument("--no_control", action="store_true")
    demo = stages.add_parser("demo-epoch0", help="the reproduction's calibrated random encoder (full CIFAR-10)")
    demo.add_argument("--seeds", nargs="+", type=int, default=[0])
    greying = stages.add_parser("grey", help="the main job on one grey channel, and its control")
    greying.add_argument("--seeds", nargs="+", type=int, default=[0])
    greying.add_argument("--no_control", action="store_true")
    stages.add_parser("plot", help="the figure of the result file")
    args = parser.parse_args(argv)
    if args.stage == "search":
        search(args.only, args.seed)
    elif args.stage == "confirm":
        main_job_runs("confirm", args.seeds, not args.no_control, folder_prefix="confirm-")
    elif args.stage == "demo-epoch0":
        demo_epoch0(args.seeds)
    elif args.stage == "grey":
        grey(args.seeds, not args.no_control)
    else:
        plot()


if __name__ == "__main__":
    main()
