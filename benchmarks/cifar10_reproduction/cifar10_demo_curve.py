"""Our runs of the official CIFAR-10 demo's recipe beside the demo's own published log, epoch by epoch.

Reads runs of `scripts/reproduce_cifar10.sh` (one per seed: knn_curve.json, metrics.jsonl, run_config.json) and the
demo's log (`references/moco_cifar10_demo_log.json` here, parsed from the notebook's saved output), and with
`--control` the demo's own code run on the same machine and data (`cifar10_demo_notebook.py`, one file per seed);
writes `results/cifar10_demo_curve-<device>.json` (each run, and their mean at the epochs all reached, against the
log, the spread between seeds of ours and of the demo's code, the log's criterion applied between every two runs,
and how well a run's loss predicts its accuracy) and `.png`, and prints the README's tables.

    bash scripts/reproduce_cifar10.sh --mixed_precision bf16 --stop_after_epochs 10 --seed 1 \
        --output_dir outputs/cifar10-demo-cpu-s1
    python -m benchmarks.cifar10_reproduction.cifar10_demo_curve --run outputs/cifar10-demo-cpu-s1 \
        --command "bash scripts/..."

`--earlier results/cifar10_demo_curve-cpu.json` (here) keeps that file's runs beside the new ones (runs trained
on another machine, whose output folders stayed there; a seed given by --run too, continued here, takes the new
rows); the file is read before it is rewritten.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
from collections import Counter
from pathlib import Path

from matplotlib.ticker import MaxNLocator

from moco_hf.plotting import plt, read_metrics, save_figure

from . import RESULTS

REFERENCE = Path(__file__).resolve().parent / "references" / "moco_cifar10_demo_log.json"
TOLERANCE = 1.5  # points of kNN top-1 ...
JUDGED_FROM = 3  # ... at every epoch from this one on (the criterion)
RUN_FIELDS = ("seed", "output_dir", "command", "device", "mixed_precision", "epochs")  # a run of ours, as listed


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


def mean_rows(runs: list[list[dict]]) -> list[dict]:
    """The runs' mean at every epoch all of them reached (the per-run head accuracies kept beside it)."""
    reached = min(len(rows) for rows in runs)
    means = []
    for epoch_rows_of_runs in zip(*(rows[:reached] for rows in runs), strict=True):
        mean = {"epoch": epoch_rows_of_runs[0]["epoch"]}
        for key in ("knn_top1_head", "knn_top1_backbone", "loss", "seconds"):
            mean[key] = round(sum(row[key] for row in epoch_rows_of_runs) / len(runs), 4 if key == "loss" else 2)
        mean["images_seen"] = epoch_rows_of_runs[0]["images_seen"]
        mean["knn_top1_head_per_run"] = [row["knn_top1_head"] for row in epoch_rows_of_runs]
        means.append(mean)
    return means


def differences_from(rows: list[dict], reference: dict) -> dict[int, float]:
    """Head-feature kNN top-1 minus the demo's logged value, per epoch (points)."""
    return {row["epoch"]: round(row["knn_top1_head"] - reference[row["epoch"]]["knn_top1"], 2) for row in rows}


def within_tolerance(differences: dict[int, float]) -> bool:
    return all(abs(difference) <= TOLERANCE for epoch, difference in differences.items() if epoch >= JUDGED_FROM)


def seed_spread(runs: dict[int, list[dict]]) -> list[dict]:
    """Head kNN top-1 between seeds, at every epoch at least two runs reached: how many, mean, sample standard
    deviation, lowest and highest."""
    by_epoch: dict[int, list[float]] = {}
    for rows in runs.values():
        for row in rows:
            by_epoch.setdefault(row["epoch"], []).append(row["knn_top1_head"])
    return [
        {"epoch": epoch, "runs": len(values), "mean": round(statistics.mean(values), 2),
         "sd": round(statistics.stdev(values), 2), "min": min(values), "max": max(values)}
        for epoch, values in sorted(by_epoch.items()) if len(values) > 1
    ]  # fmt: skip


def permutation_test(ours: dict[int, list[dict]], theirs: dict[int, list[dict]]) -> dict:
    """Do our runs and the demo code's runs come from one distribution? Each run is summarised by its mean head kNN
    over the epochs every run reached; the statistic is the difference of the two groups' means, and its exact
    two-sided p-value counts the splits of all runs into groups of the same sizes that differ at least as much."""
    epochs = min(len(rows) for rows in (*ours.values(), *theirs.values()))
    scores = [
        statistics.mean(row["knn_top1_head"] for row in rows[:epochs]) for rows in (*ours.values(), *theirs.values())
    ]
    size = len(ours)

    def difference(group: tuple[int, ...]) -> float:
        rest = [score for index, score in enumerate(scores) if index not in group]
        return statistics.mean(scores[index] for index in group) - statistics.mean(rest)

    observed = difference(tuple(range(size)))
    splits = list(itertools.combinations(range(len(scores)), size))
    as_extreme = sum(abs(difference(split)) >= abs(observed) - 1e-9 for split in splits)
    return {
        "epochs": list(range(1, epochs + 1)),
        "statistic": "mean head kNN over these epochs, ours minus the demo's code (points)",
        "difference": round(observed, 2),
        "p_value_two_sided": round(as_extreme / len(splits), 3),
        "smallest_possible_p": round(2 / len(splits), 3) if len(ours) == len(theirs) else round(1 / len(splits), 3),
    }


def loss_against_knn(runs: list[list[dict]], reference: dict) -> list[dict]:
    """Does a run's loss tell how far its accuracy has come? At every epoch at least three runs (of either code)
    reached: Pearson's r between the mean training loss of the epoch and the head kNN after it, across runs, the
    least-squares line of kNN on loss, and how far the published run's kNN lies from that line at its own loss."""
    by_epoch: dict[int, list[tuple[float, float]]] = {}
    for rows in runs:
        for row in rows:
            by_epoch.setdefault(row["epoch"], []).append((row["loss"], row["knn_top1_head"]))
    fits = []
    for epoch, pairs in sorted(by_epoch.items()):
        if len(pairs) < 3:
            continue
        losses, accuracies = zip(*pairs, strict=True)
        slope, intercept = statistics.linear_regression(losses, accuracies)
        logged = reference[epoch]
        on_line = slope * logged["loss"] + intercept
        r = statistics.correlation(losses, accuracies)
        fits.append({"epoch": epoch, "runs": len(pairs), "pearson_r": round(r, 3),
                     "slope_points_per_loss": round(slope, 2), "intercept": round(intercept, 2),
                     "log_minus_line": round(logged["knn_top1"] - on_line, 2)})  # fmt: skip
    return fits


def criterion_between_runs(groups: dict[str, dict[int, list[dict]]]) -> dict:
    """The issue's criterion applied between two runs instead of a run and the log: does run A's head kNN stay within
    TOLERANCE of run B's at every epoch from JUDGED_FROM on that both reached? Counted for every pair of runs, within
    each code and across them: how often two draws of one recipe pass it against each other."""
    curves = [(group, seed, {row["epoch"]: row["knn_top1_head"] for row in rows})
              for group, runs in groups.items() for seed, rows in runs.items()]  # fmt: skip
    pairs, passed, compared = [], Counter(), Counter()
    for (group_a, seed_a, curve_a), (group_b, seed_b, curve_b) in itertools.combinations(curves, 2):
        epochs = sorted(epoch for epoch in curve_a.keys() & curve_b.keys() if epoch >= JUDGED_FROM)
        if not epochs:
            continue
        differences = {epoch: round(curve_a[epoch] - curve_b[epoch], 2) for epoch in epochs}
        kind = f"{group_a} vs {group_b}"
        within = within_tolerance(differences)
        compared[kind] += 1
        passed[kind] += within
        pairs.append({"runs": [f"{group_a} seed {seed_a}", f"{group_b} seed {seed_b}"], "difference": differences,
                      "within_tolerance": within})  # fmt: skip
    return {
        "tolerance_points": TOLERANCE,
        "pairs_within_tolerance": {kind: {"within": passed[kind], "of": count} for kind, count in compared.items()},
        "pairs": pairs,
    }


def trained_runs(run_dirs: list[Path], commands: list[str], device: str | None) -> list[dict]:
    """Runs of `reproduce_cifar10.sh` whose output folders are here: seed, folder, command, machine, precision and
    per-epoch rows. `device` names the machine that trained them (default: this CPU)."""
    runs = []
    for run, command in zip(run_dirs, commands, strict=True):
        config = json.loads((run / "run_config.json").read_text())
        runs.append({
            "seed": config["seed"], "output_dir": str(run), "command": command,
            "device": device or f"{cpu_model()} ({os.cpu_count()} cores), {config['num_processes']} process",
            "mixed_precision": config["mixed_precision"], "epochs": epoch_rows(run),
        })  # fmt: skip
    return runs


def earlier_runs(result_file: Path) -> list[dict]:
    """The runs listed by an earlier result file of this script, for runs trained on another machine (their output
    folders stay there). Files older than per-run machines name one machine and one precision for all their runs."""
    earlier = json.loads(result_file.read_text())
    precisions = earlier["mixed_precision"]
    file_wide = {"device": earlier["device"], "mixed_precision": precisions[0] if len(precisions) == 1 else None}
    return [{key: run[key] if key in run else file_wide[key] for key in RUN_FIELDS} for run in earlier["runs"]]


def merged_runs(earlier: list[dict], trained: list[dict]) -> list[dict]:
    """The earlier file's runs, then the new ones; a seed trained again here (a run continued for more epochs)
    replaces its earlier entry. A seed twice among the new runs is an error."""
    seeds = [run["seed"] for run in trained]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"each --run must be another seed: got seeds {seeds}")
    return [run for run in earlier if run["seed"] not in seeds] + trained


def run_summary(run: dict, reference: dict) -> dict:
    """One run of ours in the result file: where and how it was trained, its epochs and their distance to the log."""
    differences = differences_from(run["epochs"], reference)
    return {
        **{key: run[key] for key in RUN_FIELDS},
        "difference_head_vs_demo": differences,
        "within_tolerance_from_epoch_3": within_tolerance(differences),
    }


def shades(colormap: str, count: int) -> list[tuple]:
    """`count` colours spread over one matplotlib colormap: one per seed, however many seeds. They stop at 3/4 of
    the map, short of viridis' yellow, which the demo code's autumn colours use."""
    return [plt.get_cmap(colormap)(index / max(1, count - 1) * 0.75) for index in range(count)]


def plot_loss_against_knn(ax: plt.Axes, runs: dict[int, list[dict]], controls: dict[int, list[dict]],
                          colors: list[tuple], reference: dict, fits: list[dict]) -> None:  # fmt: skip
    """Every run's (loss, head kNN) at the first epoch the criterion judges, the line fitted across them and the
    published run's point."""
    epoch = JUDGED_FROM
    fit = next((fit for fit in fits if fit["epoch"] == epoch), None)
    if fit is None:
        ax.set_visible(False)
        return
    points = [(rows[epoch - 1], color, marker) for rows, color, marker in zip(
        [*runs.values(), *controls.values()], colors, ["o"] * len(runs) + ["D"] * len(controls), strict=True)
        if len(rows) >= epoch]  # fmt: skip
    for row, color, marker in points:
        ax.plot(row["loss"], row["knn_top1_head"], marker, color=color, markersize=8)
    losses = [row["loss"] for row, _, _ in points] + [reference[epoch]["loss"]]
    span = [min(losses), max(losses)]
    ax.plot(span, [fit["slope_points_per_loss"] * loss + fit["intercept"] for loss in span], "-", color="gray",
            label=f"least squares over {fit['runs']} runs (r = {fit['pearson_r']})")  # fmt: skip
    ax.plot(reference[epoch]["loss"], reference[epoch]["knn_top1"], "s", color="black", markersize=9,
            label=f"official demo: {fit['log_minus_line']:+.2f} points from the line")  # fmt: skip
    ax.set(title=f"Epoch {epoch}: kNN against loss, one point per run", xlabel=f"mean training loss of epoch {epoch}",
           ylabel=f"head kNN top-1 after epoch {epoch} (%)")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14))


def plot(runs: dict[int, list[dict]], mean: list[dict], reference: dict, controls: dict[int, list[dict]],
         fits: list[dict], output: Path, device: str) -> Path:  # fmt: skip
    """Left: kNN top-1 per epoch, the demo's log with its tolerance band, each of our runs (seed), their mean and
    the demo's code run here (seed); middle: the mean training loss of each epoch; right: kNN against loss across
    runs at the first epoch judged, as `loss_against_knn` fits it."""
    shown = range(1, max(row["epoch"] for rows in runs.values() for row in rows) + 1)
    fig, (knn_ax, loss_ax, fit_ax) = plt.subplots(1, 3, figsize=(18, 6.5))
    knn_ax.fill_between(shown, [reference[e]["knn_top1"] - TOLERANCE for e in shown],
                        [reference[e]["knn_top1"] + TOLERANCE for e in shown], color="gray", alpha=0.2,
                        label=f"demo ± {TOLERANCE} points")  # fmt: skip
    knn_ax.plot(shown, [reference[e]["knn_top1"] for e in shown], "s--", color="black", label="official demo (V100)")
    loss_ax.plot(shown, [reference[e]["loss"] for e in shown], "s--", color="black", label="official demo")
    run_colors, control_colors = shades("viridis", len(runs)), shades("autumn", len(controls))
    for color, (seed, rows) in zip(run_colors, runs.items(), strict=True):
        epochs = [row["epoch"] for row in rows]
        knn_ax.plot(epochs, [row["knn_top1_head"] for row in rows], "o-", color=color,
                    label=f"moco-hf seed {seed}, head (128-d)")  # fmt: skip
        knn_ax.plot(epochs, [row["knn_top1_backbone"] for row in rows], "^:", color=color, alpha=0.6,
                    label=f"moco-hf seed {seed}, backbone (512-d)")  # fmt: skip
        loss_ax.plot(epochs, [row["loss"] for row in rows], "o-", color=color, label=f"moco-hf seed {seed}")
    if len(runs) > 1:
        knn_ax.plot([row["epoch"] for row in mean], [row["knn_top1_head"] for row in mean], "-", color="darkgreen",
                    linewidth=3, alpha=0.7, label=f"moco-hf, mean of {len(runs)} seeds, head")  # fmt: skip
    for color, (seed, rows) in zip(control_colors, controls.items(), strict=True):
        epochs = [row["epoch"] for row in rows]
        knn_ax.plot(epochs, [row["knn_top1_head"] for row in rows], "D-.", color=color,
                    label=f"the demo's own code here, seed {seed}")  # fmt: skip
        loss_ax.plot(epochs, [row["loss"] for row in rows], "D-.", color=color,
                     label=f"the demo's own code here, seed {seed}")  # fmt: skip
    knn_ax.set(title="Weighted kNN top-1 on the CIFAR-10 test split (%)", xlabel="epoch (of 200)", ylabel="top-1 (%)")
    loss_ax.set(title="Mean training loss of the epoch", xlabel="epoch (of 200)")
    for ax in (knn_ax, loss_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)  # below: the curves fill it
    plot_loss_against_knn(fit_ax, runs, controls, [*run_colors, *control_colors], reference, fits)
    fig.suptitle(f"MoCo CIFAR-10 demo recipe, first epochs of 200: moco-hf on {device} vs the published log")
    return save_figure(fig, output)


def markdown_tables(runs: dict[int, list[dict]], mean: list[dict], reference: dict,
                    controls: dict[int, list[dict]], spread: dict) -> str:  # fmt: skip
    """Three tables of the README, one row per epoch. kNN: the log, our head kNN per seed, their mean and its
    difference, the demo's code here per seed, our backbone kNN (mean). Loss: the log, ours and the demo's code per
    seed. Between seeds: each code's mean, standard deviation and range beside the log."""
    ours = {seed: {row["epoch"]: row for row in rows} for seed, rows in runs.items()}
    here = {seed: {row["epoch"]: row for row in rows} for seed, rows in controls.items()}
    mean_by_epoch = {row["epoch"]: row for row in mean}
    epochs = sorted({epoch for seed_rows in ours.values() for epoch in seed_rows})

    def cell(table: dict, epoch: int, key: str, digits: int) -> str:
        return f"{table[epoch][key]:.{digits}f}" if epoch in table else "-"

    def table(header: list[str], rows: list[list[str]]) -> str:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])

    knn = table(
        ["epoch", "demo kNN"] + [f"ours seed {seed}" for seed in runs] + ["ours mean", "mean - demo"]
        + [f"demo code here, seed {seed}" for seed in controls] + ["ours backbone (mean)"],
        [[str(epoch), f"{reference[epoch]['knn_top1']:.2f}"]
         + [cell(seed_rows, epoch, "knn_top1_head", 2) for seed_rows in ours.values()]
         + [cell(mean_by_epoch, epoch, "knn_top1_head", 2),
            f"{mean_by_epoch[epoch]['knn_top1_head'] - reference[epoch]['knn_top1']:+.2f}"
            if epoch in mean_by_epoch else "-"]
         + [cell(seed_rows, epoch, "knn_top1_head", 2) for seed_rows in here.values()]
         + [cell(mean_by_epoch, epoch, "knn_top1_backbone", 2)] for epoch in epochs])  # fmt: skip
    loss = table(
        ["epoch", "demo loss"] + [f"ours seed {seed}" for seed in runs]
        + [f"demo code here, seed {seed}" for seed in controls],
        [[str(epoch), f"{reference[epoch]['loss']:.3f}"]
         + [cell(seed_rows, epoch, "loss", 3) for seed_rows in (*ours.values(), *here.values())]
         for epoch in epochs])  # fmt: skip

    def summary(row: dict | None) -> str:
        return (
            f"{row['mean']:.2f} ± {row['sd']:.2f} ({row['min']:.2f}-{row['max']:.2f}, {row['runs']} runs)"
            if row
            else "-"
        )

    ours_spread = {row["epoch"]: row for row in spread["ours"]}
    here_spread = {row["epoch"]: row for row in spread["demo_code_here"]}
    between = table(
        ["epoch", "demo kNN (log)", "ours: mean ± sd (range, runs)", "demo code here: mean ± sd (range, runs)"],
        [[str(epoch), f"{reference[epoch]['knn_top1']:.2f}", summary(ours_spread.get(epoch)),
          summary(here_spread.get(epoch))] for epoch in sorted(ours_spread)])  # fmt: skip
    return "\n\n".join((knn, loss, between))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, nargs="*", default=[],
                        help="Output directories of reproduce_cifar10.sh runs (one per seed).")  # fmt: skip
    parser.add_argument("--command", nargs="*", default=[],
                        help="The command(s) that trained each run, as typed: one per --run, in order.")  # fmt: skip
    parser.add_argument("--earlier", type=Path, default=None,
                        help="An earlier result file of this script: its runs are kept beside the --run ones (their "
                             "output folders were on another machine).")  # fmt: skip
    parser.add_argument("--device_name", default="cpu", help="Suffix of the result files (cpu, gpu).")
    parser.add_argument("--device", default=None, help="The machine that trained the --run runs (default: this CPU).")
    parser.add_argument("--control", type=Path, nargs="*", default=[],
                        help="cifar10_demo_notebook.py results: the demo code on this machine and data.")  # fmt: skip
    args = parser.parse_args()
    if len(args.command) != len(args.run):
        parser.error(f"--command needs one command per --run: got {len(args.command)} for {len(args.run)} runs")
    try:
        listed = merged_runs(earlier_runs(args.earlier) if args.earlier else [],
                             trained_runs(args.run, args.command, args.device))  # fmt: skip
    except ValueError as error:
        parser.error(str(error))
    if not listed:
        parser.error("no runs: give --run folders, --earlier a result file, or both")
    log = demo_log()
    reference = log["by_epoch"]
    runs = {run["seed"]: run["epochs"] for run in listed}
    control_files = [json.loads(path.read_text()) for path in args.control]
    control_runs = {int(control["settings"]["seed"]): control for control in control_files}
    controls = {seed: [{k: round(v, 4) for k, v in row.items()} for row in control["epochs"]]
                for seed, control in control_runs.items()}  # fmt: skip
    mean = mean_rows(list(runs.values()))
    device = "; ".join(dict.fromkeys(run["device"] for run in listed))
    differences = differences_from(mean, reference)
    spread = {
        "ours": seed_spread(runs),
        "demo_code_here": seed_spread(controls),
        "permutation_test": permutation_test(runs, controls) if controls else None,
        "criterion_between_runs": criterion_between_runs({"ours": runs, "demo code here": controls}),
        "loss_against_knn": loss_against_knn([*runs.values(), *controls.values()], reference),
    }
    summary = {
        "epochs": mean,
        "epochs_are": f"the mean of {len(runs)} run(s), seeds {list(runs)}, at every epoch all of them reached",
        "difference_head_vs_demo": differences,
        "within_tolerance_from_epoch_3": within_tolerance(differences),
        "tolerance_points": TOLERANCE,
        "between_seeds": spread,
        "runs": [run_summary(run, reference) for run in listed],
        "reference": {
            "source": log["source"],
            "device": log["device"],
            "protocol": log["protocol"],
            "epochs": [reference[row["epoch"]] for row in max(runs.values(), key=len)],
            "later": {e: reference[e]["knn_top1"] for e in (20, 50, 100, 200)},
        },
        "command": [run["command"] for run in listed],
        "device": device,
        "mixed_precision": sorted({str(run["mixed_precision"]) for run in listed}),
        "demo_code_on_this_machine": [
            {
                "what": "the notebook's own code (cifar10_demo_notebook.py): same data and precision as our runs",
                "settings": control["settings"],
                "epochs": controls[seed],
                "difference_head_vs_demo": differences_from(controls[seed], reference),
                **({"stopped": control["stopped"]} if "stopped" in control else {}),
            }
            for seed, control in control_runs.items()
        ],
    }
    output = RESULTS / f"cifar10_demo_curve-{args.device_name}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(summary, indent=1))
    plot(runs, mean, reference, controls, spread["loss_against_knn"], output.with_suffix(".png"), device)
    print(markdown_tables(runs, mean, reference, controls, spread))
    print(f"Wrote {output} and {output.with_suffix('.png')}")


if __name__ == "__main__":
    main()
