#!/usr/bin/env bash
# Every GPU figure the open issues wait for, in one device call of at most ~8 minutes, for a session lent a GPU:
# the CUDA tests, split BatchNorm per layer, the MoCo step's overhead (split vs none), the trainer against its step
# (fp32, then bf16 + channels_last, batch 512, CIFAR stem) and the reproduction recipe for 1 minute of training.
# The device machine gets the working tree alone (no ../shared, no .venv, no network), so carry the data and use
# its own Python:
#   here:    mkdir -p .device && cp -r ../shared/data/cifar10 .device/ && echo /.device/ >> .git/info/exclude
#   device:  run(command="OUT=$OUT bash benchmarks/gpu_session.sh", carry=[".device"], timeout_s=600)
# Everything comes back as $OUT/gpu_session.tar.gz: results/ (the benchmarks' .md/.json, for benchmarks/results/,
# and the recipe's results.json and knn_curve) and logs/ (one per step, machine.txt, summary.txt). Each step has
# its own time limit; one that fails or runs out does not stop the others.
# A dry run on the CPU with tiny settings: TINY=1 OUT=/tmp/gpu-dry RUN_PYTHON=.venv/bin/python bash benchmarks/gpu_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder that comes back}"
RUN_PYTHON=${RUN_PYTHON:-python3}
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 BENCHMARK_RESULTS_DIR=$OUT/results
mkdir -p "$OUT/results" "$OUT/logs"
if [ ! -d ../shared/data/cifar10 ] && [ -d .device/cifar10 ]; then  # where the scripts look for the default data
    mkdir -p ../shared/data && ln -s "$PWD/.device/cifar10" ../shared/data/cifar10
fi

sized() {  # sized FULL TINY: the full settings, or the tiny ones for a dry run
    if [ -n "${TINY:-}" ]; then echo "$2"; else echo "$1"; fi
}

step() {  # step NAME SECONDS COMMAND...: run it under a time limit into logs/NAME.log, note its exit status
    local name=$1 limit=$2 start=$SECONDS status
    shift 2
    timeout "$limit" "$@" >"$OUT/logs/$name.log" 2>&1
    status=$?
    echo "$name: exit $status after $((SECONDS - start)) s (limit $limit s)" | tee -a "$OUT/logs/summary.txt"
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    "$RUN_PYTHON" -m pip list 2>/dev/null | grep -i -E "^(torch|torchvision|timm|transformers|datasets|accelerate|lightly) "
} >"$OUT/logs/machine.txt" 2>&1

step cuda_tests 60 "$RUN_PYTHON" -m pytest -q -rA -p no:cacheprovider tests/test_cuda.py
step split_batch_norm 40 "$RUN_PYTHON" -m benchmarks.split_batch_norm $(sized "--repeats 30" "--batch_size 16 --repeats 2")
step step_overhead 70 "$RUN_PYTHON" -m benchmarks.step_overhead --queue_sizes 4096 \
    $(sized "--repeats 20" "--batch_size 16 --repeats 2 --warmup 1")
throughput=(--cifar_stem --queue_size 4096 --rounds 1 --candidates "step alone" trainer
    $(sized "--batch_size 512 --steps 60 --window 10 --workers 8" "--batch_size 16 --steps 4 --window 2 --workers 1"))
step trainer_throughput_fp32 90 "$RUN_PYTHON" -m benchmarks.trainer_throughput "${throughput[@]}"
step trainer_throughput_bf16 90 "$RUN_PYTHON" -m benchmarks.trainer_throughput "${throughput[@]}" \
    --mixed_precision bf16 --channels_last
step reproduction 140 env RUN_PYTHON="$RUN_PYTHON" bash scripts/reproduce_cifar10.sh --output_dir "$OUT/reproduction" \
    --mixed_precision bf16 --channels_last --dataloader_num_workers 8 --checkpointing_steps 100000 \
    $(sized "--max_train_minutes 1" "--max_train_steps 2 --per_device_train_batch_size 16 --knn_k 20
        --knn_max_train_samples 64 --knn_max_eval_samples 32 --dataloader_num_workers 1")
cp "$OUT"/reproduction/{results.json,knn_curve.json,knn_curve.png,metrics.jsonl} "$OUT/results/" 2>/dev/null
tar -czf "$OUT/gpu_session.tar.gz" -C "$OUT" results logs
rm -rf "$OUT/results" "$OUT/logs" "$OUT/reproduction"
