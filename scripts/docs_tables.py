"""The documentation's tables, generated from the code and from `benchmarks/results/*.json`, never typed by hand;
and the package's generated data files (`GENERATED_FILES`: e.g. the presets' values that `moco-hf train --help`
states, kept as JSON so that `--help` imports no torch).

A page holds each table between `<!-- generated: NAME -->` and `<!-- /generated -->`; this script rewrites the lines
between them from NAME's source. `tests/test_docs.py` runs `--check`, which fails when a committed table differs
from what its source gives now (a preset changed, a benchmark re-run).

    python scripts/docs_tables.py          # rewrite the tables in README.md and docs/*.md
    python scripts/docs_tables.py --check  # exit status 1 and the names of the stale tables
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BLOCK = re.compile(r"(<!-- generated: ([\w-]+) -->\n)(.*?)(<!-- /generated -->)", re.DOTALL)


def presets() -> str:
    """Each preset's settings as `MocoConfig.from_preset` builds them (the trainer's flags override any of them)."""
    from moco_hf import PRESETS, MocoConfig

    configs = {name: MocoConfig.from_preset(name).to_dict() for name in PRESETS}
    shown = [field for field in MocoConfig.field_names() if len({repr(c[field]) for c in configs.values()}) > 1]
    lines = ["| setting | " + " | ".join(f"`{name}`" for name in configs) + " |",
             "| --- |" + " --- |" * len(configs)]  # fmt: skip
    for field in shown:
        values = (_setting(configs[name][field]) for name in configs)
        lines.append(f"| `{field}` | " + " | ".join(values) + " |")
    return "\n".join(lines)


def _setting(value) -> str:
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value) + ")"
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items()) or "-"
    return "-" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def _main_job_results() -> dict:
    return json.loads((RESULTS / "main_job_recipe-cpu.json").read_text())


def main_job_search() -> str:
    """The recipe search on the validation hold-out (`python -m benchmarks.main_job_recipe search`)."""
    lines = ["| recipe (change from the search base) | seed | random init, calibrated | MoCo | gain | steps | wall |",
             "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for row in sorted(_main_job_results()["search"].values(), key=lambda row: -row["knn_gain"]):
        changes = " ".join(f"{flag} {value or ''}".strip() for flag, value in row["changes"].items()) or "(none)"
        lines.append(f"| {row['name']}: `{changes}` | {row['seed']} | {row['knn_top1_initial']:.2f}% | "
                     f"{row['knn_top1']:.2f}% | {row['knn_gain']:+.2f} | {row['steps']} | "
                     f"{row['wall_seconds'] / 60:.1f} min |")  # fmt: skip
    return "\n".join(lines)


def main_job_confirm() -> str:
    """The main job on the test images, per seed, and its learning-rate-~0 control (`... confirm`)."""
    lines = ["| run | random init, calibrated | MoCo | gain | wall |", "| --- | --- | --- | --- | --- |"]
    for name, row in _main_job_results()["confirm"].items():
        lines.append(f"| `{row['command']}` ({name}) | {row['knn_top1_initial']:.2f}% | {row['knn_top1']:.2f}% | "
                     f"{row['knn_gain']:+.2f} | {row['wall_seconds'] / 60:.1f} min |")  # fmt: skip
    return "\n".join(lines)


def main_job_grey() -> str:
    """The main job on grey CIFAR-10 (one band) beside its RGB runs of the same seed, each with its lr-~0 control."""
    results = _main_job_results()
    rows = [("RGB (3 bands), v2 augmentation", results["confirm"].get(name)) for name in
            ("seed 0", "control lr 1e-12 seed 0")]  # fmt: skip
    rows += [("grey (1 band), multiband augmentation", results.get("grey", {}).get(name)) for name in
             ("grey seed 0", "grey control lr 1e-12 seed 0")]  # fmt: skip
    lines = ["| images | run | random init, calibrated | MoCo | gain | steps |", "|---|---|---|---|---|---|"]
    for images, row in rows:
        if row is not None:
            run = "control, lr 1e-12" if "1e-12" in row["command"] else "seed 0"
            lines.append(f"| {images} | {run} | {row['knn_top1_initial']:.2f}% | {row['knn_top1']:.2f}% | "
                         f"{row['knn_gain']:+.2f} | {row['steps']} |")  # fmt: skip
    return "\n".join(lines)


def demo_epoch0() -> str:
    """The cifar10-demo preset's calibrated random encoder, measured as the reproduction measures its epochs."""
    lines = ["| feature | seed | kNN top-1 | bank | queries |", "| --- | --- | --- | --- | --- |"]
    for name, row in _main_job_results().get("demo_epoch0", {}).items():
        feature, seed = name.split(" seed ")
        lines.append(f"| {feature} | {seed} | {row['knn_top1']:.2f}% | {row['train_samples']:,} | "
                     f"{row['eval_samples']:,} |")  # fmt: skip
    return "\n".join(lines)


def low_label() -> str:
    """CIFAR-10 classifiers on 1% and 10% of the labels, per encoder and protocol (`python -m benchmarks.low_label`)."""
    path = RESULTS / "low_label-cpu.json"
    if not path.exists():
        return "*Not measured yet: `benchmarks/results/low_label-cpu.json` does not exist.*"
    results = json.loads(path.read_text())
    lines = ["| protocol | labels | encoder | seeds | test top-1 (mean ± sd) | gain over random (mean ± sd) |",
             "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for row in results["summary"]:
        spread = f" ± {row['top1_sd']:.2f}" if row["top1_sd"] is not None else ""
        gain = "-" if row["gain_over_random_mean"] is None else f"{row['gain_over_random_mean']:+.2f}" + (
            f" ± {row['gain_over_random_sd']:.2f}" if row["gain_over_random_sd"] is not None else "")  # fmt: skip
        lines.append(f"| {row['protocol']} | {row['fraction']} | {row['encoder']} | {len(row['seeds'])} | "
                     f"{row['top1_mean']:.2f}%{spread} | {gain} |")  # fmt: skip
    return "\n".join(lines)


def _results(name: str) -> list[dict]:
    return json.loads((RESULTS / f"{name}.json").read_text())["results"]


TRAINER_CANDIDATES = {
    "step alone": "MoCo step alone (no data)",
    "trainer": "trainer, batched augmentation on the device (default)",
    "trainer, per-image augmentation": "trainer, per-image augmentation in the workers (`--augment_on_device false`)",
    "lightly loop": "lightly's MoCo v2 example loop, same backbone, batch, K, T, m",
}


def trainer_throughput() -> str:
    """The whole trainer against its own step and lightly's loop (`python -m benchmarks.trainer_throughput`)."""
    lines = ["| | images/s | vs the step alone | vs the lightly loop |", "| --- | --- | --- | --- |"]
    for row in _results("trainer_throughput-cpu"):
        lines.append(f"| {TRAINER_CANDIDATES.get(row['candidate'], row['candidate'])} | {row['images_per_s']:.0f} | "
                     f"{_ratio(row['vs_step_alone'])} | {_ratio(row['vs_lightly_loop'])} |")  # fmt: skip
    return "\n".join(lines)


def _ratio(value: float) -> str:
    return "1" if round(value, 2) == 1 else f"{value:.2f}x"


STEP_RUNS = {"CPU, fp32": "cpu", "H100, fp32": "gpu", "H100, bf16 autocast": "bf16-gpu"}


def step_costs() -> str:
    """MoCo's own cost per step and the peers, per device (`step_overhead` and `vs_peers` results)."""
    steps = {
        column: {row["step"]: row for row in _results(f"step_overhead-{run}")} for column, run in STEP_RUNS.items()
    }
    peers = {column: {row["implementation"]: row for row in _results(f"vs_peers-{run}")}
             for column, run in STEP_RUNS.items()}  # fmt: skip
    bound = "lower bound (encoder fwd+bwd, key fwd, optimizer)"
    rows = {f"{bound}, median": lambda c: f"{steps[c][bound]['median_ms']:.1f} ms"}
    for queue, shuffle in ((4096, "none"), (65536, "none"), (4096, "split")):
        step = f"MoCo step (K={queue}, shuffle_bn={shuffle})"
        rows[f'MoCo overhead, K={queue}, `shuffle_bn="{shuffle}"`'] = (
            lambda c, step=step: f"{steps[c][step]['moco_overhead_%']:.1f}%")  # fmt: skip
    rows["official builder port / lightly, time vs ours (K=4096)"] = lambda c: (
        f"{peers[c]['official port']['time_vs_moco_hf']:.2f}x / {peers[c]['lightly']['time_vs_moco_hf']:.2f}x"
    )
    rows["peak memory, ours / official / lightly"] = lambda c: (
        " / ".join(f"{peers[c][name]['peak_memory_mib']:.0f}" for name in ("moco-hf", "official port", "lightly"))
        + " MiB"
    )
    lines = ["| | " + " | ".join(STEP_RUNS) + " |", "| --- |" + " --- |" * len(STEP_RUNS)]
    lines += [f"| {name} | " + " | ".join(cell(c) for c in STEP_RUNS) + " |" for name, cell in rows.items()]
    return "\n".join(lines)


def command_latency() -> str:
    """`moco-hf` answering without work (`python -m benchmarks.command_latency`)."""
    lines = ["| command | median | min - max |", "| --- | --- | --- |"]
    for row in _results("command_latency-cpu"):
        lines.append(f"| `{row['command']}` | {row['median_s']:.2f} s | {row['min_s']:.2f} - {row['max_s']:.2f} s |")
    return "\n".join(lines)


STUDY_RESULTS = ROOT / "benchmarks" / "cifar10_reproduction" / "results"


def _curve() -> dict:
    return json.loads((STUDY_RESULTS / "cifar10_demo_curve-cpu.json").read_text())


def _by_epoch(rows: list[dict], key: str) -> dict[int, float]:
    return {row["epoch"]: row[key] for row in rows if row.get(key) is not None}


def _epoch_table(header: list[str], columns: list[dict[int, float]], formats: list[str]) -> str:
    """One row per epoch any column has; `formats[i]` formats column i (e.g. ".2f", "+.2f"); "-" where it has none."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for epoch in sorted(set().union(*columns)):
        cells = [
            format(column[epoch], spec) if epoch in column else "-"
            for column, spec in zip(columns, formats, strict=True)
        ]
        lines.append(f"| {epoch} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def reproduction_knn() -> str:
    """kNN per epoch: the demo's log, each of our seeds, their mean, the demo's code here per seed, our backbone."""
    curve = _curve()
    ours, here = curve["runs"], curve["demo_code_on_this_machine"]
    header = [
        "epoch",
        "demo kNN",
        *(f"ours seed {run['seed']}" for run in ours),
        "ours mean",
        "mean - demo",
        *(f"demo code here, seed {run['settings']['seed']}" for run in here),
        "ours backbone (mean)",
    ]
    columns = [_by_epoch(curve["reference"]["epochs"], "knn_top1"),
               *(_by_epoch(run["epochs"], "knn_top1_head") for run in ours),
               _by_epoch(curve["epochs"], "knn_top1_head"),
               {int(epoch): value for epoch, value in curve["difference_head_vs_demo"].items()},
               *(_by_epoch(run["epochs"], "knn_top1_head") for run in here),
               _by_epoch(curve["epochs"], "knn_top1_backbone")]  # fmt: skip
    formats = [".2f"] * (len(ours) + 2) + ["+.2f"] + [".2f"] * (len(here) + 1)
    return _epoch_table(header, columns, formats)


def reproduction_loss() -> str:
    """The mean training loss per epoch: the demo's log, our seeds, the demo's code here per seed."""
    curve = _curve()
    header = [
        "epoch",
        "demo loss",
        *(f"ours seed {run['seed']}" for run in curve["runs"]),
        *(f"demo code here, seed {run['settings']['seed']}" for run in curve["demo_code_on_this_machine"]),
    ]
    runs = [*curve["runs"], *curve["demo_code_on_this_machine"]]
    columns = [_by_epoch(curve["reference"]["epochs"], "loss"), *(_by_epoch(run["epochs"], "loss") for run in runs)]
    return _epoch_table(header, columns, [".3f"] * len(columns))


def reproduction_spread() -> str:
    """Between-seed mean, sd and range per epoch: ours and the demo's code here, beside the demo's log."""
    curve = _curve()
    demo = _by_epoch(curve["reference"]["epochs"], "knn_top1")

    def spread(rows: list[dict]) -> dict[int, str]:
        return {row["epoch"]: f"{row['mean']:.2f} ± {row['sd']:.2f} ({row['min']:.2f}-{row['max']:.2f}, "
                f"{row['runs']} runs)" for row in rows}  # fmt: skip

    ours, here = spread(curve["between_seeds"]["ours"]), spread(curve["between_seeds"]["demo_code_here"])
    lines = ["| epoch | demo kNN (log) | ours: mean ± sd (range, runs) | demo code here: mean ± sd (range, runs) |",
             "|---|---|---|---|"]  # fmt: skip
    for epoch in sorted(ours):
        lines.append(f"| {epoch} | {demo[epoch]:.2f} | {ours[epoch]} | {here.get(epoch, '-')} |")
    return "\n".join(lines)


SWAP_LEGS = {  # result file -> column, in the order the page reads them
    "step_demo-data_demo": "the control: demo step, demo data (seed 0)",
    "step_demo-data_demo-fp32": "the control in fp32",
    "step_moco-hf-data_demo": "moco-hf step, the control's data",
    "step_demo-data_demo-data_seed1": "demo step, demo data, data seed 1",
    "step_demo-data_moco-hf": "demo step, moco-hf data",
    "trainer": "moco-hf trainer",
}


def reproduction_swap() -> str:
    """The mean loss of each 10 steps from one initial model, step and data swapped (`cifar10_demo_swap.py`)."""
    legs = {name: json.loads((STUDY_RESULTS / f"cifar10_demo_swap-{name}.json").read_text())["windows"]
            for name in SWAP_LEGS}  # fmt: skip
    windows = [(w["first_step"], w["last_step"]) for w in legs["step_demo-data_demo"]]  # the control's 40 steps
    lines = ["| steps | " + " | ".join(SWAP_LEGS.values()) + " |", "|---|" + "---|" * len(SWAP_LEGS)]
    for first, last in windows:
        losses = [
            {(w["first_step"], w["last_step"]): w["loss"] for w in legs[name]}.get((first, last)) for name in legs
        ]
        lines.append(f"| {first}-{last} | " + " | ".join("-" if v is None else f"{v:.3f}" for v in losses) + " |")
    return "\n".join(lines)


def queue_vs_batch() -> str:
    """Queue against in-batch negatives per global batch (`python -m benchmarks.queue_vs_batch`)."""
    rows = _results("queue_vs_batch-cpu")
    kinds = list(dict.fromkeys(row["negatives"] for row in rows))
    cells = {(row["global_batch"], row["negatives"]): row for row in rows}
    lines = ["| global batch | kNN top-1: " + " | ".join(kinds) + f" | ms/step ({' / '.join(kinds)}) | peak RSS MiB "
             "(same order) |", "| --- |" + " --- |" * (len(kinds) + 2)]  # fmt: skip
    for batch in sorted({row["global_batch"] for row in rows}):
        found = [cells[(batch, kind)] for kind in kinds]
        lines.append(f"| {batch} | " + " | ".join(f"{row['knn_top1']:.1f}" for row in found) + " | "
                     + " / ".join(f"{row['ms_per_step']:.0f}" for row in found) + " | "
                     + " / ".join(f"{row['peak_rss_mib']:.0f}" for row in found) + " |")  # fmt: skip
    return "\n".join(lines)


def cifar10_evaluation() -> str:
    """kNN and linear evaluation on all of CIFAR-10, random and pretrained (`bash scripts/evaluate.sh`)."""
    path = RESULTS / "cifar10_evaluation-cpu.json"
    if not path.exists():
        return "*Not measured yet: run `bash scripts/evaluate.sh`.*"
    result = json.loads(path.read_text())
    lines = [f"| encoder (`{result['model']}`) | kNN top-1 (k=200) | linear top-1 | linear top-5 |",
             "| --- | --- | --- | --- |"]  # fmt: skip
    for row in result["results"]:
        lines.append(f"| {row['encoder']} | {row['knn_top1']:.2f}% | {row['linear_top1']:.2f}% | "
                     f"{row['linear_top5']:.2f}% |")  # fmt: skip
    return "\n".join(lines) + f"\n\n*{result['machine']}, commit {result['commit']}, {result['date'][:10]}.*"


TABLES: dict[str, Callable[[], str]] = {
    "cifar10-evaluation": cifar10_evaluation,
    "queue-vs-batch": queue_vs_batch,
    "reproduction-swap": reproduction_swap,
    "reproduction-knn": reproduction_knn,
    "reproduction-loss": reproduction_loss,
    "reproduction-spread": reproduction_spread,
    "trainer-throughput": trainer_throughput,
    "step-costs": step_costs,
    "command-latency": command_latency,
    "presets": presets,
    "main-job-search": main_job_search,
    "main-job-confirm": main_job_confirm,
    "main-job-grey": main_job_grey,
    "demo-epoch0": demo_epoch0,
    "low-label": low_label,
}


def preset_help() -> str:
    from moco_hf.pretraining.arguments import preset_help_texts

    return json.dumps(preset_help_texts(), indent=2) + "\n"


GENERATED_FILES: dict[str, Callable[[], str]] = {"moco_hf/pretraining/preset_help.json": preset_help}


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def regenerate(text: str) -> str:
    def table(match: re.Match) -> str:
        if match[2] not in TABLES:
            raise SystemExit(f"unknown generated table {match[2]!r}; known: {', '.join(TABLES)}")
        return f"{match[1]}{TABLES[match[2]]()}\n{match[4]}"

    return BLOCK.sub(table, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only report tables that differ from their source")
    args = parser.parse_args(argv)
    stale = []
    for page in pages():
        text = page.read_text()
        fresh = regenerate(text)
        if fresh != text:
            stale.append(page.relative_to(ROOT).as_posix())
            if not args.check:
                page.write_text(fresh)
    for name, generate in GENERATED_FILES.items():
        path, fresh = ROOT / name, generate()
        if not path.is_file() or path.read_text() != fresh:
            stale.append(name)
            if not args.check:
                path.write_text(fresh)
    if stale:
        print(("stale: " if args.check else "rewrote: ") + ", ".join(stale))
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
