"""The CIFAR-10 reproduction study: moco-hf's `cifar10-demo` preset against facebookresearch/moco's CIFAR-10 demo
(its published log, and its own code run here as the control). What each script answered: README.md here; the
narrative and figures: docs/reproduction.md. Results go to `results/` here."""

import os
from pathlib import Path

# BENCHMARK_RESULTS_DIR elsewhere keeps a trial run (benchmarks/gpu_session.sh) from overwriting committed results.
RESULTS = Path(os.environ.get("BENCHMARK_RESULTS_DIR", Path(__file__).resolve().parent / "results"))
