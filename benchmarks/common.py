"""Shared by the benchmark scripts: interleaved timing, peak memory, the machine, and result files."""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch

# BENCHMARK_RESULTS_DIR elsewhere keeps a trial run (benchmarks/gpu_session.sh) from overwriting committed results.
RESULTS = Path(os.environ.get("BENCHMARK_RESULTS_DIR", Path(__file__).resolve().parent / "results"))
# The benchmarks' real images: the project's copy of CIFAR-10 beside the repository (../shared/data, see its README).
CIFAR10 = str(Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10")
if Path(CIFAR10).is_dir():  # and the default dataset of the runs the benchmarks start, as the scripts make it
    os.environ.setdefault("MOCO_HF_DEFAULT_DATASET", CIFAR10)


def device_of_choice() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_timings(
    candidates: dict[str, Callable[[], None]], repeats: int, warmup: int, device: torch.device
) -> dict[str, dict[str, float]]:
    """Seconds per call of each candidate, run in turn (A, B, C, A, B, C, ...) so that machine noise hits all alike."""
    for run in candidates.values():
        for _ in range(warmup):
            run()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, run in candidates.items():
            synchronize(device)
            start = time.perf_counter()
            run()
            synchronize(device)
            samples[name].append(time.perf_counter() - start)
    return {
        name: {"min_s": min(times), "median_s": statistics.median(times), "repeats": len(times)}
        for name, times in samples.items()
    }


def peak_memory_mib(device: torch.device, run: Callable[[], None]) -> float:
    """Peak memory while running `run` in this process: the CUDA allocator's peak on a GPU, else the peak RSS of
    the whole process (measure in a fresh process, see `last_number_printed_by`)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    run()
    synchronize(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork+exec, so a child would report its parent's peak.
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) / 1024


def last_number_printed_by(argv: list[str]) -> float:
    """Run `python argv...` in a fresh process and return the number on the last line it prints."""
    output = subprocess.run([sys.executable, *argv], capture_output=True, text=True, check=True).stdout
    return float(output.strip().splitlines()[-1])


def trainer_images_per_second(arguments: list[str], processes: int = 1) -> float:
    """Run `training/pretrain.py arguments` (under `accelerate launch` with gloo when `processes` > 1) in a fresh
    output folder; the median `images_per_second` of its `metrics.jsonl` windows after the first (start-up)."""
    root = Path(__file__).resolve().parents[1]
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                     "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
    with tempfile.TemporaryDirectory() as output_dir:
        command = [*launcher, str(root / "training" / "pretrain.py"), *arguments, "--output_dir", output_dir]
        result = subprocess.run(command, capture_output=True, text=True, cwd=root)
        if result.returncode != 0:
            raise RuntimeError(f"the trainer failed ({' '.join(command)}):\n{result.stderr[-3000:]}")
        windows = [json.loads(line) for line in Path(output_dir, "metrics.jsonl").read_text().splitlines()]
    return statistics.median(window["images_per_second"] for window in windows[1:])


def machine() -> dict[str, object]:
    info: dict[str, object] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "self_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def write_results(name: str, settings: dict, rows: list[dict], columns: list[str], notes: str = "") -> Path:
    """`results/<name>-<device>.json` and `.md` (a table of `rows` over `columns`), with command and machine."""
    device = "gpu" if torch.cuda.is_available() else "cpu"
    payload = {
        "benchmark": name,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "settings": settings,
        "results": rows,
        "notes": notes,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    json_path = RESULTS / f"{name}-{device}.json"
    json_path.write_text(json.dumps(payload, indent=2))
    lines = [
        f"# {name} ({device})",
        "",
        f"Command: `{payload['command']}`  ",
        f"Machine: {payload['machine']}  ",
        f"Settings: {settings}",
        "",
        "| " + " | ".join(columns) + " |",
        "| " + " | ".join("---" for _ in columns) + " |",
    ]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(column)) for column in columns) + " |")
    if notes:
        lines += ["", notes]
    (RESULTS / f"{name}-{device}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return json_path


def _cell(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
