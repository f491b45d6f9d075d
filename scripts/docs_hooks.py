"""MkDocs hooks: the site also serves the repository files its pages link to (result tables and figures, the example
model card, the notebooks), at their repository paths, so a page links them as `benchmarks/results/x.png` and a
link to a file that does not exist fails `mkdocs build --strict`."""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File, Files, InclusionLevel

ROOT = Path(__file__).resolve().parents[1]
SERVED = ("benchmarks/results/*.png", "benchmarks/results/*.md", "benchmarks/cifar10_reproduction/results/*.png",
          "model_cards/*.md", "notebooks/*.ipynb",
          "moco_hf/templates/*.md")  # fmt: skip


def on_files(files: Files, config) -> Files:
    for pattern in SERVED:
        for path in sorted(ROOT.glob(pattern)):
            relative = path.relative_to(ROOT).as_posix()
            # markdown files become pages outside the navigation (a result table, the example card, rendered)
            files.append(File.generated(config, relative, abs_src_path=str(path), inclusion=InclusionLevel.NOT_IN_NAV))
    return files
