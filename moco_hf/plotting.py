"""Training curves as a PNG: loss, contrastive top-1, learning rate and kNN accuracy against steps."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on training machines
import matplotlib.pyplot as plt


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_training_curves(metrics_path: Path, knn_history: list[dict], output: Path) -> Path:
    """Four panels from `metrics.jsonl` and the kNN history; returns the PNG's path."""
    rows = read_metrics(metrics_path)
    steps = [row["step"] for row in rows]
    fig, axes = plt.subplots(1, 4, figsize=(18, 3.8))
    panels = [
        ("loss", "InfoNCE loss"),
        ("contrastive_top1", "Contrastive top-1 (%)"),
        ("lr", "Learning rate"),
    ]
    for ax, (key, title) in zip(axes, panels, strict=False):
        ax.plot(steps, [row[key] for row in rows], color="tab:blue")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    ax = axes[3]
    if knn_history:
        ax.plot([h["step"] for h in knn_history], [h["knn_top1"] for h in knn_history], "o-", color="tab:green")
        for point in knn_history:
            ax.annotate(f"{point['knn_top1']:.1f}", (point["step"], point["knn_top1"]), textcoords="offset points",
                        xytext=(0, 6), ha="center", fontsize=8)  # fmt: skip
    ax.set_title("Weighted kNN top-1 (%)")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    return save_figure(fig, output)


def plot_knn_curve(curve: list[dict], output: Path, title: str) -> Path:
    """Weighted kNN top-1 against epochs (`knn_curve.json` rows: step, epoch, knn_top1); returns the PNG's path."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([point["epoch"] for point in curve], [point["knn_top1"] for point in curve], "o-", color="tab:green")
    if curve:
        ax.annotate(f"{curve[-1]['knn_top1']:.1f}%", (curve[-1]["epoch"], curve[-1]["knn_top1"]),
                    textcoords="offset points", xytext=(0, 6), ha="center")  # fmt: skip
    ax.set(title=f"kNN top-1 ({title})", xlabel="epoch", ylabel="top-1 (%)")
    ax.grid(alpha=0.3)
    return save_figure(fig, output)


def save_figure(fig: plt.Figure, output: Path) -> Path:
    """Lay out, write as PNG (creating the folder) and close `fig`; returns the PNG's path."""
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output
