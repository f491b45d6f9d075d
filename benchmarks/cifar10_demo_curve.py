"""Our run of the official CIFAR-10 demo's recipe beside the demo's own published log, epoch by epoch.

Reads a run of `scripts/reproduce_cifar10.sh` (its knn_curve.json, metrics.jsonl and results.json) and the demo's log
(`benchmarks/references/moco_cifar10_demo_log.json`, parsed from the notebook's saved output), and with `--control`
the demo's own code run on the same machine and data (`cifar10_demo_notebook.py`); writes
`results/cifar10_demo_curve-<device>.json` and `.png` and prints the Markdown table of the README.

    bash scripts/reproduce_cifar10.sh --mixed_precision bf16 --stop_after_epochs 10 \
        --output_dir outputs/cifar10-demo-cpu
    python benchmarks/cifar10_demo_curve.py --run outputs/cifar10-demo-cpu --device_name cpu
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from the repository root
from matplotlib.ticker import MaxNLocator

from benchmarks.common import RESULTS
from moco_hf.plotting import plt, read_metrics, save_figure

REFERENCE = Path(__file__).resolve().parent / "references" / "moco_cifar10_demo_log.json"
TOLERANCE = 1.5  # points of kNN top-1 from epoch 3 on


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def demo_log() -> dict:
    log = json.loads(REFERENCE.read_text())
    log["by_epoch"] = {row[0]: dict(zip(log["columns"], row, strict=True)) for row in log.pop("rows")}
    return log


def knn_history(run: Path) -> list[dict]:
    """The kNN measurements so far: the run's knn_curve.json, or, where it is older (a run stopped by a signal writes
    a checkpoint but no curve), the newest checkpoint's history."""
    newest = max((run / "checkpoints").glob("step_*"), key=lambda path: int(path.name.removeprefix("step_")))
    history = json.loads((newest / "trainer_state.json").read_text())["knn_history"]
    curve_file = run / "knn_curve.json"
    curve = json.loads(curve_file.read_text()) if curve_file.is_file() else []
    return curve if curve and curve[-1]["step"] >= history[-1]["step"] else history


def epoch_rows(run: Path) -> list[dict]:
    """Per whole epoch of the run: both kNN accuracies, the mean loss, the lr, training seconds and images seen."""
    run_config = json.loads((run / "run_config.json").read_text())
    metrics = read_metrics(run / "metrics.jsonl")
    global_batch = run_config["per_device_train_batch_size"] * run_config["num_processes"]
    steps_per_epoch = run_config["total_steps"] // round(run_config["num_train_epochs"])
    rows = []
    for point in knn_history(run):
        epoch = point["step"] / steps_per_epoch
        if epoch < 1 or epoch != int(epoch):
            continue
        first, last = (int(epoch) - 1) * steps_per_epoch, int(epoch) * steps_per_epoch
        # Each metrics row is the mean of the steps since the previous row: weight it by that count.
        windows, previous = [], first
        for row in metrics:
            if first < row["step"] <= last:
                windows.append((row["step"] - previous, row))
                previous = row["step"]
        steps = sum(count for count, _ in windows)
        rows.append({
            "epoch": int(epoch),
            "knn_top1_head": round(point["knn_top1_head"], 2),
            "knn_top1_backbone": round(point["knn_top1_backbone"], 2),
            "loss": round(sum(count * row["loss"] for count, row in windows) / steps, 4),
            "lr": windows[-1][1]["lr"],
            "seconds": round(sum(count * global_batch / row["images_per_second"] for count, row in windows), 1),
            "images_seen": last * global_batch,
        })  # fmt: skip
    return rows


def plot(rows: list[dict], reference: dict, control: list[dict], output: Path, device: str) -> Path:
    epochs = [row["epoch"] for row in rows]
    shown = range(1, max(epochs) + 1)
    fig, (knn_ax, loss_ax) = plt.subplots(1, 2, figsize=(12, 4.2))
    knn_ax.plot(shown, [reference[e]["knn_top1"] for e in shown], "s--", color="black", label="official demo (V100)")
    if control:
        knn_ax.plot([c["epoch"] for c in control], [c["knn_top1_head"] for c in control], "D-.", color="tab:red",
                    label="the demo's own code here (head)")  # fmt: skip
        loss_ax.plot([c["epoch"] for c in control], [c["loss"] for c in control], "D-.", color="tab:red",
                     label="the demo's own code here")  # fmt: skip
    knn_ax.plot(epochs, [row["knn_top1_head"] for row in rows], "o-", color="tab:green", label="moco-hf, head (128-d)")
    knn_ax.plot(epochs, [row["knn_top1_backbone"] for row in rows], "^:", color="tab:blue",
                label="moco-hf, backbone (512-d)")  # fmt: skip
    knn_ax.fill_between(shown, [reference[e]["knn_top1"] - TOLERANCE for e in shown],
                        [reference[e]["knn_top1"] + TOLERANCE for e in shown], color="gray", alpha=0.2,
                        label=f"demo ± {TOLERANCE} points")  # fmt: skip
    knn_ax.set(title="Weighted kNN top-1 on the CIFAR-10 test split (%)", xlabel="epoch (of 200)", ylabel="top-1 (%)")
    loss_ax.plot(shown, [reference[e]["loss"] for e in shown], "s--", color="black", label="official demo")
    loss_ax.plot(epochs, [row["loss"] for row in rows], "o-", color="tab:green", label="moco-hf")
    loss_ax.set(title="Mean training loss of the epoch", xlabel="epoch (of 200)")
    for ax in (knn_ax, loss_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"MoCo CIFAR-10 demo recipe, first epochs of 200: moco-hf on {device} vs the published log")
    return save_figure(fig, output)


def markdown_table(rows: list[dict], reference: dict, control: list[dict]) -> str:
    here = {c["epoch"]: c for c in control}
    lines = ["| epoch | demo kNN | ours kNN (head) | difference | demo code here | ours kNN (backbone) | demo loss | "
             "ours loss | demo code here |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in rows:
        demo, mine = reference[row["epoch"]], here.get(row["epoch"])
        mine_knn, mine_loss = (f"{mine['knn_top1_head']:.2f}", f"{mine['loss']:.3f}") if mine else ("-", "-")
        lines.append(f"| {row['epoch']} | {demo['knn_top1']:.2f} | {row['knn_top1_head']:.2f} | "
                     f"{row['knn_top1_head'] - demo['knn_top1']:+.2f} | {mine_knn} | {row['knn_top1_backbone']:.2f} | "
                     f"{demo['loss']:.3f} | {row['loss']:.3f} | {mine_loss} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("outputs/cifar10-demo-cpu"))
    parser.add_argument("--device_name", default="cpu", help="Suffix of the result files (cpu, gpu).")
    parser.add_argument("--device", default=None, help="The machine that trained the run (default: this CPU).")
    parser.add_argument("--command", required=True, help="The command(s) that trained the run, as typed.")
    parser.add_argument("--control", type=Path, default=None,
                        help="cifar10_demo_notebook.py results: the demo code on this machine and data.")  # fmt: skip
    args = parser.parse_args()
    log = demo_log()
    control_run = json.loads(args.control.read_text()) if args.control else None
    control = [{k: round(v, 4) for k, v in row.items()} for row in control_run["epochs"]] if control_run else []
    rows = epoch_rows(args.run)
    run_config = json.loads((args.run / "run_config.json").read_text())
    device = args.device or f"{cpu_model()} ({os.cpu_count()} cores), {run_config['num_processes']} process"
    differences = {row["epoch"]: round(row["knn_top1_head"] - log["by_epoch"][row["epoch"]]["knn_top1"], 2)
                   for row in rows}  # fmt: skip
    summary = {
        "epochs": rows,
        "reference": {
            "source": log["source"],
            "device": log["device"],
            "protocol": log["protocol"],
            "epochs": [log["by_epoch"][row["epoch"]] for row in rows],
            "later": {e: log["by_epoch"][e]["knn_top1"] for e in (20, 50, 100, 200)},
        },
        "difference_head_vs_demo": differences,
        "within_tolerance_from_epoch_3": all(abs(d) <= TOLERANCE for e, d in differences.items() if e >= 3),
        "tolerance_points": TOLERANCE,
        "command": args.command,
        "device": device,
        "mixed_precision": run_config["mixed_precision"],
        "demo_code_on_this_machine": {
            "what": "the notebook's own code (benchmarks/cifar10_demo_notebook.py): same data, machine and precision",
            "settings": control_run["settings"],
            "epochs": control,
        }
        if control_run
        else None,
    }
    output = RESULTS / f"cifar10_demo_curve-{args.device_name}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(summary, indent=1))
    plot(rows, log["by_epoch"], control, output.with_suffix(".png"), device)
    print(markdown_table(rows, log["by_epoch"], control))
    print(f"Wrote {output} and {output.with_suffix('.png')}")


if __name__ == "__main__":
    main()
