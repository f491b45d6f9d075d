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


TABLES: dict[str, Callable[[], str]] = {
    "presets": presets,
    "main-job-search": main_job_search,
    "main-job-confirm": main_job_confirm,
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
