"""The documentation: the site builds strictly, every Python example runs, and every flag it shows exists."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from doc_examples import PAGES, REPO_ROOT, code_blocks


def run_here(block) -> bool:
    return block.language == "python" and not block.own_test and not block.not_run_because


PYTHON_PAGES = [page for page in PAGES if any(run_here(block) for block in code_blocks(page))]


def build_site(site_dir: Path, docs_dir: Path | None = None) -> None:
    from mkdocs.commands.build import build
    from mkdocs.config import load_config

    overrides = {"site_dir": str(site_dir), **({"docs_dir": str(docs_dir)} if docs_dir else {})}
    config = load_config(str(REPO_ROOT / "mkdocs.yml"), **overrides)
    config.plugins.on_startup(command="build", dirty=False)
    try:
        build(config)
    finally:
        config.plugins.on_shutdown()


def test_the_documentation_site_builds_strictly_with_its_api_reference(tmp_path):
    build_site(tmp_path / "site")
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    documented = "MocoConfig MocoModel MocoBackbone MocoTrainingArguments train export_encoder official_to_moco"
    documented += " KeyMomentumScheduleCallback calibrate_batch_norm knn_accuracy"
    for name in documented.split():  # an object mkdocstrings rendered has its anchor, e.g. id="moco_hf.MocoModel"
        assert re.search(rf'id="moco_hf\.[\w.]*\b{name}"', api), name


def test_a_broken_link_fails_the_build(tmp_path):
    from mkdocs.exceptions import Abort

    docs = tmp_path / "docs"
    shutil.copytree(REPO_ROOT / "docs", docs)
    page = docs / "evaluation.md"
    page.write_text(page.read_text() + "\nSee [the figure](benchmarks/results/no_such_figure.png).\n")
    with pytest.raises(Abort, match="warnings in strict mode"):
        build_site(tmp_path / "site", docs)


@pytest.mark.slow
@pytest.mark.parametrize("page", PYTHON_PAGES, ids=lambda page: page.relative_to(REPO_ROOT).as_posix())
def test_the_python_examples_of_each_page_run(page, tmp_path, monkeypatch):
    """A page's blocks run in order in one namespace (a later block uses what an earlier one made), in a fresh
    working directory, as a reader would paste them."""
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__main__"}
    for block in filter(run_here, code_blocks(page)):
        exec(compile(block.code, f"{page.name}:{block.line}", "exec"), namespace)


def test_few_examples_are_left_unrun_and_each_says_why():
    blocks = [b for page in PAGES for b in code_blocks(page) if b.language == "python"]
    unrun = [b for b in blocks if b.not_run_because]
    assert len(unrun) <= 3, [f"{b.page.name}:{b.line}" for b in unrun]
    own_tests = {b.own_test for b in blocks if b.own_test}
    tests = "\n".join(path.read_text() for path in (REPO_ROOT / "tests").glob("test_*.py"))
    for name in own_tests:  # a block marked as run by its own test is: some test asks for it by name
        assert re.search(rf'example\("[\w/.-]+", "{name}"\)', tests), name


# Flags of other programs that the pages show (accelerate launch, pip, pytest, mkdocs).
OTHER_PROGRAMS_FLAGS = {"--multi_gpu", "--num_processes", "--num_machines", "--machine_rank", "--main_process_ip",
                        "--main_process_port", "--dynamo_backend", "--cpu", "--index-url", "--strict",
                        "--durations"}  # fmt: skip
FLAG = re.compile(r"(?<![\w-])--[a-z][\w-]*")


def our_flags() -> set[str]:
    """Every option of `moco-hf train` (= training/pretrain.py), `evaluate knn|linear`, export, convert and the
    benchmarks."""
    from moco_hf.cli import build_parser
    from moco_hf.command_line import CommandLineParser
    from moco_hf.evaluation import FeatureArguments
    from moco_hf.knn import KnnArguments
    from moco_hf.linear_probe import LinearArguments
    from moco_hf.pretraining import MocoTrainingArguments

    parsers = [CommandLineParser(MocoTrainingArguments), CommandLineParser((FeatureArguments, KnnArguments)),
               CommandLineParser((FeatureArguments, LinearArguments))]  # fmt: skip
    subcommands = build_parser()._subparsers._group_actions[0].choices.values()
    options = {option for parser in (*parsers, *subcommands) for option in parser._option_string_actions}
    # the benchmarks' options, read from their argparse calls (tests run no benchmark)
    sources = "\n".join(path.read_text() for path in (REPO_ROOT / "benchmarks").rglob("*.py"))
    return options | set(re.findall(r"add_argument\(\s*\"(--[\w-]+)\"", sources))


def unknown_flags(text: str, known: set[str]) -> set[str]:
    return {flag for flag in FLAG.findall(text) if flag not in known}


def test_every_flag_the_pages_show_exists():
    known = our_flags() | OTHER_PROGRAMS_FLAGS
    assert "--learning_rate" in known and "--format" in known and "--knn_k" in known
    assert unknown_flags("python training/pretrain.py --learning_rat 0.1", known) == {"--learning_rat"}
    unknown = {page.relative_to(REPO_ROOT).as_posix(): unknown_flags(page.read_text(), known) for page in PAGES}
    assert not {page: flags for page, flags in unknown.items() if flags}


def test_the_generated_tables_match_their_sources():
    import runpy

    tables = runpy.run_path(str(REPO_ROOT / "scripts" / "docs_tables.py"), run_name="docs_tables")
    assert tables["main"](["--check"]) == 0  # every table in README.md and docs/ is what its source gives now
    stale = "<!-- generated: presets -->\n| setting | `v1` |\n| `queue_size` | 4096 |\n<!-- /generated -->"
    fresh = tables["regenerate"](stale)
    assert fresh != stale and "| `queue_size` | 65536 | 65536 | 0 | 0 | 4096 |" in fresh
