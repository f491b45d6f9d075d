"""How long the `moco-hf` command takes to answer without doing any work: `--help`, `train --help` and a usage error
(issue 43: each within 2 s of wall time on an idle 2-core machine). Each command runs `--repeats` times in a fresh
process, interleaved; the median and the spread are reported, beside `python -c pass` and `python -c "import torch"`
for scale (torch alone takes most of the 2 s here, which is why these answers must not import it).

    python -m benchmarks.command_latency            # results/command_latency-cpu.json and .md
    python -m benchmarks.command_latency --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

from .common import write_results

COMMAND = str(Path(sys.executable).with_name("moco-hf"))  # the console script of this environment
CANDIDATES = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "python -c 'import torch'": [sys.executable, "-c", "import torch"],
    "moco-hf --help": [COMMAND, "--help"],
    "moco-hf train --help": [COMMAND, "train", "--help"],
    "moco-hf train --learning_rate -1 (usage error)": [COMMAND, "train", "--learning_rate", "-1"],
    "moco-hf evaluate --help": [COMMAND, "evaluate", "--help"],
}
BOUND_SECONDS = 2.0


def wall_seconds(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, capture_output=True, check=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in CANDIDATES}
    for _ in range(args.repeats):  # interleaved, so that a busy moment costs every candidate alike
        for name, argv in CANDIDATES.items():
            times[name].append(wall_seconds(argv))
    rows = [
        {
            "command": name,
            "median_s": statistics.median(seconds),
            "min_s": min(seconds),
            "max_s": max(seconds),
            "within_2s": name.startswith("python") or statistics.median(seconds) <= BOUND_SECONDS,
        }
        for name, seconds in times.items()
    ]
    write_results("command_latency", {"repeats": args.repeats}, rows,
                  ["command", "median_s", "min_s", "max_s", "within_2s"],
                  notes="Wall time of a fresh process each, interleaved. The moco-hf rows import neither torch nor "
                        "transformers' models: the flags are checked before anything heavy is loaded.")  # fmt: skip


if __name__ == "__main__":
    main()
