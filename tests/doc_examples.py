"""The code blocks of README.md and the documentation pages, as the tests run them.

A ```python block is run by `tests/test_docs.py` unless the line above it is
- `<!-- NAME-example -->`: a test of its own runs it (`example(page, NAME)`), with a trained model or a path it
  needs; or
- a visible `*Not run by the tests: <reason>.*`, which tells the reader why (a GPU launch, a real Hub push).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PAGES = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
OWN_TEST = re.compile(r"<!-- ([\w-]+)-example -->")
NOT_RUN = re.compile(r"^\*Not run by the tests: (.+)\.\*$")


@dataclass
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    language: str
    code: str
    above: str  # the last non-empty line above the fence

    @property
    def own_test(self) -> str | None:
        match = OWN_TEST.fullmatch(self.above.strip())
        return match[1] if match else None

    @property
    def not_run_because(self) -> str | None:
        match = NOT_RUN.match(self.above.strip())
        return match[1] if match else None


def code_blocks(page: Path) -> list[Block]:
    blocks, lines = [], page.read_text().splitlines()
    index = 0
    while index < len(lines):
        fence = re.match(r"^(\s*)```(\w*)\s*$", lines[index])
        if not fence:
            index += 1
            continue
        indent, start = len(fence[1]), index
        end = next(i for i in range(start + 1, len(lines)) if lines[i].strip() == "```")
        above = next((line for line in reversed(lines[:start]) if line.strip()), "")
        code = "\n".join(line[indent:] for line in lines[start + 1 : end]) + "\n"
        blocks.append(Block(page, start + 1, fence[2], code, above))
        index = end + 1
    return blocks


def example(page: str, name: str) -> str:
    """The ```python block of `page` (relative to the repository) marked `<!-- NAME-example -->`."""
    (block,) = [b for b in code_blocks(REPO_ROOT / page) if b.language == "python" and b.own_test == name]
    return block.code
